"""One set of CPU kernels on every x86-64 machine, so that a CPU run reproduces dvc.lock bit for bit.

torch, MKL and oneDNN pick their CPU kernels by the instruction set the processor has (AVX2, AVX-512, AMX) and by
vendor, and the kernels round differently: the same default run trained another adapter on an AVX-512 CPU than on
the AVX2 one dvc.lock was made on. Every stage (stages/__init__.py) therefore caps the three libraries at AVX2,
which every x86-64 CPU of the last decade has, and asks MKL for its conditional numerical reproducibility mode
(MKL_CBWR), which makes its results equal on Intel and AMD. They are environment variables read when torch loads,
so they are set before any stage imports it, and only where the user has not set them.

GPU runs are not affected (their kernels are the GPU's). `DVC_QLORA_CPU_KERNELS=native` leaves the libraries to
choose (faster on AVX-512 CPUs, no longer reproducible across machines).
"""

from __future__ import annotations

import os

SWITCH = "DVC_QLORA_CPU_KERNELS"  # "native": no pinning
PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorized kernels
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL's matrix products (torch's CPU BLAS)
    "MKL_CBWR": "AVX2,STRICT",  # MKL: the same code path on Intel and AMD, whatever the number of threads
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (mkldnn) convolutions and matrix products
}


def pin() -> dict[str, str]:
    """Set the PINNED variables that are unset (unless DVC_QLORA_CPU_KERNELS=native); returns what was set.
    Effective only before torch is imported in this process; launched ranks inherit the environment."""
    if os.environ.get(SWITCH, "").lower() == "native":
        return {}
    added = {k: v for k, v in PINNED.items() if k not in os.environ}
    os.environ.update(added)
    return added
