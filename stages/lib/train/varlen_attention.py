"""`train.attn_implementation: varlen`: attention over packed rows, one sample at a time, in a flash kernel.

With `sdpa`, transformers turns the `position_ids` of a packed row into a dense block-diagonal mask: SDPA then
cannot use its flash kernel, and computes every cross-sample score only to mask it away (quadratic in the row
length, not in the sample length). TRL's padding-free collator already hands each batch its sample boundaries
(`cu_seq_lens_q`, `max_length_q`); this attention function gives them to PyTorch's own variable-length flash
kernel (`torch.nn.attention.varlen`, no extra package). Registered without a mask function, so transformers
builds no mask at all. On a CPU it runs SDPA per sample: same result, for tests.
"""

from __future__ import annotations

import functools
import inspect
import itertools

import torch
import torch.nn.functional as F

NAME = "varlen"


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.size(0) != 1:
        raise ValueError(
            "train.attn_implementation 'varlen' needs packed rows (train.packing: true): the batch carries no "
            "sample boundaries"
        )
    bounds = bounds.to(device=query.device, dtype=torch.int32)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, dim)
    if q.is_cuda:
        out = _flash(q, k, v, bounds, int(kwargs["max_length_q"]), scaling)
    else:
        out = per_sample_sdpa(q, k, v, bounds, scaling)
    return out.unsqueeze(0), None


def per_sample_sdpa(q, k, v, bounds, scaling):
    """The reference: causal SDPA on each sample alone."""
    edges = bounds.tolist()
    outs = [
        F.scaled_dot_product_attention(
            *(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=scaling, enable_gqa=True
        ).transpose(0, 1)
        for s, e in itertools.pairwise(edges)
    ]
    return torch.cat(outs)


def _flash(q, k, v, bounds, max_len, scaling):
    from torch.nn.attention.varlen import varlen_attn

    accepted = _accepted(varlen_attn)
    extra = {"window_size": (-1, 0)} if "window_size" in accepted else {"is_causal": True}  # (-1, 0): causal
    if "scale" in accepted:
        extra["scale"] = scaling
    elif scaling is not None and abs(scaling - q.size(-1) ** -0.5) > 1e-9:
        raise ValueError(f"this torch's varlen_attn has no scale argument; the model needs scale {scaling}: use sdpa")
    if "enable_gqa" in accepted:
        extra["enable_gqa"] = True
    elif k.size(1) != q.size(1):  # older torch: expand grouped key/value heads
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    return varlen_attn(q, k, v, bounds, bounds, max_len, max_len, **extra)


@functools.cache
def _accepted(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)  # its keywords changed between torch 2.9 and 2.12
