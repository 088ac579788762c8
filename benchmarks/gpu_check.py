"""The GPU check of issue 15, in one run of under 10 minutes on a CUDA machine.

1. the Triton decode tests, on CUDA (pytest without the suite's conftest: no Prefect there);
2. one denoising step of the real-width LTX-2.3 transformer (4 blocks, 6,144 video tokens,
   bf16), dense BF16 against the same weights with every large 2-D weight packed (Q5, the
   ``generic`` policy: runtime_bench's headline, since the model-level layers the ``ltx23``
   policy keeps are 22 % of a 4-block model but 2.6 % of the real one), in one process, one
   after the other: step latency, weights resident, peak memory, output diff;
3. the tiny LTX-2.3 pipeline (transformer and text encoder packed) rendered under each offload
   mode, and under ``auto`` with the memory plan of the pipeline's own tensors: wall time,
   peak memory (and the plan's prediction), latents against offload "none";
4. everything as JSON (benchmarks/gpu_check.sh: under $OUT or benchmarks/results/).

Only quant/, runtime/, store/ and the testing/ fixtures run, so the machine needs torch,
triton, transformers, accelerate, safetensors and diffusers (benchmarks/gpu_check.sh brings
the diffusers wheel along). ``--dry-run`` runs every step on the CPU at tiny widths (a syntax
and wiring check, no numbers worth keeping).

    python -m hlwq.benchmarks.gpu_check [--dry-run] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hlwq.runtime.peak_memory import PeakMemory
from hlwq.store.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
ABSENT_THERE = ("prefect", "dask", "distributed", "av")     # not on the GPU machine
TARGETS = {"step_latency_ratio_max": 1.15, "weights_resident_ratio_max": 0.35}
OFFLOAD_RENDER = {"prompt": "a red fox runs through fresh snow at dawn", "num_frames": 9,
                  "height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent"}


def triton_tests(dry_run: bool) -> dict:
    tests = [str(REPO / "tests" / name) for name in ("test_triton_cuda.py",
                                                      "test_runtime_packed_linear.py")]
    command = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
               *tests, "-k", "triton or cuda"]
    if dry_run:
        command.append("--collect-only")
    started = time.perf_counter()
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO)
    return {"command": " ".join(command[2:]), "returncode": done.returncode,
            "summary": (done.stdout.strip().splitlines() or [""])[-1],
            "wall_s": round(time.perf_counter() - started, 1)}


# --------------------------------------------------------------------------- one step


def allocated(device: torch.device) -> int:
    """Bytes the CUDA allocator holds for tensors (0 on the CPU: the dry run)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(model, step: dict, device: torch.device, steps: int) -> dict:
    times = []
    with PeakMemory(device) as peak, torch.inference_mode():
        for _ in range(1 + steps):                  # the first warms kernels and caches up
            started = time.perf_counter()
            video, audio = model(**step)
            synchronize(device)
            times.append(time.perf_counter() - started)
    return {"step_s": min(times[1:]), "step_times_s": [round(t, 4) for t in times],
            "peak_bytes": peak.peak_bytes, "peak_kind": peak.kind,
            "video": video.double().cpu(), "audio": audio.double().cpu()}


def pack_linears(model, policy_name: str) -> int:
    """Replace every linear the policy quantizes by a Q5 PackedLinear on the same device;
    returns how many."""
    from hlwq.quant.core import quantize_tensor
    from hlwq.runtime.packed_linear import PackedLinear
    from hlwq.store.policy import load_policy

    policy = load_policy(policy_name)
    packed = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight.detach()
        decision = policy.decide(f"{name}.weight", tuple(weight.shape), "BF16", "transformer")
        if decision.action != "quantize":
            continue
        tensor = quantize_tensor(weight, bits=decision.bits, block_size=128, mode="reference",
                                 name=name)
        model.set_submodule(name, PackedLinear.from_packed(tensor, module.bias).to(weight.device))
        packed += 1
    return packed


def step_benchmark(device: torch.device, layers: int, frames: int, steps: int,
                   dry_run: bool) -> dict:
    from hlwq.benchmarks.runtime_bench import HEADLINE, audio_frames, step_arguments
    from hlwq.runtime.ltx23_models import build_model
    from hlwq.store.ltx23_config import real_width_transformer_config, tiny_config

    config = tiny_config("transformer") if dry_run else real_width_transformer_config(layers)
    config["num_layers"] = layers
    before = allocated(device)
    # built on the device with torch's own initialisation: latency and memory do not depend
    # on the values, and synthetic trained-looking ones would take minutes of the CPU's time
    torch.manual_seed(0)
    model = build_model("transformer", config, device=device)
    model = model.to(dtype=torch.bfloat16).eval()
    dense_bytes = allocated(device) - before
    video, audio = frames * 16 * 16, audio_frames(frames)
    g = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(1, tokens, width, generator=g).to(device, torch.bfloat16)
              for name, tokens, width in (
                  ("hidden_states", video, config["in_channels"]),
                  ("audio_hidden_states", audio, config["audio_in_channels"]),
                  ("encoder_hidden_states", 1024, config["cross_attention_dim"]),
                  ("audio_encoder_hidden_states", 1024, config["audio_cross_attention_dim"]))}
    with tempfile.TemporaryDirectory() as scratch:     # step_arguments reads frames from a file
        from safetensors.torch import save_file

        path = Path(scratch) / "inputs.safetensors"
        save_file({k: v.cpu() for k, v in inputs.items()}, path, metadata={"frames": str(frames)})
        step = step_arguments(inputs, path)
    dense = timed_steps(model, step, device, steps)
    linears = pack_linears(model, HEADLINE)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    packed_bytes = allocated(device) - before
    packed = timed_steps(model, step, device, steps)
    diff = max(float((packed[k] - dense[k]).abs().max() / dense[k].abs().max())
               for k in ("video", "audio"))
    result = {"layers": layers, "video_tokens": video, "audio_tokens": audio, "text_tokens": 1024,
              "weights": "torch's default initialisation", "policy": HEADLINE, "bits": 5,
              "packed_linears": linears, "max_rel_diff": diff,
              "bf16": {k: v for k, v in dense.items() if k not in ("video", "audio")},
              "packed": {k: v for k, v in packed.items() if k not in ("video", "audio")},
              "bf16_weights_bytes": dense_bytes, "packed_weights_bytes": packed_bytes}
    result["step_latency_ratio"] = packed["step_s"] / dense["step_s"]
    if dense_bytes:
        result["weights_resident_ratio"] = packed_bytes / dense_bytes
        result["peak_ratio"] = packed["peak_bytes"] / dense["peak_bytes"]
    return result


