"""HLWQ quantize / dequantize: one encoder with two modes, one decoder.

Both modes write the same format (quant/packed.py). Per rotation block the
weights are rotated by the orthonormal Walsh-Hadamard matrix; each group of
rotated values gets one fp16 scale and one codebook level per value.

- ``reference``: scale = the block's L2 norm, codes = nearest level of the
  normalised rotated values: the reference (polarquant 0.6.0) encoder's output.
- ``refined`` (default): per group, a few clipping-aware candidate scales, each
  with its nearest codes and a least-squares refit, then Lloyd steps; the best
  is scored exactly against the reference choice and the better one is kept,
  so no group is worse than the reference's. Optionally (``refine_codebook``)
  Lloyd rounds fit the codebook to this tensor's own rotated coordinates.

The numerics run in fused numba kernels (quant/kernels.py).
"""

from __future__ import annotations

import functools
import threading

import numba
import numpy as np
import torch

from hlwq.quant import kernels
from hlwq.quant.choices import MODES
from hlwq.quant.codebook import check_bits, lloyd_max_codebook
from hlwq.quant.errors import InvalidOptionError, InvalidTensorError, NonFiniteTensorError
from hlwq.quant.hadamard import check_power_of_two
from hlwq.quant.packed import (
    PackedTensor,
    layout_mismatches,
    packed_layout,
    padded_in_features,
)

MIN_BLOCK, MAX_BLOCK = 32, 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FP16_MAX = 65504.0
CODEBOOK_ROUNDS = 6          # at most this many Lloyd rounds for refine_codebook
MIN_LEVEL_GAP = 1e-3         # keeps a refined codebook strictly increasing
# Kernels run one at a time per process: each already uses every core, and numba's
# fallback "workqueue" threading layer must not be entered from two threads at once.
_KERNEL_LOCK = threading.Lock()

# Scale candidates per bit width: (anchor, factor) with anchor rms or absmax/largest
# level, then Lloyd steps. Few bits clip little (rms-anchored); many bits want the
# block's largest value near the outermost level (absmax-anchored).
_RMS, _ABSMAX = kernels.ANCHOR_RMS, kernels.ANCHOR_ABSMAX
SEARCH = {   # picked by a sweep of anchors, centres and spacings on Gaussian and Student-t(5)
    2: ([(_RMS, 0.9), (_RMS, 1.0), (_RMS, 1.1)], 2),
    3: ([(_RMS, 0.85), (_RMS, 0.95), (_RMS, 1.05), (_RMS, 1.15)], 2),
    4: ([(_ABSMAX, f) for f in (0.9, 0.95, 1.0, 1.05, 1.1)], 2),
    5: ([(_ABSMAX, f) for f in (0.94, 0.98, 1.02)], 2),
    6: ([(_ABSMAX, f) for f in (0.985, 1.025, 1.065)], 2),
    7: ([(_ABSMAX, f) for f in (1.0, 1.08, 1.16)], 2),
    8: ([(_ABSMAX, f) for f in (1.135, 1.175, 1.215)], 2),
}


