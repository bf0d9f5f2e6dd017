"""The tokenizer kinds the prompt-format tests run on, each built from a small local input.

bpe        the embedded default's byte-level BPE (trained on the toy task; ChatML chat template, EOS <|im_end|>)
sp_bos     a SentencePiece (Llama-style) tokenizer that adds BOS, with a Llama-2-like chat template that renders
           {{ bos_token }} itself, no pad token, and <|im_end|> as plain text
sp_eos     the same model, but the tokenizer also adds EOS to every text (as Yuan2's does)
chatglm2   ChatGLM2's conversion (stages/lib/convert.py) of a SentencePiece model: [gMASK] <sop> on every text
qwen2      the real Qwen2 tokenizer (../shared/data)
llama2     the real Llama-2 SentencePiece model (../shared/data) as a BOS-adding Llama tokenizer, same template as sp_bos
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import SHARED_DATA

from stages.lib.data.toy_task import toy_zh_en

# A Llama-2-like format written for these tests: BOS from the template, answers closed by EOS.
LLAMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)  # like Llama-2's, no generation prompt: the answer's leading space joins its first word
# Qwen3's behaviour, written for these tests: answers after the last user turn open with a think block (empty
# when there is no reasoning) only when they are the last message or carry reasoning; earlier answers lose theirs.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_user=-1) -%}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
    "{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}{%- if m['role'] in ('system', 'user') -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}{%- set r = m.get('reasoning_content') or '' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user and (loop.last or r) -%}{{- '<think>\\n' + r + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- m['content'] + '<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
LOCAL = ["bpe", "sp_bos", "sp_eos", "chatglm2"]
QUOTE = '"red cat", said the panda. Done.'  # after ChatGLM2's '答：', Qwen2 merges '："' into one token
SHARED = ["qwen2", "llama2"]


def toy_texts() -> list[str]:
    return [v for r in toy_zh_en(0) for v in r.values()] + ["问：你好\n\n答：", "[Round 1]", "### 问题：回答", QUOTE] * 20


def train_sp(folder: Path, vocab_size: int) -> Path:
    """A SentencePiece BPE model trained on the toy task (ids: unk 0, BOS 1, EOS 2, no pad)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(toy_texts()), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=vocab_size, model_type="bpe", character_coverage=1.0, bos_id=1,
                                   eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)  # fmt: skip
    return folder / "tokenizer.model"


def llama_style_dir(sp_model: Path, folder: Path, add_eos: bool):
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model, folder / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": add_eos,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": True,
              "chat_template": LLAMA_STYLE}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder)


def build(kind: str, folder: Path):
    """A fresh tokenizer of `kind`; `folder` holds the files it is built from."""
    from transformers import AutoTokenizer

    if kind == "bpe":
        from stages.download import train_tokenizer

        return train_tokenizer(toy_texts(), 600)
    if kind in ("sp_bos", "sp_eos"):
        return llama_style_dir(train_sp(folder / "sp", 300), folder / kind, add_eos=kind == "sp_eos")
    if kind == "chatglm2":
        from stages.lib.convert import fast_tokenizer

        return fast_tokenizer(train_sp(folder / "sp", 300))
    if kind == "qwen2":
        return AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "qwen2")
    if kind == "llama2":
        return llama_style_dir(SHARED_DATA / "tokenizers" / "llama2" / "tokenizer.model", folder / kind, add_eos=False)
    raise ValueError(kind)


def records(with_system: bool = True) -> list[dict]:
    """Messages records: toy single turns, two multi-turn dialogues (Chinese and English), one with a system text."""
    rows = [{"messages": [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"},
                          {"role": "assistant", "content": r["output"]}]} for r in toy_zh_en(3)[:14]]  # fmt: skip
    rows.append({"messages": [{"role": "user", "content": "红色的猫"}, {"role": "assistant", "content": "red cat"},
                              {"role": "user", "content": "蓝色的狗"}, {"role": "assistant", "content": "blue dog"}]})
    rows.append({"messages": [{"role": "user", "content": "translate: white bird"}, {"role": "assistant", "content": "白色的鸟"},
                              {"role": "user", "content": "and black fish?"}, {"role": "assistant", "content": "黑色的鱼"},
                              {"role": "user", "content": "grey sheep"}, {"role": "assistant", "content": "灰色的羊"}]})
    rows.append({"messages": [{"role": "user", "content": "Quote it."},
                              {"role": "assistant", "content": QUOTE}]})
    rows.append({"messages": [{"role": "user", "content": "空的回答"}, {"role": "assistant", "content": "   "}]})
    if with_system:
        rows.append({"messages": [{"role": "system", "content": "Answer in Chinese."},
                                  {"role": "user", "content": "green tiger"}, {"role": "assistant", "content": "绿色的老虎"}]})
    return rows


def answers(record: dict) -> list[str]:
    return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
