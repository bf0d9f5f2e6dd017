"""Presets a user picks by name: models, prompt templates and DeepSpeed configs under recipes/."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .params import Dtype, ParamsError, read_yaml
from .strict_json import no_constant, no_duplicates

RECIPES = Path("recipes")
PLACEHOLDERS = {"system": ("content",), "user": ("content", "round"), "assistant": ("content", "round")}  # stages run from the project root, like every path in dvc.yaml


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubModel(Strict):
    kind: Literal["hub"]
    repo: str
    revision: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$", description="a full commit hash: pins the weights")]
    config: dict[str, Any] | None = None  # sizes from its config.json: `python -m stages.plan` needs no download


class ConfigModel(Strict):
    """A model built from a config with random weights (seeded) and a tokenizer trained on the training split's
    text (or the one params' model.tokenizer names)."""

    kind: Literal["config"]
    model_type: str
    config: dict[str, Any]
    tokenizer_vocab_size: Annotated[int, Field(ge=300)] = 1000


class ModelRecipe(Strict):
    description: str
    source: Annotated[Union[HubModel, ConfigModel], Field(discriminator="kind")]
    template: str
    lora_targets: list[str] | Literal["all-linear"]
    dtype: Dtype = "bfloat16"
    trust_remote_code: bool = False  # true only for models that cannot load without their hub code
    converter: Literal["chatglm2"] | None = None  # a converter to a native transformers architecture


class TemplateRecipe(Strict):
    """A prompt format, one text per role with a `{content}` placeholder (user and assistant may use `{round}`).

    `assistant` holds the answer's header, `{content}` and what closes the answer: the header is the generation
    prompt; the closing text without trailing whitespace (e.g. ChatML's `<|im_end|>`) is trained with the answer
    and ends generation. Turned into a Jinja chat template by stages/lib/chat/format.py.
    """

    description: str
    chat_template: bool = False  # true: the tokenizer's own chat template (tokenizer_config.json) is the format
    jinja: str = ""  # a whole chat template of the recipe's own (tools, reasoning); replaces the texts below
    # how a reply in this format splits into reasoning, tool calls and content: a transformers response template
    # (`tokenizer.response_template`, read by `transformers serve` and by eval and chat here)
    response_template: dict[str, Any] | None = None
    system: str = ""  # rendered first when the record (or default_system) has a system text
    default_system: str = ""
    user: str = ""
    assistant: str = ""
    first_round: int = 1  # the value of {round} in the first turn

    @model_validator(mode="after")
    def _placeholders(self) -> "TemplateRecipe":
        if self.chat_template or self.jinja:
            if self.chat_template and self.jinja:
                raise ValueError("give either chat_template: true (the tokenizer's) or jinja (the recipe's), not both")
            return self
        for key in ("system", "user", "assistant"):
            text = getattr(self, key)
            if (text or key != "system") and text.count("{content}") != 1:
                raise ValueError(f"'{key}' must contain {{content}} exactly once, got {text!r}")
            # any other {word} is kept as literal text: almost always a typo of a placeholder
            unknown = [w for w in re.findall(r"\{(\w+)\}", text) if w not in PLACEHOLDERS[key]]
            if unknown:
                known = ", ".join(f"{{{w}}}" for w in PLACEHOLDERS[key])
                raise ValueError(f"'{key}' has the placeholder {{{unknown[0]}}}; the known ones here: {known}")
        return self


def _load(kind: str, name: str, suffix: str) -> tuple[Path, Any]:
    path = Path(name) if Path(name).suffix == suffix and Path(name).exists() else RECIPES / kind / f"{name}{suffix}"
    if not path.exists():
        known = sorted(p.stem for p in (RECIPES / kind).glob(f"*{suffix}"))
        key = {"models": "model.recipe", "templates": "tokenize.template", "deepspeed": "train.deepspeed"}[kind]
        raise ParamsError(f"{key}: no recipe '{name}' in {RECIPES / kind}/ (known: {', '.join(known)})")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        what = "a directory" if isinstance(exc, IsADirectoryError) else f"not UTF-8 text (byte {exc.start})"
        raise ParamsError(f"recipe {path} is {what}: it must be a UTF-8 {suffix} file") from None
    if suffix != ".json":
        return path, read_yaml(path, text)
    try:
        return path, json.loads(text, parse_constant=no_constant, object_pairs_hook=no_duplicates)
    except ValueError as exc:
        raise ParamsError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ParamsError(f"{path} is nested too deeply to be a config") from None


def _validated(cls: type[BaseModel], path: Path, raw: Any):
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the file"
        raise ParamsError(f"recipe {path}: {where}: {first['msg']} (got {first.get('input')!r})") from None


def model_recipe(name: str) -> ModelRecipe:
    path, raw = _load("models", name, ".yaml")
    return _validated(ModelRecipe, path, raw)


def template_recipe(name: str) -> TemplateRecipe:
    path, raw = _load("templates", name, ".yaml")
    return _validated(TemplateRecipe, path, raw)


def deepspeed_config(name_or_path: str) -> dict:
    """A DeepSpeed JSON config: a recipe name (recipes/deepspeed/NAME.json) or the path of a JSON file in
    recipes/deepspeed/ (the train stage's DVC dependency: a file elsewhere would change unseen)."""
    path = Path(name_or_path)
    if path.suffix == ".json" and not os.path.abspath(path).startswith(os.path.abspath(RECIPES / "deepspeed") + os.sep):
        raise ParamsError(f"train.deepspeed {name_or_path} is outside {RECIPES}/deepspeed/, so DVC would never see it "
                          f"change: copy it to {RECIPES}/deepspeed/{path.name} and set train.deepspeed: {path.stem}")  # fmt: skip
    config = _load("deepspeed", name_or_path, ".json")[1]
    if not isinstance(config, dict):
        raise ParamsError(f"train.deepspeed {name_or_path}: a DeepSpeed config is a JSON object, got {type(config).__name__}")
    return config


def recipe_path(kind: str, name: str, suffix: str) -> Path:
    return _load(kind, name, suffix)[0]
