"""ChatGLM2 → GLM conversion: logits against an independent ChatGLM2 forward pass, a lossless round trip, the
tokenizer's ids and layout, and a tiny ChatGLM2-layout checkpoint through the whole pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_merged_prompts_are_the_training_prompts, clone, dvc, edit_params

from stages.lib.convert import SPECIALS, fast_tokenizer, glm_config, to_chatglm2, to_glm

TINY = {  # ChatGLM2-6B's config.json keys and flags, tiny sizes
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "padded_vocab_size": 320, "hidden_size": 64,
    "ffn_hidden_size": 96, "kv_channels": 16, "num_attention_heads": 4, "num_layers": 2,
    "multi_query_attention": True, "multi_query_group_num": 2, "seq_length": 256, "layernorm_epsilon": 1e-5,
    "rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False, "original_rope": True,
    "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "torch_dtype": "float32",
    "pad_token_id": 0, "eos_token_id": 2,
}  # fmt: skip


def chatglm2_state(c: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in ChatGLM2's own state-dict names and shapes."""
    g = torch.Generator().manual_seed(seed)
    h, hd, heads, groups = c["hidden_size"], c["kv_channels"], c["num_attention_heads"], c["multi_query_group_num"]
    qkv = heads * hd + 2 * groups * hd
    shapes = {"transformer.embedding.word_embeddings.weight": (c["padded_vocab_size"], h),
              "transformer.encoder.final_layernorm.weight": (h,),
              "transformer.output_layer.weight": (c["padded_vocab_size"], h)}  # fmt: skip
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attention.query_key_value.weight": (qkv, h), p + "self_attention.query_key_value.bias": (qkv,),
                   p + "self_attention.dense.weight": (h, heads * hd), p + "mlp.dense_h_to_4h.weight": (2 * c["ffn_hidden_size"], h),
                   p + "mlp.dense_4h_to_h.weight": (h, c["ffn_hidden_size"])}  # fmt: skip
    state = {k: torch.randn(shape, generator=g) * 0.2 for k, shape in shapes.items()}
    for k in state:
        if k.endswith("layernorm.weight"):
            state[k] = 1 + state[k]
    return state


