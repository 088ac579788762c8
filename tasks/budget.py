"""Size budgets around hlwq.quant.budget: measure each tensor's damage per bit width, allocate.

Damage of tensor ``t`` at ``b`` bits is ``sensitivity_t * relative_error_t(b)``:

- ``relative_error_t(b)`` is measured, never guessed: a seeded sample of the tensor's
  rows (whole rows, so every rotation block in it is a real one; about
  :data:`SAMPLE_WEIGHTS` values) is quantized with hlwq.quant.core at every candidate width
  and compared with the original. Without weights (a plan of the meta-device layout or
  of a Hub repo) the sample is synthetic: heavy-tailed Student-t(5) rows with loud
  outlier columns of the tensor's real width (hlwq.quant.synthetic's trained-looking values).
- ``sensitivity_t``, two estimates:

  ``params`` (needs no model): the tensor's share of the quantized parameters, doubled for
  the first and last eighth of the blocks (a prior: published mixed-precision recipes such
  as llama.cpp's K-quant mixes give the ends of the stack more bits). Damage is then a
  weighted mean relative MSE of the weights.

  ``activations`` (where the model runs; :func:`activation_stats`): on real inputs (e.g.
  the first denoising step of prompts of the suite), forward hooks capture the mean squared
  input of every input channel, which weights the sampled error per channel; then one probe
  per layer quantizes that layer alone (at :data:`PROBE_BITS`) and measures the relative
  error that reaches the model output, per unit of the layer's own error. Damage is then
  the predicted relative MSE of the model output (contributions summed, first order).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import task

from hlwq.quant.budget import (
    CANDIDATE_BITS,
    Allocation,
    allocate,
    allocation_tables,
    best_uniform_bits,
    block_and_module,
    smallest_size,
    tensor_options,
    uniform_allocation,
    weighted_relative_mse,
)
from hlwq.quant.choices import SCOPES
from hlwq.quant.core import dequantize, quantize_tensor
from hlwq.quant.errors import BudgetError, CorruptCheckpointError, InvalidOptionError
from hlwq.quant.sizes import (
    DTYPE_BYTES,
    bits_per_weight,
    padded_in_features,
    parse_size,
    tensor_nbytes,
)
from hlwq.store.artifact import tensor_key
from hlwq.store.safetensors_io import torch_dtype

SENSITIVITIES = ("params", "activations")
SAMPLE_WEIGHTS = 1 << 16      # values quantized per tensor and width: ~500 blocks of 128
MIN_SAMPLE_ROWS = 8
EDGE_FRACTION = 1 / 8         # "params" prior: the first and last eighth of the blocks ...
EDGE_WEIGHT = 2.0             # ... count twice
PROBE_BITS = 3                # the probe quantizes each layer at this width (error ~3 %)
ERROR_UNITS = {"params": "weighted mean relative MSE of the quantized weights",
               "activations": "predicted relative MSE of the model output"}


# --------------------------------------------------------------------------- scope


def rows_in_scope(rows: Iterable[Mapping], scope: str) -> list[dict]:
    """The inventory rows a budget of ``scope`` counts (SCOPE_HELP)."""
    if scope not in SCOPES:
        raise InvalidOptionError(f"--target-scope {scope!r}: must be one of {', '.join(SCOPES)}")
    rows = [dict(row) for row in rows]
    if scope == "transformer":
        return [row for row in rows if row["component"] == "transformer"]
    if scope == "checkpoint":
        return [row for row in rows if row["component"] != "text_encoder"]
    return rows


# --------------------------------------------------------------------------- samples


def sample_row_count(shape: Sequence[int], block_size: int = 128) -> int:
    out_features, in_features = shape
    padded = padded_in_features(in_features, block_size)
    return min(out_features, max(MIN_SAMPLE_ROWS, SAMPLE_WEIGHTS // padded))


def sample_rows(out_features: int, count: int, seed: int, key: str) -> torch.Tensor:
    """``count`` distinct row indices, sorted, drawn by a generator seeded by (seed, key)."""
    gen = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(key.encode()))
    return torch.randperm(out_features, generator=gen)[:count].sort().values


def read_rows(path: str | os.PathLike, row: Mapping, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of an inventory row's 2-D tensor as float32, reading only their bytes."""
    out_features, in_features = row["shape"]
    row_bytes = in_features * DTYPE_BYTES[row["dtype"]]
    if row["data_end"] - row["data_start"] != out_features * row_bytes:
        raise CorruptCheckpointError(f"{path}: tensor {row['tensor']!r} spans "
                                     f"{row['data_end'] - row['data_start']:,} bytes, not "
                                     f"{out_features * row_bytes:,} for {row['dtype']} "
                                     f"{list(row['shape'])}")
    buffer = torch.empty((len(indices), row_bytes), dtype=torch.uint8)
    with open(path, "rb") as handle:
        for k, index in enumerate(indices.tolist()):
            view = memoryview(buffer[k].numpy())
            if os.preadv(handle.fileno(), [view], row["data_start"] + index * row_bytes) != row_bytes:
                raise CorruptCheckpointError(f"{path}: tensor {row['tensor']!r} row {index} "
                                             "lies beyond the end of the file")
    return buffer.view(torch_dtype(row["dtype"])).reshape(len(indices), in_features).float()


