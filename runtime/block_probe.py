"""Per-block activations of the first denoising step, to trace a drifting video to its blocks.

``BlockProbe`` puts a forward hook on every block of a transformer (``transformer_blocks``) and
keeps each block's outputs (video and audio hidden states) from the block's *first* call only:
the first denoising step, where source and packed models see the same latents and noise level.
Later calls pass through untouched.

At LTX-2.3's real size a block output holds tens of millions of values, so at most
``max_values`` evenly strided values per output are kept (the same positions in both models).
The errors are computed on that sample, which is plenty for a cosine or a relative error.
"""

from __future__ import annotations

from typing import Self

import torch
from torch import nn

from hlwq.quant.errors import InvalidOptionError
from hlwq.quant.video_metrics import activation_error

STREAMS = ("video", "audio")      # the two outputs of an LTX-2 transformer block, in order
DEFAULT_MAX_VALUES = 1 << 18


def transformer_blocks(transformer: nn.Module) -> nn.ModuleList:
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise InvalidOptionError(f"{type(transformer).__name__}: has no transformer_blocks to "
                                 "probe (expected an LTX-2 transformer)")
    return blocks


def strided_sample(tensor: torch.Tensor, max_values: int) -> torch.Tensor:
    """At most ``max_values`` evenly strided values of ``tensor``, as a float32 CPU copy."""
    flat = tensor.detach().reshape(-1)
    stride = max(1, -(-flat.numel() // max_values))
    return flat[::stride].float().cpu().clone()


class BlockProbe:
    """Context manager: ``outputs[block][stream]`` holds the first call's sampled outputs.

    with BlockProbe(pipe.transformer) as probe:
        pipe(...)
    probe.outputs   # {0: {"video": tensor, "audio": tensor}, 1: ...}
    """

    def __init__(self, transformer: nn.Module, max_values: int = DEFAULT_MAX_VALUES):
        if max_values < 1:
            raise InvalidOptionError(f"max_values={max_values}: must be at least 1")
        self.blocks = transformer_blocks(transformer)
        self.max_values = max_values
        self.outputs: dict[int, dict[str, torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> Self:
        self.outputs.clear()
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def keep_first_call(module, args, output) -> None:
            if index in self.outputs:
                return
            tensors = output if isinstance(output, (tuple, list)) else (output,)
            self.outputs[index] = {stream: strided_sample(tensor, self.max_values)
                                   for stream, tensor in zip(STREAMS, tensors)
                                   if isinstance(tensor, torch.Tensor)}
        return keep_first_call


def compare_block_outputs(reference: dict[int, dict[str, torch.Tensor]],
                          candidate: dict[int, dict[str, torch.Tensor]]) -> list[dict]:
    """One row per (block, stream) both probes saw: ``block``, ``stream``, ``cosine``, ``rel_err``.

    The errors are cumulative: block k's output carries the drift of blocks 0..k; the block
    where the error jumps is the one that adds it.
    """
    rows = []
    for block in sorted(set(reference) & set(candidate)):
        for stream in STREAMS:
            if stream in reference[block] and stream in candidate[block]:
                rows.append({"block": block, "stream": stream,
                             **activation_error(reference[block][stream], candidate[block][stream])})
    return rows
