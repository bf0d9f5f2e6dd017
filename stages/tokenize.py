"""Stage 2, tokenize: data/raw + the base tokenizer → data/tokenized (Arrow) + metrics/tokenize.json.

Each record becomes `input_ids` and `completion_mask` (1 on the answer and its EOS), the pre-tokenized format
TRL's SFTTrainer reads: TRL turns the mask into labels (-100 on the prompt) and pads or packs the batches.
The prompt/answer boundary follows TRL's own rule for prompt-completion data, but costs one batched tokenizer
call instead of two: a token belongs to the answer when its text ends past the end of the prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from stages.lib.errors import UserError, run_stage
from stages.lib.outputs import staged_dir, write_json
from stages.lib.params import Params, load_params
from stages.lib.recipes import model_recipe, template_recipe
from stages.lib.templates import prompt_completion, reference

RAW = Path("data/raw/records.jsonl")
BASE_DIR = Path("models/base")
OUT_DIR = Path("data/tokenized")
METRICS = Path("metrics/tokenize.json")


def texts_for(records: list[dict], params: Params, tokenizer) -> tuple[list[str], list[int]]:
    """Full training texts (prompt + answer + EOS) and where each prompt ends, in characters."""
    template = template_recipe(params.tokenize.template or model_recipe(params.model.recipe).template)
    eos = tokenizer.eos_token
    texts, prompt_chars = [], []
    for i, record in enumerate(records):
        prompt, completion = prompt_completion(record, params.data.format, template, tokenizer, i)
        if not completion.endswith(eos):  # as TRL: the model must learn to stop
            completion += eos
        texts.append(prompt + completion)
        prompt_chars.append(len(prompt))
    return texts, prompt_chars


def encode(tokenizer, texts: list[str], prompt_chars: list[int], max_length: int) -> dict:
    enc = tokenizer(texts, return_offsets_mapping=True, return_attention_mask=False)
    input_ids, masks, truncated = [], [], 0
    for ids, offsets, boundary in zip(enc["input_ids"], enc["offset_mapping"], prompt_chars):
        mask = [int(end > boundary) for _, end in offsets]
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        input_ids.append(ids)
        masks.append(mask)
    return {"input_ids": input_ids, "completion_mask": masks, "truncated": truncated}


def split(n: int, params: Params) -> tuple[list[int], list[int]]:
    """A seeded shuffle; the validation split is the first `validation_fraction` (capped at max_validation)."""
    order = list(range(n))
    random.Random(params.seed).shuffle(order)
    n_val = min(params.tokenize.max_validation, max(1, round(n * params.tokenize.validation_fraction)))
    if n_val >= n:
        raise UserError(f"data/raw has {n} records: too few to hold out {n_val} for validation")
    return sorted(order[n_val:]), sorted(order[:n_val])


def stats(lengths: list[int], completion_tokens: list[int], truncated: int, dropped: int) -> dict:
    p = np.percentile(lengths, [50, 90, 99]).tolist()
    return {
        "records": len(lengths),
        "tokens": int(sum(lengths)),
        "completion_tokens": int(sum(completion_tokens)),
        "truncated": truncated,
        "dropped_no_answer_left": dropped,
        "length": {"p50": p[0], "p90": p[1], "p99": p[2], "max": int(max(lengths)), "mean": float(np.mean(lengths))},
    }


def main() -> None:
    params = load_params()
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR)
    if not tokenizer.is_fast:
        raise UserError(f"{BASE_DIR}: the tokenizer must be a fast (Rust) tokenizer: offsets mark the answer")
    records = [json.loads(line) for line in RAW.read_text(encoding="utf-8").splitlines()]
    texts, prompt_chars = texts_for(records, params, tokenizer)
    enc = encode(tokenizer, texts, prompt_chars, params.tokenize.max_length)

    keep = [i for i, m in enumerate(enc["completion_mask"]) if any(m)]  # truncation can cut the whole answer
    train_idx, val_idx = split(len(keep), params)
    columns = {k: enc[k] for k in ("input_ids", "completion_mask")}

    def subset(idx: list[int], with_reference: bool) -> Dataset:
        rows = [keep[i] for i in idx]
        data = {k: [v[r] for r in rows] for k, v in columns.items()}
        if with_reference:
            data["reference"] = [reference(records[r], params.data.format, r) for r in rows]
        return Dataset.from_dict(data)

    splits = DatasetDict(train=subset(train_idx, False), validation=subset(val_idx, True))
    with staged_dir(OUT_DIR) as tmp:
        splits.save_to_disk(str(tmp))
    lengths = [len(ids) for ids in columns["input_ids"]]
    answer = [sum(m) for m in columns["completion_mask"]]
    summary = stats(lengths, answer, enc["truncated"], len(records) - len(keep))
    summary |= {"train_records": len(train_idx), "validation_records": len(val_idx)}
    write_json(METRICS, summary)
    print(f"tokenize: {len(train_idx)} train / {len(val_idx)} validation, {summary['tokens']} tokens")


if __name__ == "__main__":
    run_stage(main)
