"""Throughput and memory of a training run, per rank: metrics/train_speed.json and the benchmarks."""

from __future__ import annotations

import os
import time

from transformers import TrainerCallback

GIB = 1024**3
SNAPSHOT_ENV = "TRAIN_MEMORY_SNAPSHOT"  # a directory: each rank writes a CUDA memory snapshot of its training there
PROFILE_ENV = "TRAIN_PROFILE"  # a directory: rank 0 writes torch.profiler's tables of optimizer steps 3-4 there
PROFILED_STEPS = (2, 4)  # global_step before the first profiled step, after the last


class Telemetry(TrainerCallback):
    """Real tokens/s after the first logging window (warm-up excluded) and per-rank peak GPU memory.

    Token counts are TRL's `num_tokens`: non-padding tokens summed over all ranks.
    """

    def __init__(self, curve: str | None = None):
        self.first = None  # (time, tokens, step) at the first log that has a token count
        self.last = None
        self.mark = None  # when the last optimizer step ended
        self.paused = 0.0  # seconds of evaluation and saving in the current logging window
        self.load_peak = 0.0
        self.at_first_step = 0.0  # GiB allocated once the model is loaded and sharded
        self.weights: dict = {}
        self.summary: dict = {}
        self.curve = curve  # a TSV file rank 0 appends each window's tokens/s to (step, tokens_per_s)

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            self.load_peak = torch.cuda.max_memory_allocated() / GIB  # model load and sharding
            self.at_first_step = torch.cuda.memory_allocated() / GIB
            self.weights = weight_census(kwargs["model"])
            print(f"telemetry: rank {args.process_index} holds {self.at_first_step:.2f} GiB at the first step; "
                  f"weights {self.weights}", flush=True)
            torch.cuda.reset_peak_memory_stats()
            if os.environ.get(SNAPSHOT_ENV):  # allocation stacks for torch's memory viewer (pytorch.org/memory_viz)
                torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            point = (time.perf_counter(), float(logs["num_tokens"]), state.global_step)
            if self.last and point[2] > self.last[2] and point[1] > self.last[1]:
                seconds = point[0] - self.last[0] - self.paused  # evaluation and checkpoint time left out
                logs["tokens_per_s"] = (point[1] - self.last[1]) / seconds  # this window's, all ranks together
                if self.curve and args.process_index == 0:
                    os.makedirs(os.path.dirname(self.curve) or ".", exist_ok=True)
                    with open(self.curve, "a", encoding="utf-8") as f:
                        f.write(("step\ttokens_per_s\n" if f.tell() == 0 else "") + f"{state.global_step}\t{logs['tokens_per_s']}\n")
            self.first = self.first or point
            self.last = point
            self.paused = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if os.environ.get(PROFILE_ENV) and args.process_index == 0 and state.global_step == PROFILED_STEPS[0]:
            import torch

            kinds = [torch.profiler.ProfilerActivity.CPU]
            kinds += [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            self.profiler = torch.profiler.profile(activities=kinds)
            self.profiler.__enter__()
            self.profile_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()
        if getattr(self, "profiler", None) is not None and state.global_step == PROFILED_STEPS[1]:
            self.profiler.__exit__(None, None, None)
            write_profile(self.profiler, os.environ[PROFILE_ENV], self.mark - self.profile_start)
            self.profiler = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._pause()

    def on_save(self, args, state, control, **kwargs):
        self._pause()

    def _pause(self) -> None:
        now = time.perf_counter()
        self.paused += now - (self.mark or now)
        self.mark = now

    def on_train_end(self, args, state, control, **kwargs):
        import torch
        import torch.distributed as dist

        if not torch.cuda.is_available():  # nothing to measure: no number rather than a misleading 0.0
            self.summary = self._speed(args)
            return
        train_peak = torch.cuda.max_memory_allocated() / GIB
        if os.environ.get(SNAPSHOT_ENV):
            os.makedirs(os.environ[SNAPSHOT_ENV], exist_ok=True)
            torch.cuda.memory._dump_snapshot(os.path.join(os.environ[SNAPSHOT_ENV], f"rank{args.process_index}.pickle"))
        mine = {"peak_gib_load_per_rank": self.load_peak, "peak_gib_train_per_rank": train_peak,
                "gib_at_first_step_per_rank": self.at_first_step}  # fmt: skip
        ranks = [mine]
        if dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        summary = {key: [round(r[key], 3) for r in ranks] for key in mine}
        self.summary = summary | {"weights_rank0": self.weights} | self._speed(args)

    def _speed(self, args) -> dict:
        """Tokens seen, and tokens/s and seconds per step from the first logging window on (warm-up excluded)."""
        speed = {"tokens_seen": self.last[1] if self.last else None, "world_size": args.world_size}
        if self.first and self.last and self.last[2] > self.first[2]:
            seconds = self.last[0] - self.first[0]
            tokens = self.last[1] - self.first[1]
            speed |= {
                "tokens_per_s": tokens / seconds,
                "tokens_per_s_per_gpu": tokens / seconds / max(args.world_size, 1),
                "step_time_s": seconds / (self.last[2] - self.first[2]),
            }
        return speed


def write_profile(profiler, folder: str, seconds: float) -> None:
    """rank0.txt in `folder`: wall seconds of the profiled steps, the ops by CPU time and by GPU time, and the
    number of calls of each collective (how often ZeRO gathers, not only how long)."""
    averages = profiler.key_averages()
    collectives = sorted(((e.key, e.count) for e in averages if "all_gather" in e.key or "reduce_scatter" in e.key
                          or "all_reduce" in e.key), key=lambda kv: -kv[1])  # fmt: skip
    lines = [f"profiled optimizer steps {PROFILED_STEPS[0] + 1}-{PROFILED_STEPS[1]}: {seconds:.3f} s wall",
             "collective calls: " + ", ".join(f"{k} x{n}" for k, n in collectives), "",
             averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)]  # fmt: skip
    try:
        lines.append(averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    except Exception:  # noqa: BLE001 - no CUDA events on a CPU run
        pass
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "rank0.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def weight_census(model) -> dict:
    """GiB of parameter storage on this rank's GPU, per parameter class: whole tensors, and ZeRO-3 shards."""
    census: dict = {}
    for param in model.parameters():
        entry = census.setdefault(type(param).__name__, {"count": 0, "sharded": 0, "whole_gib": 0.0, "shard_gib": 0.0})
        entry["count"] += 1
        shard = getattr(param, "ds_tensor", None)
        entry["sharded"] += shard is not None
        for key, tensor in (("whole_gib", param.data), ("shard_gib", shard)):
            if tensor is not None and tensor.is_cuda:
                entry[key] += tensor.numel() * tensor.element_size() / GIB
    return {name: {k: round(v, 3) if isinstance(v, float) else v for k, v in e.items()} for name, e in census.items()}


def label_progress(trainer) -> None:
    """Give the Trainer's progress bars names ("train: steps", "train: validation batches"): a log then says what
    each count is. Replaces transformers' ProgressCallback with a subclass; nothing else changes."""
    from transformers.trainer_callback import ProgressCallback

    from tqdm.auto import tqdm
    from transformers.trainer_utils import has_length

    class LabelledProgress(ProgressCallback):  # transformers' bars, created with their names
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc="train: steps")
            self.current_step = 0

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if state.is_world_process_zero and has_length(eval_dataloader):
                if self.prediction_bar is None:
                    self.prediction_bar = tqdm(total=len(eval_dataloader), leave=self.training_bar is None,
                                               dynamic_ncols=True, desc="train: validation batches")  # fmt: skip
                self.prediction_bar.update(1)

    if any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LabelledProgress)
