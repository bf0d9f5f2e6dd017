"""QLoRA training throughput per GPU: the train stage's settings against the seed's approach and TRL's defaults.

Every variant runs the real train stage code (`stages.train.build_trainer`) on the same random-weight model and
the same tokenized alpaca_zh set, one process per variant, on one GPU, for --steps optimizer steps, and prints
real (non-padding) tokens/s, MFU, peak memory and step time. `--data` prepares the model and data (the download
and tokenize stages, as bench/topologies.py does, in WORK/base-SIZE) when they are not there yet.

    python bench/throughput.py --data DIR --work /tmp/topologies --variants seed,trl_defaults,trl_packing,ours [--steps 12]
    python bench/throughput.py --data DIR --work /tmp/tiny --tiny --steps 3     # CPU smoke test: a tiny model

`ours_offload`, `ours_selective`: the stage with train.gradient_checkpointing offload / selective; `ours_auto`: what
the stage's `auto` picks on this GPU; `ours_peft`: LoRA through PEFT's forward (train.fused_lora: false);
`ours_keepK` (K = 3-6): Liger with train.checkpoint_layers 28 - K (K of the 28 layers kept whole). `unsloth`:
Unsloth's FastLanguageModel QLoRA (its offloaded checkpointing, its kernels) on the same model folder, tokenized rows and packed length, in its own process with its own TRL
(bench/unsloth_variant.py; its wheels unpacked in --unsloth-site, first on that process's PYTHONPATH).

BENCH_PROFILE=ours adds torch.profiler over steps 4-5 of that variant and prints its kernel table (in its log,
--logs); that variant's tokens/s then include the profiler's overhead.

MFU = real tokens/s x 4 x N / peak, N = linear-layer parameters (lm_head included), peak = 989 TFLOP/s dense
BF16 (H100 and H200 SXM). 4N per token: forward 2N + backward through the activations 2N; the frozen 4-bit
base gets no weight gradients; recomputation under gradient checkpointing is not counted (it is overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from transformers import TrainerCallback

PEAK_FLOPS = 989e12
# the stage: one packed row of 8192 tokens, TRL's chunked LM head without the per-step metrics
OURS = {"batch_size": 1, "packing": True, "packed_length": 8192, "gradient_checkpointing": True,
        "token_metrics": False, "attn_implementation": "varlen"}  # fmt: skip
# name: (params.train changes, SFTConfig overrides)
VARIANTS = {
    # the seed: batch 1, every sample padded to 512, accumulation 8, checkpointing (prepare_model_for_kbit_training)
    "seed": ({"batch_size": 1, "grad_accum": 8, "packing": False, "gradient_checkpointing": True},
             {"max_length": 512, "pad_to_multiple_of": 512}),
    # TRL 1.16 SFTConfig defaults: batch 8, max_length 1024, no packing, checkpointing on, token metrics
    "trl_defaults": ({"batch_size": 8, "packing": False, "gradient_checkpointing": True, "token_metrics": True},
                     {"max_length": 1024}),
    "trl_packing": ({"batch_size": 8, "packing": True, "gradient_checkpointing": True, "token_metrics": True},
                    {"max_length": 1024}),
    "ours": (OURS, {}),
    "ours_sdpa": (OURS | {"attn_implementation": "sdpa"}, {}),
    "ours_flex": (OURS | {"attn_implementation": "flex_attention"}, {}),
    "ours_liger": (OURS | {"liger": True}, {}),
    "ours_metrics": (OURS | {"token_metrics": True}, {}),
    "ours_nockpt": (OURS | {"gradient_checkpointing": False}, {}),
    "ours_offload": (OURS | {"gradient_checkpointing": "offload"}, {}),
    "ours_selective": (OURS | {"gradient_checkpointing": "selective"}, {}),
    "ours_auto": (OURS | {"gradient_checkpointing": "auto"}, {}),  # the planner's pick for this GPU
    "ours_16k": (OURS | {"packed_length": 16384}, {}),
    # LoRA through PEFT's own forward (copy, scale, add) instead of one addmm: the before of train.fused_lora
    "ours_peft": (OURS | {"fused_lora": False}, {}),
    "ours_nockpt_liger": (OURS | {"gradient_checkpointing": False, "liger": True}, {}),
    # Liger + the first N of the 7B's 28 layers checkpointed, the rest whole (~1.25 GiB each without Liger, RESULTS §7)
    "ours_keep3": (OURS | {"liger": True, "checkpoint_layers": 25}, {}),
    "ours_keep4": (OURS | {"liger": True, "checkpoint_layers": 24}, {}),
    "ours_keep5": (OURS | {"liger": True, "checkpoint_layers": 23}, {}),
    "ours_keep6": (OURS | {"liger": True, "checkpoint_layers": 22}, {}),
}  # fmt: skip


def linear_params(model_dir: Path) -> int:
    c = json.loads((model_dir / "config.json").read_text())
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v


class Profile(TrainerCallback):
    """torch.profiler over optimizer steps 4 and 5; prints the kernels that took the most GPU time."""

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        if state.global_step == 3:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])  # fmt: skip
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5 and hasattr(self, "prof"):
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
            print(table, flush=True)


def one_variant(name: str, steps: int) -> dict:
    """Runs inside the variant's own process, in a work dir laid out like the project."""
    sys.path.insert(0, os.getcwd())
    import torch

    from stages.lib.core.params import load_params
    from stages.lib.train import recompute
    from stages.lib.train.auto import resolve
    from stages.lib.train.telemetry import Telemetry
    from stages.train import build_trainer

    changes, overrides = VARIANTS[name]
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["train"] |= changes | {"deepspeed": None, "max_steps": steps, "logging_steps": 1}
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    params, planned = resolve(load_params())  # ours_auto: the stage's choice on this GPU (none on a CPU)
    recompute.check(params.train.gradient_checkpointing, zero3=False, gpu=torch.cuda.is_available())
    if "max_length" in overrides:
        clip_rows(overrides["max_length"])
    telemetry = Telemetry()
    callbacks = [telemetry, Profile()] if os.environ.get("BENCH_PROFILE") == name else [telemetry]
    trainer = build_trainer(params, Path("out"), callbacks, **overrides)
    trainer.train()
    return result(name, telemetry, trainer.state.log_history, steps) | {
        "profiled": len(callbacks) > 1, "gradient_checkpointing": params.train.gradient_checkpointing,
        "planned": planned}  # fmt: skip


