"""Reading the outputs of earlier stages (data/raw, data/tokenized, model folders) back in a later stage.

A stage run by hand (`python -m stages.train`) reads whatever is on disk. A file truncated or edited since its
stage wrote it would fail deep inside json, pyarrow or datasets with a traceback; here it is one line that names
the file, why it does not read, and the two ways to get it back (`dvc checkout`, or re-running its stage).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError, environment_error
from .outputs import sha256_file


class DamagedOutput(UserError):
    """An output an earlier stage wrote does not read back."""


def damaged(path: str | Path, reason: str, output: str | Path, stage: str) -> DamagedOutput:
    """The error for `path`, a file of `output` (a dvc.yaml output of `stage`), that does not read back."""
    return DamagedOutput(f"{path} is damaged ({reason}): restore it with `dvc checkout {output}` or re-run the stage "
                         f"that writes it with `dvc repro -f -s {stage}`")  # fmt: skip


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def reading(path: str | Path, output: str | Path, stage: str,
            locate: Callable[[], Path | None] | None = None) -> Iterator[None]:  # fmt: skip
    """Around code that reads `path` (in `output`, written by `stage`): what the parsers raise becomes `damaged`,
    naming the file `locate()` finds if it finds one; a UserError (a check of the stage itself) passes unchanged."""
    try:
        yield
    except (UserError, MemoryError):
        raise
    except Exception as exc:  # json, pyarrow, datasets and tokenizers each raise their own kinds
        said = environment_error(exc)  # a full disk (datasets' cache) or an unreadable folder is no damage
        if said is not None:
            raise said from None
        raise damaged((locate and locate()) or path, _reason(exc), output, stage) from None


def read_json(path: Path, output: str | Path, stage: str, keys: tuple[str, ...] = ()) -> dict:
    """A JSON object an earlier stage wrote, with `keys` in it."""
    with reading(path, output, stage):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise damaged(path, f"a JSON {type(data).__name__}, not an object", output, stage)
    missing = [k for k in keys if k not in data]
    if missing:
        raise damaged(path, f"no key {missing[0]!r}", output, stage)
    return data


def check_digests(folder: Path, digests: dict[str, str], record: Path, stage: str) -> None:
    """Each file of `folder` named in `digests` (name → sha256, as `record` lists them) is whole and unchanged: a
    JSON Lines file cut at a line's end would otherwise read as fewer records, without any error."""
    for name, digest in sorted(digests.items()):
        path = folder / name
        with reading(path, folder, stage):
            actual = sha256_file(path)
        if actual != digest:
            raise damaged(path, f"its sha256 is not the one {record} records: truncated or edited since", folder, stage)


def check_model_output(folder: Path, stage: str) -> dict[str, tuple[int, ...]]:
    """A model folder `stage` wrote (models/base, models/adapter, models/merged) is whole before its weights load:
    every JSON file parses, a folder with config.json or adapter_config.json has safetensors weights, every
    safetensors file's header and size agree, and a whole model's tensor names and shapes are the ones its
    config.json builds on the meta device (model_files; no weights read). DamagedOutput names the file. Returns
    the tensors' shapes by name, as the safetensors headers give them."""
    from .model_files import ModelFilesError, check_safetensors, check_shapes, read_json
    from .remote_code import check_no_custom_code

    check_no_custom_code(folder, str(folder))  # its own code runs only with model.trust_remote_code
    shapes: dict = {}
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        try:
            if path.suffix == ".json":
                read_json(path)
            else:
                shapes |= check_safetensors(path)
        except ModelFilesError as exc:
            # model_files' own advice ("copy it again from the model's source") is for a source folder: cut it
            reason = str(exc).removeprefix(f"{path} ").rsplit(": copy", 1)[0].removeprefix("is ")
            raise damaged(path, reason, folder, stage) from None
    described = [name for name in ("config.json", "adapter_config.json") if (folder / name).is_file()]
    if described and not shapes:  # a model or adapter whose weights were deleted: from_pretrained's traceback else
        raise damaged(folder, f"{described[0]} but no *.safetensors weights", folder, stage)
    if shapes and (folder / "config.json").is_file():  # a whole model: tensor names and shapes match its config
        try:
            check_shapes(folder, str(folder), shapes)
        except ModelFilesError as exc:
            reason = str(exc).removeprefix(f"{folder}: ").split(": ")[0]
            raise damaged(folder, reason, folder, stage) from None
    return shapes


def check_adapter(adapter: Path, base: Path) -> None:
    """A LoRA adapter train wrote (models/adapter) fits the base it goes on, before any weight loads: its tensors
    are the ones PEFT builds from its adapter_config.json on `base`'s model (built on the meta device), with the
    same shapes, and every file is the one train_config.json's `files` digests name. PEFT only warns about a missing tensor and keeps its random (lora_A) or zero (lora_B) init
    there, so a renamed tensor would be merged as noise; an edited `r` fails deep in loading. DamagedOutput
    naming the adapter otherwise. A base that needs its own Hub code (auto_map) is not built here: only the
    files' integrity is checked then."""
    import copy

    import torch
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .model_files import meta_model

    saved = check_model_output(adapter, "train")
    record = adapter / "train_config.json"
    if record.is_file():  # what train wrote, byte for byte: an edited lora_alpha or weight value shows here
        check_digests(adapter, read_json(record, adapter, "train").get("files") or {}, record, "train")
    shared = meta_model(base, str(base))  # the cached build the base's own check used; None: Hub code (auto_map)
    if shared is None:
        return
    built = copy.deepcopy(shared)  # a model of its own: PEFT changes the model it wraps
    with reading(adapter / "adapter_config.json", adapter, "train"):  # an unknown peft_type, targets it lacks
        config = PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig._get_peft_type(str(adapter))].from_pretrained(str(adapter))
        config.base_model_name_or_path = None  # where it was trained from: PEFT warns when it differs from `base`
        with torch.device("meta"):
            model = get_peft_model(built, config)
    expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(model).items()}
    kind = getattr(config.peft_type, "value", config.peft_type)
    what = f"adapter_config.json ({kind}, r={getattr(config, 'r', '?')}) on {base}"
    for name, shape in expected.items():
        if name not in saved:
            raise damaged(adapter, f"the weights have no tensor {name}, which {what} needs (renamed or missing)",
                          adapter, "train")  # fmt: skip
        if saved[name] != shape:
            raise damaged(adapter, f"tensor {name} has shape {list(saved[name])} where {what} makes it "
                          f"{list(shape)}", adapter, "train")  # fmt: skip
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise damaged(adapter, f"the weights hold {len(extra)} tensor(s) that {what} does not make, e.g. {extra[0]}",
                      adapter, "train")  # fmt: skip
    _check_finite(adapter)


