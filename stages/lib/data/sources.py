"""Where training records come from: the built-in task, a local file or folder, a pinned URL or a Hub dataset."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from ..core.params import BuiltinSource, DataSource, HubSource, LocalSource, ParamsError, UrlSource
from .read import SourceError, read_table
from .toy_task import BUILTIN

DATA_SOURCES = Path("data/sources")  # a dependency of the download stage in dvc.yaml
MODEL_SOURCES = Path("models/sources")


def tracked_path(value: str, key: str, root: Path) -> Path:
    """`value` as a path inside `root` (a folder dvc.yaml declares), else ParamsError naming `key` and the fix.

    A file outside the declared folders is invisible to DVC: editing it would never make the stage stale, and
    dvc.lock could not say which data a run used.
    """
    path = Path(value)
    try:  # lexically: a file `dvc add` turned into a link into DVC's cache is still inside
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    except ValueError:
        raise ParamsError(
            f"{key} {value} is outside {root}/, so DVC would never see it change: copy it there (for a large or "
            f"shared one, `dvc add {root}/<name>` after copying) and set {key}: {root}/{path.name}"
        ) from None
    return path


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
        raise SourceError(f"sha256 mismatch for {url}: expected {sha256}, got {digest.hexdigest()} (data.sources.N.sha256)")
    tmp.rename(dest)
    return dest


def label(src: DataSource) -> str:
    """The source's name in counts and errors: `name`, else the file's stem, the Hub repo's name or the builtin's."""
    if src.name:
        return src.name
    if isinstance(src, LocalSource):
        return Path(src.path).stem
    if isinstance(src, UrlSource):
        return Path(urllib.request.urlparse(src.url).path).stem or "url"
    return src.repo.rsplit("/", 1)[-1]


def open_source(src: DataSource, seed: int, workdir: Path):
    """The source's records as a `datasets.Dataset` and a description of where they came from (the manifest's)."""
    import datasets

    if isinstance(src, BuiltinSource):
        return datasets.Dataset.from_list(BUILTIN[src.name](seed)), {"kind": "builtin", "name": src.name, "seed": seed}
    if isinstance(src, LocalSource):
        return read_table(Path(src.path), workdir / "cache"), {"kind": "local", "path": src.path}
    if isinstance(src, UrlSource):
        name = Path(urllib.request.urlparse(src.url).path).name or "data.json"
        path = download_url(src.url, src.sha256, workdir / name)
        return read_table(path, workdir / "cache"), {"kind": "url", "url": src.url, "sha256": src.sha256}
    if isinstance(src, HubSource):
        ds = datasets.load_dataset(src.repo, src.subset, split=src.split, revision=src.revision)
        return ds, {"kind": "hub", "repo": src.repo, "revision": src.revision, "split": src.split}
    raise AssertionError(src)
