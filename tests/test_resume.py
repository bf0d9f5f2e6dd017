"""Long runs survive: the train stage killed or stopped mid-run resumes under `dvc repro` and ends where an
uninterrupted run ends, bit for bit on the CPU; a changed param or changed data never resumes an old checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import ROOT, clone, dvc, edit_params, env_with_project, env_with_venv, run

ADAPTER = Path("models/adapter/adapter_model.safetensors")
LOSS_CURVE = Path("dvclive/train/plots/metrics/train/loss.tsv")
# logging every 4 steps, saving every 6: a resume from checkpoint 6 or 18 continues a cut logging window
SHORT_RUN = {"train.max_steps": 30, "train.save_steps": 6, "train.eval_steps": 6, "train.logging_steps": 4}


def make_project(root: Path, **params) -> tuple[Path, dict]:
    """A fresh clone with a short run, trained once without interruption: (repo, its adapter bytes and curve)."""
    repo = clone(root)
    edit_params(repo, **(SHORT_RUN | params))
    run(["git", "commit", "-qam", "short run"], cwd=repo)
    dvc("repro", "train", cwd=repo)
    reference = {"adapter": (repo / ADAPTER).read_bytes(), "curve": (repo / LOSS_CURVE).read_text(),
                 "lock": train_lock(repo)}
    run(["git", "add", "-A"], cwd=repo)
    run(["git", "commit", "-qm", "trained"], cwd=repo)
    return repo, reference


def train_lock(repo: Path) -> dict:
    """dvc.lock's entry for train: the hash of every dependency, param and output."""
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    return make_project(tmp_path_factory.mktemp("resume") / "repo")


