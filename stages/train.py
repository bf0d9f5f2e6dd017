"""Stage 3, train: data/tokenized + models/base → models/adapter, with DVCLive logs in dvclive/train.

TRL's SFTTrainer does the work. QLoRA: the base loads as 4-bit NF4 whose storage dtype is the compute dtype
(ZeRO-3 flattens parameters of one dtype only); the DeepSpeed config exists before the model loads, and no
device_map is passed under DeepSpeed. When params ask for several processes, this module re-launches itself through DeepSpeed's
launcher (stages/lib/train/launch.py) and every rank runs `train()`; only global rank 0 writes outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from stages.lib.core.earlier import check_model_output, load_saved, load_tokenizer
from stages.lib.core.errors import require, run_stage
from stages.lib.core.outputs import sha256_file, staged_outputs, write_json, write_text
from stages.lib.core.params import Params, load_params
from stages.lib.core.recipes import deepspeed_config, model_recipe
from stages.lib.core.model_files import meta_model
from stages.lib.core.rope import folder_config, folder_overrides
from stages.lib.train.curves import dvclive_callbacks
from stages.lib.train.fit import apply_cap, check_weights_fit
from stages.lib.train.sft_args import sft_config  # noqa: F401 - benchmarks and tests build it from here
from stages.lib.train.preflight import (check_context, check_expert_targets, check_kernels, check_lora_targets,
                                       check_reporters, check_same_vocabulary, longest_sample)

TOKENIZED = Path("data/tokenized")
TOKENIZER = TOKENIZED / "tokenizer"  # the training tokenizer, written by tokenize (chat template, pad token)
BASE_DIR = Path("models/base")
ADAPTER_DIR = Path("models/adapter")
CHECKPOINTS = Path("models/checkpoints")  # an interrupted run resumes from here (stages/lib/train/checkpoints.py)
LIVE_DIR = Path("dvclive/train")
METRICS = Path("metrics/train.json")  # quality: a DVC metric
# timings change run to run: not DVC outputs (dvc.lock names only what the same inputs reproduce), git-ignored
SPEED = Path("metrics/train_speed.json")  # tokens/s, step time, memory
SPEED_CURVE = Path("logs/tokens_per_s.tsv")  # each logging window's tokens/s, drawn by dvc.yaml's plots
RUNS = Path("logs/train_runs.jsonl")  # one line per completed run: when, resumed from which step, how long


def lora_config(params: Params, model=None):
    """PEFT's LoraConfig from train.lora; `model` (the loaded base, else models/base on the meta device) names
    each expert stack that train.lora.target_parameters asks for (experts_4bit.lora_target_parameters)."""
    from peft import LoraConfig

    from stages.lib.train.experts_4bit import experts_modules, linear_names, lora_target_parameters

    lora = params.train.lora
    targets = lora.target_modules or model_recipe(params.model.recipe).lora_targets
    stacks = None
    built = model or meta_model(BASE_DIR, "models/base")
    if lora.target_parameters:
        stacks = lora_target_parameters(built, lora.target_parameters)
    if targets == "all-linear" and built is not None and experts_modules(built):
        # PEFT's all-linear would add the router and the expert stacks of a mixture of experts by bare name; here
        # it means the linear layers, and expert stacks come only from train.lora.target_parameters
        targets = linear_names(built)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      target_parameters=stacks, task_type="CAUSAL_LM")  # fmt: skip


def build_trainer(params: Params, output_dir: Path, callbacks: list, **overrides):
    """The stage's SFTTrainer; `overrides` go to SFTConfig (benchmarks use them to reproduce other setups)."""
    from trl import SFTTrainer

    t = params.train
    if t.attn_implementation == "varlen":
        from stages.lib.train.varlen_attention import register

        register()
    args = sft_config(params, output_dir, **overrides)  # the DeepSpeed config is live from here on
    splits = load_saved(TOKENIZED, "tokenize")
    train_set = splits["train"]
    eval_set = splits["validation"] if args.eval_strategy != "no" and len(splits["validation"]) else None
    from stages.lib.train.base_load import base_weights_gib, load_4bit, quantization_config
    from stages.lib.train.checkpoints import CarryLogWindow, KeepAdapterDtype
    from stages.lib.train.cpu_4bit import keep_4bit_layout
    from stages.lib.train.experts_4bit import add_lora_placeholders, experts_modules

    if t.token_metrics:
        base_class = SFTTrainer
    else:
        from stages.lib.train.lean_trainer import LeanSFTTrainer as base_class
    trainer_class = type("StageTrainer", (CarryLogWindow, KeepAdapterDtype, base_class), {})
    model = load_4bit(params, BASE_DIR) if t.method == "qlora" else None
    if model is not None:
        args.model_init_kwargs = None  # the model is built: TRL would warn that these go unused
        if t.lora.target_parameters:  # PEFT wraps the 4-bit expert stacks through zero placeholders
            for _, experts in experts_modules(model):
                add_lora_placeholders(experts)
    trainer = trainer_class(
        model=str(BASE_DIR) if model is None else model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=load_tokenizer(TOKENIZER, TOKENIZED, "tokenize"),
        peft_config=None if t.method == "full" else lora_config(params, model),
        quantization_config=quantization_config(params) if t.method == "qlora" and model is None else None,
        callbacks=callbacks,
    )
    from stages.lib.train import recompute

    if t.gradient_checkpointing == "selective":  # before train() turns checkpointing on
        trainer.selective = recompute.enable_selective(trainer.model)  # .kept: outputs the policy kept
    if t.gradient_checkpointing in (True, "selective") and t.checkpoint_layers is not None:
        trainer.decoder_layers = recompute.checkpoint_first(trainer.model, t.checkpoint_layers)
        print(f"train: checkpointing the first {min(t.checkpoint_layers, len(trainer.decoder_layers))} of "
              f"{len(trainer.decoder_layers)} decoder layers; the rest keep their activations", flush=True)
    if t.fused_lora and t.method != "full":
        from stages.lib.train.fused_lora import fuse

        trainer.fused_lora, lora_layers = fuse(trainer.model)  # LoRA layers routed through one addmm
        if lora_layers:
            rest = "" if trainer.fused_lora == lora_layers else " (the rest: PEFT's forward, for dropout, DoRA or a bias)"
            print(f"train: LoRA in one addmm in {trainer.fused_lora} of {lora_layers} layers{rest}", flush=True)
    trainer.load_weights_gib = base_weights_gib(trainer.model)  # before DeepSpeed initialises: what loading left
    keep_4bit_layout(trainer.model)  # one numeric path on AVX512-BF16 CPUs (evaluation would repack the weights)
    check_labels(trainer.train_dataset, train_set)
    from stages.lib.train.telemetry import label_progress

    label_progress(trainer)
    if t.deepspeed:
        from stages.lib.train.zero3_release import Zero3EarlyRelease

        trainer.add_callback(Zero3EarlyRelease(trainer))  # acts only under ZeRO-3
    return trainer


