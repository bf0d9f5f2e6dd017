"""`train.gradient_checkpointing`: what each setting keeps, recomputes or moves to the host, in the trainer and
in the planner.

- `false`: autograd keeps every activation of every decoder layer on the GPU; nothing is recomputed.
- `true`: each decoder layer keeps only its input; its forward runs again in the backward pass (torch's checkpoint).
- `selective`: checkpointing with torch's selective activation checkpointing policy
  (`torch.utils.checkpoint.create_selective_checkpoint_contexts`, passed as the checkpoint's `context_fn`): inside
  each layer's attention block (`self_attn`) the outputs of the q, k, v and o projections' matrix products (and LoRA's
  rank-wide A products) and of the attention kernel (output and log-sum-exp) are kept; the norms, rotary embedding,
  LoRA's B products (inner dimension at most LOW_RANK: cheap), the MLP and the 4-bit dequantisation are recomputed.
  Non-reentrant checkpointing only (SAC works through it).
- `offload`: checkpointing whose kept layer inputs live in pinned host memory, copied on a side stream while the
  GPU computes, and brought back ahead of the backward pass (TRL's `activation_offloading`, the scheme of Unsloth's
  offloaded checkpointing and torchtune). Recomputes as `true`; the GPU keeps a few layer inputs in flight. Needs
  reentrant checkpointing (non-reentrant keeps the inputs outside saved-tensor hooks) and a CUDA GPU (TRL's
  offloading needs an accelerator); refused under ZeRO-3 (not tried there).

`train.checkpoint_layers: N` (with `true` or `selective`) checkpoints only the first N decoder layers; the others keep
every activation, like `false` (Megatron's recompute_num_layers; transformers' `every_n_layers` spreads them evenly
instead, and exists only from 5.2x). The backward pass reaches the kept layers first and frees them before it
recomputes anything. `auto` picks the fewest that fit the GPU.

The planner's side (`saved_activations`, `SPEED`) estimates each setting's GPU and host bytes from the same per-layer
counts as plan.py; its speed factors are measured on an H100 (bench/RESULTS.md §7: 7B, 8,192-token rows).
"""

from __future__ import annotations

from ..core.errors import UserError

MODES = (False, True, "selective", "offload")
# tokens/s against `true` on the 7B, 8,192-token rows, without Liger (false: 12,705 vs 9,512, RESULTS §2; selective
# and offload: §7, H100). With Liger false is 1.27 (§8); checkpoint_layers combines these per layer (speed()), which
# §8 measured at 1.03x for 5 of 28 layers whole, within the spread between runs.
SPEED = {False: 1.35, True: 1.0, "selective": 1.04, "offload": 0.55}  # measured: bench/RESULTS.md §7 (H100)
OFFLOAD_IN_FLIGHT = 5  # layer inputs TRL's offloading keeps on the GPU until their copy ends (max_fwd_stash_size)
HOST_SHARE = 0.5  # of the host's RAM that pinned activations may take (TRL warns above 60 % in use)
LOW_RANK = 256  # a matrix product with at most this inner dimension (LoRA's B) is recomputed by `selective`


def label(mode, checkpointed: int | None = None) -> str:
    """How the plan table names a setting; `checkpointed`: train.checkpoint_layers (None: every layer)."""
    name = {False: "no checkpointing", True: "checkpointing", "selective": "selective checkpointing",
            "offload": "offloaded checkpointing"}[mode]  # fmt: skip
    if checkpointed is None:
        return name
    return f"{name} of the first {checkpointed} layers" if checkpointed > 1 else f"{name} of the first layer"


def partial(mode, layers: int, checkpointed: int | None) -> bool:
    """Whether `checkpointed` of `layers` decoder layers leaves some layers whole under `mode`."""
    return mode in (True, "selective") and checkpointed is not None and checkpointed < layers


