"""Which llama.cpp pre-tokenizer (GGUF `tokenizer.ggml.pre`) splits text as a BPE tokenizer does, when llama.cpp's
converter does not recognize the tokenizer by its hash.

The converter identifies a BPE tokenizer's pre-tokenizer by hashing its ids for a check text and refuses unknown
hashes. The embedded default's tokenizer (stages/download.py) is trained on the data: its pre-tokenizer is GPT-2's
byte-level split with every CJK character cut out first, which no llama.cpp pre-tokenizer does. llama.cpp's
`gpt-2` split keeps a run of CJK characters in one piece; BPE then gives the same ids unless a merge joins the end
of one CJK character to the start of the next, which a vocabulary trained on isolated characters never learned.
That is checked, not assumed: both splits must give the same ids for every text the model was trained and
validated on. Any other unrecognized tokenizer is refused: llama.cpp would split its text differently.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import UserError

CJK_ISOLATED = r"[\u3400-\u9fff]"  # the Split regex stages/download.py puts before ByteLevel


def _byte_level_after_cjk_split(pre: dict | None) -> bool:
    """`pre` (tokenizer.json's pre_tokenizer) is [Split(CJK_ISOLATED, isolated), ByteLevel(no prefix space, regex)]."""
    if not pre or pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return False
    split, byte_level = pre["pretokenizers"]
    return (split.get("type") == "Split" and split.get("pattern") == {"Regex": CJK_ISOLATED}
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space")
            and byte_level.get("use_regex", True))  # fmt: skip


def first_difference(tokenizer_file: Path, texts: list[str]) -> str | None:
    """The first of `texts` that the tokenizer in `tokenizer_file` (tokenizer.json) encodes to other ids than the
    same tokenizer with GPT-2's byte-level pre-tokenizer alone; None when they agree on all."""
    from tokenizers import Tokenizer, pre_tokenizers

    ours = Tokenizer.from_file(str(tokenizer_file))
    gpt2 = Tokenizer.from_file(str(tokenizer_file))
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in texts:
        if ours.encode(text, add_special_tokens=False).ids != gpt2.encode(text, add_special_tokens=False).ids:
            return text
    return None


def unrecognized(model_dir: Path, texts: list[str], chkhsh_error: NotImplementedError) -> str:
    """The llama.cpp pre-tokenizer name for `model_dir`'s tokenizer, which the converter did not recognize
    (`chkhsh_error`): `gpt-2` for the CJK-split byte-level tokenizer when it encodes `texts` as `gpt-2` would,
    else UserError."""
    tokenizer_file = model_dir / "tokenizer.json"
    pre = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("pre_tokenizer")
    if not _byte_level_after_cjk_split(pre):
        raise UserError(f"{tokenizer_file}: llama.cpp's converter does not know this tokenizer's pre-tokenizer "
                        f"({chkhsh_error}), so llama.cpp would split text differently from training; a model whose "
                        "tokenizer llama.cpp supports can be exported")  # fmt: skip
    text = first_difference(tokenizer_file, texts)
    if text is not None:
        raise UserError(f"{tokenizer_file}: llama.cpp's gpt-2 pre-tokenizer would encode {text[:60]!r} to other ids "
                        "than training did (a BPE merge spans two CJK characters), so the GGUF would not prompt "
                        "the model as trained")  # fmt: skip
    return "gpt-2"
