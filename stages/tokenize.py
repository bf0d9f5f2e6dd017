"""Stage 2, tokenize: data/raw + the base tokenizer → data/tokenized (Arrow + the training tokenizer) + metrics.

Each conversation becomes `input_ids` and `assistant_masks` (1 on the answer tokens and the token that ends them),
the pre-tokenized format TRL's SFTTrainer turns into labels (-100 elsewhere) before it pads or packs. The prompt
format is decided here once (stages/lib/chat/format.py) and saved with the tokenizer into
data/tokenized/tokenizer: its chat template renders exactly the training ids, so train, merge, eval and any
server that calls `apply_chat_template` on models/merged build the prompt the model was trained on.
Records stream through `datasets.map` in batches into Arrow files, so memory stays flat in the number of records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from stages.lib.chat import conversation
from stages.lib.chat import format as chat_format
from stages.lib.chat.encode import RenderError, encode, render_all
from stages.lib.core.earlier import check_digests, load_tokenizer, read_json, reading
from stages.lib.core.errors import UserError, require, run_stage
from stages.lib.core.outputs import scratch_dir, staged_outputs, write_json
from stages.lib.core.params import Params, load_params
from stages.lib.core.progress import phase
from stages.lib.core.recipes import model_recipe, template_recipe

RAW_DIR = Path("data/raw")
BASE_DIR = Path("models/base")
OUT_DIR = Path("data/tokenized")
TOKENIZER = OUT_DIR / "tokenizer"  # the training tokenizer: chat template, pad token, chat_format.json
METRICS = Path("metrics/tokenize.json")
WARN_ANSWERS_CUT = 0.05  # share of answers cut by max_length above which the stage warns
WARN_UNK = 0.01  # share of <unk> tokens above which the stage warns
PARALLEL_FROM = 50_000  # records from which tokenize uses a process per core
PROGRESS_FROM = 5000  # records: below, encoding takes a few seconds and prints nothing
FLAGS = ("truncated", "answer_cut", "prompt_mismatch", "prompt_repaired", "split_row")  # counted per kept row


def template_name(params: Params, text_format: str) -> str:
    """tokenize.template, else `raw` for prompt_completion and text sources, else the model recipe's template."""
    name = params.tokenize.template
    if text_format in ("prompt_completion", "text"):
        if name not in (None, "raw"):
            raise UserError(
                f"tokenize.template '{name}': {text_format} sources are text used as is; set the template to "
                "null (or raw), or give the records as alpaca or messages to render them in a template"
            )
        return "raw"
    return name or model_recipe(params.model.recipe).template


def base_stop_ids(base_dir: Path = BASE_DIR) -> list[int]:
    """The base model's own stop tokens (generation_config.json eos_token_id), kept through merge."""
    path = base_dir / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    return [eos] if isinstance(eos, int) else list(eos or [])


def decide_format(params: Params, tokenizer, text_format: str) -> chat_format.ChatFormat:
    """The chat format; UserError when the template's markers would become <unk> (unless params allow it)."""
    name = template_name(params, text_format)
    template = template_recipe(name)
    marker = chat_format.unknown_marker(tokenizer, template)
    if marker is not None and not params.tokenize.unknown_markers:
        instead = ("write a template file for it (docs/guide.md, prompt formats)" if name == "plain" else
                   "set tokenize.template: plain (words any vocabulary spells, answers end with EOS)")  # fmt: skip
        raise UserError(
            f"template '{name}': the tokenizer in models/base has no tokens for {marker.strip()!r} (it would train "
            f"as {tokenizer.unk_token!r}); {instead}, or set tokenize.unknown_markers: true"
        )
    fmt = chat_format.decide(tokenizer, template, name, base_stop_ids())
    return dataclasses.replace(fmt, text_only=True) if text_format == "text" else fmt