def speed(mode, layers: int, checkpointed: int | None = None) -> float:
    """Tokens/s against `true` of `mode` with `checkpointed` of `layers` layers checkpointed (None: all): each
    layer's time is its setting's, so the speeds combine harmonically."""
    if not partial(mode, layers, checkpointed):
        return SPEED[mode]
    share = checkpointed / layers
    return 1 / (share / SPEED[mode] + (1 - share) / SPEED[False])


def saved_activations(mode, layers: int, per_layer: float, layer_input: float, attention_kept: float,
                      checkpointed: int | None = None) -> tuple[float, float]:
    """(GPU bytes, pinned host bytes) of what the forward pass keeps for the backward pass, over `layers` decoder
    layers: `per_layer` bytes of a layer's activations, `layer_input` bytes of its input (hidden size x tokens),
    `attention_kept` bytes of what `selective` keeps in its attention block; all for one micro-batch.
    `checkpointed`: train.checkpoint_layers (None: every layer); the rest keep `per_layer`."""
    if mode is False:
        return layers * per_layer, 0.0
    if mode == "offload":
        return min(layers, OFFLOAD_IN_FLIGHT) * layer_input, layers * layer_input
    kept = layer_input + (attention_kept if mode == "selective" else 0.0)
    recomputed = min(layers, checkpointed) if checkpointed is not None else layers
    return recomputed * kept + (layers - recomputed) * per_layer, 0.0


def attention_kept_bytes(hidden: int, kv: int, heads: int, lora_ranks: int, dtype_bytes: int) -> int:
    """Bytes per token and layer that `selective` keeps: the q, k, v and o projections' outputs (hidden + 2 kv +
    hidden values), the attention kernel's output (hidden) and float32 log-sum-exp (one per head), and LoRA's A
    outputs inside the attention block (`lora_ranks`: r per targeted projection)."""
    return dtype_bytes * (3 * hidden + 2 * kv + lora_ranks) + 4 * heads


def check_layers(checkpointed: int | None, layers: int | None) -> None:
    """UserError for train.checkpoint_layers (`checkpointed`) above the model's `layers` decoder layers."""
    if checkpointed is not None and layers is not None and checkpointed > layers:
        raise UserError(f"train.checkpoint_layers {checkpointed} is more than the model's {layers} decoder layers: "
                        f"use {layers} or null (every layer)")  # fmt: skip


def check(mode, zero3: bool, gpu: bool, checkpointed: int | None = None, layers: int | None = None) -> None:
    """UserError, before anything loads, for a setting that cannot run here: offload on a CPU or under ZeRO-3;
    selective under ZeRO-3 (TRL makes PEFT checkpoint reentrantly there); train.checkpoint_layers (`checkpointed`)
    above the model's `layers` decoder layers (None: not known). The schema refuses the reentrant settings each
    cannot take, and checkpoint_layers with false or offload."""
    check_layers(checkpointed, layers)
    key = f"train.gradient_checkpointing '{mode}'"
    if mode == "offload":
        if not gpu:
            raise UserError(f"{key} needs a CUDA GPU (TRL's activation offloading copies to the host from one): use true")
        if zero3:
            raise UserError(f"{key} is not available under ZeRO-3 (untried there): use true, or train.deepspeed: "
                            "zero3-offload to move weights and optimizer states to the host")  # fmt: skip
    if mode == "selective" and zero3:
        raise UserError(f"{key} is not available under ZeRO-3: TRL makes PEFT checkpoint reentrantly there and "
                        "selective checkpointing needs non-reentrant: use true")  # fmt: skip


def sft_fields(mode, reentrant: bool) -> dict:
    """SFTConfig fields for `mode` (resolved, not auto): whether to checkpoint, use_reentrant, TRL's offloading.
    `reentrant`: the stage's default for true (ZeRO-3 or train.reentrant_checkpointing)."""
    checkpoint = mode is not False
    use_reentrant = {"selective": False, "offload": True}.get(mode, reentrant)
    return {"checkpointing": checkpoint, "use_reentrant": use_reentrant, "activation_offloading": mode == "offload"}


