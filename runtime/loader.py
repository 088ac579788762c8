"""load_pipeline: an LTX-2.3 diffusers pipeline straight from an HLWQ artifact.

Every component that holds quantized tensors (the transformer under the
``ltx23`` policy; also the connectors and the Gemma 3 text encoder under
``ltx23-full``) is built on the meta device from its config, its quantized
linears are replaced by :class:`PackedLinear` and the artifact's tensors are
assigned as they are: the packed parts untouched, kept tensors cast to the
compute dtype. No full-precision copy of a quantized weight ever exists.
The other components load with ``from_pretrained`` from the artifact's folders.

Two artifact layouts (docs/FORMAT.md): a diffusers folder, and the official
single file, whose ``model.diffusion_model.*`` / ``vae.*`` / ... names map to
diffusers names with :mod:`hlwq.store.ltx23_config` and whose components are all
built from the file's ``config`` metadata (or, for Lightricks' own files, the
real LTX-2.3 configs); ``text_encoder/`` (packed or not), ``tokenizer/`` and
``scheduler/`` sit beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from hlwq.quant.errors import ArtifactError, InvalidOptionError
from hlwq.runtime.hub import resolve_artifact
from hlwq.runtime.ltx23_models import (
    CONFIG_METADATA_KEY,
    assemble_single_file_pipeline,
    build_model,
    model_class,
)
from hlwq.runtime.memory_plan import RenderShape, artifact_peaks
from hlwq.runtime.offload import apply_offload
from hlwq.runtime.packed_linear import PACKED_BUFFERS, PackedLinear
from hlwq.store.artifact import Artifact, TensorRecord, open_artifact
from hlwq.store.ltx23_config import (
    PIPELINE_CLASSES,
    SINGLE_FILE_COMPONENTS,
    TRANSFORMER_PREFIX,
    official_to_diffusers_key,
    real_config,
)

WEIGHT_SUFFIX = ".weight"


def load_pipeline(artifact: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, offload: str = "auto", verify: bool = True,
                  image_to_video: bool = False, vae_tiling: bool = False,
                  render_shapes: Sequence[RenderShape] | None = None):
    """``LTX2Pipeline`` (or ``LTX2ImageToVideoPipeline``) whose quantized linears stay packed.

    ``artifact``: a folder, or a Hub repo ``owner/name[@revision]`` whose manifest's files
    are downloaded into the Hub cache (runtime/hub.py).
    The pipeline takes LoRAs through diffusers' own API (``load_lora_weights`` and the rest,
    runtime/lora.py) without unpacking a layer.
    ``verify`` checks the manifest, every file's hash and every tensor entry first.
    ``offload`` (runtime/offload.py: none, model, sequential, group or auto) decides which
    weights stay on ``device`` while it renders; ``vae_tiling`` decodes the video in tiles.
    ``auto`` picks, on CUDA, the fastest mode whose peak the memory plan predicts for this
    artifact and ``render_shapes`` (default: 768x512, 121 frames, with guidance) fits the free
    memory; on the CPU it is ``none``. ``pipeline.offload_mode`` says which mode was applied.
    A manifest that does not match the model config raises ArtifactError naming the tensor.
    """
    art = open_artifact(resolve_artifact(artifact, verify=False), verify=verify)  # hashed once
    pipeline_class = _pipeline_class(image_to_video)
    if _uses_official_names(art):
        pipeline = _single_file_pipeline(art, dtype, pipeline_class)
    else:
        _check_components(art.path)
        packed = {c: _packed_component(art, c, dtype) for c in _quantized_components(art)}
        try:
            pipeline = pipeline_class.from_pretrained(art.path, torch_dtype=dtype,
                                                       use_safetensors=True, **packed)
        except (ValueError, OSError) as exc:   # diffusers' words for a part it cannot find
            reason = " ".join(str(exc).split())[:300]
            raise ArtifactError(f"{art.path}: not a whole {pipeline_class.__name__} "
                                f"({reason})") from None
    peaks = _auto_peaks(art, offload, device, dtype, vae_tiling, render_shapes)
    pipeline.offload_mode = apply_offload(pipeline, offload, device, peaks)
    if vae_tiling:
        pipeline.vae.enable_tiling()
    return pipeline


def _auto_peaks(art: Artifact, offload: str, device, dtype: torch.dtype, vae_tiling: bool,
                render_shapes: Sequence[RenderShape] | None) -> dict[str, int] | None:
    """The plan's peak per mode for the renders to come, where ``auto`` has to choose."""
    if offload != "auto" or torch.device(device).type != "cuda":
        return None
    shapes = [replace(shape, vae_tiling=vae_tiling, dtype_bytes=dtype.itemsize)
              for shape in (render_shapes or (RenderShape(),))]
    return artifact_peaks(art.path, shapes)