def _label(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


def _for(name: str | None) -> str:
    return f"tensor {name!r}: " if name else ""


def validate_weight(weight: torch.Tensor, name: str | None = None) -> None:
    """Raise a typed error unless ``weight`` is a non-empty, finite 2-D float tensor."""
    check_structure(weight, name)
    if not bool(torch.isfinite(weight).all()):
        raise_non_finite(weight, name)


def check_structure(weight: torch.Tensor, name: str | None = None) -> None:
    """Rank, size and dtype checks (``validate_weight`` without the finiteness scan)."""
    label = _label(name)
    if not isinstance(weight, torch.Tensor):
        raise InvalidTensorError(f"{label}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise InvalidTensorError(f"{label}: must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise InvalidTensorError(f"{label}: is empty, shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise InvalidTensorError(f"{label}: dtype {weight.dtype} cannot be quantized; "
                                 "expected float32, float16 or bfloat16")


def raise_non_finite(weight: torch.Tensor, name: str | None = None) -> None:
    """Raise NonFiniteTensorError saying how many NaN/Inf values there are and where."""
    bad = ~torch.isfinite(weight)
    row, col = (int(i) for i in bad.nonzero()[0])
    raise NonFiniteTensorError(f"{_label(name)}: {int(bad.sum())} NaN/Inf value(s), first at "
                               f"row {row}, column {col}; a weight must be finite to quantize")


def check_options(bits: int, block_size: int, group_size: int | None, mode: str,
                  refine_codebook: bool = False, name: str | None = None) -> int:
    """Validate the encoder options; return the effective group size."""
    try:
        check_bits(bits)
        check_power_of_two(block_size, "block_size", MIN_BLOCK, MAX_BLOCK)
    except InvalidOptionError as error:
        raise InvalidOptionError(f"{_for(name)}{error}") from None
    if mode not in MODES:
        raise InvalidOptionError(f"{_for(name)}mode={mode!r}: must be one of {', '.join(MODES)}")
    group = block_size if group_size is None else group_size
    if (not isinstance(group, int) or isinstance(group, bool) or group < 8 or group % 8
            or block_size % group):
        raise InvalidOptionError(f"{_for(name)}group_size={group_size!r}: must divide "
                                 f"block_size={block_size} and be a multiple of 8 (the "
                                 "codes of a group fill whole bytes)")
    if mode == "reference" and (group != block_size or refine_codebook):
        raise InvalidOptionError(f"{_for(name)}mode='reference' has one L2-norm scale per "
                                 "block and the standard codebook; use mode='refined' for "
                                 "group_size or refine_codebook")
    return group


def quantize_tensor(weight: torch.Tensor, bits: int = 5, block_size: int = 128,
                    mode: str = "refined", group_size: int | None = None,
                    refine_codebook: bool = False, name: str | None = None) -> PackedTensor:
    """Quantize a 2-D float weight ``(out, in)`` to HLWQ codes and fp16 scales."""
    group = check_options(bits, block_size, group_size, mode, refine_codebook, name)
    check_structure(weight, name)
    source = _kernel_source(weight)
    codebook = lloyd_max_codebook(bits)
    encoded = _encode(source, weight.shape, bits, block_size, group, mode, codebook)
    if encoded is None:                       # the kernel met NaN/Inf: find and name them
        raise_non_finite(weight, name)
    if refine_codebook:
        codebook, encoded = _refine_codebook(source, weight.shape, bits, block_size, group,
                                             codebook, encoded)
    packed, scales, _ = encoded
    return PackedTensor(
        codes=torch.from_numpy(packed), scales=_to_fp16_scales(scales, name),
        codebook=codebook, shape=tuple(weight.shape), bits=bits, block_size=block_size,
        group_size=group, mode=mode)


def dequantize(packed: PackedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild the ``(out, in)`` weight from a :class:`PackedTensor`."""
    check_packed(packed)
    rows, in_features = packed.shape
    bf16 = dtype == torch.bfloat16
    out = torch.empty((rows, in_features), dtype=torch.bfloat16 if bf16 else torch.float32)
    with _KERNEL_LOCK:
        kernels.decode(_numpy(packed.codes), _numpy(packed.scales.float()),
                       _numpy(packed.codebook.float()), packed.bits, packed.block_size,
                       packed.group_size, in_features, not bf16, _as_uint16(out))
    return out if bf16 else out.to(dtype)


def check_packed(packed: PackedTensor) -> None:
    """Raise InvalidTensorError unless the fields agree (the decoder indexes by them)."""
    check_options(packed.bits, packed.block_size, packed.group_size, "refined")
    problems = layout_mismatches(packed)
    if problems:
        raise InvalidTensorError(
            f"packed tensor {packed.shape}: {problems[0]} for bits={packed.bits}, "
            f"block_size={packed.block_size}, group_size={packed.group_size}")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy())


def _as_uint16(t: torch.Tensor) -> np.ndarray:
    """A contiguous bf16 or fp32 tensor's bytes as a uint16 (rows, n) array (no copy)."""
    return t.view(torch.int16).numpy().view(np.uint16)


def _kernel_source(weight: torch.Tensor) -> tuple[np.ndarray, bool]:
    """The weight as the encoder reads it (bf16 bits, or fp32 bits as uint16 pairs)."""
    weight = weight.detach().cpu()
    if weight.dtype != torch.bfloat16:
        return _as_uint16(weight.float().contiguous()), True
    return _as_uint16(weight.contiguous()), False


@functools.cache
def _search_arrays(bits: int):
    candidates, lloyd_steps = SEARCH[bits]
    anchors = np.array([a for a, _ in candidates], np.int32)
    factors = np.array([f for _, f in candidates], np.float32)
    return anchors, factors, lloyd_steps


@functools.lru_cache(maxsize=32)
def _table(codebook_bytes: bytes) -> kernels.NearestTable:
    return kernels.NearestTable(np.frombuffer(codebook_bytes, np.float32))


def _encode(source, shape, bits, block, group, mode, codebook):
    """Run the encoder kernel: (packed codes, float32 scales, total squared error), or
    None when the weight holds NaN/Inf."""
    rows, in_features = shape
    layout = packed_layout(shape, bits, block, group)
    in_padded = padded_in_features(in_features, block)
    packed = np.empty(layout["codes"].shape, np.uint8)
    scales = np.empty(layout["scales"].shape, np.float32)
    tiles = -(-rows * (in_padded // block) // kernels.LANES)
    tile_error = np.zeros(tiles)
    tile_non_finite = np.zeros(tiles, np.int64)
    table = _table(codebook.numpy().tobytes())
    anchors, factors, lloyd_steps = _search_arrays(bits)
    with _KERNEL_LOCK:
        kernels.encode(*source, in_features, block, group, bits, mode == "refined", anchors,
                       factors, lloyd_steps, table.levels, table.approx, table.origin,
                       table.inv_width, table.first, table.threshold, packed, scales,
                       tile_error, tile_non_finite)
    if tile_non_finite.any():
        return None
    return packed, scales, float(tile_error.sum())


def _refine_codebook(source, shape, bits, block, group, codebook, encoded):
    """Lloyd rounds on this tensor's rotated coordinates; keep the codebook that lowers error."""
    best_codebook, best = codebook, encoded
    for _ in range(CODEBOOK_ROUNDS):
        packed, scales, _ = best
        with _KERNEL_LOCK:
            sums = kernels.level_sums(*source, shape[1], block, group, bits, packed, scales,
                                      1 << bits, max(1, numba.get_num_threads() * 4)).sum(0)
        fitted = np.where(sums[1] > 0, sums[0] / np.maximum(sums[1], 1e-300),
                          best_codebook.double().numpy())
        candidate = torch.from_numpy(_strictly_increasing(np.sort(fitted))).float()
        trial = _encode(source, shape, bits, block, group, "refined", candidate)
        if not trial[2] < best[2]:
            break
        best_codebook, best = candidate, trial
    return best_codebook, best


def _strictly_increasing(levels: np.ndarray) -> np.ndarray:
    for i in range(1, levels.size):
        levels[i] = max(levels[i], levels[i - 1] + MIN_LEVEL_GAP)
    return levels


def _to_fp16_scales(scales: np.ndarray, name: str | None) -> torch.Tensor:
    too_big = ~np.isfinite(scales) | (scales > FP16_MAX)
    if too_big.any():
        row, col = np.argwhere(too_big)[0]
        raise InvalidTensorError(f"{_label(name)}: the block scale at row {row}, group {col} "
                                 f"exceeds the fp16 range ({FP16_MAX:g}); weights this large "
                                 "cannot be stored with fp16 scales")
    return torch.from_numpy(scales).half()
