"""The HLWQ artifact format: constants, manifest schema, safe paths, verification, reading.

docs/FORMAT.md is the spec; this module is its reference reader. Nothing here
unpickles: manifests are JSON, tensors come from safetensors.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hlwq.quant.choices import MODES
from hlwq.quant.errors import ArtifactError, CorruptCheckpointError, SourceError, UnsafePathError
from hlwq.quant.packed import PACKED_PARTS, PackedTensor, packed_layout
from hlwq.quant.sizes import DTYPE_BYTES, original_nbytes, packed_nbytes, size_table
from hlwq.store.hash_cache import sha256_file
from hlwq.store.output_dir import MANIFEST_NAME

FORMAT_NAME = "hlwq-artifact"
FORMAT_VERSION = 1
METRICS_NAME = "metrics.parquet"
MODEL_CARD_NAME = "README.md"
SHARD_FORMAT_KEY = "hlwq_format_version"     # in every written shard's __metadata__
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000      # the Hub's "5GB"
LAYOUTS = ("diffusers", "ltx23-single", "generic")   # hlwq.tasks.inventory.detect_layout's names
ACTIONS = ("quantize", "keep")
# In each rewritten shard's __metadata__: canonical JSON {tensor name: its quantized record}
# for the group's quantized tensors, so the bytes say what each packed tensor is.
QUANTIZED_METADATA_KEY = "hlwq_quantized"
QUANTIZED_RECORD_FIELDS = ("shape", "dtype", "bits", "block_size", "group_size", "mode")
IGNORED_ENTRIES = (".git", ".cache", ".gitattributes")   # Hub tooling adds these at the root
_SHA256 = re.compile(r"[0-9a-f]{64}")


def tensor_key(component: str, name: str) -> str:
    """The manifest key of a tensor: names repeat across diffusers components, keys do not."""
    return f"{component}/{name}"


def is_validated(validation: dict) -> bool:
    """The one rule for "validated": the tensor gates were enforced and passed, and the output
    gates passed or were skipped for a recorded reason (a source that is not a whole pipeline;
    --no-gates already fails the first half)."""
    tensor = validation.get("tensor_gates") or {}
    output = validation.get("output_gates") or {}
    if not (tensor.get("passed") and tensor.get("enforced", True)):
        return False
    return bool(output.get("passed")) or bool(output.get("skipped"))


def packed_part_names(name: str) -> dict[str, str]:
    """Stored names of a quantized tensor's parts: ``{"codes": "<name>.codes", ...}``."""
    return {part: f"{name}.{part}" for part in PACKED_PARTS}


