"""model.rope_scaling where it takes effect: the model the train stage's trainer loads, the model merge writes to
models/merged (and a server reads back), the sample-length check before training and the planner's context.

The tiny Llama of test_train_labels.make_project (2048 positions, head size 16, so 8 rotary frequencies) is scaled
by every type; the references are transformers' own rotary embedding of the unscaled base.
"""

from __future__ import annotations

import json

import pytest
from conftest import edit_params
from test_train_labels import make_project

from stages.lib.core.errors import UserError
from stages.lib.core.params import RopeScaling

SCALINGS = {  # type -> model.rope_scaling
    "linear": {"type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 4.0},
    "yarn": {"type": "yarn", "factor": 4.0},
    "llama3": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "longrope": {"type": "longrope", "factor": 4.0, "short_factor": [1.0] * 8, "long_factor": [1.5] * 8},
}
POSITIONS = 2048  # LlamaConfig's default max_position_embeddings, which make_project keeps


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tokenized tiny project (models/base: an unscaled Llama), shared by the tests; each sets its own params."""
    folder = tmp_path_factory.mktemp("rope")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        make_project(folder, "bpe", "chatml")
    return folder


@pytest.fixture
def in_project(project, monkeypatch):
    monkeypatch.chdir(project)
    yield project
    edit_params(project, **{"model.rope_scaling": None})


def rotary(model):
    """The rotary embedding module of a (PEFT-wrapped) Llama."""
    return next(m for name, m in model.named_modules() if name.endswith("rotary_emb"))


def base_inv_freq(project):
    from transformers import AutoModelForCausalLM

    return rotary(AutoModelForCausalLM.from_pretrained(project / "models" / "base")).inv_freq


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_the_stage_trainer_loads_the_base_with_the_scaling(kind, in_project):
    import torch

    from stages.lib.core.params import load_params
    from stages.lib.core.rope import context_positions
    from stages.train import build_trainer

    edit_params(in_project, **{"model.rope_scaling": SCALINGS[kind]})
    trainer = build_trainer(load_params(), in_project / "out", [], max_steps=1)
    config = trainer.model.config
    assert config.rope_parameters["rope_type"] == kind and config.rope_parameters["factor"] == 4.0
    assert rotary(trainer.model).rope_type == kind
    assert context_positions(config) == 4 * POSITIONS
    plain = base_inv_freq(in_project)
    if kind == "linear":  # every frequency divided by the factor
        assert torch.allclose(rotary(trainer.model).inv_freq, plain / 4)
    trainer.train()  # one optimizer step through the scaled rotary embedding
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_without_scaling_the_trainer_keeps_the_trained_positions(in_project):
    import torch

    from stages.lib.core.params import load_params
    from stages.train import build_trainer

    trainer = build_trainer(load_params(), in_project / "out", [])
    assert trainer.model.config.rope_parameters["rope_type"] == "default"
    assert trainer.model.config.max_position_embeddings == POSITIONS
    assert torch.equal(rotary(trainer.model).inv_freq, base_inv_freq(in_project))


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_merge_writes_the_scaling_into_models_merged(kind, in_project):
    """merge's main(): models/merged/config.json carries the scaling, and transformers loads the merged folder (as
    a server does) with the same rotary embedding the trainer used."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages import merge
    from stages.lib.core.rope import context_positions

    edit_params(in_project, **{"model.rope_scaling": SCALINGS[kind]})
    shutil.rmtree(in_project / "models" / "adapter", ignore_errors=True)
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(in_project / "models" / "base"),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
    lora.save_pretrained(in_project / "models" / "adapter")
    merge.main()
    saved = json.loads((in_project / "models" / "merged" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == kind and saved["rope_parameters"]["factor"] == 4.0
    assert context_positions(AutoConfig.from_pretrained(in_project / "models" / "merged")) == 4 * POSITIONS
    served = AutoModelForCausalLM.from_pretrained(in_project / "models" / "merged")
    from stages.lib.core.params import load_params
    from stages.train import build_trainer

    trained = build_trainer(load_params(), in_project / "out", [])
    assert rotary(served).rope_type == kind
    assert torch.equal(rotary(served).inv_freq, rotary(trained.model).inv_freq)
    assert json.loads((in_project / "metrics" / "merge.json").read_text())["max_abs_logit_diff"] < 1e-3


# ---------------------------------------------------------------- refusals, before any weight loads


def llama(**config):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, **config)  # fmt: skip


def test_a_model_without_rope_is_refused_naming_the_key():
    from transformers import GPT2Config

    from stages.lib.core.rope import rope_overrides

    with pytest.raises(UserError, match=r"model.rope_scaling: the gpt2 model of models/base has no rotary position "
                                        r"embeddings .* set model.rope_scaling: null"):  # fmt: skip
        rope_overrides(GPT2Config(n_embd=32, n_layer=1, n_head=2), RopeScaling(type="linear", factor=2.0), "models/base")


def test_longrope_factors_must_have_one_value_per_rotary_frequency():
    from stages.lib.core.rope import rope_overrides

    scaling = RopeScaling(type="longrope", factor=4.0, short_factor=[1.0] * 4, long_factor=[1.0] * 4)
    with pytest.raises(UserError, match="short_factor and long_factor need 8 values each"):
        rope_overrides(llama(), scaling, "models/base")


def test_a_model_with_rope_per_layer_type_is_refused():
    from transformers import Gemma3TextConfig

    from stages.lib.core.rope import rope_overrides

    config = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16)  # fmt: skip
    with pytest.raises(UserError, match="sets RoPE per layer type"):
        rope_overrides(config, RopeScaling(type="linear", factor=2.0), "models/base")


