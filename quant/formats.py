"""The weight formats HLWQ is compared with (`hlwq bench formats`, the model card's
"against other formats" table), each as fake quantization.

Every format maps a 2-D float32 weight ``(out, in)`` to its reconstruction and the exact
bytes it would store (codes, scales, codebooks: everything), so bits per weight are true
bits. Rows are padded with zeros to the format's block length where needed; the padding's
bytes count, its values do not.

- ``hlwq-*``: this project's encoder (quant.core.quantize_tensor / dequantize).
- ``gguf-*``: ggml's own C quantizer and dequantizer through quant/ggml.py (optional:
  llama-cpp-python's bundled libggml, the ``bench`` extra, or ``$HLWQ_GGML_LIB``). Never
  re-implemented here.
- ``fp8-*``: torch's float8_e4m3fn cast, an fp32 scale per tensor or per row.
- ``int8-row*``: symmetric per-row int8 (fp32 scale), optionally after rotating each
  256-value slice of a row by the orthonormal Walsh-Hadamard matrix.
- ``nvfp4`` / ``mxfp4``: E2M1 values from NVIDIA's NVFP4 (16-value blocks, E4M3 scales, one
  fp32 tensor scale) and the OCP Microscaling v1.0 MXFP4 (32-value blocks, E8M0 scales)
  specifications, rounding to nearest, ties to even.
- ``hqq-4bit-g64``: the ``hqq`` package (optional, the bench extra, imported only when the
  format runs), 4-bit, groups of 64, scale and zero rounded to fp16 as it stores them.

Formats whose library is missing say why (``missing_dependency``) instead of running.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from hlwq.quant.errors import InvalidOptionError, MissingDependencyError

BENCH_EXTRA = "pip install 'hlwq-pipeline[bench]'"
FP8_MAX = 448.0                       # largest float8_e4m3fn value
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # FP4 magnitudes, index = code
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_TIES_UP = (0.75, 1.75, 3.5)      # midpoints whose upper neighbour has the even code
E2M1_MAX_EXP = 2                      # exponent of the largest E2M1 value (6 = 1.5 * 2^2)
HADAMARD_SLICE = 256
HQQ_GROUP = 64
ROW_CHUNK = 1024                      # rows per pass of the elementwise formats


@dataclass(frozen=True)
class Reconstruction:
    weight: torch.Tensor              # float32, the input's shape
    nbytes: int                       # what the format stores for the whole tensor


@dataclass(frozen=True)
class Format:
    name: str
    family: str                       # hlwq | gguf | fp8 | int8 | fp4 | hqq
    apply: Callable[[torch.Tensor], Reconstruction]
    needs: str | None = None          # the optional library it runs on, when any


def bits_per_weight(nbytes: int, weight: torch.Tensor) -> float:
    return 8.0 * nbytes / weight.numel()


def padded_columns(weight: torch.Tensor, multiple: int) -> torch.Tensor:
    """``weight`` with zero columns appended up to a multiple of ``multiple``."""
    extra = -weight.shape[1] % multiple
    return torch.nn.functional.pad(weight, (0, extra)) if extra else weight


def _blocks(weight: torch.Tensor, size: int) -> torch.Tensor:
    padded = padded_columns(weight, size)
    return padded.reshape(padded.shape[0], -1, size)


def _unblocked(blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return blocks.reshape(shape[0], -1)[:, :shape[1]].contiguous()


def _in_row_chunks(weight: torch.Tensor, rows_fn) -> torch.Tensor:
    """``rows_fn`` over ROW_CHUNK rows at a time: the float temporaries of a 67M-weight
    tensor stay small."""
    return torch.cat([rows_fn(chunk) for chunk in weight.split(ROW_CHUNK)])


# --------------------------------------------------------------------------- HLWQ


def hlwq(weight: torch.Tensor, bits: int, group_size: int | None) -> Reconstruction:
    from hlwq.quant.core import dequantize, quantize_tensor
    from hlwq.quant.sizes import packed_nbytes

    packed = quantize_tensor(weight, bits, group_size=group_size)
    return Reconstruction(dequantize(packed), packed_nbytes(tuple(weight.shape), bits,
                                                            packed.block_size, group_size))


# --------------------------------------------------------------------------- FP8 and INT8


def _fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (values / safe).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.float() * scale


def fp8_per_tensor(weight: torch.Tensor) -> Reconstruction:
    scale = weight.abs().amax() / FP8_MAX
    return Reconstruction(_in_row_chunks(weight, lambda rows: _fp8(rows, scale)),
                          weight.numel() + 4)


def fp8_per_row(weight: torch.Tensor) -> Reconstruction:
    def rows(chunk):
        return _fp8(chunk, chunk.abs().amax(dim=1, keepdim=True) / FP8_MAX)

    return Reconstruction(_in_row_chunks(weight, rows), weight.numel() + 4 * weight.shape[0])


def _int8_rows(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (weight / safe).round_().clamp_(-127, 127) * scale


def int8_per_row(weight: torch.Tensor) -> Reconstruction:
    return Reconstruction(_in_row_chunks(weight, _int8_rows), weight.numel() + 4 * weight.shape[0])


def int8_per_row_hadamard(weight: torch.Tensor) -> Reconstruction:
    from hlwq.quant.hadamard import hadamard_matrix

    h = hadamard_matrix(HADAMARD_SLICE)

    def rows(chunk):
        rotated = _blocks(chunk, HADAMARD_SLICE) @ h
        restored = _int8_rows(rotated.reshape(chunk.shape[0], -1)).reshape(rotated.shape) @ h.T
        return _unblocked(restored, chunk.shape)

    padded = -(-weight.shape[1] // HADAMARD_SLICE) * HADAMARD_SLICE
    return Reconstruction(_in_row_chunks(weight, rows), weight.shape[0] * (padded + 4))


# --------------------------------------------------------------------------- FP4 (E2M1)


def e2m1(values: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value, ties to an even code, saturating at +-6."""
    magnitude = values.abs()
    code = torch.bucketize(magnitude, torch.tensor(E2M1_MIDPOINTS))   # a tie takes the lower
    for tie in E2M1_TIES_UP:
        code += magnitude == tie
    return torch.tensor(E2M1_GRID)[code].copysign_(values)


