"""Stage 2, tokenize: data/raw + the base tokenizer → data/tokenized (Arrow + the training tokenizer) + metrics.

Each record becomes `input_ids` and `assistant_masks` (1 on the answer tokens and the token that ends them), the
pre-tokenized format TRL's SFTTrainer turns into labels (-100 elsewhere) before it pads or packs. The prompt
format is decided here once (stages/lib/chat/format.py) and saved with the tokenizer into
data/tokenized/tokenizer: its chat template renders exactly the training ids, so train, merge, eval and any
server that calls `apply_chat_template` on models/merged build the prompt the model was trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from stages.lib.chat import format as chat_format
from stages.lib.chat.encode import encode, render_all
from stages.lib.chat.records import dialogue
from stages.lib.errors import UserError, run_stage
from stages.lib.outputs import staged_dir, write_json
from stages.lib.params import Params, load_params
from stages.lib.recipes import model_recipe, template_recipe

RAW = Path("data/raw/records.jsonl")
BASE_DIR = Path("models/base")
OUT_DIR = Path("data/tokenized")
TOKENIZER = OUT_DIR / "tokenizer"  # the training tokenizer: chat template, pad token, chat_format.json
METRICS = Path("metrics/tokenize.json")


def template_name(params: Params) -> str:
    """tokenize.template, else `raw` for prompt_completion text, else the model recipe's template."""
    name = params.tokenize.template
    if params.data.format == "prompt_completion":
        if name not in (None, "raw"):
            raise UserError(
                f"tokenize.template '{name}': data.format prompt_completion is text used as is; set the template to "
                "null (or raw), or give the records as alpaca or messages to render them in a template"
            )
        return "raw"
    return name or model_recipe(params.model.recipe).template


def base_stop_ids(base_dir: Path = BASE_DIR) -> list[int]:
    """The base model's own stop tokens (generation_config.json eos_token_id), kept through merge."""
    path = base_dir / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    return [eos] if isinstance(eos, int) else list(eos or [])


def decide_format(params: Params, tokenizer) -> chat_format.ChatFormat:
    name = template_name(params)
    return chat_format.decide(tokenizer, template_recipe(name), name, base_stop_ids())


def tokenize_records(records: list[dict], params: Params, tokenizer, fmt: chat_format.ChatFormat) -> dict:
    """`encode`'s columns for every record, plus `reference` (the last answer's text) and `messages` per record."""
    all_turns = params.tokenize.assistant_turns == "all"
    dialogues = [dialogue(record, params.data.format, i) for i, record in enumerate(records)]
    conversations = [d.messages() for d in dialogues]
    rendered = render_all(conversations, fmt, tokenizer, all_turns)
    references = [d.response for d in dialogues]
    enc = encode(tokenizer, rendered, fmt, params.tokenize.max_length)
    return enc | {"reference": references, "messages": conversations}


def split(eligible: list[bool], params: Params) -> tuple[list[int], list[int]]:
    """A seeded shuffle of the rows; validation takes the first `validation_fraction` of them (capped at
    max_validation) among the `eligible` ones (rows whose last prompt is whole and as a server sends it), train
    the rest."""
    n = len(eligible)
    order = list(range(n))
    random.Random(params.seed).shuffle(order)
    n_val = min(params.tokenize.max_validation, max(1, round(n * params.tokenize.validation_fraction)))
    val = [i for i in order if eligible[i]][:n_val]
    if n_val >= n or len(val) < n_val:
        raise UserError(
            f"data/raw has {n} usable records ({sum(eligible)} with a whole last prompt, as a server sends it): "
            f"too few to hold out {n_val} for validation"
        )
    taken = set(val)
    return [i for i in range(n) if i not in taken], sorted(val)


def stats(lengths: list[int], trained_tokens: list[int], truncated: int, dropped: int) -> dict:
    p = np.percentile(lengths, [50, 90, 99]).tolist()
    return {
        "records": len(lengths),
        "tokens": int(sum(lengths)),
        "trained_tokens": int(sum(trained_tokens)),
        "truncated": truncated,
        "dropped_no_answer_left": dropped,
        "length": {"p50": p[0], "p90": p[1], "p99": p[2], "max": int(max(lengths)), "mean": float(np.mean(lengths))},
    }


def main() -> None:
    params = load_params()
    from transformers import AutoTokenizer

    records = [json.loads(line) for line in RAW.read_text(encoding="utf-8").splitlines()]
    with staged_dir(OUT_DIR) as tmp:
        tokenizer = chat_format.reload(AutoTokenizer.from_pretrained(BASE_DIR), tmp / TOKENIZER.name)
        fmt = decide_format(params, tokenizer)
        for note in fmt.notes:
            print(f"tokenize: {note}")
        enc = tokenize_records(records, params, tokenizer, fmt)
        if enc["prompt_mismatch"]:
            first = enc["prompt_mismatch"][0]
            print(f"tokenize: warning: in {len(enc['prompt_mismatch'])} records (first: record {first}) a token spans "
                  "the prompt/answer boundary that a server would split differently (a prompt ending in a space?); "
                  "they train, with that token as the answer's first, but are not used for validation")
        splits, summary = build_splits(records, enc, params)
        splits.save_to_disk(str(tmp))
        chat_format.save(tokenizer, fmt, tmp / TOKENIZER.name)
    summary |= {"template": template_name(params), "stop_tokens": tokenizer.convert_ids_to_tokens(fmt.stop_ids)}
    write_json(METRICS, summary)
    print(f"tokenize: {summary['train_records']} train / {summary['validation_records']} validation, "
          f"{summary['tokens']} tokens, {summary['trained_tokens']} trained")


def build_splits(records: list[dict], enc: dict, params: Params):
    """The train and validation Datasets (rows that kept a trained token) and their statistics."""
    from datasets import Dataset, DatasetDict

    keep = [i for i, m in enumerate(enc["assistant_masks"]) if any(m)]  # truncation can cut the whole answer
    # eval generates from the prompt a server sends: a row cut inside its last prompt (a long multi-turn record) or
    # whose prompt ids differ from a server's only trains
    whole_prompt = [enc["prompt_length"][r] < len(enc["input_ids"][r]) for r in keep]
    mismatch = set(enc["prompt_mismatch"])
    train_idx, val_idx = split([w and r not in mismatch for r, w in zip(keep, whole_prompt)], params)

    def subset(idx: list[int], columns: tuple[str, ...]) -> Dataset:
        rows = [keep[i] for i in idx]
        return Dataset.from_dict({k: [enc[k][r] for r in rows] for k in columns})

    train_columns = ("input_ids", "assistant_masks")
    splits = DatasetDict(
        train=subset(train_idx, train_columns),
        validation=subset(val_idx, (*train_columns, "prompt_length", "reference", "messages")),
    )
    lengths = [len(enc["input_ids"][r]) for r in keep]
    trained = [sum(enc["assistant_masks"][r]) for r in keep]
    summary = stats(lengths, trained, enc["truncated"], len(records) - len(keep))
    summary |= {
        "train_records": len(train_idx),
        "validation_records": len(val_idx),
        "prompt_mismatch": len(enc["prompt_mismatch"]),
        "prompt_repaired": enc["prompt_repaired"],
        "last_prompt_truncated": whole_prompt.count(False),
    }
    return splits, summary


if __name__ == "__main__":
    run_stage(main)
