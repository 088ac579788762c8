"""`hlwq bench calibration`: the block-by-block calibration against the quantize run, one run.

On the real-width transformer fixture (``--layers`` blocks, synthetic BF16 weights of LTX-2.3's
real widths), one run measures:

- the streamed calibration (runtime/block_calibration.py: per block, reading its weights and
  one forward + one backward per input, in its default dtype here; then three baselines:
  reading through the page cache, the text cross-attention projecting its values for every key
  as the model does (runtime/calibration_attention.py), and float32, for the cost and the
  agreement of the gains) at the default calibration size: the first
  denoising step of the suite's first ``CALIBRATION_PROMPTS`` prompts, at the shapes the
  LTX-2.3 pipeline gives them (captured from the tiny fixture, whose VAE compression and text
  length are the real ones: latent frames x rows x columns, audio frames, 1024 text tokens,
  the conditional pass of classifier-free guidance: tasks/budget.py calibration_inputs), with
  values of the real widths;
- the quantize run as the flow runs it: ``hlwq quantize`` with 2 Dask workers
  (benchmarks/scale_bench.py run_flow) on the same fixture.

Both are extrapolated to LTX-2.3's 48 blocks: calibration setup once, its first block, and 47
x the median of the middle blocks (steady_block_seconds); the quantize
stage 48 / ``--layers`` times longer, plus the flow's fixed start-up. By default the fixture's
files are dropped from the page cache before each part, so both read from the disk. With
``--oracle`` the output gains are also checked against the noise probe (one forward per
linear, hlwq.testing.sensitivity_probe) on the tiny fixture and the real-width model in
memory: rank correlation and ratio of the gains.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import click
import torch

from hlwq.benchmarks.budget_bench import machine
from hlwq.store.atomic import atomic_write_text

RESULTS = Path(__file__).with_name("results") / "calibration.json"
LTX23_BLOCKS = 48
WIDTHS = {"hidden_states": "in_channels", "audio_hidden_states": "audio_in_channels",
          "encoder_hidden_states": "cross_attention_dim",
          "audio_encoder_hidden_states": "audio_cross_attention_dim"}


def default_calibration_inputs(work: Path) -> tuple[list[dict], object]:
    """First-step transformer inputs of the default calibration prompts, and the tiny
    pipeline they were captured with."""
    from hlwq.tasks.budget import CALIBRATION_PROMPTS, calibration_inputs
    from hlwq.tasks.validate_output import load_suite
    from hlwq.testing.fixtures import load_tiny_pipeline, make_tiny_ltx23

    pipeline = load_tiny_pipeline(make_tiny_ltx23(work / "tiny"))
    pipeline.set_progress_bar_config(disable=True)
    return calibration_inputs(pipeline, load_suite(None)[:CALIBRATION_PROMPTS]), pipeline


def at_real_width(inputs: dict, config: dict, seed: int) -> dict:
    """``inputs`` with the hidden states redrawn (seeded) at the widths of ``config``."""
    gen = torch.Generator().manual_seed(seed)
    return {**inputs, **{name: torch.randn((*inputs[name].shape[:-1], config[width]), generator=gen)
                         for name, width in WIDTHS.items()}}


def drop_from_page_cache(root: Path) -> None:
    """Ask the kernel to drop the cached pages of every file under ``root`` (clean pages go;
    a file read next comes from the disk)."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def steady_block_seconds(cost: dict) -> tuple[float, float]:
    """(the first block's seconds, the median of the middle blocks'). The first also pays for
    one-time set-up and reads alone; the last computes while nothing is read. Every other
    block of LTX-2.3's 48 computes while the next one is read, as the middle ones do here."""
    blocks = cost["block_s"]
    return blocks[0], statistics.median(blocks[1:-1] or blocks[1:] or blocks)


def shapes(inputs: dict) -> dict:
    return {name: list(inputs[name].shape) for name in WIDTHS}


