"""Hooks for Python's json reader where it is laxer than JSON: NaN/Infinity, and keys given twice."""

from __future__ import annotations


class DuplicateKey(ValueError):
    """An object names `key` twice (Python's reader would keep the last value silently)."""

    def __init__(self, key: str):
        super().__init__(f"duplicate key '{key}': keep one")
        self.key = key


def no_duplicates(pairs: list) -> dict:
    """json's object_pairs_hook: DuplicateKey for a key given twice."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


def no_constant(name: str):
    """json's parse_constant: NaN and Infinity are not JSON numbers (ValueError)."""
    raise ValueError(f"{name} is not a JSON number: write a finite number")
