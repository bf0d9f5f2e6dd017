"""Plan before training: predicted peak GPU memory and relative speed of each setting, from config.json alone.

A candidate is a DeepSpeed setting (none, zero2, zero3, zero3-offload) with one of the checkpointing settings (off,
on, selective, offloaded: stages/lib/train/recompute.py), at the params' tokens per micro-batch. Its predicted peak per GPU is the sum of

- weights: the loaded base's exact bytes (fit.weight_bytes), split over the GPUs by ZeRO-3, on the CPU with offload;
- adapter: the trainable parameters (LoRA, or all of them for `method: full`) in float32 with their gradients and
  two Adam moments, the last three split by ZeRO (any stage) and moved to the CPU by optimizer offload;
- activations: the bytes autograd keeps per token and decoder layer, counted from the layer's widths and scaled by
  ACTIVATION_SCALE (less with Liger: LIGER_SAVED_INTERMEDIATE); every layer's without checkpointing, each layer's
  input plus one recomputed layer with it (with train.checkpoint_layers: the whole layers instead of that one)
  (selective: plus its attention block's kept products; offloaded: a few inputs in flight, the rest in pinned host
  memory, which must fit HOST_SHARE of the host's RAM), plus BACKWARD_LAYERS layers of working memory in the backward
  pass;
- loss: TRL's chunked LM head (one 4,096 x 32,768 logits tile, the hidden states it reads and their fp32 gradient);
- ZeRO-3 gathers: the larger of two decoder layers (the one in use and the one prefetched) or, at the loss, the
  16-bit input and output embeddings.

The two scale constants were fitted on the 7B measurements with and without checkpointing (bench/RESULTS.md §5,
H200); with them every measured configuration there is predicted within 15 %. Speed is relative: tokens/s per GPU
of each setting against one GPU without DeepSpeed, measured on the same 7B (EFFICIENCY), times the GPUs used.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..core.params import Params
from .experts_4bit import expert_stacks, lora_target_parameters, moe_shape
from .fit import GIB, size, weight_bytes
from .recompute import HOST_SHARE, MODES, attention_kept_bytes, check_layers, label, partial, saved_activations
from .recompute import speed as recompute_speed

# Fitted: 7B QLoRA, 8,192-token rows, H200: 44.18 GiB without checkpointing, 9.09 with (bench/RESULTS.md §2, §1c)
ACTIVATION_SCALE = 0.78  # share of the counted per-layer tensors autograd really keeps (some are views or freed)
# Fitted: the same 7B with Liger (LoRA on q/k/v/o), H200, no checkpointing: 32.75 GiB against 44.18 (bench/RESULTS.md
# §8): Liger's RMSNorm and SwiGLU keep ~1.2 intermediate-width values per token and layer fewer. Not where the MLP's
# down projection has LoRA (its input, SwiGLU's product, is kept then: §5's all-7 run saved 4 %).
LIGER_SAVED_INTERMEDIATE = 1.2
BACKWARD_LAYERS = 0.34  # layers' worth of activation gradients alive at once in the backward pass
TILE_TOKENS, TILE_VOCAB = 4096, 32768  # TRL 1.16's chunked log-prob: tokens x vocab per logits tile
# Fitted: 8 layers of Qwen3-30B-A3B, 8,192-token rows, H100 (bench/RESULTS.md §MoE): expert LoRA's peak lay 0.74 GiB
# above attention-only LoRA's besides its optimizer states, 0.66 of one layer's 16-bit experts (1.125 GiB)
EXPERT_LORA_LAYERS = 1.66
HEADROOM = 0.9  # of a GPU's memory: allocator fragmentation and the CUDA context need the rest
# tokens/s per GPU against one GPU without DeepSpeed, 7B QLoRA, 8,192-token rows, 2 x H200 (bench/RESULTS.md §1c, §1d)
# (zero3 recipes with leaf modules, session 10: 16,832 and 12,828 tokens/s on 2 GPUs against 10,478 on one)
EFFICIENCY = {"none": 1.0, "zero2": 0.88, "zero3": 0.80, "zero3-offload": 0.61}
ZERO3_ONE_GPU = 0.90  # ZeRO-3 on a single GPU: 9,407 tokens/s
CANDIDATES = ("none", "zero2", "zero3", "zero3-offload")


@dataclass(frozen=True)
class Setting:
    """One candidate. `deepspeed`: a recipe name or a JSON path, "none" for no DeepSpeed; `gpus`: processes."""

    deepspeed: str
    checkpointing: bool | str  # one of recompute.MODES
    gpus: int
    checkpoint_layers: int | None = None  # train.checkpoint_layers: the first N layers checkpoint; None: all

    @property
    def label(self) -> str:
        return f"{self.deepspeed}, {label(self.checkpointing, self.checkpoint_layers)}"


@dataclass
class Estimate:
    """Predicted GiB per GPU of one setting, by part; `speed`: tokens/s relative to one GPU without DeepSpeed."""

    setting: Setting
    weights: float
    adapter: float
    activations: float
    loss: float
    gathers: float
    load_peak: float
    speed: float
    traffic: float = 0.0  # GiB each GPU sends and receives per micro-batch (ZeRO gathers and gradient reductions)
    host: float = 0.0  # GiB of pinned host memory per GPU (offloaded checkpointing's layer inputs)
    fits: bool = False

    @property
    def train_peak(self) -> float:
        return self.weights + self.adapter + self.activations + self.loss + self.gathers


@dataclass
class Plan:
    """Every candidate's estimate, the chosen one (None when nothing fits) and why, for `gpus` x `nodes` GPUs of
    `capacity_gib` each (None: no GPU; nothing is predicted)."""

    rows: list[Estimate]
    chosen: Estimate | None
    reason: str
    capacity_gib: float | None
    gpus_per_node: int
    nodes: int
    tokens_per_gpu: int
    advice: list[str] = field(default_factory=list)
    samples: str = ""  # the longest sample against the model's positions (samples_line)
    moe: str = ""  # a mixture of experts' total and active parameters (moe_line)


@dataclass(frozen=True)
class Shape:
    """What the estimate reads from the meta-device model: widths, the decoder layers and the embeddings."""

    layers: int
    hidden: int
    intermediate: int
    kv: int  # key (= value) width: KV heads x head size
    vocab: int
    layer: object  # one decoder layer (a meta module)
    embeddings: list  # input and output embedding weights (one if tied)
    experts: int = 0  # a mixture of experts: experts per layer (0: dense)
    active: int = 0  # experts each token goes through
    heads: int = 0  # attention (query) heads


def shape(model) -> Shape:
    """Widths of a meta-device causal LM built by transformers (any architecture with `num_hidden_layers`
    decoder layers in a ModuleList)."""
    config = model.config.get_text_config()
    layers = decoder_layers(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    embeddings = {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or 4 * config.hidden_size)  # GPT-2 style configs: n_inner, null for 4 x hidden
    moe = moe_shape(model)
    layer = max(layers, key=lambda m: sum(p.numel() for p in m.parameters()))  # an MoE layer, if some are dense
    experts = active = 0
    if moe:  # the active path: each token's experts, plus any shared expert (a plain MLP beside them)
        experts, active, inter = moe
        shared = sum(m.in_features for n, m in layer.named_modules()
                     if "shared" in n and n.endswith("down_proj") and hasattr(m, "in_features"))  # fmt: skip
        intermediate = active * inter + shared
    return Shape(len(layers), config.hidden_size, intermediate, kv, model.get_output_embeddings().weight.shape[0],
                 layer, list(embeddings.values()), experts, active, heads)  # fmt: skip


def parameter_counts(model) -> tuple[int, int]:
    """(total, active per token) parameters of a meta-device model; equal for a dense model. Active counts each
    layer's `active` of its `experts` expert weights."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    moe = moe_shape(model)
    if not moe:
        return total, total
    experts, active, _ = moe
    stacked = sum(p.numel() for p in expert_stacks(model))
    return total, total - stacked + stacked * active // experts


