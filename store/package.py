"""Packaging: staged per-tensor results + the source's other files -> an HLWQ artifact.

docs/FORMAT.md sections 1-5 say what comes out. The artifact is assembled in a
hidden directory beside the target and renamed into place as the last step,
so a crash never leaves a directory that looks complete. The same inputs give
byte-identical files: names are sorted, JSON keys are sorted, nothing records
time or host.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hlwq.quant.errors import ArtifactError, CorruptCheckpointError, InvalidOptionError
from hlwq.quant.sizes import packed_nbytes, size_table
from hlwq.store.artifact import (
    DEFAULT_MAX_SHARD_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    METRICS_NAME,
    MODEL_CARD_NAME,
    QUANTIZED_METADATA_KEY,
    SHARD_FORMAT_KEY,
    is_validated,
    manifest_bytes,
    packed_part_names,
    packed_part_specs,
    quantized_metadata,
    tensor_key,
)
from hlwq.store.atomic import atomic_write_bytes, atomic_write_text, directory_transaction
from hlwq.store.format_comparison import compare_formats
from hlwq.store.hash_cache import sha256_file
from hlwq.store.model_card import card_license, quality_summary, render_model_card
from hlwq.store.output_dir import check_output_dir
from hlwq.store.safetensors_io import read_header
from hlwq.store.shard_writer import (
    ShardTensor,
    file_range_chunks,
    group_stem,
    plan_shards,
    write_weight_group,
)
from hlwq.store.source_tree import (
    checked_file,
    is_pickle,
    is_pickle_name,
    visible_files,
    without_pickles,
)
from hlwq.store.staging import STAGED_METADATA_KEY

WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
ADDED_ROOT_FILES = (MANIFEST_NAME, METRICS_NAME, MODEL_CARD_NAME)
LINEAGE_FIELDS = ("kind", "source", "repo", "revision", "commit_sha", "commit_sha_kind")


@dataclass(frozen=True)
class _Stored:
    """One stored tensor of a new shard and where its bytes come from."""
    tensor: ShardTensor
    path: Path
    start: int
    end: int


def package_artifact(source_root: str | os.PathLike, inventory, staged: Mapping[str, str | os.PathLike],
                     out_dir: str | os.PathLike, *, lineage: dict | None = None,
                     quantization: dict | None = None, metrics=None, validation: dict | None = None,
                     layout: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     remove_staged: bool = True, no_format_comparison: str | None = None) -> dict:
    """Assemble an artifact at ``out_dir`` and return a small JSON-able summary.

    - ``inventory``: the inventory (Arrow table or row dicts; ``file`` relative to
      ``source_root``) as the run finally decided it: rows with ``action ==
      "quantize"`` must have a staged result.
    - ``staged``: ``tensor_key(component, tensor)`` -> staged file (store/staging.py).
    - ``lineage``: ``FetchResult.lineage``; its ``files`` list says which source files
      exist (all of them are carried or rewritten). Without it, every visible file
      under ``source_root`` is.
    - ``quantization``: the run's settings (bits, block_size, group_size, mode, policy,
      code_version), stored as given.
    - ``metrics``: the per-tensor metrics (Arrow table, Parquet path or None).
    - ``validation``: the gates' results, ``{"validated": bool, ...}``.
    - ``remove_staged``: delete each staged file as soon as the shard holding it is written
      and fsynced, so disk use peaks near the artifact's size plus one shard, not twice the
      packed size. A crash before the artifact is in place then costs re-quantizing the
      consumed tensors on the rerun (results are deterministic: the artifact is the same).
    - ``no_format_comparison``: why the card's "against other formats" table is not measured
      (store/format_comparison.py, on a sample of the staged tensors and their source rows,
      before the staged files are consumed); None measures it.
    """
    if max_shard_bytes < 1:
        raise InvalidOptionError(f"max_shard_bytes={max_shard_bytes}: must be positive")
    root = Path(source_root)
    target = Path(out_dir)
    check_output_dir(target, replace_artifact=True)
    rows = _inventory_rows(inventory, root)
    _check_all_staged(rows, staged)
    lineage = lineage or {}
    layout = layout or _layout_of(inventory, root)
    comparison = ({"skipped": no_format_comparison} if no_format_comparison else
                  compare_formats(root if root.is_dir() else root.parent, rows, staged))
    with directory_transaction(target) as partial:
        files, entries = _assemble(partial, root, rows, staged, lineage, max_shard_bytes,
                                   remove_staged)
        metrics_table = _write_metrics(partial, metrics)
        if metrics_table is not None:
            files[METRICS_NAME] = file_record(partial / METRICS_NAME)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "source": _source_section(layout, lineage, root),
            "quantization": dict(quantization or {}),
            "files": {},
            "tensors": entries,
            "sizes": size_table(list(entries.values())),
            "validation": _validation_section(validation),
            "format_comparison": comparison,
        }
        write_card_and_manifest(partial, manifest, files, metrics_table)
    return {"path": str(target), "files": len(manifest["files"]), "tensors": len(entries),
            "quantized_tensors": manifest["sizes"]["quantized_tensors"],
            "total_bytes": sum(f["size"] for f in manifest["files"].values()) +
            len(manifest_bytes(manifest)),
            "total_packed_bytes": manifest["sizes"]["total_packed_bytes"]}


# ---------------------------------------------------------------- inputs


def _inventory_rows(inventory, root: Path) -> list[dict]:
    rows = inventory.to_pylist() if hasattr(inventory, "to_pylist") else [dict(r) for r in inventory]
    base = root if root.is_dir() else root.parent
    seen: dict[str, str] = {}
    for row in rows:
        file = Path(row["file"])
        row["file"] = (file.relative_to(base) if file.is_absolute() else file).as_posix()
        key = tensor_key(row["component"], row["tensor"])
        if key in seen:
            raise ArtifactError(f"tensor {key}: appears in both {seen[key]} and {row['file']}; "
                                "one artifact holds one checkpoint per component (select one "
                                "with allow/ignore patterns)")
        seen[key] = row["file"]
    return sorted(rows, key=lambda r: (r["file"], r["tensor"]))


def _check_all_staged(rows: list[dict], staged: Mapping) -> None:
    missing = [key for key in (tensor_key(r["component"], r["tensor"]) for r in rows
                               if r["action"] == "quantize") if key not in staged]
    if missing:
        raise ArtifactError(f"{len(missing)} tensor(s) marked 'quantize' have no staged result "
                            f"(quantize them first, or mark them 'keep'): {', '.join(missing[:5])}"
                            + (" ..." if len(missing) > 5 else ""))


def _layout_of(inventory, root: Path) -> str:
    metadata = getattr(getattr(inventory, "schema", None), "metadata", None) or {}
    if b"layout" in metadata:
        return metadata[b"layout"].decode()
    from hlwq.store.inventory import detect_layout

    return detect_layout(root)


def write_card_and_manifest(folder: Path, manifest: dict, files: dict[str, dict],
                            metrics_table=None) -> None:
    """The last step of every artifact write: the model card from the manifest, then the
    manifest listing every file (the card included), each written atomically."""
    card = folder / MODEL_CARD_NAME
    atomic_write_text(card, render_model_card(manifest, quality_summary(metrics_table)))
    manifest["files"] = dict(sorted({**files, MODEL_CARD_NAME: file_record(card)}.items()))
    atomic_write_bytes(folder / MANIFEST_NAME, manifest_bytes(manifest))


def _source_section(layout: str, lineage: dict, root: Path) -> dict:
    section = {"layout": layout, **{field: lineage.get(field) for field in LINEAGE_FIELDS}}
    section["license"] = _source_license(root, lineage)
    section["files"] = sorted(({"path": f["path"], "size": f["size"], "sha256": f["sha256"]}
                               for f in lineage.get("files", [])), key=lambda f: f["path"])
    if lineage.get("text_encoder"):     # given separately (quantize --text-encoder)
        encoder = lineage["text_encoder"]
        section["text_encoder"] = {field: encoder.get(field) for field in (*LINEAGE_FIELDS, "path")}
    return section


def _source_license(root: Path, lineage: dict) -> dict | None:
    """The license the source's own model card declares (its README.md front matter)."""
    base = root if root.is_dir() else root.parent
    card = base / MODEL_CARD_NAME
    listed = {f["path"] for f in lineage.get("files", [])}
    if (listed and MODEL_CARD_NAME not in listed) or not card.is_file():
        return None
    return card_license(card.read_text(encoding="utf-8", errors="replace"))


