"""llama.cpp's own Hugging Face → GGUF converter (convert_hf_to_gguf.py with its `conversion` package and gguf-py),
found or fetched, and run in this process.

No wheel ships the converter: llama-cpp-python's source distribution carries it under vendor/llama.cpp, the same
llama.cpp its wheel builds, so the converter and the runtime that reads its files agree. `export.llama_cpp`
names a llama.cpp source folder instead; else the stage gets the pinned sdist with pip (once, ~77 MB, checked by
its sha256) and keeps the parts it needs under the user's cache folder.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..core.errors import UserError
from ..core.progress import phase

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose vendor/llama.cpp converts (pip's `gguf` extra)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")  # what the converter imports, and its licence
# what the converter writes itself (`--outtype`); the smaller types are llama.cpp's quantizer's (quantize.py)
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")


def cache_folder() -> Path:
    """Where the fetched converter is kept: $XDG_CACHE_HOME/dvc-qlora (default ~/.cache/dvc-qlora)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dvc-qlora"


def _complete(folder: Path) -> bool:
    return (folder / "convert_hf_to_gguf.py").is_file() and (folder / "conversion" / "__init__.py").is_file() and (
        folder / "gguf-py" / "gguf" / "__init__.py"
    ).is_file()


def converter_folder(given: str | None) -> Path:
    """The llama.cpp source folder to convert with: `given` (export.llama_cpp), else the cached copy of
    llama-cpp-python LLAMA_CPP_PYTHON's vendor/llama.cpp, fetched with pip on first use. UserError names what to
    change when `given` is not such a folder or the fetch fails."""
    if given is not None:
        folder = Path(given).expanduser()
        if not _complete(folder):
            raise UserError(f"export.llama_cpp: {given} is not a llama.cpp source folder (it needs "
                            "convert_hf_to_gguf.py, conversion/ and gguf-py/); set it to one, or to null for "
                            f"llama-cpp-python {LLAMA_CPP_PYTHON}'s, fetched with pip")  # fmt: skip
        return folder
    folder = cache_folder() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if not _complete(folder):
        fetch(folder)
    return folder


def fetch(folder: Path) -> None:
    """pip-download llama-cpp-python's sdist, check its sha256 and unpack PARTS of vendor/llama.cpp into `folder`
    (atomically: a temp folder renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    phase("export", f"fetching llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON}'s sources, ~77 MB) "
                    f"into {folder}")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--dest", tmp],
                             capture_output=True, text=True)  # fmt: skip
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not sdists:
            said = (got.stderr.strip().splitlines() or ["no file"])[-1][:200]
            raise UserError(f"could not download llama-cpp-python {LLAMA_CPP_PYTHON}'s sources with pip ({said}): "
                            "with no package index at hand, set export.llama_cpp to a llama.cpp source folder")  # fmt: skip
        digest = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise UserError(f"{sdists[0].name} from the package index has sha256 {digest}, not the pinned "
                            f"{SDIST_SHA256}: set export.llama_cpp to a llama.cpp source folder you trust")  # fmt: skip
        unpacked = Path(tmp) / "llama.cpp"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].split("/")[0] in PARTS]  # fmt: skip
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(unpacked, members=members, filter="data")
        if folder.exists():  # another run fetched it meanwhile
            return
        os.replace(unpacked, folder)


def load(folder: Path):
    """Import the converter's `conversion` package and its own gguf-py from `folder`; returns (conversion, gguf).
    The converter's gguf-py goes first on sys.path: it knows every architecture its converter writes."""
    if str(folder / "gguf-py") not in sys.path:
        sys.path.insert(0, str(folder / "gguf-py"))
    if str(folder) not in sys.path:
        sys.path.append(str(folder))  # last: a llama.cpp checkout's other folders shadow nothing
    import conversion
    import gguf

    if not Path(gguf.__file__).resolve().is_relative_to((folder / "gguf-py").resolve()):
        raise UserError(f"gguf was imported from {gguf.__file__} before the converter's own ({folder}/gguf-py): "
                        "run the export stage on its own (python -m stages.export)")  # fmt: skip
    return conversion, gguf


def model_class(conversion, model_dir: Path, version: str):
    """The converter's class for `model_dir`'s architecture (config.json `architectures`); UserError naming the
    architecture when this converter has none."""
    needed = ("ModelBase", "ModelType", "get_model_architecture", "get_model_class")
    missing = [name for name in needed if not hasattr(conversion, name)]
    if missing:  # a folder that only looks like llama.cpp's, or a converter too old or new for this stage
        raise UserError(f"export.llama_cpp: the converter's `conversion` package ({version}) has no {missing[0]}: "
                        "point export.llama_cpp at a llama.cpp source folder of the pinned release, or leave it "
                        "null to fetch that release")  # fmt: skip
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    try:
        return conversion.get_model_class(arch)
    except NotImplementedError:
        raise UserError(f"{model_dir}: llama.cpp's converter ({version}) does not support the architecture {arch}, "
                        "so it cannot be written as GGUF; set export.types: [] to skip the export") from None


def converter_name(given: str | None) -> str:
    """How the converter is named in messages and metrics: the folder given, or the pinned release."""
    return given or f"llama-cpp-python {LLAMA_CPP_PYTHON}"


def convert(make, gguf, model_dir: Path, out: Path, outtype: str, *, vocab_hook, name: str) -> None:
    """Write `model_dir` as one GGUF file `out` of `outtype` (CONVERTER_TYPES). `make(model_dir, ftype, out,
    model_name=)` builds the converter's model (its class, or a wrapper); `vocab_hook(model)` runs after the
    converter's set_vocab and may change what it wrote (model.gguf_writer)."""
    import torch

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]  # fmt: skip
    with torch.inference_mode():
        model = make(model_dir, ftype, out, model_name=name)
        converter_set_vocab = model.set_vocab

        def set_vocab() -> None:
            converter_set_vocab()
            vocab_hook(model)

        model.set_vocab = set_vocab
        model.write()

