"""HLWQ numerics (no I/O): Hadamard rotation, Lloyd-Max codebooks, packing, metrics.

The names below are imported lazily, so that ``hlwq.quant.errors`` (which every layer
and the CLI's fast checks import) does not cost a torch import.
"""

from hlwq.lazy import lazy_exports

_EXPORTS = {
    "lloyd_max_codebook": "hlwq.quant.codebook",
    "dequantize": "hlwq.quant.core",
    "quantize_tensor": "hlwq.quant.core",
    "validate_weight": "hlwq.quant.core",
    "fwht": "hlwq.quant.hadamard",
    "hadamard_matrix": "hlwq.quant.hadamard",
    "tensor_metrics": "hlwq.quant.metrics",
    "PackedTensor": "hlwq.quant.packed",
    "pack_codes": "hlwq.quant.packing",
    "unpack_codes": "hlwq.quant.packing",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
