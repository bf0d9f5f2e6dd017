"""Download sources: a pinned URL (local HTTP server), a Hub model from the cache, the remote-code opt-in (local
files and the data layer: tests/test_data.py)."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
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


@pytest.mark.parametrize("url, shown", [
    ("http://user:pass@host/x.jsonl", "http://***@host/x.jsonl"),
    ("https://host/x.jsonl?token=SuperSecret&v=2#part", "https://host/x.jsonl?token=***&v=***#part"),
    ("https://:tok@host:8080/a?SuperSecret", "https://***@host:8080/a?***"),
    ("http://[::1/x.jsonl?key=SuperSecret", "http://[::1/x.jsonl?key=***"),  # malformed: masked all the same
    ("https://host/plain.jsonl", "https://host/plain.jsonl"),
])  # fmt: skip
def test_urls_are_shown_without_credentials(url, shown):
    from stages.lib.core.urls import mask_url, mask_urls

    assert mask_url(url) == shown
    assert mask_urls(f"Redirect location '{url}' for url '{url}'") == f"Redirect location '{shown}' for url '{shown}'"


def test_url_and_hash_fields_take_what_people_paste_and_refuse_what_cannot_work():
    upper = data_params({"kind": "url", "url": "https://host/x.jsonl", "sha256": "AB" * 32})
    assert upper.data.sources[0].sha256 == "ab" * 32
    hub = data_params({"kind": "hub", "repo": "org/set", "revision": "ABCDEF0123" * 4})
    assert hub.data.sources[0].revision == "abcdef0123" * 4
    for url, message in [
        ("http://[::1/x.jsonl", r"'data.sources.0.url': not a usable download URL: Invalid IPv6 URL"),
        ("http://host:99999/x.jsonl", r"'data.sources.0.url': not a usable download URL: Port out of range"),
        ("https:///x.jsonl", r"'data.sources.0.url': not a usable download URL: it names no host"),
        ("ftp://user:SuperSecret@host/x?token=SuperSecret",
         r"must start with http:// or https:// \(got 'ftp://\*\*\*@host/x\?token=\*\*\*'\)$"),
    ]:  # fmt: skip
        with pytest.raises(ParamsError, match=message) as err:
            data_params({"kind": "url", "url": url, "sha256": "0" * 64})
        assert "\n" not in str(err.value) and "SuperSecret" not in str(err.value)
    with pytest.raises(ParamsError, match=r"'data.sources.0.sha256': must be the file's SHA-256, 64 hex digits"):
        data_params({"kind": "url", "url": "https://host/x.jsonl", "sha256": "0" * 63})
    with pytest.raises(ParamsError, match=r"'data.sources.0.revision': must be a full commit hash, 40 hex digits"):
        data_params({"kind": "hub", "repo": "org/set", "revision": "main"})


def test_a_source_label_never_raises():
    from stages.lib.core.params import UrlSource
    from stages.lib.data.sources import label

    src = UrlSource.model_construct(kind="url", url="http://[::1/x.jsonl", sha256="0" * 64, name=None)
    assert label(src) == "url"


def test_errors_about_downloaded_content_name_the_url_masked_never_the_scratch_copy(tmp_path, http_server):
    html = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body></body></html>\n"
    (tmp_path / "page.jsonl").write_bytes(html)
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{\n")
    work = tmp_path / "work" / "source-0"
    host = http_server.removeprefix("http://")
    for name, content, message in [
        ("page.jsonl?v=SuperSecret", html, r"page.jsonl\?v=\*\*\* is an HTML page, not data"),
        ("bad.jsonl", (tmp_path / "bad.jsonl").read_bytes(), r"bad.jsonl cannot be read as json: line 2 is not valid"),
    ]:  # fmt: skip
        digest = hashlib.sha256(content).hexdigest()
        src = {"kind": "url", "url": f"http://user:SuperSecret@{host}/{name}", "sha256": digest}
        with pytest.raises(SourceError, match=rf"^http://\*\*\*@{re.escape(host)}/{message}") as err:
            open_source(data_params(src).data.sources[0], 0, work)
        assert str(work) not in str(err.value) and "SuperSecret" not in str(err.value)
    secret = f"http://user:SuperSecret@{host}/missing.json?token=SuperSecret"
    with pytest.raises(SourceError, match=rf"^http://\*\*\*@{re.escape(host)}/missing.json\?token=\*\*\* could not be "
                                          r"downloaded: HTTP 404"):  # fmt: skip
        open_source(data_params({"kind": "url", "url": secret, "sha256": "0" * 64}).data.sources[0], 0, work)


class Redirect(BaseHTTPRequestHandler):
    LOCATIONS = {"/to-ftp": "ftp://user:SuperSecret@files.example/x.jsonl?token=SuperSecret",
                 "/to-bad": "http://[::1/x"}

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.LOCATIONS[self.path])
        self.end_headers()


def test_a_redirect_that_cannot_work_fails_at_once_naming_where_it_leads(tmp_path):
    from stages.lib.core.params import NetworkParams
    from stages.lib.data.sources import download_url

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for path, message in [
            ("/to-ftp", r"/to-ftp redirects to ftp://\*\*\*@files.example/x.jsonl\?token=\*\*\*, which is not "
                        r"an http\(s\) URL"),
            ("/to-bad", r"/to-bad could not be downloaded: it redirects to a malformed URL"),
        ]:  # fmt: skip
            start = time.monotonic()
            with pytest.raises(SourceError, match=message) as err:
                download_url(base + path, "0" * 64, tmp_path / "x.jsonl", NetworkParams(retries=2))
            assert time.monotonic() - start < 1, "retried: a redirect's target does not change on a second try"
            assert "tried" not in str(err.value) and "SuperSecret" not in str(err.value)
    finally:
        server.shutdown()
