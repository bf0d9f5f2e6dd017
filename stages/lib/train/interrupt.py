"""Stopping cleanly: SIGTERM / SIGINT save a checkpoint at the next optimizer step, then the stage exits 128+signal.

SLURM and Kubernetes send SIGTERM before they kill (30 s later by default, as DeepSpeed's launcher does when it
passes a signal on to its ranks), so a step plus a LoRA checkpoint must fit in that grace; otherwise the last
periodic checkpoint is what survives. Every rank decides at the same step: a request seen by any rank, or a
time-based save that is due, is agreed through one small all-reduce per optimizer step.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from transformers import TrainerCallback

STOP_CODES = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}  # what shells report


class StopRequest:
    """The signal this process received, if any. Before training starts, a signal exits at once."""

    signum: int | None = None
    training = False

    @classmethod
    def install(cls) -> None:
        for signum in STOP_CODES:
            signal.signal(signum, cls._handle)

    @classmethod
    def _handle(cls, signum, frame) -> None:
        if not cls.training or cls.signum is not None:  # nothing to save yet, or asked twice: stop now
            print(f"train: {signal.Signals(signum).name}, stopping now", file=sys.stderr, flush=True)
            os._exit(STOP_CODES[signum])
        cls.signum = signum
        print(f"train: rank {os.environ.get('RANK', 0)} got {signal.Signals(signum).name}: saving a checkpoint after "
              "this step, then stopping (send it again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip


class SaveAndStop(TrainerCallback):
    """Turns a stop request or a due time-based save into a checkpoint, the same step on every rank.

    Also drops transformers' save at the last step: the stage writes the adapter itself right after.
    """

    def __init__(self, save_minutes: float | None):
        self.save_seconds = save_minutes * 60 if save_minutes else None
        self.last_save = time.monotonic()
        self.stopped_by: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        StopRequest.training = True
        self.last_save = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        import torch
        import torch.distributed as dist

        due = self.save_seconds is not None and time.monotonic() - self.last_save >= self.save_seconds
        flags = [float(StopRequest.signum or 0), float(due)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor(flags, device=args.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # any rank's request, or rank clocks that disagree
            flags = tensor.tolist()
        if flags[0]:
            self.stopped_by = int(flags[0])
            control.should_save = control.should_training_stop = True
        elif flags[1]:
            control.should_save = True
        elif state.max_steps and state.global_step >= state.max_steps:
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()

    def on_train_end(self, args, state, control, **kwargs):
        StopRequest.training = False


def watch_head(pid: int, interval: float = 2.0) -> None:
    """Exit when the stage's head process is gone (kill -9 of `python -m stages.train` ends its ranks too)."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(f"train: the stage process {pid} is gone; this rank stops", file=sys.stderr, flush=True)
                os._exit(137)
            except PermissionError:  # alive, owned by someone else (cannot happen for our own parent chain)
                pass

    threading.Thread(target=watch, name="watch-head", daemon=True).start()


def forward_stops(launcher) -> None:
    """In the head process: pass SIGTERM/SIGINT on to the ranks (descendants with LOCAL_RANK) and keep waiting.

    The launcher runs in its own session, so a terminal's Ctrl-C reaches only this process; the ranks then get
    SIGTERM directly instead of through DeepSpeed's launcher, which would SIGKILL them 30 s later. A second
    signal kills the whole tree at once.
    """
    import psutil

    asked = []

    def handle(signum, frame) -> None:
        asked.append(signum)
        tree = psutil.Process(launcher.pid).children(recursive=True)
        if len(asked) > 1:
            for proc in [*tree, psutil.Process(launcher.pid)]:
                _send(proc, signal.SIGKILL)
            return
        ranks = [p for p in tree if _is_rank(p)]
        print(f"train: {signal.Signals(signum).name}: asking {len(ranks) or 'the'} rank(s) to save a checkpoint and "
              "stop (send it again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip
        for proc in ranks or [psutil.Process(launcher.pid)]:  # no local ranks: the launcher passes it on (pdsh)
            _send(proc, signal.SIGTERM)

    for signum in STOP_CODES:
        signal.signal(signum, handle)


def _is_rank(proc) -> bool:
    try:
        return "LOCAL_RANK" in proc.environ()
    except Exception:  # gone, or not readable
        return False


def _send(proc, signum) -> None:
    try:
        proc.send_signal(signum)
    except Exception:  # already gone
        pass
