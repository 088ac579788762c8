"""HLWQ quantize / dequantize: one encoder API with two modes, one decoder.

Both modes write the same format (see quant/packed.py). Per rotation block of
``B`` weights ``w`` the rotated coordinates are ``y = w @ H`` (orthonormal, so
errors in ``y`` equal errors in ``w``); a group of rotated coordinates with
scale ``s`` decodes to ``y_hat = (s / sqrt(B)) * codebook[code]``.

- ``reference``: ``s = ||w||`` and codes = nearest level of ``y * sqrt(B) / s``,
  the reference encoder's choice.
- ``refined``: per group, try the reference choice and a few clipping scales
  ``k * rms(y)``; for each, take the nearest codes, refit the scale by least
  squares, and keep the candidate with the smallest error after fp16 rounding
  of the scale. The reference choice is a candidate, so no group is worse.
"""

from __future__ import annotations

import math

import torch

from quant.codebook import check_bits, lloyd_max_codebook, midpoints
from quant.errors import InvalidOptionError, InvalidTensorError, NonFiniteTensorError
from quant.hadamard import check_power_of_two, fwht
from quant.packed import MODES, PackedTensor
from quant.packing import pack_codes, unpack_codes

MIN_BLOCK, MAX_BLOCK = 32, 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FP16_MAX = float(torch.finfo(torch.float16).max)
NORM_FLOOR = 1e-10                      # the reference clamps block norms here
CLIP_FACTORS = tuple(0.45 + 0.05 * i for i in range(17))   # k in 0.45..1.25
CODEBOOK_ROUNDS = 4                     # Lloyd rounds for refine_codebook
_ROWS_PER_CHUNK_ELEMENTS = 1 << 20


