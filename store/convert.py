"""Interchange with polarquant 0.6.0's checkpoint layout (docs/FORMAT.md section 7).

Both formats store the same three things per quantized weight: codes, one fp16
scale per block and a per-tensor codebook, so conversion moves bytes and
renames; nothing is requantized. Differences handled here:

- names: polarquant drops the ``.weight`` suffix (``<module>.codes``);
- codebook: polarquant stores ``codebook / sqrt(B)`` (``ct_scaled``); the exact
  HLWQ codebook also travels in ``polar_config.json`` (``hlwq_codebook``, a key
  polarquant ignores) so a round trip is bit-exact;
- codes: identical bytes at 5 bits; half-block nibbles at 2-4 bits; one int8
  per code at 6-8 bits (polarquant's own choices);
- polarquant has one scale per block: HLWQ scale groups smaller than the block
  cannot be converted.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import torch

from hlwq.quant.errors import ArtifactError, InvalidOptionError
from hlwq.quant.packed import PackedTensor, padded_in_features
from hlwq.quant.packing import pack_codes, packed_row_bytes, unpack_codes
from hlwq.quant.sizes import original_nbytes, packed_nbytes
from hlwq.store.artifact import DEFAULT_MAX_SHARD_BYTES, MANIFEST_NAME, Artifact, open_artifact
from hlwq.store.atomic import directory_transaction
from hlwq.store.export import carry_other_files, group_metadata, rewritten_groups
from hlwq.store.hash_cache import sha256_file
from hlwq.store.output_dir import check_output_dir
from hlwq.store.package import file_record, join_path, package_artifact
from hlwq.store.safetensors_io import read_header, read_tensor
from hlwq.store.shard_writer import (
    ShardTensor,
    file_range_chunks,
    plan_shards,
    tensor_chunks,
    write_weight_group,
)
from hlwq.store.staging import staged_key, write_staged

POLAR_CONFIG = "polar_config.json"
POLAR_PARTS = ("codes", "norms", "ct_scaled", "ct")
NIBBLE_MAX_BITS = 4        # polarquant nibble-packs codes of 4 bits or fewer
Q5_BITS = 5                # polarquant's 5-bit packing equals HLWQ's bit stream


def detect_format(directory: str | os.PathLike) -> str:
    """``"hlwq"`` (manifest.json), ``"polarquant"`` (a polar_config.json) or an error."""
    directory = Path(directory)
    if (directory / MANIFEST_NAME).is_file():
        return "hlwq"
    if _polar_configs(directory):
        return "polarquant"
    raise ArtifactError(f"{directory}: neither an HLWQ artifact ({MANIFEST_NAME}) nor a "
                        f"polarquant checkpoint ({POLAR_CONFIG})")


def polar_module_name(tensor_name: str) -> str:
    return tensor_name.removesuffix(".weight")


# ---------------------------------------------------------------- HLWQ -> polarquant


def to_polarquant(artifact_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, verify: bool = True) -> dict:
    """Write ``artifact_dir`` in polarquant's layout (one polar_config.json per directory)."""
    target = Path(out_dir)
    check_output_dir(target)
    artifact = open_artifact(artifact_dir, verify=verify)
    groups = rewritten_groups(artifact)
    for entries in groups.values():
        for entry in entries:
            if entry.quantized and entry.group_size != entry.block_size:
                raise InvalidOptionError(
                    f"tensor {entry.key}: group_size {entry.group_size} < block_size "
                    f"{entry.block_size}; polarquant stores one scale per block, so this "
                    "artifact cannot be converted")
    with directory_transaction(target) as partial:
        files = carry_other_files(artifact, partial, groups)
        layers_by_dir: dict[str, dict] = {}
        for group, entries in sorted(groups.items()):
            group_files, layers = _polar_group(artifact, partial, group, entries, max_shard_bytes)
            files.update(group_files)
            layers_by_dir.setdefault(group[0], {}).update(layers)
        for directory, layers in sorted(layers_by_dir.items()):
            path = partial / directory / POLAR_CONFIG
            path.write_text(json.dumps(_polar_config(layers), indent=2, sort_keys=True) + "\n")
            files[join_path(directory, POLAR_CONFIG)] = file_record(path)
    return {"path": str(target), "files": len(files),
            "quantized_tensors": sum(len(layers) for layers in layers_by_dir.values())}