class AttentionScope:
    """Marks the forward (and its recomputation) of every decoder layer's attention block, for the policy."""

    def __init__(self):
        self.depth = 0
        self.kept = 0  # op outputs kept by the selective policy so far (forward passes only)

    def attach(self, model) -> int:
        """Hook every `self_attn` module of `model`; returns how many were found."""
        blocks = [m for name, m in model.named_modules() if name.endswith("self_attn")]
        for block in blocks:
            block.register_forward_pre_hook(self._enter)
            block.register_forward_hook(self._leave, always_call=True)
        return len(blocks)

    def _enter(self, *_):
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1


def keeps(op, args: tuple, inside_attention: bool) -> bool:
    """The selective policy: True for an op whose outputs are kept (an attention kernel anywhere, or a matrix
    product inside an attention block with an inner dimension above LOW_RANK, or bitsandbytes' 4-bit product there),
    False for one recomputed."""
    import torch

    name = str(op)
    if ("attention" in name or "flash_attn" in name or "varlen_attn" in name) and "backward" not in name:
        return True
    if not inside_attention:
        return False
    if "gemm_4bit" in name:  # bitsandbytes' fused 4-bit product (its CPU path): always a base projection
        return True
    product = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
    return product and args[-2].shape[-1] > LOW_RANK  # mm(a, b), addmm(c, a, b), bmm(a, b): a's inner dimension


def enable_selective(model) -> AttentionScope:
    """Make `model`'s checkpointing selective: every decoder layer checkpoints non-reentrantly with the policy's
    `context_fn` (through after_enable). Returns the scope, whose `kept` counts the outputs kept. UserError for a
    model without `self_attn` blocks (the policy would keep nothing)."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    scope = AttentionScope()
    if not scope.attach(model):
        raise UserError("train.gradient_checkpointing 'selective' found no self_attn blocks in this model: use true")

    def policy(ctx, op, *args, **kwargs):
        if not keeps(op, args, scope.depth > 0):
            return CheckpointPolicy.PREFER_RECOMPUTE
        scope.kept += not ctx.is_recompute
        return CheckpointPolicy.MUST_SAVE

    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    after_enable(model, {"use_reentrant": False, "context_fn": context_fn})
    return scope


def checkpoint_first(model, checkpointed: int) -> list:
    """Checkpoint only the first `checkpointed` decoder layers of `model` (transformers' GradientCheckpointingLayer
    modules, in order) whenever the Trainer turns checkpointing on; the rest keep their activations. Returns the
    decoder layers. UserError for a model whose layers are not GradientCheckpointingLayer (its own checkpointing
    code: ChatGLM2 through its Hub code, for one)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise UserError("train.checkpoint_layers needs decoder layers built on transformers' GradientCheckpointingLayer; "
                        "this model checkpoints in its own code: use null")  # fmt: skip

    def first_only():
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = layer.gradient_checkpointing and index < checkpointed

    after_enable(model, None, first_only)
    return layers


def after_enable(model, kwargs: dict | None, then=None) -> None:
    """Wrap the methods the Trainer calls to turn checkpointing on (`activation_checkpointing_enable` in
    transformers >= 5.2x, `gradient_checkpointing_enable` before; TRL also calls them while it prepares a 4-bit
    model): `kwargs` join the checkpoint function's keyword arguments, `then()` runs after each call. Wrappers
    compose (selective checkpointing of the first N layers)."""
    for method, key in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                        ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):  # fmt: skip
        original = getattr(model, method, None)
        if original is None:
            continue

        def enable(*args, _original=original, _key=key, **call_kwargs):
            if kwargs:
                call_kwargs[_key] = dict(call_kwargs.get(_key) or {}) | kwargs
            done = _original(*args, **call_kwargs)
            if then is not None:
                then()
            return done

        setattr(model, method, enable)