def _label(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


def validate_weight(weight: torch.Tensor, name: str | None = None) -> None:
    """Raise a typed error unless ``weight`` is a non-empty, finite 2-D float tensor."""
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
    bad = ~torch.isfinite(weight)
    count = int(bad.sum())
    if count:
        row, col = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteTensorError(f"{label}: {count} NaN/Inf value(s), first at row {row}, "
                                   f"column {col}")


def check_options(bits: int, block_size: int, group_size: int | None, mode: str,
                  refine_codebook: bool = False) -> int:
    """Validate the encoder options; return the effective group size."""
    check_bits(bits)
    check_power_of_two(block_size, "block_size", MIN_BLOCK, MAX_BLOCK)
    if mode not in MODES:
        raise InvalidOptionError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
    group = block_size if group_size is None else group_size
    if not isinstance(group, int) or group < 1 or block_size % group:
        raise InvalidOptionError(f"group_size={group_size!r}: must be a positive divisor of "
                                 f"block_size={block_size}")
    if mode == "reference" and (group != block_size or refine_codebook):
        raise InvalidOptionError("mode='reference' has one L2-norm scale per block and the "
                                 "standard codebook: use mode='refined' for group_size or "
                                 "refine_codebook")
    return group


def quantize_tensor(weight: torch.Tensor, bits: int = 5, block_size: int = 128,
                    mode: str = "refined", group_size: int | None = None,
                    refine_codebook: bool = False, name: str | None = None) -> PackedTensor:
    """Quantize a 2-D float weight ``(out, in)`` to HLWQ codes + fp16 scales."""
    group = check_options(bits, block_size, group_size, mode, refine_codebook)
    validate_weight(weight, name)
    codebook = lloyd_max_codebook(bits)
    rotated, norms = _rotate_blocks(weight, block_size)
    if mode == "reference":
        codes = _nearest(rotated * (math.sqrt(block_size) / norms.unsqueeze(-1)), codebook)
        scales = norms
    else:
        codes, scales, _ = _search_scales(rotated, norms, codebook, group)
        if refine_codebook:
            codebook, codes, scales = _refine_codebook(rotated, norms, codebook, codes, scales,
                                                       group)
    out_features = weight.shape[0]
    scales16 = _to_fp16_scales(scales.reshape(out_features, -1), name)
    return PackedTensor(
        codes=pack_codes(codes.reshape(out_features, -1), bits),
        scales=scales16, codebook=codebook, shape=tuple(weight.shape), bits=bits,
        block_size=block_size, group_size=group, mode=mode)


def dequantize(packed: PackedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild the ``(out, in)`` weight from a :class:`PackedTensor`."""
    out_features, in_features = packed.shape
    block = packed.block_size
    codes = unpack_codes(packed.codes, packed.bits, packed.in_padded)
    levels = packed.codebook.float()[codes.long()]
    scales = packed.scales.float().repeat_interleave(packed.group_size, dim=1)
    rotated = (levels * scales * (1.0 / math.sqrt(block))).view(out_features, -1, block)
    return fwht(rotated).reshape(out_features, -1)[:, :in_features].to(dtype)


def _rotate_blocks(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad, cut into blocks, rotate: ``(out, blocks, B)`` coordinates and block norms."""
    out_features, in_features = weight.shape
    padded = -(-in_features // block) * block
    w = torch.nn.functional.pad(weight.float(), (0, padded - in_features))
    blocks = w.view(out_features, -1, block)
    norms = torch.linalg.vector_norm(blocks, dim=-1).clamp_min(NORM_FLOOR)
    return fwht(blocks), norms


def _nearest(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (ties to the lower one), as uint8."""
    return torch.bucketize(values, midpoints(codebook)).to(torch.uint8)


def _group_error(y: torch.Tensor, yy: torch.Tensor, levels: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """Squared error of ``scale * levels`` against ``y`` per group (last axis summed)."""
    return yy - 2 * scale * (y * levels).sum(-1) + scale * scale * (levels * levels).sum(-1)


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(max=FP16_MAX).half().float()


def _search_scales(rotated: torch.Tensor, norms: torch.Tensor, codebook: torch.Tensor,
                   group: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per group best (codes, stored scale) over the candidates; returns the total error too."""
    out_features, n_blocks, block = rotated.shape
    root_b = math.sqrt(block)
    y = rotated.view(out_features, n_blocks, block // group, group)
    yy = (y * y).sum(-1)
    # The reference candidate: block norm scale, unrefit.
    ref_scale = _fp16_round(norms).unsqueeze(-1).expand_as(yy) / root_b
    best_codes = _nearest(y / (norms / root_b)[..., None, None], codebook)
    best_scale = ref_scale.clone()
    best_err = _group_error(y, yy, codebook[best_codes.long()], ref_scale)
    rms = (yy / group).sqrt().clamp_min(NORM_FLOOR)
    for k in CLIP_FACTORS:
        codes = _nearest(y / (k * rms).unsqueeze(-1), codebook)
        levels = codebook[codes.long()]
        fitted = (y * levels).sum(-1) / (levels * levels).sum(-1)
        scale = _fp16_round(fitted * root_b) / root_b
        err = _group_error(y, yy, levels, scale)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
    return best_codes, best_scale * root_b, float(best_err.double().sum())


def _refine_codebook(rotated, norms, codebook, codes, scales, group):
    """Lloyd rounds on this tensor's own coordinates; keep a codebook only if it lowers error."""
    out_features, n_blocks, block = rotated.shape
    y = rotated.view(-1, group)
    best = (codebook, codes, scales)
    best_err = _search_scales(rotated, norms, codebook, group)[2]
    for _ in range(CODEBOOK_ROUNDS):
        t = (scales.reshape(-1, 1) / math.sqrt(block)).expand_as(y).reshape(-1)
        idx = codes.reshape(-1).long()
        levels = codebook.numel()
        num = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, (t * y.reshape(-1)).double())
        den = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, (t * t).double())
        codebook = torch.where(den > 0, num / den.clamp_min(1e-300), codebook.double())
        codebook = codebook.float().sort().values
        codes, scales, err = _search_scales(rotated, norms, codebook, group)
        if err < best_err:
            best, best_err = (codebook, codes, scales), err
    return best


def _to_fp16_scales(scales: torch.Tensor, name: str | None) -> torch.Tensor:
    too_big = scales > FP16_MAX
    if too_big.any():
        row, col = (int(i) for i in too_big.nonzero()[0])
        raise InvalidTensorError(f"{_label(name)}: scale {float(scales[row, col]):.4g} at row "
                                 f"{row}, group {col} exceeds the fp16 range ({FP16_MAX:g}); "
                                 "such weights cannot be stored with fp16 scales")
    return scales.half()
