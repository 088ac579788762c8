"""HLWQ numerics (no I/O): Hadamard rotation, Lloyd-Max codebooks, packing, metrics.

The names below are imported lazily, so that ``hlwq.quant.errors`` (which every layer
and the CLI's fast checks import) does not cost a torch import.
"""

from importlib import import_module

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


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hlwq.quant' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