def test_the_scaling_replaces_an_existing_one_from_its_original_context():
    """Llama 3.1's layout (llama3 x 8 over 8192, max_position_embeddings 131072): a new factor counts from 8192."""
    from stages.lib.core.rope import context_positions, scaled

    published = llama(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})  # fmt: skip
    assert context_positions(published) == 131072
    assert context_positions(scaled(published, RopeScaling(type="yarn", factor=4.0), "m")) == 4 * 8192
    wider = scaled(published, RopeScaling(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0), "m")
    assert wider.max_position_embeddings == 32 * 8192 and wider.rope_parameters["rope_theta"] == 500000.0


# ---------------------------------------------------------------- samples against the context


def test_a_sample_past_the_context_is_refused_with_the_key_to_set():
    from stages.lib.train.preflight import check_context

    with pytest.raises(UserError, match=r"a sample of 300 tokens, but the llama model of models/base has 256 "
                                        r"positions: set model.rope_scaling \(e.g. \{type: yarn, factor: 2\}\)"):  # fmt: skip
        check_context(llama(max_position_embeddings=256), None, 300, 512, "models/base")
    linear = RopeScaling(type="linear", factor=2.0)
    assert check_context(llama(max_position_embeddings=256), linear, 300, 512, "models/base") is None
    with pytest.raises(UserError, match="raise its factor to 3"):
        check_context(llama(max_position_embeddings=256), linear, 700, 700, "models/base")


def test_only_max_length_past_the_context_warns_and_trains():
    """A run whose samples all fit kept working before the check: it is warned, not stopped."""
    from transformers import GPT2Config

    from stages.lib.train.preflight import check_context

    warning = check_context(llama(max_position_embeddings=256), None, 200, 512, "models/base")
    assert warning.startswith("train: warning: tokenize.max_length (512) is above the 256 positions")
    assert check_context(llama(max_position_embeddings=256), None, 200, 256, "models/base") is None
    gpt2 = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=128)
    with pytest.raises(UserError, match="not rotary, so model.rope_scaling cannot extend them: lower "
                                        "tokenize.max_length to 128"):  # fmt: skip
        check_context(gpt2, None, 200, 512, "models/base")


def test_the_train_stage_refuses_a_sample_past_the_context(in_project, capsys):
    """The stage's own check (main's check_sample_lengths) on the tokenized project: the base's 2048 positions
    made shorter than the longest sample, then given back by model.rope_scaling."""
    from stages.lib.core.params import load_params
    from stages.lib.core.earlier import load_saved
    from stages.lib.train.preflight import longest_sample
    from stages.train import check_sample_lengths

    splits = load_saved(in_project / "data" / "tokenized", "tokenize")
    longest = longest_sample(splits)
    assert longest == max(len(r) for s in splits.values() for r in s["input_ids"])
    config_path = in_project / "models" / "base" / "config.json"
    original = config_path.read_text()
    config = json.loads(original)
    config["max_position_embeddings"] = longest - 1
    config_path.write_text(json.dumps(config))
    try:
        with pytest.raises(UserError, match=f"a sample of {longest} tokens, but the llama model of models/base has "
                                            f"{longest - 1} positions: set model.rope_scaling"):  # fmt: skip
            check_sample_lengths(load_params(), splits)
        edit_params(in_project, **{"model.rope_scaling": SCALINGS["linear"]})
        check_sample_lengths(load_params(), splits)
        assert "warning" not in capsys.readouterr().out  # 4 x the positions hold every sample and max_length
    finally:
        config_path.write_text(original)


def test_the_planner_counts_the_scaled_context(tmp_path):
    """python -m stages.plan: samples of 1500 tokens fit the tiny recipe's 512 positions only with the scaling."""
    import subprocess
    import sys

    from conftest import ROOT, default_params, env_with_project

    raw = default_params()
    raw["tokenize"]["max_length"] = 1500
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")

    def plan(scaling) -> str:
        raw["model"]["rope_scaling"] = scaling
        (tmp_path / "params.yaml").write_text(json.dumps(raw))
        return subprocess.run([sys.executable, "-m", "stages.plan", "--gpu-memory-gib", "16"], cwd=tmp_path,
                              env=env_with_project(), capture_output=True, text=True, check=True).stdout  # fmt: skip

    assert ("samples: up to 1500 tokens (tokenize.max_length) of the model's 512 positions; too long: set "
            "model.rope_scaling (e.g. {type: yarn, factor: 3})") in plan(None)
    scaled = plan({"type": "yarn", "factor": 4.0})
    assert "of the model's 2048 positions (yarn RoPE scaling: 4 x 512)\n" in scaled and "too long" not in scaled
