"""A mixture of experts under QLoRA: the checkpoint layout passes download, the experts train in 4 bits, expert
LoRA merges and loads in PEFT, the planner counts the 4-bit stacks exactly.

The model is recipes/models/tiny-qwen3-moe.yaml (16 experts of width 128, 2 active, experts 88 % of its weights),
saved by the download stage the way transformers saves every MoE (experts one by one, as on the Hub).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import clone, dvc, edit_params

from stages.lib.core.model_files import ModelFilesError, check_model_dir, meta_model

EXPERT_LORA = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory) -> Path:
    """The whole pipeline on the tiny MoE with LoRA on attention and on the experts, 40 steps."""
    repo = clone(tmp_path_factory.mktemp("moe") / "repo")
    edit_params(repo, **{"model.recipe": "tiny-qwen3-moe", "train.max_steps": 40, "train.logging_steps": 5,
                         "train.lora.dropout": 0.0, "train.lora.target_parameters": EXPERT_LORA})  # fmt: skip
    dvc("repro", cwd=repo)
    return repo


def test_the_pipeline_trains_4bit_experts_and_their_lora(moe_run: Path):
    config = json.loads((moe_run / "models" / "adapter" / "train_config.json").read_text())
    model = meta_model(moe_run / "models" / "base", "models/base")
    fp32 = sum(p.numel() for p in model.parameters()) * 4 / 2**30
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts / sum(p.numel() for p in model.parameters()) >= 0.8
    # resident after load: the 4-bit stacks, not 16-bit experts (16-bit experts alone would be 0.44 x fp32)
    assert config["load_weights_gib_per_rank"][0] <= 0.35 * fp32, (config["load_weights_gib_per_rank"], fp32)
    losses = [h["loss"] for h in config["loss_history"]]
    assert len(losses) >= 5 and losses[-1] < 0.7 * losses[0], losses
    adapter = json.loads((moe_run / "models" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_parameters"] == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                                  for p in ("gate_up_proj", "down_proj"))  # fmt: skip
    merge = json.loads((moe_run / "metrics" / "merge.json").read_text())
    assert merge["max_abs_logit_diff"] <= merge["tolerance"]
    aux = (moe_run / "dvclive" / "train" / "plots" / "metrics" / "aux_loss.tsv").read_text().splitlines()
    assert len(aux) > 2  # the router's load-balancing loss, logged beside the loss
    assert json.loads((moe_run / "metrics" / "eval.json").read_text())


def test_the_adapter_with_expert_lora_loads_in_peft_and_changes_the_experts(moe_run: Path):
    """PEFT alone (no code of ours) puts the adapter on the 16-bit model; merged, it equals models/merged."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(moe_run / "models" / "base", dtype=torch.float32)
    before = base.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    merged = PeftModel.from_pretrained(base, moe_run / "models" / "adapter").merge_and_unload()
    after = merged.model.layers[0].mlp.experts.gate_up_proj.detach()
    assert (after - before).abs().max() > 0  # the experts' LoRA is in the merge
    saved = AutoModelForCausalLM.from_pretrained(moe_run / "models" / "merged", dtype=torch.float32)
    assert torch.allclose(saved.model.layers[0].mlp.experts.gate_up_proj, after, atol=1e-6)
    stored = load_file(moe_run / "models" / "merged" / "model.safetensors")
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in stored  # the checkpoint layout, as on the Hub


def test_the_4bit_forward_is_the_models_own_on_the_dequantized_stacks_and_the_estimate_is_exact(moe_run: Path):
    """An experts module in 4 bits computes what the model's own 16-bit module computes with the dequantized
    stacks (same routing), and the planner's weight count is what the loader holds."""
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from stages.lib.train import fit, sharded_load
    from stages.lib.train.experts_4bit import SUFFIX, experts_modules

    folder = moe_run / "models" / "base"
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)  # fmt: skip
    mine = sharded_load.load(folder, q, torch.float32)
    assert sharded_load.resident_bytes(mine) == sum(fit.weight_bytes(meta_model(folder, "b"), True, 4, True).__dict__.values())
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref.config._experts_implementation = "eager"  # the class's own loop, the plainest reference
    four, plain = experts_modules(mine)[0][1], experts_modules(ref)[0][1]
    assert "gate_up_proj" not in four._parameters and plain.gate_up_proj.dim() == 3
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            packed = four._parameters[name + SUFFIX]
            getattr(plain, name).copy_(bnbf.dequantize_4bit(packed.data, packed.quant_state).view(getattr(plain, name).shape))
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(10, plain.hidden_dim, generator=gen)
        index = torch.stack([torch.randperm(plain.num_experts, generator=gen)[:2] for _ in range(10)])
        weights = torch.rand(10, 2, generator=gen)
        assert torch.allclose(four(hidden, index, weights), plain(hidden, index, weights), atol=1e-5)


