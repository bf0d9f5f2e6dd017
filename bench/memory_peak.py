"""What is on the GPU at a run's memory peak, and who allocated it.

Reads the CUDA memory snapshots that the train stage writes when TRAIN_MEMORY_SNAPSHOT=DIR is set (one pickle per
rank), replays each allocation trace to its highest point, and prints the blocks alive there grouped by the Python
frames that allocated them, largest first. Blocks allocated before recording began (the resident weights) are not
in the trace: the numbers are the peak above the memory held at the first step.

    python bench/memory_peak.py /tmp/snap/rank0.pickle [...] [--top 25]
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict

GIB = 1024**3
# frames from these files say why a block exists; torch's own internals do not
TELLING = ("deepspeed/", "bitsandbytes/", "peft/", "trl/", "transformers/", "stages/", "utils/checkpoint.py",
           "autograd/function.py", "accelerate/")  # fmt: skip


def trace_of(snapshot: dict) -> list[dict]:
    traces = [t for t in snapshot["device_traces"] if t]
    return traces[0] if traces else []


def site(frames: list[dict], depth: int) -> str:
    telling = [f for f in frames if any(part in f["filename"] for part in TELLING)]
    return " < ".join(f"{f['filename'].split('site-packages/')[-1]}:{f['line']}({f['name']})" for f in telling[:depth])


def replay(trace: list[dict], stop: int | None = None) -> tuple[int, int, dict]:
    """Bytes above the starting point at the highest moment, its event index, and the blocks alive at `stop`."""
    live: dict[int, dict] = {}
    now = best = 0
    best_at = -1
    for i, event in enumerate(trace[: None if stop is None else stop + 1]):
        if event["action"] == "alloc":
            now += event["size"]
            live[event["addr"]] = event
            if now > best:
                best, best_at = now, i
        elif event["action"] == "free_completed":
            now -= event["size"]
            live.pop(event["addr"], None)
    return best, best_at, live


def report(path: str, top: int, depth: int) -> None:
    with open(path, "rb") as f:
        trace = trace_of(pickle.load(f))
    best, best_at, _ = replay(trace)
    _, _, live = replay(trace, best_at)
    groups: dict[str, list[int]] = defaultdict(list)
    for event in live.values():
        groups[site(event["frames"], depth)].append(event["size"])
    print(f"== {path}: {len(trace)} events; peak {best / GIB:.2f} GiB above the first step, at event {best_at}, "
          f"allocated by {site(trace[best_at]['frames'], depth)}")  # fmt: skip
    for key, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"{sum(sizes) / GIB:7.3f} GiB {len(sizes):5d} blocks (largest {max(sizes) / 2**20:8.1f} MiB)  {key}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshots", nargs="+")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--depth", type=int, default=4, help="telling frames per allocation site")
    args = ap.parse_args()
    for path in args.snapshots:
        report(path, args.top, args.depth)


if __name__ == "__main__":
    main()
