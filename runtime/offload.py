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
auto           on an accelerator, the first of none, model, group, sequential whose peak
               predicted by the memory plan (runtime/memory_plan.py) for the renders to come
               fits the device's free memory; on the CPU, ``none``: there is no accelerator
               memory to save, and offloading to the CPU from the CPU only adds hooks
               (:func:`choose_offload`)
=============  ===============================================================================

PackedLinear holds its weight in buffers (codes, scales, codebook), so every mode must move
buffers, not only parameters; they are moved, never cast (PackedLinear._apply, and
accelerate casts only floating tensors to the dtype they already have). Group offload uses
``block_level`` groups: its ``leaf_level`` groups only the layer types diffusers knows and
would leave PackedLinear's buffers on the device for the whole forward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hlwq.quant.choices import DTYPE_NAMES, OFFLOAD_MODES
from hlwq.quant.errors import InvalidOptionError
from hlwq.runtime.memory_plan import first_fitting


def apply_offload(pipeline, mode: str, device: str | torch.device,
                  peaks: Mapping[str, int] | None = None) -> str:
    """Place ``pipeline`` on ``device`` under ``mode``; returns the mode applied (auto resolved).

    ``peaks``: {mode: predicted peak bytes} of the renders to come (memory_plan.render_peaks),
    which ``auto`` needs on an accelerator. On the CPU every mode runs its hooks (useful for
    testing them) but saves nothing.
    """
    device = torch.device(device)
    check_offload(mode)
    if mode == "auto":
        mode = choose_offload(device, peaks)
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


def choose_offload(device: torch.device, peaks: Mapping[str, int] | None,
                   free_bytes: int | None = None) -> str:
    """What ``auto`` means: ``none`` on the CPU; on CUDA the fastest mode whose predicted peak
    (``peaks``) fits ``free_bytes`` (default: the device's free memory now) with the plan's
    reserve, else ``sequential``, the least memory there is."""
    if device.type != "cuda":
        return "none"
    if peaks is None:
        raise InvalidOptionError("--offload auto on CUDA needs the memory plan's peaks for the "
                                 "renders to come (runtime/memory_plan.py:render_peaks)")
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return first_fitting(peaks, free_bytes) or "sequential"


def _modules(pipeline) -> list[torch.nn.Module]:
    return [c for c in pipeline.components.values() if isinstance(c, torch.nn.Module)]
