"""HLWQ numerics (no I/O): Hadamard rotation, Lloyd-Max codebooks, packing, metrics."""

from hlwq.quant.codebook import lloyd_max_codebook
from hlwq.quant.core import dequantize, quantize_tensor, validate_weight
from hlwq.quant.hadamard import fwht, hadamard_matrix
from hlwq.quant.metrics import tensor_metrics
from hlwq.quant.packed import PackedTensor
from hlwq.quant.packing import pack_codes, unpack_codes

__all__ = [
    "PackedTensor", "dequantize", "fwht", "hadamard_matrix", "lloyd_max_codebook",
    "pack_codes", "quantize_tensor", "tensor_metrics", "unpack_codes", "validate_weight",
]
