"""The size arithmetic: one function used by the plan, the manifest and the model card."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from hlwq.quant.errors import InvalidOptionError
from hlwq.quant.packed import packed_layout, padded_in_features  # noqa: F401 (re-exported)

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def packed_nbytes(shape: tuple[int, ...], bits: int, block_size: int = 128,
                  group_size: int | None = None) -> int:
    """Exact bytes of one quantized 2-D tensor: packed codes + fp16 scales + fp32 codebook."""
    return sum(part.nbytes for part in packed_layout(tuple(shape), bits, block_size,
                                                      group_size).values())


def format_bits_per_weight(bits: int, group_size: int, block_size: int = 128) -> float:
    """Bits per weight of a format (codes and scales of the packed layout) before padding
    and the codebook: ``bits + 16 / group_size``."""
    layout = packed_layout((1, block_size), bits, block_size, group_size)
    return 8.0 * (layout["codes"].nbytes + layout["scales"].nbytes) / block_size


def original_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of a tensor as stored in a safetensors file (dtype as safetensors names it)."""
    return math.prod(shape) * DTYPE_BYTES[dtype]


def bits_per_weight(packed_bytes: int, params: int) -> float:
    return 8.0 * packed_bytes / params if params else 0.0


def tensor_nbytes(shape, dtype: str, bits: int | None, block_size: int = 128,
                  group_size: int | None = None) -> tuple[int, int]:
    """(original, stored) bytes of one tensor: packed when ``bits`` is set, else kept as stored."""
    original = original_nbytes(tuple(shape), dtype)
    if bits is None:
        return original, original
    return original, packed_nbytes(tuple(shape), bits, block_size, group_size)


def size_table(rows, block_size: int = 128, group_size: int | None = None) -> dict:
    """Per-component and total sizes of a plan, manifest or inventory.

    ``rows``: mappings (or an Arrow table) with ``component``, ``shape``, ``dtype``,
    ``action`` ("quantize" | "keep") and ``bits``; a row's own ``block_size`` /
    ``group_size`` win over the arguments. Kept tensors count their original bytes
    as packed bytes. Returns::

        {"components": {name: {tensors, quantized_tensors, params, quantized_params,
                               original_bytes, packed_bytes, quantized_packed_bytes,
                               bits_per_weight}},      # in order of first appearance
         "total_tensors", "total_params", "quantized_tensors", "quantized_params",
         "total_original_bytes", "total_packed_bytes", "quantized_packed_bytes",
         "bits_per_weight"}
    """
    if hasattr(rows, "to_pylist"):
        rows = rows.to_pylist()
    fields = ("tensors", "quantized_tensors", "params", "quantized_params", "original_bytes",
              "packed_bytes", "quantized_packed_bytes")
    components: dict[str, dict] = {}
    for row in rows:
        quantized = row["action"] == "quantize"
        original, packed = tensor_nbytes(
            row["shape"], row["dtype"], row["bits"] if quantized else None,
            row.get("block_size") or block_size, row.get("group_size") or group_size)
        params = math.prod(row["shape"])
        entry = components.setdefault(row["component"], dict.fromkeys(fields, 0))
        entry["tensors"] += 1
        entry["params"] += params
        entry["original_bytes"] += original
        entry["packed_bytes"] += packed
        if quantized:
            entry["quantized_tensors"] += 1
            entry["quantized_params"] += params
            entry["quantized_packed_bytes"] += packed
    for entry in components.values():
        entry["bits_per_weight"] = bits_per_weight(entry["packed_bytes"], entry["params"])

    def total(key: str) -> int:
        return sum(entry[key] for entry in components.values())

    return {
        "components": components,
        "total_tensors": total("tensors"),
        "total_params": total("params"),
        "quantized_tensors": total("quantized_tensors"),
        "quantized_params": total("quantized_params"),
        "total_original_bytes": total("original_bytes"),
        "total_packed_bytes": total("packed_bytes"),
        "quantized_packed_bytes": total("quantized_packed_bytes"),
        "bits_per_weight": bits_per_weight(total("packed_bytes"), total("params")),
    }


# --------------------------------------------------------------------------- sizes as text

SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"\s*(?P<number>(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*(?P<unit>[a-z]*)\s*",
                   re.IGNORECASE)


def parse_size(text: str | int, option: str = "--target-size") -> int:
    """Bytes in a size such as ``15GB``, ``15 GB``, ``14.5GiB``, ``800MB`` or ``123456789``.

    Decimal units (kB, MB, GB, TB; what disks and the Hub print) and binary ones (KiB,
    MiB, GiB, TiB), case-insensitive; a bare number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        number, unit = Decimal(text), ""
    else:
        match = _SIZE.fullmatch(str(text))
        if match is None or match["unit"].lower() not in SIZE_UNITS:
            raise InvalidOptionError(f"{option} {text!r}: not a size; write a number and a unit such "
                              "as 15GB, 14.5GiB or 800MB (kB/MB/GB/TB are powers of 1000, "
                              "KiB/MiB/GiB/TiB powers of 1024, no unit means bytes)")
        try:
            number, unit = Decimal(match["number"]), match["unit"].lower()
        except InvalidOperation:   # pragma: no cover - the regex admits only valid numbers
            raise InvalidOptionError(f"{option} {text!r}: not a number") from None
    size = int(number * SIZE_UNITS[unit])
    if size < 1:
        raise InvalidOptionError(f"{option} {text!r}: a size budget must be at least one byte")
    return size


BYTE_UNITS = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3))


def format_bytes(nbytes: int) -> str:
    """``15.01 GB``, ``1.50 MB``, ``512 B``: decimal units, like parse_size's GB."""
    for unit, scale in BYTE_UNITS:
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def format_size(nbytes: int) -> str:
    """``15.01 GB (15,013,456,789 bytes)``: the rounded size and the exact count."""
    return f"{format_bytes(nbytes)} ({nbytes:,} bytes)" if nbytes >= 10**3 else f"{nbytes:,} bytes"
