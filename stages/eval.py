"""Stage 5, eval: the base and the merged model on the validation split → metrics/eval.json + eval/generations.jsonl.

For each model: loss and perplexity over the trained tokens only (the prompt is context, as in training), and
greedy generations from the prompts scored against the reference answers (exact match, character ROUGE-L).
Both models get the prompt a server builds from models/merged and are decoded as a server decodes: generation
stops at the format's stop tokens (models/merged/generation_config.json), which are cut from the text.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from stages.lib.chat import conversation, reply
from stages.lib.chat import format as chat_format
from stages.lib.core.earlier import check_model_output, load_saved
from stages.lib.core.errors import require, run_stage
from stages.lib.core.outputs import staged_outputs, write_json, write_text
from stages.lib.core.params import Params, load_params
from stages.lib.core.progress import counter, phase
from stages.lib.eval import benchmarks
from stages.lib.eval.scores import exact_match, rouge_l, sacrebleu_scores

TOKENIZED = Path("data/tokenized")
MODELS = {"base": Path("models/base"), "tuned": Path("models/merged")}
METRICS = Path("metrics/eval.json")  # every score; an output DVC versions, not a DVC metric (too wide for a table)
HEADLINE = ("loss", "exact_match", "bleu", "accuracy")  # the DVC metrics: metrics/base.json and metrics/tuned.json
GENERATIONS = Path("eval/generations.jsonl")
PLOTS = Path("eval/plots")  # one bar chart per file (dvc.yaml's plots section), base and tuned side by side
CHARTS = {"scores.json": ("exact_match", "rouge_l", "cut_by_cap"),  # a 0-1 axis
          "sacrebleu.json": ("bleu", "chrf"),  # a 0-100 axis
          "loss.json": ("loss",)}  # fmt: skip


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


def answer_text(tokenizer, new_ids: list[int], stop_ids: list[int], prompt_ids: list[int] | None = None) -> str:
    """What eval scores of generated ids: the reply a server returns (up to the first stop token, special tokens
    dropped, the format's reasoning wrapper removed), its tool calls as canonical JSON lines after the content."""
    got = reply.parse(tokenizer, new_ids, stop_ids, prompt_ids)
    return conversation.answer_text(got.content, got.tool_calls)


def generation_caps(rows, max_new_tokens: int | None, context: int | None) -> tuple[list[int], str | None]:
    """New tokens each row's answer may take, and a line to print when the model's positions leave some less.

    `eval.max_new_tokens` (`max_new_tokens`) for every row, or twice the row's own reference answer (answer and end
    tokens, as tokenized for training), at least 16, so that a right answer is never cut and a short answer is not
    held to the longest one's cap. No model writes past its `context` positions (None: unknown): `generate` gives
    a prompt at most the positions its batch leaves."""
    caps = [max_new_tokens or max(16, 2 * sum(r["assistant_masks"])) for r in rows]
    if context is None:
        return caps, None
    short = sum(context - r["prompt_length"] < cap for r, cap in zip(rows, caps))
    if not short:
        return caps, None
    asked = f"eval.max_new_tokens ({max_new_tokens})" if max_new_tokens else "their cap (twice their reference answer)"
    return caps, (f"{short} of {len(rows)} prompts leave fewer positions than {asked}: the model has {context} "
                  "positions, and their answers stop where the positions end")


def generate(model, tokenizer, rows, batch_size: int, caps: list[int], stop_ids: list[int], bar=None,
             context: int | None = None):
    """Greedy answers to the rows' prompts, batched with left padding, as a server returns them; `bar` counts rows.
    Rows are batched by their `caps` (new tokens each may take; then by prompt length), so a batch decodes about as
    long as its rows need; a batch takes at most the `context` positions (None: no limit) its longest prompt
    leaves. Answers come back in the rows' order.

    Returns (answers, cut): cut[i] is True when answer i reached its batch's cap before any stop token."""
    import torch

    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    order = sorted(range(len(rows)), key=lambda i: (caps[i], rows[i]["prompt_length"]))
    outputs, cut = [""] * len(rows), [False] * len(rows)
    for start in range(0, len(rows), batch_size):
        chosen = order[start : start + batch_size]
        prompts = [rows[i]["input_ids"][: rows[i]["prompt_length"]] for i in chosen]
        batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
        room = max(caps[i] for i in chosen)
        if context is not None:
            room = max(1, min(room, context - max(map(len, prompts))))
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=room,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        for i, ids, prompt in zip(chosen, out[:, batch["input_ids"].shape[1] :].tolist(), prompts):
            outputs[i] = answer_text(tokenizer, ids, stop_ids, prompt)
            cut[i] = not set(ids) & set(stop_ids)  # finished rows end in a stop token, then padding (or room ran out)
        if bar is not None:
            bar.update(len(prompts))
    return outputs, cut


def evaluate(params: Params, name: str, rows, tokenizer, stop_ids: list[int], caps: list[int],
             tasks: list[dict], context: int | None = None) -> tuple[dict, list[str]]:
    """Answer loss, perplexity, generation scores (each row's answer of at most its `caps` new tokens; [] for no
    generation) and benchmark accuracy of MODELS[name], and its answers."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, params.merge_dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = MODELS[name]
    phase("eval", f"{name} model: loading {path}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=params.model.trust_remote_code).to(device).eval()
    e = params.eval
    with counter("eval", f"{name} answer loss", len(rows), "sample") as bar:
        loss = answer_loss(model, rows, e.batch_size, tokenizer.pad_token_id, bar)
    scores = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    predictions = [""] * len(rows)
    if caps:  # none: continued pre-training rows have no prompt to answer
        with counter("eval", f"{name} generation", len(rows), "sample") as bar:
            predictions, cut = generate(model, tokenizer, rows, e.batch_size, caps, stop_ids, bar, context)
        n = len(rows)
        references = [r["reference"] for r in rows]
        scores |= {
            "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
            "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
            **sacrebleu_scores(predictions, references),
            "cut_by_cap": sum(cut) / n,
            "empty": sum(not p.strip() for p in predictions) / n,  # only stop tokens, or only <unk>
        }
    if tasks:
        phase("eval", f"{name} model: {len(tasks)} multiple-choice benchmark(s), scored by lm-evaluation-harness")
        bench = benchmarks.accuracy(model, tokenizer, tasks, e.batch_size, seed=params.seed)
        scores["accuracy"] = bench.pop("overall")["accuracy"]
        scores["accuracy_by_benchmark"] = {task: result["accuracy"] for task, result in bench.items()}
    return scores, predictions


def main() -> None:
    params = load_params()
    require(MODELS["tuned"] / "config.json", made_by="merge")
    require(TOKENIZED, made_by="tokenize")
    validation = load_saved(TOKENIZED, "tokenize")["validation"]
    check_model_output(MODELS["base"], "download")
    check_model_output(MODELS["tuned"], "merge")
    scratch = Path(tempfile.mkdtemp(prefix="eval-benchmarks-"))  # built-in sets are written here, then removed
    try:
        evaluate_all(params, validation, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def evaluate_all(params: Params, validation, scratch: Path) -> None:
    """Both models on the validation rows and the benchmarks; writes the stage's outputs."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from stages.lib.core.rope import context_positions

    tasks = benchmark_tasks(params, scratch)  # files checked before any model loads
    rows = validation.select(range(min(params.eval.max_samples, len(validation)))).to_list()
    text_only = chat_format.load(TOKENIZED / "tokenizer").text_only  # continued pre-training: loss only
    caps, lowered, context = [], None, None
    if not text_only:
        config = AutoConfig.from_pretrained(MODELS["tuned"], trust_remote_code=params.model.trust_remote_code)
        context = context_positions(config)
        caps, lowered = generation_caps(rows, params.eval.max_new_tokens, context)
    if lowered:
        print(f"eval: {lowered}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(MODELS["tuned"], trust_remote_code=params.model.trust_remote_code)
    stop_ids = GenerationConfig.from_pretrained(MODELS["tuned"]).eos_token_id
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    metrics, predictions = {}, {}
    for name in MODELS:
        metrics[name], predictions[name] = evaluate(params, name, rows, tokenizer, stop_ids, caps, tasks, context)
    metrics["samples"] = len(rows)
    metrics["generation_cap_tokens"] = max(caps, default=0)  # the largest; each row's is twice its reference
    lines = []
    for i, row in enumerate(rows):
        prompt = tokenizer.decode(row["input_ids"][: row["prompt_length"]])
        record = {"prompt": prompt, "reference": row["reference"]} | {m: predictions[m][i] for m in MODELS}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    with staged_outputs() as out:
        write_text(out.file(GENERATIONS), "".join(lines))
        plots = out.dir(PLOTS)
        for name, keys in CHARTS.items():
            write_json(plots / name, [{"metric": k, "model": m, "value": metrics[m][k]}
                                      for k in keys for m in MODELS if k in metrics[m]])  # fmt: skip
        if tasks:  # per benchmark, then all questions together
            write_json(plots / "accuracy.json", [{"metric": t, "model": m, "value": metrics[m]["accuracy_by_benchmark"][t]}
                                                 for t in [task["task"] for task in tasks] for m in MODELS]
                       + [{"metric": "all", "model": m, "value": metrics[m]["accuracy"]} for m in MODELS])  # fmt: skip
        write_json(out.file(METRICS), metrics)
        for name in MODELS:
            write_json(out.file(headline_path(name)), {k: metrics[name][k] for k in HEADLINE if k in metrics[name]})
    print("eval:", summary_line(metrics), flush=True)
    for line in empty_answers(metrics):
        print(f"eval: warning: {line}", flush=True)


def headline_path(name: str) -> Path:
    """metrics/base.json or metrics/tuned.json: one row each in `dvc metrics show`, the same columns side by side."""
    return METRICS.parent / f"{name}.json"


def empty_answers(metrics: dict) -> list[str]:
    """A line per model some of whose answers are empty: only stop tokens or whitespace, or only tokens the
    tokenizer decodes to nothing (<unk>), which exact match and BLEU score as wrong without saying why."""
    out = []
    for name in MODELS:
        share = metrics[name].get("empty", 0)
        if share:
            out.append(f"{share:.0%} of the {name} model's {metrics['samples']} answers are empty (only stop tokens, "
                       "whitespace or <unk>): see eval/generations.jsonl")
    return out


def benchmark_tasks(params: Params, scratch: Path) -> list[dict]:
    """lm-eval task configs of params.eval.benchmarks; UserError naming the benchmark for a missing or bad file."""
    from stages.lib.core.errors import UserError
    from stages.lib.core.params import BENCHMARKS_DIR
    from stages.lib.core.paths import tracked_path

    tasks = []
    toy_data = any(s.kind == "builtin" for s in params.data.sources)
    for i, b in enumerate(params.eval.benchmarks):
        key = f"eval.benchmarks[{i}] ({b.name})"
        if b.builtin and not toy_data:  # its questions are the toy task's words: no measure of a user's data
            print(f"eval: {key} skipped: it asks about the built-in toy task's words, and data.sources has no "
                  "builtin source; list benchmarks of your own (eval.benchmarks in params.yaml)", flush=True)
            continue
        if b.builtin:
            test, dev = benchmarks.write_builtin(b.builtin, params.seed, scratch / b.name)
        elif b.hub:
            try:
                test, dev = benchmarks.fetch_hub(b.hub, scratch / b.name, params.network)
            except benchmarks.BenchmarkError as exc:
                raise UserError(f"{key}: {exc}") from None
        else:  # params keep them under data/benchmarks; a link there may still lead out
            test, dev = (tracked_path(f, key, Path(BENCHMARKS_DIR)) if f else None for f in (b.test, b.dev))
        try:
            tasks.append(benchmarks.task_config(b.name, test, dev, b.shots, b.max_questions))
        except benchmarks.BenchmarkError as exc:
            message = str(exc)
            if b.hub:  # name the Hub file, not its copy in the Hub cache or the CSV written from its Parquet
                for path, name in ((test, b.hub.test), (dev, b.hub.dev)):
                    message = message.replace(str(path), f"{b.hub.repo}/{name}") if path else message
            raise UserError(f"{key}: {message}") from None
    return tasks


def summary_line(metrics: dict) -> str:
    """Tuned vs base in one line; metrics/eval.json has every number."""
    tuned, base = metrics["tuned"], metrics["base"]
    keys = [k for k in ("loss", "exact_match", "rouge_l", "bleu", "chrf", "cut_by_cap", "accuracy") if k in tuned]
    scores = ", ".join(f"{k} {tuned[k]:.3g} (base {base[k]:.3g})" for k in keys)
    return f"tuned {scores} on {metrics['samples']} validation samples"


if __name__ == "__main__":
    run_stage(main)
