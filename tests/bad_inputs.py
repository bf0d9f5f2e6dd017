"""The catalogue of bad inputs: each case is a mistake a user makes, the stage that meets it, and what the one-line
error must name. tests/test_bad_inputs.py runs every case in a copy of a ready project and checks the outcome;
`python tests/bad_inputs.py` prints the guide's "When something goes wrong" table from the same list.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import shutil
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

CATEGORIES = {
    "params": "params.yaml",
    "data": "Data files",
    "agent": "Agent, reasoning and other layouts",
    "sources": "Downloads (URL and Hub)",
    "models": "Model folders",
    "templates": "Templates and tokenizing",
    "launch": "DeepSpeed and launching",
    "train": "Train settings",
    "order": "Stages run out of order",
    "damaged": "Outputs damaged since their stage ran (a stage run by hand)",
    "journal": "A swap journal no stage wrote (.outputs-journal.json, read at the next stage start)",
    "during": "Inputs edited while the stage ran (dvc.lock would pair the old outputs with the new inputs)",
}


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    situation: str  # what the user did, as the guide's table says it
    stage: str  # the stage that must refuse it
    setup: Callable[[Path, dict], None]  # changes the project copy; the dict holds the test's servers (urls)
    expect: str  # a fragment of the error line: the key, file or record it names
    slow: bool = False
    env: dict = field(default_factory=dict)


# ---------------------------------------------------------------- helpers that change the project copy


def params_of(repo: Path) -> dict:
    return yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))


def set_params(repo: Path, **changes) -> None:
    """Dotted keys (with `__` for `.`) set in params.yaml."""
    raw = params_of(repo)
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.replace("__", ".").split(".")
        for key in parents:
            node = node.setdefault(key, {}) if not key.isdigit() else node[int(key)]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")


def params(**changes) -> Callable[[Path, dict], None]:
    return lambda repo, ctx: set_params(repo, **changes)


def params_text(transform: Callable[[str], str]) -> Callable[[Path, dict], None]:
    def setup(repo: Path, ctx: dict) -> None:
        path = repo / "params.yaml"
        path.write_text(transform(path.read_text(encoding="utf-8")), encoding="utf-8")

    return setup


def source(**src) -> Callable[[Path, dict], None]:
    """The data sources become this one source (`{url}` in a value: the test server's address)."""

    def setup(repo: Path, ctx: dict) -> None:
        values = {k: v.format(**ctx) if isinstance(v, str) else v for k, v in src.items()}
        set_params(repo, data__sources=[values])

    return setup


def data_file(name: str, content: bytes | str, **src) -> Callable[[Path, dict], None]:
    """data/sources/<name> holds `content`; it is the only source (alpaca format unless `src` says otherwise)."""

    def setup(repo: Path, ctx: dict) -> None:
        path = repo / "data" / "sources" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        set_params(repo, data__sources=[{"kind": "local", "path": f"data/sources/{name}", **src}])

    return setup


def raw_records(conversations: list[list[dict]]) -> Callable[[Path, dict], None]:
    """data/raw holds these conversations (turns as download writes them), 20 copies each, as if downloaded."""

    def setup(repo: Path, ctx: dict) -> None:
        raw = repo / "data" / "raw"
        rows = [{"messages": c, "record": i, "source": "x"} for i, c in enumerate(conversations * 20)]
        (raw / "train.jsonl").write_text(jsonl(rows[1:]), encoding="utf-8")
        (raw / "validation.jsonl").write_text(jsonl(rows[:1]), encoding="utf-8")
        manifest = json.loads((raw / "manifest.json").read_text())
        manifest.pop("sha256", None)
        (raw / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")

    return setup


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


GOOD = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(20)]
CHAT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def model_copy(change: Callable[[Path], None], tokenizer_only: bool = False) -> Callable[[Path, dict], None]:
    """models/sources/m: a copy of the ready project's models/base, then `change` to it; model.path (or
    model.tokenizer) points at it."""

    def setup(repo: Path, ctx: dict) -> None:
        folder = repo / "models" / "sources" / "m"
        shutil.copytree(repo / "models" / "base", folder)
        (folder / "manifest.json").unlink()
        change(folder)
        set_params(repo, **({"model.tokenizer": str(folder.relative_to(repo))} if tokenizer_only
                            else {"model.path": str(folder.relative_to(repo))}))  # fmt: skip

    return setup


def swap_two_tokens(folder: Path) -> None:
    """Another tokenizer of the same size: two tokens of tokenizer.json's vocabulary trade ids."""

    def change(tok: dict) -> None:
        vocab = tok["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[100:102]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    edit_json(folder / "tokenizer.json", change)


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    path.write_bytes(bytes(data))


def edit_header(change: Callable[[dict], object], name: str = "model.safetensors") -> Callable[[Path], None]:
    """A model_copy change: the JSON header of `name` becomes change(header) (the tensor data is kept)."""

    def apply(folder: Path) -> None:
        path = folder / name
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        text = json.dumps(change(header)).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])

    return apply


def first_tensor(header: dict) -> str:
    return next(k for k in sorted(header) if k != "__metadata__")


def rename_first(header: dict) -> dict:
    name = first_tensor(header)
    header["renamed." + name] = header.pop(name)
    return header


ADAPTER_LOCK = threading.Lock()  # cases are set up in threads: two first imports of PEFT's model-card code at once fail


def real_adapter(repo: Path, ctx: dict) -> None:
    """models/adapter becomes a real LoRA adapter of models/base (PEFT's init, r 4 on q_proj and v_proj)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with ADAPTER_LOCK:
        model = AutoModelForCausalLM.from_pretrained(repo / "models" / "base")
        lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        lora.save_pretrained(repo / "models" / "adapter")


def recorded_adapter(repo: Path, ctx: dict) -> None:
    """A real adapter (real_adapter) with train_config.json's `files` digests, as the train stage writes them."""
    real_adapter(repo, ctx)
    folder = repo / "models" / "adapter"
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}
    (folder / "train_config.json").write_text(json.dumps({"files": files}))


def nan_adapter(repo: Path, ctx: dict) -> None:
    """A real adapter (no train_config.json) whose first lora_B holds NaN."""
    from safetensors.torch import load_file, save_file

    real_adapter(repo, ctx)
    path = repo / "models" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    first = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[first] = tensors[first].clone().fill_(float("nan"))
    save_file(tensors, path)


def other_base(build: Callable[[], object], **changes) -> Callable[[Path, dict], None]:
    """models/base becomes the model build() returns (a tiny one of another architecture, saved by transformers;
    the tokenizer files stay), and params.yaml gets `changes`."""

    def setup(repo: Path, ctx: dict) -> None:
        base = repo / "models" / "base"
        with ADAPTER_LOCK:  # first imports of transformers' model code, in threads
            model = build()
        (base / "model.safetensors").unlink()
        model.save_pretrained(base)
        set_params(repo, **changes)

    return setup


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=600, bos_token_id=1, eos_token_id=2))


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                                              num_attention_heads=2, num_key_value_heads=1, vocab_size=600))  # fmt: skip


def edit_train_split(change: Callable) -> Callable[[Path, dict], None]:
    """data/tokenized/train saved again as change(train) (a hand-edited set)."""

    def setup(repo: Path, ctx: dict) -> None:
        from datasets import load_from_disk

        train = repo / "data" / "tokenized" / "train"
        change(load_from_disk(str(train))).save_to_disk(str(train) + ".new")
        shutil.rmtree(train)
        Path(str(train) + ".new").rename(train)

    return setup


EVIL = "open('pwned', 'w').write('custom code ran')\n"  # what a model folder's own .py would do when imported