def rank_agreement(gains: dict[str, float], oracle: dict[str, float]) -> dict:
    """Spearman correlation and ratio statistics of ``gains`` against the probe's."""
    keys = sorted(oracle)

    def ranks(values):
        return torch.tensor(values).argsort().argsort().double()

    a, b = ranks([gains[k] for k in keys]), ranks([oracle[k] for k in keys])
    ratios = [gains[k] / oracle[k] for k in keys if oracle[k] > 0]
    return {"linears": len(keys), "spearman": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratio_of_sums": sum(gains[k] for k in keys) / sum(oracle[k] for k in keys)}


def oracle_check(model: torch.nn.Module, inputs: list[dict], names=None,
                 probe_seeds=(0, 1)) -> dict:
    """Backward gains (two cotangent seeds) against noise probes of the same linears (one
    per seed of ``probe_seeds``; two also say how noisy the probe is)."""
    from hlwq.tasks.budget import activation_stats
    from hlwq.testing.sensitivity_probe import probe_gains

    def forward():
        return [model(**kwargs, return_dict=False) for kwargs in inputs]

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and (names is None or f"{n}.weight" in names)}
    tick = time.perf_counter()
    weights = {f"{n}.weight" for n in linears}
    gains = [activation_stats(model, forward, "t", weights, seed=seed).output_gain
             for seed in (0, 1)]
    backward_s = (time.perf_counter() - tick) / 2
    tick = time.perf_counter()
    probes = [{f"t/{n}.weight": g for n, g in probe_gains(linears, forward, seed=seed).items()}
              for seed in probe_seeds]
    probe_s = (time.perf_counter() - tick) / len(probes)
    checks = {"backward_vs_probe": rank_agreement(gains[0], probes[0]),
              "backward_vs_backward_other_seed": rank_agreement(gains[1], gains[0]),
              "backward_s": backward_s, "probe_s": probe_s}
    if len(probes) > 1:
        checks["probe_vs_probe_other_seed"] = rank_agreement(probes[1], probes[0])
    return checks


def write(out, results: dict, started: float) -> None:
    """Write what is measured so far (a long oracle part may follow)."""
    results["wall_s"] = time.perf_counter() - started
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), json.dumps(results, indent=2, default=float))


@click.command()
@click.option("--out", type=click.Path(dir_okay=False), default=str(RESULTS), show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False), default="work-runs/bench-calibration",
              show_default=True, help="Where the fixtures are written (reused across runs).")
@click.option("--layers", type=int, default=6, show_default=True,
              help="Blocks of the real-width fixture.")
@click.option("--cold-cache/--warm-cache", default=True, show_default=True,
              help="Drop the fixture's files from the page cache before each measured part, so "
                   "both read from the disk, as LTX-2.3's 46 GB do on a 24 GB machine.")
@click.option("--oracle/--no-oracle", default=False, show_default=True,
              help="Also compare the gains with the noise probe's (minutes at real width).")