def encode_conversations(conversations: list[list[dict]], params: Params, tokenizer, fmt,
                         tools: list[str | None] | None = None) -> dict[str, list]:
    """Training rows of conversations (data/raw turns; plain role/content messages too): `encode`'s columns plus
    `length`, `trained` and `unk` token counts, and per row the index of its `conversation` and the messages it
    holds (`end`). `tools`: each conversation's tool schemas as JSON text (or None)."""
    all_turns = params.tokenize.assistant_turns == "all"
    messages = [conversation.template_messages(c, params.tokenize.reasoning) for c in conversations]
    trained = [conversation.trained_answers(c, all_turns, params.tokenize.reasoning) for c in conversations]
    schemas = [conversation.template_tools(t) for t in tools] if tools else None
    rendered = render_all(messages, fmt, tokenizer, all_turns, schemas, trained)
    enc = encode(tokenizer, rendered, fmt, params.tokenize.max_length)
    enc["conversation"] = [r.conversation for r in rendered]  # a row per conversation, or several (render_all)
    enc["end"] = [r.end for r in rendered]
    enc["split_row"] = [r.end < len(conversations[r.conversation]) for r in rendered]
    # a conversation left with nothing to train (its answers were only reasoning, dropped): one empty row, which
    # build_splits counts as no answer left, as it counts an answer that tokenize.max_length cut away
    for c in (c for c, answers in enumerate(trained) if not answers):
        row = {"input_ids": [fmt.eos_id], "assistant_masks": [0], "prompt_length": 0, "full_length": 1,
               "conversation": c, "end": len(conversations[c])} | dict.fromkeys(FLAGS, False)  # fmt: skip
        for key, value in row.items():
            enc[key].append(value)
    return with_counts(enc, tokenizer)


def with_counts(enc: dict[str, list], tokenizer) -> dict[str, list]:
    """Rows' `length`, `trained`, `unk` and `unk_answer` token counts added to `enc` (which is returned). An answer
    token the tokenizer can only write as <unk> is never a target (its mask is set to 0, counted in `unk_answer`):
    a model taught to write <unk> answers with nothing."""
    unk = tokenizer.unk_token_id
    enc["unk_answer"] = [0] * len(enc["input_ids"])
    if unk is not None:
        for i, (ids, mask) in enumerate(zip(enc["input_ids"], enc["assistant_masks"])):
            masked = [0 if t == unk else m for t, m in zip(ids, mask)]
            enc["unk_answer"][i] = sum(mask) - sum(masked)
            enc["assistant_masks"][i] = masked
    enc["length"] = [len(ids) for ids in enc["input_ids"]]
    enc["trained"] = [sum(m) for m in enc["assistant_masks"]]
    enc["unk"] = [ids.count(unk) if unk is not None else 0 for ids in enc["input_ids"]]
    return enc


def encode_texts(texts: list[str], params: Params, tokenizer, fmt) -> dict[str, list]:
    """Continued pre-training rows: each text as the tokenizer's prefix + its ids + EOS, cut into pieces of
    tokenize.max_length tokens, every token trained but the prefix. The columns of encode_conversations (no
    prompt: `prompt_length` 0; `conversation` the text's index)."""
    size = params.tokenize.max_length
    bodies = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {k: [] for k in ("input_ids", "assistant_masks", "conversation", "full_length")}
    for k, body in enumerate(bodies):
        ids = fmt.prefix_ids + body + [fmt.eos_id]
        mask = [0] * len(fmt.prefix_ids) + [1] * (len(body) + 1)
        for start in range(0, len(ids), size):
            for key, value in zip(out, (ids[start : start + size], mask[start : start + size], k, len(ids))):
                out[key].append(value)
    n = len(out["input_ids"])
    out |= {"prompt_length": [0] * n, "end": [1] * n, **{flag: [False] * n for flag in FLAGS}}
    return with_counts(out, tokenizer)


def check_expressible(conversations: list[list[dict]], tools: list[str | None], params: Params, fmt, name: str,
                      where) -> None:
    """UserError naming the first record (`where(k)`) whose tool use or reasoning the template cannot render."""
    for k, (turns, schemas) in enumerate(zip(conversations, tools)):
        if not fmt.tools and conversation.uses_tools(turns, schemas):
            also = "" if name == "tokenizer" else " (or tokenizer, for a model whose own chat template renders tools)"
            raise UserError(
                f"{where(k)}: tool schemas, calls or results, which template '{name}' cannot render: set "
                f"tokenize.template: qwen3{also}"
            )
        if not fmt.reasoning and params.tokenize.reasoning == "train" and conversation.has_reasoning(turns):
            raise UserError(
                f"{where(k)}: reasoning, which template '{name}' cannot render: set tokenize.reasoning: drop, or "
                "tokenize.template: qwen3"
            )


