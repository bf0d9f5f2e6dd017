"""Interrupt and resume the train stage on GPUs: two ranks under ZeRO-3, a random-weight Qwen2 (7B shape).

One uninterrupted run, then the same run killed with kill -9 after its first checkpoint, resumed, stopped with
SIGTERM after a later checkpoint, and resumed to the end. Prints one JSON line per phase: seconds, the step it
resumed from or stopped at, checkpoint size, and finally the resumed adapter and loss curve against the
uninterrupted run's (max |difference|).

    python bench/resume.py --data DIR --work bench/work/resume --phase reference|interrupted [--size 7b]

DIR holds alpaca_zh_demo.json and qwen2/, as in ../shared/data. The phases can run in separate calls (the base
model and tokenized data are built once, under --work).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topologies import node_dir, prepare, summary  # noqa: E402

SETTINGS = {"deepspeed": "zero3", "grad_accum": 2, "save_steps": 8, "save_total_limit": 2, "logging_steps": 1,
            "launch": {"gpus_per_node": 2, "master_port": 29700, "timeout_minutes": 10}}  # fmt: skip


def params_for(base: Path, steps: int) -> dict:
    params = yaml.safe_load((base / "params.yaml").read_text())
    params["train"] |= SETTINGS | {"max_steps": steps}
    return params


STARTS = iter(range(100))


def start(d: Path, log: Path) -> subprocess.Popen:
    """The train stage in d, on a fresh master port (a killed run's port may still be held)."""
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["train"]["launch"]["master_port"] = 29700 + next(STARTS)  # launch is not part of the run identity
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=d, stdout=open(log, "a"),
                            stderr=subprocess.STDOUT)  # fmt: skip


def wait_for_checkpoint(d: Path, step: int, proc: subprocess.Popen) -> None:
    while not (d / "models" / "checkpoints" / f"checkpoint-{step}" / "run.json").exists():
        if proc.poll() is not None:
            raise SystemExit(f"the run ended (exit {proc.returncode}) before checkpoint-{step}")
        time.sleep(0.5)


def ranks_alive() -> int:
    out = subprocess.run(["pgrep", "-f", "-u", str(os.getuid()), "stages.train"], capture_output=True,
                         text=True).stdout  # fmt: skip
    return len(out.split())


def checkpoint_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def phase_line(**fields) -> None:
    print(json.dumps(fields), flush=True)


def reference(work: Path, base: Path, steps: int, name: str = "reference") -> None:
    d = node_dir(work, base, name, 0, params_for(base, steps))
    t = time.time()
    proc = start(d, d / "train.log")
    if proc.wait():
        raise SystemExit(f"reference run failed, see {d / 'train.log'}")
    phase_line(phase=name, seconds=round(time.time() - t, 1), **summary("2gpu", d, time.time() - t))


def interrupted(work: Path, base: Path, steps: int) -> None:
    d = node_dir(work, base, "interrupted", 0, params_for(base, steps))
    log = d / "train.log"
    t = time.time()
    proc = start(d, log)
    wait_for_checkpoint(d, 8, proc)
    size = checkpoint_mib(d / "models" / "checkpoints" / "checkpoint-8")
    killed = time.time()
    proc.kill()  # kill -9 of the stage process: its ranks must follow
    proc.wait()
    while ranks_alive():
        time.sleep(0.5)
    phase_line(phase="kill -9 after checkpoint-8", seconds=round(killed - t, 1), checkpoint_mib=round(size, 1),
               ranks_gone_after_s=round(time.time() - killed, 1))  # fmt: skip

    t = time.time()
    proc = start(d, log)
    wait_for_checkpoint(d, 16, proc)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    text = log.read_text()
    stopped = re.findall(r"stopped by SIGTERM after step (\d+)", text)
    phase_line(phase="resume, then SIGTERM after checkpoint-16", seconds=round(sent - t, 1), exit_code=code,
               resumed_from=re.findall(r"resuming from \S+ \(step (\d+)\)", text), stopped_at=stopped,
               sigterm_to_exit_s=round(time.time() - sent, 1))  # fmt: skip

    t = time.time()
    proc = start(d, log)
    if proc.wait():
        raise SystemExit(f"the resumed run failed, see {log}")
    text = log.read_text()
    phase_line(phase="resume to the end", seconds=round(time.time() - t, 1),
               resumed_from=re.findall(r"resuming from \S+ \(step (\d+)\)", text)[-1:],
               checkpoints_left=sorted(p.name for p in (d / "models" / "checkpoints").iterdir()))  # fmt: skip
    compare(work / "reference" / "node0", d)


def compare(ref: Path, d: Path, what: str = "resumed vs uninterrupted") -> None:
    from safetensors.torch import load_file

    a = load_file(ref / "models" / "adapter" / "adapter_model.safetensors")
    b = load_file(d / "models" / "adapter" / "adapter_model.safetensors")
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    scale = max(float(a[k].float().abs().max()) for k in a)
    la = {h["step"]: h["loss"] for h in json.loads((ref / "models" / "adapter" / "train_config.json").read_text())["loss_history"]}
    lb = {h["step"]: h["loss"] for h in json.loads((d / "models" / "adapter" / "train_config.json").read_text())["loss_history"]}
    common = sorted(set(la) & set(lb))
    phase_line(phase=what, adapter_max_abs_diff=diff, adapter_max_abs=scale,
               bit_identical=diff == 0.0, loss_steps_compared=len(common),
               loss_max_abs_diff=max(abs(la[s] - lb[s]) for s in common),
               loss_abs_diff_by_step=[float(f"{abs(la[s] - lb[s]):.2g}") for s in common],
               loss_last=[la[common[-1]], lb[common[-1]]])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("bench/work/resume"))
    ap.add_argument("--phase", choices=("reference", "interrupted", "both", "noise"), default="both",
                    help="noise: a second uninterrupted run against the first (the run-to-run difference)")
    ap.add_argument("--size", default="7b")
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    work = args.work.resolve()
    base = prepare(work, args.data.resolve(), args.size, args.steps, "zero3")
    if args.phase in ("reference", "both"):
        reference(work, base, args.steps)
    if args.phase in ("interrupted", "both"):
        interrupted(work, base, args.steps)
    if args.phase == "noise":
        reference(work, base, args.steps)
        reference(work, base, args.steps, "reference-again")
        compare(work / "reference" / "node0", work / "reference-again" / "node0", "uninterrupted vs uninterrupted")


if __name__ == "__main__":
    main()
