"""Nested dicts (params, metrics files) as flat dotted keys."""

from __future__ import annotations


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}, 'c': [2]} → {'a.b': 1, 'c': [2]} (with `prefix` + '.' in front of every key when given);
    lists and scalars are leaves, an empty dict gives no key."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out |= flatten(value, name) if isinstance(value, dict) else {name: value}
    return out
