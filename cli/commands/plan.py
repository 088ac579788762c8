"""`hlwq plan`: what a quantization would produce, before anything is downloaded or quantized.

Local checkpoints and Hub repos are planned from their safetensors headers
only; ``--layout ltx23-22b`` needs no checkpoint at all (the real LTX-2.3
transformer built on the meta device).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from hlwq.cli.commands.options import source_file_options, target_size_options
from hlwq.quant.errors import InvalidOptionError
from hlwq.quant.sizes import format_bytes

AUTO_POLICY = "auto"
KNOWN_PACKAGES = ("ltx23-22b",)
COUNT_UNITS = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))


@click.command()
@click.argument("source", required=False)
@click.option("--layout", "known_package", type=click.Choice(KNOWN_PACKAGES),
              help="Plan a known model layout instead of a SOURCE (nothing is read).")
@click.option("--policy", "policy_name", default=AUTO_POLICY, show_default=True,
              help="ltx23, ltx23-full, generic, a TOML/YAML policy file, or auto "
                   "(ltx23 for LTX-2.3 layouts, generic otherwise).")
@click.option("--bits", default=5, show_default=True, type=int, help="Bits per quantized weight.")
@click.option("--block-size", default=128, show_default=True, type=int,
              help="Rotation block size (a power of two).")
@click.option("--revision", help="Branch, tag or commit of a Hub SOURCE.")
@source_file_options
@click.option("--include", multiple=True, help="Also quantize tensors matching this glob "
                                               "(or re:REGEX). Repeatable.")
@click.option("--exclude", multiple=True, help="Keep tensors matching this glob (or re:REGEX). "
                                               "Repeatable.")
@click.option("--overrides", type=click.Path(dir_okay=False),
              help="TOML/YAML file with include, exclude and per-pattern bits.")
@target_size_options
@click.option("--device-memory", metavar="SIZE",
              help="Predict peak accelerator memory per offload mode and stage for a render, "
                   "and say which modes fit SIZE (e.g. 16GB).")
@click.option("--resolution", default="768x512", show_default=True,
              help="WIDTHxHEIGHT of the render the memory plan predicts.")
@click.option("--frames", default=121, show_default=True, type=click.IntRange(min=1),
              help="Frames of the render the memory plan predicts.")
@click.option("--vae-tiling", is_flag=True, help="The memory plan assumes tiled VAE decoding.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(source, known_package, policy_name, bits, block_size, revision, files, exclude_files,
         include, exclude, overrides, target_size, target_scope, device_memory, resolution,
         frames, vae_tiling, as_json):
    """Per-component tensors, parameters, original and packed bytes of SOURCE
    (a Hub repo id, a folder or a .safetensors file). SOURCE may also be a packed artifact:
    with --device-memory, its memory plan."""
    from hlwq.quant.core import check_options
    from hlwq.quant.sizes import size_table
    from hlwq.store.inventory import default_policy_for, rows_from_headers
    from hlwq.store.policy import load_policy

    check_options(bits, block_size, None, "refined")
    if (source is None) == (known_package is None):
        raise click.UsageError("give exactly one of SOURCE or --layout")
    shape = _render_shape(device_memory, resolution, frames, vae_tiling)
    if source is not None and (Path(source) / "manifest.json").is_file():   # a packed artifact
        from hlwq.runtime.memory_plan import artifact_inputs

        if shape is None:
            raise click.UsageError(f"{source} is a packed artifact: give --device-memory SIZE "
                                   "for its memory plan")
        report = {"source": str(source), "artifact": True,
                  "memory": _memory_plan(*artifact_inputs(source), shape, device_memory)}
        click.echo(json.dumps(report, indent=2) if as_json else format_memory(report["memory"]))
        return
    label, layout, headers, package_rows, base = _planned_source(
        source, known_package, revision, list(files) or None, list(exclude_files) or None)
    if policy_name == AUTO_POLICY:
        policy_name = default_policy_for(layout)
    policy = load_policy(policy_name, bits=bits, include=include, exclude=exclude,
                         overrides_file=overrides)
    if package_rows is not None:
        rows = apply_policy(package_rows, policy)
    else:
        rows = rows_from_headers(headers, layout, policy, block_size)
    budget = None
    if target_size is not None:
        rows, budget = _budget(rows, target_size, target_scope, base, block_size)
    sizes = size_table(rows, block_size)
    report = {"source": label, "layout": layout, "policy": policy.name, "bits": bits,
              "block_size": block_size, **sizes}
    if budget is not None:
        report["budget"] = budget
    if shape is not None:
        report["memory"] = _planned_memory(rows, source, block_size, shape, device_memory)
    text = format_plan(report) + ("\n\n" + format_memory(report["memory"])
                                  if "memory" in report else "")
    click.echo(json.dumps(report, indent=2) if as_json else text)


def _render_shape(device_memory, resolution, frames, vae_tiling):
    """The render the memory plan predicts; None when no --device-memory was given."""
    if device_memory is None:
        return None
    from hlwq.runtime.memory_plan import RenderShape, parse_resolution

    width, height = parse_resolution(resolution)
    return RenderShape(width=width, height=height, frames=frames, vae_tiling=vae_tiling)


def _memory_plan(weights, configs, shape, device_memory) -> dict:
    from hlwq.quant.sizes import parse_size
    from hlwq.runtime.memory_plan import memory_plan

    return memory_plan(weights, configs, shape, parse_size(device_memory, "--device-memory"))


def _planned_memory(rows, source, block_size, shape, device_memory) -> dict:
    """The memory plan of what the plan would produce (packed sizes per tensor)."""
    from hlwq.quant.sizes import tensor_nbytes
    from hlwq.runtime.memory_plan import component_weights, folder_configs, layout_configs

    sized = [{**row, "packed_bytes": tensor_nbytes(row["shape"], row["dtype"], row["bits"],
                                                   block_size)[1]} for row in rows]
    local = source is not None and Path(source).expanduser().exists()
    configs = folder_configs(Path(source).expanduser()) if local else layout_configs()
    return _memory_plan(component_weights(sized), configs, shape, device_memory)


def format_memory(memory: dict) -> str:
    """Peak memory per mode and stage, and which modes fit."""
    stages = [s["name"] for s in next(iter(memory["modes"].values()))["stages"]]
    header = ("mode", *stages, "peak", *(("fits",) if "fits" in memory else ()))
    body = []
    for mode, entry in memory["modes"].items():
        cells = [f"{format_bytes(s['weights_bytes'])} + {format_bytes(s['activation_bytes'])}"
                 for s in entry["stages"]]
        fits = (("yes" if memory["fits"][mode] else "no"),) if "fits" in memory else ()
        body.append((mode, *cells, format_bytes(entry["peak_bytes"]), *fits))
    title = (f"Memory plan: {memory['resolution']}, {memory['frames']} frames "
             f"({memory['video_tokens']:,} video + {memory['audio_tokens']:,} audio tokens, "
             f"batch {memory['batch']}{', tiled VAE' if memory['vae_tiling'] else ''}); "
             "weights + activations per stage")
    lines = [title, "", *_aligned([header, *body], total_rule=False)]
    if "fits" in memory:
        lines += ["", (f"device memory {format_bytes(memory['device_memory_bytes'])} "
                       f"(minus {format_bytes(memory['reserve_bytes'])} reserve): " +
                       (f"recommended --offload {memory['recommended']}" if memory["recommended"]
                        else "no mode fits (try --vae-tiling, fewer frames or a lower resolution)"))]
    return "\n".join(lines)


def _planned_source(source, known_package, revision, files, exclude_files):
    """(label, layout, headers, package rows): headers for checkpoints, rows for --layout."""
    from hlwq.store import inventory

    if known_package:
        if revision or files or exclude_files:
            raise InvalidOptionError("--revision, --files and --exclude-files choose what to "
                                     "read of a SOURCE; --layout reads no checkpoint")
        from hlwq.runtime.ltx23_models import ltx23_22b_package_rows

        return known_package, known_package, None, ltx23_22b_package_rows(), None
    path = Path(source).expanduser()
    if path.exists():   # an existing path wins over a Hub id of the same spelling
        if revision:
            raise InvalidOptionError(f"--revision {revision!r}: only a Hub source has revisions, "
                                     f"but {source!r} is a local path")
        from hlwq.tasks.sources import local_source_files

        _, _, names = local_source_files(path, files, exclude_files)
        headers = inventory.local_headers(path, names)
        layout = inventory.layout_of(headers, inventory.has_model_index(path), path)
        label = str(path)
        base = path if path.is_dir() else path.parent
    else:   # headers by HTTP Range requests; nothing is downloaded
        from hlwq.tasks.sources import (
            list_remote_files,
            parse_hub_source,
            remote_safetensors_headers,
        )

        hub = parse_hub_source(source, revision)
        patterns = {"allow_patterns": files, "ignore_patterns": exclude_files}
        commit, listed = list_remote_files(hub.repo, hub.revision, **patterns)
        # that commit, even if the branch moves
        headers = remote_safetensors_headers(hub.repo, commit, **patterns)
        layout = inventory.layout_of(headers, inventory.MODEL_INDEX in listed, hub.repo)
        label = f"{hub.repo}@{hub.revision} (commit {commit})"
        base = None
    return label, layout, headers, None, base


def _budget(rows, target_size, scope, base, block_size):
    """Allocate bits for the target size: damage measured on the checkpoint's own rows when
    it is local, on synthetic heavy-tailed rows of each tensor's width otherwise."""
    from hlwq.quant.sizes import parse_size
    from hlwq.tasks.budget import file_sampler, plan_budget, synthetic_sampler

    target = parse_size(target_size)
    if base is None:
        return plan_budget(rows, target, scope, synthetic_sampler, "synthetic",
                           block_size=block_size)
    return plan_budget(rows, target, scope, file_sampler(base), "measured", block_size=block_size)


