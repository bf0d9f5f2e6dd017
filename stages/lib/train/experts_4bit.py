"""A mixture of experts' expert weights in 4 bits (NF4), dequantized a layer at a time for its forward.

transformers 5 holds each MoE layer's experts as 3-D parameters (`gate_up_proj` [experts, 2·inter, hidden],
`down_proj` [experts, hidden, inter]); bitsandbytes quantizes only `nn.Linear`, so under a 4-bit config they stay
16-bit: ~95 % of an MoE's weights. Here each such parameter becomes one `Params4bit` of the stacked experts
(flattened to 2-D; the same NF4 blocks, double quantization and storage dtype as the model's `Linear4bit` layers),
held by the experts module itself so that ZeRO-3 partitions and gathers it like any other weight of that module.

The forward is transformers' own: the experts classes dispatch through `ExpertsInterface`, where this module
registers `nf4`. It dequantizes the layer's experts (one kernel per projection) and hands them to the
implementation the model had chosen (`grouped_mm`, `batched_mm` or the class's eager loop), so routing, gating,
biases and the transposed layouts stay the family's. Cost: one layer's experts in 16 bits while that layer runs
(and again in its backward: they are recomputed, not kept).

Expert LoRA uses PEFT's `target_parameters`. PEFT wraps a parameter by re-parametrizing it as base + B·A; here the
base is a zero placeholder of the expert stack's shape that owns no memory (a stride-0 view of one zero), so the
parametrized value is the LoRA delta alone, added to the dequantized weights. PEFT saves the adapter in its own
format, which merges into the 16-bit experts like any `target_parameters` adapter.
"""

from __future__ import annotations

import torch

IMPLEMENTATION = "nf4"
SUFFIX = "_4bit"  # the packed weight of projection `p` is the module's parameter `p + SUFFIX`
_INNER: dict[int, str | None] = {}  # id(config) → the implementation the model had chosen before `nf4`


def projections(module: torch.nn.Module) -> list[str]:
    """Names of an experts module's 3-D expert weights (gate_up_proj, down_proj, up_proj ...), [] for any other
    module. Experts classes are the ones transformers decorates with `use_experts_implementation`."""
    if not hasattr(module, "is_concatenated") or not hasattr(module, "has_gate"):
        return []
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]


def unsupported_experts(model: torch.nn.Module) -> list[str]:
    """Class names of modules holding 3-D weights that transformers does not dispatch through `ExpertsInterface`
    (their experts stay in 16 bits)."""
    return sorted({type(m).__name__ for m in model.modules() if not projections(m)
                   and any(p.dim() == 3 for p in m.parameters(recurse=False))})  # fmt: skip


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of every experts module with 16-bit or 4-bit expert weights."""
    return [(n, m) for n, m in model.named_modules() if projections(m) or getattr(m, "_4bit_shapes", None)]


def expert_stacks(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 16-bit 3-D expert stacks of a model (e.g. on the meta device), in module order."""
    return [m._parameters[n] for _, m in experts_modules(model) for n in projections(m)]


def moe_shape(model: torch.nn.Module) -> tuple[int, int, int] | None:
    """(experts per layer, experts active per token, one expert's intermediate width) of a 16-bit mixture of
    experts (meta device is enough); None for a dense model."""
    found = experts_modules(model)
    if not found:
        return None
    module = found[0][1]
    down = module._parameters["down_proj"]  # [experts, hidden, inter], or [experts, inter, hidden] transposed
    inter = down.shape[1] if getattr(module, "is_transposed", False) else down.shape[2]
    config = model.config.get_text_config()
    return down.shape[0], int(getattr(config, "num_experts_per_tok", None) or 1), int(inter)


def quantize(value: torch.Tensor, quantization, device) -> torch.nn.Parameter:
    """The 3-D expert stack `value` as one 2-D 4-bit parameter on `device`, quantized as bitsandbytes quantizes a
    `Linear4bit` weight under `quantization` (a transformers BitsAndBytesConfig); `install` keeps the 3-D shape."""
    import bitsandbytes as bnb

    flat = value.to(device=device, dtype=quantization.bnb_4bit_compute_dtype).reshape(-1, value.shape[-1])
    return bnb.nn.Params4bit(flat, requires_grad=False, quant_type=quantization.bnb_4bit_quant_type,
                             compress_statistics=quantization.bnb_4bit_use_double_quant,
                             quant_storage=quantization.bnb_4bit_quant_storage).to(device)  # fmt: skip


