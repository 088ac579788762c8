"""Lloyd-Max codebooks for N(0, 1): the MSE-optimal scalar quantizer levels.

Computed like the reference (100 Lloyd iterations starting from uniform
boundaries on [-4, 4], centroids as closed-form conditional means) in float64,
once per bit width.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from hlwq.quant.errors import InvalidOptionError

MIN_BITS, MAX_BITS = 2, 8
LLOYD_ITERATIONS = 100
_SQRT2 = math.sqrt(2.0)


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise InvalidOptionError(f"bits={bits!r}: must be an integer in {MIN_BITS}..{MAX_BITS}")


def _pdf(x: float) -> float:
    return 0.0 if math.isinf(x) else math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _mass(a: float, b: float) -> float:
    """P(a < X < b) for X ~ N(0, 1), using erfc in the upper tail to keep precision."""
    if a >= 0:
        return 0.5 * (math.erfc(a / _SQRT2) - math.erfc(b / _SQRT2))
    if b <= 0:
        return 0.5 * (math.erfc(-b / _SQRT2) - math.erfc(-a / _SQRT2))
    return 0.5 * (math.erf(b / _SQRT2) - math.erf(a / _SQRT2))


def _conditional_mean(a: float, b: float) -> float:
    """E[X | a < X < b]; the interval midpoint when it holds (almost) no mass."""
    mass = _mass(a, b)
    return (_pdf(a) - _pdf(b)) / mass if mass > 1e-10 else (a + b) / 2


@functools.cache
def _cached_codebook(bits: int) -> tuple[float, ...]:
    levels = 1 << bits
    boundaries = [-math.inf] + [-4.0 + 8.0 * i / levels for i in range(1, levels)] + [math.inf]
    for _ in range(LLOYD_ITERATIONS):
        centroids = [_conditional_mean(boundaries[i], boundaries[i + 1]) for i in range(levels)]
        midpoints = [(lo + hi) / 2 for lo, hi in itertools.pairwise(centroids)]
        boundaries = [-math.inf, *midpoints, math.inf]
    return tuple(centroids)


def lloyd_max_codebook(bits: int) -> torch.Tensor:
    """Sorted fp32 ``(2**bits,)`` Lloyd-Max levels for N(0, 1) (a fresh copy)."""
    check_bits(bits)
    return torch.tensor(_cached_codebook(bits), dtype=torch.float32)


def midpoints(codebook: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between sorted levels: nearest level == bucket among midpoints."""
    return (codebook[:-1] + codebook[1:]) / 2
