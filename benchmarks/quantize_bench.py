"""`hlwq bench quantize`: encoder speed and error vs polarquant 0.6.0 and GGUF Q5_0.

The same seeded heavy-tailed BF16 tensors (Student-t(5) with a few outlier input
columns x8, scaled like trained linears) go through, alternating within one run:

- polarquant 0.6.0's ``PolarQuantizer.quantize_tensor`` (the reference encoder);
- our ``refined`` encoder (the default) and our ``reference`` mode;
- our ``dequantize`` to BF16 (MB/s of BF16 output);
- our refined encoder with 32-value scale groups (5.5 bits/weight at Q5) and
  gguf-py's Q5_0 (5.5 bits/weight), the per-bit peer, for error only.

Speeds are MB/s of BF16 input over all tensors (total bytes / summed median
time); relative MSEs are total squared error / total squared weight, in float64.
The machine is shared, so its load average is recorded next to the numbers.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import click
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "quantize.json"
SHAPES = [(4096, 4096), (16384, 4096)]
QUICK_SHAPES = [(1024, 4096), (4096, 1024)]
BITS = 5
TARGETS = {"speedup_reference_mode": 25.0, "reference_mode_mb_s": 400.0, "speedup_refined": 12.0,
           "refined_mb_s": 200.0, "dequant_mb_s": 1000.0, "refined_over_reference": 0.75,
           "subblock32_over_gguf_q5_0": 0.85}


@click.command("quantize")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quick", is_flag=True, help="Small tensors and fewer repeats (a smoke run).")
@click.option("--repeats", default=3, show_default=True,
              help="Timed runs of each of our encoders per tensor (polarquant: 1 per 3).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS,
              show_default=True)
def bench_quantize(as_json: bool, quick: bool, repeats: int, out: Path) -> None:
    """Quantize speed and error vs polarquant 0.6.0 and GGUF Q5_0."""
    from hlwq.store.atomic import atomic_write_text

    load_before = os.getloadavg()
    warmup_s = warm_up()
    shapes = QUICK_SHAPES if quick else SHAPES
    tensors = [measure_tensor(shape, seed, 1 if quick else repeats)
               for seed, shape in enumerate(shapes)]
    result = summarize(tensors, warmup_s, load_before, quick)
    atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else report(result, out))


# ---------------------------------------------------------------- data and timing

def heavy_tailed_bf16(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Student-t(5) weights, 8 outlier input columns x8, std ~0.03: like trained linears."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    weight = torch.empty(rows, cols)
    for start in range(0, rows, 1024):       # chunks keep the float temporaries small
        stop = min(rows, start + 1024)
        normal = torch.randn(stop - start, cols, generator=gen)
        chi2 = torch.randn(5, stop - start, cols, generator=gen).pow_(2).sum(0)
        weight[start:stop] = normal / torch.sqrt(chi2 / 5)
    outliers = torch.randperm(cols, generator=gen)[:8]
    weight[:, outliers] *= 8
    return (0.02 * weight).bfloat16()


CPU_SECONDS: dict[str, list[float]] = {}


def timed(fn, key: str | None = None):
    """Wall seconds and value of ``fn()``; the process CPU seconds go to CPU_SECONDS[key]."""
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    if key:
        CPU_SECONDS.setdefault(key, []).append(time.process_time() - cpu)
    return time.perf_counter() - start, value


def warm_up() -> float:
    """Compile (or load the cached) numba kernels outside the timed runs."""
    from hlwq.quant.core import dequantize, quantize_tensor

    start = time.perf_counter()
    small = heavy_tailed_bf16((64, 256), seed=99)
    for mode in ("refined", "reference"):
        packed = quantize_tensor(small, BITS, mode=mode)
    dequantize(packed, torch.bfloat16)
    quantize_tensor(small, BITS, group_size=32)
    return time.perf_counter() - start


def polarquant_dequantize(result: dict, shape: tuple[int, int], block: int = 128) -> torch.Tensor:
    """The reference formula ``n * (ct_scaled[code] @ H^T)``, in row chunks."""
    from hlwq.quant.hadamard import hadamard_matrix

    rows, cols = shape
    h_t = hadamard_matrix(block).T
    out = torch.empty(rows, cols)
    for start in range(0, rows, 1024):
        codes = result["codes"][start:start + 1024].long() & 0xFF
        rotated = result["ct_scaled"][codes].view(codes.shape[0], -1, block)
        rotated = rotated * result["norms"][start:start + 1024].float().unsqueeze(-1)
        out[start:start + 1024] = (rotated @ h_t).reshape(codes.shape[0], -1)[:, :cols]
    return out


def squared_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    from hlwq.quant.metrics import tensor_metrics

    reference_sq = float(weight.double().pow(2).sum())
    return tensor_metrics(weight, approx)["rel_mse"] * reference_sq


def gguf_q5_0_error(weight: torch.Tensor) -> tuple[float, float]:
    """(squared error, seconds) of gguf-py Q5_0 quantize + dequantize."""
    from gguf import GGMLQuantizationType, quants

    data = weight.float().numpy()
    seconds, restored = timed(lambda: quants.dequantize(
        quants.quantize(data, GGMLQuantizationType.Q5_0), GGMLQuantizationType.Q5_0))
    return squared_error(weight, torch.from_numpy(restored)), seconds


def measure_tensor(shape: tuple[int, int], seed: int, repeats: int) -> dict:
    """Alternate polarquant and our encoders on one tensor; return times and errors."""
    from polarengine_vllm.quantizer import PolarQuantizer

    from hlwq.quant.core import dequantize, quantize_tensor
    from hlwq.quant.packing import unpack_codes

    weight = heavy_tailed_bf16(shape, seed)
    polar = PolarQuantizer(block_size=128)
    times: dict[str, list[float]] = {"polarquant": [], "refined": [], "reference_mode": [],
                                     "dequant": []}
    outputs = {}
    for round_ in range(repeats):
        if round_ % 3 == 0:                   # polarquant is slow: once per three rounds
            seconds, outputs["polarquant"] = timed(lambda: polar.quantize_tensor(weight, BITS),
                                                   "polarquant")
            times["polarquant"].append(seconds)
        for key, mode in (("refined", "refined"), ("reference_mode", "reference")):
            seconds, outputs[key] = timed(lambda m=mode: quantize_tensor(weight, BITS, mode=m),
                                          key)
            times[key].append(seconds)
        seconds, _ = timed(lambda: dequantize(outputs["refined"], torch.bfloat16), "dequant")
        times["dequant"].append(seconds)
    subblock_s, outputs["subblock32"] = timed(lambda: quantize_tensor(weight, BITS, group_size=32))
    reference = weight.float()
    errors = {key: squared_error(reference, dequantize(outputs[key]))
              for key in ("refined", "reference_mode", "subblock32")}
    errors["polarquant"] = squared_error(reference,
                                         polarquant_dequantize(outputs["polarquant"], shape))
    errors["gguf_q5_0"], gguf_s = gguf_q5_0_error(weight)
    ours = unpack_codes(outputs["reference_mode"].codes, BITS, outputs["reference_mode"].in_padded)
    same_codes = ours.long() == (outputs["polarquant"]["codes"].long() & 0xFF)
    cpu = {key: statistics.median(CPU_SECONDS.pop(key)) for key in times}
    return {
        "shape": list(shape), "seed": seed, "bf16_bytes": weight.numel() * 2,
        "median_cpu_s": cpu,
        "weight_sq": float(reference.double().pow(2).sum()),
        "median_s": {key: statistics.median(values) for key, values in times.items()},
        "all_s": times, "subblock32_s": subblock_s, "gguf_q5_0_s": gguf_s,
        "squared_error": errors,
        "reference_mode_codes_identical": float(same_codes.float().mean()),
    }


# ---------------------------------------------------------------- summary

def summarize(tensors: list[dict], warmup_s: float, load_before, quick: bool) -> dict:
    total_bytes = sum(t["bf16_bytes"] for t in tensors)
    total_sq = sum(t["weight_sq"] for t in tensors)

    def mb_s(key: str) -> float:
        return total_bytes / 1e6 / sum(t["median_s"][key] for t in tensors)

    def rel_mse(key: str) -> float:
        return sum(t["squared_error"][key] for t in tensors) / total_sq

    result = {
        "refined_mb_s": mb_s("refined"),
        "reference_mode_mb_s": mb_s("reference_mode"),
        "polarquant_mb_s": mb_s("polarquant"),
        "dequant_mb_s": mb_s("dequant"),
        "rel_mse_refined": rel_mse("refined"),
        "rel_mse_reference_mode": rel_mse("reference_mode"),
        "rel_mse_polarquant": rel_mse("polarquant"),
        "rel_mse_subblock32": rel_mse("subblock32"),
        "rel_mse_gguf_q5_0": rel_mse("gguf_q5_0"),
    }
    # The machine is shared: MB per CPU-second (all threads) shows the work itself,
    # free of waiting for a core; times the core count it is an idle-machine estimate.
    result["mb_per_cpu_second"] = {
        key: total_bytes / 1e6 / sum(t["median_cpu_s"][key] for t in tensors)
        for key in ("polarquant", "refined", "reference_mode", "dequant")}
    result["speedup_refined"] = result["refined_mb_s"] / result["polarquant_mb_s"]
    result["speedup_reference_mode"] = result["reference_mode_mb_s"] / result["polarquant_mb_s"]
    ratios = {
        "refined_over_reference": result["rel_mse_refined"] / result["rel_mse_reference_mode"],
        "subblock32_over_gguf_q5_0": result["rel_mse_subblock32"] / result["rel_mse_gguf_q5_0"],
    }
    result.update(ratios)
    result["targets"] = TARGETS
    result["targets_met"] = {
        key: (result[key] <= goal if key.endswith(("_over_reference", "_over_gguf_q5_0"))
              else result[key] >= goal) for key, goal in TARGETS.items()}
    result.update(bits=BITS, block_size=128, quick=quick, warmup_s=warmup_s, tensors=tensors,
                  machine=machine(load_before), command=command_line())
    return result


def machine(load_before) -> dict:
    import numba
    import numpy

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo()
                if line.startswith("model name")), platform.processor())
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numba": numba.__version__, "numpy": numpy.__version__}
    for package in ("polarquant", "gguf"):
        versions[package] = _version(package)
    return {"cpu": cpu, "cores": os.cpu_count(), "numba_threads": numba.get_num_threads(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
            "versions": versions}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def command_line() -> str:
    program = Path(sys.argv[0]).name
    return shlex.join(["hlwq" if program == "hlwq" else program, *sys.argv[1:]])


def report(result: dict, out: Path) -> str:
    met = result["targets_met"]
    mark = {True: "ok", False: "MISSED"}
    rows = [
        ("polarquant 0.6.0 encoder", f"{result['polarquant_mb_s']:8.1f} MB/s", "", ""),
        ("ours, refined (default)", f"{result['refined_mb_s']:8.1f} MB/s",
         f"x{result['speedup_refined']:.1f}", mark[met["speedup_refined"] and met["refined_mb_s"]]),
        ("ours, reference mode", f"{result['reference_mode_mb_s']:8.1f} MB/s",
         f"x{result['speedup_reference_mode']:.1f}",
         mark[met["speedup_reference_mode"] and met["reference_mode_mb_s"]]),
        ("ours, dequantize to BF16", f"{result['dequant_mb_s']:8.1f} MB/s", "",
         mark[met["dequant_mb_s"]]),
    ]
    errors = [
        ("polarquant 0.6.0 Q5 (5.125 b/w)", result["rel_mse_polarquant"], ""),
        ("ours reference mode (5.125 b/w)", result["rel_mse_reference_mode"], ""),
        ("ours refined (5.125 b/w)", result["rel_mse_refined"],
         (f"{result['refined_over_reference']:.3f} x reference  "
          f"{mark[met['refined_over_reference']]}")),
        ("ours 32-value groups (5.5 b/w)", result["rel_mse_subblock32"],
         (f"{result['subblock32_over_gguf_q5_0']:.3f} x GGUF Q5_0  "
          f"{mark[met['subblock32_over_gguf_q5_0']]}")),
        ("GGUF Q5_0 (5.5 b/w)", result["rel_mse_gguf_q5_0"], ""),
    ]
    shapes = ", ".join("x".join(map(str, t["shape"])) for t in result["tensors"])
    m = result["machine"]
    lines = [f"HLWQ Q5 encoders on heavy-tailed BF16 tensors ({shapes})",
             (f"{m['cpu']}, {m['cores']} cores, load {m['load_average_before'][0]:.1f} -> "
              f"{m['load_average_after'][0]:.1f}"), "",
             f"{'speed (MB/s of BF16)':34}{'':14}{'vs polarquant':>14}"]
    lines += [f"{name:34}{speed:>14}{ratio:>14}  {flag}" for name, speed, ratio, flag in rows]
    cpu = result["mb_per_cpu_second"]
    lines += ["", "MB per CPU-second (load-independent): "
              + ", ".join(f"{key} {value:.1f}" for key, value in cpu.items())]
    lines += ["", f"{'relative MSE':34}"]
    lines += [f"{name:34}{value:14.6f}  {note}" for name, value, note in errors]
    lines += ["", "reference-mode codes identical to polarquant's: "
              + ", ".join(f"{t['reference_mode_codes_identical']:.6%}"
                          for t in result["tensors"]),
              f"written to {out}"]
    return "\n".join(lines)
