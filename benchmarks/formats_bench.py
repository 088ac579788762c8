"""`hlwq bench formats`: HLWQ against the formats LTX users pick, on the same tensors.

Parts of one JSON (benchmarks/results/formats.json) and one plot (formats.png):

- ``formats``: every format of quant/formats.py applied to the same tensors: by
  default the synthetic heavy-tailed set (quant.synthetic: Student-t(5), outlier input
  columns, fan-in scaled, at LTX-2.3's widths) and the linear weights of the real-width
  fixture's block (make_real_width_transformer, 1 block); with ``--source``, the weights
  of any safetensors checkpoint that the generic policy (or ``--policy``) quantizes.
  ``--rows`` rows are sampled per tensor (seeded, the same rows for every format). Per
  format: true bits per weight (all stored bytes / weights), mean and worst relative MSE,
  mean cosine (float64 sums), seconds of quantize + dequantize (after a warm-up).
- ``output``: the same formats as fake quantization (weights set to their reconstruction)
  in the tiny LTX-2.3 fixture, rendered with the same prompts and seeds as the source and
  scored with the metrics and the ``[output.<distance>]`` gates of tasks/gates.toml (against
  the 8-bit HLWQ control of the same tensors, rendered once), and in the real-width
  2-block transformer (relative error of one forward on seeded inputs).
- ``equal_size``: each published LTX-2.3 size with the components it counts, the HLWQ
  allocation ``--target-size`` gives for the same scope (plan_budget, damage on synthetic
  rows of each tensor's width) and its predicted error, beside the competing format's error
  on the same rows under its published layer contract, in the same unit.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

from hlwq.quant.formats import (
    FORMATS,
    Format,
    bits_per_weight,
    error_summary,
    front,
    interpolated,
    missing_dependency,
    select,
)
from hlwq.quant.ggml import ggml_library_path

RESULTS = Path(__file__).with_name("results") / "formats.json"
SEED = 0
SYNTHETIC_SHAPES = [(4096, 4096), (16384, 4096), (4096, 16384), (2048, 2048), (8192, 2048),
                    (2048, 8192), (2048, 4096), (4096, 2048)]
# Output level, by default: the formats near 4.5 and 5.5 bits per weight (equal bits), and
# HLWQ's default Q5 (each fixture forward costs a full quantization of its weights).
OUTPUT_FORMATS = ("hlwq-q4-g32", "gguf-q4_k", "nvfp4", "hlwq-q5-b128", "hlwq-q5-g32",
                  "gguf-q5_k", "gguf-q5_0")
GB = 10 ** 9
Loader = Callable[[], torch.Tensor]


# --------------------------------------------------------------------------- tensors


def synthetic_set(rows: int) -> list[tuple[str, Loader]]:
    from hlwq.quant.synthetic import TensorSpec, synthetic_tensor

    def loader(shape):
        spec = TensorSpec(f"bench-formats/synthetic/{shape[0]}x{shape[1]}", "weight",
                          (min(rows, shape[0]) if rows else shape[0], shape[1]), "linear")
        return lambda: synthetic_tensor(spec, SEED)

    return [(f"synthetic/{o}x{i}", loader((o, i))) for o, i in SYNTHETIC_SHAPES]


def checkpoint_set(root: Path, policy: str, rows: int) -> list[tuple[str, Loader]]:
    """The weights ``policy`` quantizes in the checkpoint at ``root``, ``rows`` sampled rows
    each (0: all), read by offset (store.safetensors_io.read_rows)."""
    from hlwq.quant.budget import sample_rows
    from hlwq.quant.errors import InvalidOptionError
    from hlwq.store.inventory import build_inventory
    from hlwq.store.safetensors_io import read_rows

    base = root if root.is_dir() else root.parent
    chosen = [r for r in build_inventory(root, policy).to_pylist() if r["action"] == "quantize"]
    if not chosen:
        raise InvalidOptionError(f"--source {root}: policy {policy!r} quantizes no tensor there")

    def loader(row):
        out_features = row["shape"][0]
        count = min(rows, out_features) if rows else out_features
        key = f"{row['component']}/{row['tensor']}"
        return lambda: read_rows(base / row["file"], row, sample_rows(out_features, count,
                                                                      SEED, key))

    return [(f"{r['component']}/{r['tensor']}", loader(r)) for r in chosen]


# --------------------------------------------------------------------------- weight error


def warm_up(formats: list[Format]) -> None:
    """Compile numba kernels and import libraries outside the timed runs."""
    small = torch.randn(64, 512)
    for fmt in formats:
        fmt.apply(small)


def measure(formats: list[Format], tensors: list[tuple[str, Loader]], log) -> dict:
    """Per format and tensor: stored bytes, weights, relative MSE, cosine, seconds."""
    from hlwq.quant.metrics import tensor_metrics

    per = {f.name: [] for f in formats}
    for index, (name, load) in enumerate(tensors, 1):
        weight = load().float().contiguous()
        log(f"  [{index}/{len(tensors)}] {name} {tuple(weight.shape)}")
        for fmt in formats:
            start = time.perf_counter()
            result = fmt.apply(weight)
            seconds = time.perf_counter() - start
            metrics = tensor_metrics(weight, result.weight)
            per[fmt.name].append({"tensor": name, "weights": weight.numel(),
                                  "nbytes": result.nbytes, "rel_mse": metrics["rel_mse"],
                                  "cosine": metrics["cosine"], "seconds": seconds})
    return per


def summarize(fmt: Format, rows: list[dict]) -> dict:
    return {"name": fmt.name, "family": fmt.family, **error_summary(rows),
            "seconds": math.fsum(r["seconds"] for r in rows)}


def hlwq_front_gaps(entries: list[dict], low: float = 4.0, high: float = 6.5) -> list[dict]:
    """Formats between ``low`` and ``high`` bits per weight that sit below the HLWQ front
    (its error interpolated log-linearly at their bits): where the encoder must improve."""
    hlwq = front([e for e in entries if e["family"] == "hlwq"])
    gaps = []
    for entry in entries:
        bits = entry["bits_per_weight"]
        if entry["family"] == "hlwq" or not low <= bits <= high:
            continue
        ours = interpolated(hlwq, bits)
        if ours is not None and entry["rel_mse_mean"] < ours:
            gaps.append({"name": entry["name"], "bits_per_weight": bits,
                         "rel_mse_mean": entry["rel_mse_mean"], "hlwq_front_rel_mse": ours})
    return gaps


# --------------------------------------------------------------------------- output level


class FakeQuantized:
    """Sets named weights of a model to a format's reconstruction, and back."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.model = model
        self.originals = {n: model.get_parameter(n).detach().to(torch.bfloat16, copy=True)
                          for n in names}

    @torch.no_grad()
    def apply(self, fmt: Format) -> float:
        """Set every weight to ``fmt``'s reconstruction; return its bits per weight."""
        nbytes = weights = 0
        for name, original in self.originals.items():
            result = fmt.apply(original.float())
            self.model.get_parameter(name).copy_(result.weight)
            nbytes, weights = nbytes + result.nbytes, weights + original.numel()
        return 8.0 * nbytes / weights

    @torch.no_grad()
    def restore(self) -> None:
        for name, original in self.originals.items():
            self.model.get_parameter(name).copy_(original)


