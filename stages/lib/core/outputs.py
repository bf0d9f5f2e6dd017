"""Writing stage outputs so that a failed or killed stage never leaves a half-written or missing output behind.

A stage builds every output in a temp path beside it and swaps them all in at the end. The swap is journalled: a
stage killed between two renames is completed by the next stage that starts (`recover`), so the outputs of one
run always arrive together. Temp paths carry this host's name and the writer's pid, so the next start removes
those of a dead process and never those of a live one (another node's ranks may share the folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError

JOURNAL = Path(".outputs-journal.json")  # the swap in progress: [[temp, final], ...], host and pid
OUTPUT_PARENTS = ("data", "models", "metrics", "eval", "dvclive", "dvclive/train", "dvclive/train/plots")
_STALE = re.compile(r"^\..+\.(?:tmp|scratch)-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


def host_tag() -> str:
    """This host's name as temp names carry it: without `-`, which separates host, pid and random part."""
    return socket.gethostname().replace("-", "_")


def _owner_tag() -> str:
    return f"{host_tag()}-{os.getpid()}-"


def scratch_dir(beside: str | Path, name: str) -> Path:
    """A new empty work folder `.name.scratch-<host>-<pid>-<random>` in `beside`; the caller removes it, and the
    next stage start does if this process is killed first."""
    beside = Path(beside)
    beside.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.scratch-{_owner_tag()}", dir=beside))


class StagedOutputs:
    """The temp paths of one stage's outputs; see `staged_outputs`."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []

    def dir(self, final: str | Path) -> Path:
        """An empty temp directory beside `final` that replaces it on success."""
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_owner_tag()}", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the output from other users of a shared cluster folder
        self.pairs.append((tmp, final))
        return tmp

    def file(self, final: str | Path) -> Path:
        """A temp file path (not yet created) beside `final` that replaces it on success."""
        final = Path(final)
        tmp = self.dir(final.with_name(f"{final.name}.d"))  # a private folder: the name cannot collide
        self.pairs[-1] = (tmp / final.name, final)
        return tmp / final.name

    def add(self, tmp: str | Path, final: str | Path) -> None:
        """A temp path the stage made itself (beside `final`, same filesystem) that replaces `final` on success."""
        self.pairs.append((Path(tmp), Path(final)))

    def discard(self) -> None:
        for tmp, final in self.pairs:
            shutil.rmtree(_temp_root(tmp, final), ignore_errors=True)

    def commit(self) -> None:
        for tmp, final in self.pairs:
            if not (tmp.exists() or tmp.is_symlink()):
                raise RuntimeError(f"the stage did not write {final}")  # a bug, not bad input
        write_json(JOURNAL, {"host": socket.gethostname(), "pid": os.getpid(),
                             "pairs": [[str(t), str(f)] for t, f in self.pairs]})  # fmt: skip
        _roll_forward(self.pairs)
        JOURNAL.unlink()


@contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """Collect a stage's outputs in temp paths; on success they replace the finals together, on an exception
    (or a kill: see `recover`) every final stays as it was. An input dvc.yaml declares that changed while the stage
    ran is such an exception (provenance.InputsChanged): dvc.lock would pair these outputs with the new version."""
    from .provenance import check_unchanged

    staged = StagedOutputs()
    try:
        yield staged
        check_unchanged()
    except BaseException:
        staged.discard()
        raise
    staged.commit()


def _temp_root(tmp: Path, final: Path) -> Path:
    return tmp.parent if tmp.name == final.name else tmp  # a staged file lives in its own temp folder


def _roll_forward(pairs) -> None:
    for tmp, final in pairs:
        tmp, final = Path(tmp), Path(final)
        if tmp.exists() or tmp.is_symlink():
            replace_path(tmp, final)
        root = _temp_root(tmp, final)
        if root != tmp:
            shutil.rmtree(root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JournalError(UserError):
    """.outputs-journal.json is not a swap this project's stages began: nothing is moved."""