def custom_code(config: str) -> Callable[[Path], None]:
    """A change to a model folder: an auto_map in `config` (config.json or tokenizer_config.json) whose classes
    live in the folder's evil.py."""
    classes = {"config.json": {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"},
               "tokenizer_config.json": {"AutoTokenizer": ["evil.Tokenizer", None]}}[config]  # fmt: skip

    def change(folder: Path) -> None:
        (folder / "evil.py").write_text(EVIL)
        edit_json(folder / config, lambda c: c.update(auto_map=classes))

    return change


def no_eos(folder: Path) -> None:
    def drop(config: dict) -> None:
        config["eos_token"] = None

    edit_json(folder / "tokenizer_config.json", drop)


def no_chat_template(repo: Path, ctx: dict) -> None:
    """models/base's tokenizer loses its chat template; tokenize is told to use the tokenizer's own."""
    base = repo / "models" / "base"
    (base / "chat_template.jinja").unlink(missing_ok=True)
    edit_json(base / "tokenizer_config.json", lambda c: c.pop("chat_template", None))
    set_params(repo, tokenize__template="tokenizer")


def write(rel: str, content: str, **changes) -> Callable[[Path, dict], None]:
    def setup(repo: Path, ctx: dict) -> None:
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        set_params(repo, **changes)

    return setup


def remove(rel: str) -> Callable[[Path, dict], None]:
    return lambda repo, ctx: shutil.rmtree(repo / rel)


def both(*setups: Callable[[Path, dict], None]) -> Callable[[Path, dict], None]:
    def setup(repo: Path, ctx: dict) -> None:
        for s in setups:
            s(repo, ctx)

    return setup


def symlink(rel: str, target: str) -> Callable[[Path, dict], None]:
    def setup(repo: Path, ctx: dict) -> None:
        link = repo / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target.format(repo=repo))
        set_params(repo, data__sources=[{"kind": "local", "path": rel}])

    return setup


def fifo(name: str) -> Callable[[Path, dict], None]:
    """data/sources/<name> is a named pipe that nothing writes to (opening it would wait forever)."""

    def setup(repo: Path, ctx: dict) -> None:
        path = repo / "data" / "sources" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        set_params(repo, data__sources=[{"kind": "local", "path": f"data/sources/{name}"}])

    return setup


def served(path: str, status: int, content: bytes | str) -> Callable[[Path, dict], None]:
    """The only source is `path` (query included) on a server started for this case, in a thread of the test
    process that lives as long as it: it answers `status` with `content` (200) or a redirect to it (302). sha256
    is the content's, so the download itself succeeds."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            self.send_response(status)
            if status == 302:
                self.send_header("Location", content)
            self.send_header("Content-Length", str(len(content) if status == 200 else 0))
            self.end_headers()
            if status == 200:
                self.wfile.write(content)

    def setup(repo: Path, ctx: dict) -> None:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        digest = hashlib.sha256(content if isinstance(content, bytes) else b"").hexdigest()
        url = f"http://127.0.0.1:{server.server_address[1]}{path}"
        set_params(repo, data__sources=[{"kind": "url", "url": url, "sha256": digest}])

    return setup


def with_password(path: str) -> Callable[[Path, dict], None]:
    """The only source is the test server's `path`, with a user and password in the URL."""
    return lambda repo, ctx: set_params(repo, data__sources=[
        {"kind": "url", "url": ctx["url"].replace("//", "//user:SuperSecret@") + path, "sha256": "0" * 64}])


