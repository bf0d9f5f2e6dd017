"""Errors caused by the user's input: printed as one clear message, without a traceback."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(ValueError):
    """Bad params, recipe, data or files: the message names the key or file and what is wrong."""


def run_stage(main: Callable[[], None]) -> None:
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