def load_component(artifact: str | os.PathLike, component: str = "transformer",
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   verify: bool = True) -> nn.Module:
    """One model of the artifact (a folder or a Hub repo id, by default the transformer) with
    its quantized linears packed."""
    art = open_artifact(resolve_artifact(artifact, verify=False), verify=verify)
    return _packed_component(art, component, dtype).to(device)


def _check_components(root: Path) -> None:
    """Every component model_index.json names has its folder (diffusers would fail deep inside)."""
    index_path = root / "model_index.json"
    if not index_path.is_file():
        return      # _packed_component names that
    index = json.loads(index_path.read_text())
    missing = [name for name, spec in sorted(index.items())
               if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None
               and not (root / name).is_dir()]
    if missing:
        raise ArtifactError(f"{root}: component(s) {', '.join(missing)} named in "
                            "model_index.json have no folder")


def _pipeline_class(image_to_video: bool):
    from hlwq.runtime.lora import PackedLTX2ImageToVideoPipeline, PackedLTX2Pipeline

    return PackedLTX2ImageToVideoPipeline if image_to_video else PackedLTX2Pipeline


def _uses_official_names(art: Artifact) -> bool:
    return any(e.name.startswith(TRANSFORMER_PREFIX) for e in art.tensor_entries.values())


def _quantized_components(art: Artifact) -> list[str]:
    return sorted({e.component for e in art.tensor_entries.values() if e.quantized})


# ---------------------------------------------------------------- layouts


def _packed_component(art: Artifact, component: str, dtype: torch.dtype) -> nn.Module:
    """Built on the meta device from its config, then filled from the artifact's entries."""
    official = _uses_official_names(art)
    if official and component in SINGLE_FILE_COMPONENTS:
        entries = _official_entries(art)
        config = _single_file_configs(art, entries["transformer"])[component]
        model = _meta_model(lambda: build_model(component, config))
        return load_packed_model(model, art, entries[component], dtype, component)
    entries = art.component_entries(component)
    if not entries:
        raise ArtifactError(f"{art.path}: no tensor of component {component!r} in the manifest")
    model = _empty_component(art.path / component, component,
                             _library_class(art, component, official))
    return load_packed_model(model, art, _as_model_names(model, entries), dtype, component)


def _library_class(art: Artifact, component: str, official: bool):
    """[library, class] of a component folder: model_index.json's entry, or for the folders
    beside an official single file (text_encoder/) the LTX-2.3 pipeline's own class."""
    if official:
        if component not in PIPELINE_CLASSES:
            raise ArtifactError(f"{art.path}: component {component!r} is neither in the single "
                                f"file ({', '.join(SINGLE_FILE_COMPONENTS)}) nor a pipeline "
                                f"folder ({', '.join(sorted(PIPELINE_CLASSES))})")
        return list(PIPELINE_CLASSES[component])
    index_path = art.path / "model_index.json"
    if not index_path.is_file():
        raise ArtifactError(f"{art.path}: no model_index.json; a diffusers-layout artifact needs one")
    return json.loads(index_path.read_text()).get(component)


