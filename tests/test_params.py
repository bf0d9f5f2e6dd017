"""The params.yaml schema: unknown keys, types, ranges and cross-field rules fail with the key named."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, default_params, env_with_project

from stages.lib.core.params import ParamsError, validate
from stages.lib.core.recipes import RECIPES, ModelRecipe, TemplateRecipe, deepspeed_config, model_recipe, template_recipe


def with_change(path: str, value) -> dict:
    params = copy.deepcopy(default_params())
    node = params
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return params


def error_of(params: dict) -> str:
    with pytest.raises(ParamsError) as exc:
        validate(params)
    return str(exc.value)


def test_the_committed_params_are_valid():
    params = validate(default_params())
    assert params.model.recipe == "tiny-llama"
    assert params.train.method == "qlora"


@pytest.mark.parametrize(
    "bad, right",
    [("train.lerning_rate", "train.learning_rate"), ("train.lora.rank", "train.lora.r"), ("tokenise", "tokenize"),
     ("eval.max_sample", "eval.max_samples"), ("train.launch.node", "train.launch.nodes")],
)
def test_a_misspelt_key_is_named_with_a_suggestion(bad, right):
    message = error_of(with_change(bad, 1))
    assert f"unknown key '{bad}'" in message
    assert f"did you mean '{right}'" in message


def test_a_misspelt_key_inside_a_tagged_source_gets_a_suggestion():
    message = error_of(with_change("data.sources", [{"kind": "builtin"}, {"kind": "local", "pth": "x.json"}]))
    assert "unknown key 'data.sources.1.pth'; did you mean 'data.sources.1.path'" in message
    assert "missing required key 'data.sources.1.path'" in message


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("train.learning_rate", -1, "'train.learning_rate'"),
        ("train.lora.r", "eight", "'train.lora.r'"),
        ("train.method", "qlor", "'train.method'"),
        ("data.validation_fraction", 1.5, "'data.validation_fraction'"),
        ("data.sources", [{"kind": "url", "url": "https://x/y.json"}], "missing required key 'data.sources.0.sha256'"),
        ("data.sources", [{"kind": "url", "url": "ftp://x", "sha256": "0" * 64}], "'data.sources.0.url'"),
        ("data.sources", [{"kind": "hub", "repo": "a/b"}], "missing required key 'data.sources.0.revision'"),
        ("data.sources", [{"kind": "hub", "repo": "a/b", "revision": "main"}], "'data.sources.0.revision'"),
        ("data.sources", [{"kind": "builtin", "weight": 0}], "'data.sources.0.weight'"),
        ("data.sources", [], "'data.sources'"),
    ],
)
def test_types_and_ranges_name_the_key(path, value, expected):
    assert expected in error_of(with_change(path, value))


LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("train.neftune_noise_alpha", 0, "'train.neftune_noise_alpha': Input should be greater than 0"),
        ("train.neftune_noise_alpha", "5", "'train.neftune_noise_alpha': Input should be a valid number"),
        ("model.rope_scaling", {"type": "ntk", "factor": 2.0}, "'model.rope_scaling.type': Input should be 'linear', "
                                                               "'dynamic', 'yarn', 'llama3' or 'longrope'"),
        ("model.rope_scaling", {"type": "linear", "factor": 1.0}, "'model.rope_scaling.factor': Input should be "
                                                                  "greater than 1"),
        ("model.rope_scaling", {"type": "yarn", "factor": 0.5}, "'model.rope_scaling.factor'"),
        ("model.rope_scaling", {"type": "linear"}, "missing required key 'model.rope_scaling.factor'"),
        ("model.rope_scaling", {"type": "llama3", "factor": 8.0}, "model.rope_scaling: type llama3 needs "
                                                                  "low_freq_factor and high_freq_factor"),
        ("model.rope_scaling", {"type": "longrope", "factor": 4.0, "short_factor": [1.0]},
         "model.rope_scaling: type longrope needs long_factor"),
        ("model.rope_scaling", {"type": "linear", "factor": 2.0, "low_freq_factor": 1.0},
         "model.rope_scaling: type linear takes no low_freq_factor (it takes factor)"),
        ("model.rope_scaling", LLAMA3 | {"low_freq_factor": 4.0, "high_freq_factor": 1.0},
         "high_freq_factor (1.0) must be above low_freq_factor (4.0)"),
        ("model.rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0},
         "'model.rope_scaling.original_max_position_embeddings'"),
        ("model.rope_scaling", {"type": "linear", "factor": 2.0, "rope_theta": 1e6},
         "unknown key 'model.rope_scaling.rope_theta'"),
    ],
)
def test_training_options_name_the_key(path, value, expected):
    assert expected in error_of(with_change(path, value))


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 4}, {"type": "dynamic", "factor": 2.5},
                                     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, LLAMA3,
                                     {"type": "longrope", "factor": 4.0, "short_factor": [1.0], "long_factor": [2.0]}])
def test_every_rope_type_validates_with_its_keys(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert validate(with_change("model.rope_scaling", scaling)).model.rope_scaling.type in ROPE_INIT_FUNCTIONS
    assert validate(with_change("train.neftune_noise_alpha", 5)).train.neftune_noise_alpha == 5.0


def test_one_problem_is_one_line():
    assert error_of(with_change("train.lerning_rate", 1)).startswith("params.yaml: unknown key 'train.lerning_rate';")
    assert "\n" not in error_of(with_change("train.lerning_rate", 1))


def test_4bit_storage_dtype_must_equal_compute_dtype():
    params = with_change("train.dtype", "bfloat16")
    params["train"]["quant"]["storage_dtype"] = "float32"
    assert "train.quant.storage_dtype (float32) must equal train.dtype (bfloat16)" in error_of(params)


def test_zero3_rejects_a_device_map():
    params = with_change("train.deepspeed", "zero3")
    params["train"]["device_map"] = "auto"
    assert "train.device_map must be null when train.deepspeed is set" in error_of(params)


def test_several_nodes_need_deepspeed_and_a_hostfile():
    params = with_change("train.launch.nodes", 2)
    assert "needs train.deepspeed" in error_of(params)
    params["train"]["deepspeed"] = "zero3"
    assert "needs train.launch.hostfile" in error_of(params)
    params["train"]["launch"]["hostfile"] = "hostfile"
    validate(params)


def test_merge_has_no_4bit_option():
    assert "'merge.dtype'" in error_of(with_change("merge.dtype", "nf4"))


def test_every_recipe_validates():
    models = sorted(p.stem for p in (RECIPES / "models").glob("*.yaml"))
    templates = sorted(p.stem for p in (RECIPES / "templates").glob("*.yaml"))
    assert "tiny-llama" in models and {"seed", "chatglm2", "chatml", "tokenizer"} <= set(templates)
    for name in models:
        recipe = model_recipe(name)
        assert isinstance(recipe, ModelRecipe)
        assert isinstance(template_recipe(recipe.template), TemplateRecipe), name
    for path in (RECIPES / "deepspeed").glob("*.json"):
        assert deepspeed_config(path.stem)["zero_optimization"]["stage"] in (2, 3)


def test_an_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ParamsError, match="model.recipe: no recipe 'nope' .*tiny-llama"):
        model_recipe("nope")


def test_a_stage_with_a_misspelt_key_fails_at_once_and_leaves_outputs(tmp_path: Path):
    """The stage exits before importing torch; its earlier output stays byte for byte."""
    params = with_change("train.lerning_rate", 0.1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    adapter = tmp_path / "models" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"earlier adapter")
    env = env_with_project()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stages.train"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "unknown key 'train.lerning_rate'; did you mean 'train.learning_rate'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "| torch" not in proc.stderr  # -X importtime lists every import: torch never loaded
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"earlier adapter"
    assert json.dumps(sorted(p.name for p in tmp_path.rglob("*"))) == json.dumps(
        sorted(["params.yaml", "models", "adapter", "adapter_model.safetensors"])
    )


def test_every_ready_pipeline_validates():
    pipelines = sorted((ROOT / "pipelines").glob("*/params.yaml"))
    assert pipelines
    for path in pipelines:
        params = validate(yaml.safe_load(path.read_text()))
        model_recipe(params.model.recipe)
        if params.train.deepspeed not in (None, "auto"):  # auto: the planner's choice (tests/test_plan.py)
            deepspeed_config(params.train.deepspeed)
        if params.train.launch.hostfile:
            assert (path.parent / params.train.launch.hostfile).is_file()


def test_the_seed_pipeline_is_the_seed_scenario():
    params = validate(yaml.safe_load((ROOT / "pipelines" / "seed-chatglm2-2x4" / "params.yaml").read_text()))
    assert params.model.recipe == "chatglm2-6b"
    assert (params.train.lora.r, params.train.lora.alpha) == (8, 32)
    assert model_recipe("chatglm2-6b").lora_targets == ["q_proj", "k_proj", "v_proj"]  # query_key_value, split
    assert params.train.deepspeed == "zero3-offload" and deepspeed_config("zero3-offload")["zero_optimization"]["offload_param"]
    assert (params.train.launch.nodes, params.train.launch.gpus_per_node, params.train.launch.runner) == (2, 4, "pdsh")


def test_packed_rows_take_packed_length_and_checkpointing_follows_zero3(tmp_path: Path):
    from stages.train import sft_config

    params = validate(with_change("train.packing", True))
    assert sft_config(params, tmp_path).max_length == params.tokenize.max_length  # packed_length null
    raw = with_change("train.packed_length", 4 * params.tokenize.max_length)
    raw["train"] |= {"packing": True, "gradient_checkpointing": True}
    assert sft_config(validate(raw), tmp_path).max_length == 4 * params.tokenize.max_length
    raw["train"]["packing"] = False  # unpacked batches ignore the row length
    assert sft_config(validate(raw), tmp_path).max_length == params.tokenize.max_length
    zero3 = validate(raw | {"train": raw["train"] | {"deepspeed": "zero3"}})
    assert sft_config(zero3, tmp_path).gradient_checkpointing_kwargs == {"use_reentrant": True}
    raw["train"] |= {"deepspeed": "zero3", "reentrant_checkpointing": False}
    assert sft_config(validate(raw), tmp_path).gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_rows_shorter_than_a_sample_are_refused():
    raw = with_change("train.packed_length", 8)
    assert "train.packed_length (8) must be at least tokenize.max_length" in error_of(raw)


def test_a_run_that_could_never_resume_and_unknown_trackers_are_refused():
    raw = with_change("train.save_steps", None)
    raw["train"]["save_minutes"] = None
    assert "train.save_steps and train.save_minutes are both null" in error_of(raw)
    from stages.lib.core.errors import UserError
    from stages.lib.train.preflight import check_reporters

    with pytest.raises(UserError, match=r"train.report_to: 'wandbb' is not a transformers integration \(known: .*wandb"):
        check_reporters(["wandbb"])
    with pytest.raises(UserError, match="dvclive is always on"):
        check_reporters(["dvclive"])
    check_reporters([])


# ---------------------------------------------------------------- params.yaml read as DVC reads it

MINIMAL = "data:\n  sources:\n    - kind: builtin\nmodel:\n  recipe: tiny-llama\n"
SLOTS = {  # a key of each type, and the text that puts a scalar there
    "seed": "seed: {}\n",
    "train.learning_rate": "train:\n  learning_rate: {}\n",
    "train.save_minutes": "train:\n  save_minutes: {}\n",
    "train.packing": "train:\n  packing: {}\n",
    "tokenize.template": "tokenize:\n  template: {}\n",
    "train.deepspeed": "train:\n  deepspeed: {}\n",
}
# scalars that YAML 1.1 (PyYAML) and YAML 1.2 (ruamel.yaml, which DVC uses) read differently, or nearly so
SCALARS = ["010", "0010", "00", "-0", "0o10", "0x1f", "0b101", "1_000", "+12", "1:30", "190:20:30", "-1:30", "1:30.5",
           "yes", "no", "on", "off", "y", "n", "Yes", "NO", "On", "True", "TRUE", "false", ".inf", "-.inf", ".nan",
           "1e-4", "1E3", "1e30", "1.", ".5", "0.1_0", "~", "Null", "NULL", "''", "2001-12-14", "'010'", "!!float 1",
           "!!str 010", "!!int '7'", "=", "!!binary aGk=", "0o", "0x", "1__0", "0777", "08", "09.5"]  # fmt: skip


def dotted(value, key: str):
    for part in key.split("."):
        value = getattr(value, part) if not isinstance(value, dict) else value[part]
    return value


@pytest.mark.parametrize("key", sorted(SLOTS))
def test_every_value_a_stage_uses_is_the_value_dvc_records(key, tmp_path):
    """Each scalar of the catalogue at a key of each type: our reader and DVC's own (the function that records
    params in dvc.lock) give the same value, or ours refuses it naming the key (or, where DVC cannot read the file
    either, with its line)."""
    from dvc.dependency.param import read_param_file
    from dvc.fs import LocalFileSystem

    from stages.lib.core.params import load_params

    path = tmp_path / "params.yaml"
    agreed = refused = 0
    for scalar in SCALARS:
        path.write_text(MINIMAL + SLOTS[key].format(scalar), encoding="utf-8")
        try:
            recorded = read_param_file(LocalFileSystem(), str(path), [key], flatten=True)[key]
        except Exception:  # noqa: BLE001 - DVC cannot read the file: no stage may run on it
            recorded = None
            with pytest.raises(ParamsError, match=r"params.yaml, line \d+"):
                load_params(path)
            refused += 1
            continue
        try:
            used = dotted(load_params(path), key)
        except ParamsError as exc:
            assert "\n" not in str(exc) and key in str(exc), (scalar, str(exc))
            refused += 1
            continue
        assert used == recorded and type(used) is type(recorded) or (
            isinstance(used, float) and type(recorded) is int and used == recorded), (scalar, used, recorded)  # fmt: skip
        agreed += 1
    assert agreed and refused  # each key both takes some of these scalars and refuses others


@pytest.mark.parametrize("text", [
    "base: &b {learning_rate: 0.01, epochs: 2}\ntrain:\n  <<: *b\n  epochs: 3\n",  # a merge key, one value overridden
    "%YAML 1.1\n---\ntrain:\n  packing: yes\n  save_minutes: 1:30\nseed: 010\n",  # a YAML 1.1 directive
    "seed: &s 010\ntrain: {save_steps: *s, packing: on}\n",  # an alias of a leading-zero number
    "'seed': 0x10\n\"train\": {learning_rate: 1E-3, max_steps: 0o17}\n",
])  # fmt: skip
def test_whole_documents_read_as_dvc_reads_them(text):
    """Merge keys, anchors and a `%YAML 1.1` directive (which switches both readers to YAML 1.1) give our reader
    what DVC's parse_yaml gives, types included."""
    from dvc.utils.serialize import parse_yaml

    from stages.lib.core.params import read_yaml

    ours, dvcs = read_yaml(Path("params.yaml"), text), parse_yaml(text, "params.yaml")
    assert ours == dvcs and json.dumps(ours, default=str) == json.dumps(dvcs, default=str)


def test_yaml_1_1_forms_are_named_with_what_to_write():
    assert "write 90" in error_of(with_change("train.save_minutes", "1:30"))
    assert "write true or false" in error_of(with_change("train.packing", "on"))
