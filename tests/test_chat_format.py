"""One prompt format from tokenize to serving, for every template × tokenizer kind.

For each tokenized record: the prefix (BOS, [gMASK] <sop>) once, one stop token at the end, the trained tokens
are exactly the assistant answers (+ their end token), the tokenizer saved for models/merged rebuilds the prompt
ids with `apply_chat_template`, and the trained target itself, decoded as a server decodes, scores exact match 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizer_kinds as kinds
from conftest import SHARED_DATA, default_params

from stages.eval import answer_text
from stages.lib.chat import format as chat_format
from stages.lib.core.errors import UserError
from stages.lib.core.params import validate
from stages.lib.core.recipes import template_recipe
from stages.lib.eval.scores import exact_match
from stages.lib.data.toy_task import toy_zh_en
from stages.tokenize import encode_conversations

TEMPLATES = ["chatml", "seed", "chatglm2", "raw", "tokenizer"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    built = {}

    def get(kind: str):
        if kind in kinds.SHARED and not SHARED_DATA.is_dir():
            pytest.skip("../shared/data is absent")
        if kind not in built:
            built[kind] = kinds.build(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return get


def params_for(template: str, turns: str = "all", max_length: int = 512):
    raw = default_params()
    raw["tokenize"] |= {"template": None if template == "raw" else template, "max_length": max_length,
                        "assistant_turns": turns}  # fmt: skip
    return validate(raw)


def prompt_completion(records: list[dict]) -> list[list[dict]]:
    """prompt_completion text as the download stage writes it: the prompt as the user's turn, as is."""
    return [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}] for r in records]


def tokenized(tokenizer, template: str, folder: Path, turns: str = "all"):
    """(records as messages, the format, encode's columns) as the tokenize stage makes them, with the tokenizer
    saved into `folder` as the stage saves it for models/merged."""
    rows = kinds.records(with_system=template in ("chatml", "tokenizer"))
    if template == "raw":  # prompt_completion text: the prompt is the user's turn, as is
        rows = [r for r in rows if len(r["messages"]) == 2]
        for r in rows:  # prompt_completion text carries its own separator, here a newline
            r["messages"][0]["content"] += "\n"
    params = params_for(template, turns=turns)
    tokenizer = chat_format.reload(tokenizer, folder)
    fmt = chat_format.decide(tokenizer, template_recipe(template), template, [])
    enc = encode_conversations([r["messages"] for r in rows], params, tokenizer, fmt)
    chat_format.save(tokenizer, fmt, folder)
    return rows, fmt, enc


def runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The contiguous stretches of trained tokens."""
    out, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            out, current = out + [current], []
    return out + ([current] if current else [])


def server_prompt_ids(saved, messages: list[dict]) -> list[int]:
    got = saved.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(got["input_ids"] if hasattr(got, "keys") else got)


@pytest.mark.parametrize("kind", kinds.LOCAL + kinds.SHARED)
@pytest.mark.parametrize("template", TEMPLATES)
def test_one_format_from_tokenize_to_serving(kind, template, tokenizers, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = tokenizers(kind)
    if template == "tokenizer" and not tokenizer.chat_template:
        pytest.skip(f"{kind} has no chat template of its own")
    rows, fmt, enc = tokenized(tokenizer, template, tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)  # what merge copies into models/merged
    assert saved.pad_token is not None
    prefix, eos = fmt.prefix_ids, saved.eos_token_id
    for row, ids, mask, n_prompt in zip(rows, enc["input_ids"], enc["assistant_masks"], enc["prompt_length"]):
        # the tokenizer's prefix exactly once, at the start; one stop token at the end, never EOS twice
        assert ids[: len(prefix)] == prefix and all(ids.count(t) == 1 for t in prefix)
        assert ids[-1] in fmt.stop_ids and mask[-1] == 1 and ids[-2:] != [eos, eos]
        # trained: each answer (with the token that ends it), nothing of the prompts
        texts = [saved.decode(r, skip_special_tokens=True).strip() for r in runs(ids, mask)]
        assert texts == [a.strip() for a in kinds.answers(row)]
        # the prompt a server builds from the saved tokenizer is the training prompt, id for id
        assert server_prompt_ids(saved, row["messages"][:-1]) == ids[:n_prompt]
        # the trained target, decoded as eval (and a server) decodes, is the reference: exact match 1
        assert exact_match(answer_text(saved, ids[n_prompt:], fmt.stop_ids), kinds.answers(row)[-1]) == 1.0
    assert not any(enc["prompt_mismatch"])


def test_only_the_last_answer_is_trained_when_asked(tokenizers, tmp_path):
    rows, _, enc = tokenized(tokenizers("bpe"), "chatml", tmp_path, turns="last")
    for row, ids, mask in zip(rows, enc["input_ids"], enc["assistant_masks"]):
        assert len(runs(ids, mask)) == 1
    _, _, all_enc = tokenized(tokenizers("bpe"), "chatml", tmp_path, turns="all")
    assert all_enc["input_ids"] == enc["input_ids"]  # the same text, only the mask differs
    assert sum(map(sum, all_enc["assistant_masks"])) > sum(map(sum, enc["assistant_masks"]))


def test_double_bos_from_template_and_tokenizer_is_one(tokenizers, tmp_path):
    tokenizer = tokenizers("sp_bos")
    text = tokenizer.apply_chat_template(kinds.records()[0]["messages"], tokenize=False)
    assert tokenizer(text)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # the trap: BOS rendered and added
    _, fmt, enc = tokenized(tokenizer, "tokenizer", tmp_path)
    assert all(ids[0] == tokenizer.bos_token_id != ids[1] for ids in enc["input_ids"])


def test_a_tokenizer_that_adds_eos_itself_gives_one_eos(tokenizers, tmp_path):
    tokenizer = tokenizers("sp_eos")
    assert tokenizer("red cat")["input_ids"][-1] == tokenizer.eos_token_id  # the trap
    eos = tokenizer.eos_token_id
    for template in ("seed", "tokenizer"):  # seed: EOS after the last answer; the chat template: after each
        rows, _, enc = tokenized(tokenizer, template, tmp_path / template)
        for row, ids in zip(rows, enc["input_ids"]):
            assert ids[-1] == eos and ids.count(eos) == (len(kinds.answers(row)) if template == "tokenizer" else 1)


def test_a_text_end_marker_is_replaced_by_eos_so_generation_stops(tokenizers):
    tokenizer = tokenizers("sp_bos")
    assert len(tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1  # plain text here
    fmt = chat_format.decide(tokenizer, template_recipe("chatml"), "chatml", [])
    assert fmt.stop_ids == [tokenizer.eos_token_id] and "end marker '<|im_end|>'" in fmt.notes[0]
    # a perfect answer (trained target) decodes to the reference, not 'down<|im_end|>'
    ids = tokenizer("down</s>", add_special_tokens=False)["input_ids"] + tokenizer("junk", add_special_tokens=False)["input_ids"]
    assert answer_text(tokenizer, ids, fmt.stop_ids) == "down"


def test_one_token_end_marker_stops_generation(tokenizers):
    qwen_like = tokenizers("bpe")
    fmt = chat_format.decide(qwen_like, template_recipe("chatml"), "chatml", [7])
    assert fmt.stop_ids == [qwen_like.convert_tokens_to_ids("<|im_end|>"), 7]


def test_pad_rule_for_tokenizers_without_a_pad_token(tokenizers):
    sp = tokenizers("sp_bos")
    assert sp.pad_token is None
    assert chat_format.decide(sp, template_recipe("seed"), "seed", []).pad_token == "<unk>"
    bpe = kinds.build("bpe", None)
    bpe.pad_token = None
    assert chat_format.decide(bpe, template_recipe("seed"), "seed", []).pad_token == bpe.eos_token


def test_tokenizer_template_without_a_chat_template_is_named(tokenizers):
    tokenizer = tokenizers("chatglm2")
    with pytest.raises(UserError, match="tokenize.template 'tokenizer'.*no chat template"):
        chat_format.decide(tokenizer, template_recipe("tokenizer"), "tokenizer", [])


def test_a_tokenizer_without_eos_is_named(tokenizers):
    bpe = kinds.build("bpe", None)
    bpe.eos_token = None
    with pytest.raises(UserError, match="no EOS token"):
        chat_format.decide(bpe, template_recipe("seed"), "seed", [])


def test_system_text_on_a_template_without_one_names_the_record(tokenizers):
    tokenizer = tokenizers("bpe")
    fmt = chat_format.decide(tokenizer, template_recipe("chatglm2"), "chatglm2", [])
    with pytest.raises(UserError, match="record 18: .*template 'chatglm2' has no system format"):
        encode_conversations([r["messages"] for r in kinds.records(with_system=True)], params_for("chatglm2"),
                             tokenizer, fmt)  # fmt: skip


def test_the_word_sop_stays_text_for_chatglm2(tokenizers):
    tokenizer = tokenizers("chatglm2")
    sop = tokenizer.convert_tokens_to_ids("<sop>")
    assert tokenizer("sop sop", add_special_tokens=False)["input_ids"].count(sop) == 0


def test_seed_and_chatglm2_texts_are_the_published_formats(tokenizers):
    tokenizer = tokenizers("bpe")
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "再见"}]  # fmt: skip
    render = {name: tokenizer.apply_chat_template(
        messages, chat_template=chat_format.decide(tokenizer, template_recipe(name), name, []).chat_template,
        tokenize=False, add_generation_prompt=True) for name in ("seed", "chatglm2", "chatml")}  # fmt: skip
    assert render["seed"] == "### 问题：\n你好\n\n### 回答：\n你好！\n\n### 问题：\n再见\n\n### 回答：\n"
    assert render["chatglm2"] == "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：再见\n\n答："
    assert render["chatml"] == ("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！<|im_end|>\n"
                                "<|im_start|>user\n再见<|im_end|>\n<|im_start|>assistant\n")


def test_a_prompt_that_ends_inside_a_token_is_reported(tokenizers, tmp_path):
    tokenizer = tokenizers("sp_bos")
    tokenizer.chat_template = kinds.LLAMA_STYLE + "{% if add_generation_prompt %}{{ ' ' }}{% endif %}"
    rows, _, enc = tokenized(tokenizer, "tokenizer", tmp_path)  # '[/INST] ' + 'white' is '[/INST]' + '▁white'
    blank = [k for k, r in enumerate(rows) if not kinds.answers(r)[-1].strip()]  # nothing to join the space to
    assert [k for k, m in enumerate(enc["prompt_mismatch"]) if m] == [k for k in range(len(rows)) if k not in blank]


def test_an_answer_the_template_rewrites_in_history_trains_in_a_row_of_its_own(tokenizers, tmp_path):
    tokenizer = tokenizers("bpe")  # an earlier answer rendered shorter once the conversation goes on (as Qwen3's
    tokenizer.chat_template = (    # template drops earlier reasoning)
        "{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ m['content'][:1] }}{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    rows, _, enc = tokenized(tokenizer, "tokenizer", tmp_path)
    assert not any(enc["prompt_mismatch"])
    for k, row in enumerate(rows):  # every answer trained whole, once, each as the last turn of its row
        mine = [n for n, c in enumerate(enc["conversation"]) if c == k]
        assert len(mine) == len(kinds.answers(row))
        trained = [tokenizer.decode([t for t, m in zip(enc["input_ids"][n], enc["assistant_masks"][n]) if m],
                                    skip_special_tokens=True).strip() for n in mine]  # fmt: skip
        assert sorted(trained) == sorted(a.strip() for a in kinds.answers(row))
    _, _, last = tokenized(tokenizer, "tokenizer", tmp_path, turns="last")
    assert len(last["input_ids"]) == len(rows)


def test_a_token_across_the_prompt_boundary_is_split_as_a_server_splits_it(tokenizers, tmp_path):
    tokenizer = tokenizers("qwen2")
    trap = tokenizer('答："', add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(trap[-1:]) == '："'  # the trap: one token over the prompt/answer boundary
    rows, fmt, enc = tokenized(tokenizer, "chatglm2", tmp_path)
    quoted = next(k for k, r in enumerate(rows) if kinds.answers(r)[-1].startswith('"'))
    ids, n = enc["input_ids"][quoted], enc["prompt_length"][quoted]
    assert tokenizer.decode(ids[n:]).startswith('"red cat"')  # the quote is trained, as the answer's first token
    assert sum(enc["prompt_repaired"]) >= 1 and not any(enc["prompt_mismatch"])


def test_a_plain_word_end_marker_is_not_a_stop_token(tokenizers):
    from stages.lib.core.recipes import TemplateRecipe

    tokenizer = tokenizers("bpe")
    word = TemplateRecipe(description="t", user="Q: {content}\n", assistant="A: {content} cat\n")
    assert len(tokenizer(" cat", add_special_tokens=False)["input_ids"]) == 1  # one token, but an ordinary word
    fmt = chat_format.decide(tokenizer, word, "word", [])
    assert fmt.stop_ids == [tokenizer.eos_token_id] and "' cat'" in fmt.notes[0]


def test_prompts_ending_in_a_space_train_the_whole_answer_and_are_not_validated(tokenizers, tmp_path):
    from datasets import Dataset

    from stages.tokenize import build_splits

    tokenizer = chat_format.reload(tokenizers("sp_bos"), tmp_path)  # SentencePiece: ' red' is one token '▁red'
    records = [{"prompt": f"Q: {r['input']}\nA: ", "completion": r["output"]} for r in toy_zh_en(5)[:20]
               if r["output"].isascii()]  # fmt: skip
    params = params_for("raw")
    fmt = chat_format.decide(tokenizer, template_recipe("raw"), "raw", [])
    enc = encode_conversations(prompt_completion(records), params, tokenizer, fmt)
    assert all(enc["prompt_mismatch"])  # '▁' + 'red' vs '▁red': counted
    for record, ids, mask in zip(records, enc["input_ids"], enc["assistant_masks"]):
        assert [tokenizer.decode(r, skip_special_tokens=True).strip() for r in runs(ids, mask)] == [record["completion"]]
    records += [{"prompt": f"Q: {r['input']}\nA:\n", "completion": r["output"]} for r in toy_zh_en(6)[:20]]
    conversations = prompt_completion(records)
    enc = encode_conversations(conversations, params, tokenizer, fmt)
    rows = Dataset.from_dict(enc | {"messages": conversations, "reference": [r["completion"] for r in records],
                                    "source": ["x"] * len(records)})  # fmt: skip
    train, validation, summary = build_splits(rows.select(range(0)), rows)  # all offered for validation
    assert summary["prompt_mismatch"] > 0 and summary["validation_moved_to_train"] == summary["prompt_mismatch"]
    assert len(train) == summary["prompt_mismatch"]
    assert all(m[0]["content"].endswith("A:\n") for m in validation["messages"])
