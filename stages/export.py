"""Stage 6, export: models/merged → models/gguf (GGUF files for llama.cpp, Ollama, LM Studio + an Ollama Modelfile).

Each of export.types is one file, models/gguf/model-<type>.gguf, written by llama.cpp's own converter (f32, f16,
bf16, q8_0) or quantizer (the smaller types, from a lossless GGUF of the merged model's dtype). Every file
carries the training chat template, stops at the format's stop tokens and adds no BOS of its own (the template
writes any prefix), so llama.cpp builds the training prompt ids; each is read back and checked before it is
kept. The Modelfile's Go template is written from the format's recipe and checked to render every validation
prompt as training did. export.types: [] (the default) writes an empty models/gguf.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from stages.lib.chat import conversation
from stages.lib.chat import format as chat_format
from stages.lib.core.earlier import check_model_output, load_saved, load_tokenizer, reading
from stages.lib.core.errors import UserError, require, run_stage
from stages.lib.core.outputs import scratch_dir, staged_outputs, write_json, write_text
from stages.lib.core.params import Params, load_params
from stages.lib.core.progress import phase
from stages.lib.core.recipes import template_recipe
from stages.lib.export import converter, metadata, modelfile, quantize, readback

MERGED = Path("models/merged")
TOKENIZED = Path("data/tokenized")
TOKENIZER = TOKENIZED / "tokenizer"
TOKENIZE_METRICS = Path("metrics/tokenize.json")  # names the template tokenize rendered with
OUT_DIR = Path("models/gguf")
METRICS = Path("metrics/export.json")
LOSSLESS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # the merged dtype's GGUF type


def file_name(type_name: str) -> str:
    return f"model-{type_name}.gguf"


def prompts(validation, reasoning: str) -> tuple[list[list[dict]], list[list[int]]]:
    """The validation rows' prompts as chat messages (the turns before the row's last trained answer) with their
    training prompt ids. Rows whose prompt holds tool turns or reasoning are left out: the Modelfile's template
    renders neither (docs/guide.md)."""
    messages, ids = [], []
    for row in validation:
        turns = row["messages"][: conversation.trained_answers(row["messages"], True, reasoning)[-1]]
        if row["tools"] or any(t["role"] == "tool" or t.get("tool_calls") or t.get("reasoning") for t in turns):
            continue
        messages.append(conversation.template_messages(turns, reasoning))
        ids.append(row["input_ids"][: row["prompt_length"]])
    return messages, ids


def write_modelfile(params: Params, fmt, tokenizer, validation, first_file: str) -> tuple[modelfile.Modelfile, int]:
    """The Modelfile for `first_file`, its TEMPLATE checked on the validation prompts; (Modelfile, prompts checked)."""
    with reading(TOKENIZE_METRICS, TOKENIZE_METRICS, "tokenize"):
        name = json.loads(TOKENIZE_METRICS.read_text())["template"]
    recipe = template_recipe(name)
    prefix = tokenizer.decode(fmt.prefix_ids)
    stops = tokenizer.convert_ids_to_tokens(fmt.stop_ids)
    made = modelfile.Modelfile(first_file, modelfile.go_template(recipe, prefix), recipe.default_system, stops)
    made = modelfile.parse(made.text())  # checked as Ollama reads it: from the text
    asked, expected = prompts(validation, params.tokenize.reasoning)
    modelfile.check(made, asked, expected, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    return made, len(asked) if made.template else 0


def probe_vocabulary(make, gguf, scratch: Path, name: str, converter_name: str) -> None:
    """Run the converter's set_vocab alone on MERGED: an unknown tokenizer fails before any tensor is converted,
    and the converter's own refusal of it becomes one UserError line."""
    phase("export", "checking the vocabulary with llama.cpp's converter")
    model = make(MERGED, gguf.LlamaFileType.ALL_F32, scratch / "probe.gguf", model_name=name)
    try:
        model.set_vocab()
    except (UserError, MemoryError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - the converter's refusal of this model, said in one line
        raise UserError(f"llama.cpp's converter ({converter_name}) cannot read the tokenizer of {MERGED} "
                        f"({type(model).__name__}: {type(exc).__name__}: {str(exc)[:160]}); set export.types: [] "
                        "to skip the export") from None  # fmt: skip


def write_types(params: Params, make, gguf, hook, folder: Path, scratch: Path, check) -> dict[str, dict]:
    """Each of export.types as folder/model-<type>.gguf: the converter's types with `make` and the metadata
    `hook`, the quantizer's from a lossless file of the merged model's dtype (in `scratch` unless asked for).
    `check(path)` reads each back; returns its summaries by type."""
    types = params.export.types
    lossless = LOSSLESS[json.loads((MERGED / "config.json").read_text()).get("dtype") or params.merge_dtype]
    order = sorted(types, key=lambda t: t != lossless)  # the lossless file first: the quantizer reads it
    if any(t in quantize.QUANTIZER_TYPES for t in types) and lossless not in types:
        order.insert(0, lossless)
    where = {t: (folder if t in types else scratch) / file_name(t) for t in order}
    for type_name in order:
        phase("export", f"writing {OUT_DIR / file_name(type_name)}" if type_name in types else
              f"writing a {type_name} GGUF for llama.cpp's quantizer (not kept)")  # fmt: skip
        if type_name in converter.CONVERTER_TYPES:
            converter.convert(make, gguf, MERGED, where[type_name], type_name, vocab_hook=hook, name=params.model.recipe)
        else:
            quantize.quantize(where[lossless], where[type_name], type_name, threads=os.cpu_count() or 1)
    return {t: check(where[t]) for t in types}


def main() -> None:
    params = load_params()
    types = params.export.types
    if not types:
        with staged_outputs() as out:
            out.dir(OUT_DIR)
            write_json(out.file(METRICS), {"types": {}})
        print("export: export.types is [], no GGUF written")
        return
    source = params.export.llama_cpp
    given = converter.converter_folder(source) if source is not None else None  # a wrong folder fails first
    require(MERGED / "config.json", made_by="merge")
    require(TOKENIZER, made_by="tokenize")
    require(TOKENIZE_METRICS, made_by="tokenize")
    quantize.require_quantizer(types)
    with reading(TOKENIZER / chat_format.FORMAT_FILE, TOKENIZED, "tokenize"):
        fmt = chat_format.load(TOKENIZER)
    tokenizer = load_tokenizer(TOKENIZER, TOKENIZED, "tokenize")
    saved = load_saved(TOKENIZED, "tokenize")
    made, checked = write_modelfile(params, fmt, tokenizer, saved["validation"], file_name(types[0]))
    check_model_output(MERGED, "merge")

    conversion, gguf = converter.load(given or converter.converter_folder(None))
    cls = converter.model_class(conversion, MERGED, converter.converter_name(source))
    rows = [*saved["train"]["input_ids"], *saved["validation"]["input_ids"]]
    make = metadata.recognizing(cls, MERGED, lambda: [tokenizer.decode(ids) for ids in rows])
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    scratch = scratch_dir(OUT_DIR.parent, "gguf")
    try:
        probe_vocabulary(make, gguf, scratch, params.model.recipe, converter.converter_name(source))
        with staged_outputs() as out:
            folder = out.dir(OUT_DIR)
            summary = write_types(params, make, gguf, metadata.training_format(gguf, fmt.chat_template, fmt.stop_ids),
                                  folder, scratch, lambda path: readback.check(gguf, path, fmt.chat_template,
                                                                               fmt.stop_ids, vocabulary))  # fmt: skip
            write_text(folder / "Modelfile", made.text())
            write_json(out.file(METRICS), {
                "converter": converter.converter_name(source),
                "types": summary,
                "modelfile": {"from": made.source, "template": made.template is not None, "stops": made.stops,
                              "prompts_checked": checked},
            })  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sizes = ", ".join(f"{t} {summary[t]['bytes'] / 2**20:.2f} MiB" for t in types)
    print(f"export: {OUT_DIR}: {sizes}; Modelfile checked on {checked} validation prompts")


if __name__ == "__main__":
    run_stage(main)
