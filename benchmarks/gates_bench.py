"""`hlwq bench gates`: where the output gates' k and floors come from (tasks/gates.toml).

The output gates pass a candidate when its distance from the source is at most
max(k x the 8-bit control's distance, floor) (tasks/validate_output.py). This benchmark measures,
per bit width, the ratio candidate distance / control distance of every gate, and records it
with the verdicts of the gates file in force (benchmarks/results/gates.json):

- ``tiny``: the tiny LTX-2.3 fixture, every prompt of the suite as written (2 steps), CPU
  float32. The source renders every prompt; then the linears a bit policy selects are set
  to their HLWQ reconstruction at 8 bits (the control), 5, 4, 3 and
  2 bits (one fp16 scale per 128-value block, refined encoder: what ``hlwq quantize --bits B``
  packs and the packed runtime decodes), and each renders every prompt again with the same
  seed. All nine distances are compared.
- ``real_width``: the real-width transformer fixture (``--real-width-layers`` blocks, the
  values ``make_real_width_transformer`` writes, built in memory), no render: one denoising
  step on seeded synthetic inputs (2x8x8 video latents, 16 audio frames, 64 text tokens,
  sigma 0.7), the same widths. Compared: each block's output (``block_rel_err``) and the video
  latents after one Euler step of the flow-matching ODE from sigma 0.7 to 0.35
  (``first_step_latent_rel_err``), i.e. the two first-step gates of the same gates file.

The tiny part runs once per bit policy (``--policy``, default both built-in LTX-2.3 policies:
``ltx23``, the transformer's block linears, and ``ltx23-full``, which adds the connectors and
the text encoder), each with its own control, and once more at Q5 with the reference encoder
(``5-reference``, recorded, not used for k).

``suggested`` holds what the gates file's comments derive from these numbers: k = the geometric
mean of the worst Q5 ratio and the worst Q4 ratio over every prompt of every policy (Q5 passes,
Q4 fails on its worse prompts, 2-3 bits fail everywhere), floor = half the smallest distance
the control reaches on any prompt (so the floor alone never decides on the fixture; it only
matters where a model's control does not drift at all).
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

from hlwq.store.atomic import atomic_write_text

RESULTS = Path(__file__).with_name("results") / "gates.json"
CONTROL_BITS = 8
WIDTHS = (5, 4, 3, 2)
REAL_WIDTH_SEEDS = (11, 12)
SIGMA, SIGMA_NEXT = 0.7, 0.35      # the real-width step: sigma 0.7 (timestep 700) to 0.35


def machine() -> dict:
    return {"platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}


# --------------------------------------------------------------------------- tables


def ratio_table(per_width: dict[int, dict[str, dict]], names) -> dict:
    """Per width and distance: the worst and best prompt's ratio candidate / control, their
    candidate distances, and every prompt's ratio."""
    table = {}
    for bits, prompts in per_width.items():
        distances = {}
        for name in names:
            judged = {pid: entry["distances"][name] for pid, entry in prompts.items()}
            ratios = {pid: j["ratio"] for pid, j in judged.items() if j["ratio"] is not None}
            if not ratios:
                distances[name] = {"ratio_worst": None, "ratio_best": None}
                continue
            worst, best = max(ratios, key=ratios.get), min(ratios, key=ratios.get)
            distances[name] = {"ratio_worst": ratios[worst], "worst_prompt": worst,
                               "ratio_best": ratios[best], "best_prompt": best,
                               "candidate_worst": max(j["candidate"] for j in judged.values()),
                               "candidate_best": min(j["candidate"] for j in judged.values()),
                               "per_prompt": ratios}
        table[str(bits)] = distances
    return table


def control_table(prompts: dict[str, dict], names) -> dict:
    """Per distance: the control's smallest and largest distance over the prompts."""
    table = {}
    for name in names:
        values = {pid: entry["distances"][name]["control"] for pid, entry in prompts.items()}
        low, high = min(values, key=values.get), max(values, key=values.get)
        table[name] = {"min": values[low], "min_prompt": low, "max": values[high],
                       "max_prompt": high}
    return table


def round_sig(value: float, digits: int = 2) -> float:
    if value <= 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(value)))


def floor_down(value: float) -> float:
    """One significant digit, rounded down: 3.7e-6 -> 3e-6."""
    if value <= 0 or not math.isfinite(value):
        return 0.0
    exponent = math.floor(math.log10(value))
    return math.floor(value / 10 ** exponent) * 10.0 ** exponent


