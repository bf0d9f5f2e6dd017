"""The one schema for params.yaml.

Every stage calls `load_params()` first: it imports only pydantic and ruamel.yaml (the YAML reader DVC records
params.yaml with), so a bad file fails in well under a second, before any model, dataset or output is touched.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .errors import UserError
from .urls import mask_urls, url_problem

PARAMS_FILE = Path("params.yaml")
Dtype = Literal["bfloat16", "float16", "float32"]


class Strict(BaseModel):
    # strict: "8", 8.0 or true is not quietly an int, nor "1e-4" a float; inf and nan are no number of anything
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------- data


# Fields each record format defines (our names); `columns` maps any of them to the file's own column name.
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "messages": ("messages", "role", "content", "system", "tools"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),  # continued pre-training: every token trained
}
Role = Literal["user", "assistant", "system", "tool"]


class SourceOptions(Strict):
    """How one source's records are read and how much of it goes into the mixture."""

    format: Literal["alpaca", "messages", "prompt_completion", "text"] = "alpaca"
    columns: dict[str, str] = {}  # our field name -> the file's column (or message key) name
    roles: dict[str, Role] = {}  # the file's role values -> ours, added to human/gpt/user/assistant/system/tool
    max_records: Annotated[int, Field(ge=1)] | None = None  # the first N records of this source
    weight: Annotated[float, Field(gt=0, le=100)] = 1.0  # 0.5: a seeded half of its records; 2: each one twice
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$")] | None = None  # in the counts; default from the source

    @model_validator(mode="after")
    def _known_columns(self):
        if self.roles and self.format != "messages":
            raise ValueError(f"roles maps role values of messages records; this source's format is {self.format}")
        known = FORMAT_FIELDS[self.format]
        unknown = sorted(set(self.columns) - set(known))
        if unknown:
            raise ValueError(
                f"columns: '{unknown[0]}' is not a field of format {self.format} (its fields: {', '.join(known)}); "
                "the keys are our names, the values the file's"
            )
        return self


class BuiltinSource(SourceOptions):
    kind: Literal["builtin"]
    name: Literal["toy-zh-en"] = "toy-zh-en"  # the generated set (also its name in the counts)


class LocalSource(SourceOptions):
    kind: Literal["local"]
    path: str  # a file or a directory of files under data/sources/ (a DVC dependency)


def _hex_digest(digits: int, what: str) -> BeforeValidator:
    """A digest of `digits` hex digits in either case (some tools print upper case), kept in lower case."""

    def check(value: Any) -> Any:
        if isinstance(value, str):  # anything else meets the strict type check after this
            value = value.lower()
            if not re.fullmatch(f"[0-9a-f]{{{digits}}}", value):
                raise PydanticCustomError("hex_digest", f"must be {what}")
        return value

    return BeforeValidator(check)


def _usable_url(value: str) -> str:
    """An http(s) URL that parses (host, port, IPv6 brackets); the error names the problem, not a regex."""
    problem = url_problem(value)
    if problem:
        raise PydanticCustomError("url_syntax", "not a usable download URL: {problem}", {"problem": problem})
    return value


class UrlSource(SourceOptions):
    kind: Literal["url"]
    url: Annotated[str, AfterValidator(_usable_url)]
    sha256: Annotated[str, _hex_digest(64, "the file's SHA-256, 64 hex digits (as `sha256sum <file>` prints it)"),
                      Field(description="required: pins the download")]


class HubSource(SourceOptions):
    kind: Literal["hub"]
    repo: Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")]  # org/name on the Hub, never a local path
    revision: Annotated[str, _hex_digest(40, "a full commit hash, 40 hex digits (a branch or tag can move)"),
                        Field(description="a full commit hash: pins the download")]
    split: str = "train"
    subset: str | None = None


DataSource = Annotated[Union[BuiltinSource, LocalSource, UrlSource, HubSource], Field(discriminator="kind")]
MOVED = {  # keys of earlier versions, and where they live now
    "data.source": "data.sources (a list of sources)",
    "data.format": "data.sources.N.format (each source has its own)",
    "data.max_records": "data.sources.N.max_records (each source has its own)",
    "tokenize.validation_fraction": "data.validation_fraction",
    "tokenize.max_validation": "data.max_validation",
}