def apply_policy(rows, policy) -> list[dict]:
    """Add the policy's action and bits to rows that carry component, tensor, shape and dtype."""
    decided = []
    for row in rows:
        decision = policy.decide(row["tensor"], tuple(row["shape"]), row["dtype"], row["component"])
        decided.append({**row, "action": decision.action, "bits": decision.bits,
                        "reason": decision.reason})
    return decided


def format_plan(report: dict) -> str:
    header = ("component", "tensors", "quantized", "params", "original", "packed", "bits/weight")
    rows = [_table_row(name, entry) for name, entry in report["components"].items()]
    total = _table_row("total", {
        "tensors": report["total_tensors"], "quantized_tensors": report["quantized_tensors"],
        "params": report["total_params"], "original_bytes": report["total_original_bytes"],
        "packed_bytes": report["total_packed_bytes"], "bits_per_weight": report["bits_per_weight"],
    })
    bits = "bits chosen for the size budget" if "budget" in report else f"{report['bits']}-bit"
    title = (f"Plan for {report['source']}: layout {report['layout']}, policy {report['policy']}, "
             f"{bits}, block {report['block_size']}")
    quantized = (f"quantized: {report['quantized_tensors']:,} tensors, "
                 f"{format_count(report['quantized_params'])} params -> "
                 f"{format_bytes(report['quantized_packed_bytes'])} packed")
    lines = [title, "", *_aligned([header, *rows, total]), "", quantized]
    if "budget" in report:
        lines += ["", *format_budget(report["budget"])]
    return "\n".join(lines)