def synthetic_rows(in_features: int, count: int, seed: int = 0) -> torch.Tensor:
    """Trained-looking rows of width ``in_features``: Student-t(5), outlier columns x8."""
    from hlwq.quant.synthetic import TensorSpec, synthetic_tensor

    spec = TensorSpec(f"budget/synthetic/{in_features}", "weight", (count, in_features), "linear")
    return synthetic_tensor(spec, seed)


def relative_errors(sample: torch.Tensor, bits: Iterable[int] = CANDIDATE_BITS,
                    block_size: int = 128, group_size: int | None = None, mode: str = "refined",
                    channel_weights: torch.Tensor | None = None,
                    name: str | None = None) -> dict[int, float]:
    """Relative error of ``sample`` quantized at each width (hlwq.quant.budget.weighted_relative_mse)."""
    errors = {}
    for b in bits:
        packed = quantize_tensor(sample, b, block_size, mode, group_size, name=name)
        errors[b] = weighted_relative_mse(sample, dequantize(packed), channel_weights)
    return errors


# --------------------------------------------------------------------------- sensitivity


@dataclass
class ActivationStats:
    """What one run of the model on real inputs says about each linear layer, keyed by
    ``tensor_key(component, "<module>.weight")``."""
    channel_mean_square: dict[str, torch.Tensor] = field(default_factory=dict)
    output_gain: dict[str, float] = field(default_factory=dict)   # output / weight rel MSE


def params_sensitivity(rows: Sequence[Mapping]) -> dict[str, float]:
    """Share of the quantized parameters, the ends of each block stack counting EDGE_WEIGHT."""
    depth: dict[str, int] = {}
    for row in rows:
        block = block_and_module(row["tensor"])[0]
        if block:
            stack, index = block.rsplit(".", 1)
            depth[stack] = max(depth.get(stack, 0), int(index) + 1)
    weights = {}
    for row in rows:
        weight = float(math.prod(row["shape"]))
        block = block_and_module(row["tensor"])[0]
        if block:
            stack, index = block.rsplit(".", 1)
            edge = max(1, round(depth[stack] * EDGE_FRACTION))
            if int(index) < edge or int(index) >= depth[stack] - edge:
                weight *= EDGE_WEIGHT
        weights[_key(row)] = weight
    total = math.fsum(weights.values()) or 1.0
    return {key: weight / total for key, weight in weights.items()}


