"""Local data files → an Arrow-backed `datasets.Dataset`, whatever the layout a real export has.

JSON (an array or one object per line, whatever the extension), CSV, TSV, Parquet, Arrow, or a folder of such
files are read by `datasets`' builders, memory-mapped, so a million records never sit in Python lists. Text
files must be UTF-8 (a BOM is fine): anything else fails with one line naming the file, the byte and the fix, and
so do files that are not text at all (compressed, an HTML page), JSON nested deeper than any record format reads,
and paths that are no regular file (a named pipe would block the stage forever).
"""

from __future__ import annotations

import codecs
import csv
import re
import stat
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.strict_json import DuplicateKey, no_duplicates

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SAVED_METADATA = {"dataset_info.json", "state.json", "dataset_dict.json"}
TRACKED_HINT = (
    "; `dvc exp run --temp/--queue` copies only files tracked by git or DVC into the run: track it with "
    "`dvc add <file>` (or git add) first"
)
# JSON arrays/objects within each other, the record counted: what Arrow stores (its parser crashes on far deeper ones)
MAX_DEPTH = 63
# magic bytes of compressed files: (what it is, suffix, the tool that decompresses a file of that suffix in place)
COMPRESSED = {b"\x1f\x8b": ("gzip-compressed", "gz", "gunzip"), b"\xfd7zXZ\x00": ("xz-compressed", "xz", "unxz"),
              b"\x28\xb5\x2f\xfd": ("zstd-compressed", "zst", "unzstd")}  # fmt: skip
BZIP2 = re.compile(rb"BZh[1-9]1AY&SY")
HTML = re.compile(rb"<(!doctype\s+html|html|head|body|title)\b", re.IGNORECASE)
_SPECIAL = np.zeros(256, dtype=bool)  # the bytes that decide JSON nesting: quotes, backslashes, brackets, newlines
_SPECIAL[list(b'"\\[]{}\n')] = True


class SourceError(UserError):
    pass


def data_files(path: Path) -> list[Path]:
    """The readable files of `path` (a file, or a folder searched recursively), all of one builder."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if not p.is_dir() and p.suffix.lower() in BUILDERS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))  # fmt: skip
        for f in files:
            check_regular(f)
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
    check_regular(path)
    return [path]


def check_regular(path: Path) -> None:
    """SourceError unless `path` (after links) is a regular file, checked without opening it: opening a named pipe
    waits for a writer forever, and a device or socket never ends."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SourceError(f"data file {path} cannot be read ({exc.strerror})") from None
    if stat.S_ISREG(mode):
        return
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")  # fmt: skip
    raise SourceError(f"data file {path} is {kind}, not a regular file: reading it could wait forever; put the "
                      "records in a plain file")  # fmt: skip