def _polar_config(layers: dict) -> dict:
    block_sizes = sorted({meta["block_size"] for meta in layers.values()})
    q5 = any(meta.get("packed_q5") for meta in layers.values())
    return {"format": "polar_engine_v5" if q5 else "polar_engine_v4",
            "quantization": "polarengine", "block_size": block_sizes[0],
            "bit_assignment": {}, "layers": dict(sorted(layers.items()))}


def polar_parts(packed: PackedTensor) -> dict[str, torch.Tensor]:
    """``codes``, ``norms``, ``ct_scaled`` in polarquant's encoding of one packed tensor."""
    bits, block = packed.bits, packed.block_size
    if bits == Q5_BITS:
        codes = packed.codes
    else:
        codes = unpack_codes(packed.codes, bits, packed.in_padded)
        codes = _pack_half_block(codes, block) if bits <= NIBBLE_MAX_BITS else codes.view(torch.int8)
    return {"codes": codes, "norms": packed.scales, "ct_scaled": packed.codebook / math.sqrt(block)}


def _pack_half_block(codes: torch.Tensor, block: int) -> torch.Tensor:
    blocks = codes.view(codes.shape[0], -1, block)
    half = block // 2
    return ((blocks[:, :, half:] << 4) | blocks[:, :, :half]).reshape(codes.shape[0], -1)


def _unpack_half_block(packed: torch.Tensor, block: int) -> torch.Tensor:
    blocks = packed.view(packed.shape[0], -1, block // 2)
    return torch.cat([blocks & 0xF, blocks >> 4], dim=2).reshape(packed.shape[0], -1)


def _layer_meta(packed: PackedTensor, dtype: str) -> dict:
    out, in_features = packed.shape
    meta = {"in_features": in_features, "out_features": out, "in_features_padded": packed.in_padded,
            "n_blocks": packed.in_padded // packed.block_size, "bits": packed.bits,
            "block_size": packed.block_size, "packed": packed.bits <= NIBBLE_MAX_BITS,
            "scale_dtype": "float16", "hlwq_mode": packed.mode, "hlwq_dtype": dtype,
            "hlwq_codebook": [float(v) for v in packed.codebook.tolist()]}
    if packed.bits == Q5_BITS:
        meta["packed_q5"] = True
    return meta


def _polar_group(artifact: Artifact, partial: Path, group, entries, max_shard_bytes: int):
    """Write one weight group in polarquant's layout; returns file records and layer metadata."""
    directory, stem = group
    load = functools.lru_cache(maxsize=1)(artifact.load_packed)   # parts are asked for in turn
    specs: dict[str, ShardTensor] = {}
    sources: dict[str, tuple] = {}       # stored name -> ("part", key, part) | ("range", path, a, b)
    units: dict[str, list[str]] = {}     # one unit per tensor: its stored names stay together
    layers = {}
    kept = {f: read_header(artifact.file_path(f)).tensors
            for f in sorted({e.file for e in entries if not e.quantized})}
    for entry in entries:
        if not entry.quantized:
            found = kept[entry.file][entry.name]
            specs[entry.name] = ShardTensor(entry.name, entry.dtype, tuple(entry.shape))
            sources[entry.name] = ("range", artifact.file_path(entry.file), found.start, found.end)
            units[entry.name] = [entry.name]
            continue
        module = polar_module_name(entry.name)
        packed = load(entry.key)
        layers[module] = _layer_meta(packed, entry.dtype)
        units[module] = []
        for part, tensor in polar_parts(packed).items():
            name = f"{module}.{part}"
            specs[name] = ShardTensor(name, _DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))
            sources[name] = ("part", entry.key, part)
            units[module].append(name)

    def source(tensor: ShardTensor):
        how = sources[tensor.name]
        if how[0] == "range":
            return file_range_chunks(*how[1:])
        return tensor_chunks(polar_parts(load(how[1]))[how[2]])

    plan = plan_shards([(unit, sum(specs[n].nbytes for n in names)) for unit, names in units.items()],
                       max_shard_bytes)
    metadata = group_metadata(artifact, entries)
    shards = [[specs[name] for unit in shard_units for name in units[unit]] for shard_units in plan]
    written = write_weight_group(partial / directory, stem, shards, metadata, source)
    files = {join_path(directory, name): {"size": w.size, "sha256": w.sha256}
             for name, w in written.items()}
    return files, layers