@torch.no_grad()
def activation_stats(model: torch.nn.Module, forward: Callable[[], object], component: str,
                     names: Iterable[str] | None = None, probe_bits: int = PROBE_BITS,
                     block_size: int = 128, group_size: int | None = None,
                     mode: str = "refined") -> ActivationStats:
    """Capture per-channel input mean squares and probe output gains of ``model``'s linears.

    ``forward()`` runs the model on fixed inputs and returns its output (a tensor or a
    tuple of tensors). ``names`` limits the work to those weight names (``"<module>.weight"``).
    Costs one forward for the statistics plus, per probed layer, one quantization of its
    weight and one forward."""
    wanted = None if names is None else set(names)
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)
               and (wanted is None or f"{name}.weight" in wanted)}
    sums: dict[str, list] = {name: [0.0, 0] for name in linears}   # sum of x^2, tokens

    def recorder(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().double().reshape(-1, module.in_features)
            sums[name][0] = sums[name][0] + x.square().sum(0)
            sums[name][1] += x.shape[0]
        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in linears.items()]
    try:
        reference = _flat_output(forward())
    finally:
        for handle in handles:
            handle.remove()
    stats = ActivationStats()
    for name, module in linears.items():
        x_sum, tokens = sums[name]
        if not tokens:
            continue   # not used by this forward: no statistics, no gain
        key = tensor_key(component, f"{name}.weight")
        weights = (x_sum / tokens).float()
        stats.channel_mean_square[key] = weights
        original = module.weight.detach().clone()
        approx = dequantize(quantize_tensor(original.float(), probe_bits, block_size, mode,
                                            group_size, name=key))
        module.weight.copy_(approx)
        try:
            output = _flat_output(forward())
        finally:
            module.weight.copy_(original)
        output_error = float((output - reference).square().sum() / reference.square().sum())
        weight_error = weighted_relative_mse(original, approx, weights)
        stats.output_gain[key] = output_error / weight_error if weight_error > 0 else 0.0
    return stats


def _flat_output(output) -> torch.Tensor:
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, torch.Tensor):
        return output.detach().double().reshape(-1)
    return torch.cat([_flat_output(part) for part in output if isinstance(part, (torch.Tensor, tuple, list))])


# --------------------------------------------------------------------------- damage


Sampler = Callable[[Mapping, int, int], torch.Tensor]   # (row, rows wanted, seed) -> (k, in) float


def file_sampler(source_base: str | os.PathLike) -> Sampler:
    """Sample rows from the checkpoint files an inventory points at (``row["file"]``)."""
    base = Path(source_base)

    def sample(row: Mapping, count: int, seed: int) -> torch.Tensor:
        indices = sample_rows(row["shape"][0], count, seed, _key(row))
        return read_rows(base / row["file"], row, indices)
    return sample


def synthetic_sampler(row: Mapping, count: int, seed: int) -> torch.Tensor:
    """Synthetic rows of the tensor's width (for plans without weights)."""
    return synthetic_rows(row["shape"][1], count, seed)


def measure_damages(rows: Sequence[Mapping], sampler: Sampler = synthetic_sampler,
                    sensitivity: str = "params", stats: ActivationStats | None = None,
                    bits: Iterable[int] = CANDIDATE_BITS, block_size: int = 128,
                    group_size: int | None = None, mode: str = "refined",
                    seed: int = 0) -> dict[str, dict[int, float]]:
    """``{tensor_key: {bits: damage}}`` for every quantized row (module docstring).

    Samples that cannot differ (synthetic ones of one width) are measured once."""
    if sensitivity not in SENSITIVITIES:
        raise InvalidOptionError(f"sensitivity={sensitivity!r}: must be one of "
                                 f"{', '.join(SENSITIVITIES)}")
    if sensitivity == "activations" and stats is None:
        raise BudgetError("sensitivity 'activations' needs activation statistics from a run of "
                          "the model (hlwq.tasks.budget.activation_stats); use 'params' without one")
    bits = tuple(bits)
    rows = [row for row in rows if row["action"] == "quantize"]
    shares = params_sensitivity(rows) if sensitivity == "params" else None
    cache: dict[tuple, dict[int, float]] = {}
    damages = {}
    for row in rows:
        key, count = _key(row), sample_row_count(row["shape"], block_size)
        if sensitivity == "params":
            cache_key = (row["shape"][1], count) if sampler is synthetic_sampler else (key,)
            if cache_key not in cache:
                cache[cache_key] = relative_errors(sampler(row, count, seed), bits, block_size,
                                                   group_size, mode, name=key)
            damages[key] = {b: shares[key] * e for b, e in cache[cache_key].items()}
            continue
        weights, gain = _activation_entry(stats, row)
        errors = relative_errors(sampler(row, count, seed), bits, block_size, group_size, mode,
                                 weights, name=key)
        damages[key] = {b: gain * e for b, e in errors.items()}
    return damages


