"""Memory and time of download + tokenize on a large local set (the data layer's scale check; CPU).

    python bench/data_scale.py --data ../shared/data [--records 1000000] [--work bench/work/scale]

Writes a JSON Lines alpaca file of N distinct records (alpaca_zh cycled, each made unique by its number) into a
throwaway project (this checkout's stages and recipes, a tiny random Qwen2 on the real Qwen2 tokenizer, chatml,
max_length 512), then runs the download and tokenize stages as the pipeline runs them, each in its own process,
and reports wall time and that process's peak RSS (wait4). Baseline in the same run: reading the same file into a
Python list of dicts, which is how the stages read data before the data layer (session 5) — the floor of the
old path's memory, before any tokenization. RSS is sampled every 0.2 s over the stage's process tree (tokenize maps
on every core from 50,000 records).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {
    "description": "tiny random Qwen2 on the real Qwen2 tokenizer (benchmark only)",
    "source": {"kind": "config", "model_type": "qwen2",
               "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2}},
    "template": "chatml", "lora_targets": ["q_proj"], "dtype": "float32",
}  # fmt: skip


def tree_rss(root: int) -> int:
    """Bytes of RSS summed over `root` and its descendants (/proc; pages shared after fork count twice)."""
    parent, rss = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parent[int(entry.name)], rss[int(entry.name)] = int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(rss.get(p, 0) for p in tree)


def measured(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS GiB summed over the process tree, output)."""
    start = time.perf_counter()
    log = open(cwd / "stage.log", "w+")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))  # fmt: skip
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    log.seek(0)
    out = log.read()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return seconds, peak / 2**30, out


def write_set(path: Path, n: int, data: Path) -> None:
    base = json.loads((data / "instruct" / "alpaca_zh_demo.json").read_text())
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            r = base[i % len(base)]
            f.write(json.dumps({"instruction": f"{r['instruction']}（{i}）", "input": r["input"], "output": r["output"]},
                               ensure_ascii=False) + "\n")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "scale")
    args = ap.parse_args()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "data" / "sources").mkdir(parents=True)
    (work / "models" / "sources").mkdir(parents=True)
    shutil.copytree(ROOT / "recipes", work / "recipes")
    (work / "recipes" / "models" / "tiny-qwen2-bench.yaml").write_text(yaml.safe_dump(RECIPE))
    shutil.copytree(args.data / "tokenizers" / "qwen2", work / "models" / "sources" / "qwen2")
    data = work / "data" / "sources" / "big.jsonl"
    write_set(data, args.records, args.data)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] = {"sources": [{"kind": "local", "path": "data/sources/big.jsonl"}], "validation_fraction": 0.001}
    params["model"] |= {"recipe": "tiny-qwen2-bench", "tokenizer": "models/sources/qwen2"}
    params["tokenize"] |= {"max_length": 512}
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))

    py = sys.executable
    baseline = ("import json; rows = [json.loads(l) for l in open('data/sources/big.jsonl', encoding='utf-8')]; "
                "print(len(rows))")  # fmt: skip
    rows = [("baseline: the file as a Python list of dicts", measured([py, "-c", baseline], work))]
    for stage in ("download", "tokenize"):
        rows.append((f"{stage} stage", measured([py, "-m", f"stages.{stage}"], work)))
    size = data.stat().st_size / 2**30
    print(f"{args.records:,} records, {size:.2f} GiB of JSON Lines")
    print("| step | seconds | peak RSS GiB (all its processes) |\n|---|---|---|")
    for name, (seconds, rss, out) in rows:
        print(f"| {name} | {seconds:.0f} | {rss:.2f} |")
    for _, (*_, out) in rows[1:]:
        print("\n".join(line for line in out.splitlines() if line.startswith(("download:", "tokenize:"))))


if __name__ == "__main__":
    main()
