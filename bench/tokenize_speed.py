"""Tokenize throughput on the CPU: the tokenize stage's work against a plain batched tokenizer call over the same
texts (the practical ceiling) and against the seed's per-example `map` with padding to 512.

    python bench/tokenize_speed.py --data ../shared/data [--repeat 10]

Same records (alpaca_zh, repeated), same Qwen2 tokenizer, seed template; best of 3 runs each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml


def best_of(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer

    from stages.lib.chat import format as chat_format
    from stages.lib.core.params import validate
    from stages.lib.core.recipes import template_recipe
    from stages.lib.data.normalize import Normalizer
    from stages.tokenize import encode_conversations

    disable_progress_bars()
    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["tokenize"] |= {"template": "seed", "max_length": 512}
    params = validate(raw)
    tokenizer = AutoTokenizer.from_pretrained(args.data / "tokenizers" / "qwen2")
    records = json.loads((args.data / "instruct" / "alpaca_zh_demo.json").read_text()) * args.repeat

    fmt = chat_format.decide(tokenizer, template_recipe("seed"), "seed", [])
    texts = [f"### 问题：\n{r['instruction']}\n{r['input']}\n\n### 回答：\n{r['output']}" if r["input"] else
             f"### 问题：\n{r['instruction']}\n\n### 回答：\n{r['output']}" for r in records]  # fmt: skip
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])

    columns = ["instruction", "input", "output"]
    normalizer = Normalizer(params.data.sources[0], "bench", columns)

    def stage():  # records → messages, render with the chat template, tokenize, tokenize the prompts again
        batch = {c: [r[c] for r in records] for c in columns}
        conversations = normalizer(batch, list(range(len(records))))["messages"]
        encode_conversations(conversations, params, tokenizer, fmt)

    def ceiling():
        tokenizer(texts)

    def seed():
        def preprocess(example):
            prompt = f"### 问题：\n{example['instruction']}\n{example['input']}\n\n### 回答：\n"
            inputs = tokenizer(prompt, truncation=True, padding="max_length", max_length=512)
            inputs["labels"] = tokenizer(example["output"], truncation=True, padding="max_length", max_length=512)[
                "input_ids"
            ]
            return inputs

        Dataset.from_list(records).map(preprocess, keep_in_memory=True)

    results = {name: best_of(fn, 1 if name == "seed" else 3) for name, fn in
               [("ceiling", ceiling), ("stage", stage), ("seed", seed)]}  # fmt: skip
    for name, seconds in results.items():
        print(f"{name:8s} {seconds:7.2f} s  {len(records) / seconds:9.0f} records/s  {tokens / seconds:10.0f} tokens/s"
              f"  {results['ceiling'] / seconds:6.1%} of the ceiling")


if __name__ == "__main__":
    main()
