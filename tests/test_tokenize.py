"""The tokenized set's columns and the tokenize stage's counts and refusals (the format itself:
tests/test_chat_format.py; records → conversations: tests/test_data.py)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import ROOT, conversations, default_params, write_raw

from stages.download import train_tokenizer
from stages.lib.chat import format as chat_format
from stages.lib.core.errors import UserError
from stages.lib.core.params import validate
from stages.lib.core.recipes import template_recipe
from stages.lib.data.toy_task import toy_zh_en
from stages.tokenize import encode_conversations


@pytest.fixture(scope="module")
def tiny_tokenizer():
    records = toy_zh_en(0)
    return train_tokenizer([v for r in records for v in r.values()], 600)


def params_with(template: str | None, max_length: int = 512, **tokenize):
    raw = default_params()
    raw["tokenize"] |= {"template": template, "max_length": max_length} | tokenize
    return validate(raw)


def encoded(records, params, tokenizer, fmt: str = "alpaca"):
    name = params.tokenize.template or "raw"
    chat = chat_format.decide(tokenizer, template_recipe(name), name, [])
    return encode_conversations(conversations(records, fmt), params, tokenizer, chat)


def test_truncation_keeps_masks_aligned(tiny_tokenizer):
    params = params_with("chatml", max_length=24)
    records = [{"instruction": "Translate into Chinese. " * 3, "input": "red cat", "output": "红色的猫"}]
    enc = encoded(records, params, tiny_tokenizer)
    assert enc["truncated"] == [True] and enc["answer_cut"] == [True]
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
    out = encoded([{"prompt": "red cat =", "completion": " 红色的猫"}], params_with(None), tiny_tokenizer,
                  "prompt_completion")  # fmt: skip
    ids, n = out["input_ids"][0], out["prompt_length"][0]
    assert tiny_tokenizer.decode(ids[:n]) == "red cat ="
    assert tiny_tokenizer.decode(ids[n:]) == " 红色的猫<|im_end|>"


def test_prompt_completion_with_a_template_is_refused():
    from stages.tokenize import template_name

    with pytest.raises(UserError, match="tokenize.template 'chatml': prompt_completion sources are text used as is"):
        template_name(params_with("chatml"), "prompt_completion")


@pytest.fixture
def project(tmp_path, tiny_tokenizer, monkeypatch):
    """A folder with params.yaml, recipes and models/base (the tiny tokenizer), as the tokenize stage sees it."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    tiny_tokenizer.save_pretrained(tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)

    def params(**tokenize):
        raw = default_params()
        raw["tokenize"] |= tokenize
        (tmp_path / "params.yaml").write_text(json.dumps(raw))

    return params


def run_tokenize(capsys) -> tuple[str, dict]:
    from stages import tokenize

    tokenize.main()
    return capsys.readouterr().out, json.loads(open("metrics/tokenize.json").read())


def test_a_row_cut_inside_its_last_prompt_trains_but_is_never_validated(project, tiny_tokenizer, tmp_path, capsys):
    long = {"instruction": "red cat", "output": "红色的猫", "history": [["blue dog " * 4, "蓝色的狗"]] * 3}
    full = encoded([long], params_with("chatml"), tiny_tokenizer)
    cut = full["prompt_length"][0] - 2  # inside the last prompt, after the earlier answers
    project(template="chatml", max_length=cut)
    short = conversations(toy_zh_en(4)[:14])
    write_raw(tmp_path, short[:8], conversations([long]) * 3 + short[8:])
    _, summary = run_tokenize(capsys)
    assert summary["validation_moved_to_train"] == 3 and summary["train_records"] == 11  # the 3 cut rows train
    from datasets import load_from_disk

    validation = load_from_disk("data/tokenized")["validation"]
    assert len(validation) == 6 and all(r["prompt_length"] < len(r["input_ids"]) for r in validation)


def test_when_truncation_leaves_no_answer_the_error_says_why(project, tmp_path, capsys):
    project(template="chatml", max_length=8)
    rows = conversations(toy_zh_en(0)[:10])
    write_raw(tmp_path, rows[:8], rows[8:])
    os.makedirs("data/tokenized/old", exist_ok=True)
    with pytest.raises(UserError, match=r"all 10 records of data/raw lost their whole answer to tokenize.max_length "
                                        r"\(8 tokens\): their prompts fill it; raise tokenize.max_length"):  # fmt: skip
        run_tokenize(capsys)
    assert os.path.isdir("data/tokenized/old")  # the last good output stays


