"""How train loads models/base for QLoRA: the bitsandbytes config, and when the base is loaded tensor by tensor.

transformers' `from_pretrained` (through TRL) loads a dense 4-bit base well on one process. Two cases need
stages/lib/train/sharded_load.py instead: under ZeRO-3 each rank keeps only its shard from the first tensor on,
and a mixture of experts gets its expert stacks in 4 bits (stages/lib/train/experts_4bit.py), which bitsandbytes'
quantizer leaves in 16 bits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from stages.lib.core.params import Params
from stages.lib.core.rope import folder_overrides
from stages.lib.train.fit import size

SHARDED_LOAD_ENV = "TRAIN_SHARDED_LOAD"  # 0: under ZeRO-3, load the 4-bit base whole on every rank (the old way)
EXPERTS_4BIT_ENV = "TRAIN_EXPERTS_4BIT"  # 0: a mixture of experts' experts stay 16-bit (the old way, for benchmarks)


def quantization_config(params: Params):
    """transformers' BitsAndBytesConfig for train.quant (NF4 by default; storage dtype = the compute dtype, as
    ZeRO-3 flattens one dtype)."""
    import torch
    from transformers import BitsAndBytesConfig

    t = params.train
    dtype = getattr(torch, t.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=t.quant.type,
        bnb_4bit_use_double_quant=t.quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=getattr(torch, t.quant.storage_dtype or t.dtype),
    )


def has_experts(base_dir: Path) -> bool:
    """Whether models/base is a mixture of experts whose experts are 3-D stacks (built on the meta device)."""
    from stages.lib.core.model_files import meta_model
    from stages.lib.train.experts_4bit import experts_modules

    model = meta_model(base_dir, "models/base")
    return model is not None and bool(experts_modules(model))


def load_4bit(params: Params, base_dir: Path):
    """The 4-bit base loaded tensor by tensor, or None where TRL's `from_pretrained` does the job.

    Under ZeRO-3 (unless TRAIN_SHARDED_LOAD=0), each rank's shard; for a mixture of experts, the whole model on
    this rank's device with its experts in 4 bits. None for a dense model off ZeRO-3, and for a checkpoint whose
    tensors transformers' conversion mapping cannot place (TRL then loads it whole on every rank).
    """
    import torch
    from transformers import AutoConfig
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    from stages.lib.train import sharded_load

    zero3 = is_deepspeed_zero3_enabled() and os.environ.get(SHARDED_LOAD_ENV) != "0"
    moe = os.environ.get(EXPERTS_4BIT_ENV) != "0" and has_experts(base_dir)
    if not zero3 and not moe:
        return None
    t = params.train
    trust = params.model.trust_remote_code
    rope = folder_overrides(base_dir, params.model.rope_scaling)
    rank = int(os.environ.get("RANK", "0"))
    if zero3:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust, **rope)
        partition = sharded_load.ZeroPartitioner(deepspeed_config(), config)
        device, where = partition.device, "each rank loaded its shard of the 4-bit base"
    else:
        partition = None
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        where = "loaded the 4-bit base with its experts in 4 bits"
    start = time.perf_counter()
    model = sharded_load.load(base_dir, quantization_config(params), getattr(torch, t.dtype), t.attn_implementation,
                              device=device, place=partition, trust_remote_code=trust, **rope)  # fmt: skip
    if rank == 0 and model is not None:
        print(f"train: {where} in {time.perf_counter() - start:.0f} s (rank 0 holds "
              f"{size(sharded_load.resident_bytes(model) / sharded_load.GIB)} of weights)", flush=True)
    if rank == 0 and model is None:
        print(f"train: {base_dir}'s tensor names do not map onto its model's parameters; every rank loads the whole "
              "4-bit model" + (" before ZeRO-3 partitions it" if zero3 else ", its experts in 16 bits"), flush=True)
    return model


def base_weights_gib(model) -> float:
    """GiB of base-model weights this rank holds (LoRA parameters left out); see sharded_load.resident_bytes."""
    from stages.lib.train.sharded_load import GIB, resident_bytes

    return resident_bytes(model, skip=lambda name: "lora_" in name) / GIB
