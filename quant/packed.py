"""The in-memory packed tensor: the one data structure every layer shares.

Semantics (the artifact format, docs/FORMAT.md, stores exactly these fields):

- The weight ``W`` of shape ``(out, in)`` is zero-padded on the input axis to
  ``in_padded`` (a multiple of ``block_size``) and cut into rotation blocks of
  ``block_size`` values.
- Each rotation block is rotated by the orthonormal Walsh-Hadamard matrix ``H``
  and each ``group_size`` run of rotated coordinates (``group_size`` divides
  ``block_size``; equal to it by default) shares one fp16 ``scale``.
- Dequantization of one block::

      r[j]   = scales[row, group(j)] * codebook[codes[row, j]] / sqrt(block_size)
      w_hat  = r @ H^T                      (H is symmetric: H^T == H)

  With ``group_size == block_size`` this is exactly the reference (polarquant
  0.6.0) formula ``n * ((c[code] / sqrt(B)) @ H^T)``: ``scales`` sit in the
  reference's ``norms`` slot and ``codebook / sqrt(B)`` is its ``ct_scaled``.
- ``codes`` is packed per row as a little-endian bit stream: code ``i`` of a row
  occupies bits ``[i*bits, (i+1)*bits)`` of that row's bytes, least significant
  bit first. At 5 bits this is byte-identical to the reference Q5 packing
  (8 codes -> 5 bytes, 80 bytes per 128-value block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from hlwq.quant.packing import packed_row_bytes

PACKED_PARTS = ("codes", "scales", "codebook")   # the stored parts of a quantized tensor


# --------------------------------------------------------------------------- the packed layout
# The one definition of what a packed tensor holds. Every reader, writer, verifier, size
# estimate and module derives its parts' dtypes and shapes from ``packed_layout``.


@dataclass(frozen=True)
class PartSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def safetensors_dtype(self) -> str:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.float16: "F16", torch.float32: "F32"}


def padded_in_features(in_features: int, block_size: int) -> int:
    """Input features after zero-padding to whole rotation blocks."""
    return -(-in_features // block_size) * block_size


def packed_layout(shape: tuple[int, int], bits: int, block_size: int,
                  group_size: int | None = None) -> dict[str, PartSpec]:
    """``{"codes", "scales", "codebook"}`` -> dtype and shape, from the settings alone."""
    out_features, in_features = shape
    in_padded = padded_in_features(in_features, block_size)
    return {
        "codes": PartSpec(torch.uint8, (out_features, packed_row_bytes(in_padded, bits))),
        "scales": PartSpec(torch.float16, (out_features, in_padded // (group_size or block_size))),
        "codebook": PartSpec(torch.float32, (2 ** bits,)),
    }


def layout_mismatches(packed: PackedTensor) -> list[str]:
    """Each part whose dtype or shape disagrees with the layout its settings imply."""
    expected = packed_layout(packed.shape, packed.bits, packed.block_size, packed.group_size)
    problems = []
    for part, spec in expected.items():
        value = getattr(packed, part)
        if value.dtype != spec.dtype or tuple(value.shape) != spec.shape:
            problems.append(f"{part} is {value.dtype} {tuple(value.shape)}, expected "
                            f"{spec.dtype} {spec.shape}")
    return problems


@dataclass(frozen=True)
class PackedTensor:
    codes: torch.Tensor      # uint8 (out, in_padded * bits // 8)
    scales: torch.Tensor     # float16 (out, in_padded // group_size)
    codebook: torch.Tensor   # float32 (2 ** bits,), sorted, N(0, 1) units
    shape: tuple[int, int]   # original (out, in), before padding
    bits: int
    block_size: int
    group_size: int
    mode: str

    @property
    def in_padded(self) -> int:
        return padded_in_features(self.shape[1], self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes the packed form occupies (codes + scales + codebook)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.codebook))

    def rows(self, start: int, stop: int) -> PackedTensor:
        """Output rows ``[start, stop)`` (views: each row is stored independently)."""
        if (start, stop) == (0, self.shape[0]):
            return self
        return replace(self, codes=self.codes[start:stop], scales=self.scales[start:stop],
                       shape=(stop - start, self.shape[1]))

    def select_rows(self, indices: torch.Tensor) -> PackedTensor:
        """The output rows ``indices`` (a 1-D index tensor), copied: exactly what this tensor
        stores for them."""
        return replace(self, codes=self.codes[indices], scales=self.scales[indices],
                       shape=(len(indices), self.shape[1]))
