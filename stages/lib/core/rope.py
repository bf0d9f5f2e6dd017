"""RoPE scaling (`model.rope_scaling`): the config changes that let a rotary-position model run on longer contexts
than it was trained for, and the context a config gives.

transformers 5 keeps RoPE settings in a config's `rope_parameters` (`rope_type`, `rope_theta`, `factor`, ...;
the older `rope_scaling` name is a deprecated alias). The changes are passed to `from_pretrained` as config
keyword arguments wherever the base model is loaded (train, merge), so a model saved from it (models/merged)
carries them in its config.json and every server that reads that folder scales as training did.

`max_position_embeddings` is written as published scaled models write it, which is what servers such as vLLM
expect: linear, dynamic and yarn keep the original context there (dynamic reads it as the length where scaling
starts; servers multiply it by the factor), llama3 and longrope hold the scaled context (as Llama 3.1 and
Phi-3 do). `context_positions` reads either form.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from .errors import UserError
from .params import RopeScaling

KEY = "model.rope_scaling"
SCALED_IN_CONFIG = ("llama3", "longrope")  # max_position_embeddings holds factor x original


def _positions(config) -> int | None:
    """max_position_embeddings (GPT-2's n_positions and others map onto it through the config's attribute_map)."""
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def rope_parameters(config) -> dict | None:
    """The config's RoPE parameters (transformers 5's standardized `rope_parameters`); None for a model whose
    positions are not rotary (GPT-2's learned positions, BLOOM's ALiBi)."""
    return getattr(config, "rope_parameters", None) or None


def original_context(config) -> int | None:
    """Positions the model was trained for: the current scaling's original_max_position_embeddings, else
    max_position_embeddings."""
    rope = rope_parameters(config) or {}
    return rope.get("original_max_position_embeddings") or _positions(config)


def context_positions(config) -> int | None:
    """Positions (tokens) one sequence may span under the config's RoPE scaling, or its max_position_embeddings
    without scaling; None when the config names no length."""
    rope = rope_parameters(config) or {}
    kind = rope.get("rope_type", "default")
    if kind in ("linear", "dynamic", "yarn"):
        return int(rope["factor"] * original_context(config))
    return _positions(config)


def rope_overrides(config, scaling: RopeScaling | None, where: str) -> dict:
    """Config keyword arguments (for `from_pretrained` or `AutoConfig`) that apply `scaling` to the model whose
    transformers config is `config` (`where` names its folder in messages); {} when scaling is None. The new
    scaling replaces any the config has; `factor` counts from the model's original context.

    Raises UserError naming model.rope_scaling when the model has no rotary positions, sets RoPE per layer type,
    or (longrope) the factor lists do not have one value per rotary frequency."""
    if scaling is None:
        return {}
    current = rope_parameters(config)
    if current is None:
        raise UserError(f"{KEY}: the {config.model_type} model of {where} has no rotary position embeddings (its "
                        "config has no rope_theta or rope_parameters), so there is nothing to scale: set "
                        f"{KEY}: null and keep tokenize.max_length within its {_positions(config)} positions")  # fmt: skip
    layered = config.nested_rope_parameter_keys(current)
    if layered:
        raise UserError(f"{KEY}: the {config.model_type} model of {where} sets RoPE per layer type "
                        f"({', '.join(layered)}), {KEY} one for all layers: set it to null")  # fmt: skip
    original = scaling.original_max_position_embeddings or original_context(config)
    rope = {k: current[k] for k in ("rope_theta", "partial_rotary_factor") if k in current}
    rope |= {"rope_type": scaling.type, "factor": scaling.factor}
    rope |= scaling.model_dump(exclude={"type", "factor"}, exclude_none=True)
    if scaling.type in ("yarn", "llama3", "longrope"):
        rope["original_max_position_embeddings"] = original
    if scaling.type == "longrope":
        _check_longrope(config, rope, where)
    positions = math.ceil(scaling.factor * original) if scaling.type in SCALED_IN_CONFIG else original
    overrides = {"rope_parameters": rope, "max_position_embeddings": positions}
    if hasattr(config, "original_max_position_embeddings"):  # Phi-3 keeps it beside rope_parameters; it wins there
        overrides["original_max_position_embeddings"] = original
    return overrides


def _check_longrope(config, rope: dict, where: str) -> None:
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    frequencies = int(head * rope.get("partial_rotary_factor", 1.0)) // 2
    if len(rope["short_factor"]) != frequencies:
        raise UserError(f"{KEY}: longrope's short_factor and long_factor need {frequencies} values each for the "
                        f"{config.model_type} model of {where} (one per rotary frequency), not "
                        f"{len(rope['short_factor'])}")  # fmt: skip


def context_fix(config, scaling: RopeScaling | None, length: int) -> str:
    """What to change so that samples of `length` tokens fit the model of the transformers config `config` (without
    `scaling` applied): set or raise model.rope_scaling, or lower tokenize.max_length."""
    context = context_positions(scaled(config, scaling, "")) or length
    factor = max(2, math.ceil(length / (original_context(config) or context)))
    if rope_parameters(config) is None:
        return f"its positions are not rotary, so {KEY} cannot extend them: lower tokenize.max_length to {context}"
    if scaling is None:
        return f"set {KEY} (e.g. {{type: yarn, factor: {factor}}}) or lower tokenize.max_length to {context}"
    return (f"{KEY} ({scaling.type}, factor {scaling.factor:g} x {original_context(config)} positions) is too short "
            f"for it: raise its factor to {factor} or lower tokenize.max_length to {context}")  # fmt: skip


def scaled(config, scaling: RopeScaling | None, where: str):
    """A copy of the transformers config `config` with `scaling` applied (rope_overrides; same errors)."""
    out = copy.deepcopy(config)
    for key, value in rope_overrides(config, scaling, where).items():
        setattr(out, key, value)
    return out


def folder_config(folder: Path):
    """The transformers config of the model saved in `folder` (its config.json; no weights read); None for a model
    whose config needs its Hub code (auto_map)."""
    if "auto_map" in json.loads((folder / "config.json").read_text(encoding="utf-8")):
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def folder_overrides(folder: Path, scaling: RopeScaling | None) -> dict:
    """rope_overrides for the model saved in `folder`. UserError, besides rope_overrides' own, for a model whose
    config needs its Hub code: transformers does not set its RoPE."""
    if scaling is None:
        return {}
    config = folder_config(folder)
    if config is None:
        raise UserError(f"{KEY}: the model of {folder} runs its own Hub code (auto_map in config.json), whose RoPE "
                        f"transformers does not configure: set {KEY}: null")  # fmt: skip
    return rope_overrides(config, scaling, str(folder))
