"""Size budgets around hlwq.quant.budget: measure each tensor's damage per format, allocate.

A format is a bit width (2-8) and a scale-group size (128-value blocks, 64- or 32-value
groups: hlwq.quant.budget.candidate_formats). Damage of tensor ``t`` in format ``f`` is
``sensitivity_t * relative_error_t(f)``:

- ``relative_error_t(f)`` is measured, never guessed: a seeded sample of the tensor's
  rows (whole rows, so every rotation block in it is a real one; about
  :data:`SAMPLE_WEIGHTS` values) is quantized with hlwq.quant.core in every candidate format
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
  input of every input channel, which weights the sampled error per channel; one backward
  pass with a random cotangent on the output then gives, for every layer at once, the
  relative error that reaches the model output per unit of the layer's own error
  (runtime/block_calibration.py:output_gains). Damage is then the predicted relative MSE of
  the model output (contributions summed, first order).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import task

from hlwq.quant.budget import (
    CANDIDATE_BITS,
    ActivationStats,
    Allocation,
    Format,
    allocate,
    allocation_tables,
    best_uniform_format,
    block_and_module,
    candidate_formats,
    format_label,
    sample_rows,
    smallest_size,
    tensor_options,
    uniform_allocation,
    weighted_relative_mse,
)
from hlwq.quant.choices import SCOPES, SENSITIVITIES, SENSITIVITY_CHOICES
from hlwq.quant.core import dequantize, quantize_tensor
from hlwq.quant.errors import BudgetError, InvalidOptionError
from hlwq.quant.sizes import (
    bits_per_weight,
    padded_in_features,
    parse_size,
    tensor_nbytes,
)
from hlwq.store.artifact import tensor_key
from hlwq.store.safetensors_io import read_rows
from hlwq.store.source_tree import checked_file

CALIBRATION_PROMPTS = 2       # prompts of the suite whose first denoising step calibrates,
                              # conditional pass only (calibration_inputs)
SAMPLE_WEIGHTS = 1 << 16      # values quantized per tensor and width: ~500 blocks of 128
MIN_SAMPLE_ROWS = 8
EDGE_FRACTION = 1 / 8         # "params" prior: the first and last eighth of the blocks ...
EDGE_WEIGHT = 2.0             # ... count twice
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


def synthetic_rows(in_features: int, count: int, seed: int = 0) -> torch.Tensor:
    """Trained-looking rows of width ``in_features``: Student-t(5), outlier columns x8."""
    from hlwq.quant.synthetic import TensorSpec, synthetic_tensor

    spec = TensorSpec(f"budget/synthetic/{in_features}", "weight", (count, in_features), "linear")
    return synthetic_tensor(spec, seed)


def relative_errors(sample: torch.Tensor, formats: Iterable[Format] | None = None,
                    block_size: int = 128, mode: str = "refined",
                    channel_weights: torch.Tensor | None = None,
                    name: str | None = None) -> dict[Format, float]:
    """Relative error of ``sample`` quantized in each format (hlwq.quant.budget.weighted_relative_mse;
    default: every candidate format)."""
    errors = {}
    for bits, group in formats or candidate_formats(block_size):
        packed = quantize_tensor(sample, bits, block_size, mode, group, name=name)
        errors[bits, group] = weighted_relative_mse(sample, dequantize(packed), channel_weights)
    return errors


# --------------------------------------------------------------------------- sensitivity


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


def activation_stats(model: torch.nn.Module, forward: Callable[[], object], component: str,
                     names: Iterable[str] | None = None, seed: int = 0) -> ActivationStats:
    """Per-channel input mean squares and output gains of ``model``'s linears.

    ``forward()`` runs the model on fixed inputs and returns its output (a tensor or a
    tuple of tensors). ``names`` limits the work to those weight names (``"<module>.weight"``).
    Costs one forward and one backward (runtime/block_calibration.py:output_gains)."""
    from hlwq.runtime.block_calibration import add_gains, output_gains

    wanted = None if names is None else set(names)
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)
               and (wanted is None or f"{name}.weight" in wanted)}
    stats = ActivationStats()
    add_gains(stats, output_gains(model, linears, [forward], seed)[0], component)
    return stats


class _Captured(Exception):
    """Stops a render at the transformer's first call (its inputs are all calibration needs)."""


