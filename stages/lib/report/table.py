"""Plain-text tables that fit a terminal: columns are dropped by priority, then long cells are shortened."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GAP = "  "


@dataclass
class Column:
    """One column: `header` (one or two lines: group over name), its cells (text), `priority` (0: always shown;
    higher numbers are dropped first when the table is too wide) and `align` ('<' text, '>' numbers)."""

    header: tuple[str, ...]
    cells: list[str]
    priority: int = 0
    align: str = ">"
    shortenable: bool = False  # cells may be cut (with "…") to make room
    width: int = field(init=False, default=0)

    def natural(self) -> int:
        return max(len(t) for t in (*self.header, *self.cells))


def number(value, digits: int = 4) -> str:
    """A metric as text: 4 significant digits, no exponent for ordinary magnitudes; '-' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0:
        return "0"
    if 1e-4 <= abs(value) < 1e6:
        text = f"{value:.{digits}g}"
        return text if "e" not in text else f"{value:.{max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))}f}"
    return f"{value:.{digits - 1}e}"


def change(before, after) -> str:
    """after - before with its sign, or '' when either is missing."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after)):
        return ""
    diff = after - before
    return "0" if diff == 0 else ("+" if diff > 0 else "-") + number(abs(diff))


def render(columns: list[Column], width: int) -> list[str]:
    """The table's lines, at most `width` characters each where possible: the lowest-priority columns are dropped
    first (a note says how many; a dropped column's `width` is 0), then shortenable cells are cut; columns of
    priority 0 always stay."""
    shown = list(columns)
    dropped = 0

    def total(cols: list[Column]) -> int:
        return sum(c.natural() for c in cols) + len(GAP) * (len(cols) - 1)

    for c in columns:
        c.width = 0  # stays 0 for a dropped column
    while total(shown) > width and any(c.priority for c in shown):
        worst = max(shown, key=lambda c: c.priority)
        shown.remove(worst)
        dropped += 1
    for c in shown:
        c.width = c.natural()
    excess = total(shown) - width
    for c in sorted((c for c in shown if c.shortenable), key=lambda c: -c.width):
        if excess <= 0:
            break
        floor = max(len(h) for h in c.header) if c.header else 1
        cut = min(excess, c.width - max(floor, 8))
        if cut > 0:
            c.width -= cut
            excess -= cut
    depth = max(len(c.header) for c in shown)
    lines = []
    for level in range(depth):
        texts = [(c.header[level - depth + len(c.header)] if level >= depth - len(c.header) else "") for c in shown]
        lines.append(_line(shown, texts))
    lines.append(GAP.join("-" * c.width for c in shown))
    for i in range(len(shown[0].cells) if shown else 0):
        lines.append(_line(shown, [c.cells[i] for c in shown]))
    if dropped:
        lines.append(f"({dropped} more column{'s' if dropped > 1 else ''} in a wider terminal, or with --json)")
    return lines


def _line(columns: list[Column], texts: list[str]) -> str:
    parts = []
    for c, text in zip(columns, texts):
        if len(text) > c.width:
            text = text[: c.width - 1] + "…"
        parts.append(f"{text:{c.align}{c.width}}")
    return GAP.join(parts).rstrip()