def bench_calibration(out, work_dir, layers, cold_cache, oracle):
    """Block-by-block calibration cost vs the quantize run, extrapolated to 48 blocks."""
    from hlwq.benchmarks.scale_bench import run_flow
    from hlwq.runtime.block_calibration import calibration_dtype, streamed_activation_stats
    from hlwq.store.ltx23_config import real_width_transformer_config
    from hlwq.testing.fixtures import make_real_width_transformer

    started = time.perf_counter()
    work = Path(work_dir)
    root = make_real_width_transformer(work / f"real-width-{layers}", layers)
    config = real_width_transformer_config(layers)
    captured, tiny = default_calibration_inputs(work)
    calibration = [at_real_width(kwargs, config, seed) for seed, kwargs in enumerate(captured, 1)]
    dtype = calibration_dtype("cpu", torch.float32)
    evict = (lambda: drop_from_page_cache(root)) if cold_cache else (lambda: None)
    evict()
    stats, cost = streamed_activation_stats(root / "transformer", calibration, dtype=dtype)
    evict()
    flow = run_flow(root, work / "quantize-out", workers=2)
    first_block, per_block_calibration = steady_block_seconds(cost)
    calibration_48 = cost["setup_s"] + first_block + (LTX23_BLOCKS - 1) * per_block_calibration
    quantize_48 = (flow["wall_s"] - flow["quantize_wall_s"]
                   + LTX23_BLOCKS / layers * flow["quantize_wall_s"])
    results = {
        "benchmark": "calibration", "command": "hlwq bench calibration " + " ".join(sys.argv[3:]),
        "machine": machine(),
        "fixture": f"make_real_width_transformer(layers={layers}), seed 0",
        "page_cache": ("the fixture's files dropped from it before each measured part"
                       if cold_cache else "warm (the fixture's files may be cached)"),
        "calibration_size": {"inputs": len(calibration), "shapes": [shapes(c) for c in calibration],
                             "what": "first denoising step of the suite's first prompts at their "
                                     "render size, conditional pass (tasks/budget.py "
                                     "CALIBRATION_PROMPTS); real widths, synthetic values"},
        "streamed_calibration": {**cost, "dtype": str(dtype).removeprefix("torch."),
                                 "first_block_s": first_block,
                                 "seconds_per_block": per_block_calibration},
        "quantize_flow_2_workers": {k: flow[k] for k in ("wall_s", "quantize_wall_s", "busy_s",
                                                         "input_bytes", "quantized_tensors")},
        "extrapolated_48_blocks": {
            "calibration_s": calibration_48, "quantize_run_s": quantize_48,
            "calibration_share_of_quantize_run": calibration_48 / quantize_48,
            "note": "calibration: setup once, the first block (which also sets up the kernels "
                    "and the allocator's memory, and reads alone), and 47 x the median of the "
                    "middle blocks, each computing while the next is read "
                    "(benchmarks/calibration_bench.py steady_block_seconds); "
                    "quantize run: the flow's fixed part + 48/layers x its quantize stage "
                    "(2 workers)"},
    }
    for part, baseline, what in (
            ("streamed_calibration_through_page_cache", {"direct_reads": False},
             "its reads through the page cache"),
            ("streamed_calibration_values_projected_first", {"values_after_weights": False},
             "the text cross-attention as the model runs it, values projected for every key")):
        evict()
        other, other_cost = streamed_activation_stats(root / "transformer", calibration,
                                                      dtype=dtype, **baseline)
        results[part] = {**other_cost, "seconds_per_block": steady_block_seconds(other_cost)[1],
                         "what": f"the same calibration, {what} (a baseline)",
                         "gains_vs_default": rank_agreement(stats.output_gain, other.output_gain)}
    if dtype != torch.float32:
        evict()
        baseline, baseline_cost = streamed_activation_stats(root / "transformer", calibration)
        results["streamed_calibration_float32"] = {
            **baseline_cost, "seconds_per_block": steady_block_seconds(baseline_cost)[1],
            "gains_vs_float32": rank_agreement(stats.output_gain, baseline.output_gain)}
    write(out, results, started)
    if oracle:
        from diffusers import LTX2VideoTransformer3DModel

        results["oracle_tiny"] = oracle_check(tiny.transformer, captured)
        write(out, results, started)
        model = LTX2VideoTransformer3DModel.from_pretrained(
            root / "transformer", torch_dtype=torch.float32, use_safetensors=True).eval()
        results["oracle_real_width"] = {
            "inputs": "the first calibration input; the linears of block 0, gains at the "
                      "model's output",
            **oracle_check(model, calibration[:1],
                           {n for n, _ in model.named_parameters()
                            if n.startswith("transformer_blocks.0.") and n.endswith(".weight")},
                           probe_seeds=(0,))}
        write(out, results, started)
    click.echo(json.dumps(results["extrapolated_48_blocks"], indent=2))
    click.echo(f"wrote {out}")
