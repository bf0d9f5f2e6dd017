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
MAX_SLOTS = 1024  # GPUs one node can list in a hostfile: a bound that catches typos, not a real limit
HEAD_ENV = "TRAIN_STAGE_HEAD"  # host:pid of `python -m stages.train`; ranks on that host stop when it is gone


def launcher_command(params: Params) -> list[str]:
    """DeepSpeed's runner, re-running this stage on every rank.

    Without gpus_per_node or include, a single node uses every GPU in CUDA_VISIBLE_DEVICES (one process on a CPU).
    """
    launch = params.train.launch
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--master_addr", launch.master_addr, "--master_port", str(launch.master_port)]
    if launch.hostfile:  # check_launch has read it
        cmd += ["--hostfile", launch.hostfile]
    if launch.include:
        cmd += ["--include", launch.include]
    else:
        cmd += ["--num_gpus", str(launch.gpus_per_node)] if launch.gpus_per_node else []
        cmd += ["--num_nodes", str(launch.nodes)] if launch.nodes > 1 else []
    if launch.runner == "no-ssh" and (launch.nodes > 1 or launch.hostfile):  # any hostfile: DeepSpeed would ssh
        cmd += ["--no_ssh", "--node_rank", str(launch.node_rank)]
    elif launch.nodes > 1:
        cmd += ["--launcher", launch.runner]
    return [*cmd, "--module", STAGE_MODULE, *planned_args()]


def planned_args() -> list[str]:
    """The head's `auto` choice (TRAIN_PLANNED) as arguments of every rank's command: DeepSpeed's multi-node
    runners pass on only some environment variables, but always the script's arguments. Base64 JSON, so that no
    remote shell splits or unquotes it."""
    import base64

    from .auto import PLANNED_ENV

    value = os.environ.get(PLANNED_ENV)
    return ["--planned", base64.urlsafe_b64encode(value.encode()).decode()] if value else []


def take_planned_arg(argv: list[str]) -> None:
    """In a rank: put the head's choice from `--planned` back into TRAIN_PLANNED (no-op without the argument)."""
    import base64

    from .auto import PLANNED_ENV

    if "--planned" in argv[:-1]:
        os.environ[PLANNED_ENV] = base64.urlsafe_b64decode(argv[argv.index("--planned") + 1]).decode()


def _quiet_deepspeed_logger():
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.CRITICAL)  # its parser logs the whole file before raising; our error says it in one line


def check_launch(params: Params, visible_gpus: int) -> None:
    """Before starting any rank: the hostfile parses and has the nodes asked for, `include` names hosts and GPUs
    that exist, and (single node) the master port is free. UserError naming the key otherwise."""
    from deepspeed.launcher.runner import fetch_hostfile, parse_inclusion_exclusion

    launch = params.train.launch
    _quiet_deepspeed_logger()
    if launch.hostfile:
        if not os.path.isfile(launch.hostfile):
            exists = os.path.lexists(launch.hostfile)
            what = "is a directory" if os.path.isdir(launch.hostfile) else "is not a regular file" if exists else \
                "does not exist"
            raise UserError(f"train.launch.hostfile {launch.hostfile} {what}: give a file with one "
                            "`<host> slots=<GPUs>` line per node")  # fmt: skip
        try:
            pool = fetch_hostfile(launch.hostfile)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"train.launch.hostfile {launch.hostfile}: {exc}; each line is `<host> slots=<GPUs>`") from None
        for host, slots in pool.items():
            if not 1 <= slots <= MAX_SLOTS:
                raise UserError(f"train.launch.hostfile {launch.hostfile}: {host} has slots={slots}: give the number "
                                f"of GPUs on that node (1 to {MAX_SLOTS})")  # fmt: skip
        if len(pool) < launch.nodes:
            raise UserError(f"train.launch.hostfile {launch.hostfile} lists {len(pool)} host(s) and "
                            f"train.launch.nodes is {launch.nodes}: add the missing hosts or lower nodes")  # fmt: skip
    elif visible_gpus:  # on a CPU, DeepSpeed starts as many processes as asked (tests play GPUs that way)
        pool = {"localhost": visible_gpus}
        if launch.gpus_per_node and launch.gpus_per_node > visible_gpus:
            raise UserError(f"train.launch.gpus_per_node is {launch.gpus_per_node} but this node has "
                            f"{visible_gpus} visible GPU(s): lower it or set CUDA_VISIBLE_DEVICES")  # fmt: skip
    else:
        pool = {"localhost": MAX_SLOTS}  # without a hostfile DeepSpeed knows only this host
    if launch.include:
        try:
            parse_inclusion_exclusion(dict(pool), launch.include, "")
        except (ValueError, KeyError, IndexError) as exc:
            known = (f"hosts and GPUs in the hostfile: {', '.join(f'{h}: {n}' for h, n in pool.items())}"
                     if launch.hostfile else "without train.launch.hostfile the only host is localhost")  # fmt: skip
            raise UserError(f"train.launch.include {launch.include!r}: {exc} ({known})") from None
    if launch.hostfile and launch.runner != "no-ssh":
        _check_ssh(next(iter(parse_inclusion_exclusion(dict(pool), launch.include or "", ""))), launch.hostfile)
    if launch.nodes == 1 or (launch.runner == "no-ssh" and launch.node_rank == 0):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store binds: TIME_WAIT is not "in use"
            try:
                s.bind(("", launch.master_port))
            except OSError:
                raise UserError(f"train.launch.master_port {launch.master_port} is in use on this host (another "
                                "training run?): pick a free port") from None  # fmt: skip


def _check_ssh(host: str, hostfile: str) -> None:
    """With a hostfile, DeepSpeed's launcher first runs `hostname` over ssh on the first host (a traceback when it
    fails); the same check here, without a password prompt and with a timeout, fails as one line instead."""
    cmd = ["ssh", "-o", "PasswordAuthentication=no", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host, "hostname"]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise UserError(f"train.launch.hostfile {hostfile} needs ssh, which is not installed here: install an ssh "
                        "client, or start every node yourself with train.launch.runner: no-ssh") from None  # fmt: skip
    except subprocess.TimeoutExpired:
        done = None
    if done is None or done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no answer"])[-1] if done else "no answer in 30 s"
        raise UserError(f"train.launch.hostfile {hostfile}: host {host} is not reachable over ssh without a password "
                        f"({why}): set up passwordless ssh, or for one node remove train.launch.hostfile")  # fmt: skip


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
    import torch

    from .deepspeed_check import check_deepspeed, check_matches_params
    from .fit import world_size

    config = check_deepspeed(params.train.deepspeed)
    check_launch(params, torch.cuda.device_count())
    check_matches_params(params.train.deepspeed, config, params, world_size(params, torch.cuda.device_count()))
    from .interrupt import STOP_CODES, forward_stops  # after the checks: it imports transformers (seconds)

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
