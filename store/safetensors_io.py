"""Safetensors headers, single tensors and sets of them, read without loading a whole file.

The format: 8 bytes little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``)
and then the raw tensor bytes. Offsets in the JSON are relative to the end of
the header; ``TensorEntry`` holds absolute file offsets instead, so a reader
needs nothing but the entry to find its bytes.

The parser is as strict as the safetensors library: every tensor's byte range
must match its shape and dtype, and the ranges must tile the data section
exactly (no overlap, no gap, nothing past the end, nothing left over).
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from hlwq.quant.errors import CorruptCheckpointError, SourceError
from hlwq.quant.sizes import DTYPE_BYTES
from hlwq.store.source_tree import visible_files

MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit
METADATA_KEY = "__metadata__"
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str               # as safetensors names it: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int               # absolute file offset of the first byte
    end: int                 # absolute file offset one past the last byte

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]              # in file order
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate one file's header; reads only the header bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            header_len = header_length(handle.read(8), file_size, path)
            raw = handle.read(header_len)
    except FileNotFoundError:
        raise SourceError(f"{path}: file does not exist") from None
    return parse_header(raw, path=path, data_size=file_size - 8 - header_len)


def header_length(first_bytes: bytes, file_size: int, where: str | os.PathLike) -> int:
    """The JSON header's length from a file's first 8 bytes (local or fetched by HTTP Range),
    checked against the file's size and the safetensors limit."""
    if file_size < 8 or len(first_bytes) < 8:
        raise CorruptCheckpointError(
            f"{where}: file is {file_size} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", first_bytes[:8])
    if header_len > file_size - 8:
        raise CorruptCheckpointError(
            f"{where}: header length {header_len:,} exceeds file size {file_size:,} bytes")
    if header_len > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            f"{where}: header length {header_len:,} exceeds the {MAX_HEADER_BYTES:,}-byte limit")
    return header_len


def parse_header(raw: bytes, *, path: str | os.PathLike, data_size: int) -> SafetensorsHeader:
    """Validate header JSON bytes (also for remote files read by HTTP Range); ``data_size`` is
    the file's byte count after the header, ``path`` names the file in messages."""
    path = Path(path)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(
            f"{path}: header JSON is a {type(header).__name__}, not an object")
    metadata = _parse_metadata(path, header.pop(METADATA_KEY, None) or {})
    data_offset = 8 + len(raw)
    entries = [_parse_entry(path, name, info, data_offset) for name, info in header.items()]
    _check_coverage(path, entries, data_offset, data_size)
    return SafetensorsHeader(path, {entry.name: entry for entry in entries}, metadata)


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise ValueError(f"duplicate keys {repeated}")
    return result


def _parse_metadata(path: Path, metadata) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()):
        raise CorruptCheckpointError(f"{path}: {METADATA_KEY} must map strings to strings")
    return metadata