class DataParams(Strict):
    sources: Annotated[list[DataSource], Field(min_length=1)]
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1  # of the unique records, by a seeded hash
    max_validation: Annotated[int, Field(ge=1)] = 200

    @model_validator(mode="after")
    def _one_kind_of_text(self):
        formats = {s.format for s in self.sources}
        if "text" in formats and len(formats) > 1:
            raise ValueError(
                "data.sources: text sources are continued pre-training (every token trained), the other formats train "
                "answers to prompts; one run takes either kind, not both (train one, then the other from its merge)"
            )
        if "prompt_completion" in formats and len(formats) > 1:
            raise ValueError(
                "data.sources: prompt_completion text is used as is, the other formats are rendered in a chat "
                "template; one run takes either kind, not both"
            )
        return self


# ---------------------------------------------------------------- model


# RoPE scaling types (transformers' `rope_type`s) and, per type, the keys besides type and factor that it requires
# and those it may have (modeling_rope_utils: llama3 has no defaults for its frequency band, longrope none for its
# per-dimension factors; original_max_position_embeddings defaults to the model's own context)
ROPE_TYPE_KEYS = {
    "linear": ((), ()),
    "dynamic": ((), ()),
    "yarn": ((), ("original_max_position_embeddings",)),
    "llama3": (("low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
    "longrope": (("short_factor", "long_factor"), ("original_max_position_embeddings",)),
}
RopeFactors = Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)]


class RopeScaling(Strict):
    """Rotary position embeddings stretched to `factor` x the context the model was trained for."""

    type: Literal["linear", "dynamic", "yarn", "llama3", "longrope"]
    factor: Annotated[float, Field(gt=1)]  # new context = factor x original_max_position_embeddings
    original_max_position_embeddings: Annotated[int, Field(ge=1)] | None = None  # null: the model's own context
    low_freq_factor: Annotated[float, Field(gt=0)] | None = None  # llama3
    high_freq_factor: Annotated[float, Field(gt=0)] | None = None  # llama3
    short_factor: RopeFactors | None = None  # longrope: one per rotary frequency (head size x rotary share / 2)
    long_factor: RopeFactors | None = None  # longrope

    @model_validator(mode="after")
    def _keys_of_type(self):
        required, optional = ROPE_TYPE_KEYS[self.type]
        given = {k for k in type(self).model_fields if k not in ("type", "factor") and getattr(self, k) is not None}
        missing = [k for k in required if k not in given]
        if missing:
            raise ValueError(f"model.rope_scaling: type {self.type} needs {' and '.join(missing)} (transformers has "
                             "no default for them; the model card gives its values)")  # fmt: skip
        extra = sorted(given - set(required) - set(optional))
        if extra:
            allowed = ", ".join(("factor", *required, *optional))
            raise ValueError(f"model.rope_scaling: type {self.type} takes no {extra[0]} (it takes {allowed})")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"model.rope_scaling: high_freq_factor ({self.high_freq_factor}) must be above "
                             f"low_freq_factor ({self.low_freq_factor})")  # fmt: skip
        if self.type == "longrope" and len(self.short_factor) != len(self.long_factor):
            raise ValueError(f"model.rope_scaling: short_factor has {len(self.short_factor)} values and long_factor "
                             f"{len(self.long_factor)}; both have one per rotary frequency")  # fmt: skip
        return self


class ModelParams(Strict):
    recipe: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$")]
    path: str | None = None  # a local directory under models/sources/; replaces the recipe's hub source
    tokenizer: str | None = None  # a recipe built from config: a tokenizer directory under models/sources/
    trust_remote_code: bool = False
    convert: bool = True  # checkpoints with a native equivalent (ChatGLM2 → GLM) are converted at download
    rope_scaling: RopeScaling | None = None  # longer contexts than the model was trained for; null: as trained


# ---------------------------------------------------------------- tokenize