def tiny_output(formats: list[Format], work: Path, log) -> dict:
    from hlwq.benchmarks.budget_bench import (
        EVAL_PROMPTS,
        _mean,
        output_rel_err,
        source_and_control_renders,
    )
    from hlwq.store.inventory import build_inventory
    from hlwq.tasks.budget import first_step_inputs
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
    names = [r["tensor"] for r in build_inventory(root, "ltx23").to_pylist()
             if r["component"] == "transformer" and r["action"] == "quantize"]
    pipeline = load_tiny_pipeline(root)
    pipeline.set_progress_bar_config(disable=True)
    suite = {r.id: r for r in load_suite(None)}
    gates = output_gates(load_gate_config())
    evaluation = [first_step_inputs(pipeline, suite[p]) for p in EVAL_PROMPTS]

    def forward():
        return [pipeline.transformer(**kwargs, return_dict=False) for kwargs in evaluation]

    with torch.no_grad():
        reference_out = forward()
    renders = work / "tiny-renders"
    renders.mkdir(parents=True, exist_ok=True)
    source, control = source_and_control_renders(pipeline, suite, EVAL_PROMPTS, names, renders)
    setter = FakeQuantized(pipeline.transformer, names)
    results = []
    for fmt in formats:
        log(f"  tiny fixture: rendering {fmt.name}")
        bits = setter.apply(fmt)
        with torch.no_grad():
            out_err = output_rel_err(reference_out, forward())
        prompts = {}
        for p in EVAL_PROMPTS:
            path = render_for_comparison(pipeline, suite[p], "cpu", renders / f"candidate-{p}.safetensors")
            prompts[p] = compare_renderings(source[p], load_rendering(path), control[p])
        verdict = apply_output_gates(prompts, gates)
        setter.restore()
        for metrics in prompts.values():
            metrics.pop("blocks")
        results.append({"name": fmt.name, "bits_per_weight": bits,
                        "transformer_out_rel_err": out_err,
                        "latent_rel_err": _mean(prompts, "latent_rel_err"),
                        "psnr_mean": _mean(prompts, "psnr_mean"),
                        "ssim_mean": _mean(prompts, "ssim_mean"),
                        "audio_snr_db": _mean(prompts, "audio_snr_db"),
                        "gates_passed": verdict["passed"],
                        "failed_gates": sorted({g for m in prompts.values()
                                                for g in m["failed_gates"]})})
    return {"fixture": "make_tiny_ltx23 (2 blocks, video width 256, audio 128), seed 0; the "
                       "transformer's policy-quantized linears fake-quantized",
            "prompts": list(EVAL_PROMPTS), "quantized_tensors": len(names), "formats": results}