def first_step_inputs(pipeline, request, device: str = "cpu") -> dict:
    """The keyword arguments of the transformer's first call when rendering ``request``."""
    from hlwq.tasks.render import render_arguments

    captured = {}

    def grab(module, args, kwargs):
        captured.update({k: v.detach().clone() if torch.is_tensor(v) else v
                         for k, v in kwargs.items() if k != "return_dict"})
        raise _Captured

    handle = pipeline.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            pipeline(**render_arguments(request, device))
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured


def calibration_inputs(pipeline, requests, device: str = "cpu") -> list[dict]:
    """The transformer calls a calibration measures: the first denoising step of each of
    ``requests``, its conditional pass only. Every render runs that pass (a distilled model
    runs nothing else); the unconditional half of classifier-free guidance would double the
    cost and, on the tiny fixture, ranks the layers no differently (Spearman against nine
    prompts with both halves: 0.953 for the conditional passes of two prompts, 0.933 with both
    halves; two cotangent seeds agree at 0.92-0.99)."""
    inputs = []
    for request in requests:
        kwargs = first_step_inputs(pipeline, request, device)   # sets the pipeline's guidance
        guided = getattr(pipeline, "do_classifier_free_guidance", False)
        inputs.append(conditional_pass(kwargs, guided))
    return inputs


def conditional_pass(kwargs: dict, guided: bool) -> dict:
    """A transformer call's conditional half: the pipeline batches classifier-free guidance as
    [unconditional, conditional] along the first dimension of every batched input."""
    batch = kwargs["hidden_states"].shape[0]
    if not guided or batch % 2:
        return kwargs
    return {name: value.chunk(2)[1] if torch.is_tensor(value) and value.dim()
            and value.shape[0] == batch else value for name, value in kwargs.items()}


def suite_activation_stats(source_root: str | os.PathLike, rows: Sequence[Mapping],
                           suite: str | os.PathLike | None = None,
                           prompts: int = CALIBRATION_PROMPTS, device: str = "auto",
                           block_size: int = 128) -> tuple[ActivationStats, dict]:
    """Output sensitivity of the transformer's quantized linears (``rows``), measured on the
    first denoising step of the first ``prompts`` prompts of the suite. Returns the statistics
    and what they were measured on."""
    from hlwq.tasks.render import resolve_device, resolve_factory
    from hlwq.tasks.validate_output import SOURCE_FACTORY, load_suite

    started = time.perf_counter()
    device, dtype = resolve_device(device)
    requests = load_suite(suite)[:prompts]
    pipeline = resolve_factory(SOURCE_FACTORY)(source_root, dtype=dtype).to(device)
    pipeline.set_progress_bar_config(disable=True)
    inputs = calibration_inputs(pipeline, requests, device)
    transformer = pipeline.transformer

    def forward():
        return [transformer(**kwargs, return_dict=False) for kwargs in inputs]

    stats = activation_stats(transformer, forward, "transformer", _transformer_names(rows))
    stats.calibration = calibration_record(suite, requests, device, inputs, started)
    return stats, stats.calibration


def _transformer_names(rows: Sequence[Mapping]) -> set[str]:
    """The transformer weight names of ``rows`` (diffusers names, for official files too)."""
    return {key.removeprefix("transformer/") for row in rows for key in _stats_keys(row)
            if key.startswith("transformer/")}


def calibration_record(suite, requests, device: str, inputs: list[dict], started: float) -> dict:
    """What a calibration measured on and what it cost: the suite, prompts, device, and per
    stream the tokens of its transformer calls (their conditional passes)."""
    from hlwq.tasks.validate_output import suite_identity

    def tokens(name):
        return sum(kwargs[name].shape[:-1].numel() for kwargs in inputs if name in kwargs)

    return {"suite": suite_identity(suite)["name"], "prompts": [r.id for r in requests],
            "device": device, "step": "first denoising step (conditional pass)",
            "calls": len(inputs),
            "sequences": sum(kwargs["hidden_states"].shape[0] for kwargs in inputs),
            "video_tokens": tokens("hidden_states"), "audio_tokens": tokens("audio_hidden_states"),
            "text_tokens": tokens("encoder_hidden_states"),
            "seconds": round(time.perf_counter() - started, 1)}


