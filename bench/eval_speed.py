"""Eval generation speed: the eval stage's batched, left-padded generation with a KV cache, by batch size.

Runs `stages.eval.generate` (the function the eval stage calls) on a benchmark model prepared by
bench/topologies.py (`--runs ''`, same --work and --size) in bfloat16 on one GPU, over the first --samples
validation prompts, with every answer forced to --new-tokens tokens (no stop token: random weights rarely emit
one, and equal lengths make batch sizes comparable). Batch size 1 is the baseline: one prompt at a time, as a
hand-written loop over `generate` does. Prints one JSON line per batch size: samples/s, new tokens/s, seconds,
peak GiB.

    python bench/eval_speed.py --work /tmp/topo --size 7b --samples 64 --new-tokens 128 --batch-sizes 1,8,32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/topologies"))
    ap.add_argument("--size", default="7b")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per batch size here")
    args = ap.parse_args()
    base = (args.work / f"base-{args.size}").resolve()
    os.chdir(base)  # the stages read project-relative paths
    sys.path.insert(0, str(base))
    import torch
    from transformers import AutoModelForCausalLM

    from stages.eval import generate
    from stages.lib.core.earlier import load_saved, load_tokenizer

    tokenized = Path("data/tokenized")
    validation = load_saved(tokenized, "tokenize")["validation"]
    rows = validation.select(range(min(args.samples, len(validation)))).to_list()
    tokenizer = load_tokenizer(tokenized / "tokenizer", tokenized, "tokenize")
    gpu = torch.cuda.is_available()  # a CPU run is a smoke test of the script, not a measurement
    model = AutoModelForCausalLM.from_pretrained("models/base", dtype=torch.bfloat16).to("cuda" if gpu else "cpu").eval()
    model.generation_config.min_new_tokens = args.new_tokens  # every answer the same length
    prompt_tokens = sum(r["prompt_length"] for r in rows)
    generate(model, tokenizer, rows[:2], 2, [4, 4], [tokenizer.eos_token_id])  # warm-up: kernels, allocator
    for batch in map(int, args.batch_sizes.split(",")):
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        _, cut = generate(model, tokenizer, rows, batch, [args.new_tokens] * len(rows), [tokenizer.eos_token_id])
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        line = {"size": args.size, "batch_size": batch, "samples": len(rows), "new_tokens": args.new_tokens,
                "prompt_tokens_mean": prompt_tokens / len(rows), "seconds": round(seconds, 2),
                "samples_per_s": round(len(rows) / seconds, 3),
                "new_tokens_per_s": round(len(rows) * args.new_tokens / seconds, 1),
                "all_cut": all(cut), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
                "gpu": torch.cuda.get_device_name(0) if gpu else "cpu"}  # fmt: skip
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
