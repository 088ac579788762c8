"""Inference from packed weights: PackedLinear, the pipeline loader, offload, video writing.

The names below are imported on first use, so ``import hlwq.runtime`` does
not pay for numba or diffusers.
"""

from hlwq.lazy import lazy_exports

_EXPORTS = {
    "PackedLinear": "hlwq.runtime.packed_linear",
    "DequantCache": "hlwq.runtime.packed_linear",
    "enable_dequant_cache": "hlwq.runtime.packed_linear",
    "load_pipeline": "hlwq.runtime.loader",
    "load_component": "hlwq.runtime.loader",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
