"""ZeRO-3 frees gathered frozen weights right after their use (real DeepSpeed on the CPU, stages/lib/train/zero3_release.py).

Each case runs tests/zero3_release_probe.py in its own process: a 4-layer Llama with LoRA on q/v (all else frozen),
reentrant checkpointing, TRL's fused LM head, two ZeRO-3 steps. At the end of each layer's backward it records the
frozen weights still gathered per layer, and whether the LM head's weight is gathered.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache

import pytest
from conftest import ROOT, env_with_venv

PORTS = iter(range(29671, 29690))
RELEASED = [0, 0, 0, 0, False]  # no layer's frozen weights, no LM head


@cache  # each case once per session
def probe(placement: str, fix: bool, offload: bool = False) -> dict:
    env = env_with_venv() | {"MASTER_PORT": str(next(PORTS))}
    cmd = [sys.executable, str(ROOT / "tests" / "zero3_release_probe.py"), placement, "fix" if fix else "nofix",
           *(["offload"] if offload else [])]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the baseline the fixes are measured against (18 s)
def test_deepspeed_alone_keeps_weights_gathered_to_the_end_of_backward():
    """What the fixes are for (DeepSpeed 0.19 with transformers 5.17's checkpoint placement)."""
    *layers, head = probe("around_call", fix=False)["after_layer_backward"]["0"]
    assert layers == [max(layers)] * 4 and max(layers) > 0  # when backward reaches layer 0, every layer is gathered
    assert head  # the LM head has been pinned since the forward


@pytest.mark.parametrize("placement, offload", [  # one in the default run; all with -m slow
    ("around_call", False), pytest.param("inside_forward", False, marks=pytest.mark.slow),
    pytest.param("around_call", True, marks=pytest.mark.slow)])  # fmt: skip
def test_each_layer_and_the_head_are_released_after_use(placement, offload):
    result = probe(placement, fix=True, offload=offload)
    assert set(result["after_layer_backward"]) == {"0", "1", "2", "3"}
    for layer, gathered in result["after_layer_backward"].items():
        assert gathered == RELEASED, f"weights still gathered when layer {layer}'s backward ended"
    assert result["after_step"] == [0, 0, 0, 0]


@pytest.mark.slow  # two more ZeRO-3 trainings (about 35 s); the release itself is tested above
def test_the_fixes_do_not_change_the_losses():
    losses = probe("around_call", fix=False)["losses"]
    assert probe("around_call", fix=True)["losses"] == losses
    assert probe("around_call", fix=True, offload=True)["losses"] == losses  # the seed's recipe offloads to CPU
