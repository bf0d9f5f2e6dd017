"""A stage whose declared inputs change while it runs keeps its old outputs and dvc.lock (stages/lib/core/provenance.py).

DVC hashes params and deps when a stage ends: without the check, dvc.lock would pair outputs made from the old
inputs with the new ones. The first test runs the real download stage under `dvc repro` while another process
edits params.yaml; the others check the snapshot's rules in a small project folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import clone, env_with_venv

from stages.lib.core import outputs, provenance

STAND_INS = ("data/raw/train.jsonl", "models/base/model.safetensors")


def tree_digests(repo: Path, *roots: str) -> dict[str, str]:
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted((repo / root).rglob("*")) if p.is_file()}  # fmt: skip


def wait_for(pattern: str, folder: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until a path matching `pattern` appears in `folder` (the stage has taken its snapshot and started writing)."""
    deadline = time.monotonic() + seconds
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {pattern} in {folder}"
        time.sleep(0.005)


def test_params_edited_while_a_stage_runs_fail_it_with_outputs_and_dvc_lock_untouched(tmp_path):
    repo = clone(tmp_path / "repo")
    for rel in STAND_INS:  # outputs of an earlier run: they must survive byte for byte
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(f"the last good {rel}\n")
    before, lock = tree_digests(repo, "data", "models"), (repo / "dvc.lock").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-s", "download"], cwd=repo, env=env_with_venv(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(".raw.tmp-*", repo / "data", proc)
    params = repo / "params.yaml"  # another process (an editor, `dvc exp run -S`) changes a key download declares
    params.write_text(params.read_text().replace("validation_fraction: 0.1 ", "validation_fraction: 0.2 "))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0, stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: params.yaml key data.validation_fraction (0.1, now 0.2) changed while stage download ran; dvc.lock "
        "would record the new version beside outputs made from the old, so none was replaced: re-run the stage "
        "(`dvc repro`)"
    ], stderr
    assert "Traceback" not in stderr
    assert (repo / "dvc.lock").read_bytes() == lock
    assert tree_digests(repo, "data", "models") == before  # no new output, no temp folder left
    assert not [p for p in (repo / "data").iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------- the rules, on a small project


DVC_YAML = """stages:
  demo:
    cmd: python -m stages.demo
    deps: [code.py, inputs, 'recipes/${model.name}.yaml']
    params: [model.name, train, {extra.yaml: [k]}]
    outs: [out]
"""


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text("model: {name: tiny}\ntrain: {lr: 0.1, flag: 1}\nother: 5\n")
    (tmp_path / "extra.yaml").write_text("k: [1, 2]\n")
    (tmp_path / "code.py").write_text("print(1)\n")
    (tmp_path / "inputs" / "sub").mkdir(parents=True)
    (tmp_path / "inputs" / "sub" / "a.txt").write_text("a")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.yaml").write_text("x: 1\n")
    monkeypatch.setattr(provenance, "_started", provenance.snapshot("demo"))
    return tmp_path


def change_of(project: Path) -> str:
    with pytest.raises(provenance.InputsChanged) as exc:
        provenance.check_unchanged()
    assert "\n" not in str(exc.value) and "re-run the stage" in str(exc.value)
    return str(exc.value)


def edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


def test_nothing_changed_or_changed_back_passes(project):
    edit(project / "params.yaml", "lr: 0.1", "lr: 0.2")
    edit(project / "params.yaml", "lr: 0.2", "lr: 0.1")
    edit(project / "params.yaml", "other: 5", "other: 6")  # a key the stage does not declare
    (project / "inputs" / "__pycache__").mkdir()  # Python's bytecode, written as the stage imports its code
    (project / "inputs" / "__pycache__" / "m.pyc").write_bytes(b"x")
    provenance.check_unchanged()


@pytest.mark.parametrize("old, new, named", [
    ("lr: 0.1", "lr: 0.2", "params.yaml key train.lr (0.1, now 0.2)"),
    ("flag: 1", "flag: true", "params.yaml key train.flag (1, now true)"),  # equal in Python, not in dvc.lock
    ("name: tiny", "name: big", "params.yaml key model.name (\"tiny\", now \"big\")"),
    ("train: {lr: 0.1, flag: 1}", "train: {lr: 0.1, flag: 1, new: 2}", "params.yaml key train.new (\"(missing)\", now 2)"),
    ("model:", "model: [", "params.yaml key model.name (\"tiny\", now \"unreadable: params.yaml, line"),
])  # fmt: skip
def test_a_declared_param_changed_is_named(project, old, new, named):
    edit(project / "params.yaml", old, new)
    assert change_of(project).startswith(named)


def test_a_param_of_another_file_is_named(project):
    edit(project / "extra.yaml", "[1, 2]", "[1, 3]")
    assert change_of(project).startswith("extra.yaml key k.1 (2, now 3)")


@pytest.mark.parametrize("change, named", [
    (lambda p: (p / "code.py").write_text("print(2)\n"), "code.py (a dependency in dvc.yaml)"),
    (lambda p: (p / "inputs" / "sub" / "b.txt").write_text("b"), "inputs/sub/b.txt (under inputs,"),
    (lambda p: (p / "inputs" / "sub" / "a.txt").unlink(), "inputs/sub/a.txt (under inputs,"),
    (lambda p: os.utime(p / "inputs" / "sub" / "a.txt", ns=(1, 1)), "inputs/sub/a.txt (under inputs,"),  # same size
    (lambda p: (p / "recipes" / "tiny.yaml").write_text("x: 2\n"), "recipes/tiny.yaml (a dependency"),  # ${model.name}
    (lambda p: edit(p / "dvc.yaml", "outs: [out]", "outs: [out, out2]"), "its entry in dvc.yaml"),
])  # fmt: skip
def test_a_declared_file_or_the_stage_definition_changed_is_named(project, change, named):
    change(project)
    assert change_of(project).startswith(named)


def test_a_replaced_file_of_the_same_size_and_time_is_seen(project):
    """An atomic replace (a new inode) with the old size and mtime, as `cp -p` then `mv` leaves it."""
    path = project / "code.py"
    stat = path.stat()
    (project / "new.py").write_text("print(3)\n")
    os.utime(project / "new.py", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(project / "new.py", path)
    assert change_of(project).startswith("code.py")


def test_a_rank_checks_against_the_head_process_snapshot(project, monkeypatch):
    """The head process passes its snapshot on; a rank started later still sees an edit made before it started."""
    monkeypatch.setattr(provenance, "stage_name", lambda: "demo")
    monkeypatch.setenv(provenance.ENV, "")
    provenance.remember()
    head = json.loads(os.environ[provenance.ENV])
    edit(project / "params.yaml", "lr: 0.1", "lr: 0.3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    provenance.remember()
    assert provenance._started == head
    assert change_of(project).startswith("params.yaml key train.lr (0.1, now 0.3)")


def test_a_large_snapshot_passes_to_ranks_as_digests(project, monkeypatch):
    monkeypatch.setattr(provenance, "stage_name", lambda: "demo")
    monkeypatch.setattr(provenance, "ENV_LIMIT", 10)
    monkeypatch.setenv(provenance.ENV, "")
    provenance.remember()
    monkeypatch.setenv("LOCAL_RANK", "0")
    provenance.remember()
    assert isinstance(provenance._started["deps"]["inputs"], str)
    provenance.check_unchanged()
    (project / "inputs" / "c.txt").write_text("c")
    assert change_of(project).startswith("inputs (a dependency in dvc.yaml)")


def test_staged_outputs_keep_the_old_output_when_an_input_changed(project):
    (project / "out").mkdir()
    (project / "out" / "v").write_text("old")
    with pytest.raises(provenance.InputsChanged):
        with outputs.staged_outputs() as out:
            (out.dir("out") / "v").write_text("new")
            edit(project / "params.yaml", "lr: 0.1", "lr: 0.2")
    assert (project / "out" / "v").read_text() == "old"
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(".")) == []  # no temp left, no journal
