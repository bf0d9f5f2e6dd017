"""The embedded default reproduces the committed dvc.lock bit for bit on this CPU, whatever instruction sets and
threads it has: every stage pins torch, MKL and oneDNN to AVX2 kernels and MKL's strict reproducible mode
(stages/lib/core/cpu_kernels.py). Without the pin, an AVX-512 CPU trains another adapter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import env_with_project, run

from stages.lib.core.cpu_kernels import PINNED, SWITCH


ADAPTER = Path("models/adapter/adapter_model.safetensors")


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def adapter_after_training(default_run, tmp_path: Path, **env: str) -> bytes:
    """The adapter weights `python -m stages.train` writes in a copy of the default run, with `env` on top of an
    environment without the caller's kernel variables."""
    repo = tmp_path / "repo"
    shutil.copytree(default_run.repo, repo, symlinks=True, ignore=shutil.ignore_patterns(".git", ".dvc"))
    base = {k: v for k, v in env_with_project().items() if k not in PINNED and k != SWITCH}
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=repo, env=base | env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (repo / ADAPTER).read_bytes()


def test_the_default_run_reproduces_the_committed_lock(default_run):
    """The session's default run (a fresh clone, `dvc repro`) wrote exactly the committed dvc.lock."""
    diff = run(["git", "diff", "HEAD~1", "--", "dvc.lock"], cwd=default_run.repo).stdout
    assert diff == "", diff[:3000]


def test_native_avx512_kernels_train_another_adapter(default_run, tmp_path):
    """On an AVX-512 CPU the unpinned kernels end elsewhere: the pin is what makes AVX2 and AVX-512 machines
    agree (the default run, pinned, equals the committed lock: test above)."""
    if "avx512f" not in cpu_flags():
        pytest.skip("this CPU has no AVX-512: native kernels are the pinned ones")
    assert adapter_after_training(default_run, tmp_path, **{SWITCH: "native"}) != (default_run.outputs / ADAPTER).read_bytes()


@pytest.mark.slow  # two more trainings (about 150 s)
@pytest.mark.parametrize("threads", ["1", "4"])
def test_the_pin_holds_whatever_the_number_of_threads(default_run, tmp_path, threads):
    trained = adapter_after_training(default_run, tmp_path, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    assert trained == (default_run.outputs / ADAPTER).read_bytes()


def test_the_pin_is_set_before_torch_and_leaves_users_settings():
    code = ("import os, stages, torch; print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'], "
            "os.environ['ONEDNN_MAX_CPU_ISA'])")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in PINNED and k != SWITCH}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AVX2", "AVX2,STRICT", "AVX2"]
    mine = env | {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    out = subprocess.run([sys.executable, "-c", code], env=mine, capture_output=True, text=True, check=True).stdout
    assert out.split()[2] == "AVX512_CORE"