def packed_part_specs(name: str, shape, bits: int, block_size: int,
                      group_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Stored name -> (dtype, shape) of each part, from the quantization settings alone."""
    names = packed_part_names(name)
    return {names[part]: (spec.safetensors_dtype, spec.shape)
            for part, spec in packed_layout(tuple(shape), bits, block_size, group_size).items()}


def quantized_record(entry: dict) -> dict:
    """What a shard records of one quantized tensor (``QUANTIZED_METADATA_KEY``)."""
    return {field: entry[field] for field in QUANTIZED_RECORD_FIELDS}


def quantized_metadata(entries: list[dict]) -> str:
    """The ``QUANTIZED_METADATA_KEY`` value of the shards of a group holding these entries."""
    return json.dumps({entry["name"]: quantized_record(entry) for entry in entries},
                      sort_keys=True, separators=(",", ":"))


def safe_relative_path(root: str | os.PathLike, relative: object) -> Path:
    """``root / relative`` after checking the path stays inside ``root`` (symlinks followed)."""
    root = Path(root)
    if (not isinstance(relative, str) or not relative or "\\" in relative
            or PurePosixPath(relative).is_absolute()
            or any(part in ("", ".", "..") for part in relative.split("/"))):
        raise UnsafePathError(f"path {relative!r} in {MANIFEST_NAME}: must be relative, "
                              "'/'-separated, without empty, '.' or '..' parts")
    path = root.joinpath(*relative.split("/"))
    resolved = path.resolve()
    if not inside_artifact(root, resolved):
        raise UnsafePathError(f"path {relative!r} in {MANIFEST_NAME}: resolves to {resolved}, "
                              f"outside the artifact {root.resolve()}")
    return path


def inside_artifact(root: str | os.PathLike, resolved: Path) -> bool:
    """Whether a resolved path belongs to the artifact at ``root``: it lies inside it or, for
    a snapshot in the Hub cache (``models--owner--name/snapshots/<commit>``, whose files link
    to ``models--owner--name/blobs/``), inside that repo's blobs."""
    root = Path(root).resolve()
    if resolved.is_relative_to(root):
        return True
    repo_cache = root.parent.parent
    return (root.parent.name == "snapshots" and repo_cache.name.startswith("models--")
            and resolved.is_relative_to(repo_cache / "blobs"))


# ---------------------------------------------------------------- manifest


@dataclass(frozen=True)
class TensorRecord:
    """One manifest tensor entry (docs/FORMAT.md section 3)."""
    key: str
    component: str
    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str
    action: str
    reason: str = ""
    bits: int | None = None
    block_size: int | None = None
    group_size: int | None = None
    mode: str | None = None
    original_bytes: int = 0
    packed_bytes: int = 0

    @property
    def quantized(self) -> bool:
        return self.action == "quantize"

    def stored_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """What the shard must hold for this entry: stored name -> (dtype, shape)."""
        if self.quantized:
            return packed_part_specs(self.name, self.shape, self.bits, self.block_size,
                                     self.group_size)
        return {self.name: (self.dtype, self.shape)}

    @classmethod
    def from_json(cls, key: str, entry: dict) -> TensorRecord:
        fields = {f: entry.get(f) for f in cls.__dataclass_fields__ if f in entry}
        fields["shape"] = tuple(entry["shape"])
        return cls(key=key, **{k: v for k, v in fields.items() if k != "key"})


def manifest_bytes(manifest: dict) -> bytes:
    """The canonical serialization: sorted keys, two-space indent, final newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def parse_manifest(raw: bytes, where: str | os.PathLike = MANIFEST_NAME) -> dict:
    """Parse manifest bytes: JSON, format name, version, then the schema. Raises ArtifactError."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{where}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{where}: not valid JSON at line {exc.lineno} column {exc.colno} "
                            f"({exc.msg}); the file is truncated or corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{where}: 'format' is {found!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{where}: 'format_version' {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{where}: artifact has format version {version}; this code reads "
                            f"versions up to {FORMAT_VERSION}. Upgrade hlwq-pipeline to one that "
                            f"reads format version {version}.")
    problems = schema_problems(manifest)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ArtifactError(f"{where}: schema: {shown}")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {directory} is not a complete HLWQ artifact")
    safe_relative_path(directory, MANIFEST_NAME)      # a symlink out of the artifact is refused
    return parse_manifest(path.read_bytes(), path)


def schema_problems(manifest: dict) -> list[str]:
    """Every violation of the manifest schema, one message each."""
    problems: list[str] = []
    for section, kind in (("source", dict), ("quantization", dict), ("files", dict),
                          ("tensors", dict), ("sizes", dict), ("validation", dict)):
        if not isinstance(manifest.get(section), kind):
            problems.append(f"'{section}' must be a JSON object")
    if problems:
        return problems
    if manifest["source"].get("layout") not in LAYOUTS:
        problems.append(f"source.layout {manifest['source'].get('layout')!r} is not one of {LAYOUTS}")
    if not isinstance(manifest["validation"].get("validated"), bool):
        problems.append("validation.validated must be true or false")
    for path, info in manifest["files"].items():
        if not (isinstance(info, dict) and _is_count(info.get("size"))
                and isinstance(info.get("sha256"), str) and _SHA256.fullmatch(info["sha256"])):
            problems.append(f"files[{path!r}] needs 'size' (int >= 0) and 'sha256' (64 hex)")
    for key, entry in manifest["tensors"].items():
        problems.extend(f"tensor {key}: {p}" for p in _tensor_problems(key, entry, manifest["files"]))
    return problems


