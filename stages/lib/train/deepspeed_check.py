"""Checking a DeepSpeed JSON config (train.deepspeed) in the head process, before any rank starts.

DeepSpeed reads most of its config inside each launched rank, a minute in, and several mistakes pass its own
schema: a quoted number ("3" becomes stage 3 for DeepSpeed, but transformers compares the raw value with 3), an
overflowing number (1e999 is infinity), a misspelt top-level key (ignored, so the section it meant is missing).
"""

from __future__ import annotations

import difflib
import json
import math

from ..core.errors import UserError

# top-level sections and keys of a DeepSpeed config (deepspeed.runtime.constants holds most, not the sections)
SECTIONS = {"zero_optimization", "optimizer", "scheduler", "fp16", "bf16", "amp", "flops_profiler",
            "activation_checkpointing", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "aio",
            "checkpoint", "data_efficiency", "compression_training", "autotuning", "elasticity", "pipeline",
            "sparse_attention", "monitor_config", "nebula", "weight_quantization", "hybrid_engine", "timers",
            "compile", "tensor_parallel", "curriculum_learning", "progressive_layer_drop", "eigenvalue",
            "quantize_training", "data_types", "torch_autocast"}  # fmt: skip


# sections (and their params) that transformers and DeepSpeed read as JSON objects
OBJECT_SECTIONS = ("fp16", "bf16", "amp", "optimizer", "optimizer.params", "scheduler", "scheduler.params",
                   "zero_optimization")  # fmt: skip


def _known_top_keys() -> set[str]:
    import deepspeed.runtime.constants as constants

    names = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and v.islower()}
    return names | SECTIONS


def _leaves(node, path: str = ""):
    """(dotted key, value) for every scalar in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{path}.{i}")
    else:
        yield path, node


def _quoted_scalar(value) -> bool:
    """A string that JSON would read as a number or true/false ("3", "1e-4", "false"); "auto" is transformers'."""
    if not isinstance(value, str) or value == "auto":
        return False
    try:
        return isinstance(json.loads(value), (int, float, bool))
    except ValueError:
        return False