def _parse_entry(path: Path, name: str, info, data_offset: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CorruptCheckpointError(f"{where}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise CorruptCheckpointError(
            f"{where}: unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPE_BYTES))})")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise CorruptCheckpointError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_count(offset) for offset in offsets) or offsets[0] > offsets[1]):
        raise CorruptCheckpointError(
            f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != expected:
        raise CorruptCheckpointError(
            f"{where}: data_offsets span {end - begin:,} bytes but shape {shape} of {dtype} "
            f"needs {expected:,}")
    return TensorEntry(name, dtype, tuple(shape), data_offset + begin, data_offset + end)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_coverage(path: Path, entries: list[TensorEntry], data_offset: int,
                    data_size: int) -> None:
    """Byte ranges must tile [0, data_size) in order: no overlap, no gap, nothing outside."""
    position, previous = data_offset, None
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if entry.start < position:
            raise CorruptCheckpointError(
                f"{path}: tensor {entry.name!r} bytes [{entry.start - data_offset:,}, "
                f"{entry.end - data_offset:,}) overlap tensor {previous!r}")
        if entry.start > position:
            raise CorruptCheckpointError(
                f"{path}: gap of {entry.start - position:,} bytes before tensor {entry.name!r}; "
                "tensor data must be contiguous")
        position, previous = entry.end, entry.name
    if position > data_offset + data_size:
        raise CorruptCheckpointError(
            f"{path}: tensor {previous!r} ends at data offset {position - data_offset:,}, past the "
            f"end of the file's {data_size:,} data bytes (file truncated?)")
    if position < data_offset + data_size:
        raise CorruptCheckpointError(
            f"{path}: {data_offset + data_size - position:,} bytes after the last tensor are not "
            "described by the header")


def torch_dtype(dtype: str):
    """The torch dtype for a safetensors dtype name (torch is imported only when tensors are read)."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }[dtype]


def read_tensor(path: str | os.PathLike, entry: TensorEntry):
    """Read one tensor's bytes (and nothing else) straight into a new CPU tensor."""
    import torch

    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    done = _read_into(path, memoryview(buffer.numpy()), entry.start, 0)
    if done < entry.nbytes:
        raise CorruptCheckpointError(
            f"{path}: tensor {entry.name!r} needs bytes up to offset {entry.end:,} but the "
            f"file ends at {entry.start + done:,}")
    return buffer.view(torch_dtype(entry.dtype)).reshape(entry.shape)


def read_rows(path: str | os.PathLike, row: Mapping, indices):
    """Rows ``indices`` (a 1-D index tensor) of an inventory row's 2-D tensor as float32,
    reading only their bytes."""
    import torch

    out_features, in_features = row["shape"]
    row_bytes = in_features * DTYPE_BYTES[row["dtype"]]
    if row["data_end"] - row["data_start"] != out_features * row_bytes:
        raise CorruptCheckpointError(f"{path}: tensor {row['tensor']!r} spans "
                                     f"{row['data_end'] - row['data_start']:,} bytes, not "
                                     f"{out_features * row_bytes:,} for {row['dtype']} "
                                     f"{list(row['shape'])}")
    buffer = torch.empty((len(indices), row_bytes), dtype=torch.uint8)
    with open(path, "rb") as handle:
        for k, index in enumerate(indices.tolist()):
            view = memoryview(buffer[k].numpy())
            if os.preadv(handle.fileno(), [view], row["data_start"] + index * row_bytes) != row_bytes:
                raise CorruptCheckpointError(f"{path}: tensor {row['tensor']!r} row {index} "
                                             "lies beyond the end of the file")
    return buffer.view(torch_dtype(row["dtype"])).reshape(len(indices), in_features).float()


class StagingReader:
    """Reads many tensors' bytes into one reusable page-aligned buffer, past the page cache
    unless ``direct`` is false.

    Streaming a checkpoint bigger than memory, the page cache is no use, and filling it costs
    CPU: the kernel's copy, done by the thread that reads, competes with the threads computing
    on the last part read (on 2 cores, a real-width transformer block calibrated in 1.7-2.6 s
    while the next one was read through the cache, 1.2-1.45 s with direct reads). A direct
    read (``O_DIRECT``) is the disk's own transfer into this buffer. Offsets and lengths are
    rounded out to whole pages, which direct reads need; tensors closer than ``MERGE_GAP`` in
    a file are read as one run. Where the system or the filesystem has no direct reads, the
    same runs go through the cache.
    """

    PAGE = mmap.PAGESIZE
    MERGE_GAP = 1 << 20        # reading a gap this small beats a second request
    PIECE = 64 << 20           # bytes per read call (Linux caps one at just under 2 GiB)

    def __init__(self, direct: bool = True):
        self.direct = direct
        self._buffer = mmap.mmap(-1, self.PAGE)

    def read(self, places: Iterable[tuple[Path, TensorEntry]]) -> dict[str, memoryview]:
        """``{tensor name: its bytes}`` for ``places`` (file, entry): views into the buffer,
        overwritten by the next read."""
        runs = self._runs(places)
        size = sum(hi - lo for _, lo, hi, _ in runs)
        if size > len(self._buffer):
            self._buffer = mmap.mmap(-1, size)
        buffer, position, out = memoryview(self._buffer), 0, {}
        for path, lo, hi, entries in runs:
            got = _read_run(path, buffer[position:position + hi - lo], lo, self.direct)
            for entry in entries:
                if entry.end > lo + got:
                    raise CorruptCheckpointError(
                        f"{path}: tensor {entry.name!r} needs bytes up to offset {entry.end:,} "
                        f"but the file ends at {lo + got:,}")
                out[entry.name] = buffer[position + entry.start - lo:position + entry.end - lo]
            position += hi - lo
        return out

    def _runs(self, places) -> list[tuple[Path, int, int, list[TensorEntry]]]:
        """(file, first byte, end, entries) of page-aligned ranges covering every entry."""
        runs = []
        for path, entry in sorted(places, key=lambda place: (str(place[0]), place[1].start)):
            lo = entry.start // self.PAGE * self.PAGE
            hi = -(-entry.end // self.PAGE) * self.PAGE
            if runs and runs[-1][0] == path and lo - runs[-1][2] <= self.MERGE_GAP:
                runs[-1][2] = max(runs[-1][2], hi)
                runs[-1][3].append(entry)
            else:
                runs.append([path, lo, hi, [entry]])
        return [tuple(run) for run in runs]


def _read_run(path: Path, view: memoryview, offset: int, direct: bool) -> int:
    """Read ``view``'s length from ``offset`` of ``path`` (directly if asked and the file allows
    it); returns the bytes read, fewer where the file ends first."""
    flags = getattr(os, "O_DIRECT", 0) if direct else 0
    try:
        return _read_into(path, view, offset, flags)
    except OSError as error:   # EINVAL, at the open or the first read: no direct reads here
        if not flags or error.errno != errno.EINVAL:
            raise
        return _read_into(path, view, offset, 0)


def _read_into(path, view: memoryview, offset: int, flags: int) -> int:
    """Fill ``view`` from ``offset`` of ``path`` (opened with ``flags``) up to the file's end;
    returns the bytes read. pread may return less than asked for (2 GiB cap on Linux)."""
    handle = os.open(path, os.O_RDONLY | flags)
    try:
        done = 0
        while done < len(view):
            count = os.preadv(handle, [view[done:done + StagingReader.PIECE]], offset + done)
            if count == 0:
                break
            done += count
        return done
    finally:
        os.close(handle)


def iter_safetensors_files(root: str | os.PathLike) -> Iterator[Path]:
    """Every weight file of a checkpoint: a single file, an index's shards, or a folder tree.

    In a folder (e.g. a diffusers pipeline with component subfolders), each
    directory that holds a ``*.safetensors.index.json`` contributes exactly the
    shards its index names; any other directory contributes all its ``*.safetensors``.
    Hidden entries (``.cache``, ``.git``) are skipped; a link leading out of ``root`` is
    refused (store/source_tree.py), and so is an index naming a shard in another folder.
    """
    root = Path(root)
    if not root.exists():
        raise SourceError(f"{root}: path does not exist")
    if root.is_file():
        if root.name.endswith(INDEX_SUFFIX):
            yield from _index_shards(root)
        elif root.suffix == ".safetensors":
            yield root
        else:
            raise SourceError(f"{root}: not a .safetensors file or a {INDEX_SUFFIX} index")
        return
    by_folder: dict[tuple[str, ...], list[str]] = {}
    for name in visible_files(root):        # links leading out of the source are refused
        *folder, file_name = name.split("/")
        by_folder.setdefault(tuple(folder), []).append(file_name)
    found = False
    for folder in sorted(by_folder):        # os.walk's top-down order
        for path in _directory_files(root.joinpath(*folder), by_folder[folder]):
            found = True
            yield path
    if not found:
        raise SourceError(f"{root}: no .safetensors files in this directory or below")


def _directory_files(directory: Path, names: list[str]) -> Iterator[Path]:
    indexes = [name for name in names if name.endswith(INDEX_SUFFIX)]
    if indexes:
        shards = {shard for index in indexes for shard in _index_shards(directory / index)}
        yield from sorted(shards)
    else:
        yield from (directory / name for name in names if name.endswith(".safetensors"))


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
        names = [PurePosixPath(shard).name for shard in shards]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(
            f"{index}: not a safetensors index (needs a JSON object with a 'weight_map' of "
            f"tensor -> shard file): {exc!r}") from None
    for shard, name in zip(shards, names):
        # The Hub's indexes name shards beside them; a path would take a component's
        # weights from another folder (or from outside the source).
        if shard != name or name in ("", ".", "..") or "\\" in name:
            raise CorruptCheckpointError(f"{index}: lists shard {shard!r}, which is not a file "
                                         "name in the index's own folder (an index may name "
                                         "only the shards beside it)")
    paths = [index.parent / shard for shard in shards]
    for path in paths:
        if not path.is_file():
            raise CorruptCheckpointError(f"{index}: lists shard {path.name!r}, which does not exist")
    return paths


def read_headers(files: Iterable[str | os.PathLike]) -> dict[Path, SafetensorsHeader]:
    """Headers of many files; a tensor name twice in one directory (one component) is an error."""
    headers: dict[Path, SafetensorsHeader] = {}
    owner: dict[tuple[Path, str], Path] = {}
    for path in map(Path, files):
        header = headers[path] = read_header(path)
        for name in header.tensors:
            first = owner.setdefault((path.parent, name), path)
            if first != path:
                raise CorruptCheckpointError(
                    f"tensor {name!r} appears in both {first} and {path}; shards of one component "
                    "must not repeat a tensor (two checkpoints in one folder? choose one with "
                    "hlwq's --files GLOB or --exclude-files GLOB)")
    return headers
