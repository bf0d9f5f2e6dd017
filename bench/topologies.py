"""The train stage on several GPU topologies, with a random-weight 7B (or 1.5B) Qwen2-architecture model.

Runs the real stages (download builds the model from a config, tokenize, then train under DeepSpeed ZeRO-3) and
prints, per topology: steps, loss first/last, adapter size, LoRA-B norm, per-rank peak memory and tokens/s.
Two "nodes" on one host are two launcher processes (runner no-ssh, own node rank, own GPUs via include).

    python bench/topologies.py --data DIR --work /tmp/topo --runs 1gpu,2gpu,2x1,2x2 [--size 7b] [--steps 16]
    python bench/topologies.py ... --runs 1gpu:none,1gpu:zero3,2gpu:zero3,2gpu:zero2   # NAME:DEEPSPEED per run
    python bench/topologies.py ... --size 32b --cap-gib 16 --keep-going              # play 16 GiB cards

DIR holds alpaca_zh_demo.json and qwen2/ (the tokenizer), as in ../shared/data.
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
SIZES = {  # Qwen2.5 shapes; weights are random
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "14b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "32b": {"hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
            "num_key_value_heads": 8, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": True},  # a CPU smoke test of this script
}  # fmt: skip
# name: (nodes, GPUs per node, gradient accumulation) -- the global batch is the same in every topology
TOPOLOGIES = {"1gpu": (1, 1, 4), "2gpu": (1, 2, 2), "2x1": (2, 1, 2), "2x2": (2, 2, 1), "4gpu": (1, 4, 1),
              "2x4": (2, 4, 1)}  # fmt: skip


def base_params(steps: int, deepspeed: str, max_length: int = 2048) -> dict:
    return {
        "seed": 42,
        "data": {"sources": [{"kind": "local", "path": "data/sources/alpaca_zh_demo.json"}], "validation_fraction": 0.02,
                 "max_validation": 20},
        "model": {"recipe": "bench-qwen2", "tokenizer": "models/sources/qwen2"},
        "tokenize": {"template": "seed", "max_length": max_length},
        "train": {
            "method": "qlora", "dtype": "bfloat16", "learning_rate": 1e-3, "lr_scheduler": "constant",
            "warmup_ratio": 0.0, "max_steps": steps, "batch_size": 1, "packing": True, "logging_steps": 1,
            "gradient_checkpointing": True, "deepspeed": deepspeed,
            "lora": {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        },
    }  # fmt: skip


def run(cmd: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


class RunFailed(SystemExit):
    pass


def wait(procs: list[subprocess.Popen], logs: list[Path], what: str, keep_going: bool = False) -> None:
    codes = [p.wait() for p in procs]
    if any(codes) and keep_going:  # the caller reports the failure as a result (e.g. a refusal that is expected)
        errors = [line for log in logs for line in log.read_text().splitlines() if line.startswith(("error:", "train:"))]
        raise RunFailed(f"{what} failed: exit codes {codes}: {errors[-1] if errors else '(no error line)'}")
    if any(codes):
        for log in logs:
            print(f"--- {log}\n{log.read_text()[-6000:]}", file=sys.stderr)
        raise SystemExit(f"{what} failed: exit codes {codes}")


def prepare(work: Path, data: Path, size: str, steps: int, deepspeed: str, max_length: int = 2048) -> Path:
    base = work / f"base-{size}"
    if (base / "data" / "tokenized").exists():
        return base
    base.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "recipes", base / "recipes", dirs_exist_ok=True)  # plus the benchmark's model recipe
    if not (base / "stages").exists():
        (base / "stages").symlink_to(ROOT / "stages")
    recipe = {
        "description": f"random Qwen2 {size} (benchmark)",
        "source": {"kind": "config", "model_type": "qwen2", "config": SIZES[size]},
        "template": "seed", "lora_targets": ["q_proj", "k_proj", "v_proj"], "dtype": "bfloat16",
    }  # fmt: skip
    (base / "recipes" / "models" / "bench-qwen2.yaml").write_text(yaml.safe_dump(recipe))
    (base / "params.yaml").write_text(yaml.safe_dump(base_params(steps, deepspeed, max_length)))
    (base / "data" / "sources").mkdir(parents=True, exist_ok=True)  # the stages read local inputs from here only
    shutil.copyfile(data / "alpaca_zh_demo.json", base / "data" / "sources" / "alpaca_zh_demo.json")
    shutil.copytree(data / "qwen2", base / "models" / "sources" / "qwen2", dirs_exist_ok=True)
    for stage in ("download", "tokenize"):
        t = time.time()
        wait([run([sys.executable, "-m", f"stages.{stage}"], base, base / f"{stage}.log")], [base / f"{stage}.log"], stage)
        print(f"{stage}: {time.time() - t:.0f} s", flush=True)
    return base


def node_dir(work: Path, base: Path, name: str, node: int, params: dict) -> Path:
    d = work / name / f"node{node}"
    shutil.rmtree(d, ignore_errors=True)
    (d / "models").mkdir(parents=True)
    (d / "stages").symlink_to(ROOT / "stages")
    (d / "recipes").symlink_to(base / "recipes")
    (d / "data").symlink_to(base / "data")
    (d / "models" / "base").symlink_to(base / "models" / "base")
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    return d


def topology(work: Path, base: Path, name: str, port: int, train_changes: dict, keep_going: bool = False) -> dict:
    nodes, gpus, accum = TOPOLOGIES[name]
    params = yaml.safe_load((base / "params.yaml").read_text())
    params["train"] |= train_changes | {"grad_accum": accum}
    launch = {"nodes": nodes, "gpus_per_node": gpus, "master_port": port, "timeout_minutes": 5}
    if nodes > 1:
        hostfile = work / name / "hostfile"
        hostfile.parent.mkdir(parents=True, exist_ok=True)
        # one host plays every node: each "node" lists all its GPUs, include gives each node its own
        hostfile.write_text("".join(f"node{n} slots={nodes * gpus}\n" for n in range(nodes)))
        gpu_ids = lambda n: ",".join(str(n * gpus + g) for g in range(gpus))  # noqa: E731
        launch |= {"runner": "no-ssh", "hostfile": str(hostfile),
                   "include": "@".join(f"node{n}:{gpu_ids(n)}" for n in range(nodes))}  # fmt: skip
    procs, logs, dirs = [], [], []
    t = time.time()
    for n in range(nodes):
        params["train"]["launch"] = launch | {"node_rank": n}
        d = node_dir(work, base, name, n, params)
        dirs.append(d)
        logs.append(d / "train.log")
        alone = {"CUDA_VISIBLE_DEVICES": "0"} if nodes * gpus == 1 else None  # one GPU (also for `auto`'s choice)
        procs.append(run([sys.executable, "-m", "stages.train"], d, logs[-1], alone))
    wait(procs, logs, f"train {name}", keep_going)
    return summary(name, dirs[0], time.time() - t)


def summary(name: str, d: Path, seconds: float) -> dict:
    from safetensors.torch import load_file

    config = json.loads((d / "models" / "adapter" / "train_config.json").read_text())
    config |= json.loads((d / "metrics" / "train_speed.json").read_text())  # timings and memory live apart
    adapter = d / "models" / "adapter" / "adapter_model.safetensors"
    weights = load_file(adapter)
    lora_b = sum(float(w.float().norm() ** 2) for k, w in weights.items() if "lora_B" in k) ** 0.5
    losses = [h["loss"] for h in config["loss_history"]]
    return {
        "topology": name, "world_size": config["world_size"], "steps": config["global_steps"],
        "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
        "adapter_mib": adapter.stat().st_size / 2**20, "lora_b_norm": lora_b,
        "peak_gib_load_per_rank": config["peak_gib_load_per_rank"],
        "peak_gib_train_per_rank": config["peak_gib_train_per_rank"],
        "tokens_per_s": config.get("tokens_per_s"), "tokens_per_s_per_gpu": config.get("tokens_per_s_per_gpu"),
        "gib_at_first_step_per_rank": config.get("gib_at_first_step_per_rank"),
        "load_weights_gib_per_rank": config.get("load_weights_gib_per_rank"),
        "plan": config.get("plan"),
        "weights_rank0": config.get("weights_rank0"),
        "stage_seconds": seconds,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/topologies"))
    ap.add_argument("--runs", default="1gpu,2gpu")
    ap.add_argument("--size", choices=SIZES, default="7b")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--deepspeed", default="zero3")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per run here")
    ap.add_argument("--max-length", type=int, default=2048, help="tokenize.max_length (the packed row by default)")
    ap.add_argument("--cap-gib", type=float, default=None, help="cap each rank's GPU memory (TRAIN_GPU_MEMORY_GIB)")
    ap.add_argument("--keep-going", action="store_true", help="report a failed run as a result and go on")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a train setting for every run, e.g. --set packed_length=8192 (value read as YAML)")
    args = ap.parse_args()
    changes = {"max_steps": args.steps, "deepspeed": args.deepspeed}
    changes |= {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.cap_gib:
        os.environ["TRAIN_GPU_MEMORY_GIB"] = str(args.cap_gib)
    base = prepare(args.work, args.data.resolve(), args.size, args.steps, args.deepspeed, args.max_length)
    for i, run_spec in enumerate(filter(None, args.runs.split(","))):
        name, _, deepspeed = run_spec.partition(":")  # NAME:DEEPSPEED, "none" for no DeepSpeed
        if deepspeed.endswith(".json"):  # a probe config: the stage reads configs from recipes/deepspeed only
            shutil.copyfile(deepspeed, base / "recipes" / "deepspeed" / Path(deepspeed).name)
            deepspeed = Path(deepspeed).stem
        run_changes = changes | ({"deepspeed": None if deepspeed == "none" else deepspeed} if deepspeed else {})
        try:
            result = topology(args.work, base, name, 29500 + 10 * i, run_changes, args.keep_going)
        except RunFailed as failed:
            result = {"topology": name, "failed": str(failed)}
        result |= {"size": args.size, "deepspeed": run_changes["deepspeed"], "cap_gib": args.cap_gib,
                   "train": run_changes}  # fmt: skip
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
