"""The pipeline's stages. Importing the package pins the CPU kernels before torch loads (lib/core/cpu_kernels.py)."""

from stages.lib.core.cpu_kernels import pin as _pin_cpu_kernels

_pin_cpu_kernels()
