"""Where training records come from: the built-in task, a local file or folder, a pinned URL or a Hub dataset."""

from __future__ import annotations

import codecs
import hashlib
import os
import urllib.request
from pathlib import Path

from ..core.params import BuiltinSource, DataSource, HubSource, LocalSource, ParamsError, UrlSource
from .read import BUILDERS, SourceError, read_table
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
    files = [path, *(path.rglob("*") if path.is_dir() else [])]
    for f in files:
        target = f.resolve()
        inside = target.is_relative_to(root.resolve()) or "md5" in target.parts  # or DVC's cache (files/md5/..)
        if not inside:  # the lexical check passed: a link on the way leads out
            raise ParamsError(
                f"{key}: {f} leads to {target}, outside {root}/; DVC does not follow such links, so it would "
                f"never see that data change: copy it into {root}/ instead (`dvc add` it if large)"
            )
    return path


def download_url(url: str, sha256: str, dest: Path) -> Path:
    """Stream `url` to `dest`, failing unless its sha256 is the pinned one. A name without a known extension gets
    one from the content (JSON, Parquet, else CSV is not guessed: SourceError)."""
    import urllib.error

    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:  # HTTPError is a URLError; timeouts and resets are OSErrors
        tmp.unlink(missing_ok=True)
        detail = f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", exc)
        raise SourceError(f"{url} could not be downloaded: {detail}") from None
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise SourceError(f"sha256 mismatch for {url}: the source pins {sha256}, the download is {digest.hexdigest()}")
    if dest.suffix.lower() not in BUILDERS:
        head = tmp.read_bytes()[:4096].lstrip(codecs.BOM_UTF8).lstrip()
        suffix = ".parquet" if head[:4] == b"PAR1" else ".json" if head[:1] in (b"{", b"[") else None
        if suffix is None:
            raise SourceError(f"{url}: cannot tell the file type from its name or content; serve it with one of the "
                              f"extensions {', '.join(sorted(BUILDERS))}")  # fmt: skip
        dest = dest.with_name(dest.name + suffix)
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
