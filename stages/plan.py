"""`python -m stages.plan`: predicted GPU memory and speed of each training setting, and the one `auto` picks.

    python -m stages.plan                                   # params.yaml, this machine's GPUs
    python -m stages.plan --params pipelines/seed-chatglm2-2x4/params.yaml --gpus 4 --nodes 2 --gpu-memory-gib 24

The model is built from its config.json on the meta device (exact parameter counts, no weights): model.path's,
else the recipe's `config` (or the Hub's config.json at the pinned revision); models/base is not read, since it
may hold an earlier model. The train stage prints the same table for models/base at its start and resolves
`train.deepspeed: auto` and `train.gradient_checkpointing: auto` with it (stages/lib/train/auto.py); how each
number is predicted: stages/lib/train/plan.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.lib.core.errors import UserError, run_stage
from stages.lib.core.params import load_params
from stages.lib.train.auto import config_dict, host_memory_gib, launch_shape, lora_targets, meta_from_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--gpus", type=int, help="GPUs per node (default: train.launch.gpus_per_node, else those here)")
    ap.add_argument("--nodes", type=int, help="nodes (default: train.launch.nodes)")
    ap.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU (default: this machine's)")
    ap.add_argument("--host-memory-gib", type=float, help="RAM of one node, for offloaded checkpointing (default: "
                    "this machine's)")
    args = ap.parse_args()
    params = load_params(args.params)
    for key, value in (("--gpus", args.gpus), ("--nodes", args.nodes), ("--gpu-memory-gib", args.gpu_memory_gib),
                       ("--host-memory-gib", args.host_memory_gib)):
        if value is not None and not 0 < value < float("inf"):
            raise UserError(f"{key} must be a number above 0, got {value}")
    import torch

    from stages.lib.train.fit import gpu_capacity_gib
    from stages.lib.train.plan import make_plan, table

    gpus, nodes = launch_shape(params, torch.cuda.device_count())
    capacity = args.gpu_memory_gib or gpu_capacity_gib()
    model = meta_from_config(config_dict(params))  # params' model, not an earlier download
    where = params.model.path or f"recipe '{params.model.recipe}'"
    gpus = args.gpus or gpus
    host = (args.host_memory_gib or host_memory_gib()) / gpus
    print(table(make_plan(model, params, lora_targets(params), gpus, args.nodes or nodes, capacity, where=where,
                          host_gib=host)))  # fmt: skip


if __name__ == "__main__":
    run_stage(main)