class TokenizeParams(Strict):
    template: str | None = None  # a name in recipes/templates; null: the model recipe's
    assistant_turns: Literal["all", "last"] = "all"  # which answers of a multi-turn record carry loss
    reasoning: Literal["train", "drop"] = "train"  # an answer's reasoning: trained with it, or left out of the row
    max_length: Annotated[int, Field(ge=8, le=2**20)] = 512
    unknown_markers: bool = False  # true: train although the template's markers become <unk> tokens
    # share of the answer tokens that may be <unk> (the tokenizer cannot spell them) before tokenize stops; 1: train
    # on the rest anyway. <unk> is never a target either way.
    max_unk_share: Annotated[float, Field(ge=0, le=1)] = 0.01


# ---------------------------------------------------------------- train


class QuantParams(Strict):
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    storage_dtype: Dtype | None = None  # null: the compute dtype (train.dtype), which ZeRO-3 requires


class LoraParams(Strict):
    r: Annotated[int, Field(ge=1, le=4096)] = 8
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    # null: the model recipe's; an empty list is refused (it read as null, silently)
    target_modules: Annotated[list[str], Field(min_length=1)] | Literal["all-linear"] | None = None
    # PEFT's target_parameters: a mixture of experts' 3-D expert stacks by name suffix (mlp.experts.gate_up_proj,
    # mlp.experts.down_proj); [] leaves the experts frozen
    target_parameters: list[Annotated[str, Field(min_length=1)]] = []

    @model_validator(mode="after")
    def _parameters(self) -> "LoraParams":
        if self.target_parameters and self.dropout:
            raise ValueError(
                f"train.lora.dropout must be 0 with train.lora.target_parameters (it is {self.dropout}): PEFT cannot "
                "apply dropout inside a LoRA on a parameter"
            )
        return self


class LaunchParams(Strict):
    nodes: Annotated[int, Field(ge=1)] = 1
    gpus_per_node: Annotated[int, Field(ge=1)] | None = None  # null: every visible GPU (1 process on CPU)
    runner: Literal["pdsh", "openmpi", "slurm", "no-ssh"] = "pdsh"
    hostfile: str | None = None  # DeepSpeed hostfile: one "host slots=N" line per node
    include: Annotated[str, Field(min_length=1)] | None = None  # DeepSpeed's --include, to pick hosts and GPUs: "node0:0,1@node1:2,3"
    node_rank: Annotated[int, Field(ge=0)] = 0  # only for runner no-ssh: this node's rank
    master_addr: str = "127.0.0.1"
    master_port: Annotated[int, Field(ge=1024, le=65535)] = 29500
    timeout_minutes: Annotated[float, Field(gt=0)] = 30  # collectives that wait longer fail instead of hanging


