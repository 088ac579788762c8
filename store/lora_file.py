"""LoRA files: safetensors only, named the diffusers/PEFT way or the official LTX-2 / ComfyUI way.

One module's low-rank update is a pair ``A`` (rank x in) and ``B`` (out x rank) under one of

- diffusers / PEFT:  ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` (``connectors.``
  for the text side), ``<module>`` a diffusers module path;
- LTX-2 / ComfyUI:   ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` or
  ``.lora_down.weight`` / ``.lora_up.weight``, ``<module>`` an official LTX-2 name
  (``text_embedding_projection.<module>`` for the connectors' projections);

plus an optional scalar ``<prefix>.<module>.alpha``: that update is ``alpha / rank * B @ A``
(kohya's convention). The factor is folded into ``B`` on reading, so every LoRA leaves here as
diffusers' own format: ``{component: {"<module>.lora_A.weight": A, "<module>.lora_B.weight": B}}``
with diffusers module names and an implied scale of 1.

Pickled files (``.bin`` / ``.pt`` / ``.ckpt``) are refused, never opened with torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hlwq.quant.errors import CorruptCheckpointError, InvalidOptionError, LoraError
from hlwq.store.hash_cache import size_and_sha256
from hlwq.store.ltx23_config import TRANSFORMER_PREFIX, official_to_diffusers_key
from hlwq.store.safetensors_io import read_header, read_tensor

# Where a key says its factor lives; down/up are kohya's names for A/B.
PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A",
         ".lora_up.weight": "B", ".alpha": "alpha"}
DIFFUSERS_PREFIXES = ("transformer.", "connectors.")
OFFICIAL_PREFIXES = ("diffusion_model.", "text_embedding_projection.")
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")   # torch.save's zip archive; a bare pickle stream
WEIGHT = ".weight"


@dataclass(frozen=True)
class LoraTarget:
    """One module's update as named in the file."""

    component: str
    module: str                 # diffusers name
    a_key: str
    b_key: str
    alpha_key: str | None
    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str
    targets: tuple[LoraTarget, ...]


def inspect_lora_file(path: str | os.PathLike) -> LoraFile:
    """Check a LoRA file from its header alone: safetensors, known key names, consistent shapes."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    header = _safetensors_header(path)
    shapes = {name: entry.shape for name, entry in header.tensors.items()}
    return LoraFile(path, size_and_sha256(path)[1], plan_targets(shapes, str(path)))


def read_lora_file(path: str | os.PathLike) -> tuple[LoraFile, dict[str, dict[str, torch.Tensor]]]:
    """The file's checks, then its tensors in diffusers' format, by component (see the module doc)."""
    lora = inspect_lora_file(path)
    header = read_header(lora.path)
    tensors = {name: read_tensor(lora.path, entry) for name, entry in header.tensors.items()}
    return lora, to_diffusers_format(tensors, lora.targets, str(lora.path))


def normalize_state_dict(state_dict: dict[str, torch.Tensor],
                         source: str = "LoRA state dict") -> dict[str, dict[str, torch.Tensor]]:
    """An in-memory LoRA state dict (any accepted naming) in diffusers' format, by component."""
    shapes = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}
    return to_diffusers_format(state_dict, plan_targets(shapes, source), source)


def plan_targets(shapes: dict[str, tuple[int, ...]], source: str) -> tuple[LoraTarget, ...]:
    """Group keys into per-module (A, B, alpha) and check ranks and shapes agree."""
    if not shapes:
        raise LoraError(f"{source}: holds no tensors")
    parts: dict[tuple[str, str], dict[str, str]] = {}
    for key in shapes:
        component, module, part = _parse_key(key, source)
        found = parts.setdefault((component, module), {})
        if part in found:
            raise LoraError(f"{source}: key {key!r} repeats {found[part]!r} (the same {part} of "
                            f"{component} module {module!r} under two names)")
        found[part] = key
    return tuple(_target(component, module, found, shapes, source)
                 for (component, module), found in parts.items())


