"""The planner (stages/lib/train/plan.py, python -m stages.plan): exact sizes from config.json on the meta device,
predictions against every measured GPU configuration, and `auto` refusing before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages.lib.core.errors import UserError
from stages.lib.core.params import Params, load_params
from stages.lib.train.plan import Setting, estimate, trainable_params
from stages.lib.train.auto import PLANNED_ENV, config_dict, meta_from_config, resolve
from stages.train import quality_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import plan_calibration  # noqa: E402

SEED = ROOT / "pipelines" / "seed-chatglm2-2x4" / "params.yaml"
ONE_GPU_7B = ROOT / "pipelines" / "qwen2.5-7b-1gpu" / "params.yaml"
# Published parameter counts (model cards / safetensors index totals)
PUBLISHED = {"qwen2.5-7b-instruct": 7_615_616_512, "llama-3.1-8b-instruct": 8_030_261_248,
             "glm-4-9b-chat-hf": 9_399_951_360, "chatglm2-6b": 6_243_584_000}  # fmt: skip


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A project folder with the recipes and no models/base: the planner reads the recipe's config sizes."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(PLANNED_ENV, "")  # so that teardown removes what resolve() sets
    monkeypatch.delenv(PLANNED_ENV)
    return tmp_path


def with_train(path: Path, **changes) -> Params:
    raw = yaml.safe_load(path.read_text())
    raw["train"] |= changes
    return Params.model_validate(raw)


@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_recipe_config_builds_the_published_parameter_count(elsewhere, recipe):
    params = with_train(ONE_GPU_7B)
    params = params.model_copy(update={"model": params.model.model_copy(update={"recipe": recipe, "convert": True})})
    model = meta_from_config(config_dict(params))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[recipe]


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_count_equals_peft_trainable_parameters(targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300)  # fmt: skip
    params = with_train(ONE_GPU_7B, lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None})
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    real = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=targets))
    assert trainable_params(meta, params, targets) == sum(p.numel() for p in real.parameters() if p.requires_grad)


def test_every_measured_configuration_is_predicted_within_15_percent():
    rows = plan_calibration.rows()
    assert len(rows) == len(plan_calibration.MEASURED)
    for r in rows:
        predicted, measured = r["train"]
        assert abs(predicted - measured) <= 0.15 * measured, r
        predicted, measured = r["load"]
        if measured is not None:  # loads under offload are a few hundred MiB: compared in GiB
            assert abs(predicted - measured) <= max(0.15 * measured, 0.15), r


def test_offload_and_sharding_order_the_peaks(elsewhere):
    params = with_train(SEED)
    model = meta_from_config(config_dict(params))
    targets = ["q_proj", "k_proj", "v_proj"]
    peak = {ds: estimate(model, params, Setting(ds, True, 8), targets).train_peak for ds in ("zero2", "zero3", "zero3-offload")}
    assert peak["zero2"] > peak["zero3"] > peak["zero3-offload"]
    no_ckpt = estimate(model, params, Setting("zero2", False, 8), targets)
    assert no_ckpt.activations > 5 * estimate(model, params, Setting("zero2", True, 8), targets).activations


def test_auto_picks_no_checkpointing_on_a_large_gpu_and_records_it(elsewhere):
    params = with_train(ONE_GPU_7B, deepspeed="auto", gradient_checkpointing="auto")
    resolved, record = resolve(params, capacity_gib=139.8, visible_gpus=1)
    assert (resolved.train.deepspeed, resolved.train.gradient_checkpointing) == (None, False)
    assert record["predicted_train_gib"] > 40 and "fastest that fits" in record["reason"]
    assert json.loads(os.environ[PLANNED_ENV]) == record  # what the launched ranks read
    again, same = resolve(params)  # a rank: takes the head's choice, plans nothing
    assert same == record and again.train == resolved.train
    assert quality_metrics({"loss_history": []}, [], record)["setting"] == {"deepspeed": "none",
                                                                          "gradient_checkpointing": False}


def test_auto_on_a_small_gpu_keeps_checkpointing(elsewhere):
    params = with_train(ONE_GPU_7B, deepspeed=None, gradient_checkpointing="auto")  # only one key is auto
    resolved, record = resolve(params, capacity_gib=12, visible_gpus=1)  # selective needs 14.8 (test_recompute.py)
    assert resolved.train.gradient_checkpointing is True and resolved.train.deepspeed is None
    assert "deepspeed" not in record


def test_auto_that_fits_nowhere_refuses_with_the_cheapest_change(elsewhere):
    params = with_train(ONE_GPU_7B, deepspeed="auto", gradient_checkpointing="auto")
    with pytest.raises(UserError) as err:
        resolve(params, capacity_gib=3.5, visible_gpus=1)
    message = str(err.value)
    assert "nothing fits 1 GPU(s) of 3.5 GiB" in message
    assert "2048 tokens per micro-batch instead of 8192 (train.packed_length), zero3-offload" in message
    assert PLANNED_ENV not in os.environ


def test_auto_without_a_gpu_trains_plainly(elsewhere):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    params = with_train(ONE_GPU_7B, deepspeed="auto", gradient_checkpointing="auto")
    resolved, record = resolve(params)
    assert (resolved.train.deepspeed, resolved.train.gradient_checkpointing) == (None, False)
    assert record["reason"].startswith("no GPU")


def test_plan_command_for_the_seed_on_eight_24gib_gpus():
    out = subprocess.run([sys.executable, "-m", "stages.plan", "--params", str(SEED), "--gpus", "4", "--nodes", "2",
                          "--gpu-memory-gib", "24"], cwd=ROOT, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "plan: 2 x 4 GPUs of 24.0 GiB, 4096 tokens per GPU" in out
    assert max(len(line) for line in out.splitlines() if line.startswith(("choice", "  speed", "  bench"))) <= 120
    flat = " ".join(out.split())  # the choice line wraps at 120 columns
    assert "choice: zero2, selective checkpointing" in flat and "the speed of the params' zero3-offload, checkpointing" in flat
    assert "across 2 nodes not zero3, no checkpointing, which moves 7.3 GiB per GPU" in flat  # fits, but off-host
    bad = subprocess.run([sys.executable, "-m", "stages.plan", "--gpus", "0"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "--gpus must be a number above 0" in bad.stderr


def test_committed_params_plan(tmp_path):
    params = load_params(ROOT / "params.yaml")
    assert params.train.deepspeed in (None, "auto")
    out = subprocess.run([sys.executable, "-m", "stages.plan", "--gpu-memory-gib", "16"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "choice: none, no checkpointing" in out


def test_a_key_that_is_not_auto_keeps_its_value(elsewhere):
    params = with_train(ONE_GPU_7B, deepspeed="zero3", gradient_checkpointing="auto")
    resolved, record = resolve(params, capacity_gib=139.8, visible_gpus=2)
    assert resolved.train.deepspeed == "zero3" and resolved.train.gradient_checkpointing is False
    assert "deepspeed" not in record and record["predicted_train_gib"] > 40  # zero3 without checkpointing


def test_ranks_on_other_nodes_get_the_choice_as_an_argument(elsewhere):
    from stages.lib.train.launch import launcher_command, take_planned_arg

    params = with_train(SEED, deepspeed="auto")
    _, record = resolve(params, capacity_gib=24, visible_gpus=4)
    command = launcher_command(params)
    encoded = command[command.index("--planned") + 1]
    assert encoded.replace("-", "").replace("_", "").replace("=", "").isalnum()  # nothing a remote shell splits
    os.environ.pop(PLANNED_ENV)
    take_planned_arg(["-m", "stages.train", "--local_rank=3", "--planned", encoded])
    assert json.loads(os.environ[PLANNED_ENV]) == record and record["deepspeed"] == "zero2"


def test_full_fine_tuning_counts_the_weights_once(elsewhere):
    params = with_train(ONE_GPU_7B, method="full", lora={"r": 8, "alpha": 16, "dropout": 0.0})
    model = meta_from_config(config_dict(params))
    n = sum(p.numel() for p in model.parameters())
    zero3 = estimate(model, params, Setting("zero3", True, 8), "all-linear")
    assert zero3.weights == pytest.approx(2 * n / 8 / 2**30, rel=0.01)  # bf16 weights, split 8 ways
    assert zero3.adapter == pytest.approx(n * (2 + 12) / 8 / 2**30, rel=0.01)  # grads + fp32 master + Adam, split
    alone = estimate(model, params, Setting("none", True, 1), "all-linear")
    assert alone.adapter == pytest.approx(n * (2 + 4) / 2**30, rel=0.01)  # bf16 grads and Adam moments


def test_the_plan_command_plans_the_params_model_not_an_earlier_download(tmp_path):
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 10}))  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "stages.plan", "--params", str(ONE_GPU_7B), "--gpu-memory-gib", "80"],
                         cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout  # fmt: skip
    assert "   5.17 " in out  # the 7B's 4-bit weights, not the tiny model in models/base


def test_leaf_modules_only_where_every_decoder_layer_is_larger(elsewhere):
    from stages.lib.train.plan import leaf_modules_apply

    seven_b = meta_from_config(config_dict(with_train(ONE_GPU_7B)))
    assert leaf_modules_apply(1e8, seven_b)  # 233M-parameter layers: the measured 1.61x setting
    assert not leaf_modules_apply(3e8, seven_b) and not leaf_modules_apply(0, seven_b)
    small = plan_calibration.meta("1.5b")  # 47M-parameter layers would be leaves whole (failed on the GPUs)
    assert not leaf_modules_apply(1e8, small)
