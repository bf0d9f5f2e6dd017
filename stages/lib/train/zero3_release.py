"""ZeRO-3: free gathered frozen weights as soon as their last use is over, not at the end of the backward pass.

Two places where DeepSpeed 0.19.8 keeps a full weight gathered on every rank until the whole backward is done
(found with bench/memory_peak.py; numbers in bench/RESULTS.md §1b):

1. Activation-checkpoint recompute. DeepSpeed parks the frozen weights a recompute gathers on the module most
   recently fetched for backward and frees them when that module's backward ends. transformers 5.17 runs the
   checkpoint around the decoder layer's `__call__`, so that module is the model's outermost one, whose backward
   never ends (its inputs are token ids): every layer's weights stay gathered, the whole model per rank at the
   peak. Fetching the layer for backward as its recompute begins makes the layer their owner, and its backward
   hook frees them. (Where transformers checkpoints inside `forward`, 5.2x, the hook never acts.)
2. TRL's fused LM head reads `lm_head.weight` directly and gathers it for each use itself (forward, then again in
   backward). DeepSpeed's automatic discovery of "external" parameters gathers it first, on attribute access,
   and pins it to the outermost module until the end of backward. Opting the head out of that discovery lets
   TRL's own gather-per-use work.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_layers import GradientCheckpointingLayer


def layers_own_their_recompute(model: torch.nn.Module, offload) -> int:
    """Hook every checkpointed layer of `model`; `offload` is DeepSpeed's ZeRO-3 parameter offload object."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.register_forward_pre_hook(partial(_claim_recompute, offload), prepend=True)
    return len(layers)


def _claim_recompute(offload, layer, args) -> None:
    if torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:  # forward inside a backward: recompute
        offload.pre_sub_module_backward_function(layer)


def head_gathers_per_use(head: torch.nn.Module) -> None:
    """Stop DeepSpeed from pinning `head`'s weights when code outside its forward reads them."""
    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict

    class NoDiscovery(ZeROOrderedDict):
        _in_forward = property(lambda self: False, lambda self, value: None)  # DeepSpeed sets it in every forward

    params = NoDiscovery(head)
    params.update(head._parameters)
    head._parameters = params


class Zero3EarlyRelease(TrainerCallback):
    """Installs both once DeepSpeed has wrapped the model (Trainer callbacks are not handed the engine)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.installed = False

    def on_train_begin(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)  # only under ZeRO-3
        if offload is None or self.installed:
            return
        self.installed = True
        model = self.trainer.model
        layers = layers_own_their_recompute(model, offload)  # inert without checkpointing
        head = model.get_output_embeddings()
        head_per_use = head is not None and is_deepspeed_zero3_enabled()  # TRL gathers it only when it knows ZeRO-3
        if head_per_use:
            head_gathers_per_use(head)
        if state.is_world_process_zero:
            print(f"train: ZeRO-3 frees each of {layers} layers' recomputed weights after its backward"
                  + (", and the LM head's after each use" if head_per_use else ""))