def check_labels(prepared, tokenized) -> None:
    """Fail unless the trainer's prepared rows label exactly the tokenized answer tokens.

    TRL turns `assistant_masks` into `labels` (-100 elsewhere) before it packs; a TRL that ignored the mask would
    train on the prompt as well, without a word. Counts over the whole set: `prepared` may be packed.
    """
    import pyarrow.compute as pc

    if "labels" not in prepared.column_names:
        raise RuntimeError("TRL built no labels from assistant_masks: the prompt would be trained too")

    def flat(dataset, column: str):
        return pc.list_flatten(dataset.data.column(column))

    labelled = pc.sum(pc.not_equal(flat(prepared, "labels"), -100)).as_py() or 0
    answer = pc.sum(flat(tokenized, "assistant_masks")).as_py() or 0
    if labelled != answer:
        raise RuntimeError(f"TRL labels {labelled} tokens for training, the tokenized answers have {answer}")
    total = len(flat(tokenized, "input_ids"))
    print(f"train: {labelled} of {total} tokens carry loss (the answers and their end tokens)")


def train(params: Params, planned: dict | None = None) -> None:
    """Train on this rank with resolved `params` (no `auto` left); `planned`: the planner's choice, if auto."""
    import datasets
    import torch.distributed as dist

    from stages.lib.train import checkpoints
    from stages.lib.train.interrupt import STOP_CODES, SaveAndStop, StopRequest, watch_head
    from stages.lib.train.launch import HEAD_ENV, join_world
    from stages.lib.train.telemetry import Telemetry

    StopRequest.install()
    apply_cap()  # TRAIN_GPU_MEMORY_GIB: before anything is allocated
    if os.environ.get(HEAD_ENV, "").startswith(f"{socket.gethostname()}:"):
        watch_head(int(os.environ[HEAD_ENV].rsplit(":", 1)[1]))
    join_world(params.train.launch.timeout_minutes)
    datasets.disable_caching()  # TRL's maps would otherwise write cache files into data/tokenized, a DVC input
    partial = ADAPTER_DIR.with_name(f".{ADAPTER_DIR.name}.partial")
    live_partial = LIVE_DIR.with_name(f".{LIVE_DIR.name}.partial")
    identity, resume = resume_point(params)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(live_partial, ignore_errors=True)
        if resume and (resume / "dvclive").is_dir():
            shutil.copytree(resume / "dvclive", live_partial)  # the curves up to the checkpoint's step
    if rank == 0 and resume is None:
        SPEED_CURVE.unlink(missing_ok=True)  # a fresh run's curve; a resumed one continues it
    telemetry = Telemetry(str(SPEED_CURVE))
    started = time.time()
    saver = SaveAndStop(params.train.save_minutes)
    marker = checkpoints.complete_after_save(identity, live_partial, params.train.save_total_limit)
    callbacks = [telemetry, saver, marker, *dvclive_callbacks(live_partial, resume=resume is not None)]
    trainer = build_trainer(params, CHECKPOINTS, callbacks)
    load_gib = [round(trainer.load_weights_gib, 4)]
    if dist.is_initialized():  # every rank's figure, for rank 0's record
        load_gib = [None] * dist.get_world_size()
        dist.all_gather_object(load_gib, round(trainer.load_weights_gib, 4))
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if saver.stopped_by:
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            print(f"train: stopped by {signal.Signals(saver.stopped_by).name} after step {result.global_step}; "
                  f"{CHECKPOINTS}/checkpoint-{result.global_step} is saved and `dvc repro` resumes from it",
                  file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(STOP_CODES[saver.stopped_by])
    trainer.save_model(str(partial))  # every rank: ZeRO-3 gathers the shards, rank 0 writes
    if rank == 0:
        for extra in ("checkpoints", "training_args.bin", "README.md", "tokenizer.json", "tokenizer_config.json",
                      "chat_template.jinja"):  # merge takes the tokenizer from data/tokenized/tokenizer
            path = partial / extra
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        config = resolved_config(params, trainer, result) | {"load_weights_gib_per_rank": load_gib}
        if (partial / "adapter_config.json").is_file():  # method full saves the model, not an adapter
            sort_target_modules(partial / "adapter_config.json")
            # merge checks them: an edited alpha or weight shows
            config["files"] = {f.name: sha256_file(f) for f in sorted(partial.iterdir()) if f.is_file()}
        if planned:
            config["plan"] = planned
        write_json(partial / "train_config.json", config)  # no timings: the same run gives the same adapter hash
        print("train:", summary_line(config, telemetry.summary), flush=True)
        with staged_outputs() as out:  # the adapter, its metrics and its curves arrive together
            out.add(partial, ADAPTER_DIR)
            write_json(out.file(METRICS), quality_metrics(config, trainer.state.log_history, planned))
            if live_partial.exists():
                out.add(live_partial, LIVE_DIR)
        write_json(SPEED, telemetry.summary)
        record_run(resume, started, result.global_step)
    if dist.is_initialized():
        dist.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        checkpoints.clear(CHECKPOINTS, keep_hashes=False)  # the run is complete: the adapter is the result
    if dist.is_initialized():
        dist.destroy_process_group()


def quality_metrics(config: dict, log_history: list[dict], planned: dict | None = None) -> dict:
    """metrics/train.json, a DVC metric: the last logged training loss and the last validation loss (answer tokens
    only, like every loss here), and under `setting` what `auto` chose (params.yaml says only "auto"). The mean
    loss and the step count are in train_config.json: a DVC table has room for two columns of train."""
    last_eval = next((h["eval_loss"] for h in reversed(log_history) if "eval_loss" in h), None)
    history = config["loss_history"]
    metrics = {"train_loss": history[-1]["loss"] if history else None, "validation_loss": last_eval}
    from stages.lib.train.auto import SETTINGS

    chosen = {k: v for k, v in (planned or {}).items() if k in SETTINGS}
    if chosen.get("gradient_checkpointing") in (False, "offload"):  # no layer count to report
        chosen.pop("checkpoint_layers", None)
    if chosen:  # checkpoint_layers null: every layer checkpointed (when checkpointing)
        metrics["setting"] = {k: v if v is not None else "all" if k == "checkpoint_layers" else "none"
                              for k, v in chosen.items()}  # fmt: skip
    return metrics


def summary_line(config: dict, speed: dict) -> str:
    """One line for the log: steps, losses and speed."""
    rate = f", {speed['tokens_per_s']:.0f} tokens/s" if speed.get("tokens_per_s") else ""
    mean = config["train_loss"]
    return f"{config['global_steps']} steps, mean training loss {mean:.4f}{rate}" if mean is not None else \
        f"{config['global_steps']} steps{rate}"


def sort_target_modules(path: Path) -> None:
    """PEFT writes target_modules and target_parameters from sets, in a different order each run: sorted, equal
    adapters hash equal."""
    config = json.loads(path.read_text(encoding="utf-8"))
    lists = [k for k in ("target_modules", "target_parameters") if isinstance(config.get(k), list)]
    if lists:
        config |= {k: sorted(config[k]) for k in lists}
        write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def resume_point(params: Params):
    """This run's identity and the checkpoint it resumes from (None: fresh), agreed by every rank.

    Rank 0 hashes the inputs; each rank looks at the checkpoints it can see; any disagreement starts fresh.
    Before returning, checkpoints this run must not load or overwrite are deleted.
    """
    import torch
    import torch.distributed as dist

    from stages.lib.train import checkpoints

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = dist.is_initialized()
    if distributed and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # object collectives use the current GPU
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    identity = None
    if rank == 0:
        identity = checkpoints.run_identity(params, world, {"data/tokenized": TOKENIZED, "models/base": BASE_DIR},
                                            CHECKPOINTS)  # fmt: skip
    if distributed:
        box = [identity]
        dist.broadcast_object_list(box, src=0)
        identity = box[0]
    resume, why = checkpoints.choose(CHECKPOINTS, identity)
    if distributed:
        seen = [None] * world
        dist.all_gather_object(seen, str(resume))
        if len(set(seen)) > 1:
            resume, why = None, (f"starting fresh: the ranks see different checkpoints ({sorted(set(seen))}); "
                                 f"{CHECKPOINTS} must be one folder that every node shares")  # fmt: skip
    if rank == 0:
        print(f"train: {why}", flush=True)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        checkpoints.clear(CHECKPOINTS, resume)
    if distributed:
        dist.barrier()
    return identity, resume


def record_run(resume: Path | None, started: float, steps: int) -> None:
    """One line in logs/train_runs.jsonl: this run's history, which no DVC output holds (a resumed run's outputs
    equal an uninterrupted run's, so dvc.lock cannot tell them apart)."""
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    line = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - started, 1),
            "resumed_from_step": int(resume.name.split("-")[1]) if resume else None, "global_steps": steps}  # fmt: skip
    with open(RUNS, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def resolved_config(params: Params, trainer, result) -> dict:
    """What actually ran: params after recipe defaults, world size, steps and library versions.

    After a resume the loss history (restored with the trainer state, its cut window carried by CarryLogWindow)
    is the uninterrupted run's, and so is this record: where the run resumed is in logs/train_runs.jsonl.
    """
    import peft
    import torch
    import transformers
    import trl

    lora = trainer.model.peft_config["default"] if hasattr(trainer.model, "peft_config") else None
    losses = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "params": params.model_dump(mode="json", exclude={"export"}),  # export reads the merged model, after training
        "lora_target_modules": sorted(lora.target_modules) if lora else None,
        "world_size": trainer.args.world_size,
        "global_steps": result.global_step,
        "train_loss": sum(h["loss"] for h in losses) / len(losses) if losses else None,  # all logged steps
        "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in losses],
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, trl, peft)},
    }


