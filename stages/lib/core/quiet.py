"""Library messages that ask nothing of the user, silenced where they start: each stage calls `quiet()` first.

Every entry names the message and why no action exists; any other warning still reaches the log.
"""

from __future__ import annotations

import logging
import warnings

# (logger name, start of the message): dropped from that logger only
DROPPED_LOGS = [
    # DeepSpeed's accelerator probe on a machine without a GPU: the CPU is the intended device there
    ("DeepSpeed", "Setting accelerator to CPU"),
    # tokenize encodes whole records, then cuts them at tokenize.max_length and counts the cuts itself
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer"),
    # bitsandbytes on an AVX512-BF16 CPU offers a faster CPU kernel fetched from the Hub (the `kernels` package);
    # without it its own kernel runs: nothing is wrong, and on a GPU neither is used
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
]
# (category, regex at the start of the message): warnings raised inside TRL/PEFT/transformers, not by our calls
IGNORED_WARNINGS = [
    # TRL and PEFT read the old property name; transformers asks them, not us, to move
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet() -> None:
    """Install the filters above. Logger filters survive the library's own logger setup (getLogger returns the
    same object), so this runs before the libraries are imported."""
    for name, prefix in DROPPED_LOGS:
        logging.getLogger(name).addFilter(_Drop(prefix))
    for category, pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
