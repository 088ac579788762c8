"""The size arithmetic: one function used by the plan, the manifest and the model card."""

from __future__ import annotations

import math

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
SCALE_BYTES = 2      # one fp16 scale per group
CODEBOOK_BYTES = 4   # fp32 per codebook level


def padded_in_features(in_features: int, block_size: int) -> int:
    return -(-in_features // block_size) * block_size


def packed_nbytes(shape: tuple[int, ...], bits: int, block_size: int = 128,
                  group_size: int | None = None) -> int:
    """Exact bytes of one quantized 2-D tensor: packed codes + fp16 scales + fp32 codebook."""
    out_features, in_features = shape
    group = group_size or block_size
    in_padded = padded_in_features(in_features, block_size)
    codes = out_features * in_padded * bits // 8
    scales = out_features * (in_padded // group) * SCALE_BYTES
    return codes + scales + (2 ** bits) * CODEBOOK_BYTES


def original_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of a tensor as stored in a safetensors file (dtype as safetensors names it)."""
    return math.prod(shape) * DTYPE_BYTES[dtype]


def bits_per_weight(packed_bytes: int, params: int) -> float:
    return 8.0 * packed_bytes / params if params else 0.0
