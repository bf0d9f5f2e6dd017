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


def losses(folder, monkeypatch, mode):
    """The stage's trainer (build_trainer) on the tiny project with gradient_checkpointing `mode`: its losses for
    4 steps and the selective scope (None for other modes)."""
    folder.mkdir()
    monkeypatch.chdir(folder)
    make_project(folder, "bpe", "chatml", max_steps=4, packing=True, attn_implementation="varlen",
                 gradient_checkpointing=mode, batch_size=2)  # fmt: skip
    from stages.lib.core.params import load_params
    from stages.train import build_trainer

    trainer = build_trainer(load_params(), folder / "out", [])
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], getattr(trainer, "selective", None)


def test_selective_trains_as_full_checkpointing(tmp_path, monkeypatch):
    full, _ = losses(tmp_path / "full", monkeypatch, True)
    selective, scope = losses(tmp_path / "selective", monkeypatch, "selective")
    assert len(full) == 4
    assert selective == pytest.approx(full, rel=1e-6)
    assert scope.kept > 0  # the policy kept attention outputs: it was not plain checkpointing


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
        return resolved.train.gradient_checkpointing, record["predicted_train_gib"]

    assert choice(80, 128)[0] is False  # 44.7 GiB fits 80
    mode, gib = choice(24, 128)
    assert mode == "selective" and 14 < gib < 16
    assert choice(12, 128)[0] is True  # 9.7 GiB; selective needs 14.8
    mode, gib = choice(10, 128)
    assert mode == "offload" and gib < 9  # 8.4 GiB; the layer inputs (1.5 GiB) in pinned host memory
    with pytest.raises(UserError, match="nothing fits"):  # those 1.5 GiB need more than half of 2 GiB of RAM
        choice(10, 2)
