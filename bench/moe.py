"""A mixture of experts under QLoRA on one GPU: experts in 4 bits against experts left in 16 bits, with the planner.

Builds a Qwen3-30B-A3B-shaped model (hidden 2,048, 128 experts of 768, 8 active per token, real attention widths;
random weights; --layers of its 48) through the download stage, which saves it in the checkpoint layout (experts
one by one, as on the Hub), tokenizes alpaca_zh into packed rows, and runs the train stage's own trainer
(`stages.train.build_trainer`) once per variant, each in its own process:

- experts4: the stage (attention LoRA; experts stored NF4, one layer dequantized at a time);
- experts4_lora: the same plus LoRA on the experts (train.lora.target_parameters);
- experts16: the experts left in 16 bits, as bitsandbytes' quantizer leaves them (TRAIN_EXPERTS_4BIT=0).

Prints per variant: weights resident after load, peak GPU memory, the planner's predicted peak for the same params,
tokens/s and step time; then the planner's prediction for the whole 48-layer model at several row lengths.

    python bench/moe.py --data DIR_WITH_alpaca_zh_demo.json_AND_qwen2/ --layers 8 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
         "num_experts_per_tok": 8, "decoder_sparse_step": 1, "norm_topk_prob": True, "num_attention_heads": 32,
         "num_key_value_heads": 4, "head_dim": 128, "rope_theta": 1e6, "max_position_embeddings": 40960,
         "router_aux_loss_coef": 0.001, "tie_word_embeddings": False}  # fmt: skip
EXPERT_LORA = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TINY = SHAPE | {"hidden_size": 128, "moe_intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}  # --tiny: a CPU smoke test
VARIANTS = {"experts4": ({}, {}), "experts4_lora": ({"lora": {"target_parameters": EXPERT_LORA}}, {}),
            "experts16": ({}, {"TRAIN_EXPERTS_4BIT": "0"})}  # fmt: skip


def params_for(layers: int, steps: int, packed: int) -> dict:
    return {
        "seed": 42,
        "data": {"sources": [{"kind": "local", "path": "data/sources/alpaca_zh_demo.json"}], "validation_fraction": 0.02,
                 "max_validation": 20},
        "model": {"recipe": "bench-qwen3-moe", "tokenizer": "models/sources/qwen2"},
        "tokenize": {"template": "chatml", "max_length": min(2048, packed)},
        "train": {"method": "qlora", "dtype": "bfloat16", "learning_rate": 1e-3, "lr_scheduler": "constant",
                  "warmup_ratio": 0.0, "max_steps": steps, "batch_size": 1, "packing": True, "packed_length": packed,
                  "logging_steps": 1, "gradient_checkpointing": True, "token_metrics": False, "deepspeed": None,
                  "lora": {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
    }  # fmt: skip


def prepare(work: Path, data: Path, layers: int, steps: int, packed: int, shape: dict) -> Path:
    base = work / f"moe-{layers}-{shape['hidden_size']}"
    if (base / "data" / "tokenized").exists():
        return base
    base.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "recipes", base / "recipes", dirs_exist_ok=True)
    (base / "stages").unlink(missing_ok=True)
    (base / "stages").symlink_to(ROOT / "stages")
    recipe = {"description": f"random Qwen3-30B-A3B shape, {layers} layers (benchmark)",
              "source": {"kind": "config", "model_type": "qwen3_moe", "config": shape | {"num_hidden_layers": layers}},
              "template": "chatml", "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "dtype": "bfloat16"}  # fmt: skip
    (base / "recipes" / "models" / "bench-qwen3-moe.yaml").write_text(yaml.safe_dump(recipe))
    (base / "params.yaml").write_text(yaml.safe_dump(params_for(layers, steps, packed)))
    (base / "data" / "sources").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "alpaca_zh_demo.json", base / "data" / "sources" / "alpaca_zh_demo.json")
    shutil.copytree(data / "qwen2", base / "models" / "sources" / "qwen2", dirs_exist_ok=True)
    for stage in ("download", "tokenize"):
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=base, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        print(f"{stage}: {time.time() - start:.0f} s", flush=True)
    return base


def predicted_gib(params, model) -> float:
    from stages.lib.core.recipes import model_recipe
    from stages.lib.train.plan import Setting, estimate

    targets = params.train.lora.target_modules or model_recipe(params.model.recipe).lora_targets
    row = estimate(model, params, Setting("none", params.train.gradient_checkpointing, 1), targets)
    return max(row.train_peak, row.load_peak)


def one_variant(name: str) -> dict:
    """Runs in the variant's own process, in the prepared work dir."""
    sys.path.insert(0, os.getcwd())
    from stages.lib.core.model_files import meta_model
    from stages.lib.core.params import load_params
    from stages.lib.train.telemetry import Telemetry
    from stages.train import BASE_DIR, build_trainer

    params = load_params()
    predicted = predicted_gib(params, meta_model(BASE_DIR, "models/base"))
    telemetry = Telemetry()
    start = time.time()
    trainer = build_trainer(params, Path("out"), [telemetry])
    loaded_s = time.time() - start
    trainer.train()
    s = telemetry.summary
    return {"variant": name, "layers": trainer.model.config.num_hidden_layers, "load_s": round(loaded_s, 1),
            "weights_gib": round(trainer.load_weights_gib, 2), "peak_gib": (s.get("peak_gib_train_per_rank") or [None])[0],
            "predicted_gib": round(predicted, 2), "tokens_per_s": s["tokens_per_s"], "step_time_s": s["step_time_s"],
            "losses": [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]}  # fmt: skip


def whole_model_plan(base: Path) -> list[str]:
    """The planner for all 48 layers on one GPU, no DeepSpeed, checkpointing, at several row lengths."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from stages.lib.core.params import load_params
    from stages.lib.train.plan import Setting, estimate

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **SHAPE, num_hidden_layers=48))
    lines = []
    for lora in ([], EXPERT_LORA):
        for packed in (2048, 4096, 8192):
            raw = params_for(48, 1, packed)
            raw["train"]["lora"]["target_parameters"] = lora
            (base / "params.yaml").write_text(yaml.safe_dump(raw))
            params = load_params(base / "params.yaml")
            row = estimate(model, params, Setting("none", True, 1), raw["train"]["lora"]["target_modules"])
            lines.append(f"48 layers, {packed} tokens, expert LoRA {'on' if lora else 'off'}: predicted "
                         f"{max(row.train_peak, row.load_peak):.2f} GiB (weights {row.weights:.2f})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a folder with alpaca_zh_demo.json and the qwen2 tokenizer folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe-bench"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--packed-length", type=int, default=8192)
    ap.add_argument("--variants", default="experts4,experts4_lora,experts16")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per variant here")
    ap.add_argument("--tiny", action="store_true", help="a small shape: a CPU smoke test of this script")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_variant(args.one)), flush=True)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import record_result

    shape = TINY if args.tiny else SHAPE
    base = prepare(args.work, args.data.resolve(), args.layers, args.steps, args.packed_length, shape)
    for name in args.variants.split(","):
        train_changes, env = VARIANTS[name]
        params = params_for(args.layers, args.steps, args.packed_length)
        params["train"]["lora"] |= train_changes.get("lora", {})
        (base / "params.yaml").write_text(yaml.safe_dump(params))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name]
        proc = subprocess.run(cmd, cwd=base, capture_output=True, text=True, env=os.environ | env)
        record_result(name, proc, args.out)
    for line in whole_model_plan(base):
        print(line, flush=True)


if __name__ == "__main__":
    main()