_DTYPE_NAMES = {torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16", torch.float32: "F32"}


# ---------------------------------------------------------------- polarquant -> HLWQ


def from_polarquant(polar_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                    source_lineage: dict, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Package a polarquant checkpoint as an HLWQ artifact (codes moved, not requantized).

    ``source_lineage``: the folder's lineage as fetching it gives (its files and hashes)."""
    from hlwq.store.inventory import component_of, has_model_index, layout_of, local_headers

    root = Path(polar_dir)
    check_output_dir(Path(out_dir))
    configs = _polar_configs(root)
    if not configs:
        raise ArtifactError(f"{root}: no {POLAR_CONFIG}; not a polarquant checkpoint")
    headers = local_headers(root)
    layout = layout_of(headers, has_model_index=has_model_index(root), source=root)
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hlwq-convert-staging-", dir=Path(out_dir).parent))
    try:
        rows, staged, settings = [], {}, set()
        for file, header in sorted(headers.items()):
            config = configs.get(str(PurePosixPath(file).parent))
            layers = (config or {}).get("layers", {})
            for name in sorted(header.tensors):
                module, part = _split_part(name, layers)
                if module is None:
                    rows.append(_kept_row(file, header.tensors[name], component_of(layout, file, name)))
                elif part == "codes":
                    row, packed = _polar_layer(root, headers, file, module, layers[module], config)
                    row["component"] = component_of(layout, file, row["tensor"])
                    key = f"{row['component']}/{row['tensor']}"
                    digest = staged_key(sha256_file(root / file), key, "polarquant", packed.bits,
                                        packed.block_size, packed.group_size, packed.mode, "convert")
                    staged[key] = write_staged(staging, digest, row["tensor"], packed)
                    settings.add((packed.bits, packed.block_size, packed.mode))
                    rows.append(row)
        lineage = _polar_lineage(source_lineage, configs)
        bits, blocks, modes = (sorted({s[i] for s in settings}) for i in range(3))
        quantization = {"bits": _one_or_all(bits), "block_size": _one_or_all(blocks),
                        "group_size": _one_or_all(blocks), "mode": _one_or_all(modes),
                        "policy": "polarquant (converted)", "code_version": "converted"}
        summary = package_artifact(root, rows, staged, out_dir, lineage=lineage,
                                   quantization=quantization, layout=layout,
                                   validation={"note": "converted from polarquant; run the gates"},
                                   max_shard_bytes=max_shard_bytes, remove_staged=True,
                                   no_format_comparison="converted from polarquant: the source "
                                                        "weights are not at hand")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _one_or_all(values: list):
    return values[0] if len(values) == 1 else values


def _polar_configs(root: Path) -> dict[str, dict]:
    """polar_config.json files under ``root``, keyed by their directory relative to it."""
    configs = {}
    for path in sorted(root.rglob(POLAR_CONFIG)):
        relative = path.parent.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        try:
            configs[relative.as_posix() if relative.parts else "."] = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    return configs


def _split_part(name: str, layers: dict) -> tuple[str | None, str | None]:
    module, _, part = name.rpartition(".")
    return (module, part) if part in POLAR_PARTS and module in layers else (None, None)


def _kept_row(file: str, entry, component: str) -> dict:
    nbytes = original_nbytes(entry.shape, entry.dtype)
    return {"file": file, "tensor": entry.name, "dtype": entry.dtype, "shape": list(entry.shape),
            "component": component, "action": "keep", "bits": None, "reason": "not quantized "
            "in the polarquant checkpoint", "original_bytes": nbytes, "packed_bytes": nbytes}


def _polar_layer(root: Path, headers: dict, codes_file: str, module: str, meta: dict,
                 config: dict) -> tuple[dict, PackedTensor]:
    """One polarquant layer as an inventory row and the PackedTensor it holds."""
    where = f"{codes_file}: layer {module!r}"
    try:
        bits, out, in_features = meta["bits"], meta["out_features"], meta["in_features"]
        block = meta.get("block_size", config.get("block_size", 128))
    except KeyError as exc:
        raise ArtifactError(f"{where}: {POLAR_CONFIG} lacks {exc}") from None
    directory = PurePosixPath(codes_file).parent
    parts = {}
    for file, header in headers.items():
        if PurePosixPath(file).parent == directory:
            for part in POLAR_PARTS:
                if f"{module}.{part}" in header.tensors:
                    parts[part] = read_tensor(root / file, header.tensors[f"{module}.{part}"])
    if "codes" not in parts or "norms" not in parts or not {"ct", "ct_scaled"} & set(parts):
        raise ArtifactError(f"{where}: needs .codes, .norms and .ct_scaled (or .ct) tensors")
    in_padded = padded_in_features(in_features, block)
    packed = PackedTensor(codes=_hlwq_codes(parts["codes"], meta, bits, block, in_padded, where),
                          scales=_fp16(parts["norms"], where),
                          codebook=_codebook(parts, meta, block), shape=(out, in_features),
                          bits=bits, block_size=block, group_size=block,
                          mode=meta.get("hlwq_mode", "reference"))
    dtype = meta.get("hlwq_dtype", "BF16")
    row = {"file": codes_file, "tensor": f"{module}.weight", "dtype": dtype,
           "shape": [out, in_features], "action": "quantize", "bits": bits,
           "reason": "quantized in the polarquant checkpoint",
           "original_bytes": original_nbytes((out, in_features), dtype),
           "packed_bytes": packed_nbytes((out, in_features), bits, block)}
    return row, packed


def _hlwq_codes(codes: torch.Tensor, meta: dict, bits: int, block: int, in_padded: int,
                where: str) -> torch.Tensor:
    if meta.get("packed_q5"):
        unpacked = None
        result = codes.view(torch.uint8)
    elif meta.get("packed"):
        unpacked = _unpack_half_block(codes.view(torch.uint8), block)
    else:
        unpacked = codes.view(torch.uint8)
    if unpacked is not None:
        if unpacked.shape[1] != in_padded:
            raise ArtifactError(f"{where}: codes hold {unpacked.shape[1]} values per row, "
                                f"expected {in_padded}")
        result = pack_codes(unpacked.contiguous(), bits)
    if tuple(result.shape) != (codes.shape[0], packed_row_bytes(in_padded, bits)):
        raise ArtifactError(f"{where}: codes shape {list(codes.shape)} does not fit {bits}-bit "
                            f"codes of {in_padded} values per row")
    return result.contiguous()


def _fp16(norms: torch.Tensor, where: str) -> torch.Tensor:
    if norms.dtype != torch.float16:
        raise ArtifactError(f"{where}: norms are {norms.dtype}, expected float16")
    return norms.contiguous()


def _codebook(parts: dict, meta: dict, block: int) -> torch.Tensor:
    """The exact HLWQ codebook when it travelled along and still matches, else rebuilt."""
    if "ct" in parts:
        return parts["ct"].float().contiguous()
    scaled = parts["ct_scaled"].float()
    exact = meta.get("hlwq_codebook")
    if exact is not None:
        candidate = torch.tensor(exact, dtype=torch.float32)
        if candidate.shape == scaled.shape and torch.equal(candidate / math.sqrt(block), scaled):
            return candidate
    return (scaled.double() * math.sqrt(block)).float()


def _polar_lineage(source_lineage: dict, configs: dict) -> dict:
    lineage = dict(source_lineage)
    lineage["kind"] = "polarquant"
    config_files = {POLAR_CONFIG if d == "." else f"{d}/{POLAR_CONFIG}" for d in configs}
    lineage["files"] = [f for f in lineage["files"] if f["path"] not in config_files]
    return lineage