def _batch_fn(params: Params, tokenizer, fmt, validation: bool, name: str):
    def fn(batch: dict[str, list]) -> dict[str, list]:
        def where(k: int) -> str:
            return f"source {batch['source'][k]}, record {batch['record'][k]}"

        tools = batch.get("tools") or [None] * len(batch["messages"])
        if fmt.text_only:
            enc = encode_texts([m[0]["content"] for m in batch["messages"]], params, tokenizer, fmt)
        else:
            check_expressible(batch["messages"], tools, params, fmt, name, where)
            try:
                enc = encode_conversations(batch["messages"], params, tokenizer, fmt, tools)
            except RenderError as exc:  # "record K" of the batch → the record of its source
                raise UserError(f"{where(exc.index)}: {str(exc).split(': ', 1)[1]}") from None
        rows = list(zip(enc.pop("conversation"), enc.pop("end")))
        enc["source"] = [batch["source"][c] for c, _ in rows]
        if validation:  # what eval and the rebuild check read: the row's messages, tools and last answer
            enc["messages"] = [batch["messages"][c][:end] for c, end in rows]
            enc["tools"] = [tools[c] for c, _ in rows]
            answers = [m[-1] for m in enc["messages"]]
            enc["reference"] = ["" if fmt.text_only else conversation.answer_text(a["content"], a.get("tool_calls"))
                                for a in answers]  # fmt: skip
        return enc

    return fn


def tokenize_split(name: str, params: Params, tokenizer, fmt, cache: Path, template: str):
    """data/raw/<name>.jsonl → a Dataset of encoded rows (Arrow files under `cache`); `template`: the format's
    name, for errors."""
    import datasets

    datasets.disable_progress_bars()  # reading back our own JSON Lines: no bar
    path = RAW_DIR / f"{name}.jsonl"
    with reading(path, RAW_DIR, "download"):
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
    if "tools" not in ds.column_names:  # no record of data/raw has tools
        ds = ds.add_column("tools", [""] * len(ds))
    workers = min(os.cpu_count() or 1, 8) if len(ds) >= PARALLEL_FROM else None
    if len(ds) >= PROGRESS_FROM:  # datasets' own bar (records done, records/s) where encoding takes a while
        phase("tokenize", f"encoding {len(ds)} {name} records")
        datasets.enable_progress_bars()
    return ds.map(_batch_fn(params, tokenizer, fmt, name == "validation", template), batched=True, batch_size=500,
                  remove_columns=ds.column_names, new_fingerprint=f"encode-{name}",
                  load_from_cache_file=False, num_proc=workers)  # fmt: skip


def _column(ds, name: str) -> np.ndarray:
    """One scalar column as a numpy array, through Arrow (row-wise formatting costs minutes at a million rows)."""
    return ds.select_columns([name]).with_format("arrow")[:].column(name).to_numpy()


def build_splits(train, validation):
    """Keep rows with a trained token left. Validation keeps the rows whose last prompt is whole and as a server
    sends it; its other rows train. Returns (train, validation, statistics of every kept row)."""
    from datasets import concatenate_datasets

    names = ("trained", "length", "prompt_length", "prompt_mismatch", "source", "unk", "unk_answer", "full_length",
             *FLAGS)  # fmt: skip
    t, v = ({name: _column(ds, name) for name in set(names)} for ds in (train, validation))  # each column read once
    t_keep, v_keep = t["trained"] > 0, v["trained"] > 0
    servable = v_keep & (v["prompt_length"] < v["length"]) & ~v["prompt_mismatch"]
    moved = np.flatnonzero(v_keep & ~servable)
    columns = ["input_ids", "assistant_masks"]
    new_train = concatenate_datasets([train.select(np.flatnonzero(t_keep)).select_columns(columns),
                                      validation.select(moved).select_columns(columns)])  # fmt: skip
    shown = [c for c in ("prompt_length", "reference", "messages", "tools") if c in validation.column_names]
    new_val = validation.select(np.flatnonzero(servable)).select_columns([*columns, *shown])

    def kept(name: str) -> np.ndarray:
        return np.concatenate([t[name][t_keep], v[name][v_keep]])

    lengths = kept("length")
    # answer tokens before <unk> ones were taken out of the loss, over every row (one left with only <unk> too)
    answers = {k: int(t[k].sum() + v[k].sum()) for k in ("trained", "unk_answer")}
    unk = {"answer_tokens": answers["trained"] + answers["unk_answer"], "unk_answer_tokens": answers["unk_answer"]}
    if not len(lengths):
        return new_train, new_val, {"records": 0, "no_answer_left": len(train) + len(validation)} | unk
    t_source, v_source = t["source"], v["source"]
    per_source = {
        str(name): {"train": int((t_source[t_keep] == name).sum() + (v_source[moved] == name).sum()),
                    "validation": int((v_source[servable] == name).sum()),
                    "no_answer_left": int((t_source[~t_keep] == name).sum() + (v_source[~v_keep] == name).sum())}
        for name in np.unique(np.concatenate([t_source, v_source]))
    }  # fmt: skip
    cut = kept("answer_cut").astype(bool)
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).tolist()
    summary = {
        "records": len(lengths),
        "train_records": len(new_train),
        "validation_records": len(new_val),
        "validation_moved_to_train": len(moved),
        "no_answer_left": int((~t_keep).sum() + (~v_keep).sum()),
        "tokens": int(lengths.sum()),
        # what trains: the train split's answer tokens (validation rows moved to train included)
        "trained_tokens": int(t["trained"][t_keep].sum() + v["trained"][moved].sum()),
        "validation_answer_tokens": int(v["trained"][servable].sum()),
        "unk_tokens": int(kept("unk").sum()),
        **unk,
        "length": {"p50": p50, "p90": p90, "p99": p99, "max": int(lengths.max()), "mean": float(lengths.mean())},
        "cut_answer_median_length": float(np.median(kept("full_length")[cut])) if cut.any() else 0.0,
        "per_source": per_source,
    }
    return new_train, new_val, summary | {flag: int(kept(flag).sum()) for flag in FLAGS}


