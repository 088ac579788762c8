"""LoRA on packed models without unpacking them: ``y = PackedLinear(x) + scale * B(A(x))``.

diffusers' LoRA API (``load_lora_weights``, ``set_adapters``, ``disable_lora`` / ``enable_lora``,
``delete_adapters``, ``unload_lora_weights``) runs on PEFT's LoRA layers. PEFT has no layer for
a :class:`PackedLinear`; its documented hook for custom layers is a mapping registered on the
``LoraConfig`` (``_register_custom_module``), and diffusers builds that config inside
``load_lora_adapter``. So :func:`load_lora_into_model` does what ``load_lora_adapter`` does
(ranks from the file, diffusers' ``get_peft_kwargs``, ``inject_adapter_in_model``,
``set_peft_model_state_dict``) with :class:`PackedLoraLinear` registered for PackedLinear; every
other step is diffusers' and PEFT's own code. Plain ``nn.Linear`` targets (e.g. kept layers)
get PEFT's ordinary layer.

``fuse_lora`` is refused: folding ``B @ A`` into packed codes would need re-quantizing the
layer, and the packed base plus an unfused branch is already what the fused model computes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from hlwq.quant.errors import LoraError
from hlwq.runtime.packed_linear import PackedLinear
from hlwq.store.hash_cache import size_and_sha256
from hlwq.store.lora_file import normalize_state_dict, read_lora_file


def fuse_refused(where: str) -> LoraError:
    return LoraError(f"fuse_lora: {where} is HLWQ-packed; folding a LoRA into it would need "
                     "re-quantizing the weights. Keep the LoRA unfused (it costs one rank-r "
                     "matmul per layer), or fuse into `hlwq export-dequantized` output instead")


class PackedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA ``Linear`` over a PackedLinear: the packed base is called, never decoded here.

    In inference the branch is added in place (``result += scale * h @ B.T``, one ``addmm_``),
    so it adds no activation the size of the layer's output; with autograd, a mixed-adapter
    batch or a LoRA variant, PEFT's own forward runs.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (self.disable_adapters or self.merged or self.lora_variant or kwargs
                or (torch.is_grad_enabled() and (x.requires_grad or self._branch_trains()))):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args)
        flat = result.view(-1, result.shape[-1])
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            down, up = self.lora_A[name], self.lora_B[name]
            if up.bias is not None:           # PEFT's lora_bias: let PEFT add it
                return super().forward(x, *args, **kwargs)
            h = down(self.lora_dropout[name](self._cast_input_dtype(x, down.weight.dtype)))
            flat.addmm_(h.reshape(-1, h.shape[-1]).to(result.dtype),
                        up.weight.t().to(result.dtype), alpha=self.scaling[name])
        return result

    def _branch_trains(self) -> bool:
        return any(p.requires_grad for p in self.lora_A.parameters())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise fuse_refused(f"layer {self.base_layer.extra_repr()}")

    def resolve_lora_variant(self, *, config, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise LoraError(f"LoRA variant {type(variant).__name__} (DoRA and the like) needs the "
                            "dense base weight; packed layers take plain LoRA only")

    def _get_in_out_features(self, module: PackedLinear) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # The packed buffers' dtypes are storage formats; the bias holds the compute dtype.
        bias = base_layer.bias
        return base_layer.codes.device, (bias.dtype if bias is not None else None)


# ---------------------------------------------------------------- one model


def load_lora_into_model(model: nn.Module, state_dict: dict[str, torch.Tensor],
                         adapter_name: str, source: str = "LoRA") -> None:
    """Add one adapter to a diffusers model (``state_dict``: ``<module>.lora_A/B.weight``).

    Targets and shapes are checked first (LoraError naming ``source`` and the first bad key),
    so a refused LoRA leaves the model as it was.
    """
    from diffusers.utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    if adapter_name in getattr(model, "peft_config", {}):
        raise LoraError(f"{source}: adapter name {adapter_name!r} is already loaded "
                        "(choose another, or delete_adapters first)")
    check_targets(model, state_dict, source)
    ranks = {f"^{key}": value.shape[1] for key, value in state_dict.items()
             if key.endswith(".lora_B.weight")}
    config = LoraConfig(**get_peft_kwargs(ranks, None, state_dict, is_unet=True,
                                          model_state_dict=model.state_dict(),
                                          adapter_name=adapter_name))
    config._register_custom_module({PackedLinear: PackedLoraLinear})
    # Layers made on the meta device, then given the file's tensors (cast only where the model
    # computes in another dtype): no initialised copy to overwrite, no second copy of the LoRA.
    inject_adapter_in_model(config, model, adapter_name=adapter_name, state_dict=state_dict,
                            low_cpu_mem_usage=True)
    incompatible = set_peft_model_state_dict(model, state_dict, adapter_name,
                                             low_cpu_mem_usage=True)
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise LoraError(f"{source}: key {unexpected[0]!r} was not taken by any layer")
    model._hf_peft_config_loaded = True


def check_targets(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Every pair must target a linear layer of ``model`` whose in/out features it matches."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for key, tensor in state_dict.items():
        module_name, _, part = key.rpartition(".lora_")
        try:
            layer = model.get_submodule(module_name)
        except AttributeError:
            raise LoraError(f"{source}: key {key!r}: {type(model).__name__} has no module "
                            f"{module_name!r}") from None
        if isinstance(layer, BaseTunerLayer):      # already holds another adapter
            layer = layer.get_base_layer()
        if not isinstance(layer, (nn.Linear, PackedLinear)):
            raise LoraError(f"{source}: key {key!r}: {module_name!r} is a "
                            f"{type(layer).__name__}, not a linear layer")
        expected = (layer.in_features if part == "A.weight" else layer.out_features)
        found = tensor.shape[1] if part == "A.weight" else tensor.shape[0]
        if found != expected:
            side = "in" if part == "A.weight" else "out"
            raise LoraError(f"{source}: key {key!r} has shape {list(tensor.shape)}, but "
                            f"{module_name!r} has {expected} {side}_features")


def packed_lora_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, PackedLoraLinear)]


# ---------------------------------------------------------------- pipelines


class PackedLoraLoaderMixin:
    """``load_lora_weights`` / ``fuse_lora`` for LTX-2 pipelines whose models hold PackedLinear.

    Accepts a safetensors file (or a folder plus ``weight_name``) or a state dict, in any
    naming of :mod:`hlwq.store.lora_file`; everything else is diffusers' LoRA API unchanged.
    """

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
                          adapter_name: str | None = None, hotswap: bool = False, **kwargs) -> None:
        from diffusers.utils.peft_utils import get_adapter_name

        if hotswap:
            raise LoraError("load_lora_weights: hotswap is not supported on packed pipelines; "
                            "delete_adapters, then load")
        by_component, source = _lora_state_dict(pretrained_model_name_or_path_or_dict,
                                                kwargs.get("weight_name"))
        unknown = sorted(set(by_component) - set(self._lora_loadable_modules))
        if unknown:
            raise LoraError(f"{source}: LoRA for {unknown[0]!r}; this pipeline takes LoRAs for "
                            f"{', '.join(self._lora_loadable_modules)}")
        models = {name: getattr(self, name) for name in by_component}
        adapter_name = adapter_name or get_adapter_name(models.get("transformer")
                                                        or next(iter(models.values())))
        for name, model in models.items():   # check all before changing any
            check_targets(model, by_component[name], source)
        for name, model in models.items():
            load_lora_into_model(model, by_component[name], adapter_name, source)

    def fuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        components = ["transformer"] if components is None else components
        for name in components:
            layers = packed_lora_layers(getattr(self, name, None) or nn.Module())
            if layers:
                raise fuse_refused(f"{name} layer {layers[0]!r}")
        super().fuse_lora(components=components, **kwargs)


def _lora_state_dict(spec, weight_name: str | None) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
    if isinstance(spec, dict):
        return normalize_state_dict(spec), "LoRA state dict"
    path = os.fspath(spec)
    if os.path.isdir(path):
        if not weight_name:
            raise LoraError(f"LoRA folder {path}: pass weight_name= to choose its file")
        path = os.path.join(path, weight_name)
    lora, by_component = read_lora_file(path)
    return by_component, str(lora.path)


class PackedLTX2Pipeline(PackedLoraLoaderMixin, LTX2Pipeline):
    """``LTX2Pipeline`` whose LoRAs go onto packed layers unfused."""


class PackedLTX2ImageToVideoPipeline(PackedLoraLoaderMixin, LTX2ImageToVideoPipeline):
    """``LTX2ImageToVideoPipeline`` whose LoRAs go onto packed layers unfused."""


# ---------------------------------------------------------------- renders


def adapter_name_for(sha256: str) -> str:
    """One adapter per file content: the same bytes under two paths load once."""
    return f"lora_{sha256[:16]}"


def use_loras(pipeline, loras: Iterable[tuple[str | os.PathLike, str, float]]) -> None:
    """Make exactly ``loras`` (path, sha256, scale) active: load new ones, delete the others.

    A loaded file whose sha256 is not the one asked for is refused (it changed on disk).
    """
    wanted = {adapter_name_for(sha): (path, sha, scale) for path, sha, scale in loras}
    loaded = {name for names in pipeline.get_list_adapters().values() for name in names}
    if stale := sorted(loaded - set(wanted)):
        pipeline.delete_adapters(stale)
    for name, (path, sha, _) in wanted.items():
        if name in loaded:
            continue
        if (found := size_and_sha256(path)[1]) != sha:
            raise LoraError(f"LoRA file {path} changed since it was listed (sha256 "
                            f"{found[:12]}..., expected {sha[:12]}...)")
        pipeline.load_lora_weights(path, adapter_name=name)
    if wanted:
        pipeline.set_adapters(list(wanted), [scale for _, _, scale in wanted.values()])