def real_width_output(formats: list[Format], work: Path, layers: int, log) -> dict:
    from diffusers import LTX2VideoTransformer3DModel

    from hlwq.benchmarks.budget_bench import output_rel_err, real_width_inputs
    from hlwq.store.inventory import build_inventory
    from hlwq.testing.fixtures import make_real_width_transformer

    root = make_real_width_transformer(work / f"real-width-{layers}", layers)
    names = [r["tensor"] for r in build_inventory(root, "ltx23").to_pylist()
             if r["action"] == "quantize"]
    model = LTX2VideoTransformer3DModel.from_pretrained(root / "transformer", use_safetensors=True,
                                                        torch_dtype=torch.float32).eval()
    evaluation = [real_width_inputs(dict(model.config), seed) for seed in (11, 12)]

    def forward():
        return [model(**kwargs, return_dict=False) for kwargs in evaluation]

    with torch.no_grad():
        reference_out = forward()
    setter = FakeQuantized(model, names)
    results = []
    for fmt in formats:
        log(f"  real-width {layers} blocks: forward with {fmt.name}")
        bits = setter.apply(fmt)
        with torch.no_grad():
            error = output_rel_err(reference_out, forward())
        setter.restore()
        results.append({"name": fmt.name, "bits_per_weight": bits,
                        "transformer_out_rel_err": error})
    return {"fixture": f"make_real_width_transformer(layers={layers}), seed 0; one forward on "
                       "seeded synthetic inputs (seeds 11, 12: 2x8x8 video latents, 16 audio "
                       "frames, 64 text tokens)",
            "quantized_tensors": len(names), "formats": results}


# --------------------------------------------------------------------------- equal size

# Published LTX-2.3 files (REFERENCE section 4), the components each counts and the layer
# contract its format follows ("blocks": the transformer blocks whose linears it quantizes;
# None: every weight the policy quantizes in the scope).
PUBLISHED = [
    {"file": "GGUF Q4_K_M", "bytes": 14.19 * GB, "scope": "transformer", "blocks": None,
     "mix": ("gguf-q4_k", "gguf-q6_k")},
    {"file": "GGUF Q5_K_M", "bytes": 15.93 * GB, "scope": "transformer", "blocks": None,
     "mix": ("gguf-q5_k", "gguf-q6_k")},
    {"file": "GGUF Q8_0", "bytes": 22.75 * GB, "scope": "transformer", "blocks": None,
     "format": "gguf-q8_0"},
    {"file": "NVFP4 (dev-nvfp4)", "bytes": 22.9 * GB, "scope": "checkpoint", "blocks": (2, 46),
     "format": "nvfp4"},
    {"file": "FP8 (dev-fp8)", "bytes": 29.0 * GB, "scope": "checkpoint", "blocks": (2, 46),
     "format": "fp8-e4m3-tensor"},
    {"file": "INT8 ConvRot", "bytes": 29.2 * GB, "scope": "checkpoint", "blocks": (2, 46),
     "format": "int8-row-hadamard256"},
]
SCOPE_COMPONENTS = {
    "transformer": ("transformer",),
    "checkpoint": ("transformer", "connectors", "vae", "audio_vae", "vocoder"),
}
SCOPE_TEXT = {
    "transformer": "the transformer (GGUF conversions for ComfyUI hold the diffusion model; VAEs, "
                   "vocoder, connectors and the Gemma 3 text encoder are separate downloads). "
                   "At their base type our 19.0B-parameter transformer comes to less than the "
                   "published files, so they hold more than this scope (see competitor bytes)",
    "checkpoint": "the single-file checkpoint: transformer, connectors, video and audio VAE, "
                  "vocoder (46.1 GB in BF16; text encoder and upscalers are separate files)",
}


