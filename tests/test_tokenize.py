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


def english_tokenizer(folder):
    """A SentencePiece tokenizer without byte fallback, trained on English text only: it has no tokens for
    ChatML's `<|`, `|>` or for Chinese, and no chat template (a small pretrained model's kind)."""
    import sentencepiece as spm

    from stages.lib.convert import fast_tokenizer

    words = [r["output"] if r["output"].isascii() else r["input"] for r in toy_zh_en(0)]
    texts = [f"Question: what is a {w}? Answer: a {w}, said the Note." for w in words if w.isascii()]
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(folder / "tokenizer"), vocab_size=120,
                                   model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)  # fmt: skip
    return fast_tokenizer(folder / "tokenizer.model")


def english_records(n: int) -> list[dict]:
    words = [w for w in (r["output"] if r["output"].isascii() else r["input"] for r in toy_zh_en(0)) if w.isascii()]
    return [{"instruction": f"what is a {w}?", "output": f"a {w}"} for w in words[:n]]


def test_a_tokenizer_without_chat_markers_trains_with_the_plain_template(project, tmp_path, capsys):
    """Every built-in chat format but `plain` needs markers this tokenizer cannot write; each error leads to plain,
    and plain trains the answers, each ending with EOS."""
    import shutil

    shutil.rmtree(tmp_path / "models" / "base")
    tokenizer = english_tokenizer(tmp_path / "sp")
    tokenizer.save_pretrained(tmp_path / "models" / "base")
    rows = conversations(english_records(40))
    write_raw(tmp_path, rows[:34], rows[34:])
    for template in ("chatml", "tokenizer"):
        project(template=template)
        with pytest.raises(UserError, match=r"set tokenize.template: plain"):
            run_tokenize(capsys)
    project(template="plain")
    _, summary = run_tokenize(capsys)
    assert summary["unk_answer_tokens"] == 0 and summary["train_records"] > 20
    from datasets import load_from_disk

    row = load_from_disk("data/tokenized")["validation"][0]
    prompt = tokenizer.decode(row["input_ids"][: row["prompt_length"]])
    assert prompt.rstrip().endswith("Answer:") and row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in row["input_ids"]


def test_answers_the_tokenizer_cannot_spell_are_refused_and_never_targets(project, tmp_path, capsys):
    """A SentencePiece tokenizer (no byte fallback) trained on the toy words: capitals and '!' are <unk>. Over
    tokenize.max_unk_share of the answer tokens <unk>: refused, with the numbers; allowed, <unk> carries no loss."""
    import shutil

    import tokenizer_kinds as kinds

    shutil.rmtree(tmp_path / "models" / "base")
    kinds.build("chatglm2", tmp_path / "tok").save_pretrained(tmp_path / "models" / "base")
    rows = conversations([{"instruction": "red cat", "output": "QUIZ ZAP JOLT!"}] * 12 + toy_zh_en(0)[:12])
    write_raw(tmp_path, rows[:20], rows[20:])
    os.makedirs("data/tokenized/old", exist_ok=True)
    project(template="seed")
    with pytest.raises(UserError, match=r"% of the answer tokens \(\d+ of \d+\) are <unk>: the tokenizer in "
                                        r"models/base cannot spell the answers.*tokenize.max_unk_share: 1"):  # fmt: skip
        run_tokenize(capsys)
    assert os.path.isdir("data/tokenized/old")  # the last good output stays
    project(template="seed", max_unk_share=1)
    out, summary = run_tokenize(capsys)
    assert summary["unk_answer_tokens"] > 0 and "answer tokens are <unk> and were left out of the loss" in out
    from datasets import load_from_disk

    unk = json.loads(open("data/tokenized/tokenizer/tokenizer_config.json").read()).get("unk_token")
    from transformers import AutoTokenizer

    unk_id = AutoTokenizer.from_pretrained("data/tokenized/tokenizer").convert_tokens_to_ids(unk)
    for split in load_from_disk("data/tokenized").values():
        for r in split:
            assert not any(m and t == unk_id for t, m in zip(r["input_ids"], r["assistant_masks"]))


def test_trained_tokens_count_the_train_split_only(project, tmp_path, capsys):
    rows = conversations(toy_zh_en(0)[:30])
    write_raw(tmp_path, rows[:24], rows[24:])
    project(template="chatml")
    _, summary = run_tokenize(capsys)
    from datasets import load_from_disk

    splits = load_from_disk("data/tokenized")
    assert summary["trained_tokens"] == sum(sum(m) for m in splits["train"]["assistant_masks"])
    assert summary["validation_answer_tokens"] == sum(sum(m) for m in splits["validation"]["assistant_masks"]) > 0


def test_max_length_beyond_the_models_positions_is_said_and_advice_stays_within_them(project, tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(max_position_embeddings=24, vocab_size=600).save_pretrained(tmp_path / "models" / "base")
    rows = conversations([{"instruction": "Translate.", "input": "red cat", "output": "红色的猫 " * 5}] * 3 +
                         toy_zh_en(0)[:20])  # fmt: skip
    write_raw(tmp_path, rows[:18], rows[18:])
    project(template="chatml", max_length=26)
    out, _ = run_tokenize(capsys)
    assert "tokenize.max_length (26) is above the 24 positions of the model in models/base" in out
    assert "tokenize.max_length reaches the model's 24 positions: shorten the records, or extend the positions with " \
           "model.rope_scaling" in out
    assert "raise tokenize.max_length" not in out


def lowercasing_wordpiece(folder):
    """A WordPiece tokenizer as small pretrained English models have: lowercases, splits on whitespace and
    punctuation, decodes with spaces between words (`Answer:` reads back as `answer :`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.decoder = decoders.WordPiece()
    texts = [f"Question: what is a {r['instruction']}? Answer: {r['output']}." for r in english_records(40)]
    raw.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_a_tokenizer_that_decodes_its_markers_otherwise_still_gets_only_the_answer(tmp_path):
    """The tester's case: a lowercasing WordPiece tokenizer and the plain template. The reply eval, chat and serve
    read is the generated text alone, not the prompt with it (the parser's anchor is the decoded header)."""
    from transformers import AutoTokenizer

    from stages.lib.chat import reply

    tokenizer = lowercasing_wordpiece(tmp_path / "wp")
    fmt = chat_format.decide(tokenizer, template_recipe("plain"), "plain", [])
    chat_format.save(tokenizer, fmt, tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    prompt = saved.apply_chat_template([{"role": "user", "content": "what is a red cat?"}], add_generation_prompt=True,
                                       tokenize=False)  # fmt: skip
    prompt_ids = saved(prompt, add_special_tokens=False)["input_ids"]
    new = saved("a red cat", add_special_tokens=False)["input_ids"] + [saved.eos_token_id]
    assert "answer :" in saved.decode(prompt_ids)  # the markers do not read back as written
    assert reply.parse(saved, new, [saved.eos_token_id], prompt_ids).content == "a red cat"
