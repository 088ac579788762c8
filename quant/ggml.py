"""ggml's own quantizer and dequantizer, bound with ctypes: the GGUF formats of quant/formats.py.

Why here: ggml_quantize_chunk and the type traits' to_float are numerics (floats in, codes
and floats out) that the model card's format table needs at packaging time, below the layers
that may not import benchmarks/. It stays optional: nothing loads until a GGUF format is
applied, the library comes from llama-cpp-python's bundled libggml (the ``bench`` extra,
found with find_spec, never imported) or from ``$HLWQ_GGML_LIB``, and without one the
GGUF formats report why they cannot run. The GGUF formats are never re-implemented here.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

from hlwq.quant.errors import MissingDependencyError
from hlwq.quant.formats import BENCH_EXTRA, Reconstruction, padded_columns

GGML_LIB_ENV = "HLWQ_GGML_LIB"


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
        padded = padded_columns(weight.float(), block).contiguous()
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
