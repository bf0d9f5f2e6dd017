"""Resolving `train.deepspeed: auto` and `train.gradient_checkpointing: auto` in the train stage, and the model
config the planner reads (stages/lib/train/plan.py estimates; `python -m stages.plan` prints)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.errors import UserError
from ..core.model_files import meta_model
from ..core.params import Params
from .fit import include_slots

BASE_DIR = Path("models/base")
PLANNED_ENV = "TRAIN_PLANNED"  # the head process's resolved auto settings, for the ranks it launches
SETTINGS = ("deepspeed", "gradient_checkpointing", "checkpoint_layers")  # what auto decides


def config_dict(params: Params) -> dict:
    """config.json of params' model without models/base (the plan command: models/base may be an earlier model):
    model.path's config.json, or the recipe's `config`, or the Hub's config.json at the pinned revision. UserError
    when none can be had."""
    from ..core.recipes import model_recipe

    recipe = model_recipe(params.model.recipe)
    source = recipe.source
    if params.model.path:
        local = Path(params.model.path) / "config.json"
        if not local.is_file():
            raise UserError(f"model.path {params.model.path} has no config.json: give the model directory")
        config = json.loads(local.read_text(encoding="utf-8"))
    elif source.kind == "config":
        return {"model_type": source.model_type, "vocab_size": source.tokenizer_vocab_size} | source.config
    else:
        config = source.config or hub_config(source, params)
    if recipe.converter == "chatglm2" and params.model.convert and config.get("model_type") == "chatglm":
        from ..convert import glm_config

        config = glm_config(config)
    return config


def hub_config(source, params: Params) -> dict:
    """config.json of a Hub model at the pinned revision (the Hub cache, or a download). UserError when offline
    without it, gated or missing."""
    from ..data.sources import hub_limits

    hub_limits(params.network)
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source.repo, "config.json", revision=source.revision)).read_text())
    except Exception as exc:  # noqa: BLE001 - offline, gated or missing: one line either way
        raise UserError(f"no config.json for {source.repo} ({type(exc).__name__}): run `dvc repro download` "
                        f"first, or add its sizes as `config` to recipes/models/{params.model.recipe}.yaml") from None  # fmt: skip


def meta_from_config(config: dict):
    """The causal LM `config` describes, on the meta device. UserError when transformers cannot build it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "quantization_config")}
    try:
        built = AutoConfig.for_model(values.pop("model_type"), **values)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(built)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot build the model from its config.json to plan ({str(exc)[:160]}): set "
                        "train.deepspeed and train.gradient_checkpointing yourself") from None  # fmt: skip


def lora_targets(params: Params):
    from ..core.recipes import model_recipe

    return params.train.lora.target_modules or model_recipe(params.model.recipe).lora_targets


