"""Stage 3, train: data/tokenized + models/base → models/adapter, with DVCLive logs in dvclive/train.

TRL's SFTTrainer does the work. QLoRA: the base loads as 4-bit NF4 whose storage dtype is the compute dtype
(ZeRO-3 flattens parameters of one dtype only); the DeepSpeed config exists before the model loads, and no
device_map is passed under DeepSpeed. When params ask for several processes, this module re-launches itself through DeepSpeed's
launcher (stages/lib/train/launch.py) and every rank runs `train()`; only global rank 0 writes outputs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from stages.lib.core.errors import run_stage
from stages.lib.core.outputs import replace_path, write_json
from stages.lib.core.params import Params, load_params
from stages.lib.core.recipes import deepspeed_config, model_recipe

TOKENIZED = Path("data/tokenized")
TOKENIZER = TOKENIZED / "tokenizer"  # the training tokenizer, written by tokenize (chat template, pad token)
BASE_DIR = Path("models/base")
ADAPTER_DIR = Path("models/adapter")
LIVE_DIR = Path("dvclive/train")


def lora_config(params: Params):
    from peft import LoraConfig

    lora = params.train.lora
    targets = lora.target_modules or model_recipe(params.model.recipe).lora_targets
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )


def quantization_config(params: Params):
    import torch
    from transformers import BitsAndBytesConfig

    t = params.train
    dtype = getattr(torch, t.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=t.quant.type,
        bnb_4bit_use_double_quant=t.quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=getattr(torch, t.quant.storage_dtype or t.dtype),
    )


def sft_config(params: Params, output_dir: Path, **overrides):
    import torch
    from trl import SFTConfig

    t = params.train
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    # transformers 5.2x renamed gradient_checkpointing; the GPU image's 5.17 knows only the old name
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    ds_config = deepspeed_config(t.deepspeed) if t.deepspeed else None
    zero3 = bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage") == 3
    reentrant = zero3 if t.reentrant_checkpointing is None else t.reentrant_checkpointing
    model_kwargs = {"dtype": t.dtype, "attn_implementation": t.attn_implementation}
    if t.device_map:
        model_kwargs["device_map"] = t.device_map
    kwargs = dict(
        output_dir=str(output_dir),
        seed=params.seed,
        data_seed=params.seed,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the run
        weight_decay=t.weight_decay,
        optim=t.optimizer,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        max_length=(t.packing and t.packed_length) or params.tokenize.max_length,
        packing=t.packing,
        packing_strategy="bfd",
        bf16=t.dtype == "bfloat16",
        fp16=t.dtype == "float16",
        use_cpu=not torch.cuda.is_available(),
        model_init_kwargs=model_kwargs,
        deepspeed=ds_config,
        ddp_timeout=int(t.launch.timeout_minutes * 60),
        use_liger_kernel=t.liger,  # RMSNorm, RoPE, SwiGLU kernels; TRL keeps its own fused LM head
        logging_steps=t.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",  # DVCLive is added as a callback below, without its dump of every argument
        dataset_num_proc=None,
        **{checkpointing: t.gradient_checkpointing, f"{checkpointing}_kwargs": {"use_reentrant": reentrant}},
    ) | overrides
    return SFTConfig(**kwargs)


def dvclive_callbacks(live_dir: Path) -> list:
    try:
        from dvclive import Live
    except ImportError:  # e.g. a worker node with only the training stack
        print("train: dvclive is not installed; the loss curve is kept in train_config.json only")
        return []
    from transformers.integrations import DVCLiveCallback

    class Callback(DVCLiveCallback):
        """transformers' DVCLive logging, minus its dump of ~180 TrainingArguments: params.yaml is the record."""

        def on_log(self, args, state, control, **kwargs):
            if self.live is not None:
                self.live.step = state.global_step  # plot against optimizer steps, not the count of log calls
            super().on_log(args, state, control, **kwargs)

        def setup(self, args, state, model):
            self._initialized = True
            if state.is_world_process_zero:
                self.live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)

    return [Callback()]


def build_trainer(params: Params, output_dir: Path, callbacks: list, **overrides):
    """The stage's SFTTrainer; `overrides` go to SFTConfig (benchmarks use them to reproduce other setups)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    t = params.train
    if t.attn_implementation == "varlen":
        from stages.lib.train.varlen_attention import register

        register()
    args = sft_config(params, output_dir, **overrides)  # the DeepSpeed config is live from here on
    train_set = load_from_disk(str(TOKENIZED))["train"]
    if t.token_metrics:
        trainer_class = SFTTrainer
    else:
        from stages.lib.train.lean_trainer import LeanSFTTrainer as trainer_class
    trainer = trainer_class(
        model=str(BASE_DIR),
        args=args,
        train_dataset=train_set,
        processing_class=AutoTokenizer.from_pretrained(TOKENIZER),
        peft_config=None if t.method == "full" else lora_config(params),
        quantization_config=quantization_config(params) if t.method == "qlora" else None,
        callbacks=callbacks,
    )
    check_labels(trainer.train_dataset, train_set)
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


def train(params: Params) -> None:
    import datasets
    import torch.distributed as dist

    from stages.lib.train.launch import join_world
    from stages.lib.train.telemetry import Telemetry

    join_world(params.train.launch.timeout_minutes)
    datasets.disable_caching()  # TRL's maps would otherwise write cache files into data/tokenized, a DVC input
    partial = ADAPTER_DIR.with_name(f".{ADAPTER_DIR.name}.partial")
    live_partial = LIVE_DIR.with_name(f".{LIVE_DIR.name}.partial")
    telemetry = Telemetry()
    trainer = build_trainer(params, partial / "checkpoints", [telemetry, *dvclive_callbacks(live_partial)])
    is_main = trainer.args.process_index == 0
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(live_partial, ignore_errors=True)
    result = trainer.train()
    trainer.save_model(str(partial))  # every rank: ZeRO-3 gathers the shards, rank 0 writes
    if is_main:
        for extra in ("checkpoints", "training_args.bin", "README.md", "tokenizer.json", "tokenizer_config.json",
                      "chat_template.jinja"):  # merge takes the tokenizer from data/tokenized/tokenizer
            path = partial / extra
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        write_json(partial / "train_config.json", resolved_config(params, trainer, result) | telemetry.summary)
        print("train:", json.dumps(telemetry.summary))
        replace_path(partial, ADAPTER_DIR)
        if live_partial.exists():
            replace_path(live_partial, LIVE_DIR)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolved_config(params: Params, trainer, result) -> dict:
    """What actually ran: params after recipe defaults, world size, steps and library versions."""
    import peft
    import torch
    import transformers
    import trl

    lora = trainer.model.peft_config["default"] if hasattr(trainer.model, "peft_config") else None
    return {
        "params": params.model_dump(mode="json"),
        "lora_target_modules": sorted(lora.target_modules) if lora else None,
        "world_size": trainer.args.world_size,
        "global_steps": result.global_step,
        "train_loss": result.training_loss,
        "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, trl, peft)},
    }


def main() -> None:
    params = load_params()
    from stages.lib.train.launch import relaunch_if_needed

    if relaunch_if_needed(params):
        return
    train(params)


if __name__ == "__main__":
    run_stage(main)