def test_a_checkpoint_missing_an_expert_is_named_at_download(moe_run: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    folder.mkdir()
    for f in (moe_run / "models" / "base").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    check_model_dir(folder, "model.path x")  # the per-expert layout as saved passes
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFilesError, match=re.escape("no tensor model.layers.1.mlp.experts.gate_up_proj")):
        check_model_dir(folder, "model.path x")


def test_expert_lora_needs_no_dropout_in_one_line():
    from conftest import default_params

    from stages.lib.core.params import Params

    raw = default_params()
    raw["train"]["lora"] |= {"target_parameters": EXPERT_LORA, "dropout": 0.05}
    with pytest.raises(ValueError, match="train.lora.dropout must be 0 with train.lora.target_parameters"):
        Params.model_validate(raw)


def test_chat_and_serve_answer_from_the_merged_moe(moe_run: Path):
    """The merged MoE talks: chat gives the same greedy answers merged and as base + adapter (PEFT, unmerged),
    and the server answers an OpenAI request with what transformers generates from models/merged."""
    from test_serve import chat_command, client, free_port, serve_command, wait_until_healthy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["把这句话翻译成英文：你好", "Translate into Chinese: thank you"]
    merged = chat_command(moe_run, [prompts[0], "/reset", prompts[1]])
    assert len(merged) == 2
    assert chat_command(moe_run, [prompts[0], "/reset", prompts[1]], "--adapter", "models/adapter") == merged
    folder = moe_run / "models" / "merged"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    messages = [{"role": "user", "content": prompts[1]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    port = free_port()
    proc = serve_command(moe_run, "--port", str(port))
    try:
        wait_until_healthy(proc, port)
        reply = client(f"http://127.0.0.1:{port}").chat.completions.create(
            model="models/merged", messages=messages, max_tokens=16, temperature=0)
        assert reply.choices[0].message.content.strip() == expected.strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_other_families_load_with_4bit_experts(tmp_path: Path, family: str):
    """Mixtral (checkpoints name its experts block_sparse_moe.experts.N.w1/w2/w3) and OLMoE: saved as transformers
    saves them, they pass download's check and load with every expert stack in 4 bits; a forward runs."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from stages.lib.train import sharded_load
    from stages.lib.train.experts_4bit import experts_modules

    experts = {"mixtral": {"num_local_experts": 4}, "olmoe": {"num_experts": 4}}[family]
    config = AutoConfig.for_model(family, vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, **experts)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    names = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (tmp_path / "model.safetensors").read_bytes()[:8], "little")])  # fmt: skip
    assert any(".experts.0." in n for n in names)  # the per-expert layout
    from stages.lib.core.model_files import check_shapes, check_weights

    check_shapes(tmp_path, "model.path x", check_weights(tmp_path, "model.path x"))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)  # fmt: skip
    model = sharded_load.load(tmp_path, q, torch.float32)
    found = experts_modules(model)
    assert len(found) == 2 and all(m._4bit_shapes and not any(p.dim() == 3 for p in m.parameters(recurse=False))
                                   for _, m in found)  # fmt: skip
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(10)[None]).logits).all()


def test_expert_targets_are_checked_name_by_name_and_all_linear_means_linear_layers(moe_run: Path, tmp_path: Path):
    """One misspelt stack name among good ones is refused; target_parameters with method full is refused; on a
    mixture of experts "all-linear" targets the linear layers only (PEFT alone would add the router and the expert
    stacks by bare name, and refuse the default dropout there)."""
    from conftest import default_params
    from peft import get_peft_model

    from stages.lib.core.errors import UserError
    from stages.lib.core.params import Params
    from stages.lib.train.preflight import check_expert_targets
    from stages.train import lora_config

    model = meta_model(moe_run / "models" / "base", "models/base")
    raw = default_params()
    raw["train"]["lora"] |= {"dropout": 0.0, "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.dwn_proj"]}
    with pytest.raises(UserError, match="'mlp.experts.dwn_proj' matches no expert weight"):
        check_expert_targets(Params.model_validate(raw), model)
    raw["train"]["method"] = "full"
    with pytest.raises(ValueError, match="train.lora.target_parameters is LoRA's"):
        Params.model_validate(raw)
    raw = default_params()
    raw["train"]["lora"] |= {"target_modules": "all-linear", "dropout": 0.05}
    config = lora_config(Params.model_validate(raw), model)
    assert sorted(config.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"] and not config.target_parameters
    from transformers import AutoModelForCausalLM

    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(moe_run / "models" / "base"), config)
    assert not [n for n, _ in wrapped.named_parameters() if "lora_" in n and (".gate." in n or ".experts." in n)]


def test_a_config_whose_stop_id_the_tokenizer_lacks_is_named_at_download(moe_run: Path, tmp_path: Path):
    """OLMoE's default config says eos_token_id 50279; with a smaller tokenizer, tokenize crashed. Download names it."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("olmoe", vocab_size=600, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, num_experts=4)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for f in (moe_run / "models" / "base").glob("tokenizer*"):
        shutil.copy(f, tmp_path)
    with pytest.raises(ModelFilesError, match="config.json has eos_token_id 50279, which is no token of the tokenizer"):
        check_model_dir(tmp_path, "model.path x")
