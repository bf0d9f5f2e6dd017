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


def run_command(main: Callable[[], None]) -> None:
    """Run a command's `main` (a stage's, or chat's and serve's): a UserError becomes one `error:` line (exit 1)
    and Ctrl-C exit 130, both without a traceback."""
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)