def _journal_problem(journal: object) -> str | None:
    """Why `journal` (parsed JSON) is not one that `StagedOutputs.commit` wrote here, or None: its shape, and each
    pair an output dvc.yaml declares with a temp path of the journal's writer beside it."""
    pairs = journal.get("pairs") if isinstance(journal, dict) else None
    if not (isinstance(journal, dict) and set(journal) == {"host", "pid", "pairs"} and isinstance(journal["host"], str)
            and type(journal["pid"]) is int and isinstance(pairs, list)
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs)):
        return "is not of a journal's shape ({host, pid, pairs: [[temp, output], ...]})"
    from .provenance import declared_outputs

    known = declared_outputs()
    for tmp, final in pairs:
        if final != os.path.normpath(final) or final not in known:
            return f"names {final!r}, which is not an output in dvc.yaml"
        if not _own_temp(Path(tmp), Path(final), journal["host"], journal["pid"]):
            return f"pairs {final} with {tmp!r}, which is not the temp path a stage writes beside it"
    return None


def _own_temp(tmp: Path, final: Path, host: str, pid: int) -> bool:
    """`tmp` is a temp path of process `pid` on `host` for `final`, as StagedOutputs names them: a folder
    `.NAME.tmp-HOST-PID-RANDOM` beside it, a file NAME in a folder `.NAME.d.tmp-HOST-PID-RANDOM` beside it, or the
    train stage's `.NAME.partial`; never a link (which could lead anywhere)."""
    staged_file = tmp.name == final.name and tmp.parent.parent == final.parent
    root = tmp.parent if staged_file else tmp
    owner = rf"{re.escape(host.replace('-', '_'))}-{pid}-[^-/]+"
    name = rf"\.{re.escape(final.name)}\.d\.tmp-{owner}" if staged_file else \
        rf"\.{re.escape(final.name)}\.(?:tmp-{owner}|partial)"  # fmt: skip
    return root.parent == final.parent and bool(re.fullmatch(name, root.name)) and not (
        root.is_symlink() or tmp.is_symlink())


def read_journal() -> dict:
    """JOURNAL, checked before anything is moved; JournalError naming it if it is garbled or forged."""
    try:
        journal = json.loads(JOURNAL.read_text(encoding="utf-8"))
        problem = _journal_problem(journal)
    except (ValueError, UnicodeDecodeError):  # written atomically (write_json): never half-written by a stage
        problem = "is not valid JSON"
    if problem:
        raise JournalError(f"{JOURNAL} {problem}: no stage of this project wrote it, and nothing was moved; delete "
                           f"it (rm {JOURNAL}) and run the stage again")  # fmt: skip
    return journal


def recover(parents=OUTPUT_PARENTS) -> list[str]:
    """At a stage's start (project root): finish a swap a killed stage left half-done on this host (after checking
    its journal: `read_journal`), then remove temp paths of dead processes of this host. Returns what it did, one
    phrase per action."""
    done = []
    if JOURNAL.exists() or JOURNAL.is_symlink():
        journal = read_journal()
        if journal["host"] == socket.gethostname() and not _alive(journal["pid"]):
            _roll_forward(journal["pairs"])
            JOURNAL.unlink()
            done.append(f"completed the swap of {', '.join(f for _, f in journal['pairs'])} a killed stage began")
    host = host_tag()
    for parent in map(Path, parents):
        for entry in parent.glob(".*") if parent.is_dir() else []:
            match = _STALE.match(entry.name)
            if match and match["host"] == host and not _alive(int(match["pid"])):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                done.append(f"removed {entry}, left by a killed run")
    return done


def replace_path(new: Path, final: Path) -> None:
    """Put `new` at `final` (a file or directory), removing what was there."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(new, final)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists() or old.is_symlink():
        old.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically: a temp file beside it, then one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_owner_tag()}", dir=path.parent)  # unique: nodes may race
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_json(path: str | Path, data: object) -> None:
    """Write JSON atomically, keys sorted so equal data gives equal bytes."""
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
