"""The planner's predicted peak GPU memory against every measured configuration in bench/RESULTS.md.

Builds each benchmark's model on the meta device (bench/topologies.py shapes), asks stages/lib/train/plan.py for
the load and training peaks per GPU of the setting that ran, and prints them next to the measured peaks
(`max_memory_allocated`, GiB per rank) with the relative error. No GPU needed.

    python bench/plan_calibration.py
    python bench/plan_calibration.py --measured OUT/a.jsonl     # + bench/throughput.py's lines (7B, one GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
OLD_ZERO3 = str(ROOT / "bench" / "configs" / "zero3-session9.json")  # the zero3 recipes until session 10
OLD_OFFLOAD = str(ROOT / "bench" / "configs" / "zero3-offload-session9.json")
R16 = {"lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "liger": True}  # pipelines/qwen2.5-7b-1gpu's LoRA
ALL7 = QKVO + ["gate_proj", "up_proj", "down_proj"]
# (what, RESULTS section, size, row tokens, train changes, DeepSpeed, GPUs, LoRA targets, load GiB, train GiB)
MEASURED = [
    ("7B QLoRA, 1 GPU, no DeepSpeed", "1c", "7b", 8192, {}, "none", 1, QKVO, 5.29, 9.09),
    ("7B QLoRA, 1 GPU, zero3", "1c", "7b", 8192, {}, OLD_ZERO3, 1, QKVO, 5.25, 9.22),
    ("7B QLoRA, 2 GPUs, zero3", "1c", "7b", 8192, {}, OLD_ZERO3, 2, QKVO, 2.72, 6.90),
    ("7B QLoRA, 2 GPUs, zero3-offload", "1c", "7b", 8192, {}, OLD_OFFLOAD, 2, QKVO, 0.27, 4.32),
    ("7B QLoRA, 2 GPUs, zero2", "1c", "7b", 8192, {}, "zero2", 2, QKVO, 5.22, 9.11),
    ("7B QLoRA, 1 GPU, no checkpointing", "2", "7b", 8192, {"gradient_checkpointing": False}, "none", 1,
     ["q_proj", "k_proj", "v_proj"], None, 44.18),
    ("7B QLoRA, 1 GPU (throughput bench)", "2", "7b", 8192, {}, "none", 1, ["q_proj", "k_proj", "v_proj"], None, 9.08),
    ("7B 16-bit LoRA, 1 GPU, zero3", "1b", "7b", 8192, {"method": "lora"}, OLD_ZERO3, 1, QKVO, 15.23, 18.31),
    ("7B 16-bit LoRA, 2 GPUs, zero3", "1b", "7b", 8192, {"method": "lora"}, OLD_ZERO3, 2, QKVO, 8.11, 11.59),
    ("1.5B QLoRA (tied), 2 GPUs, zero3", "1b", "1.5b", 8192, {}, OLD_ZERO3, 2, QKVO, None, 2.57),
    ("14B QLoRA, 2 GPUs, zero3 (cap 9)", "1c", "14b", 1024, {}, OLD_ZERO3, 2, QKVO, 4.82, 7.17),
    ("14B QLoRA, 2 GPUs, zero3-offload (cap 8)", "1c", "14b", 1024, {}, OLD_OFFLOAD, 2, QKVO, 0.37, 3.21),
    # session 10, one lease (§5): the zero3 recipe with leaf modules, auto's choices, the 7B pipeline's settings
    ("7B QLoRA, 2 GPUs, zero3 (recipe since session 10)", "5", "7b", 8192, {}, "zero3", 2, QKVO, 2.73, 7.93),
    ("7B QLoRA, 1 GPU, zero3 (recipe since session 10)", "5", "7b", 8192, {}, "zero3", 1, QKVO, 5.27, 9.25),
    ("7B QLoRA, 2 GPUs, zero3-offload (recipe since session 10)", "5", "7b", 8192, {}, "zero3-offload", 2, QKVO,
     0.27, 5.30),
    ("7B QLoRA, 2 GPUs, zero2, no checkpointing (auto)", "5", "7b", 8192, {"gradient_checkpointing": False}, "zero2",
     2, QKVO, 5.22, 44.21),
    ("7B pipeline (r16, all 7, Liger), 1 GPU", "5", "7b", 8192, R16, "none", 1, ALL7, 5.33, 8.96),
    ("7B pipeline (r16, all 7, Liger), 1 GPU, no checkpointing (auto)", "5", "7b", 8192,
     R16 | {"gradient_checkpointing": False}, "none", 1, ALL7, 5.33, 42.72),
]  # fmt: skip


def meta(size: str):
    import torch
    from topologies import SIZES
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **SIZES[size]))


def rows() -> list[dict]:
    """One dict per measured configuration: what, section, predicted and measured load/train GiB per rank."""
    from topologies import base_params

    from stages.lib.core.params import Params
    from stages.lib.train.plan import Setting, estimate

    models, out = {}, []
    for what, section, size, row, changes, ds, gpus, targets, load, train in MEASURED:
        raw = base_params(8, None if ds == "none" else "zero3", row)
        raw["train"] |= {"packed_length": row, "attn_implementation": "varlen", "token_metrics": False} | changes
        params = Params.model_validate(raw)
        model = models.setdefault(size, meta(size))
        e = estimate(model, params, Setting(ds, params.train.gradient_checkpointing, gpus), targets)
        out.append({"what": what, "section": section, "load": (e.load_peak, load), "train": (e.train_peak, train)})
    return out


def measured_rows(path: Path, section: str = "7") -> list[dict]:
    """bench/throughput.py's JSON lines (the 7B shape, one GPU, no DeepSpeed, the topologies LoRA on q/k/v/o): the
    planner's training peak for each line's gradient_checkpointing against its measured peak_gib."""
    from throughput import VARIANTS
    from topologies import base_params

    from stages.lib.core.params import Params
    from stages.lib.train.plan import Setting, estimate

    model, out = meta("7b"), []
    for line in path.read_text().splitlines():
        run = json.loads(line)
        if "gradient_checkpointing" not in run or not run.get("peak_gib"):
            continue  # another trainer (unsloth, TRL's defaults): the planner models the stage only
        changes = VARIANTS.get(run["variant"], ({}, {}))[0]
        layers = changes.get("checkpoint_layers")
        raw = base_params(8, None, 2048)
        raw["train"] |= {"packed_length": 8192, "attn_implementation": "varlen", "token_metrics": False} | changes | {
            "gradient_checkpointing": run["gradient_checkpointing"]}  # auto's choice where it chose
        params = Params.model_validate(raw)
        e = estimate(model, params, Setting("none", run["gradient_checkpointing"], 1, layers), QKVO)
        out.append({"what": f"7B QLoRA, 1 GPU, {run['variant']}", "section": section,
                    "load": (e.load_peak, None), "train": (e.train_peak, run["peak_gib"]), "host": e.host})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", type=Path, help="bench/throughput.py --out lines to compare as well")
    ap.add_argument("--section", default="7", help="the RESULTS section the --measured lines belong to")
    args = ap.parse_args()
    print("| configuration | RESULTS | load GiB predicted / measured | train GiB predicted / measured | train error |")
    print("|---|---|---|---|---|")
    for r in rows() + (measured_rows(args.measured, args.section) if args.measured else []):
        (pl, ml), (pt, mt) = r["load"], r["train"]
        load = f"{pl:.2f} / {ml:.2f}" if ml is not None else f"{pl:.2f} / —"
        print(f"| {r['what']} | §{r['section']} | {load} | {pt:.2f} / {mt:.2f} | {(pt - mt) / mt:+.1%} |")


if __name__ == "__main__":
    main()
