"""The train stage's SFTConfig from params.yaml: batch shape, schedule, packing, kernels, DeepSpeed and the
checkpointing setting (stages/lib/train/recompute.py says what each keeps)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..core.model_files import meta_model
from ..core.params import Params
from ..core.recipes import deepspeed_config
from ..core.rope import folder_overrides
from .recompute import sft_fields

BASE_DIR = Path("models/base")
NEVER = 10**12  # a step count no run reaches
TRACKER_LOGS = "logs/tensorboard"  # train.report_to: [tensorboard] writes here (git-ignored, not a DVC output)


def leaf_modules_safe(zero: dict) -> bool:
    """Whether ZeRO-3's `stage3_module_granularity_threshold` stays on: on a GPU (DeepSpeed 0.19.8's leaf path
    calls `record_stream` on CPU gradients), for a model whose decoder layers are all larger than it
    (plan.leaf_modules_apply says why). Otherwise DeepSpeed gathers per parameter, as before the threshold."""
    import torch

    from .plan import leaf_modules_apply

    threshold = float(zero.get("stage3_module_granularity_threshold") or 0)
    model = meta_model(BASE_DIR, "models/base") if threshold and torch.cuda.is_available() else None
    return not threshold or (model is not None and leaf_modules_apply(threshold, model))


def sft_config(params: Params, output_dir: Path, **overrides):
    """TRL's SFTConfig for `params` (resolved: no `auto` left) writing checkpoints to `output_dir`; `overrides`
    replace fields (benchmarks reproduce other setups with them). ParamsError for a missing DeepSpeed recipe."""
    import torch
    from trl import SFTConfig

    t = params.train
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    # transformers 5.2x renamed gradient_checkpointing; the GPU image's 5.17 knows only the old name
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    ds_config = deepspeed_config(t.deepspeed) if t.deepspeed else None
    zero3 = bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage") == 3
    if zero3 and not leaf_modules_safe(ds_config["zero_optimization"]):
        ds_config["zero_optimization"].pop("stage3_module_granularity_threshold", None)
    mode = sft_fields(t.gradient_checkpointing, zero3 if t.reentrant_checkpointing is None else t.reentrant_checkpointing)
    if "tensorboard" in t.report_to:  # not under output_dir: the checkpoint folder is emptied at the end
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", TRACKER_LOGS)  # transformers >= 5.2x reads only this
        if "logging_dir" in fields:
            overrides = {"logging_dir": os.environ["TENSORBOARD_LOGGING_DIR"]} | overrides
    model_kwargs = {"dtype": t.dtype, "attn_implementation": t.attn_implementation,
                    "trust_remote_code": params.model.trust_remote_code}  # fmt: skip
    model_kwargs |= folder_overrides(BASE_DIR, params.model.rope_scaling)
    if t.device_map:
        model_kwargs["device_map"] = t.device_map
    kwargs = dict(
        output_dir=str(output_dir),
        seed=params.seed,
        data_seed=params.seed,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the run
        weight_decay=t.weight_decay,
        optim=t.optimizer,
        max_grad_norm=t.max_grad_norm,
        neftune_noise_alpha=t.neftune_noise_alpha,  # transformers hooks the input embeddings while train() runs
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        max_length=(t.packing and t.packed_length) or params.tokenize.max_length,
        packing=t.packing,
        packing_strategy="bfd",
        bf16=t.dtype == "bfloat16",
        fp16=t.dtype == "float16",
        use_cpu=not torch.cuda.is_available(),
        model_init_kwargs=model_kwargs,
        deepspeed=ds_config,
        ddp_timeout=int(t.launch.timeout_minutes * 60),
        use_liger_kernel=t.liger,  # RMSNorm, RoPE, SwiGLU kernels; TRL keeps its own fused LM head
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps or NEVER,  # save_minutes is kept by SaveAndStop
        save_total_limit=None,  # pruned once a checkpoint is complete (MarkComplete), never before
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        per_device_eval_batch_size=t.batch_size,
        prediction_loss_only=True,
        report_to=t.report_to or "none",  # DVCLive is added as a callback below, without its dump of every argument
        dataset_num_proc=None,
        activation_offloading=mode["activation_offloading"],  # TRL's: offload's layer inputs to pinned host memory
        **{checkpointing: mode["checkpointing"], f"{checkpointing}_kwargs": {"use_reentrant": mode["use_reentrant"]}},
    ) | overrides
    return SFTConfig(**kwargs)
