"""HLWQ numerics and format: Hadamard rotation, Lloyd-Max codebooks, packing, metrics."""

from quant.codebook import lloyd_max_codebook
from quant.core import dequantize, quantize_tensor, validate_weight
from quant.hadamard import fwht, hadamard_matrix
from quant.metrics import tensor_metrics
from quant.packed import PackedTensor
from quant.packing import pack_codes, unpack_codes

__all__ = [
    "PackedTensor", "dequantize", "fwht", "hadamard_matrix", "lloyd_max_codebook",
    "pack_codes", "quantize_tensor", "tensor_metrics", "unpack_codes", "validate_weight",
]