def _activation_entry(stats: ActivationStats, row: Mapping) -> tuple[torch.Tensor, float]:
    for key in _stats_keys(row):
        if key in stats.channel_mean_square and key in stats.output_gain:
            return stats.channel_mean_square[key], stats.output_gain[key]
    raise BudgetError(f"tensor {_key(row)!r}: no activation statistics (its layer did not run "
                      "in the captured forward); use sensitivity 'params' or capture it")


def _stats_keys(row: Mapping) -> list[str]:
    """The row's key, and its diffusers-name key for an official single-file tensor."""
    keys = [_key(row)]
    try:
        from hlwq.store.ltx23_config import official_to_diffusers_key

        component, name = official_to_diffusers_key(row["tensor"])
        keys.append(tensor_key(component, name))
    except InvalidOptionError:
        pass
    return keys


def _key(row: Mapping) -> str:
    return tensor_key(row["component"], row["tensor"])


# --------------------------------------------------------------------------- allocation


def allocate_rows(rows: Sequence[Mapping], target_bytes: int, scope: str,
                  damages: Mapping[str, Mapping[int, float]], block_size: int = 128,
                  group_size: int | None = None) -> tuple[list[dict], Allocation]:
    """Give every quantized row in ``scope`` the bits of the least-damage allocation that
    fits ``target_bytes``; rows outside the scope keep their policy bits. Returns all rows
    (with ``bits``, ``packed_bytes`` and ``damage`` updated) and the allocation."""
    in_scope = {_key(row) for row in rows_in_scope(rows, scope)}
    options, fixed = [], 0
    for row in rows:
        if _key(row) not in in_scope:
            continue
        if row["action"] == "quantize":
            if _key(row) not in damages:
                raise BudgetError(f"tensor {_key(row)!r}: no damage measured for it")
            options.append(tensor_options(_key(row), row["shape"], damages[_key(row)],
                                          block_size, group_size))
        else:
            fixed += tensor_nbytes(row["shape"], row["dtype"], None)[1]
    allocation = allocate(options, target_bytes, fixed)
    return apply_bits(rows, allocation.bits, damages, block_size, group_size), allocation


def apply_bits(rows: Sequence[Mapping], bits: Mapping[str, int],
               damages: Mapping[str, Mapping[int, float]] | None = None, block_size: int = 128,
               group_size: int | None = None) -> list[dict]:
    """Rows with the allocated bits (and their exact packed bytes and damage) filled in."""
    updated = []
    for row in rows:
        row = dict(row)
        key = _key(row)
        if row["action"] == "quantize" and key in bits:
            row["bits"] = bits[key]
            row["packed_bytes"] = tensor_nbytes(row["shape"], row["dtype"], bits[key],
                                                block_size, group_size)[1]
            if damages is not None and key in damages:
                row["damage"] = damages[key][bits[key]]
        updated.append(row)
    return updated


