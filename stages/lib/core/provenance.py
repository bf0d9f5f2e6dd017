"""What a stage started from, checked again before its outputs are swapped in.

DVC hashes a stage's params and deps when the stage ends, not when it starts: a params.yaml, data file or code file
edited while the stage ran would be recorded in dvc.lock beside outputs made from the earlier version. So a stage
notes, at its start, the values of the params keys dvc.yaml declares for it, the (size, mtime_ns, inode) of every
file of its declared deps (its code is among them) and its own dvc.yaml entry; before the swap it compares them
again and refuses on any difference. Stat values, not content hashes: cheap for a 15 GB models/base.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .errors import UserError
from .params import PARAMS_FILE, ParamsError, read_yaml

DVC_YAML = Path("dvc.yaml")
ENV = "STAGE_STARTED_FROM"  # the head process's snapshot, for the ranks it launches (rank 0 swaps the outputs)
ENV_LIMIT = 64 * 1024  # characters; above it deps travel as digests of their file lists (environment size limits)
MISSING = "(missing)"
_started: dict | None = None


class InputsChanged(UserError):
    """A declared param, dep or the stage's definition changed while the stage ran."""


def stage_name() -> str | None:
    """The dvc.yaml stage this process runs: `python -m stages.train` → train (None for anything else)."""
    name = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None) or ""
    return name.split(".", 1)[1] if name.startswith("stages.") else None


def _lookup(raw: Any, dotted: str) -> Any:
    """The value of a dotted params key (list items by index), or MISSING; "" is the whole file."""
    node = raw
    for part in filter(None, dotted.split(".")):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def _read(path: Path) -> Any:
    """A YAML or JSON file as DVC reads it; ParamsError (one line) if it cannot be read."""
    try:
        return read_yaml(path, path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path} cannot be read ({type(exc).__name__})") from None


def _stage_spec(stage: str) -> dict | None:
    """The stage's dvc.yaml entry; None where there is no readable dvc.yaml or no such stage."""
    try:
        stages = _read(DVC_YAML).get("stages")
    except (ParamsError, AttributeError):
        return None
    spec = stages.get(stage) if isinstance(stages, dict) else None
    return spec if isinstance(spec, dict) else None


def _declared_params(spec: dict) -> dict[str, list[str]]:
    """{file: keys} of a stage's `params` (a bare key is params.yaml's; a file listed without keys: all of it)."""
    files: dict[str, list[str]] = {}
    for item in spec.get("params") or []:
        if isinstance(item, str):
            files.setdefault(str(PARAMS_FILE), []).append(item)
        elif isinstance(item, dict):
            for file, keys in item.items():
                files.setdefault(str(file), []).extend(keys or [""])
    return files


def _canonical(value: Any) -> str:
    """JSON text that tells apart what DVC records differently (true vs 1, 1 vs 1.0)."""
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def _param_values(files: dict[str, list[str]]) -> dict[str, str]:
    """{"file:key": the value as canonical JSON}; an unreadable file gives each of its keys the reason."""
    values = {}
    for file, keys in files.items():
        try:
            raw, problem = _read(Path(file)), None
        except ParamsError as exc:
            raw, problem = None, _canonical(f"unreadable: {exc}")
        for key in keys:
            values[f"{file}:{key}"] = problem or _canonical(_lookup(raw, key))
    return values


def _leaf(key: str, old: Any, new: Any) -> tuple[str, Any, Any]:
    """The first dotted key at or under `key` where two params values differ, and its two values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            a, b = old.get(k, MISSING), new.get(k, MISSING)
            if _canonical(a) != _canonical(b):
                return _leaf(f"{key}.{k}" if key else str(k), a, b)
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if _canonical(a) != _canonical(b):
                return _leaf(f"{key}.{i}", a, b)
    return key, old, new


def _shown(value: Any) -> str:
    text = _canonical(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _resolve(dep: str, raw: Any) -> str:
    """A dep path with dvc.yaml's `${key}` filled from params.yaml (left as is where the key is missing)."""

    def value(match: re.Match) -> str:
        found = _lookup(raw, match[1].strip())
        return match[0] if found is MISSING else str(found)

    return re.sub(r"\$\{([^}]+)\}", value, dep)


