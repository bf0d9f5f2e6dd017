"""Sources → data/raw: normalize each, weight it, hold out a validation split by content, mix by a seeded shuffle.

data/raw/train.jsonl and validation.jsonl hold one `{"messages", "source", "record"}` object per line (record =
the number of the record in its source, for error messages downstream); manifest.json says where each source came
from and what became of its records. The split is by content: a record is validation when its content hash,
salted with the seed, ranks among the lowest; so exact duplicates and a weighted source's copies never sit on
both sides, and a record keeps its side when other sources are added. Weights apply to the training side only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.outputs import sha256_file
from ..core.params import DataParams, NetworkParams
from .normalize import DROP_REASONS, Normalizer
from .turns import drop_nulls
from .sources import label, open_source

BATCH = 1000


def _labels(data: DataParams) -> list[str]:
    names = [label(s) for s in data.sources]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def normalized(data: DataParams, labels: list[str], seed: int, workdir: Path, net: NetworkParams) -> list[tuple[object, dict]]:
    """Per source: its kept records (a Dataset with messages, key, record, source) and its counts."""
    import datasets

    datasets.disable_progress_bars()
    out = []
    for i, (src, name) in enumerate(zip(data.sources, labels)):
        ds, origin = open_source(src, seed, workdir / f"source-{i}", net)
        read = len(ds)
        if src.max_records:
            ds = ds.select(range(min(read, src.max_records)))
        fn = Normalizer(src, name, ds.column_names)
        ds = ds.map(fn, batched=True, batch_size=BATCH, with_indices=True, remove_columns=ds.column_names,
                    features=Normalizer.features(), new_fingerprint=f"normalize-{i}", load_from_cache_file=False,
                    desc=None)  # fmt: skip
        drops = Counter(ds["drop"])
        kept = ds.filter(lambda d: not d, input_columns="drop", batched=False, new_fingerprint=f"kept-{i}")
        counts = {"origin": origin, "read": read, "taken": len(ds), "kept": len(kept),
                  "dropped": {r: drops.get(r, 0) for r in DROP_REASONS}, "layouts": fn.layouts,
                  "ignored_columns": fn.unused()}  # fmt: skip
        out.append((kept.remove_columns("drop"), counts))
    return out


def validation_keys(keys: set[str], data: DataParams, seed: int) -> set[str]:
    """The held-out keys: the `validation_fraction` (at most max_validation) with the lowest seeded hash."""
    n_val = min(data.max_validation, max(1, round(len(keys) * data.validation_fraction)))
    if n_val >= len(keys):
        fix = "add records" + (" or lower data.validation_fraction" if n_val > 1 else "")
        raise UserError(
            f"data.sources give {len(keys)} distinct usable records: too few to hold out {n_val} for validation "
            f"and train on the rest ({fix})"
        )
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).digest())
    return set(ranked[:n_val])


def weighted(n: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Row indices for `weight` × n rows: every row int(weight) times, plus a seeded sample for the fraction."""
    whole, frac = int(weight), weight - int(weight)
    extra = rng.choice(n, size=round(frac * n), replace=False) if frac else np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate([np.repeat(np.arange(n), whole), extra])).astype(np.int64)