def resolve(params: Params, capacity_gib: float | None = None, visible_gpus: int | None = None,
            host_gib: float | None = None) -> tuple[Params, dict | None]:
    """`params` with `auto` replaced by the plan's choice, and the record of that choice (None without auto).
    `capacity_gib` and `visible_gpus` default to this machine's GPUs (TRAIN_GPU_MEMORY_GIB caps the first),
    `host_gib` (RAM of one node, shared by its GPUs) to this machine's.

    In the head process: prints the plan (on a GPU, or when a key is auto) and stores the choice in TRAIN_PLANNED
    so that every rank it launches trains the same setting. UserError when auto is asked and nothing fits, with
    the numbers and the cheapest change; or when auto cannot plan (a model that needs its Hub code)."""
    t = params.train
    auto = {k for k in ("deepspeed", "gradient_checkpointing") if getattr(t, k) == "auto"}
    if PLANNED_ENV in os.environ and auto:
        record = json.loads(os.environ[PLANNED_ENV])
        return _apply(params, record), record
    import torch

    from .fit import gpu_capacity_gib
    from .plan import make_plan, table

    capacity = capacity_gib or gpu_capacity_gib()
    head = "LOCAL_RANK" not in os.environ  # ranks of a node the head's environment did not reach plan quietly
    if not auto and (capacity is None or not head):
        return params, None
    # models/base once downloaded (the meta build the stage's other checks share), else params' model
    downloaded = (BASE_DIR / "config.json").is_file()
    model = meta_model(BASE_DIR, "models/base") if downloaded else meta_from_config(config_dict(params))
    if model is None:  # meta_model: a model that needs its Hub code (auto_map)
        if auto:
            raise UserError("train.deepspeed / gradient_checkpointing auto cannot plan a model that needs its Hub "
                            "code (auto_map in config.json): set both yourself")  # fmt: skip
        return params, None
    visible = torch.cuda.device_count() if visible_gpus is None else visible_gpus
    gpus, nodes = launch_shape(params, visible)
    try:
        where = str(BASE_DIR) if downloaded else f"recipe '{params.model.recipe}'"
        plan = make_plan(model, params, lora_targets(params), gpus, nodes, capacity, single_process=visible <= 1,
                         where=where, host_gib=(host_gib or host_memory_gib()) / gpus)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a model the estimator does not know must not stop a set setting
        why = f"{type(exc).__name__}: {str(exc)[:160]}"
        if auto:
            raise UserError(f"train: cannot plan this model ({why}): set train.deepspeed and "
                            "train.gradient_checkpointing yourself") from None  # fmt: skip
        print(f"train: no plan for this model ({why})", flush=True)
        return params, None
    if head:
        print(table(plan), flush=True)
    if not auto:
        return params, None
    if capacity is None:
        record = {"deepspeed": None, "gradient_checkpointing": False, "checkpoint_layers": None,
                  "reason": "no GPU: no DeepSpeed, no checkpointing"}  # fmt: skip
    elif plan.chosen is None:
        raise UserError(f"train: nothing fits {plan.gpus_per_node * plan.nodes} GPU(s) of {capacity:.1f} GiB (the "
                        f"plan above); would fit: {'; or '.join(plan.advice)}")  # fmt: skip
    else:
        c = plan.chosen
        record = {"deepspeed": None if c.setting.deepspeed == "none" else c.setting.deepspeed,
                  "gradient_checkpointing": c.setting.checkpointing, "checkpoint_layers": c.setting.checkpoint_layers,
                  "reason": plan.reason,
                  "predicted_train_gib": round(c.train_peak, 2), "predicted_load_gib": round(c.load_peak, 2)}  # fmt: skip
    if "gradient_checkpointing" in auto:  # the number of checkpointed layers comes with the mode
        auto.add("checkpoint_layers")
    record = {k: v for k, v in record.items() if k in auto or k not in SETTINGS}
    if head:
        named = [k for k in SETTINGS if k in auto and (k != "checkpoint_layers" or record[k])]  # a count, when one
        shown = ", ".join(f"{k}: {_shown(record[k])}" for k in named)
        print(f"train: auto -> {shown} ({record['reason']})", flush=True)
    os.environ[PLANNED_ENV] = json.dumps(record)
    return _apply(params, record), record


def host_memory_gib() -> float:
    """This machine's physical RAM in GiB (Linux sysconf)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def launch_shape(params: Params, visible: int) -> tuple[int, int]:
    """(GPUs per node, nodes) of the launch: train.launch.include's hosts and GPUs, else gpus_per_node (or the
    `visible` GPUs) on train.launch.nodes nodes."""
    launch = params.train.launch
    if launch.include:
        slots = include_slots(launch.include, max(visible, 1))
        return max(max(slots), 1), len(slots)
    return launch.gpus_per_node or max(visible, 1), launch.nodes


def _shown(value) -> str:
    return "none" if value is None else str(value).lower()


def _apply(params: Params, record: dict) -> Params:
    changes = {k: record[k] for k in SETTINGS if k in record}
    return params.model_copy(update={"train": params.train.model_copy(update=changes)})
