"""The near-lossless control of the output gates: the source with the candidate's tensors at 8 bits.

The output gates (tasks/validate_output.py) judge a candidate by how far its renders drift from
the source's *compared with* how far an 8-bit HLWQ reconstruction of the very same tensors
drifts, rendered in the same run with the same prompts, seeds and settings. This module makes
that control:

- ``control_selection(artifact)``: the tensors the candidate quantized (component, name, file
  and rotation block size), read from its manifest;
- ``apply_control(pipeline, selection)``: the loaded *source* pipeline with each of those
  weights replaced, in memory and in place, by ``dequantize(quantize_tensor(w, 8))`` (HLWQ Q8,
  one fp16 scale per rotation block, the default ``refined`` encoder). Nothing is written
  anywhere: the control never reaches the artifact's shards, only its renders are cached;
- ``control_identity(...)``: what the control's renders are keyed on (the source's
  fingerprint, the selection, the width and the encoder's code version).

The control's format is fixed (8 bits, one scale per block, refined) whatever the candidate's
widths, group sizes or mode: Q5, Q4, a 2-bit test and a ``--target-size`` mix of one source
and policy quantize the same tensors, so they share one control.

``reconstruct_weights`` is the same substitution for any width, used by the benchmarks
(``hlwq bench gates``) to render candidates without packaging them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from hlwq.quant.core import dequantize, quantize_tensor
from hlwq.quant.errors import ArtifactError, InvalidOptionError

CONTROL_BITS = 8
CONTROL_MODE = "refined"
CONTROL_VERSION = 1          # bump when what the control is changes


def control_selection(artifact: str | os.PathLike) -> list[dict]:
    """The tensors the artifact quantized: ``component``, ``name``, ``file``, ``block_size``,
    sorted; what the control re-quantizes at 8 bits."""
    from hlwq.store.artifact import read_manifest

    manifest = read_manifest(Path(artifact))
    selection = [{"component": entry["component"], "name": entry["name"], "file": entry["file"],
                  "block_size": int(entry.get("block_size") or 128)}
                 for entry in manifest["tensors"].values() if entry.get("action") == "quantize"]
    if not selection:
        raise ArtifactError(f"{artifact}: the manifest lists no quantized tensor; there is "
                            "nothing to compare an 8-bit control with")
    return sorted(selection, key=lambda e: (e["component"], e["name"]))


def selection_from_rows(rows: Iterable[Mapping], block_size: int = 128) -> list[dict]:
    """The same selection from inventory rows (``component``, ``tensor``, ``file``, ``action``):
    what an artifact of that inventory would quantize."""
    selection = [{"component": row["component"], "name": row["tensor"], "file": row["file"],
                  "block_size": block_size} for row in rows if row.get("action") == "quantize"]
    return sorted(selection, key=lambda e: (e["component"], e["name"]))


def control_identity(source_fingerprint: str, selection: list[dict]) -> dict:
    """What the control is, as recorded in the results: its width, mode, the number of tensors
    and a hash of the selection; ``fingerprint`` keys its cached renders."""
    from hlwq.store.tensor_jobs import code_version

    chosen = hashlib.sha256(json.dumps([[e["component"], e["name"], e["block_size"]]
                                        for e in selection]).encode()).hexdigest()
    identity = {"bits": CONTROL_BITS, "mode": CONTROL_MODE, "group_size": "block",
                "tensors": len(selection), "selection_sha256": chosen,
                "code_version": code_version(), "version": CONTROL_VERSION}
    fingerprint = hashlib.sha256(json.dumps({**identity, "source": source_fingerprint},
                                            sort_keys=True).encode()).hexdigest()
    return {**identity, "fingerprint": fingerprint}


def control_targets(pipeline, selection: Iterable[Mapping]) -> list[tuple[str, nn.Module, str]]:
    """``(label, module, parameter name)`` of each selected weight in a loaded source pipeline.

    Diffusers-layout names are the component's own (transformers' checkpoint renaming is
    applied as the packed loader does); official single-file names
    (``model.diffusion_model.*``) map to the diffusers components and names.
    """
    from hlwq.runtime.loader import _as_model_names
    from hlwq.store.ltx23_config import official_to_diffusers_key

    by_component: dict[str, dict[str, str]] = {}
    for entry in selection:
        component, name = entry["component"], entry["name"]
        if "/" not in entry.get("file", "/"):          # a tensor of the official single file
            try:
                component, name = official_to_diffusers_key(name)
            except InvalidOptionError:
                pass
        by_component.setdefault(component, {})[name] = f"{entry['component']}/{entry['name']}"
    targets = []
    for component, names in sorted(by_component.items()):
        module = getattr(pipeline, component, None)
        if not isinstance(module, nn.Module):
            raise ArtifactError(f"the candidate quantized tensors of component {component!r}, "
                                "which the source pipeline does not have")
        renamed = _as_model_names(module, names)
        for name, label in sorted(renamed.items()):
            try:
                module.get_parameter(name)
            except AttributeError:
                raise ArtifactError(f"tensor {label}: quantized by the candidate, but the source's "
                                    f"{component} has no parameter {name!r}") from None
            targets.append((label, module, name))
    return targets


@torch.no_grad()
def reconstruct_weights(targets: Iterable[tuple[str, nn.Module, str]], bits: int,
                        block_size: int | Mapping[str, int] = 128, group_size: int | None = None,
                        mode: str = CONTROL_MODE, keep: dict | None = None) -> int:
    """Set each target weight to its HLWQ reconstruction at ``bits``, in place (on its device,
    in its dtype); the encoder runs on the CPU from the weight's float32 copy. ``keep``, when
    given, receives the original weights (bfloat16 copies, exact for BF16 sources) by label
    for ``restore_weights``. Returns how many weights were set."""
    count = 0
    for label, module, name in targets:
        parameter = module.get_parameter(name)
        block = block_size[label] if isinstance(block_size, Mapping) else block_size
        original = parameter.detach().float().cpu()
        if keep is not None and label not in keep:
            keep[label] = (module, name, parameter.detach().to(torch.bfloat16, copy=True))
        rebuilt = dequantize(quantize_tensor(original, bits, block, mode, group_size, name=label))
        parameter.copy_(rebuilt.to(device=parameter.device, dtype=parameter.dtype))
        count += 1
    return count


@torch.no_grad()
def restore_weights(keep: dict) -> None:
    """Put back the weights ``reconstruct_weights(..., keep=)`` saved."""
    for module, name, original in keep.values():
        parameter = module.get_parameter(name)
        parameter.copy_(original.to(device=parameter.device, dtype=parameter.dtype))


def apply_control(pipeline, selection: list[dict]) -> int:
    """Turn a loaded source pipeline into the control, in place; returns the tensors replaced."""
    targets = control_targets(pipeline, selection)
    blocks = {f"{e['component']}/{e['name']}": e["block_size"] for e in selection}
    return reconstruct_weights(targets, CONTROL_BITS, blocks, None, CONTROL_MODE)
