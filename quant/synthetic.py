"""Synthetic weights shaped like a trained checkpoint's: heavy-tailed (Student-t, 5 degrees of
freedom), fan-in scaled, with a few loud input columns per linear. Seeded per tensor name, so
any tensor can be regenerated alone and streamed in bounded memory.

Used by the test fixtures and by size budgets that must sample weights they cannot read.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

from hlwq.quant.errors import InvalidOptionError

HEAVY_TAIL_DOF = 5
OUTLIER_GAIN = 8.0
OUTLIER_EVERY = 512       # one loud input column per this many, at least MIN_OUTLIERS
MIN_OUTLIERS = 2
CHUNK_ELEMENTS = 1 << 24  # generate (and hold) at most this many values at once

class TensorSpec(NamedTuple):
    key: str              # "component/name": seeds the tensor's generator
    name: str             # name inside the checkpoint file
    shape: tuple[int, ...]
    kind: str             # how its values are drawn (see tensor_kind)


def _generator(seed: int, key: str) -> torch.Generator:
    # The CPU generator keeps only 32 bits of its seed, so seed and name share one 32-bit hash.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))


def _student_t(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Unit-variance Student-t(5): z / sqrt(chi2_5 / 5), chi2_5 = -2 ln(u1 u2) + z2^2."""
    z = torch.randn(shape, generator=gen)
    z2 = torch.randn(shape, generator=gen)
    u = torch.rand(shape, generator=gen).mul_(torch.rand(shape, generator=gen))
    chi2 = u.clamp_(min=1e-30).log_().mul_(-2.0).addcmul_(z2, z2)
    scale = math.sqrt((HEAVY_TAIL_DOF - 2) / HEAVY_TAIL_DOF)
    return z.div_(chi2.div_(HEAVY_TAIL_DOF).sqrt_()).mul_(scale)


def _column_gains(in_features: int, gen: torch.Generator) -> torch.Tensor:
    """Per-input-column gains: a few columns OUTLIER_GAIN louder, mean square kept at 1."""
    count = min(in_features, max(MIN_OUTLIERS, in_features // OUTLIER_EVERY))
    gains = torch.ones(in_features)
    gains[torch.randperm(in_features, generator=gen)[:count]] = OUTLIER_GAIN
    return gains / gains.square().mean().sqrt()


def _draw(kind: str, shape: tuple[int, ...], fan_in: int, gen: torch.Generator,
          gains: torch.Tensor | None) -> torch.Tensor:
    t = _student_t(shape, gen)
    if kind in ("linear", "embedding", "table"):
        t.mul_(1.0 / math.sqrt(fan_in))
        return t.mul_(gains) if gains is not None else t
    if kind == "conv":  # PyTorch's default conv scale: long conv chains (VAE, vocoder) stay tame
        return t.mul_(1.0 / math.sqrt(3 * fan_in))
    if kind == "norm":
        return t.mul_(0.1).add_(1.0)
    if kind == "norm_offset":
        return t.mul_(0.1)
    if kind == "positive":
        return t.mul_(0.2).exp_()
    if kind in ("bias", "small"):
        return t.mul_(0.02)
    raise InvalidOptionError(f"tensor kind {kind!r}: no synthetic rule (known: linear, conv, "
                             "embedding, table, norm, norm_offset, positive, bias, small)")


def synthetic_chunks(spec: TensorSpec, seed: int) -> Iterator[torch.Tensor]:
    """The tensor's float32 values, in consecutive slices along dim 0 (bounded memory)."""
    if not spec.shape:
        raise InvalidOptionError(f"tensor {spec.name}: scalars have no synthetic rule")
    rows, row_shape = spec.shape[0], spec.shape[1:]
    fan_in = max(1, math.prod(row_shape))
    gen = _generator(seed, spec.key)
    gains = _column_gains(row_shape[0], gen) if spec.kind == "linear" else None
    step = max(1, CHUNK_ELEMENTS // fan_in)
    for start in range(0, rows, step):
        yield _draw(spec.kind, (min(step, rows - start), *row_shape), fan_in, gen, gains)


def synthetic_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The whole tensor (the concatenated chunks, so the values equal the streamed ones)."""
    return torch.cat(list(synthetic_chunks(spec, seed)))