def _tensor_problems(key: str, entry, files: dict) -> list[str]:
    if not isinstance(entry, dict):
        return ["entry is not an object"]
    problems = []
    for field in ("component", "name", "file"):
        if not isinstance(entry.get(field), str) or not entry.get(field):
            problems.append(f"'{field}' must be a non-empty string")
    if problems:
        return problems
    if key != tensor_key(entry["component"], entry["name"]):
        problems.append(f"key does not equal '<component>/<name>' "
                        f"({tensor_key(entry['component'], entry['name'])!r})")
    if entry["file"] not in files:
        problems.append(f"file {entry['file']!r} is not listed in 'files'")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        problems.append(f"shape {shape!r} is not a list of non-negative ints")
    if entry.get("dtype") not in DTYPE_BYTES:
        problems.append(f"dtype {entry.get('dtype')!r} is not a safetensors dtype")
    action = entry.get("action")
    if action not in ACTIONS:
        problems.append(f"action {action!r} is not one of {ACTIONS}")
    elif action == "quantize":
        problems.extend(_quantized_problems(entry))
    return problems


def _quantized_problems(entry: dict) -> list[str]:
    problems = []
    bits, block, group = entry.get("bits"), entry.get("block_size"), entry.get("group_size")
    if not (_is_count(bits) and 2 <= bits <= 8):
        problems.append(f"bits {bits!r} is not an int in 2..8")
    if not (_is_count(block) and block > 0 and block & (block - 1) == 0):
        problems.append(f"block_size {block!r} is not a power of two")
    elif not (_is_count(group) and group > 0 and block % group == 0):
        problems.append(f"group_size {group!r} does not divide block_size {block}")
    if entry.get("mode") not in MODES:
        problems.append(f"mode {entry.get('mode')!r} is not one of {MODES}")
    if isinstance(entry.get("shape"), list) and len(entry["shape"]) != 2:
        problems.append(f"a quantized tensor is 2-D, shape is {entry['shape']}")
    return problems


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------- verification


def verify_artifact(directory: str | os.PathLike, hashes: bool = True) -> list[str]:
    """Every problem with an artifact, one line each naming the file or tensor; [] when sound.

    Checks the manifest (JSON, version, schema), each listed file's size and
    (with ``hashes``) sha256, files present but not listed, and every manifest
    field against the bytes: each tensor entry against its shard (stored names,
    dtypes and shapes from quant.packed.packed_layout; shape, dtype and settings
    of a quantized tensor against the shard's own record of it), each entry's
    byte counts, and the ``sizes`` table against the entries, with no unlisted
    tensors in the shards.
    """
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except ArtifactError as exc:
        return [str(exc)]
    problems: list[str] = []
    readable = set()
    for relative, info in sorted(manifest["files"].items()):
        problem, can_read = _file_problem(directory, relative, info, hashes)
        if problem:
            problems.append(problem)
        if can_read:
            readable.add(relative)
    problems.extend(_unlisted_problems(directory, manifest["files"]))
    problems.extend(_tensor_entry_problems(directory, manifest, readable))
    problems.extend(_sizes_problems(manifest))
    return problems


def _file_problem(directory: Path, relative: str, info: dict,
                  hashes: bool) -> tuple[str | None, bool]:
    """(problem or None, whether the file can still be read for the tensor checks)."""
    try:
        path = safe_relative_path(directory, relative)
    except UnsafePathError as exc:
        return f"{relative}: {exc}", False
    if not path.is_file():
        return f"{relative}: missing (listed in {MANIFEST_NAME})", False
    size = path.stat().st_size
    if size != info["size"]:
        return f"{relative}: size {size:,} bytes, {MANIFEST_NAME} says {info['size']:,}", False
    if hashes:
        digest = sha256_file(path)
        if digest != info["sha256"]:
            return (f"{relative}: sha256 {digest[:16]}... differs from {MANIFEST_NAME}'s "
                    f"{info['sha256'][:16]}... (file modified or corrupt)"), True
    return None, True


def _unlisted_problems(directory: Path, files: dict) -> list[str]:
    problems = []
    root = directory.resolve()
    for current, subdirs, names in os.walk(directory):
        current = Path(current)
        at_root = current == directory
        subdirs[:] = sorted(d for d in subdirs if not (at_root and d in IGNORED_ENTRIES))
        for name in sorted(names) + [d for d in subdirs if (current / d).is_symlink()]:
            path = current / name
            relative = path.relative_to(directory).as_posix()
            if at_root and name in (MANIFEST_NAME, *IGNORED_ENTRIES):
                continue
            if path.is_symlink() and not inside_artifact(root, path.resolve()):
                problems.append(f"{relative}: symlink to {path.resolve()}, outside the artifact")
            elif relative not in files:
                problems.append(f"{relative}: present but not listed in {MANIFEST_NAME}")
    return problems


