"""`hlwq bench calibration`: the block-by-block calibration forward against quantizing.

On the real-width transformer fixture (``--layers`` blocks, synthetic BF16 weights of LTX-2.3's
real widths), one run measures:

- the streamed calibration (runtime/block_calibration.py) on ``--inputs`` first-step inputs
  of LTX-2.3's default calibration size: setup (shell model, non-block weights, captured
  block inputs) and, per block, reading its weights, the forward that records activations,
  and one noise probe per linear;
- the quantize work of the same blocks: every block linear through quant.core at Q5
  (what the flow's workers do), one tensor at a time in this process.

Both are extrapolated to LTX-2.3's 48 blocks (setup once, per-block costs times 48) and
their ratio recorded (benchmarks/results/calibration.json). Both run single-process on the
same threads, so the ratio is what calibration adds to a quantize run on one worker; with
more workers the quantize stage shortens and the ratio grows by the worker count.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

from hlwq.benchmarks.budget_bench import machine, real_width_inputs
from hlwq.store.atomic import atomic_write_text

RESULTS = Path(__file__).with_name("results") / "calibration.json"
LTX23_BLOCKS = 48


def quantize_blocks(folder: Path, bits: int = 5) -> dict:
    """Seconds to quantize every block linear of the transformer in ``folder``, per block."""
    from hlwq.quant.core import quantize_tensor
    from hlwq.runtime.block_calibration import BLOCKS, tensor_index
    from hlwq.store.ltx23_config import BLOCK_LINEAR_PATTERN
    from hlwq.store.safetensors_io import read_tensor

    index = tensor_index(folder)
    per_block: dict[str, float] = {}
    params = 0
    for name, (path, entry) in sorted(index.items()):
        if not (name.startswith(f"{BLOCKS}.") and BLOCK_LINEAR_PATTERN.search(name)
                and len(entry.shape) == 2):
            continue
        block = name.split(".")[1]
        tick = time.perf_counter()
        quantize_tensor(read_tensor(path, entry).float(), bits, name=name)
        per_block[block] = per_block.get(block, 0.0) + time.perf_counter() - tick
        params += entry.numel
    return {"bits": bits, "params": params, "seconds_per_block": per_block}


@click.command()
@click.option("--out", type=click.Path(dir_okay=False), default=str(RESULTS), show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False), default="work-runs/bench-calibration",
              show_default=True, help="Where the fixture is written (reused across runs).")
@click.option("--layers", type=int, default=2, show_default=True,
              help="Blocks of the real-width fixture.")
@click.option("--inputs", type=int, default=2, show_default=True,
              help="Calibration inputs (tasks/budget.py CALIBRATION_PROMPTS by default).")
def bench_calibration(out, work_dir, layers, inputs):
    """Block-by-block calibration cost vs quantize cost, extrapolated to 48 blocks."""
    from hlwq.runtime.block_calibration import streamed_activation_stats
    from hlwq.store.ltx23_config import real_width_transformer_config
    from hlwq.testing.fixtures import make_real_width_transformer

    started = time.perf_counter()
    root = make_real_width_transformer(Path(work_dir) / f"real-width-{layers}", layers)
    folder = root / "transformer"
    config = real_width_transformer_config(layers)
    calibration = [real_width_inputs(config, seed) for seed in range(1, inputs + 1)]
    torch.manual_seed(0)
    stats, cost = streamed_activation_stats(folder, calibration)
    quantized = quantize_blocks(folder)
    per_block_calibration = (cost["read_s"] + cost["forward_s"] + cost["probe_s"]) / layers
    per_block_quantize = sum(quantized["seconds_per_block"].values()) / layers
    calibration_48 = cost["setup_s"] + LTX23_BLOCKS * per_block_calibration
    quantize_48 = LTX23_BLOCKS * per_block_quantize
    results = {
        "benchmark": "calibration", "command": "hlwq bench calibration " + " ".join(sys.argv[3:]),
        "machine": machine(),
        "fixture": f"make_real_width_transformer(layers={layers}), seed 0",
        "inputs": f"{inputs} synthetic first-step inputs (2x8x8 video latents, 16 audio frames, "
                  "64 text tokens; benchmarks/budget_bench.py real_width_inputs)",
        "streamed_calibration": {**cost, "probed_linears": len(stats.output_gain),
                                 "seconds_per_block": per_block_calibration},
        "quantize": {**quantized, "seconds_per_block_mean": per_block_quantize},
        "extrapolated_48_blocks": {
            "calibration_s": calibration_48, "quantize_s": quantize_48,
            "calibration_share_of_quantize": calibration_48 / quantize_48,
            "note": "setup once + 48 x the measured per-block cost; quantize single-process"},
        "wall_s": time.perf_counter() - started,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), json.dumps(results, indent=2, default=float))
    click.echo(json.dumps(results["extrapolated_48_blocks"], indent=2))
    click.echo(f"wrote {out}")