def _block_index(tensor: str) -> int | None:
    from hlwq.quant.names import block_and_module

    block = block_and_module(tensor)[0]
    return int(block.rsplit(".", 1)[1]) if block.startswith("transformer_blocks.") else None


def equal_size_comparison(log) -> dict:
    from hlwq.cli.commands.plan import apply_policy
    from hlwq.quant.errors import BudgetError
    from hlwq.quant.sizes import size_table
    from hlwq.runtime.ltx23_models import ltx23_22b_package_rows
    from hlwq.store.policy import load_policy
    from hlwq.tasks.budget import params_sensitivity, plan_budget, sample_row_count, synthetic_rows

    log("equal size: the LTX-2.3 layout on the meta device")
    rows = apply_policy(ltx23_22b_package_rows(), load_policy("ltx23", bits=5))
    width_error: dict[tuple[str, int], float] = {}

    def format_error(name: str, shape) -> float:
        """The format's relative MSE on the synthetic rows the HLWQ damage model samples."""
        from hlwq.quant.budget import weighted_relative_mse

        key = (name, shape[1])
        if key not in width_error:
            sample = synthetic_rows(shape[1], sample_row_count(shape), SEED)
            width_error[key] = weighted_relative_mse(sample, FORMATS[name].apply(sample).weight)
        return width_error[key]

    results = []
    for published in PUBLISHED:
        scoped = [r for r in rows if r["component"] in SCOPE_COMPONENTS[published["scope"]]]
        quantized = [r for r in scoped if r["action"] == "quantize"]
        shares = params_sensitivity(quantized)
        if published["blocks"] is None:
            contract, where = quantized, "every weight the ltx23 policy quantizes"
        else:
            low, high = published["blocks"]
            contract = [r for r in quantized if (i := _block_index(r["tensor"])) is not None
                        and low <= i < high]
            where = f"the linears of transformer blocks {low}-{high - 1}"
        entry = {"file": published["file"], "published_bytes": int(published["bytes"]),
                 "scope": published["scope"], "counts": SCOPE_TEXT[published["scope"]],
                 "contract": f"{where} ({len(contract)} tensors) in the format, the rest BF16",
                 "scope_bf16_bytes": size_table([{**r, "action": "keep"} for r in scoped])
                 ["total_packed_bytes"]}
        names = published.get("mix") or (published["format"],)
        missing = [m for n in names if (m := missing_dependency(FORMATS[n]))]
        if missing:
            entry["competitor"] = {"skipped": missing[0]}
        else:
            entry["competitor"] = competitor_error(published, scoped, contract, shares,
                                                   format_error)
        # HLWQ never gets more bytes than the competitor spends on these same tensors
        target = int(min(published["bytes"], entry["competitor"].get("bytes", math.inf)))
        log(f"  {published['file']}: HLWQ --target-size {target / GB:.2f}GB on the "
            f"{published['scope']}")
        try:
            # the scope's rows alone, budgeted as a whole ("package" = every row given)
            _, report = plan_budget(scoped, target, "package")
            kept = ("total_bytes", "predicted_error", "mean_bits", "bits_per_weight",
                    "quantized_tensors", "best_uniform", "error_unit")
            entry["hlwq"] = {"target_bytes": target} | {k: report[k] for k in kept}
            entry["hlwq"]["widths"] = {str(b): sum(1 for v in report["bits"].values() if v == b)
                                       for b in sorted(set(report["bits"].values()))}
        except BudgetError as error:
            entry["hlwq"] = {"error": str(error)}
        results.append(entry)
    return {"layout": "LTX-2.3 22B package rows (runtime.ltx23_models), policy ltx23",
            "error_unit": "params-weighted mean relative MSE of the scope's policy-quantized "
                          "weights (tasks.budget 'params' damage; edge blocks count twice; "
                          "BF16 tensors count 0), on synthetic rows of each tensor's width",
            "files": results}


