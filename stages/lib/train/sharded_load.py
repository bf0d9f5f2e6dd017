"""Load a 4-bit (QLoRA) base under ZeRO-3 so that each rank keeps only its shard, from the first tensor on.

transformers skips `deepspeed.zero.Init` for quantized models: every rank loads the whole 4-bit model onto its GPU
and DeepSpeed partitions it afterwards, so the load peak per GPU is the whole model and nothing larger than one
GPU can train. Here the model is built on the meta device, transformers' own bitsandbytes quantizer swaps in its
`Linear4bit` layers, and the weights are read one tensor at a time from models/base: a weight that is quantized
goes to the GPU, is quantized there exactly as `from_pretrained` does (`Params4bit(...).to(device)`), and is
partitioned at once; a 16-bit weight (embeddings, LM head, norms) is partitioned straight from the CPU, so the GPU
never holds it whole. Peak device memory while loading is the rank's shards plus one quantized layer in flight.

The quantization statistics (absmax and code, about 1/32 of the 4-bit bytes with double quantization) stay whole
on every rank: bitsandbytes dequantizes the gathered weight with them. DeepSpeed's engine later finds the base
parameters already partitioned and converts only the LoRA parameters PEFT added.

Checkpoint tensors become parameters by transformers' own conversion mapping (stages/lib/core/checkpoint_names.py):
a mixture of experts' per-expert tensors are stacked as `from_pretrained` stacks them, and each stack is stored in
4 bits (stages/lib/train/experts_4bit.py). Where the mapping cannot place every parameter, `load` returns None and
the caller falls back to transformers' whole-model load.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

GIB = 2**30


def checkpoint_index(path: Path) -> dict[str, str] | None:
    """{tensor name: safetensors file name} of a model folder; None without safetensors weights."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = path / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single.name for name in f.keys()}


def build_on_meta(path: Path, quantization, dtype: torch.dtype, attn_implementation: str | None, **config_kwargs):
    """The model of `path`'s config with empty (meta) parameters, its linear layers swapped for 4-bit ones.

    Buffers (rotary frequencies) are real: they are computed at construction, not read from the checkpoint.
    Returns (model, quantizer).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    config = AutoConfig.from_pretrained(path, **{"trust_remote_code": False} | config_kwargs)  # never None: no prompt
    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
    with init_empty_weights(include_buffers=False), _zero3_hidden():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                 **config_kwargs)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map=None, checkpoint_files=None)
    model.tie_weights()
    return model, quantizer


@contextlib.contextmanager
def _zero3_hidden():
    """Under ZeRO-3, `from_config` would wrap construction in `zero.Init`, which cannot move meta tensors."""
    from transformers.integrations import deepspeed as hf_deepspeed

    live = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = live


class ZeroPartitioner:
    """Partitions one parameter at a time the way `deepspeed.zero.Init` would, minus its broadcast from rank 0.

    Every rank reads the same file and quantizes it on the same kind of GPU, so the values already agree; skipping
    the broadcast keeps the whole tensor off the GPU. `ds_config` is transformers' live DeepSpeed config.
    """

    def __init__(self, ds_config: dict, model_config):
        import deepspeed

        config = _fill_model_autos(ds_config, model_config)
        offload = config.get("zero_optimization", {}).get("offload_param") or {}
        # pinned like the engine's own conversion pins them (zero3-offload keeps the shards in CPU memory)
        self.init = deepspeed.zero.Init(config_dict_or_path=config, pin_memory=bool(offload.get("pin_memory")))
        self.device = self.init.local_device

    def __call__(self, param: torch.nn.Parameter) -> None:
        self.init._convert_to_deepspeed_param(param)
        param.partition()
        if param.data.device != self.device:  # partitioned from the CPU: the placeholder goes where gathers land
            param.data = torch.empty(0, dtype=param.dtype, device=self.device)


def _fill_model_autos(ds_config: dict, model_config) -> dict:
    """The three "auto" entries that transformers fills only once the Trainer sees the model, with its values
    (transformers' HfTrainerDeepSpeedConfig.trainer_config_finalize: the same hidden size, the same formulas)."""
    import copy

    owners = (model_config, getattr(model_config, "text_config", None))
    sizes = [getattr(o, "hidden_size", None) or max(getattr(o, "hidden_sizes", None) or [0]) for o in owners]
    hidden_size = next((size for size in sizes if size), None)
    if hidden_size is None:
        raise ValueError("the model's config has no hidden_size: give the DeepSpeed config numbers instead of auto")
    config = copy.deepcopy(ds_config)
    zero = config.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):  # fmt: skip
        if zero.get(key) == "auto":
            zero[key] = value
    return config


