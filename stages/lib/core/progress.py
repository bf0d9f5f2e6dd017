"""Progress of the slow parts of a stage: a line when a phase starts, and a counting bar for long loops."""

from __future__ import annotations

import sys


def phase(stage: str, text: str) -> None:
    """One line, `<stage>: <text>`, flushed at once (DVC passes the stage's output straight through)."""
    print(f"{stage}: {text}", flush=True)


def counter(stage: str, what: str, total: int, unit: str):
    """A tqdm bar on stderr for `total` units (e.g. samples), refreshed at most every 5 s, so that a log file gets
    a line every few seconds rather than hundreds. Use as a context manager; `.update(n)` after each batch."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{stage}: {what}", unit=unit, mininterval=5, file=sys.stderr, dynamic_ncols=True)
