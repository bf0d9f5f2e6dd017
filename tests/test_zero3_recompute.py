"""ZeRO-3 + reentrant checkpointing frees each layer's frozen weights after that layer's backward (real DeepSpeed, CPU).

Each case runs tests/zero3_recompute_probe.py in its own process: a 4-layer Llama with LoRA on q/v (everything
else frozen), two ZeRO-3 steps, and at the end of each layer's backward the count of frozen weights still gathered,
per layer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache

import pytest
from conftest import ROOT, env_with_venv

PORTS = iter(range(29671, 29690))


@cache  # each case once per session
def probe(placement: str, fix: bool) -> dict:
    env = env_with_venv() | {"MASTER_PORT": str(next(PORTS))}
    cmd = [sys.executable, str(ROOT / "tests" / "zero3_recompute_probe.py"), placement, "fix" if fix else "nofix"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_deepspeed_alone_keeps_recomputed_layers_gathered_when_checkpoint_wraps_the_call():
    """The problem the hook exists for (DeepSpeed 0.19 with transformers 5.17's checkpoint placement)."""
    seen = probe("around_call", fix=False)["after_layer_backward"]
    assert seen["0"] == [max(seen["0"])] * 4  # when backward reaches layer 0, every layer is still gathered


@pytest.mark.parametrize("placement", ["around_call", "inside_forward"])
def test_each_layer_is_released_after_its_backward(placement):
    result = probe(placement, fix=True)
    assert set(result["after_layer_backward"]) == {"0", "1", "2", "3"}
    for layer, gathered in result["after_layer_backward"].items():
        assert gathered == [0, 0, 0, 0], f"frozen weights still gathered when layer {layer}'s backward ended"
    assert result["after_step"] == [0, 0, 0, 0]


def test_the_hook_does_not_change_the_losses():
    assert probe("around_call", fix=True)["losses"] == probe("around_call", fix=False)["losses"]
