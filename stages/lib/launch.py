"""Starting every rank of the train stage through DeepSpeed's launcher.

`dvc repro` runs `python -m stages.train` once, on the head node. When params name a DeepSpeed config, that
process builds the launcher command from params.train.launch and waits for it; each rank it starts sees
LOCAL_RANK in its environment and trains instead of launching again.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from .errors import UserError
from .params import Params

STAGE_MODULE = "stages.train"


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def launcher_command(params: Params) -> list[str]:
    t, launch = params.train, params.train.launch
    gpus = launch.gpus_per_node or max(visible_gpus(), 1)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--master_addr", launch.master_addr, "--master_port", str(launch.master_port)]
    if launch.nodes == 1:
        cmd += ["--num_gpus", str(gpus)]
    elif launch.runner == "no-ssh":
        cmd += ["--no_ssh", "--node_rank", str(launch.node_rank), "--num_nodes", str(launch.nodes)]
        cmd += ["--num_gpus", str(gpus)]
        if launch.hostfile:
            cmd += ["--hostfile", launch.hostfile]
    else:
        if not os.path.isfile(launch.hostfile):
            raise UserError(f"train.launch.hostfile {launch.hostfile} does not exist")
        cmd += ["--hostfile", launch.hostfile, "--launcher", launch.runner, "--num_nodes", str(launch.nodes)]
        cmd += ["--num_gpus", str(gpus)]
    return [*cmd, "--module", STAGE_MODULE]


def relaunch_if_needed(params: Params) -> bool:
    """Run the stage under the DeepSpeed launcher unless this process already is a launched rank."""
    if not params.train.deepspeed or "LOCAL_RANK" in os.environ:
        return False
    cmd = launcher_command(params)
    print("train: launching", shlex.join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        raise SystemExit(f"train: the DeepSpeed launcher exited with status {code}")
    return True
