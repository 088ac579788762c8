"""`hlwq bench runtime`: one LTX-2.3 denoising step from BF16 weights vs from packed weights.

The real-width transformer fixture (``make_real_width_transformer``, 2 blocks
by default) is quantized into artifacts, then every measurement runs in its
own process (``python -m benchmarks.runtime_bench worker ...``), so one
model's memory never hides another's:

- ``bf16``: ``LTX2VideoTransformer3DModel.from_pretrained`` of the BF16 source;
- ``packed``: ``runtime.loader.load_component`` of the ``ltx23``-policy artifact
  (block linears packed, AdaLN/timestep/projection layers kept in BF16);
- ``packed_all``: the same for the ``generic``-policy artifact (every large 2-D
  weight packed). A 2-block model holds 0.43B parameters of model-level AdaLN
  layers that do not grow with depth (36 % of it, 2.6 % of the 48-block model),
  so this variant is the one whose weight mix resembles the full model's.

Each worker resets the kernel's peak-RSS mark after its imports (Linux
``/proc/self/clear_refs``), loads, runs one warm-up step and ``--repeats``
timed steps (bf16 activations, >= 1,024 video tokens), and reports the peak
RSS growth and the median step time. ``max_rel_diff`` compares the packed
outputs with the BF16 ones (max |a - b| / max |b|, video and audio, float64).
The full-model figures are arithmetic over the real LTX-2.3 transformer built on
the meta device (``runtime.ltx23_layout``), with ``quant.sizes``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

RESULTS = Path(__file__).resolve().parent / "results" / "runtime.json"
VARIANTS = {"packed": "ltx23", "packed_all": "generic"}
TARGETS = {"memory_ratio": 0.40, "latency_ratio": 1.25}
BITS = 5


@click.command("runtime")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--layers", default=2, show_default=True, help="Transformer blocks in the fixture.")
@click.option("--frames", default=4, show_default=True, help="Latent frames (x 16 x 16 tokens).")
@click.option("--text-tokens", default=1024, show_default=True,
              help="Prompt tokens (the pipelines pad prompts to 1,024).")
@click.option("--repeats", default=2, show_default=True, help="Timed steps per process.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the fixture and artifacts are kept between runs "
                   "[default: <tmp>/hlwq-bench-runtime].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS,
              show_default=True)
def bench_runtime(as_json: bool, layers: int, frames: int, text_tokens: int, repeats: int,
                  work_dir: Path | None, out: Path) -> None:
    """Peak memory and step latency: packed runtime vs BF16 (separate processes)."""
    from quant.atomic import atomic_write_text

    work = work_dir or Path(tempfile.gettempdir()) / "hlwq-bench-runtime"
    source = prepare_source(work, layers)
    artifacts = {v: prepare_artifact(source, work / f"artifact-{p}", p) for v, p in VARIANTS.items()}
    inputs = write_inputs(work / "inputs.safetensors", source, frames, text_tokens)
    runs = {"bf16": run_worker("bf16", source, inputs, work / "out-bf16.safetensors", repeats)}
    for variant, artifact in artifacts.items():
        runs[variant] = run_worker("packed", artifact, inputs, work / f"out-{variant}.safetensors",
                                   repeats)
    result = summarize(runs, work, layers, frames * 16 * 16, text_tokens)
    atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else report(result, out))


# ---------------------------------------------------------------- preparation


def prepare_source(work: Path, layers: int) -> Path:
    from runtime.fixtures import make_real_width_transformer

    return make_real_width_transformer(work / f"source-{layers}", layers)


def prepare_artifact(source: Path, out: Path, policy_name: str) -> Path:
    """Quantize every tensor the policy selects (quant.core) and package an artifact (once)."""
    from quant.core import quantize_tensor
    from quant.policy import load_policy
    from quant.safetensors_io import TensorEntry, read_tensor
    from quant.staging import write_staged
    from tasks.inventory import build_inventory
    from tasks.package import package_artifact
    from tasks.sources import fetch_source

    if (out / "manifest.json").is_file():
        return out
    fetched = fetch_source(str(source))
    inventory = build_inventory(fetched.root, load_policy(policy_name, bits=BITS))
    staging = out.parent / f".{out.name}-staging"
    staging.mkdir(parents=True, exist_ok=True)
    staged = {}
    for row in inventory.to_pylist():
        if row["action"] != "quantize":
            continue
        entry = TensorEntry(row["tensor"], row["dtype"], tuple(row["shape"]), row["data_start"],
                            row["data_end"])
        packed = quantize_tensor(read_tensor(fetched.root / row["file"], entry), bits=row["bits"],
                                 name=row["tensor"])
        key = f"{row['component']}/{row['tensor']}"
        staged[key] = write_staged(staging, f"{len(staged):05d}", row["tensor"], packed)
    package_artifact(fetched.root, inventory, staged, out, lineage=fetched.lineage,
                     quantization={"bits": BITS, "block_size": 128, "group_size": 128,
                                   "mode": "refined", "policy": policy_name,
                                   "code_version": "bench"},
                     validation={"validated": False})
    return out


def write_inputs(path: Path, source: Path, frames: int, text_tokens: int) -> Path:
    """One denoising step's inputs at the fixture's widths (seeded, written once per shape)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((source / "transformer" / "config.json").read_text())
    video_tokens, audio_tokens = frames * 16 * 16, audio_frames(frames)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    tensors = {
        "hidden_states": randn(1, video_tokens, config["in_channels"]),
        "audio_hidden_states": randn(1, audio_tokens, config["audio_in_channels"]),
        "encoder_hidden_states": randn(1, text_tokens, config["cross_attention_dim"]),
        "audio_encoder_hidden_states": randn(1, text_tokens, config["audio_cross_attention_dim"]),
    }
    save_file(tensors, path, metadata={"frames": str(frames)})
    return path