def nvfp4(weight: torch.Tensor) -> Reconstruction:
    """16-value blocks; block scale amax/6 in E4M3 relative to a tensor scale amax/(6*448)."""
    tensor_scale = weight.abs().amax() / (E2M1_GRID[-1] * FP8_MAX)
    padded = -(-weight.shape[1] // 16) * 16 * weight.shape[0]
    nbytes = padded // 2 + padded // 16 + 4
    if tensor_scale == 0:
        return Reconstruction(weight.clone(), nbytes)

    def rows(chunk):
        blocks = _blocks(chunk, 16)
        scale = blocks.abs().amax(-1, keepdim=True) / E2M1_GRID[-1] / tensor_scale
        scale = scale.clamp_(max=FP8_MAX).to(torch.float8_e4m3fn).float() * tensor_scale
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return _unblocked(e2m1(blocks / safe) * scale, chunk.shape)

    return Reconstruction(_in_row_chunks(weight, rows), nbytes)


def mxfp4(weight: torch.Tensor) -> Reconstruction:
    """32-value blocks; shared scale 2^(floor(log2(amax)) - 2) as E8M0 (2^-127 .. 2^127)."""
    def rows(chunk):
        blocks = _blocks(chunk, 32)
        amax = blocks.abs().amax(-1, keepdim=True)
        exponent = torch.floor(torch.log2(amax.clamp(min=2.0 ** -127))) - E2M1_MAX_EXP
        scale = torch.exp2(exponent.clamp_(-127, 127))
        return _unblocked(e2m1(blocks / scale) * scale, chunk.shape)

    padded = -(-weight.shape[1] // 32) * 32 * weight.shape[0]
    return Reconstruction(_in_row_chunks(weight, rows), padded // 2 + padded // 32)


# --------------------------------------------------------------------------- HQQ


def _hqq_quantizer():
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as error:
        raise MissingDependencyError(f"format hqq-4bit-g64 needs the hqq package ({error}): "
                                     f"{BENCH_EXTRA}") from None
    return Quantizer


def hqq_4bit_g64(weight: torch.Tensor) -> Reconstruction:
    Quantizer = _hqq_quantizer()
    padded = padded_columns(weight, HQQ_GROUP).contiguous()
    codes, meta = Quantizer.quantize(padded, nbits=4, group_size=HQQ_GROUP, optimize=True,
                                     axis=1, compute_dtype=torch.float32, device="cpu")
    meta["scale"] = meta["scale"].half().float()     # HQQ stores scale and zero as fp16
    meta["zero"] = meta["zero"].half().float()
    restored = Quantizer.dequantize(codes, meta).float()[:, :weight.shape[1]].contiguous()
    groups = padded.numel() // HQQ_GROUP
    return Reconstruction(restored, padded.numel() // 2 + groups * 2 * 2)


# --------------------------------------------------------------------------- GGUF via ggml


def gguf(weight: torch.Tensor, type_name: str) -> Reconstruction:
    from hlwq.quant.ggml import ggml

    return ggml().round_trip(weight, type_name)


# --------------------------------------------------------------------------- the table


def _table() -> dict[str, Format]:
    formats = [Format(f"hlwq-q{b}-b128", "hlwq", partial(hlwq, bits=b, group_size=None))
               for b in range(3, 9)]
    formats += [Format(f"hlwq-q{b}-g32", "hlwq", partial(hlwq, bits=b, group_size=32))
                for b in (4, 5)]
    formats += [Format(f"gguf-{t.lower()}", "gguf", partial(gguf, type_name=t), "ggml")
                for t in ("q4_K", "q5_K", "q6_K", "q8_0", "q4_0", "q5_0")]
    formats += [Format("fp8-e4m3-tensor", "fp8", fp8_per_tensor),
                Format("fp8-e4m3-row", "fp8", fp8_per_row),
                Format("int8-row", "int8", int8_per_row),
                Format("int8-row-hadamard256", "int8", int8_per_row_hadamard),
                Format("nvfp4", "fp4", nvfp4),
                Format("mxfp4", "fp4", mxfp4),
                Format("hqq-4bit-g64", "hqq", hqq_4bit_g64, "hqq")]
    return {f.name: f for f in formats}


FORMATS = _table()


def missing_dependency(fmt: Format) -> str | None:
    """Why ``fmt`` cannot run here (its optional library is missing), or None."""
    try:
        if fmt.needs == "ggml":
            from hlwq.quant.ggml import ggml

            ggml()
        elif fmt.needs == "hqq":
            _hqq_quantizer()
    except MissingDependencyError as error:
        return str(error)
    return None


def select(names: list[str] | None) -> list[Format]:
    """The named formats in table order (all when ``names`` is empty)."""
    if not names:
        return list(FORMATS.values())
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise InvalidOptionError(f"--formats {','.join(unknown)}: unknown; known: "
                                 f"{', '.join(FORMATS)}")
    return [f for f in FORMATS.values() if f.name in names]


# --------------------------------------------------------------------------- error per bit


def error_summary(rows: list[dict]) -> dict:
    """One format over several tensors, from per-tensor rows (``tensor``, ``weights``,
    ``nbytes``, ``rel_mse``, ``cosine``): true bits per weight over all of them, mean and worst
    relative MSE (and which tensor), mean cosine."""
    worst = max(rows, key=lambda r: r["rel_mse"])
    return {"bits_per_weight": 8.0 * sum(r["nbytes"] for r in rows) / sum(r["weights"] for r in rows),
            "rel_mse_mean": math.fsum(r["rel_mse"] for r in rows) / len(rows),
            "rel_mse_worst": worst["rel_mse"], "worst_tensor": worst["tensor"],
            "cosine_mean": math.fsum(r["cosine"] for r in rows) / len(rows), "tensors": len(rows)}


def front(entries: list[dict]) -> list[dict]:
    """The entries (``bits_per_weight``, ``rel_mse_mean``) no other entry beats on both."""
    ordered = sorted(entries, key=lambda e: (e["bits_per_weight"], e["rel_mse_mean"]))
    kept, best = [], math.inf
    for entry in ordered:
        if entry["rel_mse_mean"] < best:
            kept.append(entry)
            best = entry["rel_mse_mean"]
    return kept


def interpolated(points: list[dict], bits: float) -> float | None:
    """The error of a front at ``bits``, log-linear between its points; None outside them."""
    for a, b in itertools.pairwise(points):
        if a["bits_per_weight"] <= bits <= b["bits_per_weight"]:
            t = (bits - a["bits_per_weight"]) / (b["bits_per_weight"] - a["bits_per_weight"])
            return math.exp((1 - t) * math.log(a["rel_mse_mean"]) + t * math.log(b["rel_mse_mean"]))
    return None