def source_counts(manifest: dict, per_source: dict) -> dict:
    """Per source: download's counts (read, kept, dropped by reason, kept records per layout), then the rows
    tokenize kept of it (a record whose template rewrites earlier answers gives a row per answer)."""
    out = {}
    for name, c in manifest["sources"].items():
        mine = per_source.get(name, {"train": 0, "validation": 0, "no_answer_left": 0})
        dropped = c["dropped"] | {"no_answer_left": mine["no_answer_left"]}
        out[name] = {"read": c["read"], "kept": c["kept"], "duplicates": c.get("duplicates", 0), "dropped": dropped,
                     "layouts": c.get("layouts", {}), "train": mine["train"],
                     "validation": mine["validation"]}  # fmt: skip
    return out


def warnings(summary: dict, params: Params, context: int | None) -> list[str]:
    """What a person must read: answers cut by max_length, <unk> tokens, prompts a server would split otherwise,
    a max_length above the model's `context` positions."""
    out, n, max_length = [], summary["records"], params.tokenize.max_length
    if context is not None and max_length > context:
        extend = " or set model.rope_scaling" if context.rotary else ""
        out.append(f"tokenize.max_length ({max_length}) is above the {context} positions of the model in models/base: "
                   f"train refuses rows longer than that; lower it to {context}{extend}")
    if summary["answer_cut"] > WARN_ANSWERS_CUT * n:
        out.append(f"{summary['answer_cut'] / n:.1%} of the records lose part of their answer to tokenize.max_length "
                   f"{max_length} (those records have a median of {summary['cut_answer_median_length']:.0f} tokens "
                   f"before the cut): {longer_rows(params, context)}")
    if summary["unk_tokens"] > WARN_UNK * summary["tokens"]:
        out.append(f"{summary['unk_tokens'] / summary['tokens']:.1%} of the tokens are <unk>: this tokenizer does not "
                   "cover the data's characters (pick a model whose vocabulary does)")
    if summary["unk_answer_tokens"]:
        out.append(f"{summary['unk_answer_tokens']} answer tokens are <unk> and were left out of the loss")
    if summary["prompt_mismatch"]:
        out.append(f"in {summary['prompt_mismatch']} records a token spans the prompt/answer boundary that a server "
                   "would split differently (a prompt ending in a space?); they train, with that token as the "
                   "answer's first, but are not used for validation")
    return out


class Positions(int):
    """The positions one row may span in the model of models/base; `rotary`: model.rope_scaling can extend them."""

    rotary: bool = False


def longer_rows(params: Params, context: Positions | None) -> str:
    """How to give rows more tokens, within the `context` positions of the model (None: unknown)."""
    if context is None or params.tokenize.max_length < context:
        return "raise tokenize.max_length" + (f" (the model has {context} positions)" if context else "")
    extend = (", or extend the positions with model.rope_scaling (e.g. {type: yarn, factor: 2})" if context.rotary
              else " (its positions are not rotary: model.rope_scaling cannot extend them)")  # fmt: skip
    return f"tokenize.max_length reaches the model's {context} positions: shorten the records{extend}"


