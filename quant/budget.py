"""Size budgets: bits per tensor so a package fits a target size with the least damage.

The problem is a multiple-choice knapsack. Each quantized tensor takes exactly one
:class:`Candidate` (bit width, exact packed bytes from :func:`hlwq.quant.sizes.packed_nbytes`,
expected damage); the chosen bytes plus the bytes of everything kept must not exceed
the budget; the summed damage is minimised.

:func:`allocate` solves it the Lagrangian way. At a price ``lam`` per byte each tensor
on its own takes the candidate minimising ``damage + lam * bytes``; as the price falls,
a tensor walks along the lower convex hull of its (bytes, damage) points. Taking hull
steps in order of damage saved per byte, and skipping a tensor for good once its next
step does not fit, gives the Lagrangian solution for the budget; what is left of the
budget then goes, greedily, to the upgrades (any candidate, on the hull or not) that
save the most damage. The result never exceeds the budget; it is optimal when the
budget falls on a hull breakpoint, and otherwise worse than the optimum by at most the
damage one skipped hull step would have saved.

The damage model: ``damage = sensitivity * weighted_relative_mse``, where the relative error
of a bit width is measured by quantizing a sample of the tensor (optionally weighted by
the mean squared input activation of each input channel, :func:`weighted_relative_mse`) and the
sensitivity says how much of the model's output error one unit of that tensor's relative
error causes (tasks/budget.py estimates it). Damages add up over tensors: a first-order
model, good while each tensor's error is small.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from hlwq.quant.codebook import MAX_BITS, MIN_BITS
from hlwq.quant.errors import BudgetError
from hlwq.quant.names import block_and_module, natural_key
from hlwq.quant.sizes import format_size, packed_nbytes

CANDIDATE_BITS = tuple(range(MIN_BITS, MAX_BITS + 1))


# --------------------------------------------------------------------------- damage model


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


@dataclass(frozen=True)
class Candidate:
    """One way to store a tensor: its bit width, exact packed bytes and expected damage."""
    bits: int
    nbytes: int
    damage: float


@dataclass(frozen=True)
class TensorOptions:
    """The candidates one tensor chooses from (its name is the allocation's key)."""
    name: str
    candidates: tuple[Candidate, ...]


def tensor_options(name: str, shape: Sequence[int], damages: Mapping[int, float],
                   block_size: int = 128, group_size: int | None = None) -> TensorOptions:
    """Candidates of a 2-D tensor from its damage per bit width; bytes from hlwq.quant.sizes."""
    out_features, in_features = shape
    candidates = tuple(Candidate(bits, packed_nbytes((out_features, in_features), bits,
                                                     block_size, group_size), float(damage))
                       for bits, damage in sorted(damages.items()))
    return TensorOptions(name, candidates)


# --------------------------------------------------------------------------- allocation


@dataclass(frozen=True)
class Allocation:
    """Bits per tensor under a budget, with the bytes and damage they add up to."""
    bits: dict[str, int]
    budget: int
    fixed_bytes: int          # everything in scope that is not quantized (kept tensors)
    quantized_bytes: int      # exact packed bytes of the quantized tensors at their bits
    damage: float             # summed expected damage

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.quantized_bytes


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
        at = f"{lowest.bits} bits" if lowest else "no quantized tensor"
        raise BudgetError(
            f"target size {format_size(budget)} cannot be met: with every quantized tensor at "
            f"its smallest width ({at}) the scope still needs {format_size(floor)} "
            f"({format_size(fixed_bytes)} kept unquantized + {format_size(floor - fixed_bytes)} "
            f"quantized). The smallest reachable size is {format_size(floor)}; ask for at "
            "least that, quantize more tensors (policy), or narrow --target-scope")
    hulls = [lower_hull(option.candidates) for option in options]
    position, left = _hull_walk(hulls, budget - floor)
    chosen = [hull[step] for hull, step in zip(hulls, position)]
    chosen = _fill(options, chosen, left)
    return Allocation(
        bits={option.name: c.bits for option, c in zip(options, chosen)}, budget=budget,
        fixed_bytes=fixed_bytes, quantized_bytes=sum(c.nbytes for c in chosen),
        damage=math.fsum(c.damage for c in chosen))


def uniform_allocation(options: Sequence[TensorOptions], bits: int, budget: int = 0,
                       fixed_bytes: int = 0) -> Allocation:
    """Every tensor at ``bits`` (for comparisons; ``budget`` is only recorded)."""
    chosen = [_candidate(option, bits) for option in options]
    return Allocation(bits={o.name: bits for o in options}, budget=budget, fixed_bytes=fixed_bytes,
                      quantized_bytes=sum(c.nbytes for c in chosen),
                      damage=math.fsum(c.damage for c in chosen))


def best_uniform_bits(options: Sequence[TensorOptions], budget: int,
                      fixed_bytes: int = 0) -> int | None:
    """The widest single bit width that fits the budget, or None when none does."""
    widths = set.intersection(*({c.bits for c in o.candidates} for o in options)) if options \
        else set(CANDIDATE_BITS)
    fitting = [bits for bits in widths
               if uniform_allocation(options, bits, budget, fixed_bytes).total_bytes <= budget]
    return max(fitting, default=None)


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


def _candidate(option: TensorOptions, bits: int) -> Candidate:
    for c in option.candidates:
        if c.bits == bits:
            return c
    raise BudgetError(f"tensor {option.name!r}: no candidate at {bits} bits "
                      f"(has {[c.bits for c in option.candidates]})")


def _check_options(options: Sequence[TensorOptions]) -> None:
    seen = set()
    for option in options:
        if option.name in seen:
            raise BudgetError(f"tensor {option.name!r}: listed twice in the allocation problem")
        seen.add(option.name)
        if not option.candidates:
            raise BudgetError(f"tensor {option.name!r}: no candidate bit width")
        for c in option.candidates:
            if not (c.nbytes > 0 and math.isfinite(c.damage) and c.damage >= 0):
                raise BudgetError(f"tensor {option.name!r}: candidate {c} needs positive bytes "
                                  "and a finite, non-negative damage")


# --------------------------------------------------------------------------- reporting


def allocation_tables(rows: Iterable[Mapping]) -> dict:
    """Bits per module type and per block of quantized rows (``tensor``, ``shape``, ``bits``,
    optional ``packed_bytes`` and ``damage``): tensors, params, bytes, mean bits
    (parameter-weighted) and how many tensors took each width."""
    by_module: dict[str, dict] = {}
    by_block: dict[str, dict] = {}
    for row in rows:
        block, module = block_and_module(row["tensor"])
        for table, key in ((by_module, module), (by_block, block or "(not in a block)")):
            entry = table.setdefault(key, {"tensors": 0, "params": 0, "packed_bytes": 0,
                                           "damage": 0.0, "bits_params": 0, "widths": {}})
            params = math.prod(row["shape"])
            entry["tensors"] += 1
            entry["params"] += params
            entry["packed_bytes"] += row.get("packed_bytes") or 0
            entry["damage"] += row.get("damage") or 0.0
            entry["bits_params"] += row["bits"] * params
            entry["widths"][str(row["bits"])] = entry["widths"].get(str(row["bits"]), 0) + 1
    for table in (by_module, by_block):
        for entry in table.values():
            entry["mean_bits"] = entry.pop("bits_params") / entry["params"]
            entry["widths"] = dict(sorted(entry["widths"].items(), key=lambda kv: int(kv[0])))
    blocks = dict(sorted(by_block.items(), key=lambda item: natural_key(item[0])))
    return {"modules": by_module, "blocks": blocks}
