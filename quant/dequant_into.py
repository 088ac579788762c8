"""Decode a PackedTensor into a caller's buffer in the Hadamard domain, fast on the CPU.

``quant.core.dequantize`` returns ``W = R @ H`` block by block, where
``R[row, j] = scales[row, group(j)] * codebook[codes[row, j]] / sqrt(block_size)``
(quant/packed.py). This module writes ``R`` itself, ``(out, in_padded)``, into
a preallocated buffer of the caller's dtype. The packed runtime uses it since
``x @ W.T == (x_padded @ H_blockdiag) @ R.T``: rotating the activations costs
``block_size / out_features`` of the matmul, rotating every weight on every
forward would cost ``block_size / tokens``.

On the CPU one numba pass per row unpacks eight codes at a time (they fill
exactly ``bits`` bytes), looks them up, scales them and writes fp32 or bf16
(rounded to nearest even): about 1 ns per weight on one core. It runs on the
calling thread on purpose: at 1,024 tokens the matmul that follows costs ~15x
more per weight, and a second thread pool (numba's OpenMP beside torch's) made
both slower on a busy 2-core machine (decode 196 ms with 2 threads vs 134 ms
with 1; the layer 1.41x vs 0.98x BF16). The kernels release the GIL, so a
caller may run row ranges on several threads. Other devices and dtypes take a
plain torch path.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from quant.errors import InvalidTensorError
from quant.packed import PackedTensor
from quant.packing import unpack_codes



@numba.njit(inline="always")
def _decode_octet(code_row, scale_row, levels, bits, group_shift, octet, values):
    """``values[m] = levels[code] * scale`` for codes ``8 * octet + m`` of one row."""
    byte = octet * bits
    word = 0
    for k in range(bits):
        word |= np.int64(code_row[byte + k]) << (8 * k)
    mask = (1 << bits) - 1
    for m in range(8):
        j = octet * 8 + m
        values[m] = levels[(word >> (m * bits)) & mask] * scale_row[j >> group_shift]


@numba.njit(cache=True, nogil=True)
def _decode_f32(codes, scales, levels, bits, group_shift, out):
    rows, width = out.shape
    for r in range(rows):
        out_row = out[r]
        for octet in range(width // 8):
            _decode_octet(codes[r], scales[r], levels, bits, group_shift, octet,
                          out_row[octet * 8:octet * 8 + 8])


@numba.njit(cache=True, nogil=True)
def _decode_bf16(codes, scales, levels, bits, group_shift, out_bits):
    rows, width = out_bits.shape
    values = np.empty(8, np.float32)
    value_bits = values.view(np.uint32)
    for r in range(rows):
        out_row = out_bits[r]
        for octet in range(width // 8):
            _decode_octet(codes[r], scales[r], levels, bits, group_shift, octet, values)
            for m in range(8):
                u = value_bits[m]
                out_row[octet * 8 + m] = np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


def decode_rotated_into(packed: PackedTensor, out: torch.Tensor,
                        factor: float | None = None) -> torch.Tensor:
    """Write ``factor * scales[group] * codebook[code]`` (``(out, in_padded)``) into ``out``.

    The default ``factor = 1 / sqrt(block_size)`` gives ``R`` itself. ``out``
    must be contiguous, floating point, on the packed tensor's device. Returns ``out``.
    """
    _check_target(packed, out)
    if out.device.type == "cpu" and packed.in_padded % 8 == 0 and out.dtype in (
            torch.float32, torch.bfloat16):
        codes = packed.codes.contiguous().numpy()
        scales = packed.scales.to(torch.float32).numpy()  # one value per group: small
        levels = scaled_levels(packed, factor).numpy()
        shift = packed.group_size.bit_length() - 1
        if out.dtype == torch.float32:
            _decode_f32(codes, scales, levels, packed.bits, shift, out.numpy())
        else:
            _decode_bf16(codes, scales, levels, packed.bits, shift,
                         out.view(torch.int16).numpy().view(np.uint16))
        return out
    return out.copy_(decode_rotated(packed, factor))


def decode_rotated(packed: PackedTensor, factor: float | None = None) -> torch.Tensor:
    """The same values in fp32 with plain torch ops on the packed tensor's device (portable path)."""
    device = packed.codes.device
    codes = unpack_codes(packed.codes.cpu(), packed.bits, packed.in_padded).to(device)
    levels = scaled_levels(packed, factor).to(device)
    scales = packed.scales.float().repeat_interleave(packed.group_size, dim=1)
    return levels[codes.long()] * scales


def scaled_levels(packed: PackedTensor, factor: float | None = None) -> torch.Tensor:
    """``codebook * factor`` in fp32 (computed in fp64); ``factor`` defaults to ``1 / sqrt(B)``."""
    if factor is None:
        factor = 1.0 / math.sqrt(packed.block_size)
    return (packed.codebook.double() * factor).float()


def _check_target(packed: PackedTensor, out: torch.Tensor) -> None:
    expected = (packed.shape[0], packed.in_padded)
    if not out.is_contiguous() or not out.is_floating_point():
        raise InvalidTensorError(f"decode_rotated_into: target must be a contiguous floating-point "
                                 f"tensor, got {out.dtype} (contiguous={out.is_contiguous()})")
    if tuple(out.shape) != expected:
        raise InvalidTensorError(f"decode_rotated_into: target shape {tuple(out.shape)} != "
                                 f"{expected} (out_features, in_padded)")
    if out.device != packed.codes.device:
        raise InvalidTensorError(f"decode_rotated_into: target on {out.device}, packed codes on "
                                 f"{packed.codes.device}")
