"""train.gradient_checkpointing: selective and offload (stages/lib/train/recompute.py).

Selective checkpointing must train exactly as full checkpointing (it only chooses which outputs to keep instead of
recomputing them); the stage's trainer runs both on a tiny 4-bit model over packed rows with the varlen kernel. TRL's
activation offloading needs an accelerator (it builds a CUDA stream), so `offload` is refused on a CPU: here its
refusals and the planner's choices are tested; its losses are compared on the GPU (bench/throughput.py).
"""

from __future__ import annotations

import pytest
import yaml
from test_plan import ONE_GPU_7B, elsewhere, with_train  # noqa: F401 - the fixture
from test_train_labels import make_project

from stages.lib.core.errors import UserError
from stages.lib.train import recompute


def run(folder, monkeypatch, mode, layers: int = 1, **train):
    """The stage's trainer (build_trainer) on the tiny project (`layers` decoder layers) with gradient_checkpointing
    `mode`, trained for 4 steps: (its losses, the trainer)."""
    folder.mkdir()
    monkeypatch.chdir(folder)
    make_project(folder, "bpe", "chatml", layers=layers, max_steps=4, packing=True, attn_implementation="varlen",
                 gradient_checkpointing=mode, batch_size=2, **train)  # fmt: skip
    from stages.lib.core.params import load_params
    from stages.train import build_trainer

    trainer = build_trainer(load_params(), folder / "out", [])
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


def losses(folder, monkeypatch, mode):
    """run()'s losses and the selective scope (None for other modes)."""
    found, trainer = run(folder, monkeypatch, mode)
    return found, getattr(trainer, "selective", None)


def test_selective_trains_as_full_checkpointing(tmp_path, monkeypatch):
    full, _ = losses(tmp_path / "full", monkeypatch, True)
    selective, scope = losses(tmp_path / "selective", monkeypatch, "selective")
    assert len(full) == 4
    assert selective == pytest.approx(full, rel=1e-6)
    assert scope.kept > 0  # the policy kept attention outputs: it was not plain checkpointing


def forward_calls(trainer) -> list[int]:
    """Counts, per decoder layer, of the forward runs in one more training step (a recomputed layer runs twice)."""
    counts = [0] * len(trainer.decoder_layers)
    for index, layer in enumerate(trainer.decoder_layers):  # the MLP: inside what the checkpoint runs again
        layer.mlp.register_forward_pre_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.training_step(trainer.model, batch)
    return counts


@pytest.mark.parametrize("mode", [True, "selective"])
def test_checkpoint_layers_recomputes_only_the_first(tmp_path, monkeypatch, mode):
    full, _ = run(tmp_path / "all", monkeypatch, mode, layers=3)
    first, trainer = run(tmp_path / "first", monkeypatch, mode, layers=3, checkpoint_layers=2)
    assert first == pytest.approx(full, rel=1e-6)  # which layers recompute changes no number
    assert forward_calls(trainer) == [2, 2, 1]  # layers 0 and 1 ran again in the backward pass, layer 2 did not


def test_checkpoint_layers_is_refused_where_it_means_nothing(tmp_path):
    from stages.lib.core.params import ParamsError, validate

    raw = yaml.safe_load(ONE_GPU_7B.read_text())
    for mode in (False, "offload"):
        raw["train"] |= {"gradient_checkpointing": mode, "checkpoint_layers": 4}
        with pytest.raises(ParamsError, match="train.checkpoint_layers \\(4\\) needs train.gradient_checkpointing true"):
            validate(raw)
    raw["train"] |= {"gradient_checkpointing": "auto", "checkpoint_layers": 4}
    with pytest.raises(ParamsError, match="with train.gradient_checkpointing auto: auto picks the checkpointed layers"):
        validate(raw)
    with pytest.raises(UserError, match="train.checkpoint_layers 40 is more than the model's 28 decoder layers"):
        recompute.check(True, zero3=False, gpu=True, checkpointed=40, layers=28)


