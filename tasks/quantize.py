"""The Prefect side of quantization: a task per group of tensors whose units run on Dask.

The task runs in the flow's process (called, not submitted) and hands each of
its tensors to the flow's Dask client as its own unit, so Dask spreads single
tensors over the workers while Prefect records one task run per group: few
enough task runs to keep orchestration cheap, named after what they hold.
"""

from __future__ import annotations

import time

import distributed
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.tasks import exponential_backoff

from hlwq.store.tensor_jobs import TensorJob, run_unit


def dask_client() -> distributed.Client:
    """The Dask client of the running flow's DaskTaskRunner."""
    context = FlowRunContext.get()
    if context is None or not hasattr(context.task_runner, "client"):
        raise RuntimeError("quantize_group needs a flow run with a DaskTaskRunner")
    return context.task_runner.client


def submit_units(client: distributed.Client, jobs: list[TensorJob]) -> list[distributed.Future]:
    """Submit units under their content keys; submitting a key again returns the same future."""
    return [client.submit(run_unit, job, key=f"quantize-{job.key}", pure=False) for job in jobs]


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
    return isinstance(state.result(raise_on_failure=False), OSError)


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
        if "error" in row:           # bad data, named by the unit: no retry, no traceback
            raise row["error"]
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
