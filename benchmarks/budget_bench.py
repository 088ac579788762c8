"""`hlwq bench budget`: budgeted mixed precision against the best uniform width that fits.

Three parts, one JSON (benchmarks/results/budget.json):

- ``tiny``: the tiny LTX-2.3 fixture. Damage is measured on its own transformer weights;
  sensitivity either ``params`` or ``activations`` (first denoising step of calibration
  prompts of the suite, disjoint from the evaluation prompts). For each budget, the
  allocations and the best uniform width that fits are rendered on the evaluation prompts
  with the same seeds as the source (tasks/validate_output.py's renders and metrics:
  final-latent relative error, video PSNR, ...; the default ``[output]`` gates decide
  pass/fail), plus the relative error of the transformer's first-step output. A sweep of
  smaller budgets finds the smallest size at which the default gates still pass.
- ``real_width``: the real-width transformer fixture (``--real-width-layers`` blocks,
  synthetic inputs); error of one transformer forward, calibration and evaluation inputs
  drawn with different seeds.
- ``ltx23_22b``: the real LTX-2.3 layout on the meta device (damage from synthetic
  heavy-tailed rows; no weights exist here): uniform Q5 and the 15 GB targets per scope.

Quantized weights are set to their HLWQ reconstruction (hlwq.quant.core quantize + dequantize,
the numerics the packed runtime decodes) in the loaded model, so each configuration costs
one quantization pass and no artifact on disk.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import click
import torch

from hlwq.quant.budget import candidate_formats, format_label
from hlwq.quant.core import dequantize, quantize_tensor
from hlwq.quant.errors import BudgetError
from hlwq.quant.sizes import parse_size, size_table
from hlwq.store.atomic import atomic_write_text

RESULTS = Path(__file__).with_name("results") / "budget.json"
EVAL_PROMPTS = ("face-old-man-laughs", "sound-drummer")
CALIBRATION_PROMPTS = ("motion-cat-table", "face-woman-speaks", "text-neon-sign")


# --------------------------------------------------------------------------- helpers


def machine() -> dict:
    return {"platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "processor": platform.processor() or platform.machine()}


class WeightSetter:
    """Sets named weights of a model to their reconstruction at given widths, and back."""

    def __init__(self, model: torch.nn.Module, names, cache: bool = True,
                 keep_dtype: torch.dtype | None = None):
        # keep_dtype: hold the originals in this dtype (bfloat16 is lossless for BF16 files)
        self.model = model
        self.originals = {name: model.get_parameter(name).detach().to(keep_dtype, copy=True)
                          for name in names}
        self.cache = {} if cache else None

    @torch.no_grad()
    def apply(self, formats: dict[str, tuple[int, int]]) -> None:
        """Set each weight to its reconstruction in ``formats[name]`` = (bits, group size)."""
        for name, original in self.originals.items():
            bits, group = formats[name]
            key = (name, bits, group)
            weight = self.cache.get(key) if self.cache is not None else None
            if weight is None:
                weight = dequantize(quantize_tensor(original.float(), bits, group_size=group,
                                                    name=name))
                if self.cache is not None:
                    self.cache[key] = weight
            self.model.get_parameter(name).copy_(weight)

    @torch.no_grad()
    def restore(self) -> None:
        for name, original in self.originals.items():
            self.model.get_parameter(name).copy_(original)


def output_rel_err(reference: list, candidate: list) -> float:
    ref = torch.cat([t.double().reshape(-1) for out in reference for t in out])
    new = torch.cat([t.double().reshape(-1) for out in candidate for t in out])
    return math.sqrt(float((new - ref).square().sum()) / float(ref.square().sum()))


def _key(row) -> str:
    from hlwq.store.artifact import tensor_key

    return tensor_key(row["component"], row["tensor"])


def uniform_sizes(rows, formats) -> dict[str, int]:
    """Total bytes of ``rows`` with every quantized tensor in one format, by format label."""
    return {format_label(*f): size_table([{**r, "bits": f[0], "group_size": f[1]} for r in rows])
            ["total_packed_bytes"] for f in formats}


def uniform_config(budget: str, budget_bytes: int, quantized, fmt) -> dict:
    return {"budget": budget, "budget_bytes": budget_bytes, "kind": f"uniform {format_label(*fmt)}",
            "formats": {_key(r): tuple(fmt) for r in quantized}}


def configurations(rows, scope, budgets: dict[str, int], damages: dict[str, dict],
                   uniform: dict[str, tuple[int, int]] | None = None) -> list[dict]:
    """For each budget: the best uniform format that fits (or ``uniform[budget]``) and one
    allocation per damage model, each described by its bytes and mix of formats."""
    from hlwq.quant.budget import best_uniform_format, tensor_options
    from hlwq.tasks.budget import allocate_rows, rows_in_scope

    scoped = rows_in_scope(rows, scope)
    quantized = [r for r in scoped if r["action"] == "quantize"]
    fixed = sum(size_table([r])["total_packed_bytes"] for r in scoped if r["action"] != "quantize")
    options = [tensor_options(_key(r), r["shape"], next(iter(damages.values()))[_key(r)])
               for r in quantized]
    configs = []
    for label, budget in budgets.items():
        fmt = (uniform or {}).get(label) or best_uniform_format(options, budget, fixed)
        if fmt is not None:
            configs.append({**uniform_config(label, budget, quantized, fmt), "predicted_error": {
                model: math.fsum(damage[_key(r)][tuple(fmt)] for r in quantized)
                for model, damage in damages.items()}})
        for model, damage in damages.items():
            try:
                _, allocation = allocate_rows(rows, budget, scope, damage)
            except BudgetError:
                continue
            configs.append({"budget": label, "budget_bytes": budget,
                            "kind": f"budget ({model})", "formats": allocation.formats,
                            "predicted_error": allocation.damage})
    return [describe(config, scoped, quantized) for config in configs]


def describe(config: dict, scoped, quantized) -> dict:
    """Bytes, mean bits and the mix of formats of a configuration (``formats`` by tensor key)."""
    formats = config["formats"]
    sized = [{**r, "bits": formats[_key(r)][0], "group_size": formats[_key(r)][1]}
             if _key(r) in formats else r for r in scoped]
    params = sum(math.prod(r["shape"]) for r in quantized)
    mix: dict[str, int] = {}
    for fmt in formats.values():
        mix[format_label(*fmt)] = mix.get(format_label(*fmt), 0) + 1
    return {**config, "total_bytes": size_table(sized)["total_packed_bytes"],
            "mean_bits": sum(formats[_key(r)][0] * math.prod(r["shape"]) for r in quantized) / params,
            "mix": dict(sorted(mix.items()))}


# --------------------------------------------------------------------------- tiny fixture


def source_and_control_renders(pipeline, suite: dict, prompts, names: list[str], renders: Path):
    """The source's and the 8-bit HLWQ control's renders of ``prompts`` (the control: the
    transformer tensors ``names`` at CONTROL_BITS, restored afterwards), as the output gates
    judge every candidate against them."""
    from hlwq.runtime.control import CONTROL_BITS, reconstruct_weights, restore_weights
    from hlwq.tasks.validate_output import load_rendering, render_for_comparison

    def render(kind: str) -> dict:
        return {p: load_rendering(render_for_comparison(pipeline, suite[p], "cpu",
                                                        renders / f"{kind}-{p}.safetensors"))
                for p in prompts}

    source = render("source")
    keep = {}
    reconstruct_weights([(f"transformer/{n}", pipeline.transformer, n) for n in names],
                        CONTROL_BITS, keep=keep)
    try:
        control = render("control")
    finally:
        restore_weights(keep)
    return source, control


def tiny_part(work: Path, log, with_sweep: bool = True) -> dict:
    from hlwq.store.inventory import build_inventory
    from hlwq.tasks.budget import activation_stats, file_sampler, first_step_inputs, measure_damages
    from hlwq.tasks.gates import load_gate_config
    from hlwq.tasks.validate_output import (
        apply_output_gates,
        compare_renderings,
        load_rendering,
        load_suite,
        output_gates,
        render_for_comparison,
    )
    from hlwq.testing.fixtures import load_tiny_pipeline, make_tiny_ltx23

    root = make_tiny_ltx23(work / "tiny")
    rows = [r for r in build_inventory(root, "ltx23").to_pylist() if r["component"] == "transformer"]
    quantized = [r for r in rows if r["action"] == "quantize"]
    names = [r["tensor"] for r in quantized]
    pipeline = load_tiny_pipeline(root)
    pipeline.set_progress_bar_config(disable=True)
    transformer = pipeline.transformer
    suite = {r.id: r for r in load_suite(None)}

    log("capturing first-step transformer inputs of the calibration and evaluation prompts")
    calibration = [first_step_inputs(pipeline, suite[p]) for p in CALIBRATION_PROMPTS]
    evaluation = [first_step_inputs(pipeline, suite[p]) for p in EVAL_PROMPTS]

    def forward(inputs):
        return lambda: [transformer(**kwargs, return_dict=False) for kwargs in inputs]

    with torch.no_grad():
        stats = activation_stats(transformer, forward(calibration), "transformer", names)
        reference_out = forward(evaluation)()
    damages = {model: measure_damages(quantized, file_sampler(root), model,
                                      stats if model == "activations" else None)
               for model in ("activations", "params")}

    uniform_size = uniform_sizes(rows, candidate_formats())
    budgets = {"=Q3": uniform_size["Q3"], "Q3-Q4 midpoint": (uniform_size["Q3"] + uniform_size["Q4"]) // 2,
               "=Q4": uniform_size["Q4"], "=Q4/g32": uniform_size["Q4/g32"],
               "Q4-Q5 midpoint": (uniform_size["Q4"] + uniform_size["Q5"]) // 2,
               "=Q5": uniform_size["Q5"]}
    # Fractions of the way from the uniform 2-bit size to the uniform 5-bit size.
    sweep = {f"Q2+{f:.0%} of Q2..Q5": int(uniform_size["Q2"] + f * (uniform_size["Q5"] - uniform_size["Q2"]))
             for f in (0.2, 0.4, 0.6, 0.7, 0.8, 0.9)}
    gates = output_gates(load_gate_config())
    renders = work / "tiny-renders"
    renders.mkdir(parents=True, exist_ok=True)
    source, control = source_and_control_renders(pipeline, suite, EVAL_PROMPTS, names, renders)

    setter = WeightSetter(transformer, names)
    evaluated: dict[str, dict] = {}

    def evaluate(config: dict) -> dict:
        key = json.dumps(config["formats"], sort_keys=True)
        if key not in evaluated:
            log(f"  rendering {config['kind']} at {config['budget']} "
                f"({config['total_bytes']:,} bytes)")
            setter.apply({name.removeprefix("transformer/"): f for name, f in config["formats"].items()})
            with torch.no_grad():
                out_err = output_rel_err(reference_out, forward(evaluation)())
            prompts = {}
            for pid in EVAL_PROMPTS:
                path = render_for_comparison(pipeline, suite[pid], "cpu",
                                             renders / f"candidate-{pid}.safetensors")
                prompts[pid] = compare_renderings(source[pid], load_rendering(path), control[pid])
            verdict = apply_output_gates(prompts, gates)
            for metrics in prompts.values():
                metrics.pop("blocks")    # per-block rows: in the gate verdicts, not kept here
            setter.restore()
            evaluated[key] = {
                "transformer_out_rel_err": out_err,
                "latent_rel_err": _mean(prompts, "latent_rel_err"),
                "psnr_mean": _mean(prompts, "psnr_mean"), "ssim_mean": _mean(prompts, "ssim_mean"),
                "audio_snr_db": _mean(prompts, "audio_snr_db"),
                "gates_passed": verdict["passed"],
                "failed_gates": sorted({g for p in prompts.values() for g in p["failed_gates"]}),
                "prompts": prompts}
        return {k: v for k, v in config.items() if k != "formats"} | evaluated[key]

    comparisons = [evaluate(c) for c in configurations(rows, "transformer", budgets, damages,
                                                       {"=Q4/g32": (4, 32)})]
    log("sweeping smaller budgets for the smallest size that passes the default gates")
    sweep_results = [evaluate(c) for c in configurations(rows, "transformer", sweep, damages)
                     ] if with_sweep else []
    uniform_results = [evaluate(describe(uniform_config(f"={format_label(*f)}",
                                                        uniform_size[format_label(*f)], quantized, f),
                                         rows, quantized))
                       for f in ((2, 128), (2, 32), (3, 128), (3, 32), (4, 128), (4, 32), (5, 128))]
    passing = [r for r in sweep_results + comparisons + uniform_results if r["gates_passed"]]
    return {
        "q4_g32_check": {metric: q4_g32_check(comparisons, metric)
                         for metric in ("transformer_out_rel_err", "latent_rel_err")},
        "fixture": "make_tiny_ltx23 (2 blocks, video width 256, audio 128), seed 0",
        "scope": "transformer", "quantized_tensors": len(quantized),
        "uniform_sizes": uniform_size,
        "evaluation_prompts": list(EVAL_PROMPTS), "calibration_prompts": list(CALIBRATION_PROMPTS),
        "comparisons": comparisons, "gate_sweep": sweep_results, "uniform": uniform_results,
        "smallest_passing": min(passing, key=lambda r: r["total_bytes"]) if passing else None,
        "smallest_passing_uniform": min((r for r in passing if r["kind"].startswith("uniform")),
                                        key=lambda r: r["total_bytes"], default=None),
    }


def q4_g32_check(comparisons: list[dict], metric: str) -> dict:
    """The issue's check at the size of uniform Q4/g32: the allocation with output sensitivity
    predicts and delivers (by ``metric``) no more error than uniform Q4/g32."""
    at = {c["kind"]: c for c in comparisons if c["budget"] == "=Q4/g32"}
    budget, uniform = at["budget (activations)"], at["uniform Q4/g32"]
    return {"budget_predicted": budget["predicted_error"],
            "uniform_predicted": uniform["predicted_error"]["activations"],
            "budget_measured": budget[metric], "uniform_measured": uniform[metric],
            "holds": budget["predicted_error"] <= uniform["predicted_error"]["activations"]
            and budget[metric] <= uniform[metric]}


def _mean(prompts: dict, metric: str) -> float:
    return math.fsum(p[metric] for p in prompts.values()) / len(prompts)


# --------------------------------------------------------------------------- real width


def real_width_inputs(config: dict, seed: int, frames: int = 2, side: int = 8,
                      audio_frames: int = 16, text_tokens: int = 64) -> dict:
    """Seeded synthetic inputs of one denoising step for an LTX-2.3 transformer."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    video_dim, audio_dim = config["cross_attention_dim"], config["audio_cross_attention_dim"]
    timestep = torch.tensor([700.0])
    return {
        "hidden_states": randn(1, frames * side * side, config["in_channels"]),
        "audio_hidden_states": randn(1, audio_frames, config["audio_in_channels"]),
        "encoder_hidden_states": randn(1, text_tokens, video_dim),
        "audio_encoder_hidden_states": randn(1, text_tokens, audio_dim),
        "timestep": timestep, "sigma": timestep,
        "encoder_attention_mask": torch.ones(1, text_tokens),
        "audio_encoder_attention_mask": torch.ones(1, text_tokens),
        "num_frames": frames, "height": side, "width": side, "fps": 24.0,
        "audio_num_frames": audio_frames,
    }


