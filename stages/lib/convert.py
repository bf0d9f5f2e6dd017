"""ChatGLM2 checkpoints → transformers' native GLM architecture (GlmForCausalLM), and back.

ChatGLM2-6B ships Hub code written for transformers 4.30. Its architecture is the one transformers implements as
GLM: RMSNorm, a fused query_key_value with bias, multi-query attention in groups, rotary embedding on the first
half of each head's dimensions with interleaved pairs, SwiGLU. So the download stage converts the checkpoint once,
at download, and every later stage runs native code (SDPA, ZeRO-3 init, gradient checkpointing all behave).

The weights map one to one except query_key_value, which splits into q_proj, k_proj and v_proj (and joins back
for `to_chatglm2`). The tokenizer becomes a fast tokenizer from the same SentencePiece model, with ChatGLM2's
special tokens at the same ids and its `[gMASK] sop` prefix on every encoded text. `sop` and `eop` are spelt
`<sop>` and `<eop>` (as GLM-4 does): a special token matches anywhere in a text, and the plain word "sop" must
stay text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]  # ids follow the SentencePiece pieces, in this order
TOP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate; up], in this order in both
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}


def glm_config(c: dict) -> dict:
    """A GlmConfig (as a dict) for a ChatGLM2 config.json."""
    if not c.get("rmsnorm", True) or c.get("apply_residual_connection_post_layernorm") or c.get("add_bias_linear"):
        raise ValueError("this ChatGLM variant (LayerNorm, post-LN residual or linear biases) has no GLM equivalent")
    return {
        "model_type": "glm",
        "architectures": ["GlmForCausalLM"],
        "vocab_size": c["padded_vocab_size"],
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["ffn_hidden_size"],
        "num_hidden_layers": c["num_layers"],
        "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c["multi_query_group_num"] if c.get("multi_query_attention") else c["num_attention_heads"],
        "head_dim": c.get("kv_channels") or c["hidden_size"] // c["num_attention_heads"],
        "rms_norm_eps": c["layernorm_epsilon"],
        "max_position_embeddings": c["seq_length"],
        "attention_bias": c.get("add_qkv_bias", True),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0 * c.get("rope_ratio", 1.0),
            "partial_rotary_factor": 0.5,
        },
        "tie_word_embeddings": False,
        "pad_token_id": c.get("pad_token_id", 0),
        "eos_token_id": c.get("eos_token_id", 2),
        "bos_token_id": None,
        "dtype": c.get("torch_dtype", "float16"),
        "chatglm2_config": c,  # kept, so the merged model can be written back in ChatGLM2's layout
    }


def qkv_sizes(g: dict) -> list[int]:
    head = g["head_dim"]
    return [g["num_attention_heads"] * head, g["num_key_value_heads"] * head, g["num_key_value_heads"] * head]


def to_glm(state: dict[str, torch.Tensor], g: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name in TOP:
            out[TOP[name]] = tensor
            continue
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue  # recomputed from the config
        prefix = "transformer.encoder.layers."
        if not name.startswith(prefix):
            raise ValueError(f"unexpected ChatGLM2 weight {name}")
        index, rest = name[len(prefix) :].split(".", 1)
        layer = f"model.layers.{index}."
        if rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]  # weight or bias
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(qkv_sizes(g), dim=0)):
                out[f"{layer}self_attn.{proj}.{kind}"] = part.contiguous()
        elif rest in LAYER:
            out[layer + LAYER[rest]] = tensor
        else:
            raise ValueError(f"unexpected ChatGLM2 weight {name}")
    return out


def to_chatglm2(state: dict[str, torch.Tensor], g: dict) -> dict[str, torch.Tensor]:
    """The inverse of `to_glm` (without the rotary inv_freq buffer, which ChatGLM2 recomputes too)."""
    import torch

    top = {v: k for k, v in TOP.items()}
    layer_names = {v: k for k, v in LAYER.items()}
    out = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        _, _, index, rest = name.split(".", 3)
        layer = f"transformer.encoder.layers.{index}."
        if rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]
            parts = [state[f"model.layers.{index}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{layer}self_attention.query_key_value.{kind}"] = torch.cat(parts, dim=0)
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            continue  # joined with q_proj
        else:
            out[layer + layer_names[rest]] = tensor
    return out


def spm_merges(proto) -> list[tuple[str, str]]:
    """The merges of a SentencePiece BPE model, in its order: each split of a normal piece (type 1) into two normal
    pieces, the piece with the higher score first, ties by id. Passed explicitly: transformers 5.17 builds a BPE
    without merges when given none (every text then falls apart into characters), 5.24 derives these."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == 1}
    ranked = sorted(
        (-score, i, piece[:k], piece[k:])
        for piece, (score, i) in normal.items()
        for k in range(1, len(piece))
        if piece[:k] in normal and piece[k:] in normal
    )
    return [(left, right) for _, _, left, right in ranked]


