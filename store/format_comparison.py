"""The model card's "against other formats at this size" table, measured at packaging time
on the artifact's own tensors.

A deterministic sample: up to ``SAMPLE_TENSORS`` of the quantized tensors, evenly spaced in
(component, natural name) order, and up to ``SAMPLE_ROWS`` rows of each (quant.budget's
``sample_rows``, seeded by the tensor's key). Every format of quant/formats.py quantizes the
same source rows; a format whose library is missing (GGUF: ggml, HQQ: hqq) is listed as not
measured, with why. The artifact's own figures are its staged codes for those rows, at the
bits each tensor got: HLWQ stores every row independently, so selecting rows of the packed
tensor is exactly what the artifact holds. Bits per weight count every stored byte on the
sample (per-tensor parts such as codebooks once per sampled tensor). Cost: SAMPLE_TENSORS x
SAMPLE_ROWS rows through each format, whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from hlwq.quant.budget import sample_rows
from hlwq.quant.core import dequantize
from hlwq.quant.formats import FORMATS, error_summary, missing_dependency
from hlwq.quant.metrics import tensor_metrics
from hlwq.quant.names import natural_key
from hlwq.quant.sizes import packed_nbytes
from hlwq.store.artifact import tensor_key
from hlwq.store.safetensors_io import read_rows
from hlwq.store.source_tree import checked_file
from hlwq.store.staging import read_staged

SAMPLE_TENSORS = 8
SAMPLE_ROWS = 256
SEED = 0
LOCATING_FIELDS = ("file", "shape", "dtype", "data_start", "data_end")


def sample_tensors(rows: list[dict], count: int = SAMPLE_TENSORS) -> list[dict]:
    """Up to ``count`` quantized inventory rows, evenly spaced in (component, name) order."""
    quantized = sorted((r for r in rows if r["action"] == "quantize"),
                       key=lambda r: (r["component"], natural_key(r["tensor"])))
    if len(quantized) <= count:
        return quantized
    return [quantized[index * len(quantized) // count] for index in range(count)]


def compare_formats(source_base: Path, rows: list[dict], staged: Mapping[str, str],
                    tensors: int = SAMPLE_TENSORS, rows_per_tensor: int = SAMPLE_ROWS) -> dict:
    """The manifest's ``format_comparison``: the sample, the artifact's own figures, each
    format's (``name``, ``family``, bits per weight, mean and worst relative MSE, mean cosine)
    and the formats not measured here. ``source_base``: the folder the rows' files are in."""
    chosen = sample_tensors(rows, tensors)
    if not chosen:
        return {"skipped": "no quantized tensors"}
    unlocated = [r["tensor"] for r in chosen if any(r.get(f) is None for f in LOCATING_FIELDS)]
    if unlocated:
        return {"skipped": f"the inventory does not locate the source bytes of {unlocated[0]}"}
    not_measured = [{"name": f.name, "reason": why} for f in FORMATS.values()
                    if (why := missing_dependency(f))]
    skipped = {entry["name"] for entry in not_measured}
    formats = [f for f in FORMATS.values() if f.name not in skipped]
    own, per, sample = [], {f.name: [] for f in formats}, []
    for row in chosen:
        key = tensor_key(row["component"], row["tensor"])
        out_features = row["shape"][0]
        indices = sample_rows(out_features, min(rows_per_tensor, out_features), SEED, key)
        source = read_rows(checked_file(source_base, row["file"]), row, indices)
        _, packed = read_staged(staged[key])
        mine = packed.select_rows(indices)
        own.append(_measured(key, source, dequantize(mine),
                             packed_nbytes(mine.shape, mine.bits, mine.block_size,
                                           mine.group_size)))
        for fmt in formats:
            result = fmt.apply(source)
            per[fmt.name].append(_measured(key, source, result.weight, result.nbytes))
        sample.append({"tensor": key, "rows": len(indices), "of_rows": out_features,
                       "bits": packed.bits, "group_size": packed.group_size})
    return {"sample": {"rule": f"up to {tensors} quantized tensors evenly spaced in (component, "
                               f"name) order, up to {rows_per_tensor} rows each drawn with seed "
                               f"{SEED} and the tensor's key",
                       "quantized_tensors": sum(1 for r in rows if r["action"] == "quantize"),
                       "tensors": sample},
            "artifact": error_summary(own),
            "formats": [{"name": f.name, "family": f.family, **error_summary(per[f.name])}
                        for f in formats],
            "not_measured": not_measured}


def _measured(key: str, source, restored, nbytes: int) -> dict:
    metrics = tensor_metrics(source, restored)
    return {"tensor": key, "weights": source.numel(), "nbytes": nbytes,
            "rel_mse": metrics["rel_mse"], "cosine": metrics["cosine"]}