def choose_sensitivity(rows: Sequence[Mapping], source_root: str | os.PathLike, scope: str,
                       sensitivity: str = "auto", suite: str | os.PathLike | None = None,
                       device: str = "auto",
                       block_size: int = 128) -> tuple[str, ActivationStats | None, str]:
    """(sensitivity, statistics, why): output sensitivity where the source runs as a whole
    pipeline and every quantized tensor in scope is a transformer linear; ``params`` else."""
    from hlwq.tasks.validate_output import renderable_source

    if sensitivity not in SENSITIVITY_CHOICES:
        raise InvalidOptionError(f"--sensitivity {sensitivity!r}: must be one of "
                                 f"{', '.join(SENSITIVITY_CHOICES)}")
    if sensitivity == "params":
        return "params", None, "asked for (--sensitivity params)"
    quantized = [r for r in rows_in_scope(rows, scope) if r["action"] == "quantize"]
    others = sorted({r["component"] for r in quantized if r["component"] != "transformer"})
    shortfall = _memory_shortfall(rows, device)
    streamable = shortfall and (Path(source_root) / "transformer" / "config.json").is_file()
    problem = renderable_source(source_root) or (None if streamable else shortfall) or (
        f"quantized tensors of {', '.join(others)} lie outside the transformer, whose output "
        "the calibration measures" if others else None)
    if problem:
        if sensitivity == "activations":
            raise BudgetError(f"--sensitivity activations: the model's output cannot be "
                              f"measured: {problem}; use --sensitivity params or auto")
        return "params", None, f"fallback: the model cannot run here ({problem})"
    if streamable:
        stats, measured = streamed_suite_stats(source_root, quantized, suite, device=device)
        how = f"block by block, each block's output (the whole model does not fit: {shortfall})"
    else:
        stats, measured = suite_activation_stats(source_root, quantized, suite, device=device,
                                                 block_size=block_size)
        how = "the model's output"
    return "activations", stats, (
        f"measured: {how} on the {measured['step']} of prompts {', '.join(measured['prompts'])} "
        f"of suite {measured['suite']} ({measured['device']}; {measured['sequences']} sequences: "
        f"{measured['video_tokens']} video, {measured['audio_tokens']} audio and "
        f"{measured['text_tokens']} text tokens, one forward and one backward, "
        f"{measured['seconds']} s)")


def streamed_suite_stats(source_root: str | os.PathLike, rows: Sequence[Mapping],
                         suite: str | os.PathLike | None = None,
                         prompts: int = CALIBRATION_PROMPTS,
                         device: str = "auto") -> tuple[ActivationStats, dict]:
    """:func:`suite_activation_stats` for a transformer that does not fit: the pipeline runs
    up to the transformer's first call with a weightless (meta) transformer, then
    runtime/block_calibration.py streams the blocks (diffusers folders)."""
    import json

    from hlwq.runtime.block_calibration import calibration_dtype, streamed_activation_stats
    from hlwq.runtime.ltx23_models import build_model, load_ltx23_pipeline
    from hlwq.tasks.render import resolve_device
    from hlwq.tasks.validate_output import load_suite

    started = time.perf_counter()
    device, dtype = resolve_device(device)
    folder = Path(source_root) / "transformer"
    requests = load_suite(suite)[:prompts]
    weightless = build_model("transformer", json.loads((folder / "config.json").read_text()),
                             device="meta")
    pipeline = load_ltx23_pipeline(source_root, dtype=dtype, transformer=weightless)
    pipeline.set_progress_bar_config(disable=True)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module) and component is not weightless:
            component.to(device)
    inputs = calibration_inputs(pipeline, requests, device)
    del pipeline
    stats, _ = streamed_activation_stats(folder, inputs, _transformer_names(rows), device=device,
                                         dtype=calibration_dtype(device, dtype))
    stats.calibration = calibration_record(suite, requests, device, inputs, started)
    return stats, stats.calibration


def _memory_shortfall(rows: Sequence[Mapping], device: str) -> str | None:
    """Why the whole source does not fit on ``device`` (None when it does)."""
    import psutil

    from hlwq.quant.sizes import format_size
    from hlwq.tasks.render import resolve_device

    device, dtype = resolve_device(device)
    need = sum(math.prod(row["shape"]) for row in rows) * torch.empty((), dtype=dtype).element_size()
    have = (torch.cuda.mem_get_info(torch.device(device))[0] if device.startswith("cuda")
            else psutil.virtual_memory().available)
    if need > have:
        return (f"the model needs about {format_size(need)} on {device}, "
                f"{format_size(have)} are free")
    return None


