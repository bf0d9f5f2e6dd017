"""Stage 1, download: raw records → data/raw, base model and tokenizer → models/base.

Sources are pinned (a URL's sha256, a Hub commit) and written to a manifest beside each output, so dvc.lock
plus the manifests say exactly which data and which weights a run used.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from stages.lib.convert import CONVERTERS
from stages.lib.data.mix import summary_line
from stages.lib.core.model_files import check_model_dir, check_tokenizer, save_tokenizer
from stages.lib.data.read import data_files
from stages.lib.data.sources import DATA_SOURCES, MODEL_SOURCES, hub_errors, hub_limits
from stages.lib.core.errors import run_stage
from stages.lib.core.paths import tracked_path
from stages.lib.core.outputs import scratch_dir, staged_outputs, write_json
from stages.lib.core.params import LocalSource, Params, ParamsError, load_params
from stages.lib.core.progress import phase
from stages.lib.core.recipes import ConfigModel, HubModel, ModelRecipe, model_recipe

RAW_DIR = Path("data/raw")
BASE_DIR = Path("models/base")
# What a model directory needs; never pickled weights (*.bin, *.pt), which can run code when loaded.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_raw(params: Params, out: Path) -> dict:
    from stages.lib.data.mix import build_raw

    work = scratch_dir(out.parent, "download")  # Arrow caches of the sources
    try:
        manifest = build_raw(params.data, params.seed, out, work, params.network)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(out / "manifest.json", manifest)
    return manifest


TRAIN_PIECE = 1000  # characters: BPE training time grows with the square of a word's length, so no word is longer


def training_texts(raw: Path):
    """The text a tokenizer built from config learns from: the training split's message contents, reasoning, tool
    calls and tool schemas, in pieces of at most TRAIN_PIECE characters (one 1 MB answer without spaces otherwise
    takes BPE training hours)."""
    with open(raw / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            texts = [record.get("tools", "")]
            for m in record["messages"]:
                texts += [m["content"], m.get("reasoning") or ""]
                texts += [json.dumps({"name": c["name"], "arguments": json.loads(c["arguments"])}, ensure_ascii=False)
                          for c in m.get("tool_calls") or []]  # as the templates write a call
            for text in filter(None, texts):
                yield from (text[i : i + TRAIN_PIECE] for i in range(0, len(text), TRAIN_PIECE))


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on the data, with ChatML special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # One token never spans two CJK characters, so words map to tokens as they do in production tokenizers.
    cjk = pre_tokenizers.Split(Regex(r"[\u3400-\u9fff]"), behavior="isolated")
    bpe.pre_tokenizer = pre_tokenizers.Sequence([cjk, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_JINJA
    )


def build_from_config(source: ConfigModel, recipe: ModelRecipe, params: Params, raw: Path, out: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if params.model.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(params.model.tokenizer, trust_remote_code=params.model.trust_remote_code)
    else:
        tokenizer = train_tokenizer(training_texts(raw), source.tokenizer_vocab_size)
    seed = params.seed
    config = AutoConfig.for_model(
        source.model_type,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **source.config,
    )
    # Random init of a multi-billion model takes minutes on a CPU and seconds on a GPU. The weights then depend on
    # the device that drew them (both are seeded): the CPU default stays bit-identical from run to run.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, recipe.dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return {"kind": "config", "model_type": source.model_type, "seed": seed, "device": device, "config": source.config}


def fetch_hub(source: HubModel, recipe: ModelRecipe, params: Params, out: Path) -> dict:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    patterns = list(MODEL_FILES)
    if recipe.converter and params.model.convert:
        patterns.append("pytorch_model*.bin")  # read as tensors only (weights_only), then rewritten as safetensors
    elif recipe.trust_remote_code:
        patterns.append("*.py")
    # Through the Hub cache (resumable, shared, and usable offline with HF_HUB_OFFLINE=1 once filled), then copied
    with hub_errors(f"hub model {source.repo}@{source.revision} (model recipe {params.model.recipe})"):
        snapshot = Path(snapshot_download(
            source.repo, revision=source.revision, allow_patterns=patterns, local_files_only=constants.HF_HUB_OFFLINE
        ))  # fmt: skip
    files = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
    for name in sorted(filter_repo_objects(files, allow_patterns=patterns)):  # a cached snapshot may hold more
        path, target = snapshot / name, out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)  # the cache holds symlinks to blobs: copy their content
    if not any(out.rglob("*.safetensors")) and not recipe.converter:
        raise ParamsError(f"{source.repo}@{source.revision} has no *.safetensors weights (pickled weights are not loaded)")
    return {"kind": "hub", "repo": source.repo, "revision": source.revision}


def copy_local(path: Path, out: Path) -> dict:
    """Copy a local model directory (checked by check_inputs: under models/sources/, whole)."""
    files = sorted({p for pattern in MODEL_FILES for p in path.glob(pattern)})
    for p in files:
        shutil.copy2(p, out / p.name)
    return {"kind": "local", "path": str(path)}


def write_base(params: Params, raw: Path, out: Path) -> None:
    recipe = model_recipe(params.model.recipe)
    if params.model.path:
        phase("download", f"model: copying {params.model.path}")
        origin = copy_local(Path(params.model.path), out)
    elif isinstance(recipe.source, ConfigModel):
        how = f"tokenizer from {params.model.tokenizer}" if params.model.tokenizer else "tokenizer trained on the data"
        phase("download", f"model: building {recipe.source.model_type} from recipe {params.model.recipe} ({how})")
        origin = build_from_config(recipe.source, recipe, params, raw, out)
    else:
        phase("download", f"model: fetching {recipe.source.repo}@{recipe.source.revision[:12]} (through the Hub cache)")
        origin = fetch_hub(recipe.source, recipe, params, out)
    if recipe.converter and params.model.convert:
        phase("download", f"model: converting to the native transformers layout ({recipe.converter})")
        origin["converted"] = CONVERTERS[recipe.converter](out)
    check_model_dir(out, f"the model of recipe '{params.model.recipe}' ({origin['kind']} source)")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    write_json(out / "manifest.json", {"source": origin, "recipe": params.model.recipe, "files": sizes})


def check_inputs(params: Params) -> None:
    """Before any download: local paths lie in the folders dvc.yaml declares and exist, a model that would
    run its Hub code has the user's explicit opt-in, and local model and tokenizer folders are whole (model_files)."""
    for i, src in enumerate(params.data.sources):
        if isinstance(src, LocalSource):
            data_files(tracked_path(src.path, f"data.sources.{i}.path", DATA_SOURCES))
    recipe = model_recipe(params.model.recipe)
    for key in ("path", "tokenizer"):
        value = getattr(params.model, key)
        if value and not tracked_path(value, f"model.{key}", MODEL_SOURCES).is_dir():
            what = "does not exist" if not Path(value).exists() else "is a file, not a directory"
            raise ParamsError(f"model.{key} {value} {what}: give the model's folder under {MODEL_SOURCES}/")
    if params.model.tokenizer and not isinstance(recipe.source, ConfigModel):
        raise ParamsError(
            f"model.tokenizer is for recipes built from config (like tiny-llama); '{params.model.recipe}' comes "
            "with its own tokenizer: set model.tokenizer: null"
        )
    needs = recipe.trust_remote_code and not (recipe.converter and params.model.convert)
    if needs and not params.model.trust_remote_code:
        raise ParamsError(
            f"model recipe '{params.model.recipe}' runs code from its Hub repository: set model.trust_remote_code "
            "true to allow it (or keep model.convert true where the recipe has a converter)"
        )
    # the slower checks last: the rules above need no file read
    if params.model.path and not (recipe.converter and params.model.convert):  # a converter reads its own layout
        check_model_dir(Path(params.model.path), f"model.path {params.model.path}")
    if params.model.tokenizer:
        check_tokenizer(Path(params.model.tokenizer), f"model.tokenizer {params.model.tokenizer}")


def main() -> None:
    params = load_params()
    hub_limits(params.network)
    check_inputs(params)
    # both outputs are replaced together, after both succeeded: a bad model never leaves new data beside old weights
    with staged_outputs() as out:
        raw, base = out.dir(RAW_DIR), out.dir(BASE_DIR)
        manifest = write_raw(params, raw)
        write_base(params, raw, base)
    print(f"{summary_line(manifest)}; base model ready")


if __name__ == "__main__":
    run_stage(main)