def reference_logits(state: dict, c: dict, ids: torch.Tensor) -> torch.Tensor:
    """ChatGLM2's forward written from its published architecture, on its own weight names."""
    b, s = ids.shape
    hd, heads, groups, eps = c["kv_channels"], c["num_attention_heads"], c["multi_query_group_num"], c["layernorm_epsilon"]
    rot = hd // 2  # rotary on the first half of each head, pairs (2i, 2i+1)
    angles = torch.outer(torch.arange(s).float(), 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot))
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    def rope(x):
        even, odd = x[..., :rot:2], x[..., 1:rot:2]
        turned = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
        return torch.cat([turned, x[..., rot:]], dim=-1)

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    causal = torch.full((s, s), float("-inf")).triu(1)
    h = state["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        qkv = rms(h, state[p + "input_layernorm.weight"]) @ state[p + "self_attention.query_key_value.weight"].T
        q, k, v = (qkv + state[p + "self_attention.query_key_value.bias"]).split([heads * hd, groups * hd, groups * hd], -1)
        q, k, v = rope(q.view(b, s, heads, hd)), rope(k.view(b, s, groups, hd)), v.view(b, s, groups, hd)
        k, v = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))  # head j uses group j // (heads/groups)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1) @ v
        h = h + attention.transpose(1, 2).reshape(b, s, heads * hd) @ state[p + "self_attention.dense.weight"].T
        gate, up = (rms(h, state[p + "post_attention_layernorm.weight"]) @ state[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        h = h + (torch.nn.functional.silu(gate) * up) @ state[p + "mlp.dense_4h_to_h.weight"].T
    return rms(h, state["transformer.encoder.final_layernorm.weight"]) @ state["transformer.output_layer.weight"].T


def glm_model(state: dict, c: dict):
    from transformers import GlmConfig, GlmForCausalLM

    g = glm_config(c)
    config = GlmConfig(**{k: v for k, v in g.items() if k not in ("model_type", "architectures", "dtype")})
    model = GlmForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(to_glm(state, g), strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    return model


def test_converted_logits_match_the_chatglm2_reference():
    state = chatglm2_state(TINY)
    ids = torch.randint(0, TINY["padded_vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_logits(state, TINY, ids)
        got = glm_model(state, TINY)(input_ids=ids).logits
    diff = (got - expected).abs().max().item()
    print(f"max |converted - reference| logit difference: {diff:.3g}")
    assert expected.abs().max() > 1  # the logits are not trivially small
    assert diff < 1e-4


def test_round_trip_to_chatglm2_is_lossless():
    state = chatglm2_state(TINY)
    g = glm_config(TINY)
    back = to_chatglm2(to_glm(state, g), g)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A SentencePiece BPE model trained here, standing in for ChatGLM2's tokenizer.model."""
    import sentencepiece as spm

    from stages.lib.data.toy_task import toy_zh_en

    folder = tmp_path_factory.mktemp("sp")
    texts = [v for r in toy_zh_en(0) for v in r.values()] + ["问：你好\n\n答：", "[Round 1]"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=TINY["padded_vocab_size"] - len(SPECIALS) - 10, model_type="bpe",
                                   character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)  # fmt: skip
    return folder / "tokenizer.model"


def test_tokenizer_keeps_ids_and_adds_gmask_sop(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokenizer = fast_tokenizer(sp_model)
    n = sp.get_piece_size()
    assert tokenizer.convert_tokens_to_ids(SPECIALS) == [n, n + 1, n + 2, n + 3, n + 4]  # [gMASK] n+1, sop n+3, eop n+4
    for text in ["[Round 1]\n\n问：红色的猫\n\n答：", "Translate into Chinese.\nred cat", "翻译成英文。"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[:2] == [n + 1, n + 3]  # [gMASK] sop, once, at the start
        assert ids[2:] == sp.encode(text)  # the pieces are SentencePiece's own
        assert tokenizer.decode(ids[2:]) == sp.decode(sp.encode(text))
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "left"  # ChatGLM2's, for batched generation


def test_training_batches_are_padded_on_the_right(sp_model):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = fast_tokenizer(sp_model)
    rows = [tokenizer(t)["input_ids"] for t in ["问：你好", "问：红色的猫是什么"]]
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)([{"input_ids": r} for r in rows])
    short = min(rows, key=len)
    assert batch["input_ids"][0 if rows[0] is short else 1, : len(short)].tolist() == short


def write_chatglm2_checkpoint(folder: Path, sp_model: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(TINY))
    save_file(chatglm2_state(TINY), folder / "model.safetensors")
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    return folder


@pytest.mark.slow  # a whole pipeline (about 2 min); conversion and the template are checked by the tests above
def test_a_tiny_chatglm2_checkpoint_runs_the_whole_pipeline(sp_model, tmp_path):
    from datasets import load_from_disk

    repo = clone(tmp_path / "repo")
    write_chatglm2_checkpoint(repo / "models" / "sources" / "chatglm2-tiny", sp_model)
    edit_params(repo, **{"model.recipe": "chatglm2-6b", "model.path": "models/sources/chatglm2-tiny", "train.dtype": "float32",
                         "train.epochs": 3, "eval.max_samples": 8, "eval.max_new_tokens": 8,
                         "merge.chatglm2_layout": True})  # fmt: skip
    dvc("repro", cwd=repo)
    manifest = json.loads((repo / "models" / "base" / "manifest.json").read_text())
    assert manifest["source"]["converted"]["to"] == "glm"
    assert json.loads((repo / "models" / "base" / "config.json").read_text())["model_type"] == "glm"
    n = 320 - len(SPECIALS) - 10
    row = load_from_disk(str(repo / "data" / "tokenized"))["train"][0]
    ids, mask = row["input_ids"], row["assistant_masks"]
    assert ids[:2] == [n + 1, n + 3] and ids.count(n + 1) == 1  # [gMASK] <sop> once, at the start
    assert mask[:2] == [0, 0] and mask[-1] == 1 and ids[-1] == 2  # prompt masked, answer + EOS trained
    assert_merged_prompts_are_the_training_prompts(repo)
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]

    # the merged model back in ChatGLM2's layout: its config, its names, the same function as the native one
    from safetensors.torch import load_file

    back = repo / "models" / "merged" / "chatglm2"
    assert json.loads((back / "config.json").read_text()) == TINY
    state = load_file(back / "model.safetensors")
    assert set(state) == set(chatglm2_state(TINY))
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        native = merged_logits(repo / "models" / "merged", ids)
    assert (reference_logits(state, TINY, ids) - native).abs().max() < 1e-4


def merged_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(input_ids=ids).logits
