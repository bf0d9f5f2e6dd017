"""Checking a model directory before it becomes models/base: a folder that would fail in train fails at download.

Cheap checks only, no weights loaded: every JSON file parses, config.json names a model type, every safetensors
file's header parses and its size is what the header says (a truncated copy is caught), a sharded index names files
that exist, the tensors' names and shapes are the ones the config builds (on the meta device), and the tokenizer
loads and has an end-of-sequence token (the stop token of every answer).
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from pathlib import Path

from .errors import UserError
from .strict_json import no_constant

MAX_HEADER = 100 << 20  # bytes; safetensors itself refuses larger headers


class ModelFilesError(UserError):
    pass


# the dtypes of the safetensors format (its Rust reader refuses any other) and their size in bits
DTYPES = {"BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
          "F64": 64, "I64": 64, "U64": 64, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
          "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}  # fmt: skip


def read_json(path: Path) -> object:
    """The parsed JSON file; ModelFilesError naming it when it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constant)  # a NaN eps trains NaN
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ModelFilesError(f"{path} is not valid JSON ({why}): copy it again from the model's source") from None


def check_config(folder: Path, what: str) -> None:
    """config.json exists and is a JSON object with a model_type; every other JSON file (tokenizer, generation
    config, index) parses, since train and tokenize read them all."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFilesError(f"{what} has no config.json: copy the whole model folder (config.json, *.safetensors, "
                              "tokenizer files)")  # fmt: skip
    config = read_json(path)
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelFilesError(f"{path} has no model_type: it is not a transformers model config")
    for other in sorted(folder.glob("*.json")):
        if not isinstance(read_json(other), dict):
            raise ModelFilesError(f"{other} is JSON but not an object: copy it again from the model's source")
    generation = folder / "generation_config.json"
    eos = read_json(generation).get("eos_token_id") if generation.is_file() else None
    if not (eos is None or type(eos) is int or (isinstance(eos, list) and all(type(e) is int for e in eos))):
        raise ModelFilesError(f"{generation}: eos_token_id is {eos!r}; it must be a token id or a list of ids")


def check_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """The file's header parses, names known dtypes, and the tensors it lists end exactly at the end of the file;
    returns {tensor name: shape}.

    Format (safetensors): 8 bytes little-endian header length N, N bytes of JSON (an object: name -> {dtype, shape,
    data_offsets}, plus an optional __metadata__), then the tensor data, whose `data_offsets` are relative to the
    end of the header.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > min(MAX_HEADER, size - 8):
            raise ModelFilesError(f"{path} is not a safetensors file (no valid header; truncated or another format): "
                                  "copy it again from the model's source")  # fmt: skip
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ModelFilesError(f"{path} has a corrupt safetensors header: copy it again from the model's source") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    valid = tensors is not None and isinstance(meta, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ) and all(
        isinstance(v, dict) and isinstance(v.get("shape"), list) and isinstance(v.get("data_offsets"), list)
        and len(v["data_offsets"]) == 2 and all(type(x) is int and x >= 0 for x in v["shape"] + v["data_offsets"])
        for v in tensors.values()
    )  # fmt: skip
    if not valid:
        raise ModelFilesError(f"{path} has a safetensors header of the wrong layout: copy it again from the model's source")
    unknown = next((k for k, v in tensors.items() if v.get("dtype") not in DTYPES), None)
    if unknown is not None:
        raise ModelFilesError(f"{path}: tensor {unknown} has dtype {tensors[unknown].get('dtype')!r}, which "
                              "safetensors does not know: copy the file again from the model's source")  # fmt: skip
    end = 0  # the tensors lie back to back, in offset order, each as long as its shape and dtype make it
    for name, v in sorted(tensors.items(), key=lambda item: item[1]["data_offsets"]):
        start, stop = v["data_offsets"]
        if start != end or (stop - start) * 8 != math.prod(v["shape"]) * DTYPES[v["dtype"]]:
            raise ModelFilesError(f"{path}: tensor {name}'s data offsets do not match its shape and dtype: copy the "
                                  "file again from the model's source")  # fmt: skip
        end = stop
    expected = 8 + n + end
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise ModelFilesError(f"{path} is {state} ({size} bytes, its header needs {expected}): copy it again "
                              "from the model's source")  # fmt: skip
    return {k: tuple(v["shape"]) for k, v in tensors.items()}


