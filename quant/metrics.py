"""Error metrics between a weight and its reconstruction, accumulated in float64.

(A cosine summed in float32 over 16M elements can exceed 1.0.)
"""

from __future__ import annotations

import math

import torch

from quant.errors import InvalidTensorError

_CHUNK = 1 << 20  # elements per float64 chunk: bounds the temporary memory


def tensor_metrics(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """``cosine``, ``rel_mse`` (||a-r||^2 / ||r||^2), ``sqnr_db`` and ``max_abs_err`` as floats."""
    if reference.shape != approx.shape:
        raise InvalidTensorError(f"metrics: shapes differ, reference {tuple(reference.shape)} "
                                 f"vs approximation {tuple(approx.shape)}")
    ref = reference.reshape(-1)
    app = approx.reshape(-1)
    ref_sq = app_sq = dot = err_sq = 0.0
    max_abs = 0.0
    for start in range(0, ref.numel(), _CHUNK):
        r = ref[start:start + _CHUNK].double()
        a = app[start:start + _CHUNK].double()
        diff = a - r
        ref_sq += float(r @ r)
        app_sq += float(a @ a)
        dot += float(r @ a)
        err_sq += float(diff @ diff)
        max_abs = max(max_abs, float(diff.abs().max()))
    return {
        "cosine": _cosine(dot, ref_sq, app_sq),
        "rel_mse": err_sq / ref_sq if ref_sq > 0 else (0.0 if err_sq == 0 else math.inf),
        "sqnr_db": _sqnr_db(ref_sq, err_sq),
        "max_abs_err": max_abs,
    }


def _sqnr_db(ref_sq: float, err_sq: float) -> float:
    if err_sq == 0:
        return math.inf
    return 10 * math.log10(ref_sq / err_sq) if ref_sq > 0 else -math.inf


def _cosine(dot: float, ref_sq: float, app_sq: float) -> float:
    if ref_sq == 0 or app_sq == 0:
        return 1.0 if ref_sq == app_sq else 0.0
    return dot / math.sqrt(ref_sq * app_sq)
