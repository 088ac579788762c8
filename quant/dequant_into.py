"""Decode a PackedTensor into a caller's buffer in the Hadamard domain, fast on the CPU.

``hlwq.quant.core.dequantize`` returns ``W = R @ H`` block by block, where
``R[row, j] = scales[row, group(j)] * codebook[codes[row, j]] / sqrt(block_size)``
(quant/packed.py). This module writes ``R`` itself, ``(out, in_padded)``, into
a preallocated buffer of the caller's dtype. The packed runtime uses it since
``x @ W.T == (x_padded @ H_blockdiag) @ R.T``: rotating the activations costs
``block_size / out_features`` of the matmul, rotating every weight on every
forward would cost ``block_size / tokens``.

On the CPU a numba pass per row unpacks eight codes at a time (they fill
exactly ``bits`` bytes; groups hold a multiple of 8 codes, so the eight share
a scale), looks them up, scales them and writes fp32 or bf16 (rounded to
nearest even): about 0.4 (fp32) / 0.6 (bf16) ns per weight on one core.
``threads > 1`` splits the rows over plain Python threads (the kernels release
the GIL), not numba's own OpenMP pool: beside torch's pool that one made both
slower on a busy 2-core machine. Other devices, dtypes and group sizes take a
plain torch path.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from itertools import pairwise

import numba
import numpy as np
import torch

from hlwq.quant.errors import InvalidTensorError
from hlwq.quant.packed import PackedTensor
from hlwq.quant.packing import unpack_codes

# Below this many values per thread a split costs more than it saves.
PARALLEL_MIN_VALUES = 1 << 19


@numba.njit(inline="always")
def _octet_word(code_row, bits, octet):
    """Codes ``8 * octet .. 8 * octet + 7`` of a row: ``bits`` bytes read as one integer."""
    byte = octet * bits
    word = 0
    for k in range(bits):
        word |= np.int64(code_row[byte + k]) << (8 * k)
    return word


@cache
def _kernels(bits: int):
    """fp32 and bf16 decoders with ``bits`` a compile-time constant (a third faster than a
    run-time ``bits``: the shifts and masks fold). Compiled once per width, cached on disk."""
    mask, levels_count = (1 << bits) - 1, 1 << bits

    @numba.njit(cache=True, nogil=True)
    def to_f32(codes, scales, levels, group_shift, out):
        rows, width = out.shape
        for r in range(rows):
            code_row, out_row = codes[r], out[r]
            for octet in range(width // 8):
                word = _octet_word(code_row, bits, octet)
                scale = scales[r, (octet * 8) >> group_shift]
                for m in range(8):
                    out_row[octet * 8 + m] = levels[(word >> (m * bits)) & mask] * scale

    @numba.njit(cache=True, nogil=True)
    def to_bf16(codes, scales, levels, group_shift, out_bits):
        # Per group, round its 2**bits possible values to bf16 once (nearest even); each
        # weight is then one lookup (the default 5 bits: 32 roundings per 128 weights).
        rows, width = out_bits.shape
        group = 1 << group_shift
        values = np.empty(levels_count, np.float32)
        value_bits = values.view(np.uint32)
        rounded = np.empty(levels_count, np.uint16)
        for r in range(rows):
            code_row, out_row = codes[r], out_bits[r]
            for g in range(width >> group_shift):
                for c in range(levels_count):
                    values[c] = levels[c] * scales[r, g]
                for c in range(levels_count):
                    u = value_bits[c]
                    rounded[c] = np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)
                for octet in range(g * group // 8, (g + 1) * group // 8):
                    word = _octet_word(code_row, bits, octet)
                    for m in range(8):
                        out_row[octet * 8 + m] = rounded[(word >> (m * bits)) & mask]

    return to_f32, to_bf16


def decode_rotated_into(packed: PackedTensor, out: torch.Tensor, factor: float | None = None,
                        threads: int = 1) -> torch.Tensor:
    """Write ``factor * scales[group] * codebook[code]`` (``(out, in_padded)``) into ``out``.

    The default ``factor = 1 / sqrt(block_size)`` gives ``R`` itself. ``out``
    must be contiguous, floating point, on the packed tensor's device. Returns ``out``.
    """
    _check_target(packed, out)
    if not (out.device.type == "cpu" and packed.group_size % 8 == 0
            and out.dtype in (torch.float32, torch.bfloat16)):
        return out.copy_(decode_rotated(packed, factor))
    codes = packed.codes.contiguous().numpy()
    scales = packed.scales.to(torch.float32).numpy()  # one value per group: small
    levels = scaled_levels(packed, factor).numpy()
    shift = packed.group_size.bit_length() - 1
    to_f32, to_bf16 = _kernels(packed.bits)
    if out.dtype == torch.float32:
        kernel, target = to_f32, out.numpy()
    else:
        kernel, target = to_bf16, out.view(torch.int16).numpy().view(np.uint16)
    rows = packed.shape[0]
    parts = max(1, min(threads, rows, out.numel() // PARALLEL_MIN_VALUES))
    spans = list(pairwise(rows * i // parts for i in range(parts + 1)))
    pending = [_pool().submit(kernel, codes[a:b], scales[a:b], levels, shift, target[a:b])
               for a, b in spans[1:]]
    a, b = spans[0]     # the calling thread takes the first share
    kernel(codes[a:b], scales[a:b], levels, shift, target[a:b])
    for part in pending:
        part.result()
    return out


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="hlwq-decode")


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