def check_weights(folder: Path, what: str) -> dict[str, tuple[int, ...]]:
    """Every *.safetensors file is whole, and a sharded index's files are all there; returns {tensor: shape}."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFilesError(f"{what} has no *.safetensors weights (pickled weights are not loaded)")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        shapes |= check_safetensors(path)
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelFilesError(f"{index} is not a valid safetensors index: copy it again") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelFilesError(f"{what}: {index.name} lists {', '.join(missing)}, which is missing: copy every shard")
    return shapes


def meta_model(folder: Path, what: str):
    """The model config.json describes, built on the meta device (no memory, no weights; about a second even for
    70B shapes). ModelFilesError when transformers does not know its model_type; None for a model that needs its
    own Hub code (auto_map), which is not run here."""
    config = read_json(folder / "config.json")
    if config.get("auto_map"):
        return None
    stat = (folder / "config.json").stat()
    try:
        return _build_on_meta(str(folder.resolve()), stat.st_mtime_ns, stat.st_size)
    except Exception as exc:  # noqa: BLE001 - each config class fails its own way (0 heads: ZeroDivisionError)
        import transformers

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFilesError(f"{what}: transformers {transformers.__version__} cannot build this config.json "
                              f"({first[:160]}): check model_type and the sizes in it") from None  # fmt: skip


@functools.lru_cache(maxsize=4)
def _build_on_meta(folder: str, mtime_ns: int, size: int):
    """One meta build per config.json version and process: train checks models/base's weights and its LoRA targets
    against the same model (the stat values are only the cache key)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        # trust_remote_code=False: meta_model never gets here for a folder with auto_map (its own code)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=False))


