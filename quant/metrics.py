"""Error metrics between a weight and its reconstruction, accumulated in float64.

(A cosine summed in float32 over 16M elements can exceed 1.0.) The sums run in
a parallel numba kernel that reads bf16 or fp32 values in place; other float
dtypes are compared at fp32 precision.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hlwq.quant import kernels
from hlwq.quant.core import dequantize
from hlwq.quant.errors import InvalidTensorError
from hlwq.quant.packed import PackedTensor

CHUNK_VALUES = 1 << 22     # weights decoded per pass by packed_metrics (16 MiB in fp32)


def tensor_metrics(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """``cosine``, ``rel_mse`` (||a-r||^2 / ||r||^2), ``sqnr_db`` and ``max_abs_err`` as floats."""
    return _from_row_sums(_row_sums(reference, approx))


def packed_metrics(reference: torch.Tensor, packed: PackedTensor) -> dict[str, float]:
    """``tensor_metrics(reference, dequantize(packed))`` with the same values, decoding
    ``CHUNK_VALUES`` weights at a time so the fp32 copy of a large weight never exists."""
    if tuple(reference.shape) != tuple(packed.shape):
        raise InvalidTensorError(f"metrics: shapes differ, reference {tuple(reference.shape)} "
                                 f"vs packed {tuple(packed.shape)}")
    rows = packed.shape[0]
    step = max(1, CHUNK_VALUES // max(1, packed.shape[1]))
    chunks = [(start, min(rows, start + step)) for start in range(0, rows, step)]
    return _from_row_sums(np.concatenate(
        [_row_sums(reference[start:stop], dequantize(packed.rows(start, stop)))
         for start, stop in chunks]))


def _row_sums(reference: torch.Tensor, approx: torch.Tensor) -> np.ndarray:
    if reference.shape != approx.shape:
        raise InvalidTensorError(f"metrics: shapes differ, reference {tuple(reference.shape)} "
                                 f"vs approximation {tuple(approx.shape)}")
    ref_bits, ref_fp32 = _as_rows(reference)
    approx_bits, approx_fp32 = _as_rows(approx)
    return kernels.metric_sums(ref_bits, ref_fp32, approx_bits, approx_fp32,
                               ref_bits.shape[1] // (1 + ref_fp32))


def _from_row_sums(per_row: np.ndarray) -> dict[str, float]:
    """The metrics from per-row sums (r^2, a^2, r*a, (a-r)^2, max |a-r|), summed in row order."""
    ref_sq, approx_sq, dot, err_sq = (float(x) for x in per_row[:, :4].sum(axis=0))
    return {
        "cosine": _cosine(dot, ref_sq, approx_sq),
        "rel_mse": err_sq / ref_sq if ref_sq > 0 else (0.0 if err_sq == 0 else math.inf),
        "sqnr_db": _sqnr_db(ref_sq, err_sq),
        "max_abs_err": float(per_row[:, 4].max()) if per_row.size else 0.0,
    }


def _as_rows(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """A tensor as uint16 rows the kernel reads: bf16 bits, or fp32 bits in pairs (True)."""
    t = t.detach().cpu()
    if t.dtype != torch.bfloat16:
        t = t.float()
    rows = t.shape[0] if t.dim() > 1 else 1
    t = t.contiguous().reshape(rows, t.numel() // rows if rows else 0)
    return t.view(torch.int16).numpy().view(np.uint16), t.dtype == torch.float32


def _sqnr_db(ref_sq: float, err_sq: float) -> float:
    if err_sq == 0:
        return math.inf
    return 10 * math.log10(ref_sq / err_sq) if ref_sq > 0 else -math.inf


def _cosine(dot: float, ref_sq: float, approx_sq: float) -> float:
    if ref_sq == 0 or approx_sq == 0:
        return 1.0 if ref_sq == approx_sq else 0.0
    return dot / math.sqrt(ref_sq * approx_sq)