def verdicts(per_width: dict, results: dict) -> dict:
    return {str(bits): {"gates_passed": results[bits]["passed"],
                        "failed_prompts": results[bits]["failed_prompts"],
                        "failed_gates": sorted({g for e in per_width[bits].values()
                                                for g in e["failed_gates"]})}
            for bits in per_width}


# --------------------------------------------------------------------------- tiny fixture


def tiny_part(work: Path, gates: dict, log, policy: str = "ltx23", widths=WIDTHS) -> dict:
    """Every prompt of the suite: the source, the control and each width (refined), plus Q5
    with the reference encoder; ratios and verdicts per width."""
    from hlwq.runtime.control import (
        control_targets,
        reconstruct_weights,
        restore_weights,
        selection_from_rows,
    )
    from hlwq.runtime.ltx23_models import load_ltx23_pipeline
    from hlwq.store.inventory import build_inventory
    from hlwq.store.policy import load_policy
    from hlwq.store.tensor_jobs import code_version
    from hlwq.tasks.validate_output import (
        apply_output_gates,
        compare_renderings,
        load_rendering,
        load_suite,
        model_fingerprint,
        render_for_comparison,
        render_key,
    )
    from hlwq.testing.fixtures import make_tiny_ltx23

    root = make_tiny_ltx23(work / "tiny")
    selection = selection_from_rows(build_inventory(root, load_policy(policy)).to_pylist())
    requests = load_suite(None)
    renders = work / "tiny-renders"
    renders.mkdir(parents=True, exist_ok=True)
    identity = f"{model_fingerprint(root)}/{code_version()}/{policy}"

    def path_of(label, request):
        key = render_key(request, identity + label)[:12]
        return renders / f"{policy}-{label}-{request.id}-{key}.safetensors"

    pipeline = None

    def loaded():
        nonlocal pipeline
        if pipeline is None:
            log("loading the tiny source pipeline")
            pipeline = load_ltx23_pipeline(root)
            pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def render(label):
        out = {}
        for request in requests:
            path = path_of(label, request)
            if not path.is_file():
                log(f"  rendering {request.id} ({policy}, {label})")
                render_for_comparison(loaded(), request, "cpu", path)
            out[request.id] = load_rendering(path)
        return out

    source = render("source")
    variants = [(f"q{CONTROL_BITS}", CONTROL_BITS, "refined"),
                *((f"q{bits}", bits, "refined") for bits in widths),
                ("q5-reference", 5, "reference")]
    rendered, keep = {}, {}
    for label, bits, mode in variants:
        if any(not path_of(label, r).is_file() for r in requests):
            log(f"setting the {len(selection)} selected weights ({policy}) to Q{bits} ({mode})")
            reconstruct_weights(control_targets(loaded(), selection), bits, mode=mode, keep=keep)
            rendered[label] = render(label)
            restore_weights(keep)
        else:
            rendered[label] = render(label)
    per_width, results = {}, {}
    for label, _, _ in variants[1:]:
        name = label.removeprefix("q")
        prompts = {r.id: compare_renderings(source[r.id], rendered[label][r.id],
                                            rendered[f"q{CONTROL_BITS}"][r.id]) for r in requests}
        results[name] = apply_output_gates(prompts, gates)
        per_width[name] = prompts
    names = list(gates)
    return {"fixture": "make_tiny_ltx23 (2 blocks, video width 256, audio 128), seed 0; suite "
                       "v1 as written (2 steps), CPU float32; the linears policy "
                       f"{policy} selects set to their HLWQ reconstruction (block 128, refined; "
                       "'5-reference': Q5 with the reference encoder)",
            "policy": policy, "prompts": [r.id for r in requests],
            "quantized_tensors": len(selection),
            "components": sorted({e["component"] for e in selection}),
            "control": control_table(per_width[str(widths[0])], names),
            "ratios": ratio_table(per_width, names), "verdicts": verdicts(per_width, results)}


