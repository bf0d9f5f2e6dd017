"""Checking a model directory before it becomes models/base: a folder that would fail in train fails at download.

Cheap checks only, no weights loaded: config.json parses, every safetensors file's header parses and its size is
what the header says (a truncated copy is caught), a sharded index names files that exist, and the tokenizer loads
and has an end-of-sequence token (the stop token of every answer).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..core.errors import UserError

MAX_HEADER = 100 << 20  # bytes; safetensors itself refuses larger headers


class ModelFilesError(UserError):
    pass


def check_config(folder: Path, what: str) -> None:
    """config.json exists and is a JSON object with a model_type."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFilesError(f"{what} has no config.json: copy the whole model folder (config.json, *.safetensors, "
                              "tokenizer files)")  # fmt: skip
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFilesError(f"{path} is not valid JSON ({exc}): copy it again from the model's source") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelFilesError(f"{path} has no model_type: it is not a transformers model config")


def check_safetensors(path: Path) -> None:
    """The file's header parses and the tensors it lists end exactly at the end of the file.

    Format (safetensors): 8 bytes little-endian header length N, N bytes of JSON, then the tensor data, whose
    `data_offsets` are relative to the end of the header.
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
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise ModelFilesError(f"{path} is {state} ({size} bytes, its header needs {expected}): copy it again "
                              "from the model's source")  # fmt: skip


def check_weights(folder: Path, what: str) -> None:
    """Every *.safetensors file is whole, and a sharded index's files are all there."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFilesError(f"{what} has no *.safetensors weights (pickled weights are not loaded)")
    for path in files:
        check_safetensors(path)
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelFilesError(f"{index} is not a valid safetensors index: copy it again") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelFilesError(f"{what}: {index.name} lists {', '.join(missing)}, which is missing: copy every shard")


def check_tokenizer(folder: Path, what: str):
    """The tokenizer loads and has an EOS token; returns it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - each tokenizer backend fails its own way; all mean "not loadable"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFilesError(f"{what}: the tokenizer does not load ({type(exc).__name__}: {first[:200]}); "
                              "copy its tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)") from None  # fmt: skip
    if tokenizer.eos_token is None:
        raise ModelFilesError(f"{what}: the tokenizer has no EOS token, which ends every trained answer: set "
                              "\"eos_token\" in its tokenizer_config.json (e.g. \"</s>\" or \"<|endoftext|>\")")  # fmt: skip
    return tokenizer


def check_model_dir(folder: Path, what: str) -> None:
    """All checks of a model directory (`what` names it in errors, e.g. `model.path models/sources/x`)."""
    check_config(folder, what)
    check_weights(folder, what)
    check_tokenizer(folder, what)
