"""Templates, masks and the tokenized set: checked against TRL's own prompt-completion masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import default_params

from stages.download import train_tokenizer
from stages.lib.params import validate
from stages.lib.recipes import template_recipe
from stages.lib.templates import Dialogue, RecordError, from_alpaca, from_messages, render
from stages.lib.toy_task import toy_zh_en
from stages.tokenize import encode, texts_for


@pytest.fixture(scope="module")
def tiny_tokenizer():
    records = toy_zh_en(0)
    return train_tokenizer([v for r in records for v in r.values()], 600)


def params_with(template: str, fmt: str = "alpaca", max_length: int = 512):
    raw = default_params()
    raw["tokenize"] |= {"template": template, "max_length": max_length}
    raw["data"]["format"] = fmt
    return validate(raw)


def test_seed_template_matches_the_seed_prompt():
    prompt, completion = render(from_alpaca({"instruction": "介绍北京", "input": "", "output": "北京是首都。"}, 0),
                                template_recipe("seed"))
    assert prompt == "### 问题：\n介绍北京\n\n### 回答：\n"
    assert completion == "北京是首都。"


def test_chatglm2_template_numbers_rounds_from_one():
    dialogue = Dialogue("再见", "再见！", history=[("你好", "你好！")])
    prompt, completion = render(dialogue, template_recipe("chatglm2"))
    assert prompt == "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：再见\n\n答："
    assert completion == "再见！"


def test_chatml_template_with_system_and_end_token():
    prompt, completion = render(Dialogue("hi", "hello", system="Be brief."), template_recipe("chatml"))
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert completion == "hello<|im_end|>"


def test_tokenizer_chat_template_gives_the_same_text_as_the_chatml_recipe(tiny_tokenizer):
    dialogue = Dialogue("hi", "hello", history=[("a", "b")])
    assert render(dialogue, template_recipe("tokenizer"), tiny_tokenizer) == render(dialogue, template_recipe("chatml"))


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


def trl_prepared(pairs: list[tuple[str, str]], tokenizer, tmp_path: Path):
    """What TRL's SFTTrainer itself makes of prompt/completion pairs: input_ids and labels."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=str(tmp_path), max_length=None, report_to="none", use_cpu=True, bf16=False,
                     gradient_checkpointing=False, shuffle_dataset=False, dataset_num_proc=None)
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train_dataset


def ours(records, params, tokenizer):
    texts, boundaries = texts_for(records, params, tokenizer)
    enc = encode(tokenizer, texts, boundaries, params.tokenize.max_length)
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"], enc["completion_mask"])]
    return enc["input_ids"], labels


def pairs_of(records, params, tokenizer):
    from stages.lib.recipes import model_recipe
    from stages.lib.templates import prompt_completion

    template = template_recipe(params.tokenize.template or model_recipe(params.model.recipe).template)
    return [prompt_completion(r, params.data.format, template, tokenizer, i) for i, r in enumerate(records)]


def assert_same_as_trl(records, params, tokenizer, tmp_path):
    input_ids, labels = ours(records, params, tokenizer)
    trl = trl_prepared(pairs_of(records, params, tokenizer), tokenizer, tmp_path)
    assert trl["input_ids"] == input_ids
    assert trl["labels"] == labels
    for ids, lab in zip(input_ids, labels):
        answer = [t for t, l in zip(ids, lab) if l != -100]
        assert answer and answer[-1] == tokenizer.eos_token_id  # the answer and its EOS are trained
        assert lab[0] == -100  # the prompt is not


@pytest.mark.parametrize("template", ["chatml", "seed", "chatglm2", "tokenizer"])
def test_masks_equal_trl_on_the_toy_task(template, tiny_tokenizer, tmp_path):
    assert_same_as_trl(toy_zh_en(1)[:60], params_with(template), tiny_tokenizer, tmp_path)


@pytest.mark.shared_data
@pytest.mark.parametrize("template", ["seed", "chatml", "tokenizer"])
def test_masks_equal_trl_on_alpaca_zh_with_the_qwen2_tokenizer(template, shared_data, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "qwen2")
    records = json.loads((shared_data / "instruct" / "alpaca_zh_demo.json").read_text())[:80]
    assert_same_as_trl(records, params_with(template), tokenizer, tmp_path)


def test_truncation_keeps_labels_aligned(tiny_tokenizer):
    params = params_with("chatml", max_length=24)
    records = [{"instruction": "Translate into Chinese. " * 3, "input": "red cat", "output": "红色的猫"}]
    texts, boundaries = texts_for(records, params, tiny_tokenizer)
    enc = encode(tiny_tokenizer, texts, boundaries, 24)
    assert enc["truncated"] == 1
    assert len(enc["input_ids"][0]) == len(enc["completion_mask"][0]) == 24


def test_trl_collator_pads_labels_with_ignore_index(tiny_tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    input_ids, labels = ours(toy_zh_en(2)[:4], params_with("chatml"), tiny_tokenizer)
    batch = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id)(
        [{"input_ids": i, "labels": l} for i, l in zip(input_ids, labels)]
    )
    for row, ids in enumerate(input_ids):
        n = len(ids)
        assert batch["labels"][row, n:].eq(-100).all() and batch["attention_mask"][row, n:].eq(0).all()
        kept = batch["labels"][row, :n] != -100
        assert batch["labels"][row, :n][kept].tolist() == batch["input_ids"][row, :n][kept].tolist()