def clip_rows(max_length: int) -> None:
    """The seed's and TRL's variants cut rows at `max_length` (TRL's truncation); cut here first, in this variant's
    own copy of data/tokenized, so that the stage's label check counts the answers that are really trained."""
    import shutil

    from datasets import load_from_disk

    shared = Path("data").resolve()
    Path("data").unlink()  # a link to the prepared base's data/
    Path("data").mkdir()
    for item in shared.iterdir():
        if item.name != "tokenized":
            (Path("data") / item.name).symlink_to(item)
    sets = load_from_disk(str(shared / "tokenized"))
    cut = sets.map(lambda r: {"input_ids": r["input_ids"][:max_length], "assistant_masks": r["assistant_masks"][:max_length]})
    cut.save_to_disk("data/tokenized")
    shutil.copytree(shared / "tokenized" / "tokenizer", "data/tokenized/tokenizer")


def result(name: str, telemetry, log_history: list[dict], steps: int, base_dir: Path = Path("models/base")) -> dict:
    """The metrics line of one variant (the same for every trainer): real tokens/s, MFU by 4N, peak GiB, step
    time, losses."""
    s = telemetry.summary
    n = linear_params(base_dir)
    return {
        "variant": name, "tokens_per_s": s["tokens_per_s"], "mfu": (s["tokens_per_s"] or 0) * 4 * n / PEAK_FLOPS,
        "peak_gib": (s.get("peak_gib_train_per_rank") or [None])[0], "step_time_s": s.get("step_time_s"),
        "real_tokens_per_step": s["tokens_seen"] / steps, "linear_params": n,
        "losses": [h["loss"] for h in log_history if "loss" in h],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/topologies"))
    ap.add_argument("--data", type=Path, help="alpaca_zh_demo.json and qwen2/: prepare WORK/base-SIZE if missing")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test) instead of the 7B shape")
    ap.add_argument("--unsloth-site", type=Path, default=Path("/tmp/unsloth-site"),
                    help="Unsloth's unpacked wheels (unsloth, unsloth_zoo, trl 1.15, ...) for the unsloth variant")
    ap.add_argument("--variants", default="seed,trl_defaults,trl_packing,ours")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per variant here")
    ap.add_argument("--logs", type=Path, default=None, help="write each variant's output here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_variant(args.one, args.steps)), flush=True)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from topologies import node_dir, prepare

    size = "tiny" if args.tiny else "7b"
    base = args.work / f"base-{size}"  # where bench/topologies.py prepares it
    if args.data:
        base = prepare(args.work, args.data.resolve(), size, args.steps, None)  # rows of up to 2,048 tokens, as §2
    params = yaml.safe_load((base / "params.yaml").read_text())
    for name in args.variants.split(","):
        d = node_dir(args.work, base, f"tp-{name}", 0, params)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--steps", str(args.steps)]
        env = None
        if name == "unsloth":  # its own process, its own TRL: the unpacked wheels come first
            cmd = [sys.executable, str(Path(__file__).with_name("unsloth_variant.py")), "--steps", str(args.steps)]
            env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(args.unsloth_site),
                                                                             os.environ.get("PYTHONPATH")]))}  # fmt: skip
        proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True, env=env)
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            (args.logs / f"{name}.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
        record_result(name, proc, args.out)


def record_result(name: str, proc: subprocess.CompletedProcess, out: Path | None) -> dict | None:
    """A variant process's `RESULT {json}` line: printed, appended to `out`; None (and its stderr) if it failed."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"{name}: failed ({proc.returncode})\n{proc.stderr[-4000:]}", flush=True)
        return None
    result = json.loads(lines[-1][len("RESULT ") :])
    print(json.dumps(result), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
