"""The inventory step of the plan stage as a Prefect task (the logic: store/inventory.py)."""

from __future__ import annotations

from prefect import task

from hlwq.quant.sizes import size_table
from hlwq.store.inventory import (
    default_policy_for,
    inventory_table,
    read_checkpoint,
    save_inventory,
)
from hlwq.store.policy import load_policy


@task(name="inventory", persist_result=False)
def inventory_task(root: str, out_path: str, policy: str | None = None, bits: int = 5,
                   block_size: int = 128, group_size: int | None = None, include=(), exclude=(),
                   overrides_file: str | None = None, files: list[str] | None = None) -> dict:
    """Read the headers once, build and save the inventory; returns where it is, the layout,
    the policy (``policy`` or the layout's default) and its totals (small, JSON-able)."""
    headers, layout = read_checkpoint(root, files)
    bit_policy = load_policy(policy or default_policy_for(layout), bits=bits, include=include,
                             exclude=exclude, overrides_file=overrides_file)
    table = inventory_table(headers, layout, bit_policy, block_size, group_size)
    save_inventory(table, out_path)
    sizes = size_table(table, block_size, group_size)
    return {
        "path": str(out_path),
        "layout": layout,
        "policy": bit_policy.name,
        "tensors": sizes["total_tensors"],
        "quantized_tensors": sizes["quantized_tensors"],
        "total_original_bytes": sizes["total_original_bytes"],
        "total_packed_bytes": sizes["total_packed_bytes"],
    }