class TrainParams(Strict):
    method: Literal["qlora", "lora", "full"] = "qlora"
    dtype: Dtype = "bfloat16"
    quant: QuantParams = QuantParams()
    lora: LoraParams = LoraParams()
    learning_rate: Annotated[float, Field(gt=0)] = 2e-4
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "sgd"] = "adamw_torch"
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    # NEFTune: uniform noise of alpha / sqrt(tokens x hidden size) on the input embeddings in training steps only
    neftune_noise_alpha: Annotated[float, Field(gt=0)] | None = None
    # upper bounds: beyond them a run is a typo (1e30 steps train forever at a learning rate of ~0)
    epochs: Annotated[float, Field(gt=0, le=10**6)] = 1
    max_steps: Annotated[int, Field(ge=-1, le=10**9)] = -1  # > 0 overrides epochs; -1: by epochs
    batch_size: Annotated[int, Field(ge=1, le=2**16)] = 8
    grad_accum: Annotated[int, Field(ge=1, le=2**16)] = 1
    packing: bool = True  # padding-free BFD packing; attention never crosses samples
    packed_length: Annotated[int, Field(ge=8, le=2**22)] | None = None  # tokens per packed row; null: tokenize.max_length
    # true: recompute each layer; selective: keep the attention block's products; offload: layer inputs in pinned host
    # RAM (CUDA only; no ZeRO-3); selective under ZeRO-3 is refused; auto: the planner's choice (python -m stages.plan)
    gradient_checkpointing: bool | Literal["selective", "offload", "auto"] = False
    # with true or selective: checkpoint only the first N decoder layers, the rest keep their activations (faster,
    # more memory); null: every layer (under gradient_checkpointing auto: the planner picks N, the fewest that fit)
    checkpoint_layers: Annotated[int, Field(ge=1, le=10**6)] | None = None
    reentrant_checkpointing: bool | None = None  # null: reentrant under ZeRO-3 only
    # varlen: packed rows attend per sample in torch's flash kernel (stages/lib/train/varlen_attention.py); needs packing
    attn_implementation: Literal[
        "sdpa", "varlen", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"
    ] = "sdpa"
    liger: bool = False
    fused_lora: bool = True  # LoRA's scale and sum inside one addmm (stages/lib/train/fused_lora.py); false: PEFT's
    token_metrics: bool = True  # TRL's per-step entropy and token accuracy; false is faster
    logging_steps: Annotated[int, Field(ge=1, le=10**9)] = 10
    # checkpoints (models/checkpoints) that an interrupted run resumes from; deleted when the run completes
    save_steps: Annotated[int, Field(ge=1, le=10**9)] | None = None  # every N optimizer steps; null: by time only
    save_minutes: Annotated[float, Field(gt=0)] | None = 30  # also after N minutes since the last one; null: by steps only
    save_total_limit: Annotated[int, Field(ge=1)] = 2  # complete checkpoints kept (the newest)
    eval_steps: Annotated[int, Field(ge=1, le=10**9)] | None = None  # answer loss on the validation split every N steps
    report_to: list[str] = []  # trackers besides DVCLive: transformers' integration names (wandb, mlflow, ...)
    device_map: Literal["auto"] | None = None
    deepspeed: str | None = None  # a name in recipes/deepspeed or a path to a JSON file; auto: the planner's choice
    launch: LaunchParams = LaunchParams()

    @model_validator(mode="after")
    def _coherent(self) -> "TrainParams":
        storage = self.quant.storage_dtype
        if self.method == "qlora" and storage is not None and storage != self.dtype:
            raise ValueError(
                f"train.quant.storage_dtype ({storage}) must equal train.dtype ({self.dtype}): 4-bit weights are "
                "stored in that dtype so that ZeRO-3 can shard them with the rest of the model"
            )
        if self.method == "qlora" and self.dtype == "float16" and self.deepspeed:
            raise ValueError("train.dtype float16 with QLoRA under DeepSpeed is not supported: use bfloat16")
        if self.lora.target_parameters and self.method == "full":
            raise ValueError("train.lora.target_parameters is LoRA's: with train.method full every weight trains "
                             "already; empty it or use method qlora or lora")
        if self.attn_implementation == "varlen" and not self.packing:
            raise ValueError(
                "train.attn_implementation 'varlen' needs train.packing: true (it reads the sample boundaries of "
                "packed rows); use sdpa for padded batches"
            )
        mode, reentrant = self.gradient_checkpointing, self.reentrant_checkpointing
        if (mode, reentrant) in (("selective", True), ("offload", False)):
            raise ValueError(
                f"train.gradient_checkpointing '{mode}' needs {'non-' if mode == 'selective' else ''}reentrant "
                "checkpointing: set train.reentrant_checkpointing: null"
            )
        if self.checkpoint_layers is not None and mode == "auto":
            raise ValueError(
                f"train.checkpoint_layers ({self.checkpoint_layers}) with train.gradient_checkpointing auto: auto picks "
                "the checkpointed layers itself; set checkpoint_layers: null, or gradient_checkpointing true or selective"
            )
        if self.checkpoint_layers is not None and mode not in (True, "selective"):
            raise ValueError(
                f"train.checkpoint_layers ({self.checkpoint_layers}) needs train.gradient_checkpointing true or "
                f"selective (it is {str(mode).lower()}): set one of those, or checkpoint_layers: null"
            )
        if self.deepspeed and self.device_map is not None:
            raise ValueError(
                "train.device_map must be null when train.deepspeed is set: DeepSpeed places and shards the model "
                "itself, and a device_map under ZeRO-3 loads the full model on every GPU"
            )
        if self.save_steps is None and self.save_minutes is None:
            raise ValueError(
                "train.save_steps and train.save_minutes are both null: set one, or an interrupted run starts over"
            )
        if self.launch.nodes > 1 and not self.deepspeed:
            raise ValueError("train.launch.nodes > 1 needs train.deepspeed (a ZeRO config recipe)")
        if self.launch.nodes > 1 and not self.launch.hostfile:
            raise ValueError("train.launch.nodes > 1 needs train.launch.hostfile (the list of nodes and their slots)")
        if self.launch.node_rank >= self.launch.nodes:
            raise ValueError(
                f"train.launch.node_rank ({self.launch.node_rank}) must be below train.launch.nodes ({self.launch.nodes})"
            )
        return self