def moe_line(model) -> str:
    """One line for the plan: a mixture of experts' total and active parameters ("" for a dense model)."""
    moe = moe_shape(model)
    if not moe:
        return ""
    total, active = parameter_counts(model)
    count = lambda n: f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"  # noqa: E731
    return (f"mixture of experts: {moe[0]} experts per layer, {moe[1]} active per token; {count(total)} parameters, "
            f"{count(active)} active; QLoRA keeps the experts in 4 bits and dequantizes one layer's at a time")


def deepspeed_kind(name: str) -> tuple[int, bool, bool, float]:
    """(ZeRO stage, parameters offloaded, optimizer offloaded, stage3_module_granularity_threshold) of a DeepSpeed
    setting; all zero / False for none."""
    if name == "none":
        return 0, False, False, 0.0
    from ..core.recipes import deepspeed_config

    if name.endswith(".json") and Path(name).is_file():  # any file (a benchmark's probe); the stage takes recipes only
        config = json.loads(Path(name).read_text(encoding="utf-8"))
    else:
        config = deepspeed_config(name)
    zero = config.get("zero_optimization", {})
    offloaded = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
    threshold = float(zero.get("stage3_module_granularity_threshold") or 0)
    return int(zero.get("stage", 0)), offloaded("offload_param"), offloaded("offload_optimizer"), threshold


