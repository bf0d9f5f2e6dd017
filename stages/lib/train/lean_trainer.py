"""SFTTrainer without its per-step entropy and token-accuracy metrics.

TRL 1.16 computes, on every step, the entropy and top-1 hit of every answer token in its chunked LM head, and
gathers both across ranks with a host sync. `train.token_metrics: false` keeps TRL's chunked head (only answer
positions go through the LM head, logits are never materialised) but asks it for log-probabilities alone.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head


class LeanSFTTrainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_fused_lm_head(model, outputs=("log_probs",))  # the outer wrapper now serves fused_lm_head=True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.aux_loss_enabled:  # a mixture of experts: the router's load-balancing loss, as SFTTrainer adds it
            inputs = {**inputs, "output_router_logits": True}
        outputs = model(**inputs, fused_lm_head=True)
        count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer: DDP averages gradients across ranks
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            mode = "train" if model.training else "eval"
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())
        if model.training:
            mask = inputs.get("attention_mask")
            local = mask.sum() if mask is not None else torch.tensor(inputs["position_ids"].size(1))
            self._total_train_tokens += self.accelerator.gather_for_metrics(local.to(loss.device)).sum().item()
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
