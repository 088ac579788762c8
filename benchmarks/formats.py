"""The weight formats `hlwq bench formats` compares, each as fake quantization.

Every format maps a 2-D float32 weight ``(out, in)`` to its reconstruction and the exact
bytes it would store (codes, scales, codebooks: everything), so bits per weight are true
bits. Rows are padded with zeros to the format's block length where needed; the padding's
bytes count, its values do not.

- ``hlwq-*``: this project's encoder (quant.core.quantize_tensor / dequantize).
- ``gguf-*``: ggml's own C quantizer and dequantizer (``ggml_quantize_chunk`` and the type
  traits' ``to_float``), loaded with ctypes from llama-cpp-python's bundled libggml (the
  ``bench`` extra) or from ``$HLWQ_GGML_LIB``. Never re-implemented here.
- ``fp8-*``: torch's float8_e4m3fn cast, an fp32 scale per tensor or per row.
- ``int8-row*``: symmetric per-row int8 (fp32 scale), optionally after rotating each
  256-value slice of a row by the orthonormal Walsh-Hadamard matrix.
- ``nvfp4`` / ``mxfp4``: E2M1 values from NVIDIA's NVFP4 (16-value blocks, E4M3 scales, one
  fp32 tensor scale) and the OCP Microscaling v1.0 MXFP4 (32-value blocks, E8M0 scales)
  specifications, rounding to nearest, ties to even.
- ``hqq-4bit-g64``: the ``hqq`` package (bench extra), 4-bit, groups of 64, scale and zero
  rounded to fp16 as it stores them.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch

from hlwq.quant.errors import InvalidOptionError, MissingDependencyError

BENCH_EXTRA = "pip install 'hlwq-pipeline[bench]'"
GGML_LIB_ENV = "HLWQ_GGML_LIB"
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


def _padded(weight: torch.Tensor, multiple: int) -> torch.Tensor:
    """``weight`` with zero columns appended up to a multiple of ``multiple``."""
    extra = -weight.shape[1] % multiple
    return torch.nn.functional.pad(weight, (0, extra)) if extra else weight


def _blocks(weight: torch.Tensor, size: int) -> torch.Tensor:
    padded = _padded(weight, size)
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


def hqq_4bit_g64(weight: torch.Tensor) -> Reconstruction:
    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        raise MissingDependencyError(f"format hqq-4bit-g64 needs the hqq package: "
                                     f"{BENCH_EXTRA}") from None
    padded = _padded(weight, HQQ_GROUP).contiguous()
    codes, meta = Quantizer.quantize(padded, nbits=4, group_size=HQQ_GROUP, optimize=True,
                                     axis=1, compute_dtype=torch.float32, device="cpu")
    meta["scale"] = meta["scale"].half().float()     # HQQ stores scale and zero as fp16
    meta["zero"] = meta["zero"].half().float()
    restored = Quantizer.dequantize(codes, meta).float()[:, :weight.shape[1]].contiguous()
    groups = padded.numel() // HQQ_GROUP
    return Reconstruction(restored, padded.numel() // 2 + groups * 2 * 2)


# --------------------------------------------------------------------------- GGUF via ggml


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits (ggml.h); checked against ggml_blck_size/ggml_type_size on load
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_int64)),
                ("from_float_ref", ctypes.c_void_p)]


def ggml_library_path() -> Path | None:
    """``$HLWQ_GGML_LIB``, else libggml-base (or the older single libggml) bundled with
    llama-cpp-python; None when neither is there."""
    if os.environ.get(GGML_LIB_ENV):
        return Path(os.environ[GGML_LIB_ENV])
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    for pattern in ("libggml-base.so*", "libggml-base.dylib", "ggml-base.dll",
                    "libggml.so*", "libggml.dylib", "ggml.dll"):
        found = sorted(lib.glob(pattern))
        if found:
            return found[0]
    return None


class GGML:
    """ggml's quantize and dequantize entry points, bound with ctypes."""

    def __init__(self, path: Path):
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as error:
            raise MissingDependencyError(f"{path}: cannot load ggml ({error})") from None
        lib = self.lib
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        lib.ggml_type_size.restype = ctypes.c_size_t
        lib.ggml_type_size.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p]
        self.path = path

    def type_id(self, name: str) -> int:
        """The ggml_type whose name is ``name`` (e.g. "q4_K")."""
        for type_id in range(128):
            found = self.lib.ggml_type_name(type_id)
            if found == b"NONE":
                break
            if found and found.decode() == name:
                return type_id
        raise MissingDependencyError(f"{self.path}: this ggml has no type {name!r}")

    def block(self, type_id: int) -> tuple[int, int]:
        """(values per block, bytes per block)."""
        return self.lib.ggml_blck_size(type_id), self.lib.ggml_type_size(type_id)

    def to_float(self, type_id: int):
        traits = self.lib.ggml_get_type_traits(type_id).contents
        if (traits.blck_size, traits.type_size) != self.block(type_id) or not traits.to_float:
            raise MissingDependencyError(f"{self.path}: ggml_type_traits does not have the "
                                         "layout this benchmark binds (a different ggml ABI)")
        return traits.to_float

    def round_trip(self, weight: torch.Tensor, name: str) -> Reconstruction:
        """Quantize with ggml_quantize_chunk (no importance matrix) and decode with to_float,
        in row chunks on torch's thread count (ctypes releases the GIL)."""
        type_id = self.type_id(name)
        block, _ = self.block(type_id)
        padded = _padded(weight.float(), block).contiguous()
        rows, n_per_row = padded.shape
        row_bytes = self.lib.ggml_row_size(type_id, n_per_row)
        data = torch.empty(rows * row_bytes, dtype=torch.uint8)
        out = torch.empty_like(padded)
        to_float = self.to_float(type_id)
        step = max(1, (1 << 20) // n_per_row)

        def chunk(start: int) -> int:
            count = min(step, rows - start)
            written = self.lib.ggml_quantize_chunk(
                type_id, padded.data_ptr(), data.data_ptr(), start * n_per_row, count,
                n_per_row, None)
            to_float(data.data_ptr() + start * row_bytes, out.data_ptr() + start * n_per_row * 4,
                     count * n_per_row)
            return written

        with ThreadPoolExecutor(torch.get_num_threads()) as pool:
            nbytes = sum(pool.map(chunk, range(0, rows, step)))
        return Reconstruction(out[:, :weight.shape[1]].contiguous(), nbytes)


@cache
def ggml() -> GGML:
    """The loaded ggml library, or MissingDependencyError saying how to get one."""
    path = ggml_library_path()
    if path is None:
        raise MissingDependencyError(f"GGUF formats are quantized by ggml's own C code and no "
                                     f"ggml library was found: {BENCH_EXTRA} (llama-cpp-python), "
                                     f"or set {GGML_LIB_ENV} to a libggml-base")
    return GGML(path)


def gguf(weight: torch.Tensor, type_name: str) -> Reconstruction:
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
            ggml()
        elif fmt.needs == "hqq" and importlib.util.find_spec("hqq") is None:
            raise MissingDependencyError(f"format {fmt.name} needs the hqq package: {BENCH_EXTRA}")
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