def write_jsonl(ds, path: Path) -> None:
    """One record a line: messages (keys that do not apply left out), tools (when the record has some), record,
    source."""
    with open(path, "w", encoding="utf-8") as f:
        for batch in ds.iter(batch_size=BATCH):
            for m, t, s, r in zip(batch["messages"], batch["tools"], batch["source"], batch["record"]):
                turns = [drop_nulls(turn) for turn in m]
                record = {"messages": turns, "record": r, "source": s} | ({"tools": t} if t else {})
                f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def build_raw(data: DataParams, seed: int, out: Path, workdir: Path, net: NetworkParams = NetworkParams()) -> dict:
    """Write data/raw's train.jsonl and validation.jsonl into `out`; returns the manifest (the caller writes it)."""
    from datasets import concatenate_datasets

    labels = _labels(data)
    parts = normalized(data, labels, seed, workdir, net)
    if not any(len(ds) for ds, _ in parts):
        reasons = Counter()
        for _, c in parts:
            reasons.update(c["dropped"])
        raise UserError(
            f"data.sources left no record to train on: dropped {_describe(reasons)}; check each source's format and "
            "columns (data.sources.N.columns maps our field names to yours)"
        )
    key_cols = [ds["key"] for ds, _ in parts]
    held_out = validation_keys({k for col in key_cols for k in col}, data, seed)
    train_parts, val_parts, seen, known = [], [], set(), set()
    rng = np.random.default_rng(seed)
    for number, ((ds, counts), src, key_col) in enumerate(zip(parts, data.sources, key_cols)):
        counts["duplicates"] = len(key_col) - len(set(key_col) - known)  # same content as a record before it
        known.update(key_col)
        val_rows = []
        for i, k in enumerate(key_col):
            if k in held_out and k not in seen:  # one copy of each held-out conversation
                seen.add(k)
                val_rows.append(i)
        train_rows = np.array([i for i, k in enumerate(key_col) if k not in held_out], dtype=np.int64)
        picked = train_rows[weighted(len(train_rows), src.weight, rng)]
        if len(train_rows) and not len(picked):  # a weight so small that nothing of the source is trained
            digits = 2 - math.floor(math.log10(1 / len(train_rows)))  # 1/n rounded up at 3 significant digits
            least = math.ceil(10**digits / len(train_rows)) / 10**digits
            raise UserError(f"data.sources.{number}.weight {src.weight:g} asks for {src.weight * len(train_rows):.3g} "
                            f"of its {len(train_rows)} training records, which rounds to none: raise it to at least "
                            f"{least:.3g} (one record) or remove the source")  # fmt: skip
        counts |= {"validation": len(val_rows), "train": len(picked), "weight": src.weight}
        val_parts.append(ds.select(val_rows))
        train_parts.append(ds.select(picked))
    train, validation = concatenate_datasets(train_parts), concatenate_datasets(val_parts)
    if len(parts) > 1:  # one source keeps its file order; eval's first max_samples rows must mix sources too
        train = train.select(np.random.default_rng(seed).permutation(len(train)))
        validation = validation.select(np.random.default_rng(seed + 1).permutation(len(validation)))
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(validation, out / "validation.jsonl")
    fmt = data.sources[0].format if data.sources[0].format in ("prompt_completion", "text") else "chat"
    manifest = {
        "format": fmt,
        "sources": dict(zip(labels, [c for _, c in parts])),
        "train_records": len(train),
        "validation_records": len(validation),
        "sha256": {name: sha256_file(out / name) for name in ("train.jsonl", "validation.jsonl")},
    }
    return manifest


def _describe(reasons: Counter) -> str:
    shown = [f"{n} {r}" for r, n in reasons.most_common() if n]
    return ", ".join(shown) or "nothing (the sources are empty)"


def summary_line(manifest: dict) -> str:
    """One line a person reads: per source, kept of read and drops by reason."""
    parts = []
    for name, c in manifest["sources"].items():
        dropped = {r: n for r, n in c["dropped"].items() if n}
        extra = f", dropped {', '.join(f'{n} {r}' for r, n in dropped.items())}" if dropped else ""
        ignored = f", ignored columns {', '.join(c['ignored_columns'])}" if c["ignored_columns"] else ""
        weight = f", weight {c['weight']:g} -> {c['train']} train rows" if c["weight"] != 1 else ""
        taken = f" (the first {c['taken']}: max_records)" if c["taken"] < c["read"] else ""
        dups = f", {c['duplicates']} duplicates (kept on one side of the split)" if c.get("duplicates") else ""
        parts.append(f"{name}: {c['kept']} of {c['read']} kept{taken}{extra}{weight}{ignored}{dups}")
    return (f"download: {manifest['train_records']} train / {manifest['validation_records']} validation records ("
            + "; ".join(parts) + ")")
