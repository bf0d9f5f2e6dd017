"""ZeRO-3 training steps on the CPU; prints which frozen weights are still gathered as each layer's backward ends.

Run by tests/test_zero3_release.py in its own process (DeepSpeed sets up a process group):
    python tests/zero3_release_probe.py around_call|inside_forward fix|nofix [offload]
`around_call` runs the reentrant checkpoint around each decoder layer's __call__, as transformers 5.17 does;
`inside_forward` leaves checkpointing to the installed transformers. The loss goes through TRL's fused LM head,
as in the train stage. `fix` installs stages/lib/train/zero3_release.py; `offload` puts parameters and optimizer
states in CPU memory, as the seed's recipe does. Output: one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
os.environ.setdefault("MASTER_PORT", "29671")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from peft import LoraConfig, get_peft_model
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from trl.trainer.utils import add_fused_lm_head

from stages.lib.train.zero3_release import head_gathers_per_use, layers_own_their_recompute

LAYERS = 4


def checkpoint_around_call(layer: torch.nn.Module) -> None:
    """transformers 5.17's placement: the checkpoint wraps the layer's __call__, so its hooks run inside it."""

    def call(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return checkpoint(partial(torch.nn.Module.__call__, self, **kwargs), *args, use_reentrant=True)
        return torch.nn.Module.__call__(self, *args, **kwargs)

    layer.__class__ = type(f"AroundCall{type(layer).__name__}", (type(layer),), {"__call__": call})


def frozen_gathered(layers) -> list[int]:
    return [sum(p.ds_numel for p in layer.parameters() if not p.requires_grad and p.ds_status == ZeroParamStatus.AVAILABLE)
            for layer in layers]  # fmt: skip


def main(placement: str, fix: bool, offload: bool) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}}  # fmt: skip
    if offload:
        ds_config["zero_optimization"] |= {"offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}
        ds_config["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW instead of DeepSpeed's compiled CPU Adam
    zero3_known = HfDeepSpeedConfig(ds_config)  # noqa: F841 -- tells transformers and TRL that ZeRO-3 is on, as Trainer does
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        base = LlamaForCausalLM(config)
    if placement == "around_call":
        for layer in base.model.layers:
            checkpoint_around_call(layer)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    add_fused_lm_head(base)
    base.enable_input_require_grads()  # the frozen embedding's output must carry grad into the checkpoints
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-3), config=ds_config)
    if fix:
        layers_own_their_recompute(model, engine.optimizer.parameter_offload)
        head_gathers_per_use(base.lm_head)

    layers = base.model.layers
    seen: dict[int, list[int]] = {}

    def probe(layer, args, kwargs, index):
        hidden = args[0] if args else kwargs["hidden_states"]
        if torch.is_grad_enabled() and hidden.requires_grad:  # the pass whose graph the backward runs through

            def record(grad):
                seen[index] = [*frozen_gathered(layers), base.lm_head.weight.ds_status == ZeroParamStatus.AVAILABLE]

            hidden.register_hook(record)

    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(partial(probe, index=index), with_kwargs=True, prepend=True)
    engine.train()
    losses = []
    for _ in range(2):  # the second step runs on DeepSpeed's recorded module trace
        seen.clear()
        ids = torch.randint(0, 128, (1, 32))
        loss = engine(input_ids=ids, labels=ids, fused_lm_head=True).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    after_step = frozen_gathered(layers)
    print(json.dumps({"after_layer_backward": {str(k): v for k, v in sorted(seen.items())}, "after_step": after_step,
                      "losses": losses}))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "fix", sys.argv[3:] == ["offload"])