def suggestions(parts: dict[str, dict], names) -> dict:
    """k = sqrt(worst Q5 x worst Q4), each the worst over every prompt of every part (refined
    encoder); floor = half the smallest control distance of any part, one digit, down."""
    out = {}
    for name in names:
        q5 = max(part["ratios"]["5"][name]["ratio_worst"] for part in parts.values())
        q4 = max(part["ratios"]["4"][name]["ratio_worst"] for part in parts.values())
        low = min(part["control"][name]["min"] for part in parts.values())
        out[name] = {"k": round_sig(math.sqrt(q5 * q4)), "floor": floor_down(0.5 * low),
                     "from": {"q5_worst_ratio": q5, "q4_worst_ratio": q4, "control_min": low}}
    return out


# --------------------------------------------------------------------------- real width


def real_width_inputs(config: dict, seed: int, frames: int = 2, side: int = 8,
                      audio_frames: int = 16, text_tokens: int = 64) -> dict:
    """Seeded synthetic inputs of one denoising step at sigma SIGMA (hlwq bench budget's)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    video_dim, audio_dim = config["cross_attention_dim"], config["audio_cross_attention_dim"]
    timestep = torch.tensor([SIGMA * 1000.0])
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


@torch.no_grad()
def first_step(model, inputs: dict) -> dict:
    """One step: every block's outputs and the latents after the Euler step SIGMA -> SIGMA_NEXT."""
    from hlwq.runtime.block_probe import BlockProbe

    with BlockProbe(model) as probe:
        video, _audio = model(**inputs, return_dict=False)
    latents = inputs["hidden_states"] + (SIGMA_NEXT - SIGMA) * video.float()
    return {"blocks": probe.outputs, "latents": latents}


def first_step_entry(source: dict, candidate: dict, control: dict) -> dict:
    """The first-step metrics of a candidate step against the source's, with the control's
    (the shape ``compare_renderings`` gives, for the first-step gates only)."""
    from hlwq.quant.video_metrics import relative_l2_error
    from hlwq.runtime.block_probe import compare_block_outputs

    def metrics(other):
        blocks = compare_block_outputs(source["blocks"], other["blocks"])
        return {"first_step_latent_rel_err": relative_l2_error(source["latents"],
                                                               other["latents"]),
                "block_rel_err": max(row["rel_err"] for row in blocks), "blocks": blocks}

    entry, reference = metrics(candidate), metrics(control)
    by_row = {(r["block"], r["stream"]): r["rel_err"] for r in reference.pop("blocks")}
    for row in entry["blocks"]:
        row["control_rel_err"] = by_row[(row["block"], row["stream"])]
    return {**entry, "control": reference}


def real_width_comparison(layers: int, gates: dict, log, widths=WIDTHS,
                          seeds=REAL_WIDTH_SEEDS) -> dict:
    """The first-step gates of ``gates`` at real width: per width its verdict and entries."""
    from hlwq.runtime.control import reconstruct_weights, restore_weights
    from hlwq.store.policy import load_policy
    from hlwq.tasks.validate_output import FIRST_STEP_GATES, apply_output_gates
    from hlwq.testing.fixtures import real_width_transformer

    log(f"building the {layers}-block real-width transformer in memory")
    model = real_width_transformer(layers)
    policy = load_policy("ltx23")
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear)
             and policy.decide(f"{name}.weight", tuple(module.weight.shape), "BF16",
                               "transformer").action == "quantize"]
    targets = [(f"transformer/{name}.weight", model, f"{name}.weight") for name in names]
    inputs = {f"seed-{seed}": real_width_inputs(dict(model.config), seed) for seed in seeds}
    first_step_gates = {name: gates[name] for name in FIRST_STEP_GATES}
    log("one step with the source weights")
    source = {pid: first_step(model, kwargs) for pid, kwargs in inputs.items()}
    stepped, keep = {}, {}
    for bits in (CONTROL_BITS, *widths):
        log(f"one step with the {len(targets)} selected weights at Q{bits}")
        reconstruct_weights(targets, bits, keep=keep)
        stepped[bits] = {pid: first_step(model, kwargs) for pid, kwargs in inputs.items()}
        restore_weights(keep)
    per_width, results = {}, {}
    for bits in widths:
        prompts = {pid: first_step_entry(source[pid], stepped[bits][pid],
                                         stepped[CONTROL_BITS][pid]) for pid in inputs}
        results[bits] = apply_output_gates(prompts, first_step_gates)
        per_width[bits] = prompts
    return {"per_width": per_width, "results": results, "quantized_tensors": len(targets),
            "gates": list(first_step_gates)}


