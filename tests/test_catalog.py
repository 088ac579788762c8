"""The render catalog's memory and time columns, and parts written before a column existed."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from hlwq.store.catalog import CATALOG_SCHEMA, append_catalog, catalog_path, read_catalog

ROW = {"id": "a", "prompt": "a calm lake", "render_key": "k1", "status": "rendered",
       "render_seconds": 12.5, "peak_memory_bytes": 3 * 2**30, "peak_memory_kind": "cpu_rss",
       "offload": "none"}


def test_peak_memory_its_kind_and_the_offload_mode_are_recorded(tmp_path):
    append_catalog(tmp_path, [ROW])
    # a part from before the columns existed: the same schema, less the new columns
    new = ("peak_memory_kind", "offload")
    old_schema = pa.schema([field for field in CATALOG_SCHEMA if field.name not in new])
    old_row = {k: v for k, v in ROW.items() if k not in new} | {"id": "b", "render_key": "k0"}
    pq.write_table(pa.Table.from_pylist([old_row], schema=old_schema),
                   catalog_path(tmp_path) / "part-00000000T000000000000Z-old.parquet")
    rows = {row["id"]: {k: row[k] for k in ROW} for row in read_catalog(tmp_path).to_pylist()}
    assert rows == {"a": ROW, "b": {**old_row, "peak_memory_kind": None, "offload": None}}