def _tensor_entry_problems(directory: Path, manifest: dict, readable: set[str]) -> list[str]:
    from hlwq.store.safetensors_io import read_header

    by_file: dict[str, list[TensorRecord]] = {}
    for key, entry in manifest["tensors"].items():
        by_file.setdefault(entry["file"], []).append(TensorRecord.from_json(key, entry))
    problems = []
    for relative, records in sorted(by_file.items()):
        if relative not in readable:
            keys = sorted(r.key for r in records)
            problems.append(f"{relative}: holds {len(keys)} tensor entr{'y' if len(keys) == 1 else 'ies'}"
                            f" that cannot be checked ({', '.join(keys[:3])}"
                            f"{', ...' if len(keys) > 3 else ''})")
            continue
        try:
            header = read_header(directory / relative)
            written = json.loads(header.metadata.get(QUANTIZED_METADATA_KEY, "{}"))
        except (CorruptCheckpointError, SourceError) as exc:
            problems.append(f"{relative}: {exc}")
            continue
        except json.JSONDecodeError as exc:
            problems.append(f"{relative}: metadata {QUANTIZED_METADATA_KEY!r} is not JSON ({exc})")
            continue
        claimed = set()
        for record in sorted(records, key=lambda r: r.key):
            claimed.update(record.stored_specs())
            problems.extend(_stored_problems(record, relative, header.tensors, written))
        problems.extend(f"{relative}: tensor {name!r} is not described by {MANIFEST_NAME}"
                        for name in sorted(set(header.tensors) - claimed))
    return problems


def _stored_problems(record: TensorRecord, relative: str, stored: dict,
                     written: dict) -> list[str]:
    """One entry against its shard: the parts' dtypes and shapes, what the shard recorded of
    a quantized tensor, and the entry's byte counts."""
    problems = []
    for name, (dtype, shape) in record.stored_specs().items():
        found = stored.get(name)
        if found is None:
            problems.append(f"tensor {record.key}: {name!r} missing from {relative}")
        elif (found.dtype, tuple(found.shape)) != (dtype, tuple(shape)):
            problems.append(f"tensor {record.key}: {name!r} in {relative} is "
                            f"{found.dtype} {list(found.shape)}, manifest implies "
                            f"{dtype} {list(shape)}")
    # Shards written before the record existed hold none at all: their settings go unchecked.
    if record.quantized and written:
        recorded = written.get(record.name)
        claimed = quantized_record({**vars(record), "shape": list(record.shape)})
        if not isinstance(recorded, dict):
            problems.append(f"tensor {record.key}: {relative} records no quantized tensor "
                            f"{record.name!r} in its {QUANTIZED_METADATA_KEY!r} metadata")
        else:
            problems.extend(f"tensor {record.key}: {field} is {claimed[field]!r} in "
                            f"{MANIFEST_NAME}, {relative} records {recorded.get(field)!r}"
                            for field in QUANTIZED_RECORD_FIELDS
                            if recorded.get(field) != claimed[field])
    original = original_nbytes(record.shape, record.dtype)
    packed = (packed_nbytes(record.shape, record.bits, record.block_size, record.group_size)
              if record.quantized else original)
    for field, value in (("original_bytes", original), ("packed_bytes", packed)):
        if getattr(record, field) != value:
            problems.append(f"tensor {record.key}: {field} is {getattr(record, field)!r} in "
                            f"{MANIFEST_NAME}, its shape and dtype give {value}")
    return problems


def _sizes_problems(manifest: dict) -> list[str]:
    """The ``sizes`` table must be ``size_table`` of the tensor entries (what plan prints)."""
    expected = json.loads(json.dumps(size_table(list(manifest["tensors"].values()))))
    problems = [f"{path} is {found!r} in {MANIFEST_NAME}, the tensor entries give "
                f"{wanted!r}" for path, found, wanted in _differences(manifest["sizes"], expected)]
    return problems[:10]