def leaf_modules_apply(threshold: float, model) -> bool:
    """Whether the train stage keeps ZeRO-3's `stage3_module_granularity_threshold` for `model` (meta device): only
    when every decoder layer is larger, so that no whole layer becomes a leaf module (measured: a 7B, whose
    233M-parameter layers keep their attention block and MLP projections as leaves, trains 1.61x one GPU; a 1.5B,
    whose 47M-parameter layers would be leaves whole, failed in DeepSpeed). Otherwise DeepSpeed gathers per
    parameter, as without the threshold."""
    if not threshold:
        return False
    return min(sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)) > threshold


def decoder_layers(model):
    """The model's decoder layers: its longest ModuleList."""
    import torch

    return max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)


def trainable_params(model, params: Params, targets: list[str] | str) -> int:
    """Parameters the optimizer updates: every one for `method: full`, else LoRA's r x (in + out) per targeted
    linear layer (PEFT matches a target by the module name's last parts; "all-linear" takes every linear layer
    but the output head)."""
    import torch

    if params.train.method == "full":
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    r = params.train.lora.r
    head = model.get_output_embeddings()
    total = 0
    for name in lora_target_parameters(model, params.train.lora.target_parameters):  # [experts, out, in] stacks
        stack = model.get_parameter(name)
        total += r * stack.shape[0] * (stack.shape[1] + stack.shape[2])
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == "all-linear" or any(name == t or name.endswith(f".{t}") for t in targets):
            total += r * (module.in_features + module.out_features)
    return total


def optimizer_bytes(trainable: int, full: bool, dtype_bytes: int, stage: int, gpus: int, offload: bool) -> float:
    """Bytes per GPU for training `trainable` parameters besides the weights themselves: LoRA's float32 copy,
    gradients and two Adam moments (PEFT keeps adapters in float32); for full fine-tuning the weights are counted
    already, and DeepSpeed adds a float32 master copy to the moments. ZeRO splits the optimizer states (stage 1+)
    and the gradients (stage 2+) over the GPUs; optimizer offload moves the states to the CPU."""
    param = 0 if full else 4
    grad = dtype_bytes if full else 4
    states = (12 if stage else 2 * dtype_bytes) if full else 8  # DeepSpeed: fp32 master + moments
    split = gpus if stage else 1
    return trainable * (param + grad / (split if stage >= 2 else 1) + (0 if offload else states / split))