def test_offload_is_refused_where_it_cannot_run():
    with pytest.raises(UserError, match="train.gradient_checkpointing 'offload' needs a CUDA GPU"):
        recompute.check("offload", zero3=False, gpu=False)
    with pytest.raises(UserError, match="'offload' is not available under ZeRO-3"):
        recompute.check("offload", zero3=True, gpu=True)
    with pytest.raises(UserError, match="'selective' is not available under ZeRO-3"):
        recompute.check("selective", zero3=True, gpu=True)
    recompute.check("selective", zero3=False, gpu=False)  # selective runs on a CPU (the test above)
    recompute.check("offload", zero3=False, gpu=True)


@pytest.mark.parametrize("mode, reentrant, needs", [("selective", True, "non-reentrant"), ("offload", False, "reentrant")])
def test_schema_refuses_the_other_reentrancy(mode, reentrant, needs):
    raw = yaml.safe_load(ONE_GPU_7B.read_text())
    raw["train"] |= {"gradient_checkpointing": mode, "reentrant_checkpointing": reentrant}
    from stages.lib.core.params import ParamsError, validate

    with pytest.raises(ParamsError, match=f"'{mode}' needs {needs} checkpointing: set train.reentrant_checkpointing: null"):
        validate(raw)


def test_offload_fields_reach_trl():
    assert recompute.sft_fields("offload", False) == {"checkpointing": True, "use_reentrant": True,
                                                       "activation_offloading": True}  # fmt: skip
    assert recompute.sft_fields("selective", True)["use_reentrant"] is False
    assert recompute.sft_fields(False, True)["checkpointing"] is False


def test_auto_picks_the_fastest_that_fits_gpu_and_host(elsewhere, monkeypatch):  # noqa: F811
    from stages.lib.train.auto import PLANNED_ENV, resolve

    params = with_train(ONE_GPU_7B, deepspeed=None, gradient_checkpointing="auto")

    def choice(gpu_gib: float, host_gib: float):
        monkeypatch.delenv(PLANNED_ENV, raising=False)  # resolve() hands its choice on to the ranks through it
        resolved, record = resolve(params, capacity_gib=gpu_gib, visible_gpus=1, host_gib=host_gib)
        t = resolved.train
        return t.gradient_checkpointing, t.checkpoint_layers, record["predicted_train_gib"]

    assert choice(80, 128)[0] is False  # 44.7 GiB fits 80
    mode, layers, gib = choice(24, 128)  # 44.7 GiB whole; the first N layers checkpointed fill the card instead
    assert mode in (True, "selective") and 13 < layers < 28 and 0.8 * 24 < gib < 0.9 * 24
    assert choice(13.1, 128)[:2] == (True, 26)  # 9.7 GiB with every layer; two layers whole fit 11.8 usable
    # the last layer whole peaks where checkpointing it does (its backward follows its forward): at least that
    assert choice(11, 128)[:2] == (True, 27)
    mode, _, gib = choice(10, 128)
    assert mode == "offload" and gib < 9  # 8.4 GiB; the layer inputs (1.5 GiB) in pinned host memory
    with pytest.raises(UserError, match="nothing fits"):  # those 1.5 GiB need more than half of 2 GiB of RAM
        choice(10, 2)


def test_the_plan_refuses_more_checkpointed_layers_than_the_model_has(elsewhere):  # noqa: F811
    from stages.lib.train.auto import config_dict, meta_from_config
    from stages.lib.train.plan import make_plan

    params = with_train(ONE_GPU_7B, deepspeed=None, gradient_checkpointing=True, checkpoint_layers=29)
    with pytest.raises(UserError, match="train.checkpoint_layers 29 is more than the model's 28 decoder layers"):
        make_plan(meta_from_config(config_dict(params)), params, "all-linear", 1, 1, 24.0)
