"""The sharded 4-bit loader (stages/lib/train/sharded_load.py) and the weights-fit check (stages/lib/train/fit.py).

The loader must give the model `from_pretrained` gives, bit for bit (ZeRO-3's two-rank run is in test_launch.py);
the estimate must equal what the loader holds; a setting whose weights exceed a GPU is refused with its numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import default_params


def save_model(folder: Path, tied: bool, bare: bool = False, saved_dtype=torch.bfloat16, **shape) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         initializer_range=0.2, **shape)  # fmt: skip
    model = LlamaForCausalLM(config).to(saved_dtype)
    (model.model if bare else model).save_pretrained(folder)
    if bare:  # a bare model's config still names the causal-LM class for AutoModelForCausalLM
        config.save_pretrained(folder)
    return folder


def quantization(double_quant: bool = True):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)  # fmt: skip


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)  # packed 4-bit data seen as bf16 may hold NaN patterns


@pytest.mark.parametrize("tied,double_quant,saved", [(False, True, "bfloat16"), (True, False, "bfloat16"),
                                                    (False, True, "float32")])  # fmt: skip
def test_loader_gives_what_from_pretrained_gives(tmp_path: Path, tied: bool, double_quant: bool, saved: str):
    """Also for a float32 checkpoint trained in bfloat16: both cast before they quantize."""
    from transformers import AutoModelForCausalLM

    from stages.lib.train import sharded_load
    from stages.lib.train.cpu_4bit import keep_4bit_layout

    folder = save_model(tmp_path / "base", tied, saved_dtype=getattr(torch, saved))
    q = quantization(double_quant)
    ref = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.bfloat16)
    mine = sharded_load.load(folder, q, torch.bfloat16)
    theirs, ours = dict(ref.named_parameters()), dict(mine.named_parameters())
    assert theirs.keys() == ours.keys()
    for name, param in theirs.items():
        other = ours[name]
        assert type(other) is type(param) and other.dtype == param.dtype and other.shape == param.shape, name
        assert torch.equal(as_bytes(other), as_bytes(param)), name
        state = getattr(param, "quant_state", None)
        if state is not None:
            for a, b in zip(sharded_load._state_tensors(state), sharded_load._state_tensors(other.quant_state)):
                assert torch.equal(as_bytes(a), as_bytes(b)), name
    assert (mine.lm_head.weight is mine.model.embed_tokens.weight) == tied
    ids = torch.tensor([[1, 5, 9, 30, 2, 7, 299]])
    keep_4bit_layout(ref), keep_4bit_layout(mine)  # as the train stage does (an AVX512-BF16 CPU would repack)
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, mine(ids).logits)
    assert mine.is_loaded_in_4bit and not mine.training and mine.config.quantization_config.load_in_4bit


def test_loader_reads_a_bare_models_save_and_declines_unknown_names(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    from stages.lib.train import sharded_load

    bare = save_model(tmp_path / "bare", tied=True, bare=True)  # tensor names without the "model." prefix
    assert not any(k.startswith("model.") for k in load_file(bare / "model.safetensors"))
    assert sharded_load.load(bare, quantization(), torch.bfloat16) is not None
    renamed = save_model(tmp_path / "renamed", tied=False)
    weights = load_file(renamed / "model.safetensors")
    weights["model.layers.0.mlp.up.weight"] = weights.pop("model.layers.0.mlp.up_proj.weight")
    save_file(weights, renamed / "model.safetensors", metadata={"format": "pt"})
    assert sharded_load.load(renamed, quantization(), torch.bfloat16) is None  # the caller loads it the usual way


@pytest.mark.parametrize("double_quant", [True, False])
def test_estimate_equals_what_the_loader_holds(tmp_path: Path, double_quant: bool):
    from stages.lib.core.model_files import meta_model
    from stages.lib.train import fit, sharded_load

    folder = save_model(tmp_path / "base", tied=False)
    loaded = sharded_load.resident_bytes(sharded_load.load(folder, quantization(double_quant), torch.bfloat16))
    estimate = fit.weight_bytes(meta_model(folder, "models/base"), True, 2, double_quant)
    assert estimate.sharded + estimate.whole == loaded


def test_weights_that_exceed_a_gpu_are_refused_with_the_numbers(tmp_path: Path):
    from stages.lib.core.errors import UserError
    from stages.lib.core.model_files import meta_model
    from stages.lib.core.params import Params
    from stages.lib.train import fit

    folder = save_model(tmp_path / "base", tied=False)
    model = meta_model(folder, "models/base")
    raw = default_params()
    raw["train"] |= {"dtype": "bfloat16", "deepspeed": "zero3"}
    raw["train"]["launch"]["gpus_per_node"] = 1
    params = Params.model_validate(raw)
    weights = fit.weight_bytes(model, True, 2, True)
    one = weights.per_gpu(1, True) / fit.GIB
    cap = 0.9 * one  # one GPU cannot hold the weights; two can, with room to spare
    with pytest.raises(UserError) as refused:
        fit.check_weights_fit(params, folder, model, capacity_gib=cap, visible_gpus=8)
    message = str(refused.value)
    assert f"need {fit.size(one)} per GPU (ZeRO-3 over 1 GPU)" in message and f"a GPU has {fit.size(cap)}" in message
    assert "train on 2 or more GPUs with train.deepspeed: zero3" in message
    raw["train"]["launch"]["gpus_per_node"] = 2
    fit.check_weights_fit(Params.model_validate(raw), folder, model, capacity_gib=cap, visible_gpus=8)  # fits
    raw["train"]["deepspeed"] = "zero2"  # zero2 keeps the weights whole on every GPU
    with pytest.raises(UserError, match=r"every GPU holds them whole \(train.deepspeed: zero2\)"):
        fit.check_weights_fit(Params.model_validate(raw), folder, model, capacity_gib=cap, visible_gpus=8)
