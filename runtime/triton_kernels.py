"""The CUDA decode path of PackedLinear: one Triton kernel, used only when CUDA and Triton exist.

It writes the same values as ``hlwq.quant.dequant_into.decode_rotated_into`` (the CPU
reference it is tested against): ``factor * scales[row, j >> log2(G)] *
codebook[code[row, j]]`` into a reused buffer of the activation's dtype; the
Hadamard rotation and the matmul stay with cuBLAS (see runtime/packed_linear.py).
Each program decodes ``BLOCK`` columns of one row: two byte loads per code
(a code of at most 8 bits spans at most two bytes), a shift and a mask, one
gather from the small codebook, one scale, one store. The kernel is built on
first use, so importing this module never needs Triton.

Set ``TRITON_INTERPRET=1`` to run the kernel on CPU tensors (how the tests
check it on machines without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from hlwq.quant.dequant_into import scaled_levels
from hlwq.quant.packed import PackedTensor

BLOCK = 1024


@functools.cache
def available() -> bool:
    """True when a CUDA device and an importable Triton are both present."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@functools.cache
def _decode_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode(codes_ptr, scales_ptr, levels_ptr, out_ptr, width, row_bytes,
               codes_stride, scales_stride, out_stride,
               BITS: tl.constexpr, GROUP_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        bit = cols * BITS
        byte = bit >> 3
        row_codes = codes_ptr + row * codes_stride
        low = tl.load(row_codes + byte, mask=inside, other=0).to(tl.int32)
        high = tl.load(row_codes + byte + 1, mask=inside & (byte + 1 < row_bytes), other=0)
        word = low | (high.to(tl.int32) << 8)
        code = (word >> (bit & 7)) & ((1 << BITS) - 1)
        level = tl.load(levels_ptr + code, mask=inside, other=0.0)
        scale = tl.load(scales_ptr + row * scales_stride + (cols >> GROUP_SHIFT), mask=inside,
                        other=0.0).to(tl.float32)
        value = (level * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * out_stride + cols, value, mask=inside)

    return decode


def decode_rotated_into(packed: PackedTensor, out: torch.Tensor, factor: float) -> torch.Tensor:
    """Triton twin of ``hlwq.quant.dequant_into.decode_rotated_into`` (same arguments, same values)."""
    rows, width = out.shape
    levels = scaled_levels(packed, factor).to(out.device)
    grid = (rows, -(-width // BLOCK))
    _decode_kernel()[grid](
        packed.codes, packed.scales, levels, out, width, packed.codes.shape[1],
        packed.codes.stride(0), packed.scales.stride(0), out.stride(0),
        BITS=packed.bits, GROUP_SHIFT=packed.group_size.bit_length() - 1, BLOCK=BLOCK)
    return out
