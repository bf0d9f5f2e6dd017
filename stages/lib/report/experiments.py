"""Experiments as `dvc exp show --json` records them, as rows of a table: label, params, metrics, state."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.nested import flatten


@dataclass
class Row:
    """One commit or experiment: `label` (workspace, a branch or commit, `├ name` for an experiment), its params
    and metrics as flat dotted keys (params.yaml's `train.lora.r`; a metric as `<file stem>.<key>`, e.g.
    `tuned.loss`), and its state (queued, running, failed; '' when done)."""

    label: str
    params: dict
    metrics: dict
    state: str = ""


def _values(data: dict | None) -> tuple[dict, dict]:
    """(params, metrics) of one SerializableExp record: params.yaml's keys, metrics as `<stem>.<key>`."""
    data = data or {}
    params = flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    metrics = {}
    for path, result in (data.get("metrics") or {}).items():
        stem = path.rsplit("/", 1)[-1].removesuffix(".json")
        data = (result or {}).get("data")
        metrics |= flatten({stem: data}) if data is not None else {}
    return params, metrics


def rows(shown: list[dict]) -> list[Row]:
    """The rows of `dvc exp show --json` output `shown`: each baseline commit (the workspace first), then its
    experiments, newest first as DVC lists them."""
    out = []
    for baseline in shown:
        rev = baseline.get("rev", "")
        label = rev if rev == "workspace" else (baseline.get("name") or rev[:7])
        out.append(Row(label, *_values(baseline.get("data"))))
        for exp in baseline.get("experiments") or []:
            for state in exp.get("revs") or []:
                name = exp.get("name") or state.get("name") or state.get("rev", "")[:7]
                status = (exp.get("executor") or {}).get("state") or ""
                out.append(Row(f"├ {name}", *_values(state.get("data")),
                               state="" if status in ("success", "") else status))  # fmt: skip
    return out


def changed(rows: list[Row], key: str) -> list[str]:
    """The keys of rows' `key` dicts ('params' or 'metrics') whose values differ between rows, in first-seen order."""
    seen: dict[str, set] = {}
    for row in rows:
        for k, v in getattr(row, key).items():
            seen.setdefault(k, set()).add(repr(v))
    return [k for k, values in seen.items() if len(values) > 1 or any(k not in getattr(r, key) for r in rows)]


def short_names(keys: list[str]) -> dict[str, str]:
    """Column headers for dotted param keys: the last part (`learning_rate`), or more parts where the last is
    shorter than 3 characters (`lora.r`) or shared by two keys."""
    names = {}
    for key in keys:
        parts = key.split(".")
        n = 1
        while n < len(parts):
            clash = any(o != key and o.split(".")[-n:] == parts[-n:] for o in keys)
            if len(parts[-1]) >= 3 and not clash:
                break
            if n >= 2 and not clash:
                break
            n += 1
        names[key] = ".".join(parts[-n:])
    return names