def budget_report(rows: Sequence[Mapping], allocation: Allocation, scope: str, sensitivity: str,
                  damage_source: str, damages: Mapping[str, Mapping[int, float]],
                  block_size: int = 128, group_size: int | None = None) -> dict:
    """The allocation as a small JSON-able summary: sizes, predicted error, the best uniform
    width that fits for comparison, and tables by module type and block."""
    quantized = [row for row in rows if row["action"] == "quantize" and _key(row) in allocation.bits]
    options = [tensor_options(_key(row), row["shape"], damages[_key(row)], block_size, group_size)
               for row in quantized]
    params = sum(math.prod(row["shape"]) for row in quantized)
    uniform_bits = best_uniform_bits(options, allocation.budget, allocation.fixed_bytes)
    uniform = None
    if uniform_bits is not None:
        u = uniform_allocation(options, uniform_bits, allocation.budget, allocation.fixed_bytes)
        uniform = {"bits": uniform_bits, "total_bytes": u.total_bytes,
                   "predicted_error": u.damage}
    return {
        "target_bytes": allocation.budget, "scope": scope, "sensitivity": sensitivity,
        "damage_source": damage_source, "error_unit": ERROR_UNITS[sensitivity],
        "total_bytes": allocation.total_bytes, "kept_bytes": allocation.fixed_bytes,
        "quantized_bytes": allocation.quantized_bytes,
        "smallest_bytes": smallest_size(options, allocation.fixed_bytes),
        "predicted_error": allocation.damage, "quantized_tensors": len(quantized),
        "quantized_params": params,
        "mean_bits": math.fsum(allocation.bits[_key(r)] * math.prod(r["shape"]) for r in quantized)
        / params if params else 0.0,
        "bits_per_weight": bits_per_weight(allocation.quantized_bytes, params),
        "best_uniform": uniform,
        **allocation_tables(quantized),
    }


def plan_budget(rows: Sequence[Mapping], target_bytes: int, scope: str = "package",
                sampler: Sampler = synthetic_sampler, damage_source: str = "synthetic",
                sensitivity: str = "params", stats: ActivationStats | None = None,
                block_size: int = 128, group_size: int | None = None, mode: str = "refined",
                seed: int = 0) -> tuple[list[dict], dict]:
    """Measure, allocate and report: (rows with allocated bits, report)."""
    scoped = {_key(row) for row in rows_in_scope(rows, scope)}
    damages = measure_damages([row for row in rows if _key(row) in scoped], sampler, sensitivity,
                              stats, block_size=block_size, group_size=group_size, mode=mode,
                              seed=seed)
    allocated, allocation = allocate_rows(rows, target_bytes, scope, damages, block_size,
                                          group_size)
    report = budget_report(allocated, allocation, scope, sensitivity, damage_source, damages,
                           block_size, group_size)
    report["bits"] = dict(allocation.bits)
    return allocated, report


@task(name="size-budget", persist_result=False)
def budget_task(inventory_path: str, source_root: str, target_size: str, scope: str = "package",
                block_size: int = 128, group_size: int | None = None,
                mode: str = "refined", seed: int = 0) -> dict:
    """Allocate bits for ``target_size`` on a saved inventory, measuring damage on the source's
    own rows, and rewrite the inventory with the allocated bits. Returns the report (without
    the per-tensor bits: the inventory and the manifest's tensor entries hold those)."""
    from hlwq.store.inventory import save_inventory

    table = pq.read_table(inventory_path)
    root = Path(source_root)
    allocated, report = plan_budget(table.to_pylist(), parse_size(target_size), scope,
                                    file_sampler(root if root.is_dir() else root.parent),
                                    "measured", block_size=block_size, group_size=group_size,
                                    mode=mode, seed=seed)
    columns = table.schema.names
    save_inventory(pa.Table.from_pylist([{name: row[name] for name in columns} for row in allocated],
                                        schema=table.schema), inventory_path)
    report.pop("bits")
    return report
