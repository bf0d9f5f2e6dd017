"""Download sources: a pinned URL (local HTTP server), a Hub model from the cache, the remote-code opt-in (local
files and the data layer: tests/test_data.py)."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import default_params

from stages.lib.core.params import ParamsError, validate
from stages.lib.data.read import SourceError
from stages.lib.data.sources import open_source

RECORDS = [{"instruction": "说你好", "input": "", "output": "你好"}, {"instruction": "Say hi", "input": "x", "output": "hi"}]


def write_all_formats(folder: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {s: folder / f"data.{s}" for s in ("json", "jsonl", "csv", "parquet")}
    paths["json"].write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(RECORDS[0]))
        writer.writeheader()
        writer.writerows(RECORDS)
    pq.write_table(pa.Table.from_pylist(RECORDS), paths["parquet"])
    return paths


@pytest.fixture
def http_server(tmp_path):
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def data_params(source: dict):
    raw = default_params()
    raw["data"]["sources"] = [source]
    return validate(raw)


def test_url_source_checks_the_pinned_sha256(tmp_path, http_server):
    path = write_all_formats(tmp_path)["jsonl"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    work = tmp_path / "work" / "source-0"  # as download passes it: not created yet
    params = data_params({"kind": "url", "url": f"{http_server}/data.jsonl", "sha256": digest})
    ds, origin = open_source(params.data.sources[0], 0, work)
    assert ds.to_list() == RECORDS and origin["sha256"] == digest
    wrong = data_params({"kind": "url", "url": f"{http_server}/data.jsonl", "sha256": "0" * 64})
    with pytest.raises(SourceError, match="sha256 mismatch"):
        open_source(wrong.data.sources[0], 0, work)
    assert not list(work.glob("*.part"))  # a wrong download is not left behind
    (tmp_path / "export").write_bytes(path.read_bytes())  # a URL without an extension: the type from the content
    ds, _ = open_source(data_params({"kind": "url", "url": f"{http_server}/export", "sha256": digest}).data.sources[0], 0, work)
    assert ds.to_list() == RECORDS
    with pytest.raises(SourceError, match=r"^http://127.0.0.1:\d+/missing.json could not be downloaded: HTTP 404 File not found; check the URL$"):
        open_source(data_params({"kind": "url", "url": f"{http_server}/missing.json", "sha256": digest}).data.sources[0], 0,
                    work)  # fmt: skip


def test_hub_model_comes_from_the_pinned_revision_in_the_cache(tmp_path, monkeypatch):
    """The real snapshot_download call, offline, against a Hub cache laid out as huggingface_hub lays it out."""
    from stages.download import fetch_hub
    from stages.lib.core.recipes import model_recipe

    recipe = model_recipe("qwen2.5-7b-instruct")
    repo, revision = recipe.source.repo, recipe.source.revision
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, content in {"config.json": "{}", "model.safetensors": "w", "pytorch_model.bin": "p", "tok.py": "x"}.items():
        (snapshot / name).write_text(content)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "base"
    out.mkdir()
    origin = fetch_hub(recipe.source, recipe, validate(default_params()), out)
    assert origin == {"kind": "hub", "repo": repo, "revision": revision}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no pickles, no code


def test_a_recipe_that_needs_remote_code_is_refused_without_opt_in(tmp_path):
    from stages.download import check_inputs

    raw = default_params()
    raw["model"] |= {"recipe": "chatglm2-6b", "convert": False}
    with pytest.raises(ParamsError, match="set model.trust_remote_code true"):
        check_inputs(validate(raw))