def install(module: torch.nn.Module, name: str, packed: torch.nn.Parameter, shape: tuple[int, ...]) -> None:
    """Swap `module`'s 3-D parameter `name` for its 4-bit version (made by `quantize`)."""
    # the class's order: PEFT nests the wrappers of one module's parameters in that order, and the adapter's tensor
    # names follow the nesting, so placeholders must come in the order the 16-bit model (at merge) has them
    module.__dict__.setdefault("_4bit_order", projections(module))
    module._parameters.pop(name, None)
    module.register_parameter(name + SUFFIX, packed)
    shapes = dict(getattr(module, "_4bit_shapes", {}))
    shapes[name] = tuple(shape)
    module._4bit_shapes = shapes
    chosen = module.config._experts_implementation  # the config is shared: the first module switches it
    _INNER.setdefault(id(module.config), chosen)
    module.__dict__.setdefault("_4bit_inner", _INNER[id(module.config)])
    module.config._experts_implementation = IMPLEMENTATION
    register()


def add_lora_placeholders(module: torch.nn.Module) -> None:
    """Give a 4-bit experts module zero placeholders under its projections' own names, for PEFT's
    `target_parameters` to wrap (see the module's docstring). Each owns 2 bytes, whatever its shape."""
    for name in module._4bit_order:
        shape = module._4bit_shapes[name]
        packed = module._parameters[name + SUFFIX]
        zero = torch.zeros((), dtype=packed.quant_state.dtype, device=packed.device).expand(shape)
        module.register_parameter(name, torch.nn.Parameter(zero, requires_grad=False))


def _forward(self, hidden_states, top_k_index, top_k_weights):
    """The `nf4` experts implementation: dequantize, add the LoRA delta where PEFT put one, run the model's own."""
    import bitsandbytes.functional as bnbf
    from torch.nn.utils import parametrize
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    weights = {}
    for name, shape in self._4bit_shapes.items():
        packed = self._parameters[name + SUFFIX]
        weight = bnbf.dequantize_4bit(packed.data, packed.quant_state).view(shape).to(hidden_states.dtype)
        if parametrize.is_parametrized(self, name):  # PEFT's LoRA is active: the placeholder reads as B·A
            weight = weight + getattr(self, name)
        weights[name] = weight
    eager = type(self).forward.__wrapped__  # the class's own loop, under transformers' dispatching wrapper
    inner = eager if self._4bit_inner in (None, "eager") else ALL_EXPERTS_FUNCTIONS.get_interface(self._4bit_inner, eager)
    return inner(_Dequantized(self, weights), hidden_states, top_k_index, top_k_weights)


class _Dequantized:
    """The experts module as the experts implementations read it, with its expert weights dequantized."""

    def __init__(self, module, weights: dict):
        self.__dict__.update(weights, _module=module)

    def __getattr__(self, name):
        return getattr(self._module, name)


def register() -> None:
    """Make `nf4` a transformers experts implementation (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _forward)


def linear_names(model: torch.nn.Module) -> list[str]:
    """The last names of every linear layer but the output head (what "all-linear" means: q_proj, ...,
    shared_expert.gate_proj), for PEFT's target_modules. bitsandbytes' 4-bit layers are linear layers."""
    head = model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head})


def lora_target_parameters(model: torch.nn.Module, wanted: list[str]) -> list[str]:
    """PEFT `target_parameters` for `wanted` (suffixes such as `mlp.experts.gate_up_proj`), as full names of each
    matching parameter. PEFT matches a re-parametrized tensor by its full name only, and the full list keeps the
    adapter loadable on the 16-bit model at merge."""
    names = []
    for module_name, module in experts_modules(model):
        for name in list(getattr(module, "_4bit_shapes", {})) or projections(module):
            full = f"{module_name}.{name}"
            if any(full == w or full.endswith("." + w) for w in wanted):
                names.append(full)
    return names
