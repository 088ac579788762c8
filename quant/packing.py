"""Bit packing of b-bit codes (2..8) into bytes: a little-endian bit stream per row.

Code ``i`` of a row occupies bits ``[i*b, (i+1)*b)`` of the row's bytes, least
significant bit first. Eight codes fill exactly ``b`` bytes, so rows are packed
eight codes at a time through one 64-bit word. At 5 bits this is the
reference's Q5 layout byte for byte.
"""

from __future__ import annotations

import torch

from hlwq.quant.codebook import check_bits
from hlwq.quant.errors import InvalidOptionError, InvalidTensorError


def packed_row_bytes(n_codes: int, bits: int) -> int:
    return -(-n_codes * bits // 8)


def _check_matrix(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.uint8:
        raise InvalidTensorError(f"{what}: expected a 2-D uint8 tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(rows, n)`` uint8 codes below ``2**bits`` -> ``(rows, ceil(n*bits/8))`` uint8."""
    check_bits(bits)
    _check_matrix(codes, "codes")
    rows, n = codes.shape
    if codes.numel() and int(codes.max()) >> bits:
        raise InvalidTensorError(f"codes: value {int(codes.max())} does not fit in {bits} bits")
    padded = -(-n // 8) * 8
    words = torch.zeros(rows, padded, dtype=torch.int64)
    words[:, :n] = codes
    words = words.view(rows, -1, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (words << shifts).sum(-1, keepdim=True)          # disjoint bit ranges: sum == or
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    packed = ((word >> byte_shifts) & 0xFF).to(torch.uint8).view(rows, -1)
    return packed[:, :packed_row_bytes(n, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(rows, ceil(n*bits/8))`` uint8 -> ``(rows, n)`` uint8."""
    check_bits(bits)
    _check_matrix(packed, "packed codes")
    rows, width = packed.shape
    if width != packed_row_bytes(n, bits):
        raise InvalidOptionError(f"packed codes: {width} bytes per row cannot hold {n} codes of "
                                 f"{bits} bits (expected {packed_row_bytes(n, bits)})")
    groups = -(-n // 8)
    stream = torch.zeros(rows, groups * bits, dtype=torch.int64)
    stream[:, :width] = packed
    stream = stream.view(rows, groups, bits)
    word = (stream << (torch.arange(bits, dtype=torch.int64) * 8)).sum(-1, keepdim=True)
    codes = (word >> (torch.arange(8, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).view(rows, -1)[:, :n].contiguous()
