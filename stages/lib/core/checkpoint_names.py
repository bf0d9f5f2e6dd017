"""From a checkpoint's tensor names to the model's parameters, by transformers' own conversion mapping.

Since transformers 5, a model's parameters need not be the checkpoint's tensors one for one: a mixture of experts
fuses each layer's experts into 3-D parameters (`mlp.experts.gate_up_proj` [experts, 2·inter, hidden]) while its
checkpoints (the Hub's, and every `save_pretrained`) keep them one by one (`mlp.experts.0.gate_proj.weight`), and
some families rename modules (Mixtral's `block_sparse_moe` → `mlp`). transformers lists these transforms per model
(`conversion_mapping.get_model_conversion_mapping`) and applies them while loading (`core_model_loading`); this
module applies the same list, to names and shapes (download's check, on meta tensors) and to tensors (train's
tensor-by-tensor 4-bit loader), so that no rename table of ours can drift from transformers'.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Target:
    """One model parameter (or buffer) and the checkpoint tensors it is made of: one, or several through
    `converter` (a fresh copy of transformers' WeightConverter for this target)."""

    name: str
    sources: list[str] = field(default_factory=list)
    converter: object | None = None
    patterns: list[str] = field(default_factory=list)  # the converter's source pattern of each source

    def tensors(self, model, read: Callable[[str], object]) -> dict[str, object]:
        """{model name: tensor}: the sources read with `read(checkpoint name)` and converted as transformers does.
        A converter may return several targets (a fused q/k/v split, say); each is a model name."""
        if self.converter is None:
            return {self.name: read(self.sources[0])}
        converter = copy.deepcopy(self.converter)
        for source, pattern in zip(self.sources, self.patterns):
            converter.add_tensor(self.name, source, pattern, lambda s=source: read(s))
        out = converter.convert(self.name, model=model, config=model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}


def targets(model, names) -> tuple[dict[str, Target], list[str]]:
    """Group checkpoint tensor `names` by the model parameter each becomes.

    Returns ({model name: Target}, [checkpoint names that match nothing in the model]). `model` may live on the
    meta device. Keys are renamed exactly as `from_pretrained` renames them (renamings, then at most one
    converter, then the base-model prefix added or stripped).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    expected = model.state_dict()
    prefix = model.base_model_prefix
    found: dict[str, Target] = {}
    unmatched = []
    for name in sorted(names, key=dot_natural_key):
        renamed, pattern = rename_source_key(name, renamings, converters, prefix, expected)
        if renamed not in expected and name in expected:  # as from_pretrained: a key that needs no renaming
            renamed, pattern = rename_source_key(name, [], [], prefix, expected)
        if renamed not in expected:
            unmatched.append(name)
            continue
        target = found.setdefault(renamed, Target(renamed))
        target.sources.append(name)
        if pattern is not None:
            target.converter = by_pattern[pattern]
            target.patterns.append(pattern)
    return found, unmatched


def converted_shapes(model, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """{model name: shape} that the checkpoint tensors of `shapes` ({checkpoint name: shape}) become, worked out
    on meta tensors (no data read), and the checkpoint names that match nothing. A group whose conversion fails
    (an expert missing, shapes that do not stack) is left out, so that the caller names its parameter as
    missing."""
    import torch

    found, unmatched = targets(model, shapes)
    out: dict[str, tuple[int, ...]] = {}
    for target in found.values():
        try:
            tensors = target.tensors(model, lambda n: torch.empty(shapes[n], device="meta"))
        except Exception:  # noqa: BLE001 - each conversion op fails its own way on tensors that do not fit
            continue
        out |= {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    return out, unmatched
