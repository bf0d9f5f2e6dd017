"""Records → conversations, and the tokenized set's columns (the format itself: tests/test_chat_format.py)."""

from __future__ import annotations

import pytest
from conftest import default_params

from stages.download import train_tokenizer
from stages.lib.chat import format as chat_format
from stages.lib.chat.records import Dialogue, RecordError, from_alpaca, from_messages
from stages.lib.params import validate
from stages.lib.recipes import template_recipe
from stages.lib.toy_task import toy_zh_en
from stages.tokenize import tokenize_records


@pytest.fixture(scope="module")
def tiny_tokenizer():
    records = toy_zh_en(0)
    return train_tokenizer([v for r in records for v in r.values()], 600)


def params_with(template: str, fmt: str = "alpaca", max_length: int = 512):
    raw = default_params()
    raw["tokenize"] |= {"template": template, "max_length": max_length}
    raw["data"]["format"] = fmt
    return validate(raw)


def encoded(records, params, tokenizer):
    fmt = chat_format.decide(tokenizer, template_recipe(params.tokenize.template), params.tokenize.template, [])
    return tokenize_records(records, params, tokenizer, fmt)


def test_alpaca_input_and_history_become_turns():
    record = {"instruction": "介绍", "input": "北京", "output": "首都。", "history": [["你好", "你好！"]], "system": "S"}
    assert from_alpaca(record, 0).messages() == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "介绍\n北京"},
        {"role": "assistant", "content": "首都。"},
    ]  # fmt: skip

def test_messages_and_sharegpt_records_parse_alike():
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                           {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                           {"role": "assistant", "content": "a2"}]}
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"},
                                  {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
                                  {"from": "gpt", "value": "a2"}]}
    assert from_messages(openai, 0) == from_messages(sharegpt, 0) == Dialogue("q2", "a2", [("q1", "a1")], "S")


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "q"}]}, "end with assistant"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "unknown role 'robot'"),
    ({}, "non-empty 'messages'"),
])
def test_bad_message_records_are_named(record, message):
    with pytest.raises(RecordError, match=message):
        from_messages(record, 7)


def test_alpaca_record_without_output_is_named():
    with pytest.raises(RecordError, match="record 3: 'output' must be a string"):
        from_alpaca({"instruction": "x"}, 3)


def test_truncation_keeps_masks_aligned(tiny_tokenizer):
    params = params_with("chatml", max_length=24)
    records = [{"instruction": "Translate into Chinese. " * 3, "input": "red cat", "output": "红色的猫"}]
    enc = encoded(records, params, tiny_tokenizer)
    assert enc["truncated"] == 1
    assert len(enc["input_ids"][0]) == len(enc["assistant_masks"][0]) == 24


def test_trl_collator_pads_labels_with_ignore_index(tiny_tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    enc = encoded(toy_zh_en(2)[:4], params_with("chatml"), tiny_tokenizer)
    rows = [{"input_ids": i, "labels": [t if m else -100 for t, m in zip(i, mask)]}
            for i, mask in zip(enc["input_ids"], enc["assistant_masks"])]  # fmt: skip
    batch = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id)(rows)
    for row, ids in enumerate(enc["input_ids"]):
        n = len(ids)
        assert batch["labels"][row, n:].eq(-100).all() and batch["attention_mask"][row, n:].eq(0).all()
        kept = batch["labels"][row, :n] != -100
        assert batch["labels"][row, :n][kept].tolist() == batch["input_ids"][row, :n][kept].tolist()


def test_prompt_completion_text_is_used_as_is(tiny_tokenizer):
    params = params_with(None, fmt="prompt_completion")
    fmt = chat_format.decide(tiny_tokenizer, template_recipe("raw"), "raw", [])
    out = tokenize_records([{"prompt": "red cat =", "completion": " 红色的猫"}], params, tiny_tokenizer, fmt)
    ids, n = out["input_ids"][0], out["prompt_length"][0]
    assert tiny_tokenizer.decode(ids[:n]) == "red cat ="
    assert tiny_tokenizer.decode(ids[n:]) == " 红色的猫<|im_end|>"


def test_prompt_completion_with_a_template_is_refused():
    from stages.lib.errors import UserError
    from stages.tokenize import template_name

    with pytest.raises(UserError, match="tokenize.template 'chatml': data.format prompt_completion"):
        template_name(params_with("chatml", fmt="prompt_completion"))


@pytest.mark.parametrize("template", ["seed", "chatml", "chatglm2"])
@pytest.mark.parametrize("answer", ["", "   "])
def test_an_empty_answer_trains_only_its_end(template, answer, tiny_tokenizer):
    params = params_with(template)
    fmt = chat_format.decide(tiny_tokenizer, template_recipe(template), template, [])
    enc = tokenize_records([{"instruction": "red cat", "output": answer}], params, tiny_tokenizer, fmt)
    ids, mask, n = enc["input_ids"][0], enc["assistant_masks"][0], enc["prompt_length"][0]
    prompt = tiny_tokenizer.apply_chat_template(enc["messages"][0][:-1], chat_template=fmt.chat_template,
                                                add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert ids[:n] == tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]  # the whole prompt, as served
    assert mask[:n] == [0] * n and mask[-1] == 1 and ids[-1] == tiny_tokenizer.eos_token_id


def test_a_row_cut_inside_its_last_prompt_trains_but_is_never_validated(tiny_tokenizer):
    from stages.tokenize import build_splits

    long = {"instruction": "red cat", "output": "红色的猫", "history": [["blue dog " * 4, "蓝色的狗"]] * 3}
    records = [long] * 6 + toy_zh_en(4)[:14]
    full = encoded([long], params_with("chatml"), tiny_tokenizer)
    cut = full["prompt_length"][0] - 2  # inside the last prompt, after the earlier answers
    raw = default_params()
    raw["tokenize"] |= {"template": "chatml", "max_length": cut, "validation_fraction": 0.5}
    params = validate(raw)
    enc = encoded(records, params, tiny_tokenizer)
    splits, summary = build_splits(records, enc, params)
    assert summary["last_prompt_truncated"] == 6 and summary["train_records"] == 10  # the 6 cut rows train
    assert all(r["prompt_length"] < len(r["input_ids"]) for r in splits["validation"])