def real_width_part(work: Path, layers: int, log) -> dict:
    from diffusers import LTX2VideoTransformer3DModel

    from hlwq.store.inventory import build_inventory
    from hlwq.tasks.budget import activation_stats, file_sampler, measure_damages
    from hlwq.testing.fixtures import make_real_width_transformer

    root = make_real_width_transformer(work / f"real-width-{layers}", layers)
    rows = build_inventory(root, "ltx23").to_pylist()
    quantized = [r for r in rows if r["action"] == "quantize"]
    names = [r["tensor"] for r in quantized]
    log(f"loading the {layers}-block real-width transformer")
    model = LTX2VideoTransformer3DModel.from_pretrained(root / "transformer", use_safetensors=True,
                                                        torch_dtype=torch.float32).eval()
    config = dict(model.config)
    calibration = [real_width_inputs(config, seed) for seed in (1, 2)]
    evaluation = [real_width_inputs(config, seed) for seed in (11, 12)]

    def forward(inputs):
        return lambda: [model(**kwargs, return_dict=False) for kwargs in inputs]

    with torch.no_grad():
        log("capturing activation statistics and output gains (one forward + backward)")
        stats = activation_stats(model, forward(calibration), "transformer", names)
        reference_out = forward(evaluation)()
    log("measuring damage on sampled rows")
    damages = {model_name: measure_damages(quantized, file_sampler(root), model_name,
                                           stats if model_name == "activations" else None)
               for model_name in ("activations", "params")}
    uniform_size = uniform_sizes(rows, candidate_formats())
    budgets = {"=Q3": uniform_size["Q3"], "Q3-Q4 midpoint": (uniform_size["Q3"] + uniform_size["Q4"]) // 2,
               "=Q4": uniform_size["Q4"], "=Q4/g32": uniform_size["Q4/g32"]}
    setter = WeightSetter(model, names, cache=False, keep_dtype=torch.bfloat16)
    results = []
    for config_ in configurations(rows, "transformer", budgets, damages, {"=Q4/g32": (4, 32)}):
        log(f"  forward at {config_['kind']} {config_['budget']}")
        setter.apply({n.removeprefix("transformer/"): f for n, f in config_["formats"].items()})
        with torch.no_grad():
            error = output_rel_err(reference_out, forward(evaluation)())
        setter.restore()
        results.append({k: v for k, v in config_.items() if k != "formats"}
                       | {"transformer_out_rel_err": error})
    return {"q4_g32_check": q4_g32_check(results, "transformer_out_rel_err"),
            "fixture": f"make_real_width_transformer(layers={layers}), seed 0; synthetic inputs "
                       "(2x8x8 video latents, 16 audio frames, 64 text tokens), calibration seeds "
                       "1-2, evaluation seeds 11-12",
            "scope": "transformer", "quantized_tensors": len(quantized),
            "uniform_sizes": uniform_size, "comparisons": results}


