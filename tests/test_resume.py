"""Long runs survive: the train stage killed or stopped mid-run resumes under `dvc repro` and ends where an
uninterrupted run ends, bit for bit on the CPU; a changed param or changed data never resumes an old checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import clone, dvc, edit_params, env_with_venv, run

ADAPTER = Path("models/adapter/adapter_model.safetensors")
LOSS_CURVE = Path("dvclive/train/plots/metrics/train/loss.tsv")
SHORT_RUN = {"train.max_steps": 30, "train.save_steps": 6, "train.eval_steps": 6, "train.logging_steps": 3}


def make_project(root: Path, **params) -> tuple[Path, dict]:
    """A fresh clone with a short run, trained once without interruption: (repo, its adapter bytes and curve)."""
    repo = clone(root)
    edit_params(repo, **(SHORT_RUN | params))
    run(["git", "commit", "-qam", "short run"], cwd=repo)
    dvc("repro", "train", cwd=repo)
    reference = {"adapter": (repo / ADAPTER).read_bytes(), "curve": (repo / LOSS_CURVE).read_text()}
    run(["git", "add", "-A"], cwd=repo)
    run(["git", "commit", "-qm", "trained"], cwd=repo)
    return repo, reference


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    return make_project(tmp_path_factory.mktemp("resume") / "repo")


def start_train(repo: Path, *args: str) -> subprocess.Popen:
    """`dvc repro -f -s train` (forced: the lock says the stage is up to date) in the background, output piped."""
    cmd = [sys.executable, "-m", "dvc", "repro", *(args or ("-f", "-s", "train"))]
    return subprocess.Popen(cmd, cwd=repo, env=env_with_venv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def stage_process(dvc_proc: subprocess.Popen) -> psutil.Process:
    """The `python -m stages.train` process DVC started (the stage itself, not DVC)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for child in psutil.Process(dvc_proc.pid).children(recursive=True):
            try:
                if child.cmdline()[-2:] == ["-m", "stages.train"]:
                    return child
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError("the train stage did not start")


def wait_for_checkpoint(repo: Path, proc: subprocess.Popen, since: float) -> None:
    """Until this run has completed a checkpoint (one written after `since`, a time.time())."""
    deadline = time.monotonic() + 300

    def new() -> bool:
        return any(p.stat().st_mtime > since for p in (repo / "models" / "checkpoints").glob("checkpoint-*/run.json"))

    while not new():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no complete checkpoint within 5 minutes"
        time.sleep(0.05)


def interrupt(repo: Path, signum: int, *args: str) -> str:
    """Start the train stage, send `signum` to it once a checkpoint is complete, return DVC's output."""
    since = time.time()
    proc = start_train(repo, *args)
    stage = stage_process(proc)
    wait_for_checkpoint(repo, proc, since)
    stage.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    return out


def resumed_step(out: str) -> int:
    line = next((x for x in out.splitlines() if x.startswith("train: resuming from")), None)
    assert line, out[-3000:]
    return int(line.rsplit("(step ", 1)[1].rstrip(")"))


def assert_resumes_to_the_reference(repo: Path, reference: dict) -> int:
    (repo / ADAPTER).unlink()  # the resumed run must write it again
    out = dvc("repro", "train", cwd=repo).stdout
    step = resumed_step(out)
    assert step > 0
    assert (repo / ADAPTER).read_bytes() == reference["adapter"]
    assert (repo / LOSS_CURVE).read_text().splitlines()[0] == "step\tloss"
    assert not any((repo / "models" / "checkpoints").iterdir())  # emptied once complete
    assert dvc("status", "train", cwd=repo).stdout.strip() == "Data and pipelines are up to date."
    return step


def test_kill_9_then_dvc_repro_resumes_and_ends_bit_identical(project):
    repo, reference = project
    interrupt(repo, signal.SIGKILL)
    assert_resumes_to_the_reference(repo, reference)
    # the curve continues where the checkpoint left it: the same points as the uninterrupted run
    assert (repo / LOSS_CURVE).read_text() == reference["curve"]


def test_sigterm_saves_at_the_next_step_and_says_how_to_resume(project):
    repo, reference = project
    out = interrupt(repo, signal.SIGTERM)
    said = next(x for x in out.splitlines() if x.startswith("train: stopped by SIGTERM after step"))
    stopped = int(said.split("after step ")[1].split(";")[0])
    assert "`dvc repro` resumes from it" in said
    assert (repo / "models" / "checkpoints" / f"checkpoint-{stopped}" / "run.json").is_file()
    assert assert_resumes_to_the_reference(repo, reference) == stopped


def first_words(repo: Path, prefix: str) -> str:
    """Run `dvc repro train`, wait for the stage's line starting with `prefix`, kill the stage, return the line."""
    proc = start_train(repo, "train")
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting with {prefix!r}")
    finally:
        stage_process(proc).kill()
        proc.communicate(timeout=120)


def test_a_changed_param_or_changed_data_starts_fresh_and_says_why(project, tmp_path):
    repo, _ = project
    checkpoints = repo / "models" / "checkpoints"
    try:
        interrupt(repo, signal.SIGTERM)
        shutil.copytree(checkpoints, tmp_path / "saved")
        edit_params(repo, **{"train.learning_rate": 0.004})
        line = first_words(repo, "train: starting fresh, not from")
        assert "train.learning_rate was 0.005, now 0.004" in line
        run(["git", "checkout", "--", "params.yaml"], cwd=repo)
        shutil.rmtree(checkpoints)
        shutil.copytree(tmp_path / "saved", checkpoints)
        edit_params(repo, **{"data.max_validation": 20})  # another split: download and tokenize run again first
        assert "data/tokenized changed since" in first_words(repo, "train: starting fresh, not from")
    finally:
        run(["git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock"], cwd=repo)
        dvc("checkout", "--force", "download", "tokenize", "train", cwd=repo)


@pytest.mark.slow  # three launches of two DeepSpeed ranks (about 4 minutes); run with -m slow
def test_two_zero3_ranks_killed_and_resumed_end_bit_identical(tmp_path):
    """The stage's own launcher, two CPU ranks under ZeRO-3: kill -9 of the stage ends its ranks too, and the
    resumed run loads every rank's shard; the same with SIGTERM passed on to both ranks."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # inherited by DVC and the stage; this process never uses DeepSpeed
    try:
        repo, reference = make_project(
            tmp_path / "zero3", **{"train.deepspeed": "zero3", "train.launch.gpus_per_node": 2,
                                   "train.launch.master_port": 29661, "train.max_steps": 24})  # fmt: skip
        interrupt(repo, signal.SIGKILL)
        time.sleep(5)  # the ranks notice that the stage process is gone
        ranks = [p for p in psutil.process_iter(["cmdline"]) if "stages.train" in " ".join(p.info["cmdline"] or [])]
        assert not ranks, ranks
        assert_resumes_to_the_reference(repo, reference)
        out = interrupt(repo, signal.SIGTERM)
        assert out.count("got SIGTERM: saving a checkpoint after this step") == 2
        assert_resumes_to_the_reference(repo, reference)
    finally:
        os.environ.pop("DS_ACCELERATOR", None)
