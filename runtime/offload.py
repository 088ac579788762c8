"""Where a pipeline's weights live while it renders: all on the device, or offloaded to the CPU.

=============  ===============================================================================
mode           what stays on the accelerator
=============  ===============================================================================
none           every component, all the time (fastest; needs the whole package's memory)
model          one component at a time (diffusers' model CPU offload): the largest, the
               transformer, sets the peak
sequential     one leaf module at a time (accelerate's hooks, buffers included): the least
               memory, the most transfers
group          one block of a ModuleList at a time (diffusers' group offload; on CUDA the
               next block is copied on a side stream while this one runs)
auto           the first of none, model, group whose predicted peak fits the device's free
               memory (:func:`choose_offload`)
=============  ===============================================================================

PackedLinear holds its weight in buffers (codes, scales, codebook), so every mode must move
buffers, not only parameters; they are moved, never cast (PackedLinear._apply, and
accelerate casts only floating tensors to the dtype they already have). Group offload uses
``block_level`` groups: its ``leaf_level`` groups only the layer types diffusers knows and
would leave PackedLinear's buffers on the device for the whole forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hlwq.quant.choices import DTYPE_NAMES, OFFLOAD_MODES
from hlwq.quant.errors import InvalidOptionError

AUTO_ORDER = ("none", "model", "group")        # fastest first; sequential only when asked


def apply_offload(pipeline, mode: str, device: str | torch.device,
                  predict_peak: Callable[[str], int] | None = None) -> str:
    """Place ``pipeline`` on ``device`` under ``mode``; returns the mode applied (auto resolved).

    ``predict_peak(mode)`` -> bytes, for ``auto``; without it auto counts the weights only.
    On the CPU every mode runs its hooks (useful for testing them) but saves nothing.
    """
    device = torch.device(device)
    check_offload(mode)
    if mode == "auto":
        mode = choose_offload(device, predict_peak or (lambda m: weights_peak(pipeline, m)))
    if mode == "none":
        pipeline.to(device)
    elif mode == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        _sequential_offload(pipeline, device)
    else:
        pipeline.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                      offload_type="block_level", num_blocks_per_group=1,
                                      use_stream=device.type == "cuda")
    return mode


def check_offload(mode: str, dtype: str = "auto") -> None:
    if mode not in OFFLOAD_MODES:
        raise InvalidOptionError(f"--offload {mode!r}: must be one of {', '.join(OFFLOAD_MODES)}")
    if dtype not in DTYPE_NAMES:
        raise InvalidOptionError(f"--dtype {dtype!r}: must be one of {', '.join(DTYPE_NAMES)}")


def _sequential_offload(pipeline, device: torch.device) -> None:
    """accelerate's hooks on every module with its own tensors, as diffusers'
    enable_sequential_cpu_offload attaches them, except that a PackedLinear's buffers (its
    weight) are offloaded too; other buffers stay on the device, since pipelines read some
    (e.g. the audio VAE's latent statistics) outside any forward."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import named_module_tensors

    from hlwq.runtime.packed_linear import PackedLinear

    pipeline.remove_all_hooks()
    pipeline.to("cpu")
    for component in _modules(pipeline):
        add_hook_to_module(component, AlignDevicesHook(io_same_device=True), append=True)
        for module in component.modules():
            if any(True for _ in named_module_tensors(module)):
                add_hook_to_module(module, AlignDevicesHook(
                    execution_device=device, offload=True,
                    offload_buffers=isinstance(module, PackedLinear)), append=True)


def choose_offload(device: torch.device, predict_peak: Callable[[str], int]) -> str:
    """The fastest mode whose predicted peak fits the device's free memory (CPU: none)."""
    if device.type != "cuda":
        return "none"
    free, _ = torch.cuda.mem_get_info(device)
    for mode in AUTO_ORDER:
        if predict_peak(mode) <= free:
            return mode
    return "sequential"


def _modules(pipeline) -> list[torch.nn.Module]:
    return [c for c in pipeline.components.values() if isinstance(c, torch.nn.Module)]


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (packed buffers count at their packed size)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weights_peak(pipeline, mode: str) -> int:
    """Weights resident at the peak of ``mode`` (no activations): all, the largest model, or
    the largest block (group and sequential), whichever the mode keeps."""
    models = _modules(pipeline)
    if mode == "none":
        return sum(module_bytes(m) for m in models)
    if mode == "model":
        return max(module_bytes(m) for m in models)
    return max(largest_block_bytes(m) for m in models)


def largest_block_bytes(model: torch.nn.Module) -> int:
    """The largest child of any ModuleList (what block-level group offload keeps on the device),
    or the whole model when it has none."""
    blocks = [block for module in model.modules() if isinstance(module, torch.nn.ModuleList)
              for block in module]
    return max((module_bytes(b) for b in blocks), default=module_bytes(model))
