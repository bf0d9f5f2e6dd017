"""The `unsloth` variant of bench/throughput.py: Unsloth's QLoRA on the same model, rows and packed length.

Runs in its own process, in a variant folder laid out like the project (params.yaml, models/base, data/tokenized),
with Unsloth's wheels first on PYTHONPATH (unsloth 2026.10.9, unsloth_zoo, its TRL 1.15, datasets 4.x: it refuses
TRL > 1.15). Unsloth's own defaults: `FastLanguageModel.from_pretrained(load_in_4bit=True)` (NF4), its kernels,
`use_gradient_checkpointing="unsloth"` (checkpointed layer inputs offloaded to host memory asynchronously). What
is ours to match: the random 7B folder, the tokenized alpaca_zh rows (input_ids + assistant_masks, packed by TRL's
BFD into rows of train.packed_length), LoRA rank, alpha and targets, learning rate, optimizer and steps from
params.yaml. Prints the same `RESULT {json}` line as the other variants (bench/throughput.py's `result`).

    python bench/unsloth_variant.py --steps 8      # run by bench/throughput.py --variants unsloth
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def tokens_seen_callback():
    """Unsloth's trainer logs no `num_tokens` (TRL's count, which Telemetry reads): the Trainer's own count of
    non-padding input tokens takes its place (packed rows have no padding, so both count the same tokens)."""
    from transformers import TrainerCallback

    class TokensSeen(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "num_tokens" not in logs and state.num_input_tokens_seen:
                logs["num_tokens"] = state.num_input_tokens_seen

    return TokensSeen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--packed-length", type=int, default=8192)
    args = ap.parse_args()
    import unsloth  # noqa: F401 - first, as Unsloth asks: it patches transformers, TRL and PEFT on import
    from unsloth import FastLanguageModel

    sys.path[:0] = [str(Path(__file__).parent), str(Path.cwd())]
    import torch
    from datasets import Dataset, load_from_disk
    from throughput import result
    from trl import SFTConfig, SFTTrainer

    from stages.lib.train.telemetry import Telemetry

    TokensSeen = tokens_seen_callback()

    t = yaml.safe_load(Path("params.yaml").read_text())["train"]
    lora = t["lora"]
    model, tokenizer = FastLanguageModel.from_pretrained(model_name="models/base", max_seq_length=args.packed_length,
                                                         dtype=torch.bfloat16, load_in_4bit=True, local_files_only=True)  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["target_modules"], bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=42)  # fmt: skip
    rows = load_from_disk("data/tokenized")["train"]
    train = Dataset.from_dict({"input_ids": rows["input_ids"], "assistant_masks": rows["assistant_masks"]})
    config = SFTConfig(output_dir="out", per_device_train_batch_size=1, gradient_accumulation_steps=1,
                       max_steps=args.steps, learning_rate=t["learning_rate"], lr_scheduler_type=t["lr_scheduler"],
                       warmup_steps=0, logging_steps=1, optim="adamw_torch", bf16=True, packing=True,
                       packing_strategy="bfd", max_length=args.packed_length, seed=42, report_to="none",
                       save_strategy="no", dataset_num_proc=1,
                       include_num_input_tokens_seen="non_padding")  # fmt: skip
    telemetry = Telemetry()
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train, args=config,
                         callbacks=[TokensSeen(), telemetry])  # fmt: skip
    trainer.train()
    line = result("unsloth", telemetry, trainer.state.log_history, args.steps)
    import trl

    line |= {"versions": {"unsloth": unsloth.__version__, "trl": trl.__version__}}
    print("RESULT " + json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
