"""Where training records come from: the built-in task, a local file, a pinned URL or a Hub dataset."""

from __future__ import annotations

import csv
import hashlib
import json
import urllib.request
from pathlib import Path

from .errors import UserError
from .params import BuiltinSource, DataParams, HubSource, LocalSource, UrlSource
from .toy_task import BUILTIN

READERS = {".json", ".jsonl", ".csv", ".parquet"}


class SourceError(UserError):
    pass


def read_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise SourceError(f"data file {path} does not exist")
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise SourceError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        return data
    if suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise SourceError(f"{path}: unsupported data file type '{suffix}' (use one of {', '.join(sorted(READERS))})")


def download_url(url: str, sha256: str, dest: Path) -> Path:
    """Stream `url` to `dest`, failing unless its sha256 is the pinned one."""
    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise SourceError(f"data.source.sha256 mismatch for {url}: expected {sha256}, got {digest.hexdigest()}")
    tmp.rename(dest)
    return dest


def fetch_records(data: DataParams, seed: int, workdir: Path) -> tuple[list[dict], dict]:
    """The raw records and a description of where they came from (for the manifest)."""
    src = data.source
    if isinstance(src, BuiltinSource):
        return BUILTIN[src.name](seed), {"kind": "builtin", "name": src.name, "seed": seed}
    if isinstance(src, LocalSource):
        path = Path(src.path)
        return read_records(path), {"kind": "local", "path": src.path}
    if isinstance(src, UrlSource):
        name = Path(urllib.request.urlparse(src.url).path).name or "data.json"
        path = download_url(src.url, src.sha256, workdir / name)
        records = read_records(path)
        path.unlink()
        return records, {"kind": "url", "url": src.url, "sha256": src.sha256}
    if isinstance(src, HubSource):
        import datasets

        ds = datasets.load_dataset(src.repo, src.subset, split=src.split, revision=src.revision)
        return ds.to_list(), {"kind": "hub", "repo": src.repo, "revision": src.revision, "split": src.split}
    raise AssertionError(src)
