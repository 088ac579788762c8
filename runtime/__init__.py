"""Inference from packed weights: PackedLinear, the pipeline loader, model fixtures.

The names below are imported on first use, so ``import runtime.fixtures`` does
not pay for numba or diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "PackedLinear": "runtime.packed_linear",
    "DequantCache": "runtime.packed_linear",
    "enable_dequant_cache": "runtime.packed_linear",
    "load_pipeline": "runtime.loader",
    "load_component": "runtime.loader",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