def _single_file_pipeline(art: Artifact, dtype: torch.dtype, pipeline_class):
    models = {c: _packed_component(art, c, dtype) for c in SINGLE_FILE_COMPONENTS}
    if "text_encoder" in _quantized_components(art):
        models["text_encoder"] = _packed_component(art, "text_encoder", dtype)
    return assemble_single_file_pipeline(pipeline_class, art.path, models, dtype)


def _official_entries(art: Artifact) -> dict[str, dict[str, TensorRecord]]:
    """Single-file entries by component, keyed by their diffusers names."""
    by_component: dict[str, dict[str, TensorRecord]] = {c: {} for c in SINGLE_FILE_COMPONENTS}
    for entry in art.tensor_entries.values():
        if "/" in entry.file:      # text_encoder/ and the like load with from_pretrained
            continue
        try:
            component, name = official_to_diffusers_key(entry.name)
        except InvalidOptionError:  # side files at the root, e.g. the latent upscaler
            continue
        by_component[component][name] = entry
    return by_component


def _single_file_configs(art: Artifact, transformer_entries: dict[str, TensorRecord]) -> dict:
    """Per-component diffusers configs from the file's metadata; the real LTX-2.3 ones otherwise."""
    from safetensors import safe_open

    if not transformer_entries:
        raise ArtifactError(f"{art.path}: the single file holds no transformer tensors")
    shard = art.file_path(next(iter(transformer_entries.values())).file)
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        stored = json.loads(metadata.get(CONFIG_METADATA_KEY, "{}"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{shard}: metadata {CONFIG_METADATA_KEY!r} is not JSON ({exc})") from None
    configs = {}
    for component in SINGLE_FILE_COMPONENTS:
        config = stored.get(component) if isinstance(stored, dict) else None
        if not (isinstance(config, dict) and "_class_name" in config):
            config = real_config(component)     # Lightricks' files carry ltx-core configs
        configs[component] = {k: v for k, v in config.items() if not k.startswith("_")}
    return configs


def _empty_component(folder: Path, component: str, library_class) -> nn.Module:
    """A component built on the meta device from ``folder``'s config (nothing allocated)."""
    if not (isinstance(library_class, list) and len(library_class) == 2):
        raise ArtifactError(f"model_index.json: component {component!r} holds quantized tensors "
                            "but has no [library, class] entry")
    library, name = library_class
    if library == "transformers":
        import transformers

        cls = getattr(transformers, name)
        config = transformers.AutoConfig.from_pretrained(folder)
        return _meta_model(lambda: cls(config))
    import diffusers

    cls = getattr(diffusers, name, None) or model_class(component)
    return _meta_model(lambda: cls.from_config(cls.load_config(folder)))


def _meta_model(build) -> nn.Module:
    """Parameters on the meta device; buffers computed at init (e.g. STFT bases) stay real."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build().eval()


def _as_model_names(model: nn.Module, entries: dict[str, TensorRecord]) -> dict[str, TensorRecord]:
    """Entries keyed by the model's own tensor names. transformers renames checkpoint keys
    when it loads (Gemma 3's published ``language_model.model.*`` is the module
    ``model.language_model.*``); the same renaming applies here."""
    expected = model.state_dict(keep_vars=True)
    if all(name in expected for name in entries):
        return entries
    rename = _checkpoint_renamer(model, expected)
    return {rename(name): entry for name, entry in entries.items()}


def _checkpoint_renamer(model: nn.Module, expected: dict):
    try:    # transformers >= 5
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:     # transformers 4: one {regex: replacement} table, first match wins
        import re

        table = getattr(model, "_checkpoint_conversion_mapping", None) or {}

        def rename_v4(name: str) -> str:
            for pattern, replacement in table.items():
                renamed, count = re.subn(pattern, replacement, name)
                if count:
                    return renamed
            return name
        return rename_v4
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    prefix = getattr(model, "base_model_prefix", None)
    return lambda name: rename_source_key(name, renamings, [], prefix, expected)[0]


def _tied_aliases(model: nn.Module, state: dict) -> dict[str, str]:
    """Tied tensors the checkpoint stores once (Gemma's lm_head is its token embedding):
    {alias: stored name} for each alias the state lacks."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(tied, dict):
        return {}
    return {alias: source for alias, source in tied.items()
            if alias not in state and source in state}


# ---------------------------------------------------------------- assembly


def load_packed_model(model: nn.Module, art: Artifact, entries: dict[str, TensorRecord],
                      dtype: torch.dtype, component: str) -> nn.Module:
    """Swap quantized linears for PackedLinear and assign every tensor from the artifact.

    ``entries`` maps the model's own tensor names to manifest entries. Raises
    ArtifactError naming the tensor when an entry does not fit the model (no
    such linear, wrong shape) or a model tensor has no entry.
    """
    state: dict[str, torch.Tensor | TensorRecord] = {}
    for name, entry in entries.items():
        if entry.quantized:
            state.update(_swap_in_packed(model, art, name, entry, component))
        else:
            state[name] = entry
    expected = model.state_dict(keep_vars=True)
    aliases = _tied_aliases(model, state)
    _check_coverage(set(expected), set(state) | set(aliases), component)
    for name, value in state.items():
        if isinstance(value, TensorRecord):
            _check_shape(value, name, value.shape, expected[name].shape)
            state[name] = _compute_dtype(art.load_kept(value.key), dtype)
    state.update({alias: state[source] for alias, source in aliases.items()})
    model.load_state_dict(state, strict=True, assign=True)
    if aliases:
        model.tie_weights()     # one parameter again, so moving the model moves it once
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def _swap_in_packed(model: nn.Module, art: Artifact, name: str, entry: TensorRecord,
                    component: str) -> dict[str, torch.Tensor]:
    """Replace the (meta) linear owning ``name`` by a PackedLinear; return its packed state."""
    module_name = _quantized_module_name(model, name, entry, component)
    linear = model.get_submodule(module_name)
    _check_shape(entry, name, entry.shape, linear.weight.shape)
    packed = art.load_packed(entry.key)
    model.set_submodule(module_name, PackedLinear(
        linear.in_features, linear.out_features, bits=packed.bits, block_size=packed.block_size,
        group_size=packed.group_size, mode=packed.mode, bias=linear.bias is not None,
        device="meta"))
    return {f"{module_name}.{part}": getattr(packed, part) for part in PACKED_BUFFERS}


def _check_coverage(expected: set[str], found: set[str], component: str) -> None:
    missing, unknown = sorted(expected - found), sorted(found - expected)
    if missing:
        raise ArtifactError(f"component {component!r}: tensor {missing[0]!r} of the model config "
                            f"has no entry in the manifest ({len(missing)} missing)")
    if unknown:
        raise ArtifactError(f"component {component!r}: manifest tensor {unknown[0]!r} is not a "
                            "tensor of the model config")


def _quantized_module_name(model: nn.Module, name: str, entry: TensorRecord, component: str) -> str:
    module_name = name[:-len(WEIGHT_SUFFIX)] if name.endswith(WEIGHT_SUFFIX) else None
    try:
        module = model.get_submodule(module_name) if module_name else None
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise ArtifactError(f"tensor {entry.key}: quantized in the manifest, but {name!r} is not "
                            f"the weight of a linear layer of {component!r}")
    return module_name


def _check_shape(entry: TensorRecord, name: str, found, expected) -> None:
    if tuple(found) != tuple(expected):
        raise ArtifactError(f"tensor {entry.key}: shape {list(found)} in the manifest, the model "
                            f"config needs {list(expected)} for {name!r}")


def _compute_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor
