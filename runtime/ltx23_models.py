"""LTX-2.3 models: built from their configs, the real package's tensor list, the official single file.

``ltx23_22b_package_rows()`` lists every tensor of the LTX-2.3 package (component, diffusers
tensor name, shape, dtype) from models built on the meta device with the real configs of
:mod:`hlwq.store.ltx23_config`; nothing is downloaded or allocated. Counts it yields:

=================  =======  ================
component          tensors  parameters
=================  =======  ================
transformer          4,186  18,988,838,144
connectors             262   3,172,227,584
vae                    170     726,106,225
audio_vae              102      53,248,402
vocoder              1,227     129,085,032
latent_upsampler        72     497,867,904
text_encoder         1,065  12,187,325,040
=================  =======  ================

The transformer has no ``caption_projection`` in LTX-2.3 (``use_prompt_embeddings=False``:
the text projections moved into the connectors), which is why it holds 8 tensors and 45M
parameters fewer than a model built with diffusers' defaults (4,194 / 19.03B).
Every tensor is listed as BF16, the dtype of the published weights. The text encoder's tied
``lm_head.weight`` is listed once, as ``model.language_model.embed_tokens.weight``.

The official single-file layout (one ``.safetensors``, component prefixes ``model.diffusion_model.``
(transformer and the two embeddings connectors), ``text_embedding_projection.`` (the
connectors' input projections), ``vae.``, ``audio_vae.``, ``vocoder.``; the model config as JSON
in the metadata key ``config``) is written by :func:`save_single_file` and read back by
:func:`load_single_file`. diffusers 0.42.1's ``from_single_file`` cannot read LTX-2.3 files: its
converters lack the 2.3 renames (``prompt_adaln_single``, decoder ``up_blocks.7/8``) and the
vocoder and connectors, so this module maps names itself (``hlwq.store.ltx23_config``).

Our ``config`` metadata holds one object per component, each the diffusers config of that
component plus ``_class_name``; Lightricks' own files hold ltx-core's config there instead.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from hlwq.quant.errors import CorruptCheckpointError, SourceError
from hlwq.store.atomic import atomic_path
from hlwq.store.ltx23_config import (
    PIPELINE_CLASSES,
    SINGLE_FILE_COMPONENTS,
    UPSAMPLER_CLASS,
    diffusers_to_official_key,
    official_to_diffusers_key,
    real_config,
)

PACKAGE_COMPONENTS = ("transformer", "connectors", "vae", "audio_vae", "vocoder",
                      "latent_upsampler", "text_encoder")
SINGLE_FILE_GLOB = "ltx-2.3*.safetensors"
UPSAMPLER_FILE_MARK = "upscaler"
CONFIG_METADATA_KEY = "config"


def model_class(component: str):
    """The diffusers/transformers class of a component (imported on first use)."""
    classes = {**PIPELINE_CLASSES, "latent_upsampler": UPSAMPLER_CLASS}
    library, name = classes[component]
    if library == "transformers":
        import transformers
        return getattr(transformers, name)
    import diffusers
    from diffusers.pipelines import ltx2
    return getattr(diffusers, name, None) or getattr(ltx2, name)


def build_model(component: str, config: dict[str, Any], device: str | torch.device = "cpu"):
    """Instantiate one component from its config (on ``device``; "meta" allocates nothing)."""
    cls = model_class(component)
    with torch.device(device) if str(device) != "cpu" else contextlib.nullcontext():
        if component == "text_encoder":
            from transformers import Gemma3Config
            return cls(Gemma3Config(**config))
        return cls.from_config(config)


def checkpoint_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors a checkpoint of ``model`` stores: its state dict with tied tensors once."""
    seen: set[int] = set()
    tensors = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append((name, tensor))
    return tensors


def ltx23_22b_package_rows(components: Iterable[str] = PACKAGE_COMPONENTS) -> list[dict]:
    """One row per tensor of the real LTX-2.3 package: component, tensor, shape, dtype."""
    rows = []
    for component in components:
        model = build_model(component, real_config(component), device="meta")
        rows += [{"component": component, "tensor": name, "shape": tuple(tensor.shape),
                  "dtype": "BF16"} for name, tensor in checkpoint_tensors(model)]
    return rows


# --------------------------------------------------------------------------- single file

def _config_of(model) -> dict[str, Any]:
    return {"_class_name": type(model).__name__, **dict(model.config)}


def _save_with_config(path, tensors: dict, config: dict, model_version: str) -> Path:
    from safetensors.torch import save_file

    metadata = {CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True),
                "model_version": model_version}
    with atomic_path(path) as tmp:
        save_file({name: t.detach().contiguous() for name, t in tensors.items()}, tmp,
                  metadata=metadata)
    return Path(path)


def save_single_file(path: str | os.PathLike, models: dict[str, torch.nn.Module],
                     model_version: str) -> Path:
    """Write transformer, connectors, VAEs and vocoder as one official-layout file (atomic)."""
    tensors = {diffusers_to_official_key(component, name): tensor
               for component in SINGLE_FILE_COMPONENTS
               for name, tensor in checkpoint_tensors(models[component])}
    configs = {component: _config_of(models[component]) for component in SINGLE_FILE_COMPONENTS}
    return _save_with_config(path, tensors, configs, model_version)


def save_component_file(path: str | os.PathLike, model: torch.nn.Module,
                        model_version: str) -> Path:
    """Write one model (e.g. the latent upsampler) as a file with its config in the metadata."""
    return _save_with_config(path, dict(checkpoint_tensors(model)), _config_of(model),
                             model_version)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CorruptCheckpointError(f"{path}: cannot read as safetensors ({exc})") from exc
    if CONFIG_METADATA_KEY not in metadata:
        raise CorruptCheckpointError(f"{path}: no {CONFIG_METADATA_KEY!r} key in the metadata")
    try:
        return tensors, json.loads(metadata[CONFIG_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(f"{path}: metadata {CONFIG_METADATA_KEY!r} is not JSON "
                                     f"({exc})") from exc


def split_official_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Group official single-file tensors by component, under their diffusers names."""
    grouped: dict[str, dict] = {c: {} for c in SINGLE_FILE_COMPONENTS}
    for name, tensor in tensors.items():
        component, diffusers_name = official_to_diffusers_key(name)
        grouped[component][diffusers_name] = tensor
    return grouped


def _load_strict(component: str, config: dict[str, Any], state_dict: dict, path: Path,
                 dtype: torch.dtype):
    from accelerate import init_empty_weights

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights():  # parameters on meta; buffers computed at init stay real
        model = build_model(component, config)
    state_dict = {name: tensor.to(dtype) for name, tensor in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise CorruptCheckpointError(f"{path}: component {component!r} does not match its "
                                     f"config: {exc}") from exc
    return model.eval()


def load_single_file(path: str | os.PathLike,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """Read an official-layout file into diffusers models (transformer, connectors, ...)."""
    path = Path(path)
    tensors, configs = _read_file(path)
    grouped = split_official_state_dict(tensors)
    missing = [c for c in SINGLE_FILE_COMPONENTS if c not in configs]
    if missing:
        raise CorruptCheckpointError(f"{path}: metadata config lacks components {missing}")
    return {c: _load_strict(c, configs[c], grouped[c], path, dtype)
            for c in SINGLE_FILE_COMPONENTS}


def find_single_file(directory: Path, upsampler: bool = False) -> Path | None:
    """The ltx-2.3 single file (or, with ``upsampler``, the upscaler file) of a folder."""
    files = [p for p in sorted(directory.glob(SINGLE_FILE_GLOB))
             if (UPSAMPLER_FILE_MARK in p.name) == upsampler]
    return files[0] if files else None


def load_ltx23_pipeline(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        transformer=None):
    """Load an LTX2Pipeline from a diffusers folder or from our single-file folder.

    The single-file folder holds the official-layout file plus ``text_encoder/``,
    ``tokenizer/`` and ``scheduler/`` (the parts the official file does not carry).
    ``dtype`` is the compute dtype of every component (the files hold BF16; without one
    dtype, transformers would keep Gemma in BF16 while diffusers upcasts to float32).
    ``transformer`` replaces the folder's (diffusers folders only): e.g. one on the meta
    device, to run everything up to the transformer's first call without its weights.
    """
    from diffusers import LTX2Pipeline

    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path}: not a directory (expected a diffusers folder or a folder "
                          "holding an ltx-2.3 single file)")
    if (path / "model_index.json").is_file():
        given = {} if transformer is None else {"transformer": transformer}
        return LTX2Pipeline.from_pretrained(path, dtype=dtype, use_safetensors=True, **given)
    single = find_single_file(path)
    if single is None:
        raise SourceError(f"{path}: neither model_index.json nor a {SINGLE_FILE_GLOB} file")
    return assemble_single_file_pipeline(LTX2Pipeline, path, load_single_file(single, dtype), dtype)


def assemble_single_file_pipeline(pipeline_class, folder: Path, models: dict, dtype: torch.dtype):
    """A pipeline from a single-file folder: ``models`` (the components the official file holds,
    and the text encoder when it is already built, e.g. packed) plus the scheduler, Gemma text
    encoder and tokenizer from their own subfolders."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    if "text_encoder" not in models:
        models = {**models, "text_encoder": Gemma3ForConditionalGeneration.from_pretrained(
            folder / "text_encoder", dtype=dtype, use_safetensors=True)}
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        **models,
    )


def load_latent_upsampler(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The spatial latent upsampler of a diffusers folder or of a single-file folder."""
    from diffusers.pipelines.ltx2 import LTX2LatentUpsamplerModel

    path = Path(path)
    if (path / "latent_upsampler").is_dir():
        return LTX2LatentUpsamplerModel.from_pretrained(path / "latent_upsampler", dtype=dtype,
                                                        use_safetensors=True)
    found = find_single_file(path, upsampler=True)
    if found is None:
        raise SourceError(f"{path}: no latent_upsampler/ folder and no "
                          f"*{UPSAMPLER_FILE_MARK}* file")
    tensors, config = _read_file(found)
    return _load_strict("latent_upsampler", config, tensors, found, dtype)
