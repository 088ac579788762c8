"""PackedLinear: a linear layer whose weight stays HLWQ-packed in memory.

The weight ``W`` is never stored in full precision. Per block of ``B`` input
features ``W = R @ H`` (quant/packed.py), so a forward computes

    y = x @ W.T + b = (x_padded @ H_blockdiag) @ R.T + b

decoding ``R`` (unpack, codebook lookup, scale: no Hadamard) a few thousand
rows at a time into a reused per-thread buffer of the activation's dtype, and
rotating the activations with one small batched matmul. Rotating the activations costs ``B / out_features``
of the layer's matmul whatever the token count; rotating the weight on every
forward would cost ``B / tokens``. The rotation uses ``+-2^-k`` entries (exact
in every float dtype) and the decoded ``R`` absorbs the rest of the
normalisation, so no dtype sees a rounded ``1/sqrt(B)``.

Decoders: numba on the CPU (quant/dequant_into.py), Triton on CUDA when it is
installed (runtime/triton_kernels.py), plain torch anywhere else.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from hlwq.quant.core import check_packed
from hlwq.quant.dequant_into import decode_rotated_into
from hlwq.quant.errors import InvalidTensorError
from hlwq.quant.hadamard import hadamard_matrix
from hlwq.quant.packed import PackedTensor, packed_layout, padded_in_features
from hlwq.runtime import triton_kernels

PACKED_BUFFERS = ("codes", "scales", "codebook")
# Weights decoded per pass: bounds the transient buffer (32 MiB in bf16) whatever the layer;
# 4096 x 4096 attention weights decode in one pass, the 4x wider feed-forward ones in four.
CHUNK_ELEMENTS = 1 << 24


class PackedLinear(nn.Module):
    """``nn.Linear`` drop-in holding codes (uint8), scales (fp16) and codebook (fp32) as buffers."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, block_size: int,
                 group_size: int, mode: str = "refined", bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.block_size, self.group_size, self.mode = bits, block_size, group_size, mode
        self.in_padded = padded_in_features(in_features, block_size)
        layout = packed_layout((out_features, in_features), bits, block_size, group_size)
        for part, spec in layout.items():
            self.register_buffer(part, torch.empty(spec.shape, dtype=spec.dtype, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                  requires_grad=False) if bias else None)
        self.cache: DequantCache | None = None   # off by default: see enable_dequant_cache

    @classmethod
    def from_packed(cls, packed: PackedTensor, bias: torch.Tensor | None = None) -> PackedLinear:
        """Wrap a PackedTensor; its tensors (and ``bias``) are used as they are, not copied."""
        check_packed(packed)
        out_features, in_features = packed.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise InvalidTensorError(f"PackedLinear: bias shape {tuple(bias.shape)} != "
                                     f"({out_features},)")
        layer = cls(in_features, out_features, bits=packed.bits, block_size=packed.block_size,
                    group_size=packed.group_size, mode=packed.mode, bias=bias is not None,
                    device="meta")
        for name in PACKED_BUFFERS:
            setattr(layer, name, getattr(packed, name))
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    @property
    def packed(self) -> PackedTensor:
        return PackedTensor(self.codes, self.scales, self.codebook,
                            (self.out_features, self.in_features), self.bits,
                            self.block_size, self.group_size, self.mode)

    @property
    def qweight(self) -> torch.Tensor:
        """The codes, under the name PEFT (and other quantized-layer tooling) looks up to find a
        layer's device when it wraps it in a LoRA layer (runtime/lora.py)."""
        return self.codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InvalidTensorError(f"PackedLinear: input has {x.shape[-1]} features, "
                                     f"expected {self.in_features}")
        rotated = rotate_activations(x, self.block_size, self.in_padded)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.cache is not None or x.requires_grad:
            return F.linear(rotated, self._whole_weight(x.dtype, x.device), bias)
        return self._linear_in_row_chunks(rotated, bias)

    def _linear_in_row_chunks(self, rotated: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Decode at most CHUNK_ELEMENTS weights at a time into the shared workspace."""
        step = max(1, CHUNK_ELEMENTS // self.in_padded)
        out = None if step >= self.out_features else rotated.new_empty(
            *rotated.shape[:-1], self.out_features)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            weight = workspace((stop - start, self.in_padded), rotated.dtype, rotated.device)
            decode_weight(self.packed.rows(start, stop), weight)
            part = F.linear(rotated, weight, None if bias is None else bias[start:stop])
            if out is None:
                return part
            out[..., start:stop] = part
        return out

    def _whole_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The decoded weight in its own tensor: kept by the cache, or saved by autograd."""
        key = (self, dtype, device)     # the module itself: ids of freed modules get reused
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit
        weight = decode_weight(self.packed, torch.empty(
            self.out_features, self.in_padded, dtype=dtype, device=device))
        if self.cache is not None:
            self.cache.put(key, weight)
        return weight

    def _apply(self, fn, recurse=True):
        # A model-wide .to(bfloat16) must move the packed buffers, never cast them.
        before = {name: getattr(self, name) for name in PACKED_BUFFERS}
        super()._apply(fn, recurse)
        for name, original in before.items():
            moved = getattr(self, name)
            if moved.dtype != original.dtype:
                self._buffers[name] = original.to(device=moved.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, block_size={self.block_size}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


# ------------------------------------------------------------------ the math


def rotation_gain(block_size: int) -> float:
    """The power of two ``p`` with ``p * sqrt(B)`` in ``[1, 2)``: exact in every float dtype."""
    return 2.0 ** -math.floor(math.log2(math.sqrt(block_size)))


@functools.lru_cache(maxsize=32)
def _rotation(block_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A normal tensor even when first asked for under inference_mode: the cache outlives it,
    # and autograd (training a LoRA on a packed model) cannot save inference tensors.
    with torch.inference_mode(False):
        signs = hadamard_matrix(block_size) * math.sqrt(block_size)   # exact +-1
        return (signs.round() * rotation_gain(block_size)).to(dtype=dtype, device=device)


def rotate_activations(x: torch.Tensor, block_size: int, in_padded: int) -> torch.Tensor:
    """``x`` zero-padded to ``in_padded`` features, each block times ``p * sqrt(B) * H``."""
    if x.shape[-1] != in_padded:
        x = F.pad(x, (0, in_padded - x.shape[-1]))
    blocks = x.reshape(*x.shape[:-1], in_padded // block_size, block_size)
    return (blocks @ _rotation(block_size, x.dtype, x.device)).reshape(x.shape)


def decode_weight(packed: PackedTensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``R / (p * sqrt(B))`` into ``out``, the weight that pairs with rotate_activations.

    ``R = scales * codebook[codes] / sqrt(B)``, so the factor on ``scales * codebook`` is ``1 / (p * B)``.
    """
    factor = 1.0 / (rotation_gain(packed.block_size) * packed.block_size)
    if out.device.type == "cuda" and triton_kernels.available():
        return triton_kernels.decode_rotated_into(packed, out, factor)
    return decode_rotated_into(packed, out, factor, threads=torch.get_num_threads())


# ------------------------------------------------------- buffers and caching

_local = threading.local()


def workspace(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread scratch tensor of ``shape``, grown to the largest layer and reused."""
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (dtype, device, torch.is_inference_mode_enabled())   # inference tensors stay inside it
    numel = shape[0] * shape[1]
    flat = buffers.get(key)
    if flat is None or flat.numel() < numel:
        buffers.pop(key, None)   # free the old one before growing
        flat = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return flat[:numel].view(shape)


def release_workspaces() -> None:
    """Free this thread's scratch buffers (they regrow on the next forward)."""
    _local.__dict__.pop("buffers", None)


class DequantCache:
    """A bounded LRU of decoded weights shared by PackedLinear layers (trades memory for speed)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple) -> torch.Tensor | None:
        tensor = self._entries.get(key)
        if tensor is not None:
            self._entries.move_to_end(key)
        return tensor

    def put(self, key: tuple, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return
        self.bytes -= _nbytes(self._entries.pop(key, None))
        while self._entries and self.bytes + size > self.max_bytes:
            self.bytes -= _nbytes(self._entries.popitem(last=False)[1])
        self._entries[key] = tensor
        self.bytes += size

    def __len__(self) -> int:
        return len(self._entries)


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def enable_dequant_cache(model: nn.Module, max_bytes: int) -> DequantCache | None:
    """Give every PackedLinear of ``model`` one shared LRU of ``max_bytes`` (0 turns it off)."""
    cache = DequantCache(max_bytes) if max_bytes > 0 else None
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.cache = cache
    return cache
