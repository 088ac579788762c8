"""Size budgets: bits per tensor so a package fits a target size with the least damage.

The problem is a multiple-choice knapsack. Each quantized tensor takes exactly one
:class:`Candidate`: a format (bit width 2-8 and scale-group size: one scale per
128-value rotation block, or per 64- or 32-value group), its exact packed bytes from
:func:`hlwq.quant.sizes.packed_nbytes` (so each format costs its true bits per weight) and
its expected damage; the chosen bytes plus the bytes of everything kept must not exceed
the budget; the summed damage is minimised. Smaller groups cost 0.125-0.375 bits per
weight and buy far less error at few bits (shared/REFERENCE.md: Q4 with 32-value groups
at 4.5 bits beats Q4 with 128-value blocks by 25 % and Q5_0 of GGUF per bit), so the
allocation weighs widths and group sizes in one currency.

:func:`allocate` solves it the Lagrangian way. At a price ``lam`` per byte each tensor
on its own takes the candidate minimising ``damage + lam * bytes``; as the price falls,
a tensor walks along the lower convex hull of its (bytes, damage) points. Taking hull
steps in order of damage saved per byte, and skipping a tensor for good once its next
step does not fit, gives the Lagrangian solution for the budget; what is left of the
budget then goes, greedily, to the upgrades (any candidate, on the hull or not) that
save the most damage. Last, every uniform format that fits is compared, so the result is
never worse than the best single format. The result never exceeds the budget; it is
optimal when the budget falls on a hull breakpoint, and otherwise worse than the optimum
by at most the damage one skipped hull step would have saved.

The damage model: ``damage = sensitivity * weighted_relative_mse``, where the relative error
of a bit width is measured by quantizing a sample of the tensor (optionally weighted by
the mean squared input activation of each input channel, :func:`weighted_relative_mse`) and the
sensitivity says how much of the model's output error one unit of that tensor's relative
error causes (tasks/budget.py estimates it). Damages add up over tensors: a first-order
model, good while each tensor's error is small.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from hlwq.quant.codebook import MAX_BITS, MIN_BITS
from hlwq.quant.errors import BudgetError
from hlwq.quant.names import block_and_module, natural_key
from hlwq.quant.sizes import format_bits_per_weight, format_size, packed_nbytes

CANDIDATE_BITS = tuple(range(MIN_BITS, MAX_BITS + 1))
CANDIDATE_GROUPS = (128, 64, 32)    # scale-group sizes tried (those dividing the block size)


# --------------------------------------------------------------------------- damage model


def sample_rows(out_features: int, count: int, seed: int, key: str) -> torch.Tensor:
    """``count`` distinct row indices, sorted, drawn by a generator seeded by (seed, key)."""
    gen = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(key.encode()))
    return torch.randperm(out_features, generator=gen)[:count].sort().values


def weighted_relative_mse(reference: torch.Tensor, approx: torch.Tensor,
                   channel_weights: torch.Tensor | None = None) -> float:
    """``sum((approx - reference)^2 * a) / sum(reference^2)`` in float64, ``a`` of mean 1.

    ``channel_weights`` (one per input column: the mean squared input activation of that
    channel) scale each column's error by how loudly that channel is driven, relative to
    the average channel: the error a layer's output sees, compared with white weight noise
    of the same energy. Without them (or with equal ones) it is the plain relative MSE."""
    ref_energy = float(reference.double().square().sum())
    err = (approx.double() - reference.double()).square_()
    if channel_weights is not None:
        weights = channel_weights.double().reshape(1, -1)
        mean = float(weights.mean())
        err = err * (weights / mean) if mean > 0 else err
    if ref_energy <= 0:
        return 0.0 if float(err.sum()) == 0 else math.inf
    return float(err.sum()) / ref_energy


Format = tuple[int, int]    # (bits, group_size)


def candidate_formats(block_size: int = 128, group_size: int | None = None,
                      bits: Iterable[int] = CANDIDATE_BITS) -> tuple[Format, ...]:
    """Every (bits, group size) the allocation chooses from: ``bits`` x the CANDIDATE_GROUPS
    that divide ``block_size`` (only ``group_size`` when one is given)."""
    groups = (group_size,) if group_size else tuple(
        g for g in CANDIDATE_GROUPS if g <= block_size and block_size % g == 0)
    return tuple((b, g) for b in bits for g in groups)


def format_label(bits: int, group_size: int, block_size: int = 128) -> str:
    """``Q4`` (one scale per rotation block) or ``Q4/g32`` (one per 32-value group)."""
    return f"Q{bits}" if group_size == block_size else f"Q{bits}/g{group_size}"


@dataclass
class ActivationStats:
    """What a run of the model on real inputs says about each linear layer, keyed by
    ``tensor_key(component, "<module>.weight")``: the mean squared input of each input
    channel, and the output's relative MSE per unit of the layer's own (channel-weighted)
    relative error."""
    channel_mean_square: dict[str, torch.Tensor] = field(default_factory=dict)
    output_gain: dict[str, float] = field(default_factory=dict)
    calibration: dict | None = None    # what it was measured on, at what cost (tasks/budget.py)


@dataclass(frozen=True)
class Candidate:
    """One way to store a tensor: its format, exact packed bytes and expected damage."""
    bits: int
    nbytes: int
    damage: float
    group_size: int = 128

    @property
    def format(self) -> Format:
        return self.bits, self.group_size


@dataclass(frozen=True)
class TensorOptions:
    """The candidates one tensor chooses from (its name is the allocation's key)."""
    name: str
    candidates: tuple[Candidate, ...]


def tensor_options(name: str, shape: Sequence[int], damages: Mapping[Format | int, float],
                   block_size: int = 128, group_size: int | None = None) -> TensorOptions:
    """Candidates of a 2-D tensor from its damage per format; bytes from hlwq.quant.sizes.

    ``damages`` keys are ``(bits, group_size)``; a bare bit width means ``group_size``
    (default: one scale per block)."""
    candidates = []
    for key, damage in sorted(damages.items(), key=lambda kv: _as_format(kv[0], block_size,
                                                                          group_size)):
        bits, group = _as_format(key, block_size, group_size)
        candidates.append(Candidate(bits, packed_nbytes(tuple(shape), bits, block_size, group),
                                    float(damage), group))
    return TensorOptions(name, tuple(candidates))


def _as_format(key: Format | int, block_size: int, group_size: int | None) -> Format:
    return tuple(key) if isinstance(key, tuple) else (key, group_size or block_size)


# --------------------------------------------------------------------------- allocation


@dataclass(frozen=True)
class Allocation:
    """A format per tensor under a budget, with the bytes and damage they add up to."""
    formats: dict[str, Format]
    budget: int
    fixed_bytes: int          # everything in scope that is not quantized (kept tensors)
    quantized_bytes: int      # exact packed bytes of the quantized tensors in their formats
    damage: float             # summed expected damage

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.quantized_bytes

    @property
    def bits(self) -> dict[str, int]:
        return {name: bits for name, (bits, _) in self.formats.items()}

    @property
    def group_sizes(self) -> dict[str, int]:
        return {name: group for name, (_, group) in self.formats.items()}


def smallest_size(options: Sequence[TensorOptions], fixed_bytes: int = 0) -> int:
    """The smallest total any allocation reaches: every tensor at its cheapest candidate."""
    return fixed_bytes + sum(min(c.nbytes for c in option.candidates) for option in options)


def allocate(options: Sequence[TensorOptions], budget: int, fixed_bytes: int = 0) -> Allocation:
    """Least total damage with ``fixed_bytes + chosen bytes <= budget`` (module docstring)."""
    _check_options(options)
    floor = smallest_size(options, fixed_bytes)
    if floor > budget:
        lowest = min((c for option in options for c in option.candidates),
                     key=lambda c: c.nbytes, default=None)
        at = format_label(*lowest.format) if lowest else "no quantized tensor"
        raise BudgetError(
            f"target size {format_size(budget)} cannot be met: with every quantized tensor at "
            f"its smallest format ({at}) the scope still needs {format_size(floor)} "
            f"({format_size(fixed_bytes)} kept unquantized + {format_size(floor - fixed_bytes)} "
            f"quantized). The smallest reachable size is {format_size(floor)}; ask for at "
            "least that, quantize more tensors (policy), or narrow --target-scope")
    hulls = [lower_hull(option.candidates) for option in options]
    position, left = _hull_walk(hulls, budget - floor)
    chosen = [hull[step] for hull, step in zip(hulls, position)]
    chosen = _fill(options, chosen, left)
    uniform = best_uniform_format(options, budget, fixed_bytes)
    if uniform is not None:
        flat = [_candidate(option, *uniform) for option in options]
        if math.fsum(c.damage for c in flat) < math.fsum(c.damage for c in chosen):
            chosen = flat
    return _allocation(options, chosen, budget, fixed_bytes)


def _allocation(options, chosen: Sequence[Candidate], budget: int, fixed_bytes: int) -> Allocation:
    return Allocation(formats={option.name: c.format for option, c in zip(options, chosen)},
                      budget=budget, fixed_bytes=fixed_bytes,
                      quantized_bytes=sum(c.nbytes for c in chosen),
                      damage=math.fsum(c.damage for c in chosen))


def uniform_allocation(options: Sequence[TensorOptions], bits: int, group_size: int = 128,
                       budget: int = 0, fixed_bytes: int = 0) -> Allocation:
    """Every tensor in one format (for comparisons; ``budget`` is only recorded)."""
    return _allocation(options, [_candidate(option, bits, group_size) for option in options],
                       budget, fixed_bytes)


def best_uniform_format(options: Sequence[TensorOptions], budget: int,
                        fixed_bytes: int = 0) -> Format | None:
    """The single format every tensor offers that fits the budget with the least damage
    (None when none fits)."""
    formats = set.intersection(*({c.format for c in o.candidates} for o in options)) \
        if options else set()
    fitting = [(a.damage, f) for f in sorted(formats)
               if (a := uniform_allocation(options, *f, budget, fixed_bytes)).total_bytes <= budget]
    return min(fitting)[1] if fitting else None


def best_uniform_bits(options: Sequence[TensorOptions], budget: int,
                      fixed_bytes: int = 0) -> int | None:
    """The bit width of :func:`best_uniform_format` (None when no single format fits)."""
    best = best_uniform_format(options, budget, fixed_bytes)
    return None if best is None else best[0]


def lower_hull(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The candidates a price per byte can pick, by increasing bytes: the lower convex hull
    of (bytes, damage), without points that cost more and save nothing."""
    hull: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.nbytes, c.damage)):
        if hull and c.damage >= hull[-1].damage:
            continue
        while len(hull) >= 2 and not _below_chord(hull[-2], hull[-1], c):
            hull.pop()
        hull.append(c)
    return hull


def _below_chord(a: Candidate, b: Candidate, c: Candidate) -> bool:
    """Whether b lies strictly below the line from a to c (so b stays on the hull)."""
    return (b.nbytes - a.nbytes) * (c.damage - a.damage) > (b.damage - a.damage) * (c.nbytes - a.nbytes)


def _hull_walk(hulls: list[list[Candidate]], left: int) -> tuple[list[int], int]:
    """Take hull steps by damage saved per byte while they fit; a tensor whose next step
    does not fit takes no further step (its later steps save even less per byte)."""
    steps = []
    for i, hull in enumerate(hulls):
        for k in range(len(hull) - 1):
            saved = hull[k].damage - hull[k + 1].damage
            steps.append((saved / (hull[k + 1].nbytes - hull[k].nbytes), i, k))
    steps.sort(key=lambda step: (-step[0], step[1], step[2]))
    position, blocked = [0] * len(hulls), set()
    for _, i, k in steps:
        if i in blocked:
            continue
        cost = hulls[i][k + 1].nbytes - hulls[i][k].nbytes
        if cost > left:
            blocked.add(i)
            continue
        position[i], left = k + 1, left - cost
    return position, left


def _fill(options: Sequence[TensorOptions], chosen: list[Candidate], left: int) -> list[Candidate]:
    """Spend what is left on the single change that saves the most damage, until none fits."""
    chosen = list(chosen)
    while True:
        best = None
        for i, option in enumerate(options):
            current = chosen[i]
            for c in option.candidates:
                saved, extra = current.damage - c.damage, c.nbytes - current.nbytes
                if saved > 0 and extra <= left and (best is None or saved > best[0]):
                    best = (saved, i, c)
        if best is None:
            return chosen
        _, i, c = best
        left -= c.nbytes - chosen[i].nbytes
        chosen[i] = c


def _candidate(option: TensorOptions, bits: int, group_size: int = 128) -> Candidate:
    for c in option.candidates:
        if c.format == (bits, group_size):
            return c
    raise BudgetError(f"tensor {option.name!r}: no candidate {format_label(bits, group_size)} "
                      f"(has {', '.join(format_label(*c.format) for c in option.candidates)})")


def _check_options(options: Sequence[TensorOptions]) -> None:
    seen = set()
    for option in options:
        if option.name in seen:
            raise BudgetError(f"tensor {option.name!r}: listed twice in the allocation problem")
        seen.add(option.name)
        if not option.candidates:
            raise BudgetError(f"tensor {option.name!r}: no candidate format")
        for c in option.candidates:
            if not (c.nbytes > 0 and math.isfinite(c.damage) and c.damage >= 0):
                raise BudgetError(f"tensor {option.name!r}: candidate {c} needs positive bytes "
                                  "and a finite, non-negative damage")


# --------------------------------------------------------------------------- reporting


def allocation_tables(rows: Iterable[Mapping], block_size: int = 128) -> dict:
    """The chosen mix of quantized rows (``tensor``, ``shape``, ``bits``, optional
    ``group_size``, ``packed_bytes`` and ``damage``): per format (tensors, params, bytes,
    true bits per weight), and per module type and per block (tensors, params, bytes, mean
    bits, parameter-weighted, and how many tensors took each width and each format)."""
    by_format: dict[str, dict] = {}
    by_module: dict[str, dict] = {}
    by_block: dict[str, dict] = {}
    for row in rows:
        block, module = block_and_module(row["tensor"])
        group = row.get("group_size") or block_size
        label = format_label(row["bits"], group, block_size)
        params = math.prod(row["shape"])
        mix = by_format.setdefault(label, {"bits": row["bits"], "group_size": group,
                                           "bits_per_weight": format_bits_per_weight(row["bits"], group),
                                           "tensors": 0, "params": 0, "packed_bytes": 0})
        mix["tensors"] += 1
        mix["params"] += params
        mix["packed_bytes"] += row.get("packed_bytes") or 0
        for table, key in ((by_module, module), (by_block, block or "(not in a block)")):
            entry = table.setdefault(key, {"tensors": 0, "params": 0, "packed_bytes": 0,
                                           "damage": 0.0, "bits_params": 0, "widths": {},
                                           "formats": {}})
            entry["tensors"] += 1
            entry["params"] += params
            entry["packed_bytes"] += row.get("packed_bytes") or 0
            entry["damage"] += row.get("damage") or 0.0
            entry["bits_params"] += row["bits"] * params
            entry["widths"][str(row["bits"])] = entry["widths"].get(str(row["bits"]), 0) + 1
            entry["formats"][label] = entry["formats"].get(label, 0) + 1
    order = {label: (mix["bits"], -mix["group_size"]) for label, mix in by_format.items()}
    for table in (by_module, by_block):
        for entry in table.values():
            entry["mean_bits"] = entry.pop("bits_params") / entry["params"]
            entry["widths"] = dict(sorted(entry["widths"].items(), key=lambda kv: int(kv[0])))
            entry["formats"] = dict(sorted(entry["formats"].items(), key=lambda kv: order[kv[0]]))
    blocks = dict(sorted(by_block.items(), key=lambda item: natural_key(item[0])))
    return {"formats": dict(sorted(by_format.items(), key=lambda kv: order[kv[0]])),
            "modules": by_module, "blocks": blocks}
