"""Checkpoints an interrupted train stage resumes from, in models/checkpoints (a `persist` DVC output).

Each `checkpoint-<step>/` is what transformers' Trainer writes (adapter, optimizer, scheduler, per-rank RNG state,
trainer_state.json; under DeepSpeed `global_step<step>/` with every rank's ZeRO shard), plus two entries of ours:
`dvclive/` (the curves up to that step), `log_window-rank<r>.json` (the losses summed since the last logged step,
so that the resumed run logs what the uninterrupted one logs) and `run.json`, written last, once every rank has
saved. A folder without
run.json is a save that was cut short: it is never loaded, and it is deleted at the next start.

run.json holds the run identity: the params that change the weights, a SHA-256 of data/tokenized and of
models/base, and the world size. A run resumes only from a checkpoint whose identity equals its own; otherwise it
starts fresh and names the first difference. A changed world size always starts fresh: ZeRO shards and the data
order are laid out per rank. Code and library versions are not part of the identity (a bug fix may continue a
run); run.json records the versions for the curious.

When the run completes, the stage empties the folder but for its committed ABOUT.txt: the adapter is the result.
The folder is a `cache: false` output whose other contents git ignores, so `dvc exp run` and `dvc checkout` leave an
interrupted run's checkpoints where they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..core.nested import flatten
from ..core.outputs import write_json
from ..core.params import Params

RECORD = "run.json"
WINDOW = "log_window-rank{rank}.json"
HASH_CACHE = ".file_hashes.json"  # (size, mtime, inode) -> SHA-256, so that a resumed 70B is not hashed again
PATTERN = re.compile(r"^checkpoint-(\d+)$")
# train params that change what is logged or when it is saved, never the weights
NOT_IN_IDENTITY = ("logging_steps", "save_steps", "save_minutes", "save_total_limit", "eval_steps", "report_to",
                   "token_metrics", "launch")  # fmt: skip
# the folder's committed note, so that the output exists in a fresh clone (not README.md: transformers writes a
# model card there)
KEEP = "ABOUT.txt"


def run_identity(params: Params, world_size: int, inputs: dict[str, Path], cache_dir: Path) -> dict:
    """What a checkpoint must share with this run to be resumed: flat params, input hashes, world size.

    `inputs` maps a name (data/tokenized, models/base) to a folder whose files are hashed (SHA-256 of the
    sorted relative paths and file digests; each file digest is cached in cache_dir by size, mtime and inode).
    """
    dump = params.model_dump(mode="json")
    train = {k: v for k, v in dump["train"].items() if k not in NOT_IN_IDENTITY}
    if train["max_steps"] > 0:
        del train["epochs"]  # ignored when max_steps is set
    model = {k: dump["model"][k] for k in ("recipe", "rope_scaling")}
    flat = flatten({"seed": dump["seed"], "model": model, "tokenize": {"max_length": dump["tokenize"]["max_length"]},
                  "train": train})  # fmt: skip
    hashes = FileHashes(cache_dir / HASH_CACHE)
    identity = {"params": flat, "inputs": {name: hashes.tree(root) for name, root in inputs.items()},
                "world_size": world_size}  # fmt: skip
    hashes.save()
    return identity


class FileHashes:
    """SHA-256 per file, remembered by (size, mtime_ns, inode) like DVC's own state database."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def tree(self, root: Path) -> str:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
            digests = list(pool.map(self.file, files))
        listing = "".join(f"{p.relative_to(root).as_posix()}\t{d}\n" for p, d in zip(files, digests))
        return hashlib.sha256(listing.encode()).hexdigest()

    def file(self, path: Path) -> str:
        stat = path.stat()
        key = f"{path.resolve()}"
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self.known.get(key)
        if entry and entry[:3] == stamp:
            return entry[3]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        self.known[key] = [*stamp, digest.hexdigest()]
        return digest.hexdigest()

    def save(self) -> None:
        if self.path.parent.is_dir():
            write_json(self.path, self.known)


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder under root, complete or not, oldest first."""
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := PATTERN.match(p.name)) and p.is_dir()]
    return sorted(found)


def complete(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def difference(saved: dict, now: dict) -> str | None:
    """The first way `saved` (a checkpoint's identity) differs from `now`, in words; None when equal."""
    if saved.get("world_size") != now["world_size"]:
        return (f"it was saved by {saved.get('world_size')} ranks and this run has {now['world_size']} (ZeRO shards "
                "and the data order are laid out per rank)")  # fmt: skip
    old, new = saved.get("params", {}), now["params"]
    for key in sorted(set(old) | set(new)):  # before the inputs: a changed seed also changes data/tokenized
        # a param added since, at its default null (off), is what the saved run did: not a difference
        if old.get(key) != new.get(key):
            return f"{key} was {old.get(key, '<unset>')!r}, now {new.get(key, '<unset>')!r}"
    for name, digest in now["inputs"].items():
        if saved.get("inputs", {}).get(name) != digest:
            return f"{name} changed since"
    return None


def choose(root: Path, identity: dict) -> tuple[Path | None, str]:
    """The newest complete checkpoint under root with this identity, and a one-line account of the choice."""
    found = checkpoints(root)
    if not found:
        return None, f"starting fresh (no checkpoint in {root})"
    for step, folder in reversed(found):
        saved = complete(folder)
        if saved is None:
            continue
        why = difference(saved, identity)
        if why is None:
            return folder, f"resuming from {folder} (step {step})"
        return None, f"starting fresh, not from {folder}: {why}"
    return None, f"starting fresh: {found[-1][1]} is incomplete (the run stopped while saving it)"


def mark_complete(folder: Path, identity: dict, step: int) -> None:
    """Write run.json: from here on the checkpoint may be loaded."""
    import peft
    import torch
    import transformers
    import trl

    versions = {m.__name__: m.__version__ for m in (torch, transformers, trl, peft)}
    write_json(folder / RECORD, identity | {"step": step, "versions": versions})


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; delete older ones and incomplete ones older than the newest."""
    found = checkpoints(root)
    done = [step for step, folder in found if complete(folder) is not None]  # oldest first
    kept = set(done[-keep:])
    newest = done[-1] if done else -1
    for step, folder in found:
        if step not in kept and (step in done or step < newest):
            shutil.rmtree(folder, ignore_errors=True)


def clear(root: Path, resume: Path | None = None, keep_hashes: bool = True) -> None:
    """Delete every checkpoint a run must not load or overwrite; with keep_hashes=False, all but ABOUT.txt.

    Resuming keeps `resume` and the complete checkpoints before it (saves cut short after it would be
    overwritten); a fresh start deletes all of them.
    """
    if not root.is_dir():
        return
    last = int(PATTERN.match(resume.name).group(1)) if resume else -1
    for entry in root.iterdir():
        match = PATTERN.match(entry.name)
        if entry.name == KEEP or (keep_hashes and entry.name == HASH_CACHE) or (match and int(match.group(1)) <= last and complete(entry) is not None):
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def complete_after_save(identity: dict, live_dir: Path, keep: int):
    """A TrainerCallback: after every rank has saved a checkpoint, add the curves and run.json, then prune."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if args.process_index == 0 and live_dir.is_dir():
                shutil.copytree(live_dir, folder / "dvclive", dirs_exist_ok=True)
            if dist.is_initialized():
                dist.barrier()  # every rank's shard, RNG state and the curves are on disk
            if args.local_process_index == 0:  # one per node: a folder not shared between nodes is marked too
                mark_complete(folder, identity, state.global_step)
                prune(Path(args.output_dir), keep)

    return MarkComplete()


class KeepAdapterDtype:
    """A Trainer mixin: resuming keeps the trainable weights in the dtype they were trained in.

    TRL keeps QLoRA adapters in bfloat16; PEFT's load_adapter, which transformers calls on resume, upcasts them to
    float32, so a resumed run would continue in another precision than the run it continues.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model if model is not None else self.model
        dtypes = {name: p.dtype for name, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in target.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])


class CarryLogWindow:
    """A Trainer mixin: a run resumed from a checkpoint logs the losses an uninterrupted run logs.

    The Trainer logs the mean loss of the steps since its last log, from a running float32 sum (`_tr_loss`) and the
    step of that log (`_globalstep_last_logged`); a checkpoint keeps neither, so after a resume the window the stop
    cut averaged only the steps since the resume, and the curve, train_config.json's loss history and the adapter's
    hash differed from the uninterrupted run's. Each rank saves both (and TRL's per-window metric lists) with the
    checkpoint and puts them back before the first resumed step: the sum then continues from the same float32
    value, term by term as before.
    """

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        window = {"loss_sum": float(self._tr_loss.item()), "last_logged": self._globalstep_last_logged,
                  "metrics": {k: list(v) for k, v in getattr(self, "_metrics", {}).get("train", {}).items()}}  # fmt: skip
        write_json(folder / WINDOW.format(rank=self.args.process_index), window)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / WINDOW.format(rank=self.args.process_index)
        self._carried_window = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if not getattr(self, "_restores_window", False):
            self.add_callback(_RestoreWindow(self))
            self._restores_window = True


def _restore_window(trainer) -> None:
    import torch

    window = getattr(trainer, "_carried_window", None)
    if window is None:
        return
    trainer._carried_window = None
    trainer._tr_loss = torch.tensor(window["loss_sum"], dtype=trainer._tr_loss.dtype, device=trainer._tr_loss.device)
    trainer._globalstep_last_logged = window["last_logged"]
    metrics = getattr(trainer, "_metrics", None)
    if metrics is not None:
        for key, values in window["metrics"].items():
            metrics["train"][key] = values + list(metrics["train"].get(key, []))


def _RestoreWindow(trainer):
    """A callback that puts the carried window back once the Trainer has reset it (at train begin)."""
    from transformers import TrainerCallback

    class RestoreWindow(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            _restore_window(trainer)

    return RestoreWindow()