def audio_frames(latent_frames: int) -> int:
    """Audio latents for the clip's duration, as LTX2Pipeline counts them (24 fps, 16 kHz)."""
    video_frames = (latent_frames - 1) * 8 + 1
    return round(video_frames / 24.0 * 16000 / 160 / 4)


def run_worker(mode: str, model: Path, inputs: Path, out: Path, repeats: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.runtime_bench", "worker", mode, str(model),
               str(inputs), str(out), "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise click.ClickException(f"{mode} worker failed ({shlex.join(command)}):\n"
                                   f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the worker process


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="runtime_bench worker")
    parser.add_argument("mode", choices=("bf16", "packed"))
    parser.add_argument("model", type=Path)
    parser.add_argument("inputs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from diffusers import LTX2VideoTransformer3DModel
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from runtime.loader import load_component
    from runtime.packed_linear import PackedLinear

    for dtype in (torch.float32, torch.bfloat16):  # load the numba kernels before the baseline
        PackedLinear.from_packed(_tiny_packed())(torch.zeros(1, 128, dtype=dtype))
    inputs = load_file(args.inputs)
    with safe_open(args.inputs, framework="pt") as handle:
        frames = int(handle.metadata()["frames"])
    baseline = reset_peak_rss()
    started = time.perf_counter()
    if args.mode == "bf16":
        model = LTX2VideoTransformer3DModel.from_pretrained(args.model / "transformer",
                                                            torch_dtype=torch.bfloat16).eval()
    else:
        model = load_component(args.model, "transformer", dtype=torch.bfloat16)
    load_s = time.perf_counter() - started
    text = inputs["encoder_hidden_states"].shape[1]
    step = dict(inputs, timestep=torch.tensor([500.0]), sigma=torch.tensor([500.0]),
                encoder_attention_mask=torch.ones(1, text),
                audio_encoder_attention_mask=torch.ones(1, text), num_frames=frames, height=16,
                width=16, fps=24.0, audio_num_frames=inputs["audio_hidden_states"].shape[1],
                use_cross_timestep=True, return_dict=False)
    times = []
    with torch.inference_mode():
        for _ in range(1 + args.repeats):        # the first step warms caches and kernels up
            started = time.perf_counter()
            video, audio = model(**step)
            times.append(time.perf_counter() - started)
    peak = peak_rss()
    save_file({"video": video.contiguous(), "audio": audio.contiguous()}, args.out)
    print(json.dumps({"mode": args.mode, "peak_growth_bytes": peak - baseline,
                      "baseline_rss_bytes": baseline, "load_s": load_s, "first_step_s": times[0],
                      "step_s": statistics.median(times[1:]), "step_times_s": times,
                      "threads": torch.get_num_threads()}))


def _tiny_packed():
    import torch

    from quant.codebook import lloyd_max_codebook
    from quant.packed import PackedTensor

    return PackedTensor(torch.zeros(8, 80, dtype=torch.uint8), torch.ones(8, 1, dtype=torch.float16),
                        lloyd_max_codebook(BITS), (8, 128), BITS, 128, 128, "refined")


def reset_peak_rss() -> int:
    """Reset the kernel's high-water mark to the current RSS (Linux >= 4.0); returns that RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# ---------------------------------------------------------------- results


def max_rel_diff(found: Path, reference: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(found), load_file(reference)
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max())
               for k in b)


def summarize(runs: dict, work: Path, layers: int, video_tokens: int, text_tokens: int) -> dict:
    import torch

    bf16 = runs["bf16"]
    variants = {}
    for variant in VARIANTS:
        run = runs[variant]
        variants[variant] = {
            "policy": VARIANTS[variant],
            "peak_bytes": run["peak_growth_bytes"], "step_s": run["step_s"],
            "memory_ratio": run["peak_growth_bytes"] / bf16["peak_growth_bytes"],
            "latency_ratio": run["step_s"] / bf16["step_s"],
            "max_rel_diff": max_rel_diff(work / f"out-{variant}.safetensors",
                                         work / "out-bf16.safetensors"),
            "load_s": run["load_s"], "first_step_s": run["first_step_s"],
        }
    main = variants["packed"]
    return {
        "bf16_peak_bytes": bf16["peak_growth_bytes"], "packed_peak_bytes": main["peak_bytes"],
        "memory_ratio": main["memory_ratio"], "bf16_step_s": bf16["step_s"],
        "packed_step_s": main["step_s"], "latency_ratio": main["latency_ratio"],
        "max_rel_diff": main["max_rel_diff"], "device": "cpu",
        "variants": variants, "targets": TARGETS,
        "bf16": {k: bf16[k] for k in ("load_s", "first_step_s", "step_times_s")},
        "setup": {"layers": layers, "video_tokens": video_tokens, "text_tokens": text_tokens,
                  "audio_tokens": audio_frames(video_tokens // 256), "activations": "bf16",
                  "bits": BITS, "threads": bf16["threads"],
                  "fixture_params": fixture_params(layers)},
        "full_model": full_model_residency(),
        "machine": machine(), "torch": torch.__version__,
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def fixture_params(layers: int) -> dict:
    return _transformer_sizes(layers)["params"]


def full_model_residency() -> dict:
    """What the real 48-block LTX-2.3 transformer keeps resident, packed vs BF16 (arithmetic)."""
    sizes = _transformer_sizes(None)
    return {"transformer_params": sizes["params"]["total"],
            "bf16_bytes": sizes["bf16_bytes"], "packed_bytes": sizes["packed_bytes"],
            "largest_decoded_layer_bf16_bytes": sizes["largest_layer_bf16_bytes"],
            "packed_resident_bytes": sizes["packed_bytes"] + sizes["largest_layer_bf16_bytes"],
            "ratio": (sizes["packed_bytes"] + sizes["largest_layer_bf16_bytes"])
            / sizes["bf16_bytes"], "policy": "ltx23", "bits": BITS}


def _transformer_sizes(layers: int | None) -> dict:
    """Params and bytes of the LTX-2.3 transformer (real config, ``layers`` blocks) under ltx23."""
    from quant.policy import load_policy
    from quant.sizes import padded_in_features, size_table
    from runtime.ltx23_config import real_width_transformer_config
    from runtime.ltx23_layout import build_model, checkpoint_tensors

    config = real_width_transformer_config(layers or 48)
    model = build_model("transformer", config, device="meta")
    policy = load_policy("ltx23", bits=BITS)
    rows = []
    for name, tensor in checkpoint_tensors(model):
        decision = policy.decide(name, tuple(tensor.shape), "BF16", "transformer")
        rows.append({"component": "transformer", "shape": list(tensor.shape), "dtype": "BF16",
                     "action": decision.action, "bits": decision.bits})
    table = size_table(rows)
    largest = max((r["shape"][0] * padded_in_features(r["shape"][1], 128) for r in rows
                   if r["action"] == "quantize"), default=0)
    return {"params": {"total": table["total_params"], "quantized": table["quantized_params"],
                       "kept": table["total_params"] - table["quantized_params"]},
            "bf16_bytes": table["total_original_bytes"], "packed_bytes": table["total_packed_bytes"],
            "largest_layer_bf16_bytes": 2 * largest}


def machine() -> dict:
    import psutil

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                  .splitlines() if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average_1m": os.getloadavg()[0]}


def report(result: dict, out: Path) -> str:
    gib = 2 ** 30
    lines = [f"runtime bench ({result['setup']['layers']} blocks, "
             f"{result['setup']['video_tokens']} video tokens, bf16 activations) -> {out}",
             f"  bf16        peak {result['bf16_peak_bytes'] / gib:6.2f} GiB   "
             f"step {result['bf16_step_s']:7.2f} s"]
    for name, v in result["variants"].items():
        lines.append(f"  {name:<11} peak {v['peak_bytes'] / gib:6.2f} GiB ({v['memory_ratio']:.2f}x, "
                     f"target <= {TARGETS['memory_ratio']})   step {v['step_s']:7.2f} s "
                     f"({v['latency_ratio']:.2f}x, target <= {TARGETS['latency_ratio']})   "
                     f"max rel diff {v['max_rel_diff']:.2e}   [{v['policy']} policy]")
    full = result["full_model"]
    lines.append(f"  full 48-block transformer: BF16 {full['bf16_bytes'] / gib:.1f} GiB, packed "
                 f"resident {full['packed_resident_bytes'] / gib:.1f} GiB ({full['ratio']:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
    else:
        bench_runtime()
