"""The size arithmetic: one function used by the plan, the manifest and the model card."""

from __future__ import annotations

import math

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