def unk_refusal(summary: dict, params: Params) -> UserError | None:
    """The error for answers the tokenizer cannot spell: more than tokenize.max_unk_share of their tokens <unk>."""
    unk, total = summary["unk_answer_tokens"], summary["answer_tokens"]
    if not total or unk <= params.tokenize.max_unk_share * total:
        return None
    return UserError(
        f"{unk / total:.1%} of the answer tokens ({unk} of {total}) are <unk>: the tokenizer in models/base cannot "
        "spell the answers, so the tuned model could not write them; pick a model (or model.tokenizer) whose "
        "vocabulary covers the data, or set tokenize.max_unk_share: 1 to train on the rest (<unk> is never a target)"
    )


def base_context(params: Params) -> Positions | None:
    """Positions one row may span in the model of models/base (under model.rope_scaling); None when unknown."""
    from transformers import AutoConfig

    from stages.lib.core.rope import context_positions, rope_parameters, scaled

    try:
        config = AutoConfig.from_pretrained(BASE_DIR, trust_remote_code=params.model.trust_remote_code)
    except (OSError, ValueError):  # a tokenizer-only folder in a test, a config transformers cannot read: train says
        return None
    context = context_positions(scaled(config, params.model.rope_scaling, str(BASE_DIR)))
    if context is None:
        return None
    positions = Positions(context)
    positions.rotary = rope_parameters(config) is not None
    return positions


def nothing_left(params: Params, raw_records: int, context: int | None) -> UserError:
    return UserError(
        f"all {raw_records} records of data/raw lost their whole answer to tokenize.max_length "
        f"({params.tokenize.max_length} tokens): their prompts fill it; {longer_rows(params, context)}"
    )


def main() -> None:
    params = load_params()
    require(RAW_DIR / "manifest.json", BASE_DIR, made_by="download")
    manifest = read_json(RAW_DIR / "manifest.json", RAW_DIR, "download", keys=("format", "sources"))
    check_digests(RAW_DIR, manifest.get("sha256", {}), RAW_DIR / "manifest.json", "download")
    template = template_name(params, manifest["format"])
    template_recipe(template)  # a bad template fails before the slow imports

    with staged_outputs() as out:
        tmp = out.dir(OUT_DIR)
        tokenizer = chat_format.reload(load_tokenizer(BASE_DIR, BASE_DIR, "download"), tmp / TOKENIZER.name)
        fmt = decide_format(params, tokenizer, manifest["format"])
        context = base_context(params)
        for note in fmt.notes:
            print(f"tokenize: {note}", flush=True)
        cache = scratch_dir(OUT_DIR.parent, "tokenize")
        try:
            encoded = [tokenize_split(name, params, tokenizer, fmt, cache, template)
                       for name in ("train", "validation")]  # fmt: skip
            train, validation, summary = build_splits(*encoded)
            refusal = unk_refusal(summary, params)
            if refusal:
                raise refusal
            if not summary["records"]:
                raise nothing_left(params, len(encoded[0]) + len(encoded[1]), context)
            if not len(validation):
                raise UserError(
                    f"no validation record keeps a whole prompt within tokenize.max_length "
                    f"({params.tokenize.max_length} tokens), so eval has no prompt to generate from: "
                    f"{longer_rows(params, context)}"
                )
            from datasets import DatasetDict

            DatasetDict(train=train, validation=validation).save_to_disk(str(tmp))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        chat_format.save(tokenizer, fmt, tmp / TOKENIZER.name)
        summary |= {
            "template": template,
            "stop_tokens": tokenizer.convert_ids_to_tokens(fmt.stop_ids),
            "sources": source_counts(manifest, summary.pop("per_source")),
        }
        write_json(out.file(METRICS), summary)
    for line in warnings(summary, params, context):
        print(f"tokenize: warning: {line}")
    print(f"tokenize: {summary['train_records']} train / {summary['validation_records']} validation rows, "
          f"{summary['tokens']} tokens of which {summary['trained_tokens']} trained; {summary['truncated']} cut at "
          f"{params.tokenize.max_length} tokens, {summary['no_answer_left']} dropped with no answer left")


if __name__ == "__main__":
    run_stage(main)
