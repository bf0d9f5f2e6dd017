"""Local data files → an Arrow-backed `datasets.Dataset`, whatever the layout a real export has.

JSON (an array or one object per line, whatever the extension), CSV, TSV, Parquet, Arrow, or a folder of such
files are read by `datasets`' builders, memory-mapped, so a million records never sit in Python lists. Text
files must be UTF-8 (a BOM is fine): anything else fails with one line naming the file, the byte and the fix.
"""

from __future__ import annotations

import codecs
import csv
from pathlib import Path

from ..core.errors import UserError

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SAVED_METADATA = {"dataset_info.json", "state.json", "dataset_dict.json"}
TRACKED_HINT = (
    "; `dvc exp run --temp/--queue` copies only files tracked by git or DVC into the run: track it with "
    "`dvc add <file>` (or git add) first"
)


class SourceError(UserError):
    pass


def data_files(path: Path) -> list[Path]:
    """The readable files of `path` (a file, or a folder searched recursively), all of one builder."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))  # fmt: skip
        if (path / "dataset_dict.json").exists():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").exists())
            raise SourceError(f"{path} is a saved DatasetDict with splits {', '.join(splits)}: point the path at one "
                              f"split's folder ({path}/{splits[0] if splits else 'train'})")  # fmt: skip
        if any(p.suffix == ".arrow" for p in files):  # a Dataset.save_to_disk folder: its JSON files are metadata
            files = [p for p in files if p.name not in SAVED_METADATA]
        if not files:
            raise SourceError(f"data folder {path} holds no {', '.join(sorted(BUILDERS))} file")
        kinds = sorted({p.suffix.lower() for p in files})
        if len({k.replace(".jsonl", ".json") for k in kinds}) > 1:
            raise SourceError(f"data folder {path} mixes file types ({', '.join(kinds)}): use one type per source")
        return files
    if not path.exists():
        raise SourceError(f"data file {path} does not exist{TRACKED_HINT}")
    if path.suffix.lower() not in BUILDERS:
        raise SourceError(f"{path}: unsupported data file type '{path.suffix}' (use one of {', '.join(sorted(BUILDERS))})")
    return [path]


def check_utf8(path: Path) -> None:
    """Raise SourceError naming the byte offset and line of the first invalid UTF-8 sequence (UTF-16 named)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    with open(path, "rb") as f:
        head = f.read(4096)
        if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            raise SourceError(f"{path} is UTF-16 text: re-save it as UTF-8 (iconv -f UTF-16 -t UTF-8)")
        if b"\x00" in head:
            order = "BE" if head[:1] == b"\x00" else "LE"  # ASCII text: the NUL comes first in big-endian
            raise SourceError(f"{path} holds NUL bytes: UTF-16 text without a byte-order mark? Re-save it as UTF-8 "
                              f"(iconv -f UTF-16{order} -t UTF-8)")  # fmt: skip
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                at = offset + exc.start
                line = lines + chunk[: exc.start].count(b"\n") + 1
                raise SourceError(
                    f"{path} is not UTF-8 text (byte {at}, line {line}): re-save it as UTF-8, e.g. "
                    f"`iconv -f GBK -t UTF-8 {path.name} > utf8-{path.name}` for a Chinese Windows export"
                ) from None
            offset += len(chunk)
            lines += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise SourceError(f"{path} ends inside a UTF-8 character (truncated file?)") from None


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def _json_problem(path: Path) -> str:
    """For a JSON file that failed to load: what is wrong with it as JSON ('' when it parses)."""
    import json

    with open(path, encoding="utf-8-sig") as f:
        text = f.read(1 << 16)
        if not text.strip():
            return "the file is empty"
        if text.lstrip()[0] == "[":
            f.seek(0)
            try:
                json.load(f)
            except ValueError as exc:
                return f"it is not valid JSON ({exc})"
            return ""
        f.seek(0)
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                return f"line {n} is not valid JSON ({exc.msg})"
            if not isinstance(value, dict):
                return f"line {n} is a JSON {type(value).__name__}, not an object (one record per line)"
    return ""


def _columns(path: Path, builder: str) -> list[str]:
    """The column names of one file (for a folder whose files disagree)."""
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True).column_names or []
    except Exception:
        return []


def read_table(path: Path, cache_dir: Path):
    """`path` (a file or a folder) as one `datasets.Dataset`; SourceError names the file and the fix.

    CSV/TSV cells stay text (no number or NaN guessing: an answer "0" stays "0", an empty cell is "").
    Reading writes Arrow files under `cache_dir` (a temp folder the caller removes).
    """
    import datasets

    files = data_files(path)
    builder = BUILDERS[files[0].suffix.lower()]
    kwargs: dict = {}
    if builder in ("json", "csv"):
        for f in files:
            check_utf8(f)
    if builder == "csv":
        sep = "\t" if files[0].suffix.lower() == ".tsv" else ","
        with open(files[0], newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter=sep), [])
        # every cell as its text: pandas would read "007" as 7 and an empty cell as NaN
        kwargs = {"sep": sep, "converters": {c: str for c in header}, "na_filter": False, "encoding": "utf-8-sig"}
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own retry messages would precede ours
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir), **kwargs
        )
    except Exception as exc:  # the builders raise many kinds; name the file and what is wrong with it
        raise SourceError(_explain(exc, path, files, builder)) from None
    if not len(ds):
        raise SourceError(f"{path} holds no records")
    return ds


def _explain(exc: BaseException, path: Path, files: list[Path], builder: str) -> str:
    cause = _root_cause(exc)
    for f in files:
        problem = _json_problem(f) if builder == "json" else ("the file is empty" if not f.stat().st_size else "")
        if problem:
            return f"{f} cannot be read as {builder}: {problem}"
    if len(files) > 1 and "cast" in str(cause).lower():
        layouts = {}
        for f in files:
            layouts.setdefault(tuple(_columns(f, builder)), f)
        if len(layouts) == 1:  # same columns: a nested field or a value type differs
            return (f"the files of {path} disagree on the type of a column ({str(cause).splitlines()[0][:200]}): "
                    "make them agree or give each its own source")
        shown = "; ".join(f"{f.name}: {', '.join(cols) or '?'}" for cols, f in list(layouts.items())[:3])
        return f"the files of {path} have different columns ({shown}): give each layout its own source"
    if isinstance(cause, StopIteration) or "corresponds to no data" in str(cause):
        return f"{path} holds no records"
    return f"{files[0] if len(files) == 1 else path} cannot be read as {builder}: {type(cause).__name__}: {cause}".splitlines()[0]
