"""Presets a user picks by name: models, prompt templates and DeepSpeed configs under recipes/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .params import Dtype, ParamsError

RECIPES = Path("recipes")  # stages run from the project root, like every path in dvc.yaml


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubModel(Strict):
    kind: Literal["hub"]
    repo: str
    revision: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$", description="a full commit hash: pins the weights")]


class ConfigModel(Strict):
    """A model built from a config with random weights (seeded) and a tokenizer trained on the data."""

    kind: Literal["config"]
    model_type: str
    config: dict[str, Any]
    tokenizer_vocab_size: Annotated[int, Field(ge=300)] = 1000
    tokenizer: str | None = None  # a local tokenizer directory to use instead of training one on the data


class ModelRecipe(Strict):
    description: str
    source: Annotated[Union[HubModel, ConfigModel], Field(discriminator="kind")]
    template: str
    lora_targets: list[str] | Literal["all-linear"]
    dtype: Dtype = "bfloat16"
    trust_remote_code: bool = False  # true only for models that cannot load without their hub code
    converter: Literal["chatglm2"] | None = None  # a converter to a native transformers architecture


class TemplateRecipe(Strict):
    """How a record becomes prompt text. Placeholders: {system}, {query}, {response}, {round}."""

    description: str
    chat_template: bool = False  # true: the tokenizer's own chat template renders the text
    system: str = ""  # rendered before the turns when the record or default_system has one
    default_system: str = ""
    turn: str = ""  # one earlier (query, response) pair of a multi-turn record
    prompt: str = ""  # the last query, up to where the model's answer starts
    completion_suffix: str = ""  # closes the answer before EOS (e.g. ChatML's <|im_end|>)
    first_round: int = 1


def _load(kind: str, name: str, suffix: str) -> tuple[Path, Any]:
    path = Path(name) if Path(name).suffix == suffix and Path(name).exists() else RECIPES / kind / f"{name}{suffix}"
    if not path.exists():
        known = sorted(p.stem for p in (RECIPES / kind).glob(f"*{suffix}"))
        raise ParamsError(f"no {kind[:-1]} recipe '{name}' (known: {', '.join(known)})")
    text = path.read_text(encoding="utf-8")
    return path, (json.loads(text) if suffix == ".json" else yaml.safe_load(text))


def _validated(cls: type[BaseModel], path: Path, raw: Any):
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(f"recipe {path} is not valid:\n{exc}") from None


def model_recipe(name: str) -> ModelRecipe:
    path, raw = _load("models", name, ".yaml")
    return _validated(ModelRecipe, path, raw)


def template_recipe(name: str) -> TemplateRecipe:
    path, raw = _load("templates", name, ".yaml")
    return _validated(TemplateRecipe, path, raw)


def deepspeed_config(name_or_path: str) -> dict:
    """A DeepSpeed JSON config: a recipe name (recipes/deepspeed/NAME.json) or a path to a JSON file."""
    return _load("deepspeed", name_or_path, ".json")[1]


def recipe_path(kind: str, name: str, suffix: str) -> Path:
    return _load(kind, name, suffix)[0]
