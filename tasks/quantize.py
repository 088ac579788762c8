"""The unit of quantization work, and the Prefect task that runs a group of units on Dask.

A unit (``quantize_unit``) runs on a Dask worker: it opens the source file
itself, reads only its tensor's bytes, quantizes, writes the packed result to
staging atomically and returns one small metrics row. Nothing large passes
through the scheduler or Prefect.

Each unit also leaves ``<staging>/<key>.json`` (its metrics row) after its
staged tensor, so a rerun skips it and still reports its metrics. The key is a
content key (source file sha256, tensor, policy, bits, block and group size,
mode, code version): a changed input or setting never reuses stale work.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import distributed
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.tasks import exponential_backoff

import quant
from quant.atomic import atomic_write_text
from quant.core import dequantize, quantize_tensor
from quant.errors import NonFiniteTensorError
from quant.metrics import tensor_metrics
from quant.safetensors_io import TensorEntry, read_tensor
from quant.sizes import original_nbytes, packed_nbytes
from quant.staging import is_staged, write_staged

ON_NONFINITE = ("fail", "keep")
# The modules whose code decides a staged result's bytes: editing any of them
# changes the code version, so stale staged results are never reused.
RESULT_MODULES = ("codebook", "core", "hadamard", "packed", "packing", "staging")
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


def code_version() -> str:
    """Package version plus a hash of the numerics' source code."""
    digest = hashlib.sha256()
    package = Path(quant.__file__).parent
    for module in RESULT_MODULES:
        digest.update((package / f"{module}.py").read_bytes())
    from importlib.metadata import PackageNotFoundError, version

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
        row = _row(job, "quantize", "", tensor_metrics(weight, dequantize(packed)))
    row.update(seconds=time.perf_counter() - started, worker=_worker_name())
    atomic_write_text(row_path(job), json.dumps(row, sort_keys=True))
    return {**row, "skipped": False}


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
    try:
        worker = distributed.get_worker()
    except ValueError:
        return "local"
    return str(worker.name if worker.name is not None else worker.address)


# ---- orchestration (runs in the flow's process) ------------------------------------------------


def dask_client() -> distributed.Client:
    """The Dask client of the running flow's DaskTaskRunner."""
    context = FlowRunContext.get()
    if context is None or not hasattr(context.task_runner, "client"):
        raise RuntimeError("quantize_group needs a flow run with a DaskTaskRunner")
    return context.task_runner.client


def submit_units(client: distributed.Client, jobs: list[TensorJob]) -> list[distributed.Future]:
    """Submit units under their content keys; submitting a key again returns the same future."""
    return [client.submit(quantize_unit, job, key=f"quantize-{job.key}", pure=False) for job in jobs]


class RunProgress:
    """Counts finished tensors and updates a Prefect progress artifact, at most every few seconds."""

    def __init__(self, total: int, update, min_interval_s: float = 2.0):
        self.total, self.update, self.min_interval_s = total, update, min_interval_s
        self.finished: set[str] = set()
        self._last_update = 0.0

    def tensor_finished(self, key: str) -> None:
        self.finished.add(key)
        now = time.monotonic()
        if len(self.finished) == self.total or now - self._last_update >= self.min_interval_s:
            self._last_update = now
            self.update(100.0 * len(self.finished) / max(self.total, 1))


def retry_transient(task, task_run, state) -> bool:
    """Retry only I/O trouble (a flaky disk or network file system), never bad data."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False


@task(name="quantize-group", task_run_name="quantize {group}", retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, persist_result=False)
def quantize_group(group: str, jobs: list[TensorJob], progress: RunProgress | None = None) -> dict:
    """Quantize a group of tensors (e.g. one transformer block), each its own Dask task.

    Returns ``{"rows": [...], "body_s": seconds}``; ``body_s`` lets the flow measure what
    the Prefect task machinery itself costs.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    client = dask_client()
    futures = submit_units(client, jobs)
    failed = [future for future in futures if future.status == "error"]
    if failed:                       # a Prefect retry: run the failed units again
        client.retry(failed)
    rows = []
    for future in distributed.as_completed(futures, loop=client.loop):
        row = future.result()
        rows.append(row)
        if progress is not None:
            progress.tensor_finished(future.key)
        logger.info("%s", describe_row(row))
    rows.sort(key=lambda row: row["tensor"])
    return {"rows": rows, "body_s": time.perf_counter() - started}


def describe_row(row: dict) -> str:
    if row["skipped"]:
        return f"{row['tensor']}: already staged, skipped"
    if row["action"] == "keep":
        return f"{row['tensor']}: {row['reason']}"
    return (f"{row['tensor']}: cosine {row['cosine']:.6f}, relative MSE {row['rel_mse']:.2e}, "
            f"{row['seconds']:.2f} s on {row['worker']}")


def job_dict(job: TensorJob) -> dict:
    return asdict(job)
