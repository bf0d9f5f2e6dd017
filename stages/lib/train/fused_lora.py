"""`train.fused_lora`: LoRA's scale and sum inside the low-rank product, one `addmm` per layer.

PEFT computes a LoRA layer as `result = base(x)` (for a bitsandbytes 4-bit base also `result.clone()`, a defensive
copy) and then `result + B(A(x)) * scaling`: besides the two rank-r products, three passes over the full [tokens,
out] output in the forward (copy, multiply, add) and one in the backward (the multiply's gradient), again in each
recomputed forward. Here the scale goes into B, an [out, r] tensor, and the sum into the product:
`addmm(result, A(x), (scaling * B)^T)`, whose kernel adds the product to its copy of `result` (beta 1). The same
mathematics; in 16 bits the sum is rounded once instead of twice. bench/RESULTS.md §8 measures it.

Only the plain case takes this path: one active adapter, no dropout (its mask is another pass), no DoRA or other
variant, no LoRA bias, adapters enabled and not merged, no per-call keyword arguments (per-sample adapter names),
weights not partitioned by ZeRO-3 (they exist only inside their own module's forward there). Every other call runs
PEFT's own forward.
"""

from __future__ import annotations

import functools


def fuse(model) -> tuple[int, int]:
    """Route each PEFT LoRA linear layer of `model` (16-bit `lora.Linear`, 4-bit `lora.bnb.Linear4bit`) that is
    plain now (plain_adapter) through the fused forward; returns (layers routed, LoRA layers in all). Expert stacks
    (`target_parameters`) and 8-bit bases keep PEFT's forward; so do layers with dropout, DoRA or a LoRA bias."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    kinds = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit

        kinds.append(Linear4bit)
    except ImportError:  # PEFT defines it only where bitsandbytes imports
        pass
    routed = total = 0
    for module in model.modules():
        total += isinstance(module, LoraLayer)
        if type(module) in kinds and "forward" not in vars(module) and plain_adapter(module, {}) is not None:
            module.forward = functools.partial(_forward, module, module.forward)
            routed += 1
    return routed, total


def plain_adapter(layer, kwargs: dict) -> str | None:
    """The name of `layer`'s single active adapter when the fused path computes exactly what PEFT's forward
    would, else None."""
    import torch

    if kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    a, b = layer.lora_A[name], layer.lora_B[name]
    if name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    if b.bias is not None or hasattr(a.weight, "ds_id") or hasattr(b.weight, "ds_id"):  # ds_id: ZeRO-3's partition
        return None
    return name


def _forward(layer, peft_forward, x, *args, **kwargs):
    """[..., in] -> [..., out]: base(x) + scaling x B(A(x)), the sum and scale inside one addmm."""
    import torch
    import torch.nn.functional as F

    name = None if args else plain_adapter(layer, kwargs)
    if name is None:
        return peft_forward(x, *args, **kwargs)
    result = layer.base_layer(x)
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    autocast = torch.is_autocast_enabled(x.device.type)
    low = F.linear(x if autocast else layer._cast_input_dtype(x, a.dtype), a)  # [..., r]
    scaling = layer.scaling[name]
    update = b if scaling == 1 else b * scaling  # [out, r]: the scale costs r x out multiplies, not tokens x out
    if not autocast and low.dtype != result.dtype:  # e.g. a float32 base output: the small factors follow it
        low, update = low.to(result.dtype), update.to(result.dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), update.t())
    return out.view(result.shape)