def _check_finite(adapter: Path) -> None:
    """Every adapter tensor is finite: a NaN would spread through the whole merged model (adapters are megabytes,
    read here in full)."""
    import torch
    from safetensors import safe_open

    for path in sorted(adapter.glob("*.safetensors")):
        with reading(path, adapter, "train"), safe_open(str(path), "pt") as f:
            for name in f.keys():
                if not torch.isfinite(f.get_tensor(name)).all():
                    raise damaged(path, f"tensor {name} holds NaN or infinite values", adapter, "train")


# the columns tokenize writes that later stages read: every split, and the validation split's for eval and serving
TOKENIZED_COLUMNS = {
    "train": ("input_ids", "assistant_masks"),
    "validation": ("input_ids", "assistant_masks", "prompt_length", "reference", "messages"),
}


def load_saved(folder: Path, stage: str, splits: tuple[str, ...] = ("train", "validation")):
    """`datasets.load_from_disk(folder)`: the DatasetDict `stage` saved, with `splits` and their TOKENIZED_COLUMNS.
    A file that does not read back is named (the DatasetDict's JSON, a split's state or info, an Arrow file cut
    short), and so is a split without a column the later stages read (a hand-edited set would fail minutes in)."""
    from datasets import load_from_disk

    with reading(folder, folder, stage, locate=lambda: _first_damaged(folder)):
        data = load_from_disk(str(folder))
    missing = [s for s in splits if s not in data]
    if missing:
        raise damaged(folder / "dataset_dict.json", f"it lists no split {missing[0]!r}", folder, stage)
    for split in splits:
        absent = [c for c in TOKENIZED_COLUMNS.get(split, ()) if c not in data[split].column_names]
        if absent:
            raise damaged(folder / split, f"no column {absent[0]!r} (it has {', '.join(data[split].column_names)})",
                          folder, stage)  # fmt: skip
        features = data[split].features
        for column, want in COLUMN_TYPES.items():
            if column in features and _kind(features[column]) != want:
                raise damaged(folder / split, f"column {column!r} holds {features[column]}, not {want}", folder, stage)
    return data


COLUMN_TYPES = {"input_ids": "a list of integers", "assistant_masks": "a list of integers",
                "prompt_length": "an integer", "reference": "text"}  # fmt: skip


def _kind(feature) -> str:
    """COLUMN_TYPES' words for a datasets feature (List(Value('int32')) is "a list of integers")."""
    dtype = getattr(feature, "dtype", None)
    inner = getattr(getattr(feature, "feature", None), "dtype", None)
    if isinstance(inner, str) and inner.startswith(("int", "uint")):
        return "a list of integers"
    if isinstance(dtype, str) and dtype.startswith(("int", "uint")):
        return "an integer"
    return "text" if dtype in ("string", "large_string") else str(feature)


def load_tokenizer(folder: Path, output: Path, stage: str):
    """`AutoTokenizer.from_pretrained(folder)`: the tokenizer `stage` saved into `output`; a damaged one names its
    first file that does not read (JSON that does not parse, text that is not UTF-8)."""
    from transformers import AutoTokenizer

    from .remote_code import check_no_custom_code, trusted

    check_no_custom_code(folder, str(folder))
    with reading(folder, output, stage, locate=lambda: _first_unreadable(folder)):
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trusted())


def _first_unreadable(folder: Path) -> Path | None:
    """The first JSON or Jinja file in `folder` that does not parse or decode, else None."""
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.jinja")):
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".json":
                json.loads(text)
        except (OSError, ValueError):
            return path
    return None


def _first_damaged(folder: Path) -> Path | None:
    """The first file of a saved DatasetDict in `folder` that does not read back on its own, else None."""
    import pyarrow as pa

    names = _json_or_none(folder / "dataset_dict.json")
    if not isinstance(names, dict):
        return folder / "dataset_dict.json"
    for split in names.get("splits", []):
        for meta in ("state.json", "dataset_info.json"):
            if not isinstance(_json_or_none(folder / split / meta), dict):
                return folder / split / meta
        state = _json_or_none(folder / split / "state.json")
        for entry in state.get("_data_files", []):
            arrow = folder / split / str(entry.get("filename", "")) if isinstance(entry, dict) else folder / split
            try:
                with pa.memory_map(str(arrow)) as source:
                    pa.ipc.open_stream(source).read_all().validate()
            except (OSError, ValueError, pa.ArrowException):
                return arrow
    return None


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
