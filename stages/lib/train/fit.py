"""Do the base model's weights fit the GPUs? Answered from config.json on the meta device, before any rank starts.

Weights only: activations, LoRA optimizer states and logits come on top (the planner's job). A setting whose weights
alone exceed a GPU cannot work, so the stage refuses it with the numbers instead of failing minutes into a load.

`TRAIN_GPU_MEMORY_GIB` caps what each training process may allocate on its GPU (torch's per-process memory
fraction) and is the capacity this check uses: it plays a smaller card on a large one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from ..core.params import Params

GIB = 2**30
CAP_ENV = "TRAIN_GPU_MEMORY_GIB"
BLOCK = 64  # bitsandbytes' NF4/FP4 block size: one absmax per 64 weights
CODE = 16 * 4  # the 4-bit code book, float32, per quantized weight
NESTED = 256 * 4 + 4  # double quantization: its 8-bit code book and offset


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the loaded base model. `sharded`: what ZeRO-3 splits over ranks (4-bit packed weights, 16-bit
    weights); `whole`: what every rank keeps in full (4-bit quantization statistics)."""

    sharded: int
    whole: int

    def per_gpu(self, world: int, zero3: bool) -> int:
        return (self.sharded // world if zero3 else self.sharded) + self.whole


def weight_bytes(model, four_bit: bool, dtype_bytes: int, double_quant: bool, part=None) -> WeightBytes:
    """Count a meta-device `model`'s weights as the train stage loads them (only submodule `part`'s, if given).

    4-bit: every `nn.Linear` except the output embedding, and each 3-D expert stack of a mixture of experts
    (experts_4bit), becomes 0.5 byte per weight plus its absmax (4 bytes per 64 weights, or 1 byte with double
    quantization, whose second level adds 4 bytes per 256 absmax values) and code books, as bitsandbytes quantizes
    them. Everything else: `dtype_bytes` per value. Equals `sharded_load.resident_bytes` of the loaded model
    (checked in tests/test_fit.py).
    """
    import torch

    from .experts_4bit import expert_stacks

    head = model.get_output_embeddings()
    quantized = {id(m.weight) for m in model.modules()
                 if four_bit and isinstance(m, torch.nn.Linear) and m is not head}  # fmt: skip
    if four_bit:
        quantized |= {id(p) for p in expert_stacks(model)}
    sharded = whole = 0
    seen: set[int] = set()
    for param in (part or model).parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        if id(param) in quantized:
            sharded += n // 2
            blocks = -(-n // BLOCK)
            whole += CODE + (blocks + -(-blocks // 256) * 4 + NESTED if double_quant else blocks * 4)
        else:
            sharded += n * dtype_bytes
    return WeightBytes(sharded, whole)


def world_size(params: Params, visible_gpus: int) -> int:
    """GPUs the launch will use: `include`'s list, else gpus_per_node (or every visible GPU) times nodes."""
    launch = params.train.launch
    if not params.train.deepspeed:
        return 1
    if launch.include:
        return max(sum(include_slots(launch.include, visible_gpus)), 1)
    return max((launch.gpus_per_node or visible_gpus) * launch.nodes, 1)


def include_slots(include: str, visible_gpus: int) -> list[int]:
    """GPUs per host of DeepSpeed's `--include` ("node0:0,1@node1:2,3"); a host without a list: every visible GPU."""
    hosts = (host.partition(":")[2] for host in include.split("@"))
    return [len(slots.split(",")) if slots else visible_gpus for slots in hosts]


def gpu_capacity_gib() -> float | None:
    """What one training process may use on its GPU: TRAIN_GPU_MEMORY_GIB, else GPU 0's size; None on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    cap = os.environ.get(CAP_ENV)
    if cap is None:
        return total
    try:
        value = float(cap)
    except ValueError:
        raise UserError(f"{CAP_ENV}={cap!r} is not a number: give GiB per GPU, e.g. 16") from None
    if not 0 < value <= total:
        raise UserError(f"{CAP_ENV}={cap} must be above 0 and at most the GPU's {total:.1f} GiB")
    return value


def apply_cap() -> None:
    """In a training process: hold it to TRAIN_GPU_MEMORY_GIB on its GPU (no-op without the variable or a GPU)."""
    import torch

    capacity = gpu_capacity_gib()
    if capacity is None or CAP_ENV not in os.environ:
        return
    device = int(os.environ.get("LOCAL_RANK", "0"))
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction(capacity / total, device)


def check_weights_fit(params: Params, base_dir: Path, meta_model, capacity_gib: float | None = None,
                      visible_gpus: int | None = None) -> None:
    """UserError, before any rank starts, when the base's weights alone exceed one GPU under the chosen setting;
    it gives the numbers and the fewest GPUs under ZeRO-3 that hold them. `capacity_gib` and `visible_gpus`
    default to this machine's (no-op on a CPU); give them to check for another machine."""
    import torch

    capacity = capacity_gib or gpu_capacity_gib()
    if capacity is None or meta_model is None:
        return
    from ..core.recipes import deepspeed_config

    t = params.train
    ds = deepspeed_config(t.deepspeed) if t.deepspeed else {}
    zero3 = ds.get("zero_optimization", {}).get("stage") == 3
    world = world_size(params, torch.cuda.device_count() if visible_gpus is None else visible_gpus)
    dtype_bytes = torch.finfo(getattr(torch, t.dtype)).bits // 8
    weights = weight_bytes(meta_model, t.method == "qlora", dtype_bytes, t.quant.double_quant)
    need = weights.per_gpu(world, zero3) / GIB
    if need <= capacity:
        return
    where = (f"ZeRO-3 over {world} GPU{'s' if world > 1 else ''}" if zero3
             else f"every GPU holds them whole ({'train.deepspeed: ' + t.deepspeed if t.deepspeed else 'no DeepSpeed'})")  # fmt: skip
    fits = next((n for n in range(2, 4097) if weights.per_gpu(n, True) / GIB <= 0.8 * capacity), None)
    advice = (f"train on {fits} or more GPUs with train.deepspeed: zero3 ({size(weights.per_gpu(fits, True) / GIB)} "
              f"of weights each; train.launch.gpus_per_node, nodes)" if fits else "use a smaller model")  # fmt: skip
    source = "given" if capacity_gib else CAP_ENV if CAP_ENV in os.environ else "its size"
    raise UserError(f"the {'4-bit ' if t.method == 'qlora' else ''}weights of {base_dir} need {size(need)} per GPU "
                    f"({where}) but a GPU has {size(capacity)} ({source}), before any activation: {advice}")  # fmt: skip


def size(gib: float) -> str:
    """GiB for people: '18.3 GiB', '512 MiB', '96 KiB'."""
    for unit, scale in (("GiB", 1), ("MiB", 2**10), ("KiB", 2**20)):
        if gib * scale >= 1 or unit == "KiB":
            return f"{gib * scale:.1f} {unit}" if unit == "GiB" else f"{gib * scale:.0f} {unit}"
    raise AssertionError
