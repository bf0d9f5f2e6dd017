"""Converters from checkpoints that need Hub code to transformers' native architectures.

ChatGLM2 → GLM (GlmForCausalLM) is planned here; until it exists the download stage says so instead of
running the checkpoint's remote code, which does not load on transformers 5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

CONVERTERS: dict[str, Callable[[Path], dict]] = {}
