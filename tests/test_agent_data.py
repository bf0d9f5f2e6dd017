"""Agent and reasoning data, from the files users bring to the labels in the trainer's own batches.

The fixtures in tests/fixtures/agent/ hold one small file per layout (OpenAI tool calls with tools as a list or as
JSON text and arguments as text or objects, the older function_call, ShareGPT function_call/observation turns,
parts-style messages with loss_weight, reasoning fields and <think> blocks, text-only content parts with OpenAI
weights) and, per record, `expect`: the answers that must be trained, written by hand as the qwen3 template shows
them, per training row. A project reads them all through the download stage's reader, tokenizes with the qwen3 template, and builds
the train stage's trainer: every sample's labelled runs must be exactly one record's expected answers (so never a
tool result, a schema, a prompt or a system text), with reasoning or without it (`tokenize.reasoning: drop`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tokenizer_kinds as kinds
import yaml
from conftest import ROOT, assert_merged_prompts_are_the_training_prompts, default_params
from test_train_labels import labelled_runs, samples

FIXTURES = ROOT / "tests" / "fixtures" / "agent"
TRAINED = ["openai_tools", "openai_tools_as_text", "sharegpt_tools", "parts", "reasoning", "text_parts_weights"]
THINK = re.compile(r"<think>\n.*?\n</think>", re.DOTALL)


def expected(reasoning: str) -> list[list[str]]:
    """Every training row's answers, as the fixtures write them per record (a record whose earlier answers the
    template renders otherwise in history has a row per answer); think blocks emptied when reasoning is dropped."""
    out = []
    for name in TRAINED:
        for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines():
            for answers in json.loads(line)["expect"]:
                out.append([THINK.sub("<think>\n\n</think>", a) if reasoning == "drop" else a for a in answers])
    return out


def agent_project(folder: Path, reasoning: str = "train", template: str = "qwen3") -> Path:
    """data/raw from the fixtures (the download stage's reader), a tiny Llama on the embedded default's tokenizer
    as models/base, then the tokenize stage; cwd must be `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages import download, tokenize
    from stages.lib.core.params import load_params

    (folder / "recipes").symlink_to(ROOT / "recipes")
    (folder / "data" / "sources").mkdir(parents=True)
    raw = default_params()
    raw["data"]["sources"] = []
    for name in TRAINED:
        (folder / "data" / "sources" / f"{name}.jsonl").write_bytes((FIXTURES / f"{name}.jsonl").read_bytes())
        raw["data"]["sources"].append({"kind": "local", "path": f"data/sources/{name}.jsonl", "format": "messages"})
    raw["data"]["validation_fraction"] = 0.2
    raw["tokenize"] |= {"template": template, "reasoning": reasoning, "max_length": 2048}
    raw["train"] |= {"batch_size": 4, "epochs": 1, "logging_steps": 1, "packing": False}
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    (folder / "data" / "raw").mkdir()
    download.write_raw(load_params(), folder / "data" / "raw")
    tokenizer = kinds.build("bpe", folder / "tok")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder / "models" / "base")
    tokenizer.save_pretrained(folder / "models" / "base")
    tokenize.main()
    return folder


@pytest.mark.parametrize("reasoning", ["train", "drop"])
def test_the_trainer_trains_exactly_the_calls_and_answers(reasoning, tmp_path, monkeypatch):
    from datasets import load_from_disk

    from stages.lib.core.params import load_params
    from stages.train import build_trainer

    monkeypatch.chdir(tmp_path)
    agent_project(tmp_path, reasoning)
    metrics = json.loads((tmp_path / "metrics" / "tokenize.json").read_text())
    assert metrics["truncated"] == 0 and metrics["prompt_mismatch"] == 0
    sources = metrics["sources"]  # records per layout and per drop reason, per source
    assert sources["openai_tools"]["layouts"] | {} == {"plain": 0, "tool_calls": 5, "tool_results": 5,
                                                      "tool_schemas": 6, "reasoning": 0, "content_parts": 0,
                                                      "weighted_turns": 0}  # fmt: skip
    assert sources["parts"]["layouts"]["content_parts"] == 4 and sources["parts"]["layouts"]["weighted_turns"] == 1
    assert sources["reasoning"]["layouts"]["reasoning"] == 4 and sources["sharegpt_tools"]["layouts"]["tool_calls"] == 4
    assert all("tool_use" not in s["dropped"] and not any(s["dropped"].values()) for s in sources.values())
    assert metrics["split_row"] == 4  # reasoning.jsonl: each first answer in a row of its own
    trainer = build_trainer(load_params(), tmp_path / "out", [])
    tokenizer = trainer.processing_class
    wanted = expected(reasoning)
    seen = 0
    for batch in trainer.get_train_dataloader():
        for ids, labels in samples(batch):
            assert labelled_runs(tokenizer, labels) in wanted, tokenizer.decode(ids)
            text = tokenizer.decode(ids)
            if reasoning == "drop":  # no reasoning token anywhere in the row
                assert not re.search(r"<think>\n[^\n]", text), text
            seen += 1
    tokenized = load_from_disk("data/tokenized")
    assert seen == len(tokenized["train"]) >= 15
    for row in tokenized["validation"]:  # held-out rows: the same rule on their masks
        runs, current = [], []
        for t, m in zip(row["input_ids"] + [0], row["assistant_masks"] + [0]):
            if m:
                current.append(t)
            elif current:
                runs, current = runs + [tokenizer.decode(current, skip_special_tokens=True).strip()], []
        assert runs in wanted, tokenizer.decode(row["input_ids"])


def test_the_saved_template_rebuilds_every_prompt_with_its_tools(tmp_path, monkeypatch):
    """What models/merged ships (merge copies data/tokenized/tokenizer): given the validation records' messages and
    tools as a client sends them, its chat template rebuilds the prompt id for id, tool records included."""
    import shutil

    monkeypatch.chdir(tmp_path)
    agent_project(tmp_path)
    merged = tmp_path / "models" / "merged"
    shutil.copytree(tmp_path / "data" / "tokenized" / "tokenizer", merged)
    (merged / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    (merged / "config.json").write_text((tmp_path / "models" / "base" / "config.json").read_text())
    assert_merged_prompts_are_the_training_prompts(tmp_path)
    config = json.loads((merged / "tokenizer_config.json").read_text())
    assert config["response_template"]["fields"]["tool_calls"]["close"] == "</tool_call>"


@pytest.mark.parametrize("name, message", [
    ("preference.jsonl", r"source preference is preference data \(columns 'chosen' and 'rejected'\): SFT would learn "
                         r"the rejected answers too; train the chosen ones by joining 'prompt' and 'chosen'"),
    ("kto.jsonl", r"source kto, record 0: a 'label' of True beside the conversation is KTO data"),
    ("images.jsonl", r"source images has a 'images' column .*: this pipeline trains text-only models"),
    ("image_parts.jsonl", r"source image_parts, record 0: 'messages'\[0\]: content\[1\] is a image_url part: this "
                          r"pipeline trains text-only models"),
])  # fmt: skip
def test_what_sft_would_get_wrong_is_refused_in_one_line(name, message, tmp_path):
    from conftest import data_source

    from stages.lib.data.mix import build_raw
    from stages.lib.core.params import validate
    from stages.lib.data.normalize import RecordError

    raw = default_params()
    raw["data"]["sources"] = [{"kind": "local", "path": str(FIXTURES / name), "format": "messages"}]
    with pytest.raises(RecordError, match=message) as err:
        build_raw(validate(raw).data, 0, tmp_path / "raw", tmp_path / "work")
    assert "\n" not in str(err.value)
    assert data_source  # the helper module is importable (kept for symmetry with test_data)


def test_a_template_that_cannot_render_tools_refuses_the_record_and_names_one_that_can(tmp_path, monkeypatch):
    from stages.lib.core.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"source \w+, record \d+: tool schemas, calls or results, which "
                                        r"template 'chatml' cannot render: set tokenize.template: qwen3"):
        agent_project(tmp_path, template="chatml")


def test_a_qwen3_style_tokenizer_template_scores_a_memorized_answer_exactly(tmp_path):
    """`template: tokenizer` on a Qwen3-style chat template (an empty think block before the last answer, none in
    history): the trained target, decoded as eval and a server decode it, is the reference (exact match 1.0,
    not '<think>\\n\\n</think>\\n\\nOLIVE' vs 'OLIVE'), and every answer of a multi-turn record is trained."""
    from conftest import default_params
    from transformers import AutoTokenizer

    from stages.eval import answer_text
    from stages.lib.chat import format as chat_format
    from stages.lib.core.params import validate
    from stages.lib.core.recipes import template_recipe
    from stages.lib.eval.scores import exact_match
    from stages.tokenize import encode_conversations

    tokenizer = kinds.build("bpe", tmp_path / "tok")
    tokenizer.chat_template = kinds.QWEN3_STYLE
    tokenizer = chat_format.reload(tokenizer, tmp_path / "saved")
    fmt = chat_format.decide(tokenizer, template_recipe("tokenizer"), "tokenizer", [])
    chat_format.save(tokenizer, fmt, tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")  # what merge copies into models/merged
    raw = default_params()
    raw["tokenize"] |= {"template": "tokenizer", "max_length": 512}
    records = [r for r in kinds.records() if kinds.answers(r)[-1].strip()] + [
        {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "OLIVE"}]}]
    conversations = [r["messages"] for r in records]
    enc = encode_conversations(conversations, validate(raw), tokenizer, fmt)
    for ids, mask, n, c, end in zip(enc["input_ids"], enc["assistant_masks"], enc["prompt_length"],
                                    enc["conversation"], enc["end"]):  # fmt: skip
        reference = conversations[c][end - 1]["content"]
        trained = saved.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
        assert trained.startswith("<think>\n\n</think>\n\n")  # the template's own wrapper is trained with it
        assert exact_match(answer_text(saved, ids[n:], fmt.stop_ids, ids[:n]), reference) == 1.0
        prompt = saved.apply_chat_template(conversations[c][: end - 1], add_generation_prompt=True, tokenize=True)
        assert list(prompt["input_ids"]) == ids[:n]  # a server's prompt, id for id
    per_record = [enc["conversation"].count(c) for c in range(len(records))]
    assert per_record == [len(kinds.answers(r)) for r in records]  # history answers: rows of their own


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_chat_shows_reasoning_and_calls_readably_however_the_reply_is_split(piece):
    from stages.lib.chat.reply import Reply
    from stages.lib.chat.stream import ReadableStream

    def shown(text: str, reply: Reply) -> str:
        stream = ReadableStream()
        out = "".join(stream.feed(text[i : i + piece]) for i in range(0, len(text), piece))
        return out + stream.finish(reply)

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    text = '<think>\nLook it up.\n</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", ...}\n</tool_call>'
    assert shown(text, Reply("Checking.", "Look it up.", [call])) == (
        '[reasoning] Look it up.\nChecking.\n[tool call] get_weather({"city": "Oslo"})')
    assert shown("<think>\n\n</think>\n\nOLIVE", Reply("OLIVE")) == "OLIVE"  # an empty think block: not shown
    assert shown("a < b <tool", Reply("a < b <tool")) == "a < b <tool"  # held text that never became a marker
    assert shown("  <thin", Reply("<thin")) == "<thin"


def test_plain_text_trains_every_token_packed_and_long_texts_are_cut_not_lost(tmp_path, monkeypatch):
    """format: text (continued pre-training): each text + EOS in pieces of tokenize.max_length, every token
    trained, packed by the trainer; mixing it with chat sources, or training it unpacked, is refused."""
    import torch
    from datasets import load_from_disk
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages import download, tokenize
    from stages.lib.core.params import ParamsError, load_params, validate
    from stages.train import build_trainer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "data" / "sources").mkdir(parents=True)
    texts = [f"Story {i}: " + " ".join(["the red cat sat on the mat"] * (1 + i % 7)) for i in range(30)]
    (tmp_path / "data" / "sources" / "c4.jsonl").write_text("".join(json.dumps({"text": t, "url": "x"}) + "\n" for t in texts))
    raw = default_params()
    raw["data"]["sources"] = [{"kind": "local", "path": "data/sources/c4.jsonl", "format": "text"}]
    raw["tokenize"] |= {"max_length": 32}
    raw["train"] |= {"packing": True, "batch_size": 2, "epochs": 1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "data" / "raw").mkdir()
    download.write_raw(load_params(), tmp_path / "data" / "raw")
    tokenizer = kinds.build("bpe", tmp_path / "tok")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "models" / "base")
    tokenizer.save_pretrained(tmp_path / "models" / "base")
    tokenize.main()
    sets = load_from_disk("data/tokenized")
    rows = list(sets["train"]["input_ids"]) + list(sets["validation"]["input_ids"])
    masks = list(sets["train"]["assistant_masks"]) + list(sets["validation"]["assistant_masks"])
    assert all(len(r) <= 32 for r in rows) and all(all(m) for m in masks)  # no prefix here: every token trained
    every = sorted(t for r in rows for t in r)
    whole = sorted(t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    assert every == whole  # nothing cut away: long texts became several rows
    metrics = json.loads(Path("metrics/tokenize.json").read_text())
    assert metrics["template"] == "raw" and metrics["answer_cut"] == 0
    trainer = build_trainer(load_params(), tmp_path / "out", [])
    for batch in trainer.get_train_dataloader():
        labels, ids = batch["labels"][0].tolist(), batch["input_ids"][0].tolist()
        starts = [p == 0 for p in batch["position_ids"][0].tolist()]  # packed: TRL never predicts across samples
        assert labels == [-100 if start else t for t, start in zip(ids, starts)] and sum(starts) > 1
    for bad, message in [
        ({"data": {"sources": raw["data"]["sources"] + [{"kind": "builtin"}]}}, "text sources are continued pre-training"),
        ({"train": raw["train"] | {"packing": False}}, "set train.packing: true"),
    ]:
        with pytest.raises(ParamsError, match=message):
            validate(raw | bad)


def test_the_server_parser_puts_reasoning_in_reasoning_content_and_calls_in_tool_calls(tmp_path):
    """transformers serve's own parsing step (parse_assistant_message) over the tokenizer tokenize saves: a reply
    with a think block and a call gives reasoning_content, content without the wrapper, and the call."""
    from transformers import AutoTokenizer
    from transformers.cli.serving.utils import parse_assistant_message

    from stages.lib.chat import format as chat_format
    from stages.lib.core.recipes import template_recipe

    tokenizer = chat_format.reload(kinds.build("bpe", tmp_path / "tok"), tmp_path / "saved")
    chat_format.save(tokenizer, chat_format.decide(tokenizer, template_recipe("qwen3"), "qwen3", []), tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")  # as models/merged ships it
    prompt = saved.apply_chat_template([{"role": "user", "content": "Q"}], add_generation_prompt=True)["input_ids"]
    text = '<think>\nFirst look.\n</think>\n\nOn it.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>'
    generated = saved(text, add_special_tokens=False)["input_ids"]
    content, reasoning, calls = parse_assistant_message(saved, None, generated, [prompt])
    assert (content.strip(), reasoning.strip()) == ("On it.", "First look.")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1})]


@pytest.mark.parametrize("content, message", [
    ("Sure. <think>R</think> 2", "a think block after other text"),
    ("<think>R never closed 2", "a <think> block that is never closed"),
    ("<think>R</think>2 <think>S</think>", "a second think block"),
])  # fmt: skip
def test_reasoning_markup_that_would_train_as_text_is_refused(content, message):
    from conftest import normalized

    from stages.lib.data.normalize import RecordError

    with pytest.raises(RecordError, match=rf"record 0: 'messages'\[1\]: the answer has {message}"):
        normalized([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]}],
                   "messages")


def test_r1_exports_whose_think_was_a_prefill_read_as_reasoning():
    from conftest import normalized

    out = normalized([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "R\n</think>\n\n2"}]}],
                     "messages")  # fmt: skip
    assert out["messages"][0][1] == {"role": "assistant", "content": "2", "reasoning": "R"}


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "kto_tag": False},
     r"a 'kto_tag' of False beside the conversation is KTO data"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": 0},
     r"a 'label' of 0 beside the conversation is KTO data .* keep only the records marked desirable"),
])  # fmt: skip
def test_kto_labels_of_every_spelling_are_refused(record, message):
    from conftest import normalized

    from stages.lib.data.normalize import RecordError

    with pytest.raises(RecordError, match=message):
        normalized([record], "messages")


def test_tool_schemas_reach_the_prompt_or_the_record_is_refused():
    from conftest import normalized

    from stages.lib.data.normalize import RecordError

    legacy = {"functions": [{"name": "f", "parameters": {"type": "object"}}], "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": None, "function_call": {"name": "f",
         "arguments": "{}"}}]}  # fmt: skip
    out = normalized([legacy], "messages")  # OpenAI's older `functions` list: the record's tools
    assert json.loads(out["tools"][0]) == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(RecordError, match="has a 'tools' column .* which format alpaca cannot carry"):
        normalized([{"instruction": "q", "output": "[]", "tools": "[]"}], "alpaca")


def test_an_answer_that_is_only_reasoning_is_not_trained_empty_when_reasoning_is_dropped(tmp_path):
    from conftest import default_params

    from stages.lib.chat import format as chat_format
    from stages.lib.core.params import validate
    from stages.lib.core.recipes import template_recipe
    from stages.tokenize import encode_conversations

    tokenizer = chat_format.reload(kinds.build("bpe", tmp_path / "tok"), tmp_path / "saved")
    fmt = chat_format.decide(tokenizer, template_recipe("qwen3"), "qwen3", [])
    raw = default_params()
    raw["tokenize"] |= {"template": "qwen3", "reasoning": "drop"}
    only = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "reasoning": "R"}]
    later = only + [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    enc = encode_conversations([only, later], validate(raw), tokenizer, fmt)
    trained = {c: n for c, n in zip(enc["conversation"], enc["trained"]) if n}
    assert 0 not in trained and enc["trained"][enc["conversation"].index(0)] == 0  # counted as no answer left
    rows = [ids for ids, c in zip(enc["input_ids"], enc["conversation"]) if c == 1]
    assert len(rows) == 1 and "R" not in tokenizer.decode(rows[0])  # only a2 trains; no reasoning anywhere