def check_sample_lengths(params: Params, splits) -> None:
    """The tokenized samples fit models/base's positions under model.rope_scaling (preflight.check_context: a
    UserError for a longer sample, a warning when only tokenize.max_length is longer); a model that needs its Hub
    code is not checked (its config does not build without it)."""
    config = folder_config(BASE_DIR)
    if config is None:
        return
    warning = check_context(config, params.model.rope_scaling, longest_sample(splits), params.tokenize.max_length,
                            str(BASE_DIR))  # fmt: skip
    if warning:
        print(warning, flush=True)


def main() -> None:
    params = load_params()
    require(TOKENIZER, made_by="tokenize")
    require(BASE_DIR / "config.json", made_by="download")
    check_model_output(BASE_DIR, "download")
    folder_overrides(BASE_DIR, params.model.rope_scaling)  # a model it cannot scale
    import torch

    from stages.lib.train import recompute
    from stages.lib.train.auto import resolve
    from stages.lib.train.launch import take_planned_arg

    take_planned_arg(sys.argv)  # a rank on another node: the head's choice came as an argument
    params, planned = resolve(params)  # prints the plan on a GPU; `auto` becomes its choice, before any rank starts
    ds = deepspeed_config(params.train.deepspeed) if params.train.deepspeed else {}  # a broken file fails here
    zero3 = ds.get("zero_optimization", {}).get("stage") == 3
    from stages.lib.train.plan import decoder_layers

    meta = meta_model(BASE_DIR, "models/base")
    layers = len(decoder_layers(meta)) if meta is not None else None  # as the planner counts them
    recompute.check(params.train.gradient_checkpointing, zero3, gpu=torch.cuda.is_available(),
                    checkpointed=params.train.checkpoint_layers, layers=layers)
    check_reporters(params.train.report_to)
    check_kernels(params.train.attn_implementation, params.train.liger)
    chosen = params.train.lora.target_modules
    key = "train.lora.target_modules" if chosen else f"lora_targets of model recipe '{params.model.recipe}'"
    check_lora_targets(chosen or model_recipe(params.model.recipe).lora_targets, key, BASE_DIR)
    check_weights_fit(params, BASE_DIR, meta)
    check_expert_targets(params, meta)
    # a damaged file fails here: before any rank starts or checkpoint is hashed
    splits = load_saved(TOKENIZED, "tokenize")
    check_same_vocabulary(load_tokenizer(TOKENIZER, TOKENIZED, "tokenize"), BASE_DIR, params.model.trust_remote_code)
    check_sample_lengths(params, splits)
    if params.train.neftune_noise_alpha and params.train.packing:  # transformers sees one packed row per batch
        print("train: note: with train.packing, NEFTune's noise is alpha / sqrt(tokens x hidden size) over all the "
              "tokens of a packed micro-batch, not over each sample's: weaker than the same alpha unpacked", flush=True)
    from stages.lib.train.launch import relaunch_if_needed

    if relaunch_if_needed(params):
        return
    train(params, planned)


if __name__ == "__main__":
    run_stage(main)
