"""What a written GGUF file holds, read back with gguf-py's reader: the metadata the stage promises (chat template,
stop tokens, no BOS/EOS added by llama.cpp, the training vocabulary) and its tensors."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import UserError

TEMPLATE = "tokenizer.chat_template"
EOS = "tokenizer.ggml.eos_token_id"
EOT = "tokenizer.ggml.eot_token_id"
ADD_BOS = "tokenizer.ggml.add_bos_token"
TOKENS = "tokenizer.ggml.tokens"


def read(gguf, path: Path) -> dict:
    """The GGUF file's metadata values by key (lists as lists, strings decoded) and its tensors as
    {name: (type name, shape)}, through `gguf` (the gguf-py module)."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}
    return {"meta": meta, "tensors": tensors}


def check(gguf, path: Path, chat_template: str, stop_ids: list[int], vocabulary: list[str]) -> dict:
    """UserError unless `path` holds `chat_template`, stops at `stop_ids` (EOS first, then EOT), adds no BOS,
    lists `vocabulary` (token texts by id) first among its tokens, and has tensors. Returns a summary
    for metrics/export.json: type, size in bytes, tensors, vocabulary size."""
    got = read(gguf, path)
    meta = got["meta"]
    problems = []
    if meta.get(TEMPLATE) != chat_template:
        problems.append("its chat template is not the training one")
    if [meta.get(EOS), meta.get(EOT)][: min(len(stop_ids), 2)] != stop_ids[:2]:
        problems.append(f"its stop tokens (EOS, EOT) are not {stop_ids[:2]}")
    if meta.get(ADD_BOS) is not False:
        problems.append("llama.cpp would add a BOS token the training prompt does not have")
    if meta.get(TOKENS, [])[: len(vocabulary)] != vocabulary:
        problems.append("its token list is not the training tokenizer's")
    if not got["tensors"]:
        problems.append("it has no tensors")
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)} (llama.cpp's converter wrote it so); the GGUF is not kept")
    types = sorted({t for t, _ in got["tensors"].values()})
    return {"bytes": path.stat().st_size, "tensors": len(got["tensors"]), "tensor_types": types,
            "vocab_size": len(meta.get(TOKENS, [])), "pre_tokenizer": meta.get("tokenizer.ggml.pre")}  # fmt: skip