def to_diffusers_format(tensors: dict[str, torch.Tensor], targets: tuple[LoraTarget, ...],
                        source: str) -> dict[str, dict[str, torch.Tensor]]:
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for target in targets:
        a, b = tensors[target.a_key], tensors[target.b_key]
        for key, tensor in ((target.a_key, a), (target.b_key, b)):
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise LoraError(f"{source}: tensor {key!r} must hold finite floats "
                                f"({tensor.dtype}{'' if tensor.is_floating_point() else ', not a float'})")
        if target.alpha_key is not None:
            b = (b.float() * (_alpha(tensors[target.alpha_key], target, source) / target.rank)
                 ).to(b.dtype)
        weights = by_component.setdefault(target.component, {})
        weights[f"{target.module}.lora_A.weight"] = a
        weights[f"{target.module}.lora_B.weight"] = b
    return by_component


# ---------------------------------------------------------------- key names


def _safetensors_header(path: Path):
    try:
        return read_header(path)
    except CorruptCheckpointError:
        with open(path, "rb") as handle:
            start = handle.read(4)
        if start.startswith(PICKLE_MAGIC):
            raise LoraError(f"LoRA file {path}: a pickled PyTorch file, which is never loaded "
                            "(it can run code); convert it to .safetensors") from None
        raise


def _parse_key(key: str, source: str) -> tuple[str, str, str]:
    """``(component, diffusers module name, part)`` of one key."""
    part_suffix = next((s for s in PARTS if key.endswith(s)), None)
    if part_suffix is None:
        raise LoraError(f"{source}: key {key!r} is not a LoRA tensor (expected <module>.lora_A"
                        ".weight / .lora_B.weight, .lora_down.weight / .lora_up.weight or .alpha)")
    stem = key[:-len(part_suffix)]
    if stem.startswith(DIFFUSERS_PREFIXES):
        component, _, module = stem.partition(".")
    elif stem.startswith(OFFICIAL_PREFIXES):
        official = "model." + stem if stem.startswith("diffusion_model.") else stem
        try:   # the renames are written for tensor names: map the module's weight
            component, weight = official_to_diffusers_key(official + WEIGHT)
        except InvalidOptionError:
            raise LoraError(f"{source}: key {key!r}: not an LTX-2 module name") from None
        module = weight.removesuffix(WEIGHT)
    elif stem.startswith("text_encoder."):
        raise LoraError(f"{source}: key {key!r}: diffusers' LTX-2 pipelines take LoRAs for the "
                        "transformer and the connectors (the text side) only, not the text encoder")
    else:
        raise LoraError(f"{source}: key {key!r} names no known model (expected a prefix among "
                        f"{', '.join(DIFFUSERS_PREFIXES + OFFICIAL_PREFIXES)})")
    if not module:
        raise LoraError(f"{source}: key {key!r} names no module")
    return component, module, PARTS[part_suffix]


def _target(component: str, module: str, found: dict[str, str],
            shapes: dict[str, tuple[int, ...]], source: str) -> LoraTarget:
    for part in ("A", "B"):
        if part not in found:
            other = found.get("B" if part == "A" else "A") or found["alpha"]
            raise LoraError(f"{source}: key {other!r} has no matching lora_{part} "
                            f"(lora_{'down' if part == 'A' else 'up'}) tensor")
    a_shape, b_shape = shapes[found["A"]], shapes[found["B"]]
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] == 0:
        raise LoraError(f"{source}: keys {found['A']!r} {list(a_shape)} and {found['B']!r} "
                        f"{list(b_shape)} are not a rank-r pair (A: r x in, B: out x r)")
    alpha_key = found.get("alpha")
    if alpha_key is not None and math.prod(shapes[alpha_key]) != 1:
        raise LoraError(f"{source}: key {alpha_key!r} has shape {list(shapes[alpha_key])}; "
                        "alpha is one number")
    return LoraTarget(component, module, found["A"], found["B"], alpha_key, a_shape[0],
                      a_shape[1], b_shape[0])


def _alpha(tensor: torch.Tensor, target: LoraTarget, source: str) -> float:
    value = float(tensor.reshape(()))
    if not math.isfinite(value) or value <= 0:
        raise LoraError(f"{source}: key {target.alpha_key!r} is {value}; alpha must be a finite "
                        "number > 0")
    return value


def official_module_name(component: str, module: str) -> str:
    """A diffusers module's name in official LTX-2 LoRA files (the inverse, for writers)."""
    from hlwq.store.ltx23_config import diffusers_to_official_key

    name = diffusers_to_official_key(component, module + WEIGHT).removesuffix(WEIGHT)
    return name.removeprefix("model.") if name.startswith(TRANSFORMER_PREFIX) else name
