"""Interruptions of every stage but train (the resume tests cover train): kill -9 of the stage, or Ctrl-C to
`dvc repro`, while the stage works. Every output stays byte-identical and dvc.lock unchanged; the next run of the
stage removes what the killed one left and ends with the same outputs. Two `dvc repro` at once: the second gets
DVC's lock message. Slow: a full default run first, then each stage killed and run again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from bad_inputs import SECRET_TOKEN
from conftest import clone, dvc, env_with_venv

pytestmark = pytest.mark.slow
OUTPUTS = ("data/raw", "data/tokenized", "models/base", "models/adapter", "models/merged", "metrics", "eval",
           "dvclive/train")  # fmt: skip
TEMP = (".*.tmp-*", ".*.scratch-*")


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    repo = clone(tmp_path_factory.mktemp("interrupts") / "repo")
    dvc("repro", cwd=repo, env={"HF_TOKEN": SECRET_TOKEN})
    return repo


def test_the_hub_token_reaches_no_file_of_a_whole_run(done):
    leaks = [str(p) for p in done.rglob("*") if p.is_file() and ".git" not in p.parts
             and SECRET_TOKEN.encode() in p.read_bytes()]  # fmt: skip
    assert not leaks


def snapshot(repo: Path) -> dict[str, bytes]:
    files = {"dvc.lock": (repo / "dvc.lock").read_bytes()}
    for out in OUTPUTS:
        files |= {str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / out).rglob("*")) if p.is_file()}
    return files


def leftovers(repo: Path) -> list[str]:
    parents = [repo / p for p in ("data", "models", "metrics", "eval", "dvclive", "dvclive/train")]
    return sorted(str(p) for d in parents for pattern in TEMP for p in d.glob(pattern))


def stage_process(dvc_proc: subprocess.Popen, stage: str, within: float = 120) -> psutil.Process:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for child in psutil.Process(dvc_proc.pid).children(recursive=True):
            try:
                if f"stages.{stage}" in " ".join(child.cmdline()) and "python" in child.name():
                    return child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    raise AssertionError(f"stages.{stage} never started")


def working(repo: Path, proc: psutil.Process, within: float) -> None:
    """Until the stage has a temp output (it is writing), or `within` seconds of its run have passed."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and not leftovers(repo) and proc.is_running():
        time.sleep(0.1)


@pytest.mark.parametrize(
    "stage, how",
    [("download", "kill -9"), ("download", "ctrl-c"), ("tokenize", "kill -9"), ("tokenize", "ctrl-c"),
     ("merge", "kill -9"), ("merge", "ctrl-c"), ("eval", "kill -9"), ("eval", "ctrl-c")],
)
def test_a_stage_interrupted_keeps_every_output_and_the_next_run_cleans_up(done, stage, how):
    before = snapshot(done)
    cmd = [sys.executable, "-m", "dvc", "repro", "-f", "-s", stage]
    proc = subprocess.Popen(cmd, cwd=done, env=env_with_venv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    child = stage_process(proc, stage)
    working(done, child, within=8)
    if how == "kill -9":
        child.kill()
    else:
        import os

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the whole foreground group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    assert snapshot(done) == before
    dvc("repro", "-f", "-s", stage, cwd=done)
    assert not leftovers(done)
    assert snapshot(done) == before  # deterministic stages: the rerun ends exactly where the killed one started
    assert "up to date" in dvc("status", cwd=done).stdout


def test_two_dvc_repro_at_once_get_dvcs_lock_message(done):
    first = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f", "-s", "download"], cwd=done,
                             env=env_with_venv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    stage_process(first, "download")
    second = dvc("repro", "-s", "download", cwd=done, check=False)
    assert second.returncode != 0
    assert "lock" in (second.stdout + second.stderr).lower()
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert "up to date" in dvc("status", cwd=done).stdout
