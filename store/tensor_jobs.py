"""The unit of quantization work: one tensor, run on a Dask worker.

A unit (``quantize_unit``) opens the source file itself, reads only its
tensor's bytes, quantizes, writes the packed result to staging atomically and
returns one small metrics row. Nothing large passes through the scheduler or
Prefect.

Each unit also leaves ``<staging>/<key>.json`` (its metrics row) after its
staged tensor, so a rerun skips it and still reports its metrics. The key is a
content key (source file sha256, tensor, policy, bits, block and group size,
mode, code version): a changed input or setting never reuses stale work.

Workers import this module, so it imports neither Prefect nor the flow
(tasks/quantize.py holds the Prefect side).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from hlwq.quant.core import quantize_tensor
from hlwq.quant.errors import HLWQError, NonFiniteTensorError
from hlwq.quant.metrics import packed_metrics
from hlwq.quant.sizes import original_nbytes, packed_nbytes
from hlwq.store.atomic import atomic_write_text
from hlwq.store.safetensors_io import TensorEntry, read_tensor
from hlwq.store.staging import is_staged, write_staged

METRIC_KEYS = ("cosine", "rel_mse", "sqnr_db", "max_abs_err")


@dataclass(frozen=True)
class TensorJob:
    """Everything a worker needs to quantize one tensor (small, picklable)."""
    key: str                  # content key: names the staged result and the Dask task
    file: str                 # absolute path of the source .safetensors file
    tensor: str
    component: str
    dtype: str
    shape: tuple[int, ...]
    data_start: int           # absolute byte offsets of the tensor in ``file``
    data_end: int
    bits: int
    block_size: int
    group_size: int | None
    mode: str
    staging_dir: str
    on_nonfinite: str = "fail"


# The modules that decide a staged result's bytes and its metrics row. Only these feed the
# code version: editing prose (the model card, the CLI) keeps staged work.
ENCODING_MODULES = ("hlwq.quant.codebook", "hlwq.quant.core", "hlwq.quant.hadamard",
                    "hlwq.quant.kernels", "hlwq.quant.layout", "hlwq.quant.metrics",
                    "hlwq.quant.packed", "hlwq.quant.packing", "hlwq.store.staging",
                    "hlwq.store.tensor_jobs")


def code_version() -> str:
    """Package version plus a hash of the encoding modules' source: any edit to the numerics
    or the staged format changes it, so staged results of other code are never reused."""
    digest = hashlib.sha256()
    for name in ENCODING_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    try:
        release = version("hlwq-pipeline")
    except PackageNotFoundError:
        release = "0"
    return f"{release}+{digest.hexdigest()[:16]}"


def row_path(job: TensorJob) -> Path:
    return Path(job.staging_dir) / f"{job.key}.json"


def finished_row(job: TensorJob) -> dict | None:
    """The metrics row of a finished unit, or None when it must be (re)done."""
    try:
        row = json.loads(row_path(job).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if row.get("action") == "quantize" and not is_staged(job.staging_dir, job.key):
        return None
    return row


def quantize_unit(job: TensorJob) -> dict:
    """Quantize one tensor into staging; return its metrics row (skipped if already done)."""
    done = finished_row(job)
    if done is not None:
        return {**done, "skipped": True}
    started = time.perf_counter()
    weight = read_tensor(job.file, TensorEntry(job.tensor, job.dtype, tuple(job.shape),
                                               job.data_start, job.data_end))
    try:
        packed = quantize_tensor(weight, bits=job.bits, block_size=job.block_size, mode=job.mode,
                                 group_size=job.group_size, name=job.tensor)
    except NonFiniteTensorError as exc:
        if job.on_nonfinite != "keep":
            raise NonFiniteTensorError(
                f"{exc} (in {job.file}); --on-nonfinite keep keeps such tensors unquantized") from None
        row = _row(job, "keep", f"kept unquantized: {exc}", None)
    else:
        write_staged(job.staging_dir, job.key, job.tensor, packed)
        row = _row(job, "quantize", "", packed_metrics(weight, packed))
    row.update(seconds=time.perf_counter() - started, worker=_worker_name())
    atomic_write_text(row_path(job), json.dumps(row, sort_keys=True))
    return {**row, "skipped": False}


def run_unit(job: TensorJob) -> dict:
    """``quantize_unit`` on a Dask worker: a typed error (bad data) comes back as the value
    ``{"error": exc}`` for the caller to raise, so the worker does not log it as a crash with
    a traceback. Anything else (a bug, a lost file system) fails the Dask task as usual."""
    try:
        return quantize_unit(job)
    except HLWQError as exc:
        return {"error": exc}


def _row(job: TensorJob, action: str, reason: str, metrics: dict | None) -> dict:
    original = original_nbytes(tuple(job.shape), job.dtype)
    quantized = action == "quantize"
    return {
        "tensor": job.tensor, "component": job.component, "file": job.file,
        "shape": list(job.shape), "dtype": job.dtype, "action": action, "reason": reason,
        "bits": job.bits if quantized else None, "mode": job.mode if quantized else None,
        "original_bytes": original,
        "packed_bytes": (packed_nbytes(tuple(job.shape), job.bits, job.block_size, job.group_size)
                         if quantized else original),
        **{key: (metrics[key] if metrics else None) for key in METRIC_KEYS},
    }


def _worker_name() -> str:
    import distributed

    try:
        worker = distributed.get_worker()
    except ValueError:
        return "local"
    return str(worker.name if worker.name is not None else worker.address)