def check_deepspeed(name: str) -> dict:
    """The DeepSpeed config `name` (train.deepspeed) parses strictly (recipes.deepspeed_config), has no quoted
    numbers or flags and no infinite number anywhere, no misspelt top-level key, and its zero_optimization section
    passes DeepSpeed's own schema ("auto" values are transformers' to fill). Returns the config; UserError naming
    the first bad key otherwise."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    from ..core.recipes import deepspeed_config

    config = deepspeed_config(name)
    where = f"train.deepspeed {name}"
    for key, value in _leaves(config):
        if _quoted_scalar(value):
            raise UserError(f'{where}: {key} is the string {value!r}: write it without quotes, or "auto"')
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where}: {key} is {value} (a number too large for a float?): write a finite number")
    known = _known_top_keys()
    for key in config:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if key not in known and close:
            raise UserError(f"{where}: unknown top-level key '{key}'; did you mean '{close[0]}'?")
    for section in OBJECT_SECTIONS:  # transformers reads these as objects: `"bf16": true` fails in every rank
        node = config
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, dict):
            raise UserError(f"{where}: {section} must be a JSON object (like {{\"enabled\": true}} or "
                            f"{{\"params\": {{...}}}}), not {json.dumps(node)[:40]}")  # fmt: skip
    zero = config.get("zero_optimization", {})  # an object: OBJECT_SECTIONS above
    strings = [(k, v) for k, v in zero.items() if isinstance(v, str) and v != "auto"]
    if strings:  # every value on this level is a number, a flag or an object (offload_param: {"device": "cpu"})
        key, value = strings[0]
        raise UserError(f"{where}: zero_optimization.{key} is the string {value!r}: DeepSpeed expects a number, "
                        'true/false or an object there (or "auto")')  # fmt: skip
    try:
        DeepSpeedZeroConfig(**{k: v for k, v in zero.items() if v != "auto"})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(map(str, ("zero_optimization", *first["loc"])))
        raise UserError(f"{where}: {key}: {first['msg']} (got {first.get('input')!r})") from None
    if "train_batch_size" not in config and "train_micro_batch_size_per_gpu" not in config:
        raise UserError(f'{where}: give "train_micro_batch_size_per_gpu": "auto" (DeepSpeed needs a batch size; '
                        "auto takes train.batch_size)")  # fmt: skip
    if (config.get("amp") or {}).get("enabled"):
        raise UserError(f"{where}: amp (NVIDIA Apex) is gone from DeepSpeed: remove it; train.dtype picks bf16 or fp16")
    schedule = (config.get("scheduler") or {}).get("params") or {}
    fixed = [k for k in ("total_num_steps", "warmup_num_steps") if schedule.get(k) not in (None, "auto")]
    if fixed:  # transformers compares them with the run's steps once the model has loaded, in every rank
        raise UserError(f'{where}: scheduler.params.{fixed[0]} must be "auto" (filled from train.max_steps, '
                        "train.epochs and train.warmup_ratio)")  # fmt: skip
    return config


# transformers' names in its mismatch lines → where the value comes from here
OUR_NAMES = {"per_device_train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
             "train_batch_size (calculated)": "train.batch_size × train.grad_accum × GPUs",
             "max_grad_norm": "train.max_grad_norm", "learning_rate": "train.learning_rate",
             "weight_decay": "train.weight_decay", "adam_beta1+adam_beta2": "transformers' default betas",
             "adam_epsilon": "transformers' default epsilon"}  # fmt: skip


def _ours(mismatch: str, dtype: str) -> str:
    """transformers' `- ds KEY=VALUE vs hf NAME=VALUE` as `KEY=VALUE but OUR_NAME is VALUE`."""
    ds, _, hf = mismatch.removeprefix("- ds ").partition(" vs hf ")
    name, _, value = hf.rpartition("=")
    if name in ("fp16|fp16_full_eval", "bf16|bf16_full_eval"):
        return f"{ds} but train.dtype is {dtype}"
    return f"{ds} but {OUR_NAMES.get(name, name)} is {value}"


def check_matches_params(name: str, config: dict, params, world_size: int) -> None:
    """Values `config` fixes (not "auto") that transformers requires to equal the training arguments: micro-batch,
    accumulation, train_batch_size (= world_size × both), gradient clipping, the optimizer's lr/betas/eps/weight
    decay, the scheduler's peak lr, fp16/bf16. transformers' own comparison (HfTrainerDeepSpeedConfig) run here, in
    the head process, with params' values and the world size the launch will have: each rank would otherwise fail
    with it a minute in. UserError listing every mismatch and what to write instead."""
    import copy
    import dataclasses
    from types import SimpleNamespace

    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    t = params.train
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}  # what the stage leaves unset
    args = SimpleNamespace(
        world_size=world_size, per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        max_grad_norm=t.max_grad_norm, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        adam_beta1=defaults["adam_beta1"], adam_beta2=defaults["adam_beta2"], adam_epsilon=defaults["adam_epsilon"],
        save_on_each_node=False, fp16=t.dtype == "float16", bf16=t.dtype == "bfloat16", fp16_full_eval=False,
        bf16_full_eval=False,
    )  # fmt: skip
    checked = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    try:
        checked.trainer_config_process(args)
    except (AttributeError, TypeError, ValueError) as exc:  # a shape check_deepspeed does not know
        raise UserError(f"train.deepspeed {name}: transformers cannot read it ({type(exc).__name__}: {exc})") from None
    finally:
        unset_hf_deepspeed_config()  # the constructor registers it process-wide; the head process trains nothing
    if checked.mismatches:
        found = "; ".join(_ours(m, t.dtype) for m in checked.mismatches)
        raise UserError(f"train.deepspeed {name}: {found}: write \"auto\" there (filled from params.yaml) or change "
                        "train.* to match")  # fmt: skip

