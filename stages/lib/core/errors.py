"""Errors caused by the user's input: printed as one clear message, without a traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(ValueError):
    """Bad params, recipe, data or files: the message names the key or file and what is wrong."""


def require(*paths, made_by: str) -> None:
    """UserError unless every path (str or Path) exists: a stage run by hand before the one that writes it."""
    from pathlib import Path

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise UserError(f"{missing[0]} is missing: the {made_by} stage writes it; run `dvc repro` (it runs the "
                        "stages in order) rather than this stage alone")  # fmt: skip


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`: first finish or clean up what a killed run left (head process only: launched ranks
    share its folders) and note the stage's declared inputs (`provenance`), then turn a UserError into one `error:` line and Ctrl-C into exit 130, both without a
    traceback and with every earlier output as it was."""
    from .outputs import recover
    from .provenance import remember
    from .quiet import quiet

    quiet()

    def stage() -> None:
        if "LOCAL_RANK" not in os.environ:
            for line in recover():
                print(f"note: {line}", flush=True)
        remember()  # what dvc.yaml says it reads, as it is now: checked again before the outputs are swapped in
        try:
            main()
        except KeyboardInterrupt:
            print("interrupted: every earlier output is as it was", file=sys.stderr, flush=True)
            raise

    run_command(stage)


import errno as _errno

# what the machine refused, not what the user gave: said as such, never as "damaged"
FULL = {_errno.ENOSPC, _errno.EDQUOT}
READ_ONLY = {_errno.EROFS}
NO_PERMISSION = {_errno.EACCES, _errno.EPERM}
# the same refusals as libraries word them without an OSError: safetensors (Rust io::Error), torch.save's zip writer
FULL_WORDING = ("os error 28", "StorageFull", "No space left on device", "unexpected pos", "file write failed")
READ_ONLY_WORDING = ("os error 30", "Read-only file system")
NO_PERMISSION_WORDING = ("os error 13", "Permission denied")
TOO_LARGE_WORDING = ("os error 27", "File too large")


def environment_error(exc: BaseException) -> UserError | None:
    """One line for a disk that is full or a place that cannot be written, naming the path where the error does
    and what to do; None for any other error (which keeps its own handling)."""
    text = str(exc)
    code = getattr(exc, "errno", None)
    where = getattr(exc, "filename", None)
    at = f" ({where})" if where else ""
    if code in FULL or (code is None and any(w in text for w in FULL_WORDING)):
        return UserError(f"the disk is full{at}: free space on it (df -h shows each disk; DVC's cache is .dvc/cache, "
                         "Hugging Face's HF_HOME, temporary files TMPDIR), then re-run; every earlier output is as it was")  # fmt: skip
    if code == _errno.EFBIG or (code is None and any(w in text for w in TOO_LARGE_WORDING)):
        return UserError(f"a file grew past this process's file size limit{at} (`ulimit -f`): raise or remove the "
                         "limit, then re-run; every earlier output is as it was")  # fmt: skip
    if code in READ_ONLY or (code is None and any(w in text for w in READ_ONLY_WORDING)):
        return UserError(f"cannot write{at}: the file system is read-only; run from a writable copy of the project, "
                         "then re-run")
    if code in NO_PERMISSION or (code is None and any(w in text for w in NO_PERMISSION_WORDING)):
        return UserError(f"no permission{at} ({' '.join(text.split())[:160]}): run as the user who owns the project "
                         "(or fix its permissions with chmod/chown), then re-run")  # fmt: skip
    return None


def run_command(main: Callable[[], None]) -> None:
    """Run a command's `main` (a stage's, or chat's and serve's): a UserError, or a full disk or read-only folder
    (environment_error), becomes one `error:` line (exit 1) and Ctrl-C exit 130, both without a traceback."""
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - only the machine's refusals are turned into a line; others re-raise
        said = environment_error(exc)
        if said is None:
            raise
        sys.exit(f"error: {said}")
