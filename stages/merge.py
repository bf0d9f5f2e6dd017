"""Stage 4, merge: models/base (unquantized) + models/adapter → models/merged (safetensors + tokenizer).

models/merged gets the training tokenizer from data/tokenized/tokenizer: its chat template renders the prompt
ids the model was trained on, and generation_config.json stops at the format's stop tokens, so a server that
reads models/merged (vLLM, TGI, transformers pipelines) prompts and stops as in training.

The adapter was trained against a 4-bit base, but it is merged into the full-precision weights: merging into
4-bit weights would round the update away. Before saving, the stage checks on fixed validation inputs that the
merged model's logits equal base + adapter (unmerged) within merge.tolerance, and fails otherwise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stages.lib.core.earlier import check_adapter, check_model_output, load_saved, load_tokenizer, reading
from stages.lib.core.errors import UserError, require, run_stage
from stages.lib.core.outputs import staged_outputs, write_json
from stages.lib.core.params import Params, load_params
from stages.lib.core.remote_code import trusted
from stages.lib.core.progress import phase
from stages.lib.core.rope import folder_overrides

BASE_DIR = Path("models/base")
ADAPTER_DIR = Path("models/adapter")
TOKENIZED = Path("data/tokenized")
TOKENIZER = TOKENIZED / "tokenizer"
MERGED_DIR = Path("models/merged")
METRICS = Path("metrics/merge.json")


def check_unquantized(base_dir: Path) -> None:
    config = json.loads((base_dir / "config.json").read_text())
    if config.get("quantization_config"):
        raise UserError(f"{base_dir} holds quantized weights: merge needs an unquantized base checkpoint")


def check_inputs(n: int):
    """The first n validation sequences, as one padded batch."""
    import torch

    rows = load_saved(TOKENIZED, "tokenize")["validation"]["input_ids"][:n]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


def logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()[mask.bool()]


def merge(params: Params):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, params.merge_dtype)
    if params.train.method == "full":  # nothing to merge: the trained weights are the model
        return AutoModelForCausalLM.from_pretrained(ADAPTER_DIR, dtype=dtype, trust_remote_code=trusted()), None
    check_unquantized(BASE_DIR)
    ids, mask = check_inputs(params.merge.check_samples)  # before the weights load: a damaged file fails at once
    check_model_output(BASE_DIR, "download")
    check_adapter(ADAPTER_DIR, BASE_DIR)
    rope = folder_overrides(BASE_DIR, params.model.rope_scaling)  # as trained; saved into models/merged/config.json
    phase("merge", f"loading {BASE_DIR} ({params.merge_dtype}) and {ADAPTER_DIR}")
    base = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=dtype, trust_remote_code=trusted(), **rope).eval()
    with_adapter = PeftModel.from_pretrained(base, ADAPTER_DIR).eval()
    phase("merge", f"merging; comparing logits with base + adapter on {len(ids)} validation samples")
    expected = logits(with_adapter, ids, mask)
    merged = with_adapter.merge_and_unload()
    diff = (logits(merged, ids, mask) - expected).abs().max().item()
    if diff != diff:  # NaN: the adapter or base holds non-finite values, and NaN > tolerance is False
        raise UserError("merged logits are not finite (NaN): models/adapter or models/base holds NaN or infinite "
                        "weights; restore them with `dvc checkout` or train again")  # fmt: skip
    if diff > params.merge.tolerance:
        raise UserError(
            f"merged logits differ from base + adapter by {diff:.3g} > merge.tolerance {params.merge.tolerance}: "
            "merge in float32 (merge.dtype) or raise the tolerance if this dtype's rounding explains it"
        )
    return merged, diff


def main() -> None:
    params = load_params()
    trained = "config.json" if params.train.method == "full" else "adapter_config.json"  # full: the whole model
    require(ADAPTER_DIR / trained, made_by="train")
    require(TOKENIZER, made_by="tokenize")
    from stages.lib.chat import format as chat_format

    with reading(TOKENIZER / chat_format.FORMAT_FILE, TOKENIZED, "tokenize"):  # before the weights load
        fmt = chat_format.load(TOKENIZER)
    tokenizer = load_tokenizer(TOKENIZER, TOKENIZED, "tokenize")
    merged, diff = merge(params)
    merged.generation_config.eos_token_id = fmt.stop_ids[0] if len(fmt.stop_ids) == 1 else fmt.stop_ids
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    phase("merge", f"saving {MERGED_DIR}")
    with staged_outputs() as out:
        tmp = out.dir(MERGED_DIR)
        merged.save_pretrained(tmp)
        for f in TOKENIZER.iterdir():  # byte for byte: a save/load round trip may change how text is split
            if f.name != chat_format.FORMAT_FILE:
                shutil.copyfile(f, tmp / f.name)
        if params.merge.chatglm2_layout:
            from stages.lib.convert import write_chatglm2_layout

            write_chatglm2_layout(tmp, BASE_DIR, tmp / "chatglm2")
        write_json(out.file(METRICS), {"max_abs_logit_diff": diff, "tolerance": params.merge.tolerance, "dtype": params.merge_dtype})
    print(f"merge: max |logit difference| {diff} (tolerance {params.merge.tolerance})")


if __name__ == "__main__":
    run_stage(main)