def competitor_error(published: dict, scoped, contract, shares, format_error) -> dict:
    """The published file's error in the damage model's unit; a K-quant mix ("_M") is
    estimated as the share of its contract at the higher type that matches the file size."""
    from hlwq.quant.sizes import original_nbytes
    from hlwq.store.artifact import tensor_key

    def key(row):
        return tensor_key(row["component"], row["tensor"])

    in_contract = {key(r) for r in contract}
    kept = sum(original_nbytes(tuple(r["shape"]), r["dtype"]) for r in scoped
               if key(r) not in in_contract)
    params = sum(math.prod(r["shape"]) for r in contract)

    def error(name):
        return math.fsum(shares[key(r)] * format_error(name, r["shape"]) for r in contract)

    def nbytes(name):
        sample = torch.zeros(256, 4096)
        return params * bits_per_weight(FORMATS[name].apply(sample).nbytes, sample) / 8

    if "format" in published:
        name = published["format"]
        return {"format": name, "bytes": int(kept + nbytes(name)), "error": error(name)}
    low, high = published["mix"]
    fraction = (published["bytes"] - kept - nbytes(low)) / (nbytes(high) - nbytes(low))
    clipped = min(1.0, max(0.0, fraction))
    return {"format": f"{low} + {high} mix", "share_at_higher_type": fraction,
            "bytes": int(kept + nbytes(low) + clipped * (nbytes(high) - nbytes(low))),
            "error": (1 - clipped) * error(low) + clipped * error(high),
            "estimated": "the mix's per-layer choice is not published here: error interpolated "
                         "by the share of weights at the higher type that matches the file size"}


# --------------------------------------------------------------------------- command


def ggml_library_name() -> str | None:
    """The ggml library the GGUF rows ran on, by file name and package version (no local path)."""
    from importlib.metadata import PackageNotFoundError, version

    path = ggml_library_path()
    if path is None:
        return None
    try:
        return f"{path.name} (llama-cpp-python {version('llama_cpp_python')})"
    except PackageNotFoundError:
        return path.name


def report(result: dict) -> str:
    header = (f"{'format':<22} {'bits/w':>7} {'rel MSE mean':>13} {'worst':>10} "
              f"{'cosine':>9} {'seconds':>8}")
    lines = [header]
    for e in result["formats"]:
        lines.append(f"{e['name']:<22} {e['bits_per_weight']:7.3f} {e['rel_mse_mean']:13.3e} "
                     f"{e['rel_mse_worst']:10.3e} {e['cosine_mean']:9.6f} {e['seconds']:8.2f}")
    lines += [f"{s['name']:<22} skipped: {s['reason']}" for s in result["skipped"]]
    for gap in result["below_hlwq_front"]:
        lines.append(f"below the HLWQ front: {gap['name']} at {gap['bits_per_weight']:.3f} bits "
                     f"({gap['rel_mse_mean']:.3e} vs {gap['hlwq_front_rel_mse']:.3e})")
    return "\n".join(lines)


@click.command("formats")
@click.option("--source", type=click.Path(exists=True, path_type=Path),
              help="Any safetensors checkpoint (folder or file) instead of the default tensors.")
@click.option("--policy", default="generic", show_default=True,
              help="Bit policy choosing the --source weights (built-in name or file).")
@click.option("--formats", "format_names", default="", metavar="NAME,...",
              help="Only these formats (default: all).")
@click.option("--rows", default=1024, show_default=True,
              help="Rows sampled per tensor, the same for every format (0: all rows).")
@click.option("--output/--no-output", "output_level", default=True, show_default=True,
              help="The output-level comparison on the tiny and real-width fixtures "
                   "(default tensors only).")
@click.option("--output-formats", default=",".join(OUTPUT_FORMATS), show_default=True,
              metavar="NAME,...", help="The formats the output level runs.")
