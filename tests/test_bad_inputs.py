"""The bad-input catalogue (tests/bad_inputs.py), run for real: each case in its own copy of a ready project.

For every case: the stage exits non-zero, stderr is exactly one `error:` line naming the key, file or record,
there is no traceback, and every output that existed before (data/raw, models/base, data/tokenized, an adapter, a
merged model, metrics) is byte-identical afterwards, with no temp folder left behind. Cases run two at a time
(the machine has two cores); the slowest ones are marked slow.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bad_inputs import CASES, CATEGORIES, GOOD, SECRET_TOKEN, free_port, jsonl, render_table, set_params
from conftest import ROOT, clone, env_with_venv, run

OUTPUT_ROOTS = ("data", "models", "metrics", "eval", "dvclive")
FAST = [c for c in CASES if not c.slow]
SLOW = {c.id: c for c in CASES if c.slow}


REDIRECTS = {"/redirect-missing": "/missing.jsonl", "/loop": "/loop", "/redirect-good": "/good.jsonl"}


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        if self.path == "/good.jsonl":
            body = jsonl(GOOD).encode()
        elif self.path == "/plain":
            body = b"instruction,output\na,b\n"
        elif self.path == "/hang":
            time.sleep(30)
            return
        elif self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"[")
                self.wfile.flush()
                time.sleep(0.5)
            return
        elif self.path == "/error":
            self.send_error(500)
            return
        elif self.path in REDIRECTS:
            self.send_response(302)
            self.send_header("Location", REDIRECTS[self.path])
            self.end_headers()
            return
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def servers():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    busy = socket.socket()
    busy.bind(("", 0))
    busy.listen()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "closed_port": free_port(),
           "busy_port": busy.getsockname()[1], "plain_sha256": hashlib.sha256(b"instruction,output\na,b\n").hexdigest()}
    busy.close()
    server.shutdown()


@pytest.fixture(scope="module")
def ready(tmp_path_factory) -> Path:
    """A clone after download and tokenize (with HF_TOKEN set, to check it leaks nowhere), plus stand-ins for the
    later outputs, so that every case can show they survive."""
    repo = clone(tmp_path_factory.mktemp("catalogue") / "repo")
    for stage in ("download", "tokenize"):
        run([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env={"HF_TOKEN": SECRET_TOKEN})
    for rel in ("models/adapter/adapter_model.safetensors", "models/merged/model.safetensors", "metrics/eval.json",
                "metrics/merge.json", "eval/generations.jsonl", "dvclive/train/metrics.json"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(f"the last good {rel}\n")
    return repo


def digests(repo: Path) -> dict[str, str]:
    out = {}
    for root in OUTPUT_ROOTS:
        for p in sorted((repo / root).rglob("*")):
            if p.is_file() and "sources" not in p.relative_to(repo).parts:
                out[str(p.relative_to(repo))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def attempt(case, ready: Path, servers: dict, base: Path) -> dict:
    repo = base / case.id
    shutil.copytree(ready, repo, symlinks=True, ignore=shutil.ignore_patterns(".git", ".dvc"))
    case.setup(repo, servers)
    before = digests(repo)
    start = time.monotonic()
    env = env_with_venv() | {"PYTHONPATH": str(repo)} | case.env
    try:
        proc = subprocess.run([sys.executable, "-m", f"stages.{case.stage}"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=120)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:  # a case that is not refused at all (it trains, say)
        code, stdout, stderr = "timeout", str(exc.stdout)[-2000:], str(exc.stderr)[-2000:]
    return {"case": case, "seconds": time.monotonic() - start, "code": code, "stdout": stdout, "stderr": stderr,
            "changed": sorted(set(before.items()) ^ set(digests(repo).items())), "pwned": (repo / "pwned").exists()}


@pytest.fixture(scope="module")
def outcomes(ready, servers, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: attempt(c, ready, servers, base), FAST))
    print("\ncase | seconds | error line")
    for r in results:
        print(f"{r['case'].id} | {r['seconds']:.1f} | {r['stderr'].strip()[:160]}")
    return {r["case"].id: r for r in results}


def check(result: dict) -> None:
    case = result["case"]
    said = f"stdout:\n{result['stdout'][-2000:]}\nstderr:\n{result['stderr'][-4000:]}"
    assert result["code"] != 0, said
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert "Traceback" not in result["stderr"] + result["stdout"], said
    assert len(lines) == 1 and lines[0].startswith("error: "), said
    assert case.expect in lines[0], f"{case.expect!r} not in {lines[0]!r}"
    assert not result["changed"], result["changed"]
    assert not result["pwned"]


@pytest.mark.parametrize("case_id", [c.id for c in FAST])
def test_a_bad_input_fails_in_one_line_and_keeps_every_output(case_id, outcomes):
    check(outcomes[case_id])


@pytest.mark.slow
@pytest.mark.parametrize("case_id", sorted(SLOW))
def test_a_slow_bad_input_fails_in_one_line_and_keeps_every_output(case_id, ready, servers, tmp_path):
    check(attempt(SLOW[case_id], ready, servers, tmp_path))


def test_the_catalogue_is_large_and_covers_every_category():
    assert len(CASES) >= 50
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.category for c in CASES} == set(CATEGORIES)


def test_the_guide_table_is_the_catalogue():
    guide = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    assert render_table() in guide, "docs/guide.md is out of date: paste the output of `python tests/bad_inputs.py`"


def test_the_hub_token_reaches_no_output(ready):
    leaks = [str(p) for root in OUTPUT_ROOTS for p in (ready / root).rglob("*")
             if p.is_file() and SECRET_TOKEN.encode() in p.read_bytes()]  # fmt: skip
    assert not leaks


def test_a_redirect_is_followed_and_the_pinned_hash_still_checked(servers, tmp_path):
    from stages.lib.core.params import NetworkParams
    from stages.lib.data.read import SourceError
    from stages.lib.data.sources import download_url

    good = jsonl(GOOD).encode()
    path = download_url(f"{servers['url']}/redirect-good", hashlib.sha256(good).hexdigest(), tmp_path / "a.jsonl",
                        NetworkParams())  # fmt: skip
    assert path.read_bytes() == good
    with pytest.raises(SourceError, match="sha256 mismatch"):
        download_url(f"{servers['url']}/redirect-good", "0" * 64, tmp_path / "b.jsonl", NetworkParams())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]  # nothing partial left


@pytest.mark.parametrize("config", ["config.json", "tokenizer_config.json"])
def test_custom_code_answered_yes_on_stdin_runs_none_of_it(config, ready, tmp_path):
    """A model (or tokenizer) folder whose auto_map points at a .py file that leaves a marker when imported, and a
    pipe that answers transformers' "run the custom code? [y/N]" with y: download refuses it, naming the file and
    model.trust_remote_code, and nothing of the code runs."""
    from bad_inputs import custom_code

    repo = tmp_path / "repo"
    shutil.copytree(ready, repo, symlinks=True, ignore=shutil.ignore_patterns(".git", ".dvc"))
    model = repo / "models" / "sources" / "m"
    shutil.copytree(repo / "models" / "base", model)
    custom_code(config)(model)
    subprocess.run([sys.executable, "-c", "import evil"], cwd=model, check=True)  # the marker works
    (model / "pwned").unlink()
    set_params(repo, **{"model.tokenizer" if config.startswith("tokenizer") else "model.path": "models/sources/m"})
    before = digests(repo)
    proc = subprocess.run([sys.executable, "-m", "stages.download"], cwd=repo, input="y\ny\ny\n", capture_output=True,
                          text=True, env=env_with_venv() | {"PYTHONPATH": str(repo)}, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"error: model.") and f"models/sources/m/{config} has an auto_map" in proc.stderr
    assert "model.trust_remote_code is false" in proc.stderr
    assert not list(repo.rglob("pwned")) and digests(repo) == before
    assert not list((repo / "models" / "base").glob("*.py"))


def test_a_swap_cut_short_by_a_kill_is_completed_and_stale_temp_folders_go(tmp_path, monkeypatch):
    """The journal of a killed stage's swap is rolled forward by the next start; temp folders of dead processes
    of this host are removed, those of live ones stay."""
    from stages.lib.core import outputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s: {cmd: x, outs: [data/raw, data/base]}\n")
    for name in ("raw", "base"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "v").write_text("old")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staged = outputs.StagedOutputs()
    for name in ("raw", "base"):
        (staged.dir(Path("data") / name) / "v").write_text("new")
    for i, (tmp, final) in enumerate(staged.pairs):  # as the dead process named them
        staged.pairs[i] = (tmp.rename(str(tmp).replace(f"-{os.getpid()}-", f"-{dead.pid}-")), final)
    # the killed stage renamed data/raw, then died before data/base: what its journal and folders look like
    outputs.write_json(outputs.JOURNAL, {"host": socket.gethostname(), "pid": dead.pid,
                                         "pairs": [[str(t), str(f)] for t, f in staged.pairs]})  # fmt: skip
    outputs.replace_path(*staged.pairs[0])
    stale = Path("data") / f".tokenized.tmp-{outputs.host_tag()}-{dead.pid}-abc"
    live = Path("data") / f".tokenized.tmp-{outputs.host_tag()}-{os.getpid()}-abc"
    for folder in (stale, live):
        folder.mkdir()
    done = outputs.recover()
    assert [(tmp_path / "data" / n / "v").read_text() for n in ("raw", "base")] == ["new", "new"]
    assert not outputs.JOURNAL.exists() and not stale.exists() and live.exists()
    assert len(done) == 2
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(["raw", "base", live.name])


def forged_journals(tmp_path: Path) -> dict[str, object]:
    """Journals no stage wrote, each of which would move or delete something if obeyed."""
    from stages.lib.core import outputs

    host, dead = socket.gethostname(), 2**22 + 7  # above any pid_max: no such process
    link = Path("data") / f".raw.tmp-{outputs.host_tag()}-{dead}-abc"
    link.symlink_to(tmp_path / "outside", target_is_directory=True)
    journal = {"host": host, "pid": dead}
    return {
        "outside": journal | {"pairs": [[str(tmp_path / "outside"), "data/raw"]]},
        "link-beside": journal | {"pairs": [[str(link), "data/raw"]]},
        "not-an-output": journal | {"pairs": [["data/.sources.tmp-x-1-abc", "data/sources"]]},
        "escaping": journal | {"pairs": [["data/.x.tmp-x-1-abc", "data/../../x"]]},
        "other-writer": journal | {"pairs": [[f"data/.raw.tmp-{outputs.host_tag()}-{dead + 1}-abc", "data/raw"]]},
        "shape": {"host": host, "pid": str(dead), "pairs": []},
        "list": [["data/.raw.tmp-x-1-abc", "data/raw"]],
        "garbled": '{"host": "x", "pid": 1, "pairs": [["data/.raw',
    }


@pytest.mark.parametrize("kind", ["outside", "link-beside", "not-an-output", "escaping", "other-writer", "shape", "list",
                                  "garbled"])  # fmt: skip
def test_a_forged_or_garbled_journal_moves_nothing(kind, tmp_path, monkeypatch):
    """A journal is checked whole before any rename: its shape, and each pair an output dvc.yaml declares with
    the temp path its writer (host, pid) would have made beside it. Anything else is one error naming the file."""
    from stages.lib.core import outputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s: {cmd: x, outs: [data/raw, data/base]}\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "v").write_text("not the project's")
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "v").write_text("the real one")
    journal = forged_journals(tmp_path)[kind]
    outputs.JOURNAL.write_text(journal if isinstance(journal, str) else json.dumps(journal))
    with pytest.raises(outputs.JournalError) as exc:
        outputs.recover()
    message = str(exc.value)
    assert "\n" not in message and message.startswith(".outputs-journal.json ") and "delete it" in message
    assert (tmp_path / "data" / "raw" / "v").read_text() == "the real one"
    assert (tmp_path / "outside" / "v").read_text() == "not the project's"
    assert outputs.JOURNAL.exists()  # left for the user to look at


def test_a_journal_the_stage_wrote_passes_the_check(tmp_path, monkeypatch):
    """Every kind of temp path StagedOutputs makes (a folder, a file, one the stage added) passes read_journal."""
    from stages.lib.core import outputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s: {cmd: x, outs: [data/raw, m/a.json, models/adapter]}\n")
    staged = outputs.StagedOutputs()
    staged.dir("data/raw")
    staged.file("m/a.json").write_text("{}")
    Path("models").mkdir()
    staged.add(Path("models/.adapter.partial"), Path("models/adapter"))
    outputs.write_json(outputs.JOURNAL, {"host": socket.gethostname(), "pid": os.getpid(),
                                         "pairs": [[str(t), str(f)] for t, f in staged.pairs]})  # fmt: skip
    assert outputs.read_journal()["pairs"][1] == [str(staged.pairs[1][0]), "m/a.json"]
