"""The render catalog: Parquet parts under `<output_dir>/catalog/`, read as one table.

Each attempted render adds a row (rendered or failed), written as its own part the moment the
render ends, so a batch killed midway keeps every finished render; renders skipped because they
were already done add none. A render counts as done when a `rendered` row with the same render key exists and
its output file is still there with the catalogued sha256. Every rendered row records its
wall time and peak memory: the accelerator's (allocator peak) on CUDA, the process's peak RSS on
the CPU (``peak_memory_kind``). Parts written before a column existed read it as null.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hlwq.quant.errors import ArtifactError, CatalogError
from hlwq.store.atomic import atomic_path
from hlwq.store.hash_cache import sha256_file

CATALOG_DIR = "catalog"
RENDERED, FAILED = "rendered", "failed"

CATALOG_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("seed", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("frames", pa.int32()),
    ("fps", pa.float64()),
    ("steps", pa.int32()),
    ("guidance", pa.float64()),
    ("image", pa.string()),
    ("loras", pa.list_(pa.struct([("path", pa.string()), ("sha256", pa.string()),
                                  ("scale", pa.float64())]))),
    ("render_key", pa.string()),
    ("artifact_id", pa.string()),
    ("artifact", pa.string()),
    ("output_path", pa.string()),
    ("contact_sheet", pa.string()),
    ("sha256", pa.string()),
    ("duration_s", pa.float64()),
    ("render_seconds", pa.float64()),       # wall time of the pipeline call
    ("peak_memory_bytes", pa.int64()),      # its peak, of the memory peak_memory_kind names:
    ("peak_memory_kind", pa.string()),      # cuda_allocated (GPU) or cpu_rss (process RSS)
    ("offload", pa.string()),               # the offload mode the pipeline ran under
    ("status", pa.string()),
    ("error", pa.string()),
    ("flow_run_id", pa.string()),
    ("rendered_at", pa.timestamp("us", tz="UTC")),
])


def artifact_id(artifact: str | Path) -> str:
    """An artifact's identity: the sha256 of its manifest.json (which lists every file's hash)."""
    manifest = Path(artifact) / "manifest.json"
    if not manifest.is_file():
        raise ArtifactError(f"artifact {artifact}: no manifest.json (not an HLWQ artifact, or unfinished)")
    return sha256_file(manifest)


def catalog_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / CATALOG_DIR


def read_catalog(output_dir: str | Path) -> pa.Table:
    """Every batch's rows, oldest part first; an empty table when nothing was catalogued yet."""
    parts = sorted(catalog_path(output_dir).glob("part-*.parquet"))
    if not parts:
        return CATALOG_SCHEMA.empty_table()
    return pa.concat_tables(read_part(part) for part in parts)


def read_part(part: Path) -> pa.Table:
    try:
        return pq.read_table(part, schema=CATALOG_SCHEMA)
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise CatalogError(f"catalog part {part}: not a readable catalog part ({reason}); move "
                           "it out of the catalog folder to render its rows again") from None


def append_catalog(output_dir: str | Path, rows: list[dict[str, Any]]) -> Path | None:
    """Write rows as a new part, atomically and durably (fsynced). Part names sort by time."""
    if not rows:
        return None
    now = datetime.now(UTC)
    table = pa.Table.from_pylist([_catalog_row(row, now) for row in rows], schema=CATALOG_SCHEMA)
    target = catalog_path(output_dir) / f"part-{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}.parquet"
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return target


def _catalog_row(row: dict[str, Any], now: datetime) -> dict[str, Any]:
    values = {name: row.get(name) for name in CATALOG_SCHEMA.names}
    stamp = values["rendered_at"] or now  # tasks return ISO text (JSON-able)
    values["rendered_at"] = datetime.fromisoformat(stamp) if isinstance(stamp, str) else stamp
    return values


def completed_renders(catalog: pa.Table) -> dict[str, dict[str, Any]]:
    """Render key -> latest `rendered` row whose output is still on disk with its catalogued hash."""
    done: dict[str, dict[str, Any]] = {}
    for row in catalog.filter(pc.equal(catalog["status"], RENDERED)).to_pylist():
        done[row["render_key"]] = row
    return {key: row for key, row in done.items() if output_matches(row)}


def output_matches(row: dict[str, Any]) -> bool:
    path = Path(row["output_path"] or "")
    return path.is_file() and sha256_file(path) == row["sha256"]
