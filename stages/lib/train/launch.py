"""Starting every rank of the train stage through DeepSpeed's launcher.

`dvc repro` runs `python -m stages.train` once, on the head node. When params name a DeepSpeed config, that
process builds the launcher command from params.train.launch and waits for it; each rank it starts sees
LOCAL_RANK in its environment and trains instead of launching again.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

from ..core.errors import UserError
from ..core.params import Params

STAGE_MODULE = "stages.train"
HEAD_ENV = "TRAIN_STAGE_HEAD"  # host:pid of `python -m stages.train`; ranks on that host stop when it is gone


def launcher_command(params: Params) -> list[str]:
    """DeepSpeed's runner, re-running this stage on every rank.

    Without gpus_per_node or include, a single node uses every GPU in CUDA_VISIBLE_DEVICES (one process on a CPU).
    """
    launch = params.train.launch
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--master_addr", launch.master_addr, "--master_port", str(launch.master_port)]
    if launch.hostfile:
        if not os.path.isfile(launch.hostfile):
            raise UserError(f"train.launch.hostfile {launch.hostfile} does not exist")
        cmd += ["--hostfile", launch.hostfile]
    if launch.include:
        cmd += ["--include", launch.include]
    else:
        cmd += ["--num_gpus", str(launch.gpus_per_node)] if launch.gpus_per_node else []
        cmd += ["--num_nodes", str(launch.nodes)] if launch.nodes > 1 else []
    if launch.nodes > 1:
        cmd += ["--no_ssh", "--node_rank", str(launch.node_rank)] if launch.runner == "no-ssh" else []
        cmd += ["--launcher", launch.runner] if launch.runner != "no-ssh" else []
    return [*cmd, "--module", STAGE_MODULE]


def relaunch_if_needed(params: Params) -> bool:
    """Run the stage under the DeepSpeed launcher unless this process already is a launched rank."""
    if "LOCAL_RANK" in os.environ:
        return False
    if not params.train.deepspeed:
        import torch

        if torch.cuda.device_count() > 1:  # one process would spread over them (DataParallel), which TRL refuses
            raise UserError(
                f"{torch.cuda.device_count()} GPUs are visible but train.deepspeed is null: set train.deepspeed "
                "(zero3, zero2, ...) to train on all of them, or make one visible with CUDA_VISIBLE_DEVICES=0"
            )
        return False
    from .interrupt import STOP_CODES, forward_stops

    cmd = launcher_command(params)
    print("train: launching", shlex.join(cmd), flush=True)
    env = os.environ | {HEAD_ENV: f"{socket.gethostname()}:{os.getpid()}"}
    launcher = subprocess.Popen(cmd, env=env, start_new_session=True)  # signals reach the ranks through us
    forward_stops(launcher)
    code = launcher.wait()
    if code in STOP_CODES.values():
        raise SystemExit(code)  # the ranks saved a checkpoint and said so
    if code != 0:
        raise SystemExit(
            f"train: the DeepSpeed launcher exited with status {code}: a rank failed, or a node did not join or "
            f"stopped answering within train.launch.timeout_minutes ({params.train.launch.timeout_minutes}); "
            "the rank logs above say which"
        )
    return True


def join_world(timeout_minutes: float) -> None:
    """Join the process group, or fail with a clear message if the other ranks do not come within the timeout.

    The process group gets the same timeout, so a collective that waits on a dead rank fails too instead of hanging.
    """
    import threading
    from datetime import timedelta

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    import deepspeed
    import torch.distributed as dist

    def give_up() -> None:
        print(
            f"train: rank {os.environ.get('RANK')} gave up: not all {world} ranks joined within "
            f"train.launch.timeout_minutes ({timeout_minutes}); check that every node started and that "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} is reachable from each",
            file=sys.stderr,
            flush=True,
        )
        os._exit(3)

    # DeepSpeed JIT-compiles its CPU comm op on first use, under a lock file. Build it before the timer starts:
    # a slow first build is not a missing node, and a build killed half-way leaves a lock every later run waits on.
    try:
        from deepspeed.comm.torch import build_shm_op
    except ImportError:  # a DeepSpeed without this op
        pass
    else:
        build_shm_op()
    watchdog = threading.Timer(timeout_minutes * 60, give_up)
    watchdog.daemon = True
    watchdog.start()
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))
    dist.barrier()
    watchdog.cancel()
