"""`train.attn_implementation: varlen`: per-sample attention over packed rows equals the masked dense path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from stages.lib.train import varlen_attention
from stages.lib.core.params import ParamsError, validate
from test_params import with_change


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return (ids[:, None] == ids[None, :]) & torch.ones(len(ids), len(ids), dtype=torch.bool).tril()


def test_per_sample_attention_equals_a_block_diagonal_mask_with_grouped_heads():
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    n = sum(lengths)
    q = torch.randn(1, 8, n, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ours, _ = varlen_attention.varlen_attention(None, q, k, v, None, scaling=0.25, cu_seq_lens_q=bounds,
                                                max_length_q=max(lengths))  # fmt: skip
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(lengths), scale=0.25, enable_gqa=True)
    assert torch.allclose(ours, dense.transpose(1, 2), atol=1e-12)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    dense_grads = torch.autograd.grad(dense.transpose(1, 2).square().sum(), (q, k, v))
    for g, d in zip(grads, dense_grads):
        assert torch.allclose(g, d, atol=1e-10)


def test_a_packed_batch_from_trl_gives_the_same_loss_as_sdpa():
    """TRL's padding-free collator hands the sample boundaries through the model to the attention function."""
    varlen_attention.register()
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": torch.randint(1, 64, (n,)).tolist(), "seq_lengths": [n]} for n in (7, 12, 4)])
    assert batch["input_ids"].shape == (1, 23) and "cu_seq_lens_q" in batch
    logits = {}
    for name in ("sdpa", varlen_attention.NAME):
        model.set_attn_implementation(name)
        with torch.no_grad():
            logits[name] = model(**batch, use_cache=False).logits
    assert (logits["sdpa"] - logits["varlen"]).abs().max() < 1e-5
    model.set_attn_implementation("sdpa")
    with torch.no_grad():  # and the boundaries matter: attending across samples changes the later samples' logits
        crossing = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert (crossing - logits["varlen"]).abs().max() > 1e-2


def test_varlen_without_packing_is_refused():
    raw = with_change("train.attn_implementation", "varlen")
    raw["train"]["packing"] = False
    with pytest.raises(ParamsError, match="train.attn_implementation 'varlen' needs train.packing: true"):
        validate(raw)


def test_an_unpacked_batch_gets_a_clear_error():
    q = torch.randn(2, 4, 6, 8)
    with pytest.raises(ValueError, match="needs packed rows"):
        varlen_attention.varlen_attention(None, q, q, q, None)
