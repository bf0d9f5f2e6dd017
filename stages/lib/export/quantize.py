"""GGUF types below 8 bits, made by llama.cpp's own quantizer (`llama_model_quantize`, as the llama-quantize tool
runs it) through llama-cpp-python, from a lossless GGUF of the merged model.

llama-cpp-python builds llama.cpp from source on Linux (minutes), so it is the optional `gguf` extra
(`pip install -e '.[gguf]'`), never part of the default install. Without an importance matrix: the k-quants are
llama.cpp's plain ones. A tensor whose rows do not split into the type's blocks (k-quants need 256 columns)
gets llama.cpp's fallback type, as llama-quantize does.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import UserError

QUANTIZER_TYPES = ("q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1", "q3_k_m", "q2_k")
INSTALL = "pip install -e '.[gguf]' (llama-cpp-python; on Linux pip builds llama.cpp, a few minutes)"


def require_quantizer(types: list[str]) -> None:
    """UserError naming the extra to install when `types` asks for a quantizer type and llama_cpp is missing."""
    wanted = [t for t in types if t in QUANTIZER_TYPES]
    if not wanted:
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError(f"export.types {wanted[0]} is made by llama.cpp's quantizer, which is not installed: "
                        f"{INSTALL}; or ask only for f16, bf16 or q8_0") from None  # fmt: skip


def quantize(source: Path, out: Path, type_name: str, threads: int) -> None:
    """Quantize the GGUF `source` (f32, f16 or bf16) into `out` of `type_name` (QUANTIZER_TYPES), on `threads`
    CPU threads. RuntimeError when llama.cpp reports a failure (its log says why)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {type_name}")