def check_text(path: Path, builder: str) -> None:
    """Raise SourceError unless `path` is UTF-8 text: compressed files, HTML pages, UTF-32 and UTF-16 are named as
    such, else the byte offset and line of the first invalid UTF-8 sequence. JSON nested deeper than MAX_DEPTH is
    refused here, before the reader (whose parser crashes the process on a deep enough record)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    with open(path, "rb") as f:
        head = f.read(4096)
        problem = not_text(head, path.name)
        if problem:
            raise SourceError(f"{path} {problem}")
        nesting = Nesting(lines=head.lstrip(codecs.BOM_UTF8).lstrip()[:1] != b"[") if builder == "json" else None
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
            deep = nesting.feed(chunk) if nesting else None
            if deep:
                raise SourceError(f"{path} cannot be read as json: line {deep} nests arrays and objects more than "
                                  f"{MAX_DEPTH} levels deep, more than Arrow stores: flatten or drop that field")
            offset += len(chunk)
            lines += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise SourceError(f"{path} ends inside a UTF-8 character (truncated file?)") from None


def not_text(head: bytes, name: str) -> str:
    """What a file (`name`) starting with `head` is when it is clearly no UTF-8 text, with the fix ('' otherwise);
    a phrase that follows the file's name."""
    for magic, (what, suffix, tool) in COMPRESSED.items():
        if head.startswith(magic):
            return (f"is {what}, not text: decompress it (`mv {name} {name}.{suffix} && {tool} {name}.{suffix}` "
                    f"leaves {name} as text)")  # fmt: skip
    if BZIP2.match(head):
        return f"is bzip2-compressed, not text: decompress it (`mv {name} {name}.bz2 && bunzip2 {name}.bz2`)"
    if head.startswith(b"PK\x03\x04"):
        return "is a zip archive (an Excel .xlsx workbook is one), not text: unzip it, or export the sheet as CSV UTF-8"
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "is UTF-32 text: re-save it as UTF-8 (iconv -f UTF-32 -t UTF-8)"
    if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        return "is UTF-16 text: re-save it as UTF-8 (iconv -f UTF-16 -t UTF-8)"
    if b"\x00" in head:
        wide = _wide_encoding(head)
        if wide:
            return (f"holds NUL bytes: {wide[:6]} text without a byte-order mark? Re-save it as UTF-8 "
                    f"(iconv -f {wide} -t UTF-8)")  # fmt: skip
        return "holds NUL bytes and is no text encoding: a binary file? Give the records as JSON, CSV or Parquet"
    text = head.lstrip(codecs.BOM_UTF8).lstrip()
    if text[:1] == b"<" and HTML.search(text):
        return ("is an HTML page, not data: a link to a web page (a file viewer, a login) rather than to the raw "
                "file? Use the raw or download link")  # fmt: skip
    return ""


def _wide_encoding(head: bytes) -> str | None:
    """UTF-32LE/BE or UTF-16LE/BE when the NUL bytes of `head` fall where those put them for mostly-ASCII (or BMP)
    text, else None: UTF-32 units have two NUL high bytes, UTF-16 ASCII one NUL byte per pair."""
    units = [head[i : i + 4] for i in range(0, len(head) - 3, 4)]
    for name, nul in (("UTF-32LE", slice(2, 4)), ("UTF-32BE", slice(0, 2))):
        if units and sum(u[nul] == b"\x00\x00" for u in units) >= 0.9 * len(units):
            return name
    pairs = [head[i : i + 2] for i in range(0, len(head) - 1, 2)]
    for name, nul in (("UTF-16LE", 1), ("UTF-16BE", 0)):
        if pairs and sum(p[nul] == 0 for p in pairs) >= 0.3 * len(pairs):
            return name
    return None