# --------------------------------------------------------------------------- LTX-2.3 layout


def ltx23_part(log) -> dict:
    from hlwq.cli.commands.plan import apply_policy
    from hlwq.runtime.ltx23_models import ltx23_22b_package_rows
    from hlwq.store.policy import load_policy
    from hlwq.tasks.budget import SCOPES, plan_budget, rows_in_scope

    log("building the LTX-2.3 package on the meta device")
    layout_rows = ltx23_22b_package_rows()
    result = {"damage": "synthetic Student-t(5) rows with outlier columns of each tensor's width "
                        "(no real weights here); sensitivity: params"}
    for policy_name in ("ltx23", "generic"):
        rows = apply_policy(layout_rows, load_policy(policy_name, bits=5))
        entry = {}
        for scope in SCOPES:
            scoped = rows_in_scope(rows, scope)
            q5 = size_table(scoped)
            floor = size_table([{**r, "bits": 2} for r in scoped])
            item = {"q5_total_bytes": q5["total_packed_bytes"],
                    "q5_quantized_bytes": q5["quantized_packed_bytes"],
                    "kept_bytes": q5["total_packed_bytes"] - q5["quantized_packed_bytes"],
                    "quantized_params": q5["quantized_params"],
                    "smallest_bytes_all_2bit": floor["total_packed_bytes"]}
            try:
                log(f"  {policy_name} / {scope}: allocating 15GB")
                _, report = plan_budget(rows, parse_size("15GB"), scope)
                report.pop("bits")
                report.pop("group_sizes")
                item["target_15GB"] = report
            except BudgetError as error:
                item["target_15GB"] = {"error": str(error)}
            entry[scope] = item
        result[policy_name] = entry
    return result