# --------------------------------------------------------------------------- offload renders


def offload_renders(device: torch.device) -> dict:
    from hlwq.runtime.memory_plan import RenderShape, folder_configs, render_peaks
    from hlwq.runtime.offload import apply_offload
    from hlwq.testing.fixtures import make_tiny_ltx23

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = RenderShape(width=OFFLOAD_RENDER["width"], height=OFFLOAD_RENDER["height"],
                        frames=OFFLOAD_RENDER["num_frames"], dtype_bytes=dtype.itemsize)
    results, reference = {}, None
    with tempfile.TemporaryDirectory() as scratch:
        source = make_tiny_ltx23(Path(scratch) / "tiny")
        for mode in ("none", "model", "sequential", "group", "auto"):
            pipeline = packed_tiny_pipeline(source, dtype)
            peaks = render_peaks(pipeline_weights(pipeline), folder_configs(source), [shape])
            applied = apply_offload(pipeline, mode, device, peaks)
            started = time.perf_counter()
            with PeakMemory(device) as peak, torch.inference_mode():
                out = pipeline(**OFFLOAD_RENDER, generator=torch.Generator().manual_seed(0))
            latents = out.frames[0].double().cpu()
            reference = latents if reference is None else reference
            results[mode] = {"applied": applied, "wall_s": round(time.perf_counter() - started, 3),
                             "peak_bytes": peak.peak_bytes, "peak_kind": peak.kind,
                             "planned_peak_bytes": peaks[applied],
                             "max_abs_diff_vs_none": float((latents - reference).abs().max())}
            del pipeline
    return results


def packed_tiny_pipeline(source: Path, dtype: torch.dtype):
    """The tiny pipeline with the transformer's and the text encoder's linears packed (Q5)."""
    from hlwq.quant.core import quantize_tensor
    from hlwq.runtime.packed_linear import PackedLinear
    from hlwq.testing.fixtures import load_tiny_pipeline

    pipeline = load_tiny_pipeline(source, dtype=dtype)
    for component in ("transformer", "text_encoder"):
        model = getattr(pipeline, component)
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and "vision" not in name:
                tensor = quantize_tensor(module.weight.detach().float(), bits=5, block_size=128,
                                         mode="reference", name=name)
                model.set_submodule(name, PackedLinear.from_packed(tensor, module.bias))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_weights(pipeline) -> dict:
    """The memory plan's weights of a pipeline in memory: each tensor at the bytes it holds."""
    from hlwq.runtime.ltx23_models import checkpoint_tensors
    from hlwq.runtime.memory_plan import component_weights

    return component_weights(
        {"component": component, "tensor": name, "packed_bytes": t.numel() * t.element_size()}
        for component, model in pipeline.components.items() if isinstance(model, torch.nn.Module)
        for name, t in checkpoint_tensors(model))


def imported_from() -> dict:
    """Where diffusers came from (the bundled wheel?) and which absent packages got imported."""
    import diffusers

    site = os.environ.get("GPU_CHECK_SITE")
    return {"diffusers": diffusers.__version__,
            "diffusers_from_bundled_wheel": bool(site) and diffusers.__file__.startswith(site),
            "absent_there_but_imported": sorted(n for n in ABSENT_THERE if n in sys.modules)}


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny widths, 1 step")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--frames", type=int, default=24, help="latent frames (x 256 tokens)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu-check.json")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    layers, frames, steps = (1, 1, 1) if args.dry_run else (args.layers, args.frames, args.steps)
    started = time.perf_counter()
    result = {"command": " ".join(["python -m hlwq.benchmarks.gpu_check", *(argv or sys.argv[1:])]),
              "machine": machine(device), "dry_run": args.dry_run, "targets": TARGETS}
    result["triton_tests"] = triton_tests(args.dry_run)
    result["runtime_step"] = step_benchmark(device, layers, frames, steps, args.dry_run)
    result["offload_renders"] = offload_renders(device)
    result["imports"] = imported_from()
    step = result["runtime_step"]
    result["meets_targets"] = {
        "step_latency": step["step_latency_ratio"] <= TARGETS["step_latency_ratio_max"],
        "weights_resident": step.get("weights_resident_ratio", 1.0)
        <= TARGETS["weights_resident_ratio_max"]}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