# --------------------------------------------------------------------------- damage


Sampler = Callable[[Mapping, int, int], torch.Tensor]   # (row, rows wanted, seed) -> (k, in) float


def file_sampler(source_base: str | os.PathLike) -> Sampler:
    """Sample rows from the checkpoint files an inventory points at (``row["file"]``), read
    through the source tree's checks like every source read."""
    base = Path(source_base)

    def sample(row: Mapping, count: int, seed: int) -> torch.Tensor:
        indices = sample_rows(row["shape"][0], count, seed, _key(row))
        return read_rows(checked_file(base, row["file"]), row, indices)
    return sample


def synthetic_sampler(row: Mapping, count: int, seed: int) -> torch.Tensor:
    """Synthetic rows of the tensor's width (for plans without weights)."""
    return synthetic_rows(row["shape"][1], count, seed)


def measure_damages(rows: Sequence[Mapping], sampler: Sampler = synthetic_sampler,
                    sensitivity: str = "params", stats: ActivationStats | None = None,
                    bits: Iterable[int] = CANDIDATE_BITS, block_size: int = 128,
                    group_size: int | None = None, mode: str = "refined",
                    seed: int = 0) -> dict[str, dict[Format, float]]:
    """``{tensor_key: {(bits, group_size): damage}}`` for every quantized row (module
    docstring): ``bits`` x every candidate group size, or only ``group_size`` when given.

    Samples that cannot differ (synthetic ones of one width) are measured once."""
    if sensitivity not in SENSITIVITIES:
        raise InvalidOptionError(f"sensitivity={sensitivity!r}: must be one of "
                                 f"{', '.join(SENSITIVITIES)}")
    if sensitivity == "activations" and stats is None:
        raise BudgetError("sensitivity 'activations' needs activation statistics from a run of "
                          "the model (hlwq.tasks.budget.activation_stats); use 'params' without one")
    # The reference encoder has one scale per block: no group sizes to choose from.
    formats = candidate_formats(block_size, block_size if mode == "reference" else group_size,
                                bits)
    rows = [row for row in rows if row["action"] == "quantize"]
    shares = params_sensitivity(rows) if sensitivity == "params" else None
    cache: dict[tuple, dict[int, float]] = {}
    damages = {}
    for row in rows:
        key, count = _key(row), sample_row_count(row["shape"], block_size)
        if sensitivity == "params":
            cache_key = (row["shape"][1], count) if sampler is synthetic_sampler else (key,)
            if cache_key not in cache:
                cache[cache_key] = relative_errors(sampler(row, count, seed), formats,
                                                   block_size, mode, name=key)
            damages[key] = {b: shares[key] * e for b, e in cache[cache_key].items()}
            continue
        weights, gain = _activation_entry(stats, row)
        errors = relative_errors(sampler(row, count, seed), formats, block_size, mode, weights,
                                 name=key)
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
                  damages: Mapping[str, Mapping[Format, float]],
                  block_size: int = 128) -> tuple[list[dict], Allocation]:
    """Give every quantized row in ``scope`` the format of the least-damage allocation that
    fits ``target_bytes``; rows outside the scope keep their policy's. Returns all rows
    (``bits``, ``group_size``, ``packed_bytes`` and ``damage`` updated) and the allocation."""
    in_scope = {_key(row) for row in rows_in_scope(rows, scope)}
    options, fixed = [], 0
    for row in rows:
        if _key(row) not in in_scope:
            continue
        if row["action"] == "quantize":
            if _key(row) not in damages:
                raise BudgetError(f"tensor {_key(row)!r}: no damage measured for it")
            options.append(tensor_options(_key(row), row["shape"], damages[_key(row)],
                                          block_size))
        else:
            fixed += tensor_nbytes(row["shape"], row["dtype"], None)[1]
    allocation = allocate(options, target_bytes, fixed)
    return apply_formats(rows, allocation.formats, damages, block_size), allocation