def format_budget(budget: dict) -> list[str]:
    """The allocation: sizes, predicted error, and bits per module type and per block."""
    samples = {"measured": "sampled rows of the checkpoint's own tensors",
               "synthetic": "synthetic Student-t(5) rows with outlier columns of each "
                            "tensor's width (no weights read)"}
    uniform = budget["best_uniform"]
    lines = [
        (f"Size budget {format_bytes(budget['target_bytes'])} for scope {budget['scope']}: "
         f"{format_bytes(budget['total_bytes'])} = {format_bytes(budget['kept_bytes'])} kept + "
         f"{format_bytes(budget['quantized_bytes'])} quantized"),
        (f"  {budget['quantized_tensors']:,} tensors, {format_count(budget['quantized_params'])} "
         f"params at {budget['mean_bits']:.3f} bits on average "
         f"({budget['bits_per_weight']:.3f} bits/weight stored, scales included)"),
        (f"  predicted error {budget['predicted_error']:.4g} ({budget['error_unit']}; "
         f"damage from {samples.get(budget['damage_source'], budget['damage_source'])})"),
        ("  best uniform format that fits: none" if uniform is None else
         f"  best uniform format that fits: {uniform['format']}, "
         f"{format_bytes(uniform['total_bytes'])}, predicted error "
         f"{uniform['predicted_error']:.4g}"),
    ]
    formats = budget["formats"]
    mix = [(label, f"{e['tensors']:,}", format_count(e["params"]), format_bytes(e["packed_bytes"]),
            f"{e['bits_per_weight']:.3f}") for label, e in formats.items()]
    mix_total = ("total", f"{budget['quantized_tensors']:,}", format_count(budget["quantized_params"]),
                 format_bytes(budget["quantized_bytes"]), f"{budget['bits_per_weight']:.3f}")
    lines += ["", *_aligned([("format", "tensors", "params", "packed", "bits/weight"), *mix,
                             mix_total])]
    total = ("total", f"{budget['quantized_tensors']:,}", format_count(budget["quantized_params"]),
             format_bytes(budget["quantized_bytes"]), f"{budget['mean_bits']:.2f}",
             *(str(e["tensors"]) for e in formats.values()))
    for title, table in (("module", budget["modules"]), ("block", budget["blocks"])):
        header = (title, "tensors", "params", "packed", "mean bits", *formats)
        body = [(name, f"{e['tensors']:,}", format_count(e["params"]), format_bytes(e["packed_bytes"]),
                 f"{e['mean_bits']:.2f}", *(str(e["formats"].get(label, "")) for label in formats))
                for name, e in table.items()]
        lines += ["", *_aligned([header, *body, total])]
    return lines


def _table_row(name: str, entry: dict) -> tuple[str, ...]:
    return (name, f"{entry['tensors']:,}", f"{entry['quantized_tensors']:,}",
            format_count(entry["params"]), format_bytes(entry["original_bytes"]),
            format_bytes(entry["packed_bytes"]), f"{entry['bits_per_weight']:.2f}")


def _aligned(rows: list[tuple[str, ...]], total_rule: bool = True) -> list[str]:
    """Left-align the first column, right-align the numbers; a rule above the last (total) row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width
                                                   in zip(row[1:], widths[1:])]) for row in rows]
    if total_rule:
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return lines


def format_count(count: int) -> str:
    for unit, size in COUNT_UNITS:
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)
