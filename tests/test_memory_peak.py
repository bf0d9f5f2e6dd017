"""bench/memory_peak.py: replaying an allocation trace finds the peak and what was alive there."""

from __future__ import annotations

import pickle
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import memory_peak

MIB = 2**20


def frames(name: str) -> list[dict]:
    return [{"filename": "/venv/lib/python3.12/site-packages/torch/nn/modules/module.py", "line": 1, "name": "call"},
            {"filename": "/venv/lib/python3.12/site-packages/deepspeed/runtime/zero/x.py", "line": 7, "name": name}]  # fmt: skip


def test_the_peak_and_its_live_blocks(tmp_path, capsys):
    trace = [
        {"action": "free_completed", "addr": 99, "size": 4 * MIB, "frames": []},  # allocated before recording
        {"action": "alloc", "addr": 1, "size": 100 * MIB, "frames": frames("gather")},
        {"action": "alloc", "addr": 2, "size": 50 * MIB, "frames": frames("activation")},
        {"action": "free_completed", "addr": 1, "size": 100 * MIB, "frames": []},
        {"action": "alloc", "addr": 3, "size": 60 * MIB, "frames": frames("activation")},
    ]
    best, best_at, _ = memory_peak.replay(trace)
    assert (best, best_at) == (146 * MIB, 2)  # 150 MiB allocated after 4 MiB were freed
    _, _, live = memory_peak.replay(trace, best_at)
    assert sorted(live) == [1, 2]
    path = tmp_path / "rank0.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [[], trace]}))  # rank 1's device
    memory_peak.report(str(path), top=5, depth=2)
    out = capsys.readouterr().out
    assert "peak 0.14 GiB" in out and "at event 2" in out
    assert "deepspeed/runtime/zero/x.py:7(gather)" in out.splitlines()[1]  # the largest group first
    assert "torch/nn/modules" not in out  # torch's own frames do not name a site