def _differences(found, wanted, path: str = "sizes") -> list[tuple[str, object, object]]:
    if isinstance(found, dict) and isinstance(wanted, dict):
        return [difference for key in sorted(set(found) | set(wanted), key=str)
                for difference in _differences(found.get(key), wanted.get(key), f"{path}.{key}")]
    return [] if found == wanted and type(found) is type(wanted) else [(path, found, wanted)]


# ---------------------------------------------------------------- reading


class Artifact:
    """A read-only view of a verified artifact: manifest, tensor entries, tensor loading."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.tensor_entries: dict[str, TensorRecord] = {
            key: TensorRecord.from_json(key, entry)
            for key, entry in sorted(manifest["tensors"].items())}
        self._headers: dict[str, dict] = {}     # file -> stored name -> TensorEntry

    @property
    def layout(self) -> str:
        return self.manifest["source"]["layout"]

    @property
    def quantization(self) -> dict:
        return self.manifest["quantization"]

    def components(self) -> list[str]:
        return sorted({entry.component for entry in self.tensor_entries.values()})

    def component_entries(self, component: str) -> dict[str, TensorRecord]:
        """Entries of one component keyed by the tensor's own name (as the model names it)."""
        return {e.name: e for e in self.tensor_entries.values() if e.component == component}

    def file_path(self, relative: str) -> Path:
        return safe_relative_path(self.path, relative)

    def entry(self, key: str) -> TensorRecord:
        try:
            return self.tensor_entries[key]
        except KeyError:
            raise ArtifactError(f"{self.path}: no tensor {key!r} in {MANIFEST_NAME} (keys are "
                                "'<component>/<tensor name>')") from None

    def load_packed(self, key: str) -> PackedTensor:
        entry = self.entry(key)
        if not entry.quantized:
            raise ArtifactError(f"tensor {key}: is kept, not quantized; use load_kept")
        names = packed_part_names(entry.name)
        parts = {part: self._get(entry, name) for part, name in names.items()}
        return PackedTensor(codes=parts["codes"], scales=parts["scales"],
                            codebook=parts["codebook"], shape=tuple(entry.shape), bits=entry.bits,
                            block_size=entry.block_size, group_size=entry.group_size,
                            mode=entry.mode)

    def load_kept(self, key: str):
        entry = self.entry(key)
        if entry.quantized:
            raise ArtifactError(f"tensor {key}: is quantized; use load_packed")
        return self._get(entry, entry.name)

    def _get(self, entry: TensorRecord, stored_name: str):
        """Read one stored tensor by its byte range into fresh memory (no mmap, no pickle)."""
        from hlwq.store.safetensors_io import read_tensor

        found = self._header(entry.file).get(stored_name)
        dtype, shape = entry.stored_specs()[stored_name]
        if found is None:
            raise ArtifactError(f"tensor {entry.key}: {stored_name!r} is missing from {entry.file}")
        if (found.dtype, tuple(found.shape)) != (dtype, tuple(shape)):
            raise ArtifactError(f"tensor {entry.key}: {stored_name!r} in {entry.file} is "
                                f"{found.dtype} {list(found.shape)}, manifest implies "
                                f"{dtype} {list(shape)}")
        return read_tensor(self.file_path(entry.file), found)

    def _header(self, relative: str) -> dict:
        if relative not in self._headers:
            from hlwq.store.safetensors_io import read_header

            try:
                self._headers[relative] = read_header(self.file_path(relative)).tensors
            except (CorruptCheckpointError, SourceError) as exc:
                raise ArtifactError(f"{relative}: {exc}") from None
        return self._headers[relative]


def open_artifact(directory: str | os.PathLike, verify: bool = True,
                  hashes: bool = True) -> Artifact:
    """Open an artifact; with ``verify`` every file (size, and sha256 unless ``hashes`` is
    false) and every tensor entry is checked first, and any problem raises ArtifactError
    (one line: the first problem and how many more). Without ``verify`` only the manifest
    and its paths are checked."""
    directory = Path(directory)
    if verify:
        problems = verify_artifact(directory, hashes=hashes)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ArtifactError(f"{directory}: artifact is unsound: {problems[0]}{more}; "
                                "`hlwq verify` lists every problem")
    manifest = read_manifest(directory)
    for relative in manifest["files"]:
        safe_relative_path(directory, relative)
    return Artifact(directory, manifest)
