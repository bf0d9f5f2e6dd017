"""ZeRO-3 with activation checkpointing: free each layer's frozen weights as soon as its backward is done.

During a checkpoint recompute, DeepSpeed (0.19.8) parks the frozen weights it gathers on the module most recently
fetched for backward, and partitions them again when that module's backward ends. transformers 5.17 runs the
checkpoint around the decoder layer's `__call__`, so the layer's own hooks fire inside the recompute and that
module is the model's outermost one, whose backward never ends (its inputs are token ids): every layer's frozen
weights stay gathered until the whole backward is over, which is the whole model on every rank at the peak
(bench/RESULTS.md §1b, found with bench/memory_peak.py). Fetching the layer for backward as its recompute begins
makes the layer their owner, so its backward hook frees them. Where transformers runs the checkpoint inside
`forward` (5.2x), the layer's hooks never fire during a recompute and this hook never acts.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import TrainerCallback
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


class LayersOwnRecompute(TrainerCallback):
    """Installs the hooks once DeepSpeed has wrapped the model (Trainer callbacks are not handed the engine)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.hooked = 0

    def on_train_begin(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)  # only under ZeRO-3
        if offload is not None and not self.hooked:
            self.hooked = layers_own_their_recompute(self.trainer.model, offload)
            if state.is_world_process_zero:
                print(f"train: ZeRO-3 frees each of {self.hooked} layers' recomputed weights after its backward")
