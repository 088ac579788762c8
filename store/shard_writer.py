"""A streamed safetensors writer: header first, then each tensor's bytes as they come.

The safetensors library wants every tensor in memory at once; shards of a
38 GB checkpoint cannot be built that way. Here the header is computed from
names, dtypes and shapes alone, then a caller-supplied source yields each
tensor's bytes in chunks, so memory stays bounded by one tensor (or one chunk).

Layout decisions (deterministic, readable by the safetensors library):
tensors are ordered by dtype width, widest first, then by name, so every
tensor starts at a multiple of its element size; the JSON header has sorted
keys, no spaces, and is padded with spaces to a multiple of 8 bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from hlwq.quant.errors import ArtifactError
from hlwq.quant.sizes import DTYPE_BYTES
from hlwq.store.atomic import atomic_write_bytes

CHUNK_BYTES = 16 << 20      # copy granularity: bounds memory per read


@dataclass(frozen=True)
class ShardTensor:
    """One tensor to write: its stored name, safetensors dtype and shape."""
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class WrittenFile:
    size: int
    sha256: str


ByteSource = Callable[[ShardTensor], Iterable[bytes | memoryview]]


def data_order(tensors: Iterable[ShardTensor]) -> list[ShardTensor]:
    return sorted(tensors, key=lambda t: (-DTYPE_BYTES[t.dtype], t.name))


def header_bytes(ordered: list[ShardTensor], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length plus the padded JSON header for tensors in ``ordered`` data order."""
    header: dict[str, object] = {}
    offset = 0
    for tensor in ordered:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: str | os.PathLike, tensors: Iterable[ShardTensor],
                metadata: dict[str, str] | None, source: ByteSource) -> WrittenFile:
    """Write one safetensors file at ``path``; ``source(tensor)`` yields that tensor's bytes.

    Returns the file's size and sha256, computed while writing. The caller
    owns atomicity (``path`` is normally inside a temporary directory).
    """
    ordered = data_order(tensors)
    names = [t.name for t in ordered]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ArtifactError(f"{path}: tensor names repeat in one shard: {repeated[:5]}")
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as handle:
        def emit(chunk) -> int:
            nonlocal size
            handle.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            return len(chunk)

        emit(header_bytes(ordered, metadata))
        for tensor in ordered:
            written = sum(emit(memoryview(chunk).cast("B")) for chunk in source(tensor))
            if written != tensor.nbytes:
                raise ArtifactError(f"{path}: tensor {tensor.name!r} got {written:,} bytes, "
                                    f"its dtype {tensor.dtype} and shape {list(tensor.shape)} "
                                    f"need {tensor.nbytes:,}")
        handle.flush()
        os.fsync(handle.fileno())
    return WrittenFile(size, digest.hexdigest())


def file_range_chunks(path: str | os.PathLike, start: int, end: int) -> Iterable[bytes]:
    """The bytes ``[start, end)`` of a file, in bounded chunks."""
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = end - start
        while remaining:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                raise ArtifactError(f"{path}: ends before byte {end:,} (file truncated?)")
            remaining -= len(chunk)
            yield chunk


def tensor_chunks(tensor) -> Iterable[memoryview]:
    """A torch tensor's raw little-endian bytes (one view, no copy when contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    import torch

    yield memoryview(flat.view(torch.uint8).numpy())


def plan_shards(units: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split ordered ``(unit, nbytes)`` pairs into consecutive shards of at most
    ``max_shard_bytes``; a unit larger than that gets a shard of its own."""
    shards: list[list[str]] = []
    used = 0
    for unit, nbytes in units:
        if not shards or (shards[-1] and used + nbytes > max_shard_bytes):
            shards.append([])
            used = 0
        shards[-1].append(unit)
        used += nbytes
    return shards


def shard_file_names(stem: str, count: int) -> list[str]:
    """Hub naming: ``<stem>.safetensors`` alone, else ``<stem>-00001-of-0000N.safetensors``."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def index_file_name(stem: str) -> str:
    return f"{stem}.safetensors.index.json"


def index_bytes(weight_map: dict[str, str], total_size: int) -> bytes:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_weight_group(folder: Path, stem: str, shards: list[list[ShardTensor]],
                       metadata: dict[str, str] | None, source: ByteSource,
                       on_shard: Callable[[int, str], None] | None = None) -> dict[str, WrittenFile]:
    """One checkpoint in ``folder``: ``<stem>.safetensors``, or numbered shards plus their index.

    Returns ``{file name: WrittenFile}``, the index included. ``on_shard(i, name)`` runs once
    shard ``i`` is written and fsynced (so a caller may drop what it was built from)."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, WrittenFile] = {}
    weight_map: dict[str, str] = {}
    for i, (name, tensors) in enumerate(zip(shard_file_names(stem, len(shards)), shards)):
        written[name] = write_shard(folder / name, tensors, metadata, source)
        weight_map.update(dict.fromkeys((t.name for t in tensors), name))
        if on_shard is not None:
            on_shard(i, name)
    if len(shards) > 1:
        index = index_bytes(weight_map, sum(t.nbytes for shard in shards for t in shard))
        name = index_file_name(stem)
        atomic_write_bytes(folder / name, index)
        written[name] = WrittenFile(len(index), hashlib.sha256(index).hexdigest())
    return written


def group_stem(file_name: str) -> str:
    """The checkpoint a weight file belongs to: ``x-00001-of-00003.safetensors`` -> ``x``."""
    name = Path(file_name).name
    if name.endswith(".safetensors.index.json"):
        return name[: -len(".safetensors.index.json")]
    stem = name.removesuffix(".safetensors")
    parts = stem.rsplit("-", 3)
    if len(parts) == 4 and parts[2] == "of" and parts[1].isdigit() and parts[3].isdigit():
        return parts[0]
    return stem
