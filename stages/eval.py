"""Stage 5, eval: the base and the merged model on the validation split → metrics/eval.json + eval/generations.jsonl.

For each model: loss and perplexity over the trained tokens only (the prompt is context, as in training), and
greedy generations from the prompts scored against the reference answers (exact match, character ROUGE-L).
Both models get the prompt a server builds from models/merged and are decoded as a server decodes: generation
stops at the format's stop tokens (models/merged/generation_config.json), which are cut from the text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from stages.lib.core.earlier import check_model_output, load_saved
from stages.lib.core.errors import require, run_stage
from stages.lib.core.outputs import staged_outputs, write_json, write_text
from stages.lib.core.params import Params, load_params
from stages.lib.core.progress import counter, phase
from stages.lib.eval.scores import exact_match, rouge_l

TOKENIZED = Path("data/tokenized")
MODELS = {"base": Path("models/base"), "tuned": Path("models/merged")}
METRICS = Path("metrics/eval.json")
GENERATIONS = Path("eval/generations.jsonl")
PLOTS = Path("eval/plots")  # one bar chart per file (dvc.yaml's plots section), base and tuned side by side
CHARTS = {"scores.json": ("exact_match", "rouge_l"), "loss.json": ("loss",)}  # scores share a 0-1 axis; loss does not


def answer_loss(model, rows, batch_size: int, pad_id: int, bar=None) -> float:
    """Mean negative log-likelihood per trained token (labels -100 on prompt and padding); `bar` counts rows."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(
            [
                {"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]}
                for r in rows[start : start + batch_size]
            ]
        )
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)
            ).logits.float()
        labels = batch["labels"][:, 1:].to(model.device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += nll.item()
        count += int((labels != -100).sum())
        if bar is not None:
            bar.update(len(batch["input_ids"]))
    return total / count


def answer_text(tokenizer, new_ids: list[int], stop_ids: list[int]) -> str:
    """What a server returns for generated ids: up to the first stop token, special tokens dropped, stripped."""
    stops = set(stop_ids)
    end = next((k for k, t in enumerate(new_ids) if t in stops), len(new_ids))
    return tokenizer.decode(new_ids[:end], skip_special_tokens=True).strip()


def generate(model, tokenizer, rows, batch_size: int, max_new_tokens: int, stop_ids: list[int], bar=None) -> list[str]:
    """Greedy answers to the rows' prompts, batched with left padding, as a server returns them; `bar` counts rows."""
    import torch

    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    outputs = []
    for start in range(0, len(rows), batch_size):
        prompts = [r["input_ids"][: r["prompt_length"]] for r in rows[start : start + batch_size]]
        batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        outputs += [answer_text(tokenizer, row.tolist(), stop_ids) for row in out[:, batch["input_ids"].shape[1] :]]
        if bar is not None:
            bar.update(len(prompts))
    return outputs


def evaluate(params: Params, name: str, rows, tokenizer, stop_ids: list[int]) -> tuple[dict, list[str]]:
    """Answer loss, perplexity and generation scores of MODELS[name] on `rows`, and its answers."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, params.merge_dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = MODELS[name]
    phase("eval", f"{name} model: loading {path}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    e = params.eval
    with counter("eval", f"{name} answer loss", len(rows), "sample") as bar:
        loss = answer_loss(model, rows, e.batch_size, tokenizer.pad_token_id, bar)
    with counter("eval", f"{name} generation", len(rows), "sample") as bar:
        predictions = generate(model, tokenizer, rows, e.batch_size, e.max_new_tokens, stop_ids, bar)
    n = len(rows)
    scores = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "exact_match": sum(exact_match(p, r["reference"]) for p, r in zip(predictions, rows)) / n,
        "rouge_l": sum(rouge_l(p, r["reference"]) for p, r in zip(predictions, rows)) / n,
    }
    return scores, predictions


def main() -> None:
    params = load_params()
    require(MODELS["tuned"] / "config.json", made_by="merge")
    require(TOKENIZED, made_by="tokenize")
    from transformers import AutoTokenizer, GenerationConfig

    validation = load_saved(TOKENIZED, "tokenize")["validation"]
    check_model_output(MODELS["base"], "download")
    check_model_output(MODELS["tuned"], "merge")
    rows = validation.select(range(min(params.eval.max_samples, len(validation)))).to_list()
    tokenizer = AutoTokenizer.from_pretrained(MODELS["tuned"])
    stop_ids = GenerationConfig.from_pretrained(MODELS["tuned"]).eos_token_id
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    metrics, predictions = {}, {}
    for name in MODELS:
        metrics[name], predictions[name] = evaluate(params, name, rows, tokenizer, stop_ids)
    metrics["samples"] = len(rows)
    lines = []
    for i, row in enumerate(rows):
        prompt = tokenizer.decode(row["input_ids"][: row["prompt_length"]])
        record = {"prompt": prompt, "reference": row["reference"]} | {m: predictions[m][i] for m in MODELS}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    with staged_outputs() as out:
        write_text(out.file(GENERATIONS), "".join(lines))
        plots = out.dir(PLOTS)
        for name, keys in CHARTS.items():
            write_json(plots / name, [{"metric": k, "model": m, "value": metrics[m][k]} for k in keys for m in MODELS])
        write_json(out.file(METRICS), metrics)
    print("eval:", summary_line(metrics), flush=True)


def summary_line(metrics: dict) -> str:
    """Tuned vs base in one line; metrics/eval.json has every number."""
    tuned, base = metrics["tuned"], metrics["base"]
    scores = ", ".join(f"{k} {tuned[k]:.3g} (base {base[k]:.3g})" for k in ("loss", "exact_match", "rouge_l"))
    return f"tuned {scores} on {metrics['samples']} validation samples"


if __name__ == "__main__":
    run_stage(main)