# ---------------------------------------------------------------- merge / eval


class MergeParams(Strict):
    dtype: Dtype | None = None  # null: train.dtype; a 4-bit base is never an option
    tolerance: Annotated[float, Field(gt=0)] = 1e-3  # max |merged - (base + adapter)| logit difference
    check_samples: Annotated[int, Field(ge=1)] = 4
    chatglm2_layout: bool = False  # also write the merged model in ChatGLM2's original layout (models/merged/chatglm2)


# GGUF types the export stage writes: llama.cpp's converter writes f32, f16, bf16, q8_0; its quantizer (the `gguf`
# extra, stages/lib/export/quantize.py) the smaller ones
GgufType = Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s",
                   "q4_0", "q4_1", "q3_k_m", "q2_k"]  # fmt: skip


class ExportParams(Strict):
    types: list[GgufType] = []  # [] : no GGUF (models/gguf stays empty)
    llama_cpp: str | None = None  # a llama.cpp source folder with convert_hf_to_gguf.py; null: the pinned one, fetched

    @model_validator(mode="after")
    def _once_each(self):
        twice = sorted({t for t in self.types if self.types.count(t) > 1})
        if twice:
            raise ValueError(f"export.types: {twice[0]} is listed twice (one file per type)")
        return self


BENCHMARKS_DIR = "data/benchmarks"  # benchmark CSV files live here: a DVC dependency of eval


def _benchmark_file(value: str) -> str:
    if not value.endswith(".csv"):
        raise PydanticCustomError("benchmark_file", "must be a .csv file (CMMLU, C-Eval or MMLU layout)")
    parts = Path(value).parts
    if Path(value).is_absolute() or ".." in parts or "/".join(parts[:2]) != BENCHMARKS_DIR or len(parts) < 3:
        raise PydanticCustomError("benchmark_file", "must be a file under {folder}/ (DVC could not see it change "
                                  "elsewhere)", {"folder": BENCHMARKS_DIR})  # fmt: skip
    return value


BenchmarkFile = Annotated[str, AfterValidator(_benchmark_file)]


def _repo_file(value: str) -> str:
    if value.startswith("/") or not value.endswith((".csv", ".parquet")):
        raise PydanticCustomError("repo_file", "must be the path of a .csv or .parquet file in the dataset repo, "
                                  "e.g. astronomy/test-00000-of-00001.parquet")  # fmt: skip
    return value


class BenchmarkHub(Strict):
    """Benchmark files in a Hub dataset repo at a pinned commit: CSV (CMMLU, C-Eval, MMLU layouts) or Parquet
    (those columns, or MMLU's question / choices / answer index)."""

    repo: Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")]  # org/name of a dataset repo
    revision: Annotated[str, _hex_digest(40, "a full commit hash, 40 hex digits (a branch or tag can move)")]
    test: Annotated[str, AfterValidator(_repo_file)]  # a file's path in the repo
    dev: Annotated[str, AfterValidator(_repo_file)] | None = None