def apply_formats(rows: Sequence[Mapping], formats: Mapping[str, Format],
                  damages: Mapping[str, Mapping[Format, float]] | None = None,
                  block_size: int = 128) -> list[dict]:
    """Rows with the allocated formats (and their exact packed bytes and damage) filled in."""
    updated = []
    for row in rows:
        row = dict(row)
        key = _key(row)
        if row["action"] == "quantize" and key in formats:
            bits, group = formats[key]
            row["bits"], row["group_size"] = bits, group
            row["packed_bytes"] = tensor_nbytes(row["shape"], row["dtype"], bits, block_size,
                                                group)[1]
            if damages is not None and key in damages:
                row["damage"] = damages[key][bits, group]
        updated.append(row)
    return updated


def budget_report(rows: Sequence[Mapping], allocation: Allocation, scope: str, sensitivity: str,
                  damage_source: str, damages: Mapping[str, Mapping[Format, float]],
                  block_size: int = 128) -> dict:
    """The allocation as a small JSON-able summary: sizes, predicted error, the chosen mix of
    formats, the best uniform format that fits for comparison, and tables by module type
    and block."""
    quantized = [row for row in rows
                 if row["action"] == "quantize" and _key(row) in allocation.formats]
    options = [tensor_options(_key(row), row["shape"], damages[_key(row)], block_size)
               for row in quantized]
    params = sum(math.prod(row["shape"]) for row in quantized)
    best = best_uniform_format(options, allocation.budget, allocation.fixed_bytes)
    uniform = None
    if best is not None:
        u = uniform_allocation(options, *best, allocation.budget, allocation.fixed_bytes)
        uniform = {"bits": best[0], "group_size": best[1],
                   "format": format_label(*best, block_size), "total_bytes": u.total_bytes,
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
        **allocation_tables(quantized, block_size),
    }


def plan_budget(rows: Sequence[Mapping], target_bytes: int, scope: str = "package",
                sampler: Sampler = synthetic_sampler, damage_source: str = "synthetic",
                sensitivity: str = "params", stats: ActivationStats | None = None,
                block_size: int = 128, group_size: int | None = None, mode: str = "refined",
                seed: int = 0) -> tuple[list[dict], dict]:
    """Measure, allocate and report: (rows with allocated formats, report). ``group_size``
    limits the formats to that group size (default: every candidate group size)."""
    scoped = {_key(row) for row in rows_in_scope(rows, scope)}
    damages = measure_damages([row for row in rows if _key(row) in scoped], sampler, sensitivity,
                              stats, block_size=block_size, group_size=group_size, mode=mode,
                              seed=seed)
    allocated, allocation = allocate_rows(rows, target_bytes, scope, damages, block_size)
    report = budget_report(allocated, allocation, scope, sensitivity, damage_source, damages,
                           block_size)
    report["bits"] = allocation.bits
    report["group_sizes"] = allocation.group_sizes
    return allocated, report


@task(name="size-budget", persist_result=False)
def budget_task(inventory_path: str, source_root: str, target_size: str, scope: str = "package",
                block_size: int = 128, group_size: int | None = None,
                mode: str = "refined", seed: int = 0, sensitivity: str = "auto",
                suite: str | None = None, device: str = "auto") -> dict:
    """Allocate formats for ``target_size`` on a saved inventory, measuring damage on the
    source's own rows (weighted by output sensitivity where the model runs:
    :func:`choose_sensitivity`), and rewrite the inventory with the allocated bits and group
    sizes. Returns the report (without the per-tensor formats: the inventory and the
    manifest's tensor entries hold those)."""
    from hlwq.store.inventory import save_inventory

    table = pq.read_table(inventory_path)
    rows = table.to_pylist()
    root = Path(source_root)
    sensitivity, stats, why = choose_sensitivity(rows, root, scope, sensitivity, suite, device,
                                                 block_size)
    allocated, report = plan_budget(rows, parse_size(target_size), scope,
                                    file_sampler(root if root.is_dir() else root.parent),
                                    "measured", sensitivity, stats, block_size=block_size,
                                    group_size=group_size, mode=mode, seed=seed)
    columns = table.schema.names
    save_inventory(pa.Table.from_pylist([{name: row[name] for name in columns} for row in allocated],
                                        schema=table.schema), inventory_path)
    report.pop("bits")
    report.pop("group_sizes")
    report["sensitivity_source"] = why
    report["calibration"] = stats.calibration if stats is not None else None
    return report
