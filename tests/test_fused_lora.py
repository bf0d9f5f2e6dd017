"""train.fused_lora (stages/lib/train/fused_lora.py): LoRA's scale and sum inside one addmm must train exactly as
PEFT's own forward, and must really be the path taken (checked on the autograd graph of a layer's output)."""

from __future__ import annotations

import pytest
from test_recompute import run


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def output_node(layer) -> str:
    """The autograd node that made `layer`'s output for a random input in training mode."""
    import torch

    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    node = layer(x).grad_fn
    if type(node).__name__ == "ViewBackward0":  # the fused path's [tokens, out] -> [2, 3, out]
        node = node.next_functions[0][0]
    return type(node).__name__


# float32 throughout (16-bit LoRA): the same losses to 6 digits. QLoRA's adapters are bfloat16 (TRL's cast): PEFT
# rounds their update to bfloat16 before the sum, addmm sums in the base output's dtype (float32: within 1e-4). In
# bfloat16 each sum is rounded once instead of twice: within bfloat16 noise over 4 steps. Scaling 4 (alpha / r).
@pytest.mark.parametrize("method, dtype, rel", [("lora", "float32", 1e-6), ("qlora", "float32", 1e-4),
                                                ("qlora", "bfloat16", 2e-3)])  # fmt: skip
def test_fused_trains_as_peft(tmp_path, monkeypatch, method, dtype, rel):
    lora = {"r": 8, "alpha": 32, "dropout": 0.0}
    peft, _ = run(tmp_path / "peft", monkeypatch, False, layers=2, method=method, dtype=dtype, fused_lora=False, lora=lora)
    fused, trainer = run(tmp_path / "fused", monkeypatch, False, layers=2, method=method, dtype=dtype, fused_lora=True,
                         lora=lora)  # fmt: skip
    layers = lora_layers(trainer.model)
    assert trainer.fused_lora == len(layers) > 0
    assert len(peft) == 4 and fused == pytest.approx(peft, rel=rel)
    assert {output_node(layer) for layer in layers} == {"AddmmBackward0"}  # the fused path: no separate add


def test_peft_forward_where_fusing_would_change_the_result(tmp_path, monkeypatch):
    """Dropout (its mask is another pass) and disabled adapters take PEFT's forward."""
    _, trainer = run(tmp_path / "dropout", monkeypatch, False, fused_lora=True, lora={"dropout": 0.1})
    assert trainer.fused_lora == 0  # no layer routed: what the stage's line reports
    layer = lora_layers(trainer.model)[0]
    assert output_node(layer) == "AddBackward0"
    _, trainer = run(tmp_path / "plain", monkeypatch, False, fused_lora=True, lora={"dropout": 0.0})
    layer = lora_layers(trainer.model)[0]
    assert output_node(layer) == "AddmmBackward0"
    with trainer.model.disable_adapter():  # decided per call: the base alone, as PEFT computes it
        assert output_node(layer) != "AddmmBackward0"
    layer.lora_dropout["default"] = __import__("torch").nn.Dropout(0.1)  # changed after routing: PEFT's path
    assert output_node(layer) == "AddBackward0"
