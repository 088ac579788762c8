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

from dataclasses import dataclass, replace

import torch

MODES = ("refined", "reference")


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
        return -(-self.shape[1] // self.block_size) * self.block_size

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