def tokens_per_gpu(params: Params) -> int:
    """Tokens in one micro-batch: batch_size packed rows, or batch_size samples padded up to max_length."""
    t = params.train
    row = (t.packed_length or params.tokenize.max_length) if t.packing else params.tokenize.max_length
    return t.batch_size * row


def layer_activation_bytes(s: Shape, dtype_bytes: int, dropout_inputs: int) -> float:
    """Bytes autograd keeps per token in one decoder layer: queries, keys and values before and after rotary
    embedding, the attention output, the two norms' float32 inputs and outputs, the MLP's four intermediate
    tensors, and LoRA dropout's copies of its inputs (`dropout_inputs` values), scaled by ACTIVATION_SCALE."""
    d = dtype_bytes
    counted = d * (6 * s.hidden + 4 * s.kv + 4 * s.intermediate) + 8 * s.hidden + (d + 1) * dropout_inputs
    if s.experts:  # routing: float32 router probabilities, each token's hidden state gathered and weighted per expert
        counted += 8 * s.experts + 2 * d * s.active * s.hidden
    return ACTIVATION_SCALE * counted


def mlp_down_targeted(s: Shape, targets: list[str] | str, method: str) -> bool:
    """Whether the MLP's down projection trains (LoRA on it, or full fine-tuning): its input is kept then."""
    if method == "full" or targets == "all-linear":
        return True
    return any(name.endswith("down_proj") and name.split(".")[-1] in targets for name, _ in s.layer.named_modules())


def dequantized_experts(model, s: Shape, params: Params, dtype_bytes: int) -> float:
    """Bytes of one layer's experts in 16 bits while it runs (experts_4bit dequantizes a layer's stacks for its
    forward, and again for its backward); with expert LoRA also the delta B·A and the sum, and their gradients,
    EXPERT_LORA_LAYERS layers' worth in all. 0 for a dense model or 16-bit experts."""
    if not s.experts or params.train.method != "qlora":
        return 0.0
    layer_stacks = sum(p.numel() for n, p in s.layer.named_parameters() if p.dim() == 3)
    lora = bool(params.train.lora.target_parameters)
    return layer_stacks * dtype_bytes * (EXPERT_LORA_LAYERS if lora else 1)