def load(path: Path, quantization, dtype: torch.dtype, attn_implementation: str | None = None,
         device: torch.device | str = "cpu", place=None, **config_kwargs):
    """A 4-bit model loaded tensor by tensor; `place(param)` runs on each parameter once it holds its value.

    `device`: where weights are quantized (the rank's GPU, or the CPU). `place`: e.g. a `ZeroPartitioner`; None
    keeps every tensor whole on `device`. Returns the model (eval mode, like `from_pretrained`), or None when the
    checkpoint's tensor names are not the model's parameter names (the caller then loads the usual way).
    Raises OSError for an unreadable safetensors file.
    """
    from safetensors import safe_open
    from transformers import GenerationConfig

    from stages.lib.core.checkpoint_names import targets
    from stages.lib.train import experts_4bit

    index = checkpoint_index(path)
    if index is None:
        return None
    model, quantizer = build_on_meta(path, quantization, dtype, attn_implementation, **config_kwargs)
    params = dict(model.named_parameters())  # tied weights appear once, under their first name
    found, _ = targets(model, index)  # checkpoint names → parameters, as from_pretrained renames and fuses them
    if not set(params) <= set(found):
        return None
    device = torch.device(device)
    experts = {f"{n}.{p}" for n, m in experts_4bit.experts_modules(model) for p in experts_4bit.projections(m)}
    with contextlib.ExitStack() as files:
        opened = {}

        def read(name: str) -> torch.Tensor:
            file = index[name]
            if file not in opened:
                opened[file] = files.enter_context(safe_open(str(path / file), framework="pt", device="cpu"))
            return opened[file].get_tensor(name)

        for target in sorted(found.values(), key=lambda t: (index[t.sources[0]], t.sources[0])):  # file by file
            for name, value in target.tensors(model, read).items():
                if name in params:
                    _place(model, name, value, dtype, device, place, quantization, name in experts)
    for module in model.modules():  # buffers were built on the CPU; 4-bit statistics stay whole on each rank
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is not None:
            weight.quant_state.to(device)
    model.tie_weights()
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def _place(model, name: str, value: torch.Tensor, dtype, device, place, quantization, expert: bool) -> None:
    """Give parameter `name` its checkpoint `value`: 4-bit where the model's quantizer made a `Linear4bit` or where
    it is an expert stack (experts_4bit), else cast as from_pretrained casts; then `place` it."""
    import bitsandbytes as bnb

    from stages.lib.train import experts_4bit

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters[attr]
    if expert:
        new = experts_4bit.quantize(value, quantization, device)
        experts_4bit.install(module, attr, new, value.shape)
    elif isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
        value = value.to(device=device, dtype=dtype)  # from_pretrained casts before it quantizes
        new = bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(device)
        module._parameters[attr] = new
    else:  # kept in 16 bits: cast as from_pretrained does, to the dtype the model was built with
        new = torch.nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad)
        if place is None:
            new.data = new.data.to(device)
        module._parameters[attr] = new
    if place is not None:
        place(new)


def resident_bytes(model: torch.nn.Module, skip=lambda name: False) -> int:
    """Bytes of model weights this process holds now: parameters (a ZeRO-3 parameter: its partition) plus the
    4-bit quantization statistics, on any device; buffers are not weights. `skip(name)` leaves parameters out."""
    total = 0
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen or skip(name):
            continue
        seen.add(id(param))
        shard = getattr(param, "ds_tensor", None)
        # min: a stride-0 placeholder (experts_4bit's, for expert LoRA) owns one element whatever its shape
        total += min(param.data.nbytes, param.data.untyped_storage().nbytes()) + (shard.nbytes if shard is not None else 0)
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += sum(t.nbytes for t in _state_tensors(state))
    return total


def _state_tensors(state) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    offset = getattr(state, "offset", None)
    if isinstance(offset, torch.Tensor):
        tensors.append(offset)
    return [t for t in tensors if isinstance(t, torch.Tensor)]
