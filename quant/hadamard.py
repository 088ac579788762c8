"""The orthonormal Walsh-Hadamard transform used to rotate each weight block.

``H`` is the Sylvester matrix ``H_2n = [[H_n, H_n], [H_n, -H_n]] / sqrt(2)``:
orthonormal and symmetric, so it is its own inverse and ``x @ H == fwht(x)``.
"""

from __future__ import annotations

import functools
import math

import torch

from hlwq.quant.errors import InvalidOptionError


def check_power_of_two(n: int, option: str = "block_size", low: int = 1, high: int = 1 << 16) -> None:
    if not isinstance(n, int) or n < low or n > high or n & (n - 1):
        raise InvalidOptionError(f"{option}={n!r}: must be a power of two in {low}..{high}")


@functools.cache
def _cached_hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(torch.float32)


def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthonormal ``(n, n)`` Sylvester Walsh-Hadamard matrix in fp32 (a fresh copy)."""
    check_power_of_two(n, "n")
    return _cached_hadamard(n).clone()


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last axis (self-inverse).

    O(n log n) butterflies; equals ``x @ hadamard_matrix(n)`` up to float rounding.
    Integer inputs are promoted to fp32; float inputs keep their dtype.
    """
    n = x.shape[-1]
    check_power_of_two(n, "last dimension")
    if not x.is_floating_point():
        x = x.float()
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    half = 1
    while half < n:
        pairs = y.view(-1, n // (2 * half), 2, half)
        low, high = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((low + high, low - high), dim=2).view(-1, n)
        half *= 2
    return (y * (1.0 / math.sqrt(n))).view(*lead, n)