def test_cut_answers_are_counted_and_warned_about(project, tmp_path, capsys):
    project(template="chatml", max_length=26)
    rows = conversations([{"instruction": "Translate.", "input": "red cat", "output": "红色的猫 " * 5}] * 3 +
                         toy_zh_en(0)[:20])  # fmt: skip
    write_raw(tmp_path, rows[:18], rows[18:])
    out, summary = run_tokenize(capsys)
    assert summary["answer_cut"] >= 3 and summary["truncated"] >= summary["answer_cut"]
    assert "of the records lose part of their answer to tokenize.max_length 26" in out


def test_a_template_the_tokenizer_cannot_write_is_refused_unless_allowed(project, tmp_path, capsys):
    """A SentencePiece tokenizer (ChatGLM2's kind) without ChatML's markers: '|' would be <unk>."""
    import shutil

    import tokenizer_kinds as kinds

    shutil.rmtree(tmp_path / "models" / "base")
    kinds.build("chatglm2", tmp_path / "tok").save_pretrained(tmp_path / "models" / "base")
    rows = conversations([{"instruction": "red cat", "output": "红色的猫"}] * 4 + toy_zh_en(0)[:8])
    write_raw(tmp_path, rows[:9], rows[9:])
    project(template="chatml")
    with pytest.raises(UserError, match=r"template 'chatml': the tokenizer in models/base has no tokens for "
                                        r"'<\|im_start\|>system'.*tokenize.unknown_markers: true"):  # fmt: skip
        run_tokenize(capsys)
    project(template="chatml", unknown_markers=True)
    out, summary = run_tokenize(capsys)
    assert summary["unk_tokens"] > 0.01 * summary["tokens"] and "of the tokens are <unk>" in out


@pytest.mark.parametrize("where", ["prompt", "answer"])
def test_a_huge_record_is_tokenized_only_as_far_as_max_length_can_reach(tiny_tokenizer, monkeypatch, where: str):
    """Rows are clipped before tokenizing (memory stays bounded); the ids, masks and flags within max_length are
    those of the whole text."""
    from stages.lib.chat import encode

    huge = "red cat blue dog 红色的猫 " * 2000  # 40,000 characters
    record = {"instruction": huge if where == "prompt" else "Translate.", "output": huge if where == "answer" else "猫"}
    records = [record, toy_zh_en(0)[0]]
    params = params_with("chatml", max_length=64)
    monkeypatch.setattr(encode, "CHARS_FLOOR", 10**9)
    whole = encoded(records, params, tiny_tokenizer)
    monkeypatch.setattr(encode, "CHARS_FLOOR", 0)  # clip at 4 x 64 x the longest token
    assert 4 * 64 * encode.longest_token(tiny_tokenizer) < len(huge)
    clipped = encoded(records, params, tiny_tokenizer)
    for key in ("input_ids", "assistant_masks", "truncated", "answer_cut", "prompt_mismatch"):
        assert clipped[key] == whole[key], key


def test_tokenize_memory_stays_bounded_for_a_record_of_20_megabytes(tmp_path):
    """The tester's case (a 50 MB record took tokenize above 10.7 GB for 222 s, to be cut to 128 tokens), at 20 MB:
    the peak resident memory of tokenizing it stays below 1.5 GiB."""
    import subprocess
    import sys

    code = ("import resource, sys, json\n"
            "from stages.download import train_tokenizer\n"
            "from stages.lib.data.toy_task import toy_zh_en\n"
            "sys.path.insert(0, 'tests')\n"
            "from test_tokenize import encoded, params_with\n"
            "tok = train_tokenizer([v for r in toy_zh_en(0) for v in r.values()], 600)\n"
            "rec = {'instruction': 'red cat blue dog ' * 1_250_000, 'output': '猫'}\n"
            "out = encoded([rec], params_with('chatml', max_length=128), tok)\n"
            "print(json.dumps([out['truncated'][0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    truncated, peak_kib = json.loads(proc.stdout.strip().splitlines()[-1])
    assert truncated and peak_kib < 1.5 * 2**20, peak_kib