def declared_outputs() -> set[str]:
    """Every output path dvc.yaml declares (outs, metrics and plots of every stage, `${...}` filled from
    params.yaml), normalized; empty where dvc.yaml does not read."""
    try:
        stages = _read(DVC_YAML).get("stages")
        raw = _read(PARAMS_FILE) if PARAMS_FILE.exists() else None
    except (ParamsError, AttributeError):
        return set()
    found = set()
    for spec in stages.values() if isinstance(stages, dict) else []:
        for key in ("outs", "metrics", "plots"):
            for item in (spec.get(key) or []) if isinstance(spec, dict) else []:
                path = next(iter(item)) if isinstance(item, dict) and item else item
                found.add(os.path.normpath(_resolve(str(path), raw)))
    return found


def _stat(path: str) -> list[int]:
    try:
        st = os.stat(path)
    except OSError:  # a link to nothing
        return [-1, -1, -1]
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def listing(path: Path) -> dict[str, list[int]]:
    """[size, mtime_ns, inode] of `path`, or of every file under it, by path. `__pycache__` is skipped: Python
    writes it as the stage imports its code, and its content follows from the .py files, which are compared."""
    if not path.is_dir():
        return {str(path): _stat(str(path))} if path.exists() or path.is_symlink() else {}
    files = {}
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            files[os.path.join(root, name)] = _stat(os.path.join(root, name))
    return files


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def snapshot(stage: str, deps: list[str] | None = None) -> dict | None:
    """The stage's declared inputs now: its dvc.yaml entry (digest), param values and dep file stats. `deps`: the
    dep paths to list (the start's, at the end); None: dvc.yaml's, `${...}` filled from params.yaml."""
    spec = _stage_spec(stage)
    if spec is None:
        return None
    if deps is None:
        try:
            raw = _read(PARAMS_FILE)
        except ParamsError:
            raw = None
        deps = [_resolve(str(d), raw) for d in spec.get("deps") or []]
    return {"stage": stage, "definition": _digest(spec), "params": _param_values(_declared_params(spec)),
            "deps": {d: listing(Path(d)) for d in deps}}  # fmt: skip


def remember() -> None:
    """At a stage's start: note its inputs (or take the snapshot of the head process that launched this rank),
    and pass them on to the ranks it may launch."""
    global _started
    stage = stage_name()
    if stage is None:
        return
    inherited = json.loads(os.environ.get(ENV) or "null")
    if "LOCAL_RANK" in os.environ and inherited and inherited.get("stage") == stage:
        _started = inherited
        return
    _started = snapshot(stage)
    if _started is not None:
        text = json.dumps(_started)
        if len(text) > ENV_LIMIT:
            text = json.dumps(_started | {"deps": {d: _digest(f) for d, f in _started["deps"].items()}})
        os.environ[ENV] = text


def _first_change(then: dict, now: dict) -> str | None:
    """What differs between two snapshots of one stage, named for the user; None if nothing."""
    if then["definition"] != now["definition"]:
        return f"its entry in {DVC_YAML} (deps, params or command)"
    for key, value in then["params"].items():
        current = now["params"].get(key, _canonical(MISSING))
        if current != value:
            file, name = key.split(":", 1)
            name, old, new = _leaf(name, json.loads(value), json.loads(current))
            return f"{file} key {name or '(the whole file)'} ({_shown(old)}, now {_shown(new)})"
    for dep, files in then["deps"].items():
        current = now["deps"][dep]
        if isinstance(files, str):  # a digest (a large snapshot passed to a rank)
            if files != _digest(current):
                return f"{dep} (a dependency in {DVC_YAML})"
            continue
        changed = sorted(set(files) ^ set(current) | {f for f in files if f in current and files[f] != current[f]})
        if changed:
            return f"{changed[0]} (under {dep}, a dependency in {DVC_YAML})" if changed[0] != dep else \
                f"{dep} (a dependency in {DVC_YAML})"  # fmt: skip
    return None


def check_unchanged() -> None:
    """Before a stage swaps its outputs in: InputsChanged naming the first declared input that changed since
    `remember()`. Nothing to check outside a stage run (no snapshot)."""
    if _started is None:
        return
    stage = _started["stage"]
    now = snapshot(stage, deps=list(_started["deps"]))
    change = _first_change(_started, now) if now else f"{DVC_YAML} (it no longer reads or has no stage {stage})"
    if change:
        raise InputsChanged(
            f"{change} changed while stage {stage} ran; dvc.lock would record the new version beside outputs made "
            f"from the old, so none was replaced: re-run the stage (`dvc repro`)"
        )
