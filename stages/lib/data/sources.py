"""Where training records come from: the built-in task, a local file or folder, a pinned URL or a Hub dataset."""

from __future__ import annotations

import codecs
import hashlib
import math
import os
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

from ..core.params import BuiltinSource, DataSource, HubSource, LocalSource, NetworkParams, UrlSource
from ..core.urls import mask_url, mask_urls
from .read import BUILDERS, SourceError, not_text, read_table
from .toy_task import BUILTIN

DATA_SOURCES = Path("data/sources")  # a dependency of the download stage in dvc.yaml
MODEL_SOURCES = Path("models/sources")


RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}  # worth another try; any other HTTP error is final


class _Retry(Exception):
    pass


def download_url(url: str, sha256: str, dest: Path, net: NetworkParams) -> Path:
    """Stream `url` to `dest`, failing unless its sha256 is the pinned one. A name without a known extension gets
    one from the content (JSON, Parquet; CSV is not guessed: SourceError).

    Limits come from params `network`: connect and read timeouts (seconds), a deadline for the whole file (so a
    server trickling one byte at a time cannot hang the stage) and `retries` after a refused connection, a timeout
    or HTTP 408/429/5xx, with 1, 2, 4 ... s pauses. Every failure is a SourceError naming the URL (its password and
    query values masked); the partial file is removed, so nothing half-downloaded is ever read.
    """
    import time

    shown = mask_url(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    for attempt in range(net.retries + 1):
        try:
            digest = _fetch(url, tmp, net)
            break
        except _Retry as exc:
            tmp.unlink(missing_ok=True)
            if attempt == net.retries:
                tries = f" (tried {attempt + 1} times; network.retries: {net.retries})" if net.retries else ""
                raise SourceError(f"{shown} could not be downloaded: {mask_urls(str(exc))}{tries}") from None
            time.sleep(min(2**attempt, 30))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if digest != sha256:
        tmp.unlink()
        raise SourceError(f"sha256 mismatch for {shown}: the source pins {sha256}, the download is {digest}")
    if dest.suffix.lower() not in BUILDERS:
        with open(tmp, "rb") as f:
            head = f.read(4096)
        text = head.lstrip(codecs.BOM_UTF8).lstrip()
        suffix = ".parquet" if text[:4] == b"PAR1" else ".json" if text[:1] in (b"{", b"[") else None
        if suffix is None:
            tmp.unlink()
            what = not_text(head, dest.name)
            raise SourceError(f"{shown} {what}" if what else f"{shown}: cannot tell the file type from its name or "
                              f"content; serve it with one of the extensions {', '.join(sorted(BUILDERS))}")
        dest = dest.with_name(dest.name + suffix)
    tmp.rename(dest)
    return dest


def _fetch(url: str, tmp: Path, net: NetworkParams) -> str:
    """One attempt: the file's sha256 once it is all in `tmp`. _Retry for what may pass, SourceError otherwise (an
    HTTP 4xx, a redirect to no http(s) URL or with a broken Location: trying again gets the same answer)."""
    import time

    import httpx

    timeout = httpx.Timeout(net.read_timeout_s, connect=net.connect_timeout_s)
    deadline = time.monotonic() + net.deadline_minutes * 60
    digest = hashlib.sha256()
    shown = mask_url(url)
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response, open(tmp, "wb") as out:
            if response.status_code in RETRY_STATUS:
                raise _Retry(f"HTTP {response.status_code} {response.reason_phrase}")
            if response.status_code >= 400:
                raise SourceError(f"{shown} could not be downloaded: HTTP {response.status_code} "
                                  f"{response.reason_phrase}; check the URL")  # fmt: skip
            for chunk in response.iter_bytes():  # as it arrives: a trickle must reach the deadline check
                digest.update(chunk)
                out.write(chunk)
                if time.monotonic() > deadline:
                    raise _Retry(f"not complete after network.deadline_minutes ({net.deadline_minutes}); "
                                 f"{out.tell()} bytes arrived")  # fmt: skip
    except httpx.TimeoutException as exc:
        kind = "connect" if isinstance(exc, httpx.ConnectTimeout) else "read"
        limit = net.connect_timeout_s if kind == "connect" else net.read_timeout_s
        raise _Retry(f"no answer within network.{kind}_timeout_s ({limit} s)") from None
    except httpx.UnsupportedProtocol as exc:  # params allow only http(s) URLs: a redirect led to another scheme
        raise SourceError(f"{shown} redirects to {_requested(exc)}, which is not an http(s) URL: give the address "
                          "the file is served from over http(s)") from None  # fmt: skip
    except httpx.RemoteProtocolError as exc:
        if "location header" in str(exc):  # a redirect to a malformed URL: the same on every try
            raise SourceError(f"{shown} could not be downloaded: it redirects to a malformed URL "
                              f"({mask_urls(str(exc))})") from None  # fmt: skip
        raise _Retry(f"{type(exc).__name__}: {mask_urls(str(exc))}") from None  # a dropped connection may pass
    except httpx.TransportError as exc:  # refused, reset, DNS, TLS
        raise _Retry(f"{type(exc).__name__}: {mask_urls(str(exc))}") from None
    except (httpx.RequestError, httpx.InvalidURL) as exc:  # too many redirects, undecodable body, a bad URL
        raise SourceError(f"{shown} could not be downloaded: {type(exc).__name__}: {mask_urls(str(exc))}") from None
    return digest.hexdigest()


def _requested(exc) -> str:
    """The (masked) URL an httpx request error was about: the redirect's target for a redirect."""
    try:
        return mask_url(str(exc.request.url))
    except RuntimeError:  # httpx raises this when the error carries no request
        return "a URL"


def hub_limits(net: NetworkParams) -> None:
    """Apply params `network` to huggingface_hub (read once, at its import: call this before importing it)."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(math.ceil(net.connect_timeout_s)))  # whole seconds only
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(math.ceil(net.read_timeout_s)))


@contextmanager
def hub_errors(what: str):
    """Turn the Hub's and datasets' failures (not found, offline without a cache, HTTP, timeouts) into one
    SourceError line naming `what`."""
    import httpx
    from datasets.exceptions import DatasetsError

    try:
        yield
    except (OSError, ValueError, DatasetsError, httpx.HTTPError) as exc:
        first = mask_urls((str(exc).strip().splitlines() or [""])[0][:240])
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        hint = "; HF_HUB_OFFLINE is set: fill the Hub cache once with network access" if offline else ""
        raise SourceError(f"{what} could not be loaded: {type(exc).__name__}: {first}{hint}") from None


def url_path(url: str) -> Path:
    """The path part of `url` (never raises: params checked the URL, and a malformed one gives an empty path)."""
    try:
        return Path(urllib.parse.urlsplit(url).path)
    except ValueError:
        return Path()


def label(src: DataSource) -> str:
    """The source's name in counts and errors: `name`, else the file's stem, the Hub repo's name or the builtin's."""
    if src.name:
        return src.name
    if isinstance(src, LocalSource):
        return Path(src.path).stem
    if isinstance(src, UrlSource):
        return url_path(src.url).stem or "url"
    return src.repo.rsplit("/", 1)[-1]


def open_source(src: DataSource, seed: int, workdir: Path, net: NetworkParams = NetworkParams()):
    """The source's records as a `datasets.Dataset` and a description of where they came from (the manifest's)."""
    import datasets

    if isinstance(src, BuiltinSource):
        return datasets.Dataset.from_list(BUILTIN[src.name](seed)), {"kind": "builtin", "name": src.name, "seed": seed}
    if isinstance(src, LocalSource):
        return read_table(Path(src.path), workdir / "cache"), {"kind": "local", "path": src.path}
    if isinstance(src, UrlSource):
        name = url_path(src.url).name or "data.json"
        name = name if len(name) <= 100 else name[-100:]  # a file name has at most 255 bytes; the suffix is kept
        path = download_url(src.url, src.sha256, workdir / name, net)
        try:
            ds = read_table(path, workdir / "cache")
        except SourceError as exc:  # about the content: name the URL, not the scratch copy (deleted by then)
            raise SourceError(str(exc).replace(str(path), mask_url(src.url))) from None
        return ds, {"kind": "url", "url": src.url, "sha256": src.sha256}
    if isinstance(src, HubSource):
        with hub_errors(f"hub dataset {src.repo}@{src.revision} (split {src.split})"):
            ds = datasets.load_dataset(src.repo, src.subset, split=src.split, revision=src.revision)
        return ds, {"kind": "hub", "repo": src.repo, "revision": src.revision, "split": src.split}
    raise AssertionError(src)
