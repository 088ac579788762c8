"""export-dequantized: an HLWQ artifact -> a plain checkpoint in the source's layout.

For tools that cannot read HLWQ. Quantized tensors are dequantized to their
source dtype (BF16 for LTX-2.3) and kept tensors copied byte for byte; every
other file is hard-linked. Tensors are streamed one at a time into
safetensors files written header first, so memory holds one tensor, never the
model. The official single-file layout comes back as one file per checkpoint
(what ``from_single_file`` loads); other layouts are sharded like the Hub does.
"""

from __future__ import annotations

import os
from pathlib import Path

from hlwq.quant.core import dequantize
from hlwq.store.artifact import (
    DEFAULT_MAX_SHARD_BYTES,
    QUANTIZED_METADATA_KEY,
    SHARD_FORMAT_KEY,
    Artifact,
    TensorRecord,
    open_artifact,
)
from hlwq.store.atomic import directory_transaction
from hlwq.store.output_dir import check_output_dir
from hlwq.store.package import (
    ADDED_ROOT_FILES,
    is_group_file,
    join_path,
    link_or_copy,
    weight_group_of,
)
from hlwq.store.safetensors_io import read_header, torch_dtype
from hlwq.store.shard_writer import (
    ShardTensor,
    file_range_chunks,
    plan_shards,
    tensor_chunks,
    write_weight_group,
)

SINGLE_FILE_LAYOUTS = ("ltx23-single",)


def export_dequantized(artifact_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, verify: bool = True) -> dict:
    """Write the dequantized checkpoint to ``out_dir`` (temp dir + rename); return a summary."""
    target = Path(out_dir)
    check_output_dir(target)
    artifact = open_artifact(artifact_dir, verify=verify)
    groups = rewritten_groups(artifact)
    with directory_transaction(target) as partial:
        files = carry_other_files(artifact, partial, groups)
        for group, entries in sorted(groups.items()):
            files.update(_export_group(artifact, partial, group, entries, max_shard_bytes))
    return {"path": str(target), "files": len(files),
            "dequantized_tensors": sum(e.quantized for es in groups.values() for e in es),
            "total_bytes": sum(f["size"] for f in files.values())}


def rewritten_groups(artifact: Artifact) -> dict[tuple[str, str], list[TensorRecord]]:
    """The artifact's weight groups that hold quantized tensors, with all their entries."""
    groups: dict[tuple[str, str], list[TensorRecord]] = {}
    for entry in artifact.tensor_entries.values():
        groups.setdefault(weight_group_of(entry.file), []).append(entry)
    return {group: sorted(entries, key=lambda e: e.name) for group, entries in groups.items()
            if any(e.quantized for e in entries)}


def carry_other_files(artifact: Artifact, partial: Path, groups) -> dict[str, dict]:
    """Hard-link every artifact file except HLWQ's own and the rewritten groups' shards."""
    files = {}
    for relative, info in sorted(artifact.manifest["files"].items()):
        if relative in ADDED_ROOT_FILES or is_group_file(relative, set(groups)):
            continue
        link_or_copy(artifact.file_path(relative), partial / relative)
        files[relative] = info
    return files


def group_metadata(artifact: Artifact, entries: list[TensorRecord]) -> dict[str, str]:
    """The source file's safetensors metadata, as the artifact's shards carried it."""
    header = read_header(artifact.file_path(entries[0].file))
    return {k: v for k, v in header.metadata.items()
            if k not in (SHARD_FORMAT_KEY, QUANTIZED_METADATA_KEY)}


def _export_group(artifact: Artifact, partial: Path, group: tuple[str, str],
                  entries: list[TensorRecord], max_shard_bytes: int) -> dict[str, dict]:
    directory, stem = group
    by_name = {e.name: e for e in entries}
    if artifact.layout in SINGLE_FILE_LAYOUTS:
        plan = [list(by_name)]
    else:
        plan = plan_shards([(e.name, e.original_bytes) for e in entries], max_shard_bytes)
    metadata = group_metadata(artifact, entries)
    kept_ranges = _kept_byte_ranges(artifact, entries)

    def source(tensor: ShardTensor):
        entry = by_name[tensor.name]
        if entry.quantized:
            weight = dequantize(artifact.load_packed(entry.key), dtype=torch_dtype(entry.dtype))
            return tensor_chunks(weight)
        path, start, end = kept_ranges[entry.name]
        return file_range_chunks(path, start, end)

    shards = [[ShardTensor(n, by_name[n].dtype, tuple(by_name[n].shape)) for n in names]
              for names in plan]
    written = write_weight_group(partial / directory, stem, shards, metadata, source)
    return {join_path(directory, name): {"size": w.size, "sha256": w.sha256}
            for name, w in written.items()}


def _kept_byte_ranges(artifact: Artifact, entries: list[TensorRecord]) -> dict[str, tuple]:
    """Where each kept tensor's bytes lie in the artifact's shards (copied, never decoded)."""
    ranges = {}
    for file in sorted({e.file for e in entries if not e.quantized}):
        path = artifact.file_path(file)
        stored = read_header(path).tensors
        for entry in entries:
            if entry.file == file and not entry.quantized:
                ranges[entry.name] = (path, stored[entry.name].start, stored[entry.name].end)
    return ranges
