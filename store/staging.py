"""Staged per-tensor results: one small safetensors file per quantized tensor.

Workers write these as they finish (atomically), packaging streams them into
shards. The file name is a content key over everything that determines the
result, so a rerun finds finished work and a changed setting never reuses
stale work. A staged file that cannot be read back counts as absent.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from hlwq.quant.errors import CorruptCheckpointError, SourceError
from hlwq.quant.packed import PackedTensor, layout_mismatches
from hlwq.store.atomic import atomic_write_bytes

STAGED_METADATA_KEY = "hlwq_staged"
STAGED_SUFFIX = ".safetensors"


def staged_key(source_id: str, tensor_name: str, policy_id: str, bits: int, block_size: int,
               group_size: int | None, mode: str, code_version: str) -> str:
    """sha256 hex of the fields that determine a staged result, as canonical JSON.

    ``source_id`` should pin the bytes (a file's sha256 or a commit sha plus path);
    ``tensor_name`` should be unique in the run (e.g. ``hlwq.store.artifact.tensor_key``).
    """
    fields = {"source_id": source_id, "tensor": tensor_name, "policy": policy_id, "bits": bits,
              "block_size": block_size, "group_size": group_size or block_size, "mode": mode,
              "code_version": code_version}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def staged_path(staging_dir: str | os.PathLike, key: str) -> Path:
    return Path(staging_dir) / f"{key}{STAGED_SUFFIX}"


def write_staged(staging_dir: str | os.PathLike, key: str, tensor_name: str,
                 packed: PackedTensor) -> Path:
    """Write ``packed`` atomically as ``<staging_dir>/<key>.safetensors``; return the path."""
    from safetensors.torch import save

    info = {"tensor": tensor_name, "shape": list(packed.shape), "bits": packed.bits,
            "block_size": packed.block_size, "group_size": packed.group_size, "mode": packed.mode}
    data = save({"codes": packed.codes.contiguous(), "scales": packed.scales.contiguous(),
                 "codebook": packed.codebook.contiguous()},
                metadata={STAGED_METADATA_KEY: json.dumps(info, sort_keys=True)})
    path = staged_path(staging_dir, key)
    atomic_write_bytes(path, data)
    return path


def read_staged(path: str | os.PathLike) -> tuple[str, PackedTensor]:
    """Read a staged file back; raises CorruptCheckpointError if it is unreadable or inconsistent."""
    from hlwq.store.safetensors_io import read_header, read_tensor

    path = Path(path)
    header = read_header(path)
    try:
        info = json.loads(header.metadata[STAGED_METADATA_KEY])
        parts = {name: read_tensor(path, header.tensors[name])
                 for name in ("codes", "scales", "codebook")}
        packed = PackedTensor(codes=parts["codes"], scales=parts["scales"],
                              codebook=parts["codebook"], shape=tuple(info["shape"]),
                              bits=info["bits"], block_size=info["block_size"],
                              group_size=info["group_size"], mode=info["mode"])
        name = info["tensor"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: not a staged HLWQ result ({exc!r})") from None
    _check_consistent(path, packed)
    return name, packed


def _check_consistent(path: Path, packed: PackedTensor) -> None:
    problems = layout_mismatches(packed)
    if problems:
        raise CorruptCheckpointError(f"{path}: staged {problems[0]}")


def load_staged_if_valid(path: str | os.PathLike) -> tuple[str, PackedTensor] | None:
    """``read_staged`` that treats a missing or unreadable file as absent (None): redo it."""
    try:
        return read_staged(path)
    except (CorruptCheckpointError, SourceError, OSError):
        return None


def is_staged(staging_dir: str | os.PathLike, key: str) -> bool:
    """True when a sound staged result exists for ``key`` (cheap: header and sizes only)."""
    from hlwq.store.safetensors_io import read_header

    path = staged_path(staging_dir, key)
    try:
        header = read_header(path)
        return STAGED_METADATA_KEY in header.metadata and {"codes", "scales", "codebook"} <= set(
            header.tensors)
    except (CorruptCheckpointError, SourceError, OSError):
        return False
