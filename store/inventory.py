"""The tensor inventory: every tensor of a checkpoint, from safetensors headers only.

One Arrow row per tensor says where its bytes are, which component it belongs
to and what the bit policy does with it. The plan prints it summed up; the
quantize flow maps one unit of work over its rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from hlwq.quant.errors import InvalidOptionError, SourceError
from hlwq.quant.sizes import tensor_nbytes
from hlwq.store.atomic import atomic_path
from hlwq.store.ltx23_config import TRANSFORMER_PREFIX, official_to_diffusers_key
from hlwq.store.policy import BitPolicy, load_policy
from hlwq.store.safetensors_io import SafetensorsHeader, iter_safetensors_files, read_headers
from hlwq.store.source_tree import visible_files

log = logging.getLogger(__name__)

LAYOUTS = ("ltx23-single", "diffusers", "generic")
MODEL_INDEX = "model_index.json"
INVENTORY_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("tensor", pa.string()),
    ("dtype", pa.string()),
    ("shape", pa.list_(pa.int64())),
    ("numel", pa.int64()),
    ("data_start", pa.int64()),
    ("data_end", pa.int64()),
    ("component", pa.string()),
    ("action", pa.string()),
    ("bits", pa.int64()),
    ("group_size", pa.int64()),      # values per fp16 scale (a size budget mixes them)
    ("reason", pa.string()),
    ("original_bytes", pa.int64()),
    ("packed_bytes", pa.int64()),
])


def detect_layout(root: str | os.PathLike, files: list[str] | None = None) -> str:
    """"ltx23-single", "diffusers" or "generic" (with a warning) for a local checkpoint."""
    root = Path(root)
    if has_model_index(root):
        return "diffusers"
    return layout_of(local_headers(root, files), has_model_index=False, source=root)


def layout_of(headers: Mapping[str, SafetensorsHeader], has_model_index: bool, source=None) -> str:
    """The layout from what a checkpoint holds (local or on the Hub)."""
    if has_model_index:
        return "diffusers"
    if any(_is_official_single_file(header) for header in headers.values()):
        return "ltx23-single"
    log.warning("%s: layout not recognised (no model_index.json, no model.diffusion_model.* "
                "tensors, no LTX config metadata); treating it as a generic checkpoint", source)
    return "generic"


def default_policy_for(layout: str) -> str:
    """The built-in policy a layout gets when none is named."""
    return "generic" if layout == "generic" else "ltx23"


def _is_official_single_file(header) -> bool:
    if any(name.startswith(TRANSFORMER_PREFIX) for name in header.tensors):
        return True
    try:
        config = json.loads(header.metadata.get("config", ""))
    except ValueError:
        return False
    return isinstance(config, dict) and "transformer" in config


def component_of(layout: str, file: str, tensor: str) -> str:
    """The pipeline component a tensor belongs to; ``file`` is relative to the checkpoint root."""
    path = PurePosixPath(file)
    if len(path.parts) > 1:   # a component subfolder (diffusers, or text_encoder/ beside a single file)
        return path.parts[0]
    if layout == "ltx23-single":
        try:
            return official_to_diffusers_key(tensor)[0]
        except InvalidOptionError:   # not in the single file: e.g. a separate upscaler file
            return _component_from_file_name(path.name)
    return "model" if layout == "generic" else "other"


def _component_from_file_name(name: str) -> str:
    """Separate official files (e.g. ltx-2.3-spatial-upscaler-x2-1.0.safetensors) say what they are."""
    name = name.lower()
    if "upscaler" in name or "upsampler" in name:
        return "temporal_upsampler" if "temporal" in name else "latent_upsampler"
    return "other"


def rows_from_headers(headers: Mapping[str, SafetensorsHeader], layout: str, policy: BitPolicy,
                      block_size: int = 128, group_size: int | None = None) -> list[dict]:
    """One inventory row per tensor; shared by local inventories and plans of Hub repos
    (``headers`` maps file paths relative to the checkpoint root to their headers)."""
    rows = []
    seen: dict[tuple[str, str], str] = {}
    for file, header in headers.items():
        for name, entry in header.tensors.items():
            shape = list(entry.shape)
            component = component_of(layout, file, name)
            _check_once(seen, component, name, file)
            decision = policy.decide(name, tuple(shape), entry.dtype, component)
            original, packed = tensor_nbytes(shape, entry.dtype, decision.bits, block_size, group_size)
            rows.append({
                "file": file, "tensor": name, "dtype": entry.dtype, "shape": shape,
                "numel": math.prod(shape), "data_start": entry.start, "data_end": entry.end,
                "component": component, "action": decision.action, "bits": decision.bits,
                "group_size": (group_size or block_size) if decision.bits is not None else None,
                "reason": decision.reason, "original_bytes": original, "packed_bytes": packed,
            })
    return rows


def _check_once(seen: dict, component: str, name: str, file: str) -> None:
    """One checkpoint per component: a repo holding several (dev and distilled, say) must
    be narrowed to one before it is planned or quantized."""
    other = seen.setdefault((component, name), file)
    if other != file:
        raise SourceError(f"tensor {name!r} of component {component!r} is in both {other} and "
                          f"{file}: the source holds more than one checkpoint of {component}; "
                          "choose one with --files GLOB (or --exclude-files GLOB)")


def build_inventory(root: str | os.PathLike, policy: BitPolicy | str, block_size: int = 128,
                    group_size: int | None = None, files: list[str] | None = None) -> pa.Table:
    """Read every header under ``root`` (never tensor data) into an inventory table.

    ``files`` (paths relative to the checkpoint, e.g. the fetch's lineage files) limits
    it to those weight files. The table's schema metadata records the layout, policy and
    block size."""
    if isinstance(policy, str):
        policy = load_policy(policy)
    headers, layout = read_checkpoint(root, files)
    return inventory_table(headers, layout, policy, block_size, group_size)


def read_checkpoint(root: str | os.PathLike,
                    files: list[str] | None = None) -> tuple[dict[str, SafetensorsHeader], str]:
    """Every weight file's header under ``root`` (parsed once) and the layout they show."""
    root = Path(root)
    headers = local_headers(root, files)
    layout = layout_of(headers, has_model_index=has_model_index(root), source=root)
    if layout == "diffusers":
        check_models_have_tensors(root, files if files is not None else visible_files(root),
                                  headers)
    return headers, layout


def inventory_table(headers: Mapping[str, SafetensorsHeader], layout: str, policy: BitPolicy,
                    block_size: int = 128, group_size: int | None = None) -> pa.Table:
    """The inventory of parsed headers; its schema metadata records layout, policy and block."""
    rows = rows_from_headers(headers, layout, policy, block_size, group_size)
    table = pa.Table.from_pylist(rows, schema=INVENTORY_SCHEMA)
    return table.replace_schema_metadata({
        "layout": layout, "policy": policy.name, "bits": str(policy.bits),
        "block_size": str(block_size), "group_size": str(group_size or block_size),
    })


def check_models_have_tensors(root: Path, files: list[str],
                              headers: Mapping[str, SafetensorsHeader]) -> None:
    """Every model component of ``model_index.json`` (a folder with a ``config.json``) yields
    tensors; one that yields none would silently leave the artifact without its weights."""
    try:
        index = json.loads((root / MODEL_INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{root / MODEL_INDEX}: unreadable ({exc})") from None
    found = {PurePosixPath(file).parts[0] for file, header in headers.items() if header.tensors}
    for component in sorted(index if isinstance(index, dict) else {}):
        held = [f for f in files if f.startswith(f"{component}/")]
        if f"{component}/config.json" not in held or component in found:
            continue
        raise SourceError(f"component {component!r}: {MODEL_INDEX} lists it and it has a "
                          f"config.json, but none of its files holds safetensors weights "
                          f"(it holds {', '.join(held[:5])}); the run would leave it without them")


def local_headers(root: Path, files: list[str] | None = None) -> dict[str, SafetensorsHeader]:
    """Headers of every weight file under ``root`` (only those named in ``files``, when
    given), keyed by path relative to the checkpoint."""
    base = root if root.is_dir() else root.parent
    chosen = None if files is None else set(files)
    paths = [path for path in iter_safetensors_files(root)
             if chosen is None or path.relative_to(base).as_posix() in chosen]
    headers = read_headers(paths)
    return {path.relative_to(base).as_posix(): header for path, header in headers.items()}


def has_model_index(root: Path) -> bool:
    return root.is_dir() and (root / MODEL_INDEX).is_file()


def save_inventory(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write the inventory as Parquet, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