class BenchmarkParams(Strict):
    """One multiple-choice benchmark (one subject): a test file, and a dev file for k-shot examples."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]  # its key in metrics/eval.json (no dots: keys nest)
    builtin: Literal["toy-choice"] | None = None  # generated: no files
    test: BenchmarkFile | None = None
    dev: BenchmarkFile | None = None
    hub: BenchmarkHub | None = None  # files of a Hub dataset instead of test/dev
    shots: Annotated[int, Field(ge=0, le=10)] = 0  # worked examples from dev before each question
    max_questions: Annotated[int, Field(ge=1)] | None = None  # the first N test questions

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.builtin, self.test, self.hub)) != 1:
            raise ValueError("give one of builtin, test (a CSV under data/benchmarks/) or hub (files of a Hub dataset)")
        if (self.builtin or self.hub) and self.dev:
            if self.builtin:
                raise ValueError(f"builtin: {self.builtin} brings its own worked examples: leave dev out")
            raise ValueError("with hub, the worked examples are hub.dev (a file in the repo): leave dev out")
        if self.shots and self.builtin is None and self.dev is None and (self.hub is None or self.hub.dev is None):
            raise ValueError(f"shots: {self.shots} needs dev (a CSV of worked examples; hub.dev for hub) or shots: 0")
        return self


class EvalParams(Strict):
    max_samples: Annotated[int, Field(ge=1, le=10**7)] = 100
    max_new_tokens: Annotated[int, Field(ge=1, le=2**20)] | None = None  # null: twice the longest reference answer (min 16)
    batch_size: Annotated[int, Field(ge=1, le=2**16)] = 16
    benchmarks: list[BenchmarkParams] = []  # multiple-choice sets: accuracy of base and tuned

    @model_validator(mode="after")
    def _unique_names(self):
        names = [b.name for b in self.benchmarks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"eval.benchmarks: name {twice[0]} is used twice (names key metrics/eval.json)")
        return self


class NetworkParams(Strict):
    """Limits for URL and Hub downloads. Not a DVC param of any stage: they never change what is downloaded."""

    connect_timeout_s: Annotated[float, Field(gt=0)] = 20  # to open a connection
    read_timeout_s: Annotated[float, Field(gt=0)] = 60  # between two received chunks
    deadline_minutes: Annotated[float, Field(gt=0)] = 60  # for one file, however slowly it trickles in
    retries: Annotated[int, Field(ge=0, le=10)] = 2  # after a refused connection, a timeout or an HTTP 5xx/429


class Params(Strict):
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 42  # numpy and torch seeds
    network: NetworkParams = NetworkParams()
    data: DataParams
    model: ModelParams
    tokenize: TokenizeParams = TokenizeParams()
    train: TrainParams = TrainParams()
    merge: MergeParams = MergeParams()
    eval: EvalParams = EvalParams()
    export: ExportParams = ExportParams()

    @model_validator(mode="after")
    def _text_is_packed(self) -> "Params":
        if any(s.format == "text" for s in self.data.sources) and not self.train.packing:
            raise ValueError(
                "train.packing: text sources (continued pre-training) are cut into tokenize.max_length pieces and "
                "trained packed: set train.packing: true"
            )
        return self

    @model_validator(mode="after")
    def _rows_hold_a_sample(self) -> "Params":
        row = self.train.packed_length
        if row is not None and row < self.tokenize.max_length:
            raise ValueError(
                f"train.packed_length ({row}) must be at least tokenize.max_length ({self.tokenize.max_length}): "
                "a packed row holds whole samples"
            )
        return self

    @property
    def merge_dtype(self) -> str:
        return self.merge.dtype or self.train.dtype


class ParamsError(UserError):
    """params.yaml is not valid; the message names each bad key."""


def _walk(loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """The user-facing key path of `loc` (without union tags) and the schema class that owns its last part."""
    keys: list[str] = []
    owner: Any = Params
    current: Any = Params
    for part in loc:
        if isinstance(part, int):  # a list index: the same schema for every item
            keys.append(str(part))
            continue
        if isinstance(current, list):  # a discriminated union: pydantic puts the member's tag in the location
            current = next((m for m in current if part in getattr(m.model_fields["kind"].annotation, "__args__", ())), None)
            continue
        if current is None and UNION_TAG.match(part):  # a member of a plain union, e.g. list[str] | "all-linear"
            continue
        keys.append(str(part))
        fields = getattr(current, "model_fields", {})
        owner = current
        if part not in fields:
            current = None
            continue
        members = [a for a in _flatten(fields[part].annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = members if len(members) > 1 else (members[0] if members else None)
    return keys, owner if isinstance(owner, type) else None


UNION_TAG = re.compile(r"^(literal|list|dict|tuple|set|int|str|float|bool|none|function-[a-z]+|constrained-[a-z]+)(\[.*\])?$")


def _flatten(ann: Any) -> list:
    args = getattr(ann, "__args__", None)
    if args is None:
        return [ann]
    return [leaf for a in args for leaf in _flatten(a)]


def _suggest(name: str, known: list[str]) -> str | None:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    return next((k for k in known if name.startswith(k) or k.startswith(name)), None)


ECHO = 120  # characters of a value or key an error line repeats; longer ones are cut (a 1 MB string, say)


def shown(text: str) -> str:
    """`text` as an error line repeats it: invisible and look-alike characters escaped (a Cyrillic 'а' in a key
    shows as \\u0430), cut to ECHO characters with the full length said."""
    escaped = "".join(c if c.isascii() and c.isprintable() else ascii(c)[1:-1] for c in text)
    return escaped if len(escaped) <= ECHO else f"{escaped[:ECHO]}… ({len(text)} characters)"


def _elsewhere(name: str, section: str) -> str | None:
    """The full key of field `name` in another top-level section (train.max_length → tokenize.max_length)."""
    for other, field in Params.model_fields.items():
        model = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        if other != section and model is not None and name in model.model_fields:
            return f"{other}.{name}"
    return None


def _describe(err: dict) -> str:
    keys, owner = _walk(tuple(err["loc"]))
    key = shown(".".join(keys))
    if err["type"] == "extra_forbidden":
        known = list(owner.model_fields) if owner else []
        elsewhere = _elsewhere(keys[-1], keys[0]) if len(keys) == 2 else None
        close = None if elsewhere else _suggest(keys[-1], known)
        hint = f"; did you mean '{'.'.join([*keys[:-1], close])}'?" if close else ""
        if elsewhere:
            hint = f"; it belongs to another section: '{elsewhere}'"
        if key in MOVED:
            hint = f"; it moved to {MOVED[key]}"
        return f"unknown key '{key}'{hint} (allowed here: {', '.join(known)})"
    if err["type"] == "value_error":  # a cross-field rule: its message names the keys, but not which list item
        msg = err["msg"].removeprefix("Value error, ")
        return f"{key}: {msg}" if any(isinstance(part, int) for part in err["loc"]) else msg
    if err["type"] == "missing":
        return f"missing required key '{key}'"
    where = f"'{key}'" if key else "params"
    got = shown(mask_urls(repr(err.get("input"))))  # a URL's password is not shown
    return f"{where}: {err['msg']} (got {got}{_yaml11_hint(err.get('input'))})"


YAML11_BOOLEANS = {"yes", "no", "on", "off", "y", "n"}  # booleans in YAML 1.1 (PyYAML), text in YAML 1.2 (DVC)
SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")  # 1:30 is 90 in YAML 1.1


def _yaml11_hint(value: Any) -> str:
    """For text that YAML 1.1 would have read as a boolean or a base-60 number: what to write instead."""
    if not isinstance(value, str):
        return ""
    if value.lower() in YAML11_BOOLEANS:
        return "; YAML 1.2, which DVC records, reads it as text: write true or false"
    if SEXAGESIMAL.match(value):
        number = 0.0
        for part in value.lstrip("+-").replace("_", "").split(":"):
            number = number * 60 + float(part)
        number = -number if value.startswith("-") else number
        return f"; YAML 1.2, which DVC records, reads it as text, not base 60: write {number:g}"
    return ""


def validate(raw: Any, source: str = str(PARAMS_FILE)) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = _merge_alternatives([_describe(e) for e in exc.errors()])
        # one line, as every error is: several problems are joined, and the count says there are several
        head = f"{source}: " if len(problems) == 1 else f"{source}: {len(problems)} problems: "
        raise ParamsError(head + "; ".join(problems)) from None


def _merge_alternatives(problems: list[str]) -> list[str]:
    """A value that fits no member of a union gives one message per member for the same key: one, joined by "or"."""
    merged: dict[str, list[str]] = {}
    for problem in problems:
        head, sep, rest = problem.partition("': ")
        if sep and problem.startswith("'") and rest.rfind(" (got ") > 0:
            message, got = rest.rsplit(" (got ", 1)
            merged.setdefault(f"{head}': \0 (got {got}", []).append(message)
        else:
            merged.setdefault(problem, [])
    return [key.replace("\0", " or ".join(messages)) if messages else key for key, messages in merged.items()]


DUPLICATE = re.compile(r'found duplicate key "(?P<key>.*)" with value')


def read_yaml(path: Path, text: str):
    """Parse `text` (the file `path`) exactly as DVC reads params.yaml into dvc.lock: ruamel.yaml's safe loader,
    `YAML(typ="safe").load` (dvc.utils.serialize.parse_yaml). So every value a stage uses is the value dvc.lock
    records (YAML 1.2: `010` is 10, `1:30` and `yes` are text, `1e-4` a number), and no `!!python/...` object is
    built. A duplicate key or a syntax error is one ParamsError line with its position."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    if _bracket_depth(text) > MAX_DEPTH:  # the parser would recurse thousands deep first (seconds)
        raise ParamsError(f"{path} is nested too deeply for a params file (brackets more than {MAX_DEPTH} deep): "
                          "write it out flat")
    try:
        raw = YAML(typ="safe").load(text)
    except RecursionError:
        raise ParamsError(f"{path} is nested too deeply for a params file: write it out flat") from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        duplicate = DUPLICATE.match(exc.problem or "")
        if duplicate:  # where PyYAML kept the last value silently; DVC refuses the file
            raise ParamsError(f"{path}, {where}: duplicate key '{duplicate['key']}': keep one") from None
        context = f" ({exc.context})" if exc.context else ""
        long_key = mark is not None and mark.column >= 1024 and "expected ':'" in (exc.problem or "")
        hint = "; a key longer than 1024 characters, which YAML does not allow?" if long_key else ""
        raise ParamsError(f"{path}, {where}: {exc.problem}{context}{hint}") from None
    except YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {shown(' '.join(str(exc).split()))}") from None
    _check_size(raw, path)
    return raw


