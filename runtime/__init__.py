"""Inference from packed weights: PackedLinear, the pipeline loader, offload, video writing.

The names below are imported on first use, so ``import hlwq.runtime`` does
not pay for numba or diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "PackedLinear": "hlwq.runtime.packed_linear",
    "DequantCache": "hlwq.runtime.packed_linear",
    "enable_dequant_cache": "hlwq.runtime.packed_linear",
    "load_pipeline": "hlwq.runtime.loader",
    "load_component": "hlwq.runtime.loader",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hlwq.runtime' has no attribute {name!r}")