def real_width_part(layers: int, gates: dict, log) -> dict:
    compared = real_width_comparison(layers, gates, log)
    names = compared["gates"]
    return {"fixture": f"real_width_transformer(layers={layers}) (= make_real_width_transformer's "
                       f"values), seed 0; synthetic inputs seeds {list(REAL_WIDTH_SEEDS)}; one "
                       f"step, Euler sigma {SIGMA} -> {SIGMA_NEXT}; compared: each block's output "
                       "and the latents after the step (no render)",
            "quantized_tensors": compared["quantized_tensors"],
            "control": control_table(compared["per_width"][WIDTHS[0]], names),
            "ratios": ratio_table(compared["per_width"], names),
            "verdicts": verdicts(compared["per_width"], compared["results"])}


# --------------------------------------------------------------------------- command


@click.command()
@click.option("--out", type=click.Path(dir_okay=False), default=str(RESULTS), show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False), default="work-runs/bench-gates",
              show_default=True, help="Fixtures and renders (reused across runs).")
@click.option("--gates", "gates_file", type=click.Path(exists=True, dir_okay=False),
              help="Judge with this file merged over tasks/gates.toml.")
@click.option("--real-width-layers", type=int, default=1, show_default=True,
              help="Blocks of the real-width fixture (0 skips it).")
@click.option("--policy", "policies", multiple=True, default=("ltx23", "ltx23-full"),
              show_default=True, help="Bit policies of the tiny part (each its own control).")
@click.option("--tiny/--no-tiny", default=True, show_default=True)
def bench_gates(out, work_dir, gates_file, real_width_layers, policies, tiny):
    """Output gates: candidate / 8-bit control ratios at Q5-Q2 (tiny fixture, real width)."""
    from hlwq.tasks.gates import gate_sources, load_gate_config
    from hlwq.tasks.validate_output import output_gates

    started = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    def log(message):
        click.echo(f"[{time.perf_counter() - started:7.1f}s] {message}", err=True)

    gates = output_gates(load_gate_config(gates_file), source=gates_file or "tasks/gates.toml")
    results = {"benchmark": "gates", "command": "hlwq bench gates " + " ".join(sys.argv[3:]),
               "machine": machine(), "gates_from": gate_sources(gates_file),
               "gates": {name: {"k": g.k, "floor": g.floor} for name, g in gates.items()}}
    if tiny:
        results["tiny"] = {policy: tiny_part(work, gates, log, policy) for policy in policies}
        if all(str(b) in part["ratios"] for part in results["tiny"].values() for b in (5, 4)):
            results["suggested"] = suggestions(results["tiny"], list(gates))
    if real_width_layers:
        results["real_width"] = real_width_part(real_width_layers, gates, log)
    results["wall_s"] = time.perf_counter() - started
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), json.dumps(results, indent=2, default=float))
    click.echo(summary_text(results))
    click.echo(f"wrote {out}")


def summary_text(results: dict) -> str:
    """The tables gates.toml quotes: per width and distance, worst (best) ratio to the control."""
    parts = {f"tiny, policy {policy}": part for policy, part in results.get("tiny", {}).items()}
    if "real_width" in results:
        parts["real width, first step"] = results["real_width"]
    lines = []
    for title, part in parts.items():
        ratios = part["ratios"]
        names = list(next(iter(ratios.values())))
        lines.append(f"{title}: candidate distance / control distance, worst prompt (best)")
        lines.append("bits         " + " ".join(f"{name:>26}" for name in names))
        for bits, row in ratios.items():
            cells = []
            for name in names:
                worst, best = row[name]["ratio_worst"], row[name]["ratio_best"]
                cells.append(f"{'-' if worst is None else f'{worst:.3g}':>15} "
                             f"({'-' if best is None else f'{best:.3g}'})".rjust(26))
            passed = part["verdicts"][bits]["gates_passed"]
            lines.append(f"{bits:>12} " + " ".join(cells) + f"  {'pass' if passed else 'fail'}")
        lines.append("control distance, min (max) over prompts: " + "; ".join(
            f"{name} {c['min']:.3g} ({c['max']:.3g})" for name, c in part["control"].items()))
    if results.get("suggested"):
        lines.append("suggested (k = sqrt(worst Q5 x worst Q4) over the policies, floor = "
                     "control min / 2): " + "; ".join(
                         f"{name} k {s['k']} floor {s['floor']:g}"
                         for name, s in results["suggested"].items()))
    return "\n".join(lines)
