"""bitsandbytes' 4-bit layers kept on one numeric path on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later).

On such a CPU bitsandbytes 0.50 repacks a `Linear4bit` weight in place, into its AVX512 layout, at the first forward
in eval mode without gradients (the trainer's evaluation), and computes with that layout from then on
(bitsandbytes/nn/modules.py `Linear4bit.forward`, functional.py `_convert_weight_packed_for_cpu`). Two faults
follow for training: a run's numbers depend on whether an evaluation already ran in the same process, so a run
resumed from a checkpoint no longer ends bit-identical to one that was not stopped; and the repacking fails
(`RuntimeError: shape '[64, 2]' is invalid ...`) for a layer whose input width is not a multiple of the
quantization block (64), as in the tiny test models. GPUs never take this path.
"""

from __future__ import annotations


def keep_4bit_layout(model) -> int:
    """Turn the AVX512-BF16 repacking off in every bitsandbytes `Linear4bit` of `model` (PEFT-wrapped or not), so
    that each forward dequantizes the stored NF4 weight as training does. Returns how many layers were set; 0 for
    a model without 4-bit layers or without bitsandbytes. Call before the first forward."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward only when the input is on the CPU
            count += 1
    return count
