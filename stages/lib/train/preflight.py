"""Checks of the train settings that need the environment or the model's shape, run before any weight loads.

Each of these used to fail only after the model was loaded (minutes for a 7B), with a library traceback.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import UserError
from ..core.params import Params


def check_reporters(names: list[str]) -> None:
    """train.report_to names transformers integrations that are installed here (UserError otherwise)."""
    if not names:
        return  # the import below takes seconds
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    installed = get_available_reporting_integrations()
    for name in names:
        if name == "dvclive":
            raise UserError("train.report_to: dvclive is always on (dvclive/train); list only other trackers")
        if name not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(set(INTEGRATION_TO_CALLBACK) - {"dvclive"}))
            raise UserError(f"train.report_to: '{name}' is not a transformers integration (known: {known})")
        if name not in installed:
            raise UserError(f"train.report_to: {name} is not installed in this environment; install its package")


def check_kernels(attn_implementation: str, liger: bool) -> None:
    """The attention kernel and Liger kernels asked for can run here: installed, and on a GPU where they need one."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_liger_kernel_available

    available = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
    if attn_implementation in available and not available[attn_implementation]():
        raise UserError(f"train.attn_implementation: {attn_implementation} needs the flash-attn package and a CUDA "
                        "GPU, not both here: use sdpa, or varlen (packed rows, torch's own flash kernel)")  # fmt: skip
    if attn_implementation == "flex_attention":
        import torch

        if not torch.cuda.is_available():  # torch's flex attention has no backward pass on the CPU
            raise UserError("train.attn_implementation: flex_attention trains only on a CUDA GPU (torch has no CPU "
                            "backward for it): use sdpa, or varlen for packed rows")  # fmt: skip
    if liger and not is_liger_kernel_available():
        raise UserError("train.liger: true needs the liger-kernel package (pip install liger-kernel) and a GPU: "
                        "install it or set train.liger: false")  # fmt: skip


def check_lora_targets(targets: list[str] | str, key: str, base: Path) -> None:
    """Each entry of `targets` (LoRA target_modules; `key` is the setting that gave them) matches at least one
    layer of the model in `base` that LoRA can adapt (linear, embedding, convolution), by PEFT's own matching rule (a name, a suffix after a dot, or a regex).
    Built on the meta device from config.json: no weights load. "all-linear" always matches."""
    if isinstance(targets, str):
        return
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from ..core.model_files import meta_model

    model = meta_model(base, str(base))
    if model is None:  # needs its Hub code: PEFT's own check at load
        return
    supported = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)  # PEFT's
    layers = [name for name, m in model.named_modules() if isinstance(m, supported)]
    for target in targets:
        if not any(check_target_module_exists(LoraConfig(target_modules=[target]), name) for name in layers):
            kinds = sorted({name.rsplit(".", 1)[-1] for name in layers})
            raise UserError(f"{key}: '{target}' matches no layer of {base} that LoRA adapts (those it has: "
                            f"{', '.join(kinds)})")  # fmt: skip


def longest_sample(splits) -> int:
    """Tokens in the longest sample of the tokenized splits (a DatasetDict with `input_ids`); 0 when empty.
    Positions restart at each sample, packed or not, so this is the furthest position training reaches."""
    import pyarrow.compute as pc

    lengths = [pc.max(pc.list_value_length(s.data.column("input_ids"))).as_py() for s in splits.values() if len(s)]
    return max(lengths, default=0)


def check_context(config, scaling, longest: int, max_length: int, where: str) -> str | None:
    """Samples fit the positions of the model of `where` (its transformers config: `config`) under `scaling`
    (model.rope_scaling or None). UserError when the `longest` sample (tokens) is longer, naming the key to change;
    a warning line when only tokenize.max_length (`max_length`) is; None when both fit or the config names no
    context length."""
    from ..core.rope import context_fix, context_positions, scaled

    context = context_positions(scaled(config, scaling, where))
    if context is None or max(longest, max_length) <= context:
        return None
    fix = context_fix(config, scaling, max(longest, max_length))
    if longest <= context:  # nothing trains past the context yet: keep a run that worked before
        return (f"train: warning: tokenize.max_length ({max_length}) is above the {context} positions of the "
                f"{config.model_type} model of {where}; no sample is that long yet, and train stops on one that is: "
                f"{fix}")  # fmt: skip
    raise UserError(f"data/tokenized holds a sample of {longest} tokens, but the {config.model_type} model of {where} "
                    f"has {context} positions: {fix}")  # fmt: skip


def check_expert_targets(params: Params, model) -> None:
    """train.lora.target_parameters names expert stacks models/base has, and is not combined with ZeRO-3 over
    4-bit experts (PEFT's placeholder would be partitioned like a weight); a line for experts kept in 16 bits."""
    from ..core import recipes
    from .experts_4bit import lora_target_parameters, unsupported_experts

    if model is None:
        return
    wanted = params.train.lora.target_parameters
    unmatched = [w for w in wanted if not lora_target_parameters(model, [w])]
    if unmatched:
        raise UserError(f"train.lora.target_parameters: {unmatched[0]!r} matches no expert weight of models/base (a "
                        "mixture of experts' 3-D stacks, e.g. mlp.experts.gate_up_proj, mlp.experts.down_proj): fix "
                        "the name or remove it")  # fmt: skip
    zero3 = params.train.deepspeed and recipes.deepspeed_config(params.train.deepspeed).get("zero_optimization", {}).get("stage") == 3
    if wanted and zero3 and params.train.method == "qlora":
        raise UserError("train.lora.target_parameters with ZeRO-3 over 4-bit experts is not built: train the experts' "
                        "LoRA with train.deepspeed null or zero2, or leave target_parameters empty under zero3")
    kept = unsupported_experts(model)
    if kept and params.train.method == "qlora":
        print(f"train: note: {', '.join(kept)} keep their 3-D expert weights in 16 bits (transformers does not "
              "dispatch these experts through its ExpertsInterface, which the 4-bit experts use)", flush=True)


def check_same_vocabulary(training_tokenizer, base_dir: Path, trust_remote_code: bool) -> None:
    """data/tokenized was made with models/base's tokenizer (`base_dir`): every token of its vocabulary has the same id
    in the training tokenizer (tokenize may only add tokens). Otherwise the ids would index another model's
    embeddings: `dvc repro -s download` followed by `dvc repro -s train`, say, skipping tokenize."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code).get_vocab()
    mine = training_tokenizer.get_vocab()
    moved = next((token for token, i in base.items() if mine.get(token) != i), None)
    if moved is not None:
        raise UserError(f"data/tokenized was made with another tokenizer than models/base's (token {moved!r} has id "
                        f"{mine.get(moved)} there, {base[moved]} in models/base): run `dvc repro -s tokenize` "
                        "(or `dvc repro`, which runs the stages in order)")
