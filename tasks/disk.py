"""Disk space: estimate what a run writes and refuse to start when it cannot fit.

Packaging streams staged tensors into shards and deletes each staged file once
its shard is on disk (docs/FORMAT.md section 6), so when staging and output
share a file system the peak is the artifact plus at most one shard's worth of
staged results, not the packed size twice. Carried files cost nothing when
they can be hard-linked (same file system as the source).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task

from hlwq.quant.errors import InsufficientDiskError
from hlwq.quant.sizes import format_bytes
from hlwq.store.artifact import DEFAULT_MAX_SHARD_BYTES

MARGIN_FRACTION = 0.02            # headroom for file system overhead and estimates
MARGIN_MIN_BYTES = 64 << 20


@dataclass(frozen=True)
class DiskEstimate:
    output_bytes: int             # the artifact: rewritten shards, carried copies, manifest etc.
    staging_bytes: int            # staged results not written yet
    overlap_bytes: int = 0        # staged results still on disk beside the shard being written

    @property
    def margin_bytes(self) -> int:
        return max(MARGIN_MIN_BYTES, int(MARGIN_FRACTION * (self.output_bytes + self.staging_bytes)))


def estimate_disk(rows: list[dict], source_files: dict[str, int], staged_keys: set[str],
                  carried_are_linked: bool,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> DiskEstimate:
    """Bytes a run will write.

    ``rows``: inventory rows (``file``, ``action``, ``packed_bytes``) plus ``key`` for
    quantized rows; ``source_files``: every source file (relative path -> size);
    ``staged_keys``: keys already staged by an earlier run.
    """
    rewritten = {row["file"] for row in rows if row["action"] == "quantize"}
    shards = sum(row["packed_bytes"] for row in rows if row["file"] in rewritten)
    carried = 0 if carried_are_linked else sum(
        size for name, size in source_files.items() if name not in rewritten)
    quantized = [row for row in rows if row["action"] == "quantize"]
    staging = sum(row["packed_bytes"] for row in quantized if row["key"] not in staged_keys)
    already = sum(row["packed_bytes"] for row in quantized if row["key"] in staged_keys)
    # Already-staged bytes are on disk now and freed as their shards are written.
    overlap = min(max_shard_bytes, staging + already) - already
    return DiskEstimate(output_bytes=shards + carried, staging_bytes=staging, overlap_bytes=overlap)


def check_disk(estimate: DiskEstimate, output_dir: str | os.PathLike,
               staging_dir: str | os.PathLike) -> None:
    """Raise InsufficientDiskError, with the numbers, if the estimate does not fit."""
    output_at, staging_at = existing_ancestor(output_dir), existing_ancestor(staging_dir)
    artifact = ("artifact", estimate.output_bytes)
    if same_file_system(output_at, staging_at):
        needs = {output_at: [artifact, ("staged results beside it at peak", estimate.overlap_bytes)]}
    else:
        needs = {output_at: [artifact], staging_at: [("staging", estimate.staging_bytes)]}
    for where, parts in needs.items():
        parts.append(("margin", estimate.margin_bytes))
        need = sum(nbytes for _, nbytes in parts)
        free = shutil.disk_usage(where).free
        if need > free:
            detail = " + ".join(f"{label} {format_bytes(nbytes)}" for label, nbytes in parts)
            raise InsufficientDiskError(
                f"{where}: need {format_bytes(need)} ({detail}) but only {format_bytes(free)} is free; free space, "
                "or give --out / --staging on a larger disk")


def existing_ancestor(path: str | os.PathLike) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def same_file_system(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.stat(existing_ancestor(a)).st_dev == os.stat(existing_ancestor(b)).st_dev


@task(name="disk-check", persist_result=False)
def disk_check_task(rows: list[dict], source_files: dict[str, int], staged_keys: set[str],
                    source_root: str, output_dir: str, staging_dir: str) -> dict:
    """Estimate the run's disk use and refuse to start when it does not fit."""
    estimate = estimate_disk(rows, source_files, staged_keys,
                             carried_are_linked=same_file_system(source_root, output_dir))
    check_disk(estimate, output_dir, staging_dir)
    get_run_logger().info("disk: artifact %s, staging %s still to write", format_bytes(estimate.output_bytes),
                          format_bytes(estimate.staging_bytes))
    return {"output_bytes": estimate.output_bytes, "staging_bytes": estimate.staging_bytes}