def start_train(repo: Path, *args: str) -> subprocess.Popen:
    """`dvc repro -f -s train` (forced: the lock says the stage is up to date), or `dvc <args>`, output piped."""
    args = args or ("repro", "-f", "-s", "train")
    cmd = [sys.executable, "-m", "dvc", *(args if args[0] in ("repro", "exp") else ("repro", *args))]
    return subprocess.Popen(cmd, cwd=repo, env=env_with_venv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def stage_process(dvc_proc: subprocess.Popen) -> psutil.Process:
    """The `python -m stages.train` process: the one DVC started, or the given process itself."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        parent = psutil.Process(dvc_proc.pid)
        for child in [parent, *parent.children(recursive=True)]:
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


def stop_and_resume_twice(repo: Path, reference: dict) -> None:
    """kill -9 after the first checkpoint; `dvc exp run` resumes; SIGTERM after the next one saves at the next step
    and says how to resume; `dvc repro` resumes again and ends with the uninterrupted run's adapter and curve."""
    interrupt(repo, signal.SIGKILL)
    kept = sorted((repo / "models" / "checkpoints").glob("checkpoint-*/run.json"))
    # an experiment now, not forced: the changed checkpoint folder makes train stale, and exp run keeps it
    out = interrupt(repo, signal.SIGTERM, "exp", "run", "train")
    assert resumed_step(out) == int(kept[-1].parent.name.split("-")[1])
    said = next(x for x in out.splitlines() if x.startswith("train: stopped by SIGTERM after step"))
    stopped = int(said.split("after step ")[1].split(";")[0])
    assert "`dvc repro` resumes from it" in said
    assert (repo / "models" / "checkpoints" / f"checkpoint-{stopped}" / "run.json").is_file()
    (repo / ADAPTER).unlink()  # the resumed run must write it again
    out = dvc("repro", "train", cwd=repo).stdout
    assert resumed_step(out) == stopped
    assert (repo / ADAPTER).read_bytes() == reference["adapter"]
    # the curve continues from each checkpoint's copy, the window a stop cut included (CarryLogWindow); dvc.lock
    # records what the uninterrupted run recorded, output hashes and all
    assert (repo / LOSS_CURVE).read_text() == reference["curve"]
    assert train_lock(repo) == reference["lock"]
    runs = [json.loads(x) for x in (repo / "logs" / "train_runs.jsonl").read_text().splitlines()]
    assert runs[-1]["resumed_from_step"] == stopped  # the run's history: an untracked file
    assert [p.name for p in (repo / "models" / "checkpoints").iterdir()] == ["ABOUT.txt"]  # emptied once complete
    assert dvc("status", "train", cwd=repo).stdout.strip() == "Data and pipelines are up to date."


def test_kill_9_and_sigterm_then_dvc_repro_resume_and_end_bit_identical(project):
    stop_and_resume_twice(*project)


def first_line(proc: subprocess.Popen, prefix: str) -> str:
    """The stage's first output line starting with `prefix`; then the stage is killed."""
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting with {prefix!r}")
    finally:
        stage_process(proc).kill()
        proc.communicate(timeout=120)


@pytest.mark.slow  # three more trainings (about 35 s); resume itself is tested above
def test_a_changed_param_or_changed_data_starts_fresh_and_says_why(project, tmp_path):
    repo, _ = project
    checkpoints = repo / "models" / "checkpoints"
    interrupt(repo, signal.SIGTERM)
    shutil.copytree(checkpoints, tmp_path / "saved")
    try:
        edit_params(repo, **{"train.learning_rate": 0.004})
        line = first_line(start_train(repo, "train"), "train: starting fresh, not from")
        assert "train.learning_rate was 0.005, now 0.004" in line
        run(["git", "checkout", "--", "params.yaml"], cwd=repo)
        shutil.rmtree(checkpoints)
        shutil.copytree(tmp_path / "saved", checkpoints)
        # other data under the same params, as a worker node without DVC would see it
        template = repo / "data" / "tokenized" / "tokenizer" / "chat_template.jinja"
        template.write_text(template.read_text() + " ")
        stage = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=repo, env=env_with_project(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        assert "data/tokenized changed since" in first_line(stage, "train: starting fresh, not from")
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
        stop_and_resume_twice(repo, reference)
        leftover = [p for p in psutil.process_iter(["cmdline"]) if "stages.train" in " ".join(p.info["cmdline"] or [])]
        assert not leftover, leftover  # kill -9 of the stage ended its ranks too
    finally:
        os.environ.pop("DS_ACCELERATOR", None)


@pytest.mark.slow  # three starts of two one-rank "nodes" (5-8 minutes); run with -m slow
def test_two_nodes_sharing_the_checkpoint_folder_stop_and_resume_bit_identical(tmp_path):
    """Two nodes on one host (runner no-ssh, one CPU rank each, ZeRO-3), each in its own checkout whose
    models/checkpoints is one shared folder, as on a cluster with NFS: SIGTERM to both heads (what SLURM does)
    saves one checkpoint with both ranks' shards, and both nodes resume from it."""
    base = tmp_path / "base"
    base.mkdir()
    for name in ("stages", "recipes"):
        (base / name).symlink_to(ROOT / name)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in SHORT_RUN.items():
        raw["train"][dotted.split(".")[1]] = value
    raw["train"] |= {"deepspeed": "zero3"}
    raw["train"]["launch"] |= {"nodes": 2, "runner": "no-ssh", "hostfile": "hostfile", "timeout_minutes": 5,
                               "master_port": 29671}  # fmt: skip
    (base / "params.yaml").write_text(yaml.safe_dump(raw))
    env = env_with_project() | {"DS_ACCELERATOR": "cpu"}
    for stage in ("download", "tokenize"):
        subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=base, env=env, check=True, capture_output=True)
    shared = tmp_path / "shared-checkpoints"
    shared.mkdir()
    nodes = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        (node / "models").mkdir(parents=True)
        for name in ("stages", "recipes", "data"):
            (node / name).symlink_to(base / name)
        (node / "models" / "base").symlink_to(base / "models" / "base")
        (node / "models" / "checkpoints").symlink_to(shared)
        (node / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
        raw["train"]["launch"]["node_rank"] = rank
        (node / "params.yaml").write_text(yaml.safe_dump(raw))
        nodes.append(node)

    def start() -> list[subprocess.Popen]:  # output to files: a full pipe would stall a rank
        return [subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=n, env=env, stderr=subprocess.STDOUT,
                                 stdout=open(n / "train.log", "w")) for n in nodes]  # fmt: skip

    def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
        return [(p.wait(timeout=600), (n / "train.log").read_text()) for p, n in zip(procs, nodes)]

    results = finish(start())
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    reference = (nodes[0] / ADAPTER).read_bytes()
    (nodes[0] / ADAPTER).unlink()
    since = time.time()
    procs = start()
    deadline = time.monotonic() + 300
    while not any(p.stat().st_mtime > since for p in shared.glob("checkpoint-*/run.json")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    results = finish(procs)
    assert [code for code, _ in results] == [143, 143], results[0][1][-3000:] + results[1][1][-3000:]
    stopped = int(results[0][1].split("stopped by SIGTERM after step ")[1].split(";")[0])
    results = finish(start())
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert resumed_step(results[0][1]) == stopped
    assert (nodes[0] / ADAPTER).read_bytes() == reference
    assert not any(shared.iterdir())


def test_training_options_join_the_run_identity_and_a_checkpoint_from_before_them_resumes(tmp_path):
    """model.rope_scaling and train.neftune_noise_alpha change the weights, so they are part of a run's identity;
    a checkpoint saved before they existed did what their null does, so it still resumes."""
    from stages.lib.core.params import validate
    from stages.lib.train.checkpoints import difference, run_identity

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    now = run_identity(validate(raw), 1, {}, tmp_path)
    new_keys = ("model.rope_scaling", "train.neftune_noise_alpha")
    assert set(new_keys) <= set(now["params"])
    older = now | {"params": {k: v for k, v in now["params"].items() if k not in new_keys}}
    assert difference(older, now) is None
    raw["train"]["neftune_noise_alpha"] = 5.0
    assert difference(now, run_identity(validate(raw), 1, {}, tmp_path)) == "train.neftune_noise_alpha was None, now 5.0"
    raw["model"]["rope_scaling"] = {"type": "linear", "factor": 2.0}
    assert difference(older, run_identity(validate(raw), 1, {}, tmp_path)) == \
        "model.rope_scaling.factor was '<unset>', now 2.0"