def estimate(model, params: Params, setting: Setting, targets: list[str] | str, tokens: int | None = None) -> Estimate:
    """Predicted peak GiB per GPU of `setting` for the meta-device `model`, at `tokens` per micro-batch (default:
    the params'). Raises ParamsError for a DeepSpeed name that is not a recipe or JSON file."""
    import torch

    t = params.train
    s = shape(model)
    d = torch.finfo(getattr(torch, t.dtype)).bits // 8
    tokens = tokens or tokens_per_gpu(params)
    stage, param_offload, optimizer_offload, threshold = deepspeed_kind(setting.deepspeed)
    zero3 = stage == 3
    four_bit = t.method == "qlora"
    whole = weight_bytes(model, four_bit, d, t.quant.double_quant)
    resident = 0 if param_offload else whole.per_gpu(setting.gpus, zero3)
    layer = weight_bytes(model, four_bit, d, t.quant.double_quant, part=s.layer)
    layer_bytes = layer.sharded + layer.whole
    leaves = leaf_modules_apply(threshold, model)

    trainable = trainable_params(model, params, targets)
    adapter = optimizer_bytes(trainable, t.method == "full", d, stage, setting.gpus, optimizer_offload)

    dropout_inputs = 0
    if t.lora.dropout > 0 and t.method != "full":
        dropout_inputs = sum(m.in_features for n, m in s.layer.named_modules()
                             if isinstance(m, torch.nn.Linear) and (targets == "all-linear" or n.split(".")[-1] in targets))  # fmt: skip
    per_layer = layer_activation_bytes(s, d, dropout_inputs) * tokens
    if t.liger and not mlp_down_targeted(s, targets, t.method):
        per_layer -= LIGER_SAVED_INTERMEDIATE * d * s.intermediate * tokens
    # the backward pass's working memory, plus one recomputed layer under checkpointing; with some layers whole
    # (checkpoint_layers) the backward frees them before it recomputes, so the peak is at the forward's end instead
    whole_layers = partial(setting.checkpointing, s.layers, setting.checkpoint_layers)
    recomputes = setting.checkpointing is not False and not whole_layers
    working = (1 + BACKWARD_LAYERS if recomputes else BACKWARD_LAYERS) * per_layer
    working += dequantized_experts(model, s, params, d)
    kept = attention_kept_bytes(s.hidden, s.kv, s.heads, attention_lora_ranks(s, params, targets), d) * tokens
    saved, host = saved_activations(setting.checkpointing, s.layers, per_layer, s.hidden * d * tokens, kept,
                                    setting.checkpoint_layers)  # fmt: skip
    activations = saved + working
    loss = min(tokens, TILE_TOKENS) * min(s.vocab, TILE_VOCAB) * d + tokens * s.hidden * (2 * d + 8)
    gathers = 0.0
    if zero3:  # at the peak: two gathered layers in the backward pass, or the 16-bit embeddings at the loss
        embeddings = sum(w.numel() for w in s.embeddings) * d
        if not param_offload:  # fitted to the 14B runs: less the rank's own shard, resident already
            embeddings *= 1 - 1 / setting.gpus
        head_bytes = model.get_output_embeddings().weight.numel() * d
        # measured (7B): with leaf modules the 16-bit head stays gathered at the layer peak too on 2 GPUs (+1.03
        # GiB, also with offload), not on 1
        gathers = max(2 * layer_bytes + head_bytes * (leaves and setting.gpus > 1), embeddings - working)
    largest = max(p.numel() for p in model.parameters()) * d  # the one tensor being read or quantized
    head = model.get_output_embeddings()
    largest_quantized = max([m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
                            + [p.numel() for p in expert_stacks(model)], default=0) * d  # fmt: skip
    if param_offload:
        load = 2 * largest_quantized if four_bit else largest
    else:
        load = resident + (largest_quantized if four_bit else largest)
    speed = EFFICIENCY.get(setting.deepspeed, EFFICIENCY["zero3"] if zero3 else EFFICIENCY["zero2"])
    if zero3 and setting.gpus == 1:
        speed = ZERO3_ONE_GPU * (speed / EFFICIENCY["zero3"])
    speed *= setting.gpus * recompute_speed(setting.checkpointing, s.layers, setting.checkpoint_layers)
    traffic = 0.0
    if stage and setting.gpus > 1:  # gradients of the trainable parameters are reduced; ZeRO-3 also gathers weights
        traffic = 2 * trainable * d + (whole.sharded * (2 if setting.checkpointing is False else 3) if zero3 else 0)
    return Estimate(setting, resident / GIB, adapter / GIB, activations / GIB, loss / GIB, gathers / GIB,
                    load / GIB, speed, traffic / GIB, host / GIB)  # fmt: skip


def attention_lora_ranks(s: Shape, params: Params, targets: list[str] | str) -> int:
    """LoRA's rank summed over the targeted projections of one decoder layer's attention block (their A outputs
    are what `selective` keeps besides the base products); 0 for full fine-tuning."""
    import torch

    if params.train.method == "full":
        return 0
    return params.train.lora.r * sum(1 for n, m in s.layer.named_modules() if isinstance(m, torch.nn.Linear)
                                     and "self_attn" in n and (targets == "all-linear" or n.split(".")[-1] in targets))


def candidates(gpus: int, nodes: int, params: Params | None = None, single_process: bool = True) -> list[Setting]:
    """Every DeepSpeed recipe over all `gpus` x `nodes` GPUs, each with every checkpointing setting it takes (none
    under ZeRO-3 but on and off); no DeepSpeed only for a single GPU (without DeepSpeed the stage runs one process,
    and refuses several visible GPUs). With `params`, a key that is not `auto` (train.deepspeed,
    train.gradient_checkpointing) keeps its value. `single_process` False: no DeepSpeed is no candidate (the stage
    refuses it where several GPUs are visible)."""
    world = gpus * nodes
    kinds = ("none", "zero3", "zero3-offload") if world == 1 else CANDIDATES[1:]  # zero2 on one GPU: no gain
    kinds = kinds if single_process else tuple(k for k in kinds if k != "none")
    modes = MODES
    if params is not None and params.train.deepspeed != "auto":
        kinds = (params.train.deepspeed or "none",)
    if params is not None and params.train.gradient_checkpointing != "auto":
        modes = (params.train.gradient_checkpointing,)  # kept, even where recompute.check will refuse it
    zero3_modes = modes if len(modes) == 1 else (False, True)  # recompute.check refuses the others under ZeRO-3
    layers = params.train.checkpoint_layers if params is not None else None
    return [Setting(ds, c, 1 if ds == "none" else world, layers if c in (True, "selective") else None) for ds in kinds
            for c in (zero3_modes if deepspeed_kind(ds)[0] == 3 else modes)]  # fmt: skip


def fewest(fits, low: int, high: int) -> int:
    """The smallest n in (low, high] with fits(n), by bisection; fits(high) holds, fits is monotone in n and
    fits(low) is taken not to."""
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def partial_rows(model, params: Params, rows: list, targets, tokens: int, budget: float) -> list:
    """For `gradient_checkpointing: auto` with train.checkpoint_layers null: each row that checkpoints every layer
    (true, selective; not under ZeRO-3) again with the fewest checkpointed layers that fit `budget` GiB, when
    that is fewer than all (the first N layers recompute, the rest keep their activations)."""
    t = params.train
    if t.gradient_checkpointing != "auto" or t.checkpoint_layers is not None:
        return []
    layers = shape(model).layers
    extra = []
    for row in rows:
        c = row.setting
        if c.checkpointing not in (True, "selective") or c.checkpoint_layers is not None:
            continue
        if deepspeed_kind(c.deepspeed)[0] == 3:
            continue

        def fits(n: int, c=c) -> bool:
            r = estimate(model, params, replace(c, checkpoint_layers=n), targets, tokens)
            return max(r.train_peak, r.load_peak) <= budget

        if not fits(layers) or fits(0):  # nothing fits, or no checkpointing fits (a row of its own)
            continue
        high = fewest(fits, 0, layers)
        if high < layers:
            extra.append(estimate(model, params, replace(c, checkpoint_layers=high), targets, tokens))
    return extra


def samples_line(config, params: Params, where: str) -> str:
    """One line: tokenize.max_length against the positions one sample may span in the model of `where` (its
    transformers `config`) under model.rope_scaling (factor x the original context), with what to change when it is
    longer. UserError for a model.rope_scaling the model cannot take (rope.rope_overrides)."""
    from ..core.rope import context_fix, context_positions, original_context, scaled

    length, scaling = params.tokenize.max_length, params.model.rope_scaling
    context = context_positions(scaled(config, scaling, where))
    if context is None:
        return f"samples: up to {length} tokens (tokenize.max_length); the model's config names no context length"
    how = f" ({scaling.type} RoPE scaling: {scaling.factor:g} x {original_context(config)})" if scaling else ""
    line = f"samples: up to {length} tokens (tokenize.max_length) of the model's {context} positions{how}"
    return line if length <= context else f"{line}; too long: {context_fix(config, scaling, length)}"


def make_plan(model, params: Params, targets: list[str] | str, gpus: int, nodes: int,
              capacity_gib: float | None, single_process: bool = True, where: str = "models/base",
              host_gib: float | None = None) -> Plan:
    """Estimate every candidate and pick the fastest that fits in HEADROOM x `capacity_gib` of GPU memory and, for
    offloaded checkpointing, HOST_SHARE x `host_gib` of host RAM per GPU (None: not checked); with nothing that
    fits, `advice` lists the cheapest changes that would (shorter rows, offload, more GPUs). `samples` compares
    tokenize.max_length with the positions of the model (of `where`) under model.rope_scaling."""
    plan = _plan(model, params, targets, gpus, nodes, capacity_gib, single_process, host_gib)
    plan.samples = samples_line(model.config, params, where)
    plan.moe = moe_line(model)
    return plan


def _plan(model, params: Params, targets: list[str] | str, gpus: int, nodes: int,
          capacity_gib: float | None, single_process: bool, host_gib: float | None = None) -> Plan:
    tokens = tokens_per_gpu(params)
    check_layers(params.train.checkpoint_layers, shape(model).layers)
    auto = "auto" in (params.train.deepspeed, params.train.gradient_checkpointing)
    settings = candidates(gpus, nodes, params if auto else None, single_process)
    rows = [estimate(model, params, s, targets, tokens) for s in settings]
    if capacity_gib is None:
        return Plan(rows, None, "no GPU here: nothing to fit (give --gpu-memory-gib to plan for one)", None, gpus,
                    nodes, tokens)  # fmt: skip
    budget = HEADROOM * capacity_gib
    rows += partial_rows(model, params, rows, targets, tokens, budget)
    for row in rows:
        row.fits = max(row.train_peak, row.load_peak) <= budget and (host_gib is None or
                                                                     row.host <= HOST_SHARE * host_gib)  # fmt: skip
    fitting = [r for r in rows if r.fits]
    if not fitting:
        plan = Plan(rows, None, "nothing fits", capacity_gib, gpus, nodes, tokens)
        plan.advice = advice(model, params, targets, gpus, nodes, capacity_gib, single_process)
        return plan
    local = [r for r in fitting if r.traffic < 1]  # across nodes: ZeRO-3's weight gathers cross the network
    pool = local if nodes > 1 and local else fitting
    chosen = max(pool, key=lambda r: (r.speed, -r.train_peak))
    faster = [r for r in rows if r.speed > chosen.speed]
    why = f"fastest that fits: {chosen.train_peak:.1f} of {budget:.1f} GiB usable per GPU"
    if pool is local and len(local) < len(fitting):
        heavy = max(fitting, key=lambda r: r.speed)
        why += (f"; across {nodes} nodes not {heavy.setting.label}, which moves {heavy.traffic:.1f} GiB per GPU per "
                f"micro-batch over the network (its speed was measured on one host only)")  # fmt: skip
        faster = []
    if faster:
        best = max(faster, key=lambda r: r.speed)
        why += f"; {best.setting.label} would be {best.speed / chosen.speed:.2f}x but needs {best.train_peak:.1f} GiB"
    t = params.train
    if "auto" not in (t.deepspeed, t.gradient_checkpointing):  # the params' own setting, for comparison
        own = Setting(t.deepspeed or "none", t.gradient_checkpointing, 1 if not t.deepspeed else gpus * nodes,
                      t.checkpoint_layers if t.gradient_checkpointing in (True, "selective") else None)  # fmt: skip
        if own != chosen.setting:
            mine = estimate(model, params, own, targets, tokens)
            why += f"; {chosen.speed / mine.speed:.2f}x the speed of the params' {own.label} ({mine.train_peak:.1f} GiB)"
    return Plan(rows, chosen, why, capacity_gib, gpus, nodes, tokens)


def advice(model, params: Params, targets, gpus: int, nodes: int, capacity_gib: float,
           single_process: bool = True) -> list[str]:
    """The cheapest changes that make some setting fit: fewer tokens per micro-batch, or more GPUs under ZeRO-3."""
    budget = HEADROOM * capacity_gib
    tips = []
    tokens = tokens_per_gpu(params)
    auto = "auto" in (params.train.deepspeed, params.train.gradient_checkpointing)
    cheapest = min((estimate(model, params, s, targets, tokens)
                    for s in candidates(gpus, nodes, params if auto else None, single_process)),
                   key=lambda r: max(r.train_peak, r.load_peak))  # fmt: skip
    floor = params.tokenize.max_length if params.train.packing else 8
    for fewer in (tokens // 2**k for k in range(1, 12)):
        if fewer < floor:
            break
        row = estimate(model, params, cheapest.setting, targets, fewer)
        if max(row.train_peak, row.load_peak) <= budget:
            knob = "train.packed_length" if params.train.packing else "tokenize.max_length"
            key = knob if params.train.batch_size == 1 else f"train.batch_size x {knob}"
            tips.append(f"{fewer} tokens per micro-batch instead of {tokens} ({key}), {cheapest.setting.label}: "
                        f"{row.train_peak:.1f} GiB")  # fmt: skip
            break
    for ds in ("zero3", "zero3-offload"):  # the peak falls as GPUs are added: bisect for the fewest that fit
        fits = lambda n: max((r := estimate(model, params, Setting(ds, True, n), targets, tokens)).train_peak,  # noqa: E731
                             r.load_peak) <= budget  # fmt: skip
        if not fits(4096):
            continue
        high = fewest(fits, gpus * nodes, 4096)
        row = estimate(model, params, Setting(ds, True, high), targets, tokens)
        tips.append(f"{high} GPUs with train.deepspeed: {ds} and checkpointing: {row.train_peak:.1f} GiB each")
        break
    return tips or ["a smaller model, or fewer tokens per micro-batch than tokenize.max_length allows"]


def table(plan: Plan) -> str:
    """The plan as text: one row per candidate (GiB per GPU by part, load and training peaks, fits, relative
    speed), then the choice and why."""
    where = (f"{plan.nodes} x {plan.gpus_per_node} GPUs of {plan.capacity_gib:.1f} GiB" if plan.capacity_gib
             else f"{plan.nodes} x {plan.gpus_per_node} GPUs of unknown size (no GPU here)")  # fmt: skip
    width = max([46] + [len(r.setting.label) + 2 for r in plan.rows])
    lines = [f"plan: {where}, {plan.tokens_per_gpu} tokens per GPU per micro-batch; GiB per GPU",
             f"  {'setting':<{width}}{'GPUs':>5}{'weights':>9}{'adapter':>9}{'activ.':>8}{'loss':>6}{'gather':>8}"
             f"{'load':>7}{'train':>7}  {'fits':<5}{'speed':>6}{'comm':>7}{'host':>7}"]  # fmt: skip
    for r in plan.rows:
        fits = "-" if plan.capacity_gib is None else ("yes" if r.fits else "no")
        mark = "*" if r is plan.chosen else " "
        lines.append(f"{mark} {r.setting.label:<{width}}{r.setting.gpus:>5}{r.weights:>9.2f}{r.adapter:>9.2f}"
                     f"{r.activations:>8.2f}{r.loss:>6.2f}{r.gathers:>8.2f}{r.load_peak:>7.2f}{r.train_peak:>7.2f}  "
                     f"{fits:<5}{r.speed:>6.2f}{r.traffic:>7.2f}{r.host:>7.2f}")  # fmt: skip
    lines.append("  speed: tokens/s relative to one GPU without DeepSpeed checkpointing every layer (measured on a 7B,")
    lines.append("  bench/RESULTS.md); comm: GiB each GPU moves per micro-batch; host: GiB of pinned host memory per GPU")
    if plan.samples:
        lines.append(f"  {plan.samples}")
    if plan.moe:
        lines.append(f"  {plan.moe}")
    if plan.chosen:
        lines += textwrap.wrap(f"choice: {plan.chosen.setting.label} ({plan.reason})", 118, subsequent_indent="  ")
    elif plan.capacity_gib is not None:
        lines.append(f"nothing fits {size(HEADROOM * plan.capacity_gib)} usable per GPU; would fit: "
                     + "; or ".join(plan.advice))  # fmt: skip
    else:
        lines.append(plan.reason)
    return "\n".join(lines)