def _bracket_depth(text: str) -> int:
    """The deepest nesting of [ and { in `text`, quoted strings and comments skipped (a cheap scan before the
    YAML parser)."""
    depth = deepest = 0
    quote = None
    comment = False
    for c in text:
        if comment:
            comment = c != "\n"
        elif quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "#":
            comment = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
    return deepest


MAX_VALUES, MAX_DEPTH = 100_000, 32  # far above any real params.yaml; an alias bomb expands past them at once


def _check_size(raw, path: Path) -> None:
    """ParamsError when the parsed file, with its YAML aliases expanded (as every reader of it expands them),
    holds more than MAX_VALUES values or nests deeper than MAX_DEPTH: a "billion laughs" file is refused in
    milliseconds instead of expanding to gigabytes in an error message or in DVC."""
    count = 0
    stack = [(raw, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > MAX_DEPTH:
            what = f"more than {MAX_VALUES} values" if count > MAX_VALUES else f"nesting deeper than {MAX_DEPTH}"
            raise ParamsError(f"{path} expands to {what} (a list that long, or YAML aliases that repeat aliases): "
                              "no params file needs it; write the values out")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path} not found: run from the project root") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path} is not UTF-8 text (byte {exc.start}): re-save it as UTF-8") from None
    return validate(read_yaml(path, text), str(path))
