"""Paths a stage may read: inside a folder that dvc.yaml declares, so that DVC sees them change."""

from __future__ import annotations

import os
from pathlib import Path

from .params import ParamsError


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
        if not (f.exists() or f.is_symlink()):
            continue  # named by the reader, with the hint for `dvc exp run`
        try:
            target = f.resolve(strict=True)
        except (OSError, RuntimeError) as exc:  # a symlink loop, or a link to nothing
            raise ParamsError(f"{key}: {f} cannot be followed ({exc.strerror if isinstance(exc, OSError) else exc}): "
                              "replace the link with the file") from None  # fmt: skip
        inside = target.is_relative_to(root.resolve()) or "md5" in target.parts  # or DVC's cache (files/md5/..)
        if not inside:  # the lexical check passed: a link on the way leads out
            raise ParamsError(
                f"{key}: {f} leads to {target}, outside {root}/; DVC does not follow such links, so it would "
                f"never see that data change: copy it into {root}/ instead (`dvc add` it if large)"
            )
    return path