def _validation_section(validation: dict | None) -> dict:
    validation = dict(validation or {})
    validation["validated"] = is_validated(validation)
    validation.setdefault("tensor_gates", None)
    validation.setdefault("output_gates", None)
    return json.loads(json.dumps(validation, sort_keys=True, default=str))


# ---------------------------------------------------------------- assembly


def _assemble(partial: Path, root: Path, rows: list[dict], staged: Mapping, lineage: dict,
              max_shard_bytes: int, remove_staged: bool) -> tuple[dict, dict]:
    """Write shards and carried files into ``partial``; return (files, tensor entries)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault(weight_group_of(row["file"]), []).append(row)
    rewritten = {group for group, members in groups.items()
                 if any(r["action"] == "quantize" for r in members)}
    files: dict[str, dict] = {}
    entries: dict[str, dict] = {}
    for group in sorted(rewritten):
        group_files, group_entries = _write_group(partial, root, group, groups[group], staged,
                                                  max_shard_bytes, remove_staged)
        files.update(group_files)
        entries.update(group_entries)
    files.update(_carry_files(partial, root, lineage, rewritten))
    for row in rows:
        if weight_group_of(row["file"]) not in rewritten:
            entries[tensor_key(row["component"], row["tensor"])] = _kept_entry(row, row["file"])
    missing = sorted({e["file"] for e in entries.values()} - set(files))
    if missing:
        raise ArtifactError(f"inventory names {missing[0]!r}, which the source's file list "
                            "(lineage files) does not hold")
    return files, dict(sorted(entries.items()))


def weight_group_of(file: str) -> tuple[str, str]:
    path = PurePosixPath(file)
    directory = "" if str(path.parent) == "." else str(path.parent)
    return directory, group_stem(path.name)


def is_group_file(name: str, groups: set) -> bool:
    """Whether ``name`` is a weight file (shard or index) of one of ``groups``."""
    weight_file = name.endswith((".safetensors", ".safetensors.index.json"))
    return weight_file and weight_group_of(name) in groups


def join_path(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def _write_group(partial: Path, root: Path, group: tuple[str, str], rows: list[dict],
                 staged: Mapping, max_shard_bytes: int, remove_staged: bool) -> tuple[dict, dict]:
    """Rewrite one weight group into new shards; returns their file records and entries."""
    directory, stem = group
    base = root if root.is_dir() else root.parent
    headers = {file: read_header(checked_file(base, file))
               for file in sorted({r["file"] for r in rows})}
    metadata = {}
    for header in headers.values():
        for key, value in sorted(header.metadata.items()):
            if key != QUANTIZED_METADATA_KEY:     # recorded afresh, below
                metadata.setdefault(key, value)
    metadata[SHARD_FORMAT_KEY] = str(FORMAT_VERSION)

    units: dict[str, list[_Stored]] = {}
    entries: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r["tensor"]):
        key = tensor_key(row["component"], row["tensor"])
        if row["action"] == "quantize":
            units[key], entries[key] = _staged_unit(row, key, staged)
        else:
            source = headers[row["file"]].tensors[row["tensor"]]
            units[key] = [_Stored(ShardTensor(row["tensor"], source.dtype, tuple(source.shape)),
                                  headers[row["file"]].path, source.start, source.end)]
            entries[key] = _kept_entry(row, "")
    quantized = [entry for entry in entries.values() if entry["action"] == "quantize"]
    if quantized:
        metadata[QUANTIZED_METADATA_KEY] = quantized_metadata(quantized)
    plan = plan_shards([(key, sum(s.tensor.nbytes for s in stored)) for key, stored in units.items()],
                       max_shard_bytes)
    by_name = {s.tensor.name: s for stored in units.values() for s in stored}

    def source(tensor: ShardTensor):
        stored = by_name[tensor.name]
        return file_range_chunks(stored.path, stored.start, stored.end)

    def shard_written(index: int, name: str) -> None:
        for key in plan[index]:
            entries[key]["file"] = join_path(directory, name)
            if remove_staged and key in staged:   # the shard is fsynced: its bytes are safe
                Path(staged[key]).unlink(missing_ok=True)

    shards = [[s.tensor for key in keys for s in units[key]] for keys in plan]
    written = write_weight_group(partial / directory, stem, shards, metadata, source, shard_written)
    files = {join_path(directory, name): {"size": w.size, "sha256": w.sha256}
             for name, w in written.items()}
    return files, entries


def _staged_unit(row: dict, key: str, staged: Mapping) -> tuple[list[_Stored], dict]:
    """The staged result of one quantized tensor, checked against its inventory row."""
    path = Path(staged[key])
    try:
        header = read_header(path)
        info = json.loads(header.metadata[STAGED_METADATA_KEY])
        bits, block, group, mode = info["bits"], info["block_size"], info["group_size"], info["mode"]
        shape = tuple(info["shape"])
    except (CorruptCheckpointError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"tensor {key}: staged result {path} is unreadable ({exc}); delete "
                            "it and quantize again") from None
    if shape != tuple(row["shape"]) or (row.get("bits") is not None and bits != row["bits"]):
        raise ArtifactError(f"tensor {key}: staged result {path} holds shape {list(shape)} at "
                            f"{bits} bits, the inventory says {row['shape']} at {row.get('bits')}")
    specs = packed_part_specs(row["tensor"], shape, bits, block, group)
    stored = []
    for part, stored_name in packed_part_names(row["tensor"]).items():
        entry = header.tensors.get(part)
        if entry is None or (entry.dtype, tuple(entry.shape)) != specs[stored_name]:
            raise ArtifactError(f"tensor {key}: staged result {path}: part {part!r} is not "
                                f"{specs[stored_name][0]} {list(specs[stored_name][1])}")
        stored.append(_Stored(ShardTensor(stored_name, entry.dtype, tuple(entry.shape)), path,
                              entry.start, entry.end))
    entry = {"component": row["component"], "name": row["tensor"], "file": "",
             "shape": list(shape), "dtype": row["dtype"], "action": "quantize",
             "reason": row.get("reason") or "", "bits": bits, "block_size": block,
             "group_size": group, "mode": mode, "original_bytes": row["original_bytes"],
             "packed_bytes": packed_nbytes(shape, bits, block, group)}
    return stored, entry


def _kept_entry(row: dict, file: str) -> dict:
    return {"component": row["component"], "name": row["tensor"], "file": file,
            "shape": list(row["shape"]), "dtype": row["dtype"], "action": "keep",
            "reason": row.get("reason") or "", "original_bytes": row["original_bytes"],
            "packed_bytes": row["original_bytes"]}


def _carry_files(partial: Path, root: Path, lineage: dict, rewritten: set) -> dict[str, dict]:
    """Hard-link (else copy) every source file outside the rewritten weight groups;
    reuse the lineage's hashes where the size agrees. Only regular files inside the
    source are carried, and never a pickle (store/source_tree.py)."""
    base = root if root.is_dir() else root.parent
    known = {f["path"]: f for f in lineage.get("files", [])}
    names = sorted(known) if known else visible_files(base)
    names = without_pickles(names, str(base),
                            lambda name: is_pickle_name(name) or is_pickle(checked_file(base, name)))
    files = {}
    for name in names:
        if name in ADDED_ROOT_FILES or is_group_file(name, rewritten):
            continue
        target = partial / name
        link_or_copy(checked_file(base, name), target)
        size = target.stat().st_size
        record = known.get(name)
        if record and record.get("size") == size and record.get("sha256"):
            files[name] = {"size": size, "sha256": record["sha256"]}
        else:
            files[name] = {"size": size, "sha256": sha256_file(target)}
    return files


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` (a checked regular file, see ``checked_file``) at ``target`` and
    make the shared file read-only, so editing the artifact in place cannot change the
    source; copy where links are not possible or the file's mode cannot be changed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:          # other file system, or links not allowed: copy
        shutil.copyfile(source, target)
        return
    try:
        os.chmod(target, stat.S_IMODE(target.stat().st_mode) & ~WRITE_BITS)
    except OSError:          # not the file's owner: an independent copy instead
        target.unlink()
        shutil.copyfile(source, target)


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _write_metrics(partial: Path, metrics):
    """Write metrics.parquet sorted by component and tensor; returns the table (or None)."""
    if metrics is None:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(metrics, (str, os.PathLike)):
        table = pq.read_table(metrics)
    elif isinstance(metrics, pa.Table):
        table = metrics
    else:
        table = pa.Table.from_pylist(list(metrics))
    order = [(name, "ascending") for name in ("component", "tensor") if name in table.column_names]
    if order:
        table = table.sort_by(order)
    pq.write_table(table.replace_schema_metadata(None), partial / METRICS_NAME)
    return table