def fast_tokenizer(sp_model: Path):
    """ChatGLM2's SentencePiece model as a fast tokenizer: same pieces and ids, specials after them, `[gMASK] sop`."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, merges=spm_merges(proto))
    # Text handling from the model's own normalizer spec, set here because transformers' defaults differ between
    # versions (5.17 and 5.24 split the same text differently): SentencePiece's whitespace rules, its dummy prefix
    # at the start of a text only (not after each special token), and a decoder that undoes both.
    spec = proto.normalizer_spec
    norm = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    backend.normalizer = normalizers.Sequence([*norm, normalizers.Replace(" ", "▁")])
    prefix = "first" if spec.add_dummy_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prefix, split=False)
    steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if proto.trainer_spec.byte_fallback else [])
    steps += [decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else [])
    backend.decoder = decoders.Sequence(steps)
    n = len(vocab)
    ids = {token: n + i for i, token in enumerate(SPECIALS)}
    backend.post_processor = TemplateProcessing(
        single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", ids["[gMASK]"]), ("<sop>", ids["<sop>"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=proto.trainer_spec.unk_piece,
        eos_token=proto.pieces[proto.trainer_spec.eos_id].piece,
        pad_token=proto.trainer_spec.unk_piece,  # ChatGLM2 pads with <unk> (id 0)
        padding_side="left",  # as ChatGLM2, for batched generation; TRL's collator pads training batches itself
        additional_special_tokens=SPECIALS,
    )
    got = tokenizer.convert_tokens_to_ids(SPECIALS)
    if got != [ids[t] for t in SPECIALS]:
        raise ValueError(f"ChatGLM2 special tokens got ids {got}, expected {[ids[t] for t in SPECIALS]}")
    return tokenizer


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """safetensors, or the Hub's pytorch_model*.bin read with weights_only=True (tensors only, no code runs)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{model_dir}: no ChatGLM2 weights (*.safetensors or pytorch_model*.bin)")
    state = {}
    for f in files:
        state |= load_file(f) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
    return state


def chatglm2_to_glm(model_dir: Path) -> dict:
    """Convert a downloaded ChatGLM2 directory in place; returns what the manifest records."""
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    g = glm_config(config)
    weights = to_glm(read_weights(model_dir), g)
    tokenizer = fast_tokenizer(model_dir / "tokenizer.model")
    for old in [*model_dir.glob("*.safetensors"), *model_dir.glob("pytorch_model*.bin"), *model_dir.glob("*.py"),
                *model_dir.glob("*.index.json"), *model_dir.glob("tokenizer_config.json")]:  # fmt: skip
        old.unlink()
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(g, indent=2) + "\n")
    tokenizer.save_pretrained(model_dir)
    return {"from": "chatglm2", "to": "glm", "tensors": len(weights)}


CONVERTERS = {"chatglm2": chatglm2_to_glm}


def write_chatglm2_layout(merged_dir: Path, base_dir: Path, out: Path) -> None:
    """The merged GLM model in ChatGLM2's original layout: its config.json, weight names and tokenizer.model.

    Tools that load this layout also need ChatGLM2's modeling and tokenizer .py files, which the Hub repository
    carries and this project does not run or ship.
    """
    from safetensors.torch import load_file, save_file

    g = json.loads((merged_dir / "config.json").read_text())
    original = json.loads((base_dir / "config.json").read_text()).get("chatglm2_config")
    if original is None:
        raise ValueError(f"{base_dir} was not converted from ChatGLM2: there is no layout to go back to")
    weights = {}
    for f in sorted(merged_dir.glob("*.safetensors")):
        weights |= load_file(f)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_chatglm2(weights, g), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(original, indent=2) + "\n")
    (out / "tokenizer.model").write_bytes((base_dir / "tokenizer.model").read_bytes())