def while_running(temp: str, change: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    """`change` made to the project copy by a thread of the test process once the stage has begun writing (a path
    matching the glob `temp`, its temp output, appears): an edit made while the stage runs."""

    def setup(repo: Path, ctx: dict) -> None:
        def watch() -> None:
            deadline = time.monotonic() + 120
            while not list(repo.glob(temp)) and time.monotonic() < deadline:
                time.sleep(0.005)
            change(repo)

        threading.Thread(target=watch, daemon=True).start()

    return setup


def append(rel: str, text: str) -> Callable[[Path], None]:
    def change(repo: Path) -> None:
        with open(repo / rel, "a", encoding="utf-8") as f:
            f.write(text)

    return change


DEAD_PID = 2**22 + 7  # above any pid_max: the journal's writer is dead, so the next start would act on it


def journal(pairs: Callable[[Path], list] | str) -> Callable[[Path, dict], None]:
    """.outputs-journal.json holds `pairs(repo)` as a killed stage's swap (this host, a dead pid), or the text."""

    def setup(repo: Path, ctx: dict) -> None:
        text = pairs if isinstance(pairs, str) else json.dumps(
            {"host": socket.gethostname(), "pid": DEAD_PID, "pairs": pairs(repo)})  # fmt: skip
        (repo / ".outputs-journal.json").write_text(text, encoding="utf-8")

    return setup


def outside_folder(repo: Path) -> Path:
    """A folder outside the project copy, with a file a forged journal would move onto data/raw."""
    folder = repo.parent / f"{repo.name}-outside"
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_text("not the project's\n")
    return folder


def temp_link(repo: Path) -> Path:
    """data/.raw.tmp-HOST-PID-x, named as a temp folder of data/raw, but a link to outside_folder."""
    from stages.lib.core.outputs import host_tag

    link = Path("data") / f".raw.tmp-{host_tag()}-{DEAD_PID}-x"
    (repo / link).symlink_to(outside_folder(repo), target_is_directory=True)
    return link


def deepspeed_json(text: str) -> Callable[[Path, dict], None]:
    """recipes/deepspeed/mine.json holds `text` and train.deepspeed names it."""
    return write("recipes/deepspeed/mine.json", text, train__deepspeed="mine")


def hostfile(text: str, **launch) -> Callable[[Path, dict], None]:
    """A hostfile holding `text`, named by train.launch.hostfile, with DeepSpeed on and other train.launch keys."""
    keys = {f"train__launch__{k}": v for k, v in launch.items()}
    return write("hostfile", text, **DS, train__launch__hostfile="hostfile", **keys)


def busy_port(repo: Path, ctx: dict) -> None:
    set_params(repo, train__deepspeed="zero3", train__launch__master_port=ctx["busy_port"])


DS = {"train.deepspeed": "zero3"}  # the launch cases go through DeepSpeed's launcher
LINEAR = {"type": "linear", "factor": 2.0}
LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>...</body></html>\n"
ARROW = "data/tokenized/train/data-00000-of-00001.arrow"
NO_NET = {"retries": 0, "read_timeout_s": 1, "connect_timeout_s": 1}
WORKED = {"TQDM_DISABLE": "1"}  # a stage that failed after its work: no progress bars beside the error line
SECRET_TOKEN = "hf_" + "catalogue" + "SecretTokenThatMustNotLeak"  # never written whole in a file: the scan finds only a leak

# ---------------------------------------------------------------- the catalogue

CASES = [
    # params.yaml: every stage checks it first (each stage is tried across the cases)
    Case("several-mistakes", "params", "several mistakes at once", "train",
         params(seed="x", train__batch_size=0), "2 problems: 'seed'"),
    Case("misspelt-key", "params", "a misspelt key", "train", params(train__lerning_rate=1e-4),
         "did you mean 'train.learning_rate'"),
    Case("string-for-int", "params", 'a number in quotes ("8")', "train", params(train__lora__r="8"), "'train.lora.r'"),
    Case("bool-for-int", "params", "true where a count belongs", "train", params(train__batch_size=True),
         "'train.batch_size'"),
    Case("float-for-int", "params", "2.5 where a count belongs", "tokenize", params(tokenize__max_length=2.5),
         "'tokenize.max_length'"),
    Case("infinite-epochs", "params", "`.inf` as a number", "train", params_text(lambda t: t.replace("epochs: 30", "epochs: .inf")),
         "'train.epochs': Input should be a finite number"),
    Case("nan-rate", "params", "`.nan` as a number", "merge", params_text(lambda t: t.replace("learning_rate: 0.005", "learning_rate: .nan")),
         "'train.learning_rate': Input should be a finite number"),
    Case("duplicate-key", "params", "a key given twice", "download",
         params_text(lambda t: t.replace("  max_samples: 100", "  max_samples: 100\n  max_samples: 48")),
         "duplicate key 'max_samples'"),
    Case("duplicate-section", "params", "a section given twice", "eval", params_text(lambda t: t + "\neval:\n  batch_size: 2\n"),
         "duplicate key 'eval'"),
    Case("yaml-syntax", "params", "broken YAML (an unclosed bracket)", "tokenize",
         params_text(lambda t: t.replace("report_to: []", "report_to: [wandb")), "params.yaml, line"),
    Case("python-tag", "params", "a `!!python/...` tag (code in YAML)", "download",
         params_text(lambda t: t.replace("seed: 42", "seed: !!python/object/apply:os.system ['touch pwned']")),
         "could not determine a constructor"),
    Case("not-utf8-params", "params", "params.yaml saved as GBK", "download",
         lambda repo, ctx: (repo / "params.yaml").write_bytes((repo / "params.yaml").read_bytes() + "# 中文注释\n".encode("gbk")),
         "params.yaml is not UTF-8"),
    Case("empty-params", "params", "an empty params.yaml", "train", params_text(lambda t: ""), "expected a mapping"),
    Case("unknown-section", "params", "an unknown section", "eval", params(evaluate={"max_samples": 3}),
         "unknown key 'evaluate'"),
    Case("moved-key", "params", "a key of an earlier version", "tokenize", params(tokenize__validation_fraction=0.2),
         "moved to data.validation_fraction"),
    Case("varlen-no-packing", "params", "varlen attention without packing", "train",
         params(train__attn_implementation="varlen", train__packing=False), "needs train.packing: true"),
    Case("no-save", "params", "both checkpoint keys null", "train", params(train__save_steps=None, train__save_minutes=None),
         "train.save_steps and train.save_minutes are both null"),
    Case("endless-steps", "params", "max_steps of 10^30 (trains forever at a learning rate of ~0)", "train",
         params(train__max_steps=10**30), "'train.max_steps': Input should be less than or equal to 1000000000"),
    Case("huge-batch", "params", "a batch size of 10^30", "train", params(train__batch_size=10**30),
         "'train.batch_size': Input should be less than or equal to 65536"),
    Case("key-of-another-section", "params", "train.max_length (it is tokenize's)", "train",
         params(train__max_length=256), "it belongs to another section: 'tokenize.max_length'"),
    Case("look-alike-key", "params", "a key with a Cyrillic letter (trаin.seed)", "download",
         params_text(lambda t: t + "\ntr\u0430in_x: 1\n"), "unknown key 'tr\\u0430in_x'"),
    Case("megabyte-value", "params", "a 1 MB string where a number belongs", "download",
         params(seed="x" * 1_000_000), "… (1000002 characters)"),
    Case("alias-bomb", "params", "YAML aliases that expand to 387 million values", "download",
         params_text(lambda t: t + "".join(f"\nb{i}: &b{i} [" + ", ".join([f"*b{i - 1}" if i else "x"] * 9) + "]"
                                          for i in range(9)) + "\n"), "expands to more than 100000 values"),  # fmt: skip
    Case("deep-nesting", "params", "lists nested 5,000 deep", "download",
         params_text(lambda t: t + "\nx: " + "[" * 5000 + "]" * 5000 + "\n"), "nested too deeply"),
    Case("nodes-no-deepspeed", "params", "two nodes without DeepSpeed", "train", params(train__launch__nodes=2),
         "needs train.deepspeed"),
    Case("packed-too-short", "params", "packed rows shorter than a sample", "train", params(train__packed_length=16),
         "train.packed_length (16) must be at least tokenize.max_length"),
    Case("hub-branch", "params", "a Hub dataset pinned to a branch", "download",
         source(kind="hub", repo="org/set", revision="main"), "'data.sources.0.revision'"),
    Case("hub-local-path", "params", "a Hub dataset whose repo is a local folder", "download",
         source(kind="hub", repo="/tmp/x", revision="a" * 40), "'data.sources.0.repo'"),
    Case("negative-seed", "params", "a negative seed", "download", params(seed=-1), "'seed'"),
    Case("url-no-hash", "params", "a URL source without sha256", "download", source(kind="url", url="{url}/good.jsonl"),
         "missing required key 'data.sources.0.sha256'"),
    Case("url-unparseable", "params", "a URL that does not parse (an IPv6 bracket left open)", "download",
         source(kind="url", url="http://[::1/x.jsonl", sha256="0" * 64),
         "'data.sources.0.url': not a usable download URL: Invalid IPv6 URL"),
    Case("sha256-short", "params", "a sha256 that is not 64 hex digits", "download",
         source(kind="url", url="{url}/good.jsonl", sha256="0" * 63), "'data.sources.0.sha256': must be the file's SHA-256"),
    Case("unknown-tracker", "params", "an unknown tracker in report_to", "train", params(train__report_to=["wandbb"]),
         "train.report_to: 'wandbb'"),
    Case("unknown-recipe", "params", "an unknown model recipe", "download", params(model__recipe="llama-9"),
         "model.recipe: no recipe 'llama-9'"),
    Case("unknown-format", "params", "an unknown record format", "download", params(**{"data.sources.0.format": "sharegpt"}),
         "'data.sources.0.format'"),
    Case("neftune-zero", "params", "a NEFTune noise alpha of 0", "train", params(train__neftune_noise_alpha=0),
         "'train.neftune_noise_alpha': Input should be greater than 0"),
    Case("rope-unknown-type", "params", "a RoPE scaling type transformers does not know", "merge",
         params(model__rope_scaling={"type": "ntk", "factor": 2.0}),
         "'model.rope_scaling.type': Input should be 'linear', 'dynamic', 'yarn', 'llama3' or 'longrope'"),
    Case("rope-factor-one", "params", "a RoPE scaling factor of 1 (no longer context)", "download",
         params(model__rope_scaling=LINEAR | {"factor": 1.0}), "'model.rope_scaling.factor': Input should be greater than 1"),
    Case("rope-missing-key", "params", "llama3 RoPE scaling without its frequency band", "tokenize",
         params(model__rope_scaling={"type": "llama3", "factor": 8.0}),
         "model.rope_scaling: type llama3 needs low_freq_factor and high_freq_factor"),
    Case("rope-foreign-key", "params", "a key of another RoPE scaling type", "eval",
         params(model__rope_scaling=LINEAR | {"high_freq_factor": 4.0}),
         "model.rope_scaling: type linear takes no high_freq_factor (it takes factor)"),
    Case("rope-band-reversed", "params", "llama3's high_freq_factor at or below its low_freq_factor", "train",
         params(model__rope_scaling=LLAMA3 | {"high_freq_factor": 1.0}),
         "model.rope_scaling: high_freq_factor (1.0) must be above low_freq_factor (1.0)"),
    Case("rope-longrope-unequal", "params", "longrope's short_factor and long_factor of different lengths", "merge",
         params(model__rope_scaling={"type": "longrope", "factor": 4.0, "short_factor": [1.0] * 16,
                                     "long_factor": [1.0] * 15}),
         "model.rope_scaling: short_factor has 16 values and long_factor 15"),
    Case("export-type-unknown", "params", "a GGUF type llama.cpp does not make", "export", params(export__types=["q3"]),
         "'export.types.0': Input should be"),
    Case("export-type-twice", "params", "a GGUF type listed twice", "export", params(export__types=["f16", "f16"]),
         "export.types: f16 is listed twice"),
    Case("export-not-llama-cpp", "params", "export.llama_cpp naming a folder without llama.cpp's converter", "export",
         params(export__types=["f16"], export__llama_cpp="data"), "export.llama_cpp: data is not a llama.cpp source folder"),
    # YAML 1.1 forms: params.yaml is read as DVC records it (YAML 1.2), so these are text, refused by type
    Case("sexagesimal-minutes", "params", "a time written `1:30` (90 in YAML 1.1, text in YAML 1.2 and dvc.lock)", "train",
         params_text(lambda t: t.replace("save_minutes: 30", "save_minutes: 1:30")),
         "'train.save_minutes': Input should be a valid number (got '1:30'; YAML 1.2, which DVC records, reads it as "
         "text, not base 60: write 90)"),
    Case("yes-for-true", "params", "`yes` for true (YAML 1.1's boolean, text in YAML 1.2)", "tokenize",
         params_text(lambda t: t.replace("unknown_markers: false", "unknown_markers: yes")),
         "'tokenize.unknown_markers': Input should be a valid boolean (got 'yes'; YAML 1.2, which DVC records, reads "
         "it as text: write true or false)"),
    Case("unk-share-above-one", "params", "a share of <unk> answer tokens above 1", "tokenize",
         params(tokenize__max_unk_share=5), "'tokenize.max_unk_share': Input should be less than or equal to 1"),
    Case("plain-misspelt", "params", "a template name that does not exist (`plian`)", "tokenize",
         params(tokenize__template="plian"), "plain"),
    # data files
    Case("tiny-weight", "data", "a source weight that rounds to no record", "download",
         params(data__sources__0__weight=0.0001), "data.sources.0.weight 0.0001"),
    Case("outside-sources", "data", "a data file outside data/sources/", "download",
         write("data/elsewhere.jsonl", jsonl(GOOD), data__sources=[{"kind": "local", "path": "data/elsewhere.jsonl"}]),
         "is outside data/sources/"),
    Case("missing-file", "data", "a data file that does not exist", "download",
         params(data__sources=[{"kind": "local", "path": "data/sources/nope.jsonl"}]), "data/sources/nope.jsonl does not exist"),
    Case("gbk-file", "data", "a GBK-encoded file", "download",
         data_file("gbk.jsonl", jsonl([{"instruction": "你好", "input": "", "output": "好"}] * 5).encode("gbk")),
         "is not UTF-8 text (byte"),
    Case("utf16-file", "data", "a UTF-16 file", "download", data_file("u16.json", json.dumps(GOOD).encode("utf-16")),
         "is UTF-16 text"),
    Case("broken-json", "data", "a JSON array cut short", "download", data_file("cut.json", json.dumps(GOOD)[:-40]),
         "cut.json"),
    Case("missing-column", "data", "a file without the output column", "download",
         data_file("q.jsonl", jsonl([{"instruction": "a", "input": ""}] * 20)), "output"),
    Case("wrong-format", "data", "alpaca records declared as messages", "download",
         data_file("a.jsonl", jsonl(GOOD), format="messages"), "messages"),
    Case("all-dropped", "data", "every record has an empty answer", "download",
         data_file("e.jsonl", jsonl([{"instruction": f"q{i}", "input": "", "output": ""} for i in range(20)])),
         "no record"),
    Case("empty-file", "data", "an empty data file", "download", data_file("empty.jsonl", ""), "empty.jsonl"),
    Case("one-record", "data", "a single record (nothing to split)", "download", data_file("one.jsonl", jsonl(GOOD[:1])),
         "data.sources give 1 distinct usable records"),
    Case("empty-folder", "data", "a folder with no data file", "download",
         both(write("data/sources/set/README.md", "notes"), params(data__sources=[{"kind": "local", "path": "data/sources/set"}])),
         "holds no"),
    Case("mixed-folder", "data", "a folder mixing file types", "download",
         both(write("data/sources/mix/a.jsonl", jsonl(GOOD)), write("data/sources/mix/b.csv", "instruction,input,output\na,,b\n"),
              params(data__sources=[{"kind": "local", "path": "data/sources/mix"}])), "mixes file types"),
    Case("unsupported-type", "data", "a .txt data file", "download", data_file("notes.txt", "hello"),
         "unsupported data file type '.txt'"),
    Case("symlink-out", "data", "a link in data/sources/ leading outside", "download",
         both(write("outside.jsonl", jsonl(GOOD)), symlink("data/sources/link.jsonl", "{repo}/outside.jsonl")),
         "leads to"),
    Case("symlink-loop", "data", "a symlink loop in data/sources/", "download",
         both(symlink("data/sources/loop-a.jsonl", "loop-b.jsonl"), symlink("data/sources/loop-b.jsonl", "loop-a.jsonl")),
         "loop-"),
    Case("number-answers", "data", "answers that are numbers, not text", "download",
         data_file("n.jsonl", jsonl([{"instruction": f"q{i}", "input": "", "output": i} for i in range(20)])), "output"),
    Case("unknown-column-map", "data", "columns mapped to a column the file lacks", "download",
         data_file("c.jsonl", jsonl(GOOD), columns={"output": "answer"}), "answer"),
    Case("datasetdict-folder", "data", "a saved DatasetDict folder", "download",
         both(write("data/sources/dd/dataset_dict.json", '{"splits": ["train"]}'),
              params(data__sources=[{"kind": "local", "path": "data/sources/dd"}])), "saved DatasetDict"),
    Case("json-deep", "data", "a record of 100000 nested `[` (unclosed)", "download",
         data_file("deep.jsonl", jsonl(GOOD) + "[" * 100_000 + "\n"),
         "deep.jsonl cannot be read as json: line 21 nests arrays and objects more than 63 levels deep"),
    Case("json-deep-closed", "data", "a field nested 100000 deep (it crashed Arrow's parser)", "download",
         data_file("deeper.jsonl", jsonl(GOOD[:5]) + '{"instruction": "q", "output": "a", "x": ' + "[" * 100_000
                   + "]" * 100_000 + "}\n"), "line 6 nests arrays and objects more than 63 levels deep"),
    Case("json-duplicate-key", "data", "a JSON Lines record with a key given twice", "download",
         data_file("dup.jsonl", jsonl(GOOD) + '{"instruction": "q", "output": "a", "output": "b"}\n'),
         "dup.jsonl cannot be read as json: line 21 has a duplicate key 'output'"),
    Case("json-lone-surrogate", "data", "a JSON Lines record with a lone surrogate escape (`\\ud800`)", "download",
         data_file("sur.jsonl", jsonl(GOOD) + '{"instruction": "q\\ud800", "output": "a"}\n'),
         "line 21 holds an invalid surrogate escape \\ud800"),
    Case("gzip-file", "data", "a gzip file named .jsonl", "download",
         data_file("z.jsonl", gzip.compress(jsonl(GOOD).encode(), mtime=0)), "z.jsonl is gzip-compressed, not text"),
    Case("utf32-file", "data", "a UTF-32 file", "download", data_file("u32.json", json.dumps(GOOD).encode("utf-32")),
         "is UTF-32 text: re-save it as UTF-8 (iconv -f UTF-32 -t UTF-8)"),
    Case("utf32-no-bom", "data", "a UTF-32 file without a byte-order mark", "download",
         data_file("u32.jsonl", jsonl(GOOD).encode("utf-32-le")), "iconv -f UTF-32LE -t UTF-8"),
    Case("fifo-file", "data", "a named pipe (FIFO) as the data file", "download", fifo("pipe.jsonl"),
         "data/sources/pipe.jsonl is a named pipe (FIFO), not a regular file"),
    # downloads
    Case("preference-pairs", "agent", "a preference file (chosen/rejected columns)", "download",
         data_file("p.jsonl", jsonl([{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(20)]),
                   format="prompt_completion"), "preference data"),
    Case("kto-labels", "agent", "a KTO file (messages and a boolean label)", "download",
         data_file("k.jsonl", jsonl([{"messages": CHAT, "label": i % 2 == 0} for i in range(20)]), format="messages"),
         "KTO data"),
    Case("image-column", "agent", "an `images` column beside `<image>` placeholders", "download",
         data_file("i.jsonl", jsonl([{"messages": CHAT, "images": ["a.png"]}] * 20), format="messages"), "text-only"),
    Case("image-part", "agent", "an image part in a message's content", "download",
         data_file("ip.jsonl", jsonl([{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
             "url": "x.png"}}]}, CHAT[1]]}] * 20), format="messages"), "content[0] is a image_url part"),  # fmt: skip
    Case("call-not-json", "agent", "a ShareGPT function_call whose value is not JSON", "download",
         data_file("fc.jsonl", jsonl([{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call",
             "value": "get(x)"}, {"from": "observation", "value": "1"}, {"from": "gpt", "value": "a"}]}] * 20),
             format="messages"), "the function_call value is text that is not JSON"),  # fmt: skip
    Case("call-no-name", "agent", "a tool call without a function name", "download",
         data_file("nn.jsonl", jsonl([{"messages": [CHAT[0], {"role": "assistant", "content": None, "tool_calls": [
             {"type": "function", "function": {"arguments": "{}"}}]}]}] * 20), format="messages"),
         "tool_calls[0] has no function name"),  # fmt: skip
    Case("tool-result-first", "agent", "a tool result with no call before it", "download",
         data_file("tr.jsonl", jsonl([{"messages": [CHAT[0], {"role": "tool", "content": "1"}, CHAT[1]]}] * 20),
                   format="messages"), "message 1 (tool) cannot follow a user turn"),
    Case("reasoning-twice", "agent", "reasoning as a field and as a <think> block, different", "download",
         data_file("rt.jsonl", jsonl([{"messages": [CHAT[0], {"role": "assistant", "reasoning_content": "a",
             "content": "<think>b</think>c"}]}] * 20), format="messages"), "reasoning given twice"),  # fmt: skip
    Case("fractional-weight", "agent", "a per-turn weight of 0.5", "download",
         data_file("w.jsonl", jsonl([{"messages": [CHAT[0], CHAT[1] | {"weight": 0.5}]}] * 20), format="messages"),
         "weight 0.5: per-turn weights are 0 (not trained) or 1 (trained)"),
    Case("text-with-chat", "agent", "a text source (pre-training) mixed with a chat source", "download",
         lambda repo, ctx: set_params(repo, data__sources=[{"kind": "builtin"}, {"kind": "local", "format": "text",
                                      "path": "data/sources/c4.jsonl"}], train__packing=True),
         "text sources are continued pre-training"),  # fmt: skip
    Case("text-unpacked", "agent", "a text source with train.packing false", "download",
         data_file("c4.jsonl", jsonl([{"text": f"doc {i}"} for i in range(20)]), format="text"),
         "set train.packing: true"),
    Case("tools-in-chatml", "agent", "tool-call records with a template that cannot render tools", "tokenize",
         raw_records([[CHAT[0], {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{}"}]},
                       {"role": "tool", "content": "1"}, {"role": "assistant", "content": "a"}]]),
         "which template 'chatml' cannot render: set tokenize.template: qwen3"),  # fmt: skip
    Case("reasoning-in-tokenizer-template", "agent", "reasoning with a template that cannot render it", "tokenize",
         lambda repo, ctx: (raw_records([[CHAT[0], CHAT[1] | {"reasoning": "r"}]])(repo, ctx),
                            set_params(repo, tokenize__template="tokenizer")),
         "set tokenize.reasoning: drop"),  # fmt: skip
    Case("url-404", "sources", "a URL that answers 404", "download",
         source(kind="url", url="{url}/missing.jsonl", sha256="0" * 64), "HTTP 404"),
    Case("url-hash", "sources", "a URL whose file changed (sha256)", "download",
         source(kind="url", url="{url}/good.jsonl", sha256="0" * 64), "sha256 mismatch for http"),
    Case("url-hang", "sources", "a server that accepts and never answers", "download",
         both(source(kind="url", url="{url}/hang", sha256="0" * 64), params(network=NO_NET)),
         "no answer within network.read_timeout_s"),
    Case("url-trickle", "sources", "a server sending one byte at a time", "download",
         both(source(kind="url", url="{url}/trickle", sha256="0" * 64), params(network=NO_NET | {"deadline_minutes": 0.03})),
         "not complete after network.deadline_minutes"),
    Case("url-refused", "sources", "a host that refuses connections", "download",
         both(source(kind="url", url="http://127.0.0.1:{closed_port}/x.jsonl", sha256="0" * 64), params(network=NO_NET)),
         "ConnectError"),
    Case("url-500-retried", "sources", "a server error that persists", "download",
         both(source(kind="url", url="{url}/error", sha256="0" * 64), params(network=NO_NET | {"retries": 1})),
         "HTTP 500 Internal Server Error (tried 2 times"),
    Case("url-redirect-404", "sources", "a redirect to a missing file", "download",
         source(kind="url", url="{url}/redirect-missing", sha256="0" * 64), "HTTP 404"),
    Case("url-redirect-loop", "sources", "a URL that redirects to itself", "download",
         source(kind="url", url="{url}/loop", sha256="0" * 64), "TooManyRedirects"),
    Case("url-unknown-type", "sources", "a URL with neither a known extension nor JSON content", "download",
         source(kind="url", url="{url}/plain", sha256="{plain_sha256}"), "cannot tell the file type"),
    Case("url-html-page", "sources", "a URL that serves an HTML page (sha256 pinned to it)", "download",
         served("/page.jsonl?v=7", 200, HTML), "/page.jsonl?v=*** is an HTML page, not data"),
    Case("url-password", "sources", "a URL with a password in it", "download", with_password("/missing.jsonl"),
         "http://***@127.0.0.1:"),
    Case("url-token", "sources", "a URL with a token in its query", "download",
         source(kind="url", url="{url}/missing.jsonl?token=SuperSecret", sha256="0" * 64),
         "/missing.jsonl?token=*** could not be downloaded: HTTP 404"),
    Case("url-redirect-ftp", "sources", "a redirect to an ftp:// URL", "download",
         served("/x.jsonl", 302, "ftp://user:SuperSecret@127.0.0.1/x.jsonl"),
         "redirects to ftp://***@127.0.0.1/x.jsonl, which is not an http(s) URL"),
    Case("url-upper-sha256", "sources", "a sha256 in upper case (accepted) of another file", "download",
         source(kind="url", url="{url}/good.jsonl", sha256="A" * 64), "the source pins aaaaaaaaaaaaaaaa"),
    Case("hub-dataset-offline", "sources", "a Hub dataset not in the cache, offline", "download",
         source(kind="hub", repo="org/not-cached", revision="a" * 40), "hub dataset org/not-cached@"),
    Case("hub-model-offline", "sources", "a Hub model not in the cache, offline", "download",
         params(model__recipe="qwen2.5-7b-instruct"), "hub model Qwen/"),
    # model folders
    Case("model-missing", "models", "model.path that does not exist", "download", params(model__path="models/sources/nope"),
         "model.path models/sources/nope does not exist"),
    Case("model-outside", "models", "model.path outside models/sources/", "download", params(model__path="models/base"),
         "outside models/sources/"),
    Case("model-no-config", "models", "a model folder without config.json", "download",
         model_copy(lambda f: (f / "config.json").unlink()), "has no config.json"),
    Case("model-bad-config", "models", "a config.json that is not JSON", "download",
         model_copy(lambda f: (f / "config.json").write_text("{model_type: llama")), "config.json is not valid JSON"),
    Case("model-pickles", "models", "pickled weights only (*.bin)", "download",
         model_copy(lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin")), "pickled weights are not loaded"),
    Case("model-truncated", "models", "a truncated safetensors file", "download",
         model_copy(lambda f: truncate(f / "model.safetensors")), "model.safetensors is truncated"),
    Case("model-bad-header", "models", "a safetensors file with a corrupt header", "download",
         model_copy(lambda f: corrupt_header(f / "model.safetensors")), "is not a safetensors file"),
    Case("model-missing-shard", "models", "a sharded model missing a shard", "download",
         model_copy(lambda f: (f / "model.safetensors.index.json").write_text(
             json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))),
         "model-00002-of-00002.safetensors, which is missing"),
    Case("model-header-list", "models", "a safetensors header that is a JSON list", "download",
         model_copy(edit_header(lambda h: list(h))), "safetensors header of the wrong layout"),
    Case("model-unknown-dtype", "models", "a tensor of a dtype safetensors does not know", "download",
         model_copy(edit_header(lambda h: h[first_tensor(h)].update(dtype="X99") or h)), "has dtype 'X99'"),
    Case("model-renamed-tensor", "models", "a tensor renamed in the weights", "download",
         model_copy(edit_header(rename_first)), "the weights have no tensor"),
    Case("model-shape-mismatch", "models", "config.json sizes that disagree with the weights", "download",
         model_copy(lambda f: edit_json(f / "config.json", lambda c: c.update(vocab_size=c["vocab_size"] + 64))),
         "but config.json makes it"),
    Case("model-unknown-type", "models", "a model_type transformers does not know", "download",
         model_copy(lambda f: edit_json(f / "config.json", lambda c: c.update(model_type="foo"))),
         "cannot build this config.json"),
    Case("model-zero-heads", "models", "a config.json with 0 attention heads", "download",
         model_copy(lambda f: edit_json(f / "config.json", lambda c: c.update(num_attention_heads=0))),
         "cannot build this config.json"),
    Case("model-fewer-layers", "models", "config.json with fewer layers than the weights", "download",
         model_copy(lambda f: edit_json(f / "config.json", lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] - 1))),
         "tensor(s) that config.json's model does not have"),
    Case("model-nan-config", "models", "NaN in config.json", "download",
         model_copy(lambda f: edit_json(f / "config.json", lambda c: c.update(rms_norm_eps=float("nan")))),
         "NaN is not a JSON number"),
    Case("model-offsets-dtype", "models", "a tensor whose dtype does not match its stored bytes", "download",
         model_copy(edit_header(lambda h: h[first_tensor(h)].update(dtype="F16") or h)),
         "data offsets do not match its shape and dtype"),
    Case("model-bad-generation-config", "models", "a generation_config.json that is not JSON", "download",
         model_copy(lambda f: (f / "generation_config.json").write_text("{max_length: 9")),
         "generation_config.json is not valid JSON"),
    Case("model-no-eos", "models", "a tokenizer without an EOS token", "download", model_copy(no_eos, tokenizer_only=True),
         "the tokenizer has no EOS token"),
    Case("model-no-tokenizer", "models", "a tokenizer folder without tokenizer files", "download",
         model_copy(lambda f: [p.unlink() for p in f.glob("tokenizer*")], tokenizer_only=True), "the tokenizer does not load", slow=True),
    Case("tokenizer-for-hub-recipe", "models", "model.tokenizer with a Hub recipe", "download",
         both(model_copy(lambda f: None, tokenizer_only=True), params(model__recipe="qwen2.5-7b-instruct")),
         "model.tokenizer is for recipes built from config", slow=True),
    Case("model-custom-code", "models", "a model folder whose config.json has auto_map (its own code), without opt-in",
         "download", model_copy(custom_code("config.json")),
         "models/sources/m/config.json has an auto_map, so loading it runs the folder's own code (evil.py), and "
         "model.trust_remote_code is false"),
    Case("tokenizer-custom-code", "models", "a tokenizer folder whose tokenizer_config.json has auto_map, without "
         "opt-in", "download", model_copy(custom_code("tokenizer_config.json"), tokenizer_only=True),
         "models/sources/m/tokenizer_config.json has an auto_map"),
    Case("base-custom-code", "models", "models/base given an auto_map and a .py by hand, then tokenize", "tokenize",
         lambda repo, ctx: custom_code("tokenizer_config.json")(repo / "models" / "base"),
         "models/base/tokenizer_config.json has an auto_map, so loading it runs the folder's own code (evil.py)"),
    Case("remote-code-no-opt-in", "models", "a recipe that runs Hub code, without opt-in", "download",
         params(model__recipe="chatglm2-6b", model__convert=False), "set model.trust_remote_code"),
    # templates and tokenizing
    Case("no-chat-template", "templates", "template `tokenizer` with a tokenizer that has no chat template", "tokenize",
         no_chat_template, "tokenize.template"),
    Case("template-fails-when-run", "templates", "a tokenizer chat template that parses but fails when rendered",
         "download", model_copy(lambda folder: (folder / "chat_template.jinja").write_text(
             "{% for m in messages %}{{ m['content'] | int // 0 }}{% endfor %}"), tokenizer_only=True),
         "models/sources/m: the tokenizer's chat template fails on a user turn and an answer"),
    Case("unknown-template", "templates", "an unknown template", "tokenize", params(tokenize__template="alpaca-x"),
         "tokenize.template: no recipe 'alpaca-x'"),
    Case("bad-template-recipe", "templates", "a template recipe without {content}", "tokenize",
         write("recipes/templates/mine.yaml", "description: mine\nuser: 'Q: '\nassistant: 'A: {content}'\n", tokenize__template="mine"),
         "recipes/templates/mine.yaml"),
    Case("template-unknown-placeholder", "templates", "a template with a placeholder other than {content}/{round}",
         "tokenize", write("recipes/templates/mine.yaml", "description: mine\nuser: '{name}: {content}'\n"
                           "assistant: 'A: {content}'\n", tokenize__template="mine"), "the placeholder {name}"),
    Case("max-length-too-small", "templates", "max_length too short for any prompt", "tokenize",
         params(tokenize__max_length=8), "tokenize.max_length", slow=True),
    # DeepSpeed and launching (checked by the head process, before any rank starts)
    Case("deepspeed-unknown", "launch", "an unknown DeepSpeed recipe (zero4)", "train", params(train__deepspeed="zero4"),
         "train.deepspeed: no recipe 'zero4'"),
    Case("deepspeed-bad-json", "launch", "a DeepSpeed JSON with a syntax error", "train",
         deepspeed_json('{"zero_optimization": {"stage": 3,}}'),
         "recipes/deepspeed/mine.json is not valid JSON"),
    Case("deepspeed-bad-stage", "launch", "ZeRO stage 4 in a DeepSpeed JSON", "train",
         deepspeed_json('{"zero_optimization": {"stage": 4}}'),
         "zero_optimization.stage"),
    Case("deepspeed-typo", "launch", "a misspelt DeepSpeed key", "train",
         deepspeed_json('{"zero_optimization": {"stage": 3, "overlap_com": true}}'), "zero_optimization.overlap_com", slow=True),
    Case("deepspeed-outside", "launch", "a DeepSpeed JSON outside recipes/deepspeed/", "train",
         write("ds.json", '{"zero_optimization": {"stage": 3}}', train__deepspeed="ds.json"),
         "outside recipes/deepspeed/"),
    Case("hostfile-malformed", "launch", "a malformed hostfile", "train",
         hostfile("node0 gpus=4\n"), "bad entry"),
    Case("hostfile-missing", "launch", "a hostfile that does not exist", "train",
         params(**DS, train__launch__hostfile="nope"), "train.launch.hostfile nope does not exist", slow=True),
    Case("hostfile-short", "launch", "fewer hosts than train.launch.nodes", "train",
         hostfile("node0 slots=4\n", nodes=2),
         "lists 1 host(s) and train.launch.nodes is 2", slow=True),
    Case("include-missing-gpu", "launch", "`include` names a GPU that is not there", "train",
         hostfile("node0 slots=2\n", include="node0:0,5"),
         "train.launch.include", slow=True),
    Case("include-unknown-host", "launch", "`include` names a host not in the hostfile", "train",
         hostfile("node0 slots=2\nnode1 slots=2\n", nodes=2, include="node7:0"), "train.launch.include", slow=True),
    Case("deepspeed-quoted-stage", "launch", 'a quoted ZeRO stage ("3")', "train",
         deepspeed_json('{"zero_optimization": {"stage": "3"}}'), "zero_optimization.stage is the string '3'"),
    Case("deepspeed-nan", "launch", "NaN in a DeepSpeed JSON", "train",
         deepspeed_json('{"zero_optimization": {"stage": 3}, "gradient_clipping": NaN}'), "NaN is not a JSON number"),
    Case("deepspeed-duplicate-key", "launch", "a key twice in a DeepSpeed JSON", "train",
         deepspeed_json('{"zero_optimization": {"stage": 3, "stage": 2}}'), "duplicate key 'stage'"),
    Case("deepspeed-quoted-flag", "launch", 'a quoted flag deeper in a DeepSpeed JSON ("false")', "train",
         deepspeed_json('{"bf16": {"enabled": "false"}, "zero_optimization": {"stage": 3}}'),
         "bf16.enabled is the string 'false'"),
    Case("deepspeed-top-typo", "launch", "a misspelt top-level DeepSpeed section", "train",
         deepspeed_json('{"zero_optimisation": {"stage": 3}}'), "did you mean 'zero_optimization'"),
    Case("deepspeed-fixed-batch", "launch", "a DeepSpeed JSON fixing a batch size or dtype params.yaml does not have",
         "train", deepspeed_json('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 2, '
                                 '"fp16": {"enabled": true}}'),
         "train_micro_batch_size_per_gpu=2 but train.batch_size is 8; fp16.enabled=True but train.dtype is float32"),
    Case("deepspeed-section-shape", "launch", 'a DeepSpeed section that is not an object ("bf16": true)', "train",
         deepspeed_json('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", "bf16": true}'),
         "bf16 must be a JSON object"),
    Case("deepspeed-fixed-steps", "launch", "a DeepSpeed scheduler with a fixed total_num_steps", "train",
         deepspeed_json('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", '
                        '"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 1000}}}'),
         'scheduler.params.total_num_steps must be "auto"'),
    Case("hostfile-directory", "launch", "a directory as the hostfile", "train",
         write("hostdir/a", "x", **DS, train__launch__hostfile="hostdir"), "train.launch.hostfile hostdir is a directory"),
    Case("hostfile-zero-slots", "launch", "slots=0 in the hostfile", "train",
         hostfile("node0 slots=0\n"), "node0 has slots=0"),
    Case("hostfile-unreachable", "launch", "a hostfile host that ssh cannot reach", "train",
         hostfile("no-such-host.invalid slots=1\n"), "train.launch.hostfile hostfile"),
    Case("include-without-hostfile", "launch", "`include` names another host but there is no hostfile", "train",
         params(**DS, train__launch__include="node0:0"), "the only host is localhost"),
    Case("port-in-use", "launch", "the master port is taken", "train", busy_port, "is in use on this host"),
    # train settings that need the model or the environment (checked before the model loads)
    Case("lora-targets-empty", "train", "an empty list of LoRA target modules", "train",
         params(train__lora__target_modules=[]), "'train.lora.target_modules': List should have at least 1 item"),
    Case("lora-target-missing", "train", "a LoRA target module the model does not have", "train",
         params(train__lora__target_modules=["no_such_proj"]), "'no_such_proj' matches no layer"),
    Case("flash-attention-missing", "train", "flash_attention_2 where flash-attn or a GPU is missing", "train",
         params(train__attn_implementation="flash_attention_2"), "train.attn_implementation"),
    Case("flex-attention-cpu", "train", "flex_attention on a machine without a GPU", "train",
         params(train__attn_implementation="flex_attention"), "flex_attention trains only on a CUDA GPU"),
    Case("liger-missing", "train", "Liger kernels without liger-kernel installed", "train", params(train__liger=True),
         "train.liger"),
    Case("checkpoint-layers-no-checkpointing", "train", "train.checkpoint_layers with checkpointing off", "train",
         params(train__checkpoint_layers=2), "train.checkpoint_layers (2) needs train.gradient_checkpointing true or "
         "selective (it is false)"),
    Case("checkpoint-layers-with-auto", "train", "train.checkpoint_layers with gradient_checkpointing auto", "train",
         params(train__gradient_checkpointing="auto", train__checkpoint_layers=2),
         "train.checkpoint_layers (2) with train.gradient_checkpointing auto: auto picks the checkpointed layers itself"),
    Case("checkpoint-layers-too-many", "train", "more checkpointed layers than the model has", "train",
         params(train__gradient_checkpointing=True, train__checkpoint_layers=40),
         "train.checkpoint_layers 40 is more than the model's 2 decoder layers: use 2 or null"),
    Case("rope-no-rope", "train", "RoPE scaling for a model without rotary positions (a GPT-2)", "train",
         other_base(tiny_gpt2, model__rope_scaling=LINEAR),
         "model.rope_scaling: the gpt2 model of models/base has no rotary position embeddings"),
    Case("rope-per-layer", "train", "RoPE scaling for a model with RoPE per layer type (a Gemma 3)", "train",
         other_base(tiny_gemma3, model__rope_scaling=LINEAR), "model.rope_scaling: the gemma3_text model of "
         "models/base sets RoPE per layer type"),
    Case("rope-hub-code", "train", "RoPE scaling for a model that runs its Hub code", "train",
         both(lambda repo, ctx: edit_json(repo / "models/base/config.json", lambda c: c.update(auto_map={
             "AutoModelForCausalLM": "m.M"})), params(model__rope_scaling=LINEAR, model__trust_remote_code=True)),
         "model.rope_scaling: the model of models/base runs its own Hub code"),
    Case("rope-longrope-lengths", "train", "longrope factor lists of the wrong length for the model", "train",
         params(model__rope_scaling={"type": "longrope", "factor": 4.0, "short_factor": [1.0] * 3,
                                     "long_factor": [1.0] * 3}),
         "model.rope_scaling: longrope's short_factor and long_factor need 16 values each for the llama model of "
         "models/base"),
    Case("sample-past-context", "train", "a sample longer than the model's positions, no RoPE scaling", "train",
         lambda repo, ctx: edit_json(repo / "models/base/config.json", lambda c: c.update(max_position_embeddings=16)),
         "but the llama model of models/base has 16 positions: set model.rope_scaling (e.g. {type: yarn, factor:"),
    Case("sample-past-scaled-context", "train", "a sample longer than the RoPE-scaled context", "train",
         both(lambda repo, ctx: edit_json(repo / "models/base/config.json", lambda c: c.update(max_position_embeddings=8)),
              params(model__rope_scaling=LINEAR)),
         "but the llama model of models/base has 16 positions: model.rope_scaling (linear, factor 2 x 8 positions) is "
         "too short for it: raise its factor to"),
    # stages run out of order (python -m stages.X without dvc repro)
    Case("tokenize-no-raw", "order", "tokenize before download", "tokenize", remove("data/raw"), "data/raw"),
    Case("train-no-tokenized", "order", "train before tokenize", "train", remove("data/tokenized"), "data/tokenized"),
    Case("train-other-tokenizer", "order", "download re-run with another tokenizer, then train without tokenize",
         "train", lambda repo, ctx: swap_two_tokens(repo / "models" / "base"), "dvc repro -s tokenize"),
    Case("merge-no-adapter", "order", "merge before train", "merge", remove("models/adapter"), "models/adapter"),
    Case("eval-no-merged", "order", "eval before merge", "eval", remove("models/merged"), "models/merged"),
    Case("export-no-merged", "order", "export before merge", "export", params(export__types=["f16"]), "models/merged/config.json"),
    # outputs damaged since their stage wrote them, then a later stage run by hand (python -m stages.X)
    Case("raw-manifest-cut", "damaged", "data/raw/manifest.json cut short", "tokenize",
         lambda repo, ctx: truncate(repo / "data/raw/manifest.json"),
         "data/raw/manifest.json is damaged (JSONDecodeError"),
    Case("raw-split-cut", "damaged", "data/raw/train.jsonl cut short", "tokenize",
         lambda repo, ctx: truncate(repo / "data/raw/train.jsonl"),
         "data/raw/train.jsonl is damaged (its sha256 is not the one data/raw/manifest.json records"),
    Case("tokenized-arrow-cut", "damaged", "an Arrow file of data/tokenized cut short", "train",
         lambda repo, ctx: truncate(repo / ARROW),
         f"{ARROW} is damaged"),
    Case("tokenized-column-dropped", "damaged", "data/tokenized saved again without its assistant_masks column",
         "train", edit_train_split(lambda d: d.remove_columns("assistant_masks")),
         "data/tokenized/train is damaged (no column 'assistant_masks'"),
    Case("tokenized-dict-broken", "damaged", "data/tokenized/dataset_dict.json broken", "eval",
         both(write("models/merged/config.json", "{}"), lambda repo, ctx: truncate(repo / "data/tokenized/dataset_dict.json")),
         "data/tokenized/dataset_dict.json is damaged (JSONDecodeError"),
    Case("tokenizer-cut", "damaged", "the tokenizer in data/tokenized cut short", "merge",
         both(write("models/adapter/adapter_config.json", "{}"),
              lambda repo, ctx: truncate(repo / "data/tokenized/tokenizer/tokenizer.json")),
         "data/tokenized/tokenizer/tokenizer.json is damaged"),
    Case("base-weights-cut", "damaged", "models/base/model.safetensors cut short", "train",
         lambda repo, ctx: truncate(repo / "models/base/model.safetensors"),
         "models/base/model.safetensors is damaged (truncated"),
    Case("adapter-weights-damaged", "damaged", "models/adapter/adapter_model.safetensors damaged", "merge",
         write("models/adapter/adapter_config.json", "{}"), "models/adapter/adapter_model.safetensors is damaged"),
    Case("adapter-weights-deleted", "damaged", "models/adapter/adapter_model.safetensors deleted", "merge",
         both(write("models/adapter/adapter_config.json", "{}"),
              lambda repo, ctx: (repo / "models/adapter/adapter_model.safetensors").unlink()),
         "models/adapter is damaged (adapter_config.json but no *.safetensors weights)"),
    Case("adapter-tensor-renamed", "damaged", "a tensor of models/adapter renamed (PEFT would merge its random init "
         "there)", "merge",
         both(real_adapter, lambda repo, ctx: edit_header(rename_first, "adapter_model.safetensors")(repo / "models/adapter")),
         "models/adapter is damaged (the weights have no tensor"),
    Case("adapter-rank-edited", "damaged", "adapter_config.json's r edited", "merge",
         both(real_adapter, lambda repo, ctx: edit_json(repo / "models/adapter/adapter_config.json",
                                                        lambda c: c.update(r=16))),
         "where adapter_config.json (LORA, r=16) on models/base makes it"),
    Case("adapter-alpha-edited", "damaged", "adapter_config.json's lora_alpha edited (same shapes: PEFT would merge it)",
         "merge", both(recorded_adapter, lambda repo, ctx: edit_json(repo / "models/adapter/adapter_config.json",
                                                                     lambda c: c.update(lora_alpha=64))),
         "models/adapter/adapter_config.json is damaged (its sha256 is not the one"),
    Case("adapter-nan", "damaged", "NaN in an adapter's weights", "merge", nan_adapter,
         "models/adapter/adapter_model.safetensors is damaged (tensor base_model.model.model.layers.0.self_attn.q_proj."
         "lora_B.weight holds NaN"),
    Case("tokenized-column-retyped", "damaged", "a column of data/tokenized replaced by text", "train",
         edit_train_split(lambda d: d.remove_columns("assistant_masks").add_column("assistant_masks", ["x"] * len(d))),
         "column 'assistant_masks' holds"),
    Case("merged-weights-deleted", "damaged", "models/merged/model.safetensors deleted", "eval",
         both(write("models/merged/config.json", "{}"), lambda repo, ctx: (repo / "models/merged/model.safetensors").unlink()),
         "models/merged is damaged (config.json but no *.safetensors weights)"),
    Case("merged-config-broken", "damaged", "models/merged/config.json broken", "eval",
         write("models/merged/config.json", "{x"), "models/merged/config.json is damaged (not valid JSON"),
    Case("base-tensor-renamed", "damaged", "a tensor of models/base renamed (merge would have left it random)", "merge",
         both(write("models/adapter/adapter_config.json", "{}"),
              lambda repo, ctx: edit_header(rename_first)(repo / "models" / "base")),
         "models/base is damaged (the weights have no tensor"),
    Case("raw-manifest-list", "damaged", "data/raw/manifest.json replaced by a JSON list", "tokenize",
         lambda repo, ctx: (repo / "data/raw/manifest.json").write_text("[]"),
         "data/raw/manifest.json is damaged (a JSON list, not an object): restore it with"),
    # a swap journal no stage wrote: checked whole before anything moves
    Case("journal-outside", "journal", "a journal moving a folder from outside the project onto data/raw", "tokenize",
         journal(lambda repo: [[str(outside_folder(repo)), "data/raw"]]),
         ".outputs-journal.json pairs data/raw with '/"),
    Case("journal-link", "journal", "a journal whose temp folder is a link leading outside", "tokenize",
         journal(lambda repo: [[str(temp_link(repo)), "data/raw"]]),
         "which is not the temp path a stage writes beside it: no stage of this project wrote it, and nothing was "
         "moved; delete it (rm .outputs-journal.json)"),
    Case("journal-not-an-output", "journal", "a journal replacing a path that is no output (data/sources)", "download",
         journal(lambda repo: [["data/.sources.tmp-x-1-abc", "data/sources"]]),
         ".outputs-journal.json names 'data/sources', which is not an output in dvc.yaml"),
    Case("journal-garbled", "journal", "a garbled journal", "merge", journal('{"host": "x", "pid": 1, "pairs": [["da'),
         ".outputs-journal.json is not valid JSON: no stage of this project wrote it"),
    Case("journal-shape", "journal", "a journal of another shape (a list)", "eval", journal("[1, 2]"),
         ".outputs-journal.json is not of a journal's shape"),
    # inputs edited while the stage ran: DVC hashes them when it ends, so the stage checks before its swap
    Case("params-edited-mid-run", "during", "params.yaml edited (a key the stage declares)", "download",
         while_running("data/.raw.tmp-*", lambda repo: (repo / "params.yaml").write_text(
             (repo / "params.yaml").read_text().replace("validation_fraction: 0.1 ", "validation_fraction: 0.2 "))),
         "params.yaml key data.validation_fraction (0.1, now 0.2) changed while stage download "
         "ran", env=WORKED),
    Case("source-edited-mid-run", "during", "a data file appended to", "download",
         both(data_file("x.jsonl", jsonl(GOOD)), while_running("data/.raw.tmp-*", append(
             "data/sources/x.jsonl", jsonl([{"instruction": "late", "input": "", "output": "record"}])))),
         "data/sources/x.jsonl (under data/sources, a dependency in dvc.yaml) changed while stage download "
         "ran", env=WORKED),
    Case("code-edited-mid-run", "during", "the stage's code edited", "download",
         while_running("data/.raw.tmp-*", append("stages/lib/data/mix.py", "# edited\n")),
         "stages/lib/data/mix.py (under stages/lib/data, a dependency in dvc.yaml) changed while stage download "
         "ran", env=WORKED),
]


def render_table() -> str:
    """The guide's table: per category, each situation, the stage that stops and what its error names."""
    lines = []
    for category, title in CATEGORIES.items():
        lines += [f"**{title}**", "", "| What happened | Stops in | The error line names |", "|---|---|---|"]
        lines += [f"| {c.situation} | {c.stage} | `{c.expect}` |" for c in CASES if c.category == category]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.stdout.write(render_table())
    os._exit(0)