# --------------------------------------------------------------------------- command


@click.command()
@click.option("--out", type=click.Path(dir_okay=False), default=str(RESULTS), show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False), default="work-runs/bench-budget",
              show_default=True, help="Fixtures and renders (reused across runs).")
@click.option("--real-width-layers", type=int, default=2, show_default=True,
              help="Blocks of the real-width fixture (0 skips it).")
@click.option("--tiny/--no-tiny", default=True, show_default=True)
@click.option("--ltx23/--no-ltx23", default=True, show_default=True,
              help="The LTX-2.3 layout figures (meta device, synthetic damage).")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="The tiny fixture's sweep of smaller budgets against the default gates.")
def bench_budget(out, work_dir, real_width_layers, tiny, ltx23, sweep):
    """Budgeted mixed precision vs the best uniform width that fits, at equal size."""
    started = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    def log(message):
        click.echo(f"[{time.perf_counter() - started:7.1f}s] {message}", err=True)

    results = {"benchmark": "budget", "command": "hlwq bench budget " + " ".join(sys.argv[3:]),
               "machine": machine()}
    if ltx23:
        results["ltx23_22b"] = ltx23_part(log)
    if tiny:
        results["tiny"] = tiny_part(work, log, sweep)
    if real_width_layers:
        results["real_width"] = real_width_part(work, real_width_layers, log)
    results["wall_s"] = time.perf_counter() - started
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), json.dumps(results, indent=2, default=float))
    click.echo(f"wrote {out}")
