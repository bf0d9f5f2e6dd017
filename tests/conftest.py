"""Shared helpers: the project root, ../shared/data when present, and running commands in a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
AUDIT = Path(__file__).parent / "file_audit"  # a sitecustomize that records the files each process reads


def env_with_venv() -> dict:
    """PATH with this interpreter's bin first, so dvc.yaml's `python` is the one running the tests."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def env_with_project() -> dict:
    """env_with_venv, with the project importable; an existing PYTHONPATH (the GPU image's staged wheels) stays."""
    env = env_with_venv()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env_with_venv() | (env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def dvc(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=check, env=env)


def clone(dest: Path) -> Path:
    """A fresh clone of the committed project, as a user or CI gets it."""
    run(["git", "clone", "-q", str(ROOT), str(dest)], cwd=ROOT)
    run(["git", "config", "user.email", "test@example.com"], cwd=dest)
    run(["git", "config", "user.name", "test"], cwd=dest)
    return dest


def edit_params(repo: Path, **changes) -> None:
    """Set dotted keys in repo/params.yaml (comments are not kept)."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = params
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))


@dataclass(frozen=True)
class DefaultRun:
    repo: Path  # the clone `dvc repro` ran in, committed; tests may edit it and must put it back
    outputs: Path  # a copy of its models/, data/tokenized and eval/generations.jsonl, as the run left them


DEFAULT_RUN_OUTPUTS = ("models/base", "models/adapter", "models/merged", "data/tokenized", "eval/generations.jsonl")


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> DefaultRun:
    """The default pipeline, run once per test session: `dvc repro` in a fresh clone, with the file audit hook
    (repo/.audit/ lists the files each stage process read), committed. `outputs` is a copy of its outputs taken
    at once, which later edits of the clone (experiments, bad params) cannot change: a project folder from which
    `python -m stages.chat` and `python -m stages.serve` run as a user runs them."""
    repo = clone(tmp_path_factory.mktemp("pipeline") / "repo")
    (repo / ".audit").mkdir()
    audit = {"PYTHONPATH": str(AUDIT), "FILE_AUDIT_DIR": str(repo / ".audit")}
    dvc("repro", cwd=repo, env=audit)
    (repo / ".git" / "info" / "exclude").write_text(".audit/\n")
    run(["git", "add", "-A"], cwd=repo)
    run(["git", "commit", "-qm", "first run", "--allow-empty"], cwd=repo)  # empty: the run reproduced every file
    outputs = tmp_path_factory.mktemp("default-run-outputs")
    for name in DEFAULT_RUN_OUTPUTS:
        (outputs / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (repo / name).is_dir() else shutil.copyfile)(repo / name, outputs / name)
    return DefaultRun(repo, outputs)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


def default_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def assert_merged_prompts_are_the_training_prompts(repo: Path, reasoning: str = "train") -> None:
    """models/merged's chat template, given each validation record's messages and tools as an OpenAI client
    sends them, rebuilds its prompt id for id, and generation stops at EOS."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, GenerationConfig

    from stages.lib.chat.conversation import template_messages, template_tools, trained_answers

    tokenizer = AutoTokenizer.from_pretrained(repo / "models" / "merged")
    rows = load_from_disk(str(repo / "data" / "tokenized"))["validation"]
    assert len(rows) > 0
    for row in rows:
        turns = row["messages"][: trained_answers(row["messages"], True)[-1]]
        got = tokenizer.apply_chat_template(template_messages(turns, reasoning), tools=template_tools(row["tools"]),
                                            add_generation_prompt=True, tokenize=True)  # fmt: skip
        got = list(got["input_ids"] if hasattr(got, "keys") else got)
        assert got == row["input_ids"][: row["prompt_length"]], tokenizer.decode(got)
    stops = GenerationConfig.from_pretrained(repo / "models" / "merged").eos_token_id
    assert tokenizer.eos_token_id in ([stops] if isinstance(stops, int) else stops)


def data_source(fmt: str = "alpaca", **options):
    """A validated local source of `fmt` (the path is never read)."""
    from stages.lib.core.params import validate

    raw = default_params()
    raw["data"]["sources"] = [{"kind": "local", "path": "data/sources/x.jsonl", "format": fmt, **options}]
    return validate(raw).data.sources[0]


def normalized(records: list[dict], fmt: str = "alpaca", **options) -> dict:
    """The download stage's normalizer over `records` (messages, tools, drop, key, record, source per record);
    messages as data/raw holds them (keys that do not apply left out)."""
    from stages.lib.data.normalize import Normalizer

    columns = sorted({k for r in records for k in r})
    batch = {c: [r.get(c) for r in records] for c in columns}
    out = Normalizer(data_source(fmt, **options), "x", columns)(batch, list(range(len(records))))
    out["messages"] = [[{k: v for k, v in t.items() if v is not None} for t in m] for m in out["messages"]]
    return out


def conversations(records: list[dict], fmt: str = "alpaca", **options) -> list[list[dict]]:
    """Records of one format → chat messages, through the download stage's normalizer (a drop fails)."""
    out = normalized(records, fmt, **options)
    assert not any(out["drop"]), out["drop"]
    return out["messages"]


def write_raw(folder: Path, train: list[list[dict]], validation: list[list[dict]], fmt: str = "chat") -> None:
    """data/raw as the download stage writes it, from conversations."""
    import json

    raw = folder / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation)):
        lines = [json.dumps({"messages": m, "record": i, "source": "x"}, ensure_ascii=False) + "\n" for i, m in enumerate(rows)]
        (raw / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
    counts = {"read": len(train) + len(validation), "kept": len(train) + len(validation), "dropped": {},
              "train": len(train), "validation": len(validation)}  # fmt: skip
    (raw / "manifest.json").write_text(json.dumps({"format": fmt, "sources": {"x": counts}}))