def check_shapes(folder: Path, what: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every parameter the config builds is in the weights, with the same shape (a renamed tensor would be left
    random, a wrong size fails the load minutes into train). Quantized checkpoints store other tensors: skipped."""
    if "quantization_config" in read_json(folder / "config.json"):
        return
    model = meta_model(folder, what)
    if model is None:
        return
    from .checkpoint_names import converted_shapes

    # a mixture of experts stores its experts one by one and the model fuses them: compare after transformers'
    # own conversion (checkpoint_names), as from_pretrained loads them
    converted, unmatched = converted_shapes(model, shapes)
    expected = model.state_dict()  # tied weights appear once per name: a checkpoint may hold either
    for name, param in model.named_parameters():
        stored = converted.get(name)
        if stored is None:
            raise ModelFilesError(f"{what}: the weights have no tensor {name}, which config.json's model needs "
                                  "(renamed or missing): copy the model folder again")  # fmt: skip
        if stored != tuple(param.shape):
            raise ModelFilesError(f"{what}: tensor {name} has shape {list(stored)} but config.json makes it "
                                  f"{list(param.shape)}: the config and the weights are of different models")  # fmt: skip
    # then tensors the model lacks: a renamed tensor is named above as missing, a config with fewer layers here
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    extra = sorted(k for k in unmatched if k not in expected and not any(p.search(k) for p in ignored))
    if extra:
        raise ModelFilesError(f"{what}: the weights hold {len(extra)} tensor(s) that config.json's model does not "
                              f"have, e.g. {extra[0]}: the config describes another (smaller?) model")  # fmt: skip


def check_tokenizer(folder: Path, what: str):
    """The tokenizer loads (its own code only with model.trust_remote_code) and has an EOS token; returns it."""
    from transformers import AutoTokenizer

    from .remote_code import check_no_custom_code, trusted

    check_no_custom_code(folder, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trusted())
    except Exception as exc:  # noqa: BLE001 - each tokenizer backend fails its own way; all mean "not loadable"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFilesError(f"{what}: the tokenizer does not load ({type(exc).__name__}: {first[:200]}); "
                              "copy its tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)") from None  # fmt: skip
    if tokenizer.chat_template:  # tokenize's `template: tokenizer` renders it: a syntax error fails here, not there
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        templates = tokenizer.chat_template if isinstance(tokenizer.chat_template, dict) else {"": tokenizer.chat_template}
        for template in templates.values():
            try:
                ImmutableSandboxedEnvironment().parse(template)
            except TemplateError as exc:
                raise ModelFilesError(f"{what}: the tokenizer's chat template is not valid Jinja ({exc}): fix "
                                      "chat_template.jinja (or tokenizer_config.json's chat_template)") from None
        check_renders(tokenizer, what)
    if tokenizer.eos_token is None:
        raise ModelFilesError(f"{what}: the tokenizer has no EOS token, which ends every trained answer: set "
                              "\"eos_token\" in its tokenizer_config.json (e.g. \"</s>\" or \"<|endoftext|>\")")  # fmt: skip
    return tokenizer


PROBE = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]


def check_renders(tokenizer, what: str) -> None:
    """The tokenizer's chat template renders the plainest conversation (a user turn and an answer), in
    transformers' Jinja sandbox as tokenize and every server render it: a template that parses but fails when
    run (an undefined filter, a division by zero, a loop over a number) fails here, at download."""
    try:
        tokenizer.apply_chat_template(PROBE, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - Jinja and the template's own raise_exception fail their own ways
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFilesError(f"{what}: the tokenizer's chat template fails on a user turn and an answer "
                              f"({type(exc).__name__}: {first[:160]}): fix chat_template.jinja (or "
                              "tokenizer_config.json's chat_template), or train with tokenize.template chatml") from None


def check_vocab(folder: Path, what: str, tokenizer) -> None:
    """The tokenizer's EOS and padding ids are rows of the model's embedding (config.json's vocab_size), and the
    stop ids the model's config files name (eos_token_id, pad_token_id) are tokens of the tokenizer: a folder whose
    config comes from another model would otherwise stop generation on ids no text has (and fail in tokenize)."""
    size = len(tokenizer)
    configs = {name: read_json(folder / name) for name in ("config.json", "generation_config.json")
               if (folder / name).is_file()}  # fmt: skip
    for name, config in configs.items():
        for key in ("eos_token_id", "pad_token_id"):
            value = config.get(key)
            ids = value if isinstance(value, list) else [value]
            stray = next((i for i in ids if type(i) is int and not 0 <= i < size), None)
            if stray is not None:
                raise ModelFilesError(f"{what}: {name} has {key} {stray}, which is no token of the tokenizer "
                                      f"({size} tokens): set it to the tokenizer's (eos {tokenizer.eos_token_id}) or "
                                      "copy the config that belongs to this tokenizer")  # fmt: skip
    vocab = configs["config.json"].get("vocab_size")
    for role in ("eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if isinstance(vocab, int) and isinstance(token_id, int) and token_id >= vocab:
            raise ModelFilesError(f"{what}: the tokenizer's {role} token has id {token_id}, beyond the model's "
                                  f"vocab_size {vocab}: the tokenizer belongs to another model")  # fmt: skip


def check_model_dir(folder: Path, what: str) -> None:
    """All checks of a model directory (`what` names it in errors, e.g. `model.path models/sources/x`)."""
    from .remote_code import check_no_custom_code

    check_no_custom_code(folder, what)  # before any file of it is read by transformers
    check_config(folder, what)
    check_shapes(folder, what, check_weights(folder, what))  # first: a config transformers cannot build is named
    check_vocab(folder, what, check_tokenizer(folder, what))  # as such, not as a tokenizer that does not load


RUN_KEYS = ("local_files_only",)  # how a tokenizer was loaded (HF_HUB_OFFLINE), not what it is


def save_tokenizer(tokenizer, folder: Path) -> None:
    """`save_pretrained`, less tokenizer_config.json's keys that record how it was loaded: otherwise the same
    tokenizer saved with and without HF_HUB_OFFLINE hashes differently, and DVC re-runs every later stage."""
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if any(k in config for k in RUN_KEYS):
            kept = {k: v for k, v in config.items() if k not in RUN_KEYS}
            path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