class Nesting:
    """How deep JSON arrays and objects nest (brackets outside strings), fed the file's bytes chunk by chunk; with
    `lines` (JSON Lines) each line starts at depth 0. Vectorised with numpy, so a GB costs seconds."""

    def __init__(self, lines: bool):
        self.lines = lines
        self.line = 1  # of the next byte fed
        self.depth = 0 if lines else -1  # at the end of what was fed; the array around records is no level of theirs
        self.quotes = 0  # 1 when what was fed ends inside a string
        self.backslashes = 0  # the run of backslashes that ended what was fed

    def feed(self, data: bytes, step: int = 1 << 20) -> int | None:
        """The line on which the depth first passes MAX_DEPTH, else None."""
        view = memoryview(data)
        for start in range(0, len(data), step):
            deep = self._feed(view[start : start + step])
            if deep:
                return deep
        return None

    def _feed(self, chunk: memoryview) -> int | None:
        data = np.frombuffer(chunk, dtype=np.uint8)
        at = np.flatnonzero(_SPECIAL[data])  # where the bytes that matter are
        if not at.size:
            self.backslashes = 0
            return None
        a = data[at]
        k = np.arange(len(a), dtype=np.int64)
        slash = a == 0x5C
        # after[k]: entry k directly follows a backslash (adjacent bytes), so the run of backslashes goes on
        after = np.concatenate(([at[0] == 0 and self.backslashes > 0], slash[:-1] & (np.diff(at) == 1)))
        start = np.maximum.accumulate(np.where(after, -1, k))
        run = np.where(start >= 0, k - start, k + self.backslashes)  # backslashes right before entry k
        quote = (a == 0x22) & (run % 2 == 0)  # a quote that is not escaped opens or closes a string
        newline = (a == 0x0A) if self.lines else np.zeros(len(a), dtype=bool)  # where depth starts over
        last_newline = np.maximum.accumulate(np.where(newline, k, -1))
        quotes = np.cumsum(quote, dtype=np.int64)
        inside = (quotes - np.where(last_newline >= 0, quotes[last_newline], -self.quotes)) % 2 == 1
        opens = ((a == 0x5B) | (a == 0x7B)) & ~inside
        closes = ((a == 0x5D) | (a == 0x7D)) & ~inside
        level = np.cumsum(opens.astype(np.int64) - closes, dtype=np.int64)
        depth = level - np.where(last_newline >= 0, level[last_newline], -self.depth)
        over = np.flatnonzero(depth > MAX_DEPTH)
        lines = a == 0x0A  # every newline is among the entries
        if over.size:
            return self.line + int(np.count_nonzero(lines[: over[0]]))
        self.line += int(np.count_nonzero(lines))
        self.depth = int(depth[-1])
        self.quotes = int(inside[-1])  # counted up to and with the last entry
        self.backslashes = int(run[-1]) + 1 if slash[-1] and at[-1] == len(chunk) - 1 else 0
        return None


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def _parse_problem(text: str, whole: bool) -> tuple[object, str]:
    """`text` (a `whole` file, or one line) parsed by Python's json, and what the reader refuses in it ('' when
    nothing), as a phrase that follows "line N" or "it"."""
    import json

    try:
        value = json.loads(text, object_pairs_hook=no_duplicates)
    except DuplicateKey as exc:
        return None, f"has a duplicate key {exc.key!r} (an object names it twice): keep one"
    except RecursionError:
        return None, f"nests arrays and objects more than {MAX_DEPTH} levels deep: flatten or drop that field"
    except json.JSONDecodeError as exc:  # a whole file's message has the line and column, a line's needs none
        return None, f"is not valid JSON ({exc if whole else exc.msg})"
    return value, _lone_surrogate(value)


def _lone_surrogate(value: object) -> str:
    """A text (key or value) holding half of a UTF-16 surrogate pair, which is no character: '' when none."""
    todo = [value]
    while todo:  # a loop, not recursion: any depth
        item = todo.pop()
        if isinstance(item, dict):
            todo += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            todo += item
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (f"holds an invalid surrogate escape \\u{ord(item[exc.start]):04x} (half of a UTF-16 pair, no "
                        "character): write the character itself or its full pair")  # fmt: skip
    return ""


def _json_problem(path: Path) -> str:
    """For a JSON file that failed to load: what is wrong with it as JSON and where, read line by line with Python's
    json ('' when it finds nothing)."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read(1 << 16)
        if not text.strip():
            return "the file is empty"
        if text.lstrip()[0] == "[":
            f.seek(0)
            problem = _parse_problem(f.read(), whole=True)[1]
            return f"it {problem}" if problem else ""
        f.seek(0)
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            value, problem = _parse_problem(line, whole=False)
            if problem:
                return f"line {n} {problem}"
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
            check_text(f, builder)
    if builder == "csv":
        sep = "\t" if files[0].suffix.lower() == ".tsv" else ","
        with open(files[0], newline="", encoding="utf-8-sig") as f:
            try:
                header = next(csv.reader(f, delimiter=sep), [])
            except csv.Error as exc:  # e.g. an unclosed quote runs the header past the field limit
                raise SourceError(f"{files[0]}: its header line does not parse as {'TSV' if sep == chr(9) else 'CSV'} "
                                  f"({exc}): check its quotes") from None  # fmt: skip
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