@click.option("--real-width-layers", default=2, show_default=True,
              help="Blocks of the real-width fixture the output level runs (0 skips it).")
@click.option("--equal-size/--no-equal-size", default=True, show_default=True,
              help="HLWQ at each published LTX-2.3 size vs that file's format.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("work-runs/bench-formats"), show_default=True,
              help="Fixtures and renders (reused across runs).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS,
              show_default=True)
@click.option("--threads", default=0, show_default=True,
              help="Threads for torch, numba and ggml (0: leave the defaults).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_formats(source, policy, format_names, rows, output_level, output_formats,
                  real_width_layers, equal_size, work_dir, out, threads, as_json):
    """Error per bit of HLWQ against GGUF, FP8, INT8, NVFP4, MXFP4 and HQQ on the same tensors."""
    from hlwq.benchmarks.budget_bench import machine
    from hlwq.quant.errors import InvalidOptionError
    from hlwq.runtime.report import plot_error_per_bit
    from hlwq.store.atomic import atomic_write_text
    from hlwq.testing.fixtures import make_real_width_transformer

    started = time.perf_counter()
    if rows < 0:
        raise InvalidOptionError(f"--rows {rows}: must be 0 (all rows) or positive")

    def log(message):
        click.echo(f"[{time.perf_counter() - started:7.1f}s] {message}", err=True)

    if threads:
        import numba

        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    requested = select([n for n in format_names.split(",") if n])
    at_output = select([n for n in output_formats.split(",") if n])
    skipped = [{"name": f.name, "reason": why} for f in requested if (why := missing_dependency(f))]
    formats = [f for f in requested if not missing_dependency(f)]
    for entry in skipped:
        log(f"skipping {entry['name']}: {entry['reason']}")
    work_dir.mkdir(parents=True, exist_ok=True)
    if source is not None:
        tensors = checkpoint_set(source, policy, rows)
        described = f"{source}, policy {policy}, {len(tensors)} tensors"
    else:
        log("writing (or reusing) the 1-block real-width fixture")
        real_width = make_real_width_transformer(work_dir / "real-width-1", 1)
        tensors = synthetic_set(rows) + checkpoint_set(real_width, "ltx23", rows)
        described = (f"synthetic heavy-tailed set ({len(SYNTHETIC_SHAPES)} tensors, quant.synthetic, "
                     f"seed {SEED}) + the real-width fixture's policy-quantized weights "
                     f"(make_real_width_transformer(layers=1), seed 0)")
    log(f"warming up {len(formats)} formats")
    warm_up(formats)
    log(f"measuring {len(formats)} formats on {len(tensors)} tensors")
    per = measure(formats, tensors, log)
    entries = [summarize(f, per[f.name]) for f in formats]
    sets = {}
    for set_name in sorted({name.split("/", 1)[0] for name, _ in tensors}):
        sets[set_name] = [summarize(f, [r for r in per[f.name]
                                        if r["tensor"].split("/", 1)[0] == set_name])
                          for f in formats]
    result = {"benchmark": "formats", "command": "hlwq bench formats " + " ".join(sys.argv[3:]),
              "machine": machine(), "tensors": described,
              "rows_per_tensor": rows or "all", "seed": SEED, "threads": torch.get_num_threads(),
              "ggml_library": ggml_library_name(),
              "formats": entries, "by_set": sets, "skipped": skipped,
              "below_hlwq_front": hlwq_front_gaps(entries),
              "per_tensor": {name: rows_ for name, rows_ in per.items()}}
    if output_level and source is None:
        runnable = [f for f in at_output if f in formats]
        result["output"] = {"tiny": tiny_output(runnable, work_dir, log)}
        if real_width_layers:
            result["output"]["real_width"] = real_width_output(runnable, work_dir,
                                                               real_width_layers, log)
    if equal_size:
        result["equal_size"] = equal_size_comparison(log)
    result["wall_s"] = time.perf_counter() - started
    png = out.with_suffix(".png")
    plot_error_per_bit(entries, png, f"{described}; {rows or 'all'} rows per tensor")
    result["plot"] = png.name
    atomic_write_text(out, json.dumps(result, indent=2, default=float) + "\n")
    click.echo(json.dumps(result, indent=2, default=float) if as_json
               else f"{report(result)}\nwrote {out} and {png}")

