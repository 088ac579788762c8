"""The GPU check of issue 15, in one run of under 10 minutes on a CUDA machine.

1. the Triton decode tests, on CUDA (pytest without the suite's conftest: no Prefect there);
2. one denoising step of the real-width LTX-2.3 transformer (4 blocks, 6,144 video tokens,
   bf16), dense BF16 against the same weights with the block linears packed (Q5), in one
   process, one after the other: step latency, weights resident, peak memory, output diff;
3. the tiny LTX-2.3 pipeline (transformer and text encoder packed) rendered under each offload
   mode: wall time, peak memory, latents against offload "none";
4. everything as JSON under benchmarks/results/.

Only quant/, runtime/ and the testing/ fixtures run, so the machine needs torch, triton,
transformers, accelerate, safetensors and diffusers (benchmarks/gpu_check.sh brings the
diffusers wheel along). ``--dry-run`` runs every step on the CPU at tiny widths (a syntax
and wiring check, no numbers worth keeping).

    python -m hlwq.benchmarks.gpu_check [--dry-run] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hlwq.store.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
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


class DeviceMemory:
    """Allocated bytes and the allocator's peak on CUDA; zeros on the CPU (dry run)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def timed_steps(model, step: dict, memory: DeviceMemory, steps: int) -> dict:
    memory.reset_peak()
    times = []
    with torch.inference_mode():
        for _ in range(1 + steps):                  # the first warms kernels and caches up
            started = time.perf_counter()
            video, audio = model(**step)
            memory.sync()
            times.append(time.perf_counter() - started)
    return {"step_s": min(times[1:]), "step_times_s": [round(t, 4) for t in times],
            "peak_bytes": memory.peak(), "video": video.double().cpu(),
            "audio": audio.double().cpu()}


def pack_block_linears(model) -> int:
    """Replace every linear the ltx23 policy quantizes by a Q5 PackedLinear; returns how many."""
    from hlwq.quant.core import quantize_tensor
    from hlwq.runtime.packed_linear import PackedLinear
    from hlwq.store.policy import load_policy

    policy = load_policy("ltx23")
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
        model.set_submodule(name, PackedLinear.from_packed(tensor, module.bias))
        packed += 1
    return packed


def step_benchmark(device: torch.device, layers: int, frames: int, steps: int,
                   dry_run: bool) -> dict:
    from hlwq.benchmarks.runtime_bench import audio_frames, step_arguments
    from hlwq.runtime.ltx23_models import build_model
    from hlwq.store.ltx23_config import real_width_transformer_config, tiny_config
    from hlwq.testing.fixtures import fill_synthetic_

    config = tiny_config("transformer") if dry_run else real_width_transformer_config(layers)
    config["num_layers"] = layers
    memory = DeviceMemory(device)
    before = memory.allocated()
    model = fill_synthetic_(build_model("transformer", config), "transformer", seed=0)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    dense_bytes = memory.allocated() - before
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
    dense = timed_steps(model, step, memory, steps)
    linears = pack_block_linears(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    packed_bytes = memory.allocated() - before
    packed = timed_steps(model, step, memory, steps)
    diff = max(float((packed[k] - dense[k]).abs().max() / dense[k].abs().max())
               for k in ("video", "audio"))
    result = {"layers": layers, "video_tokens": video, "audio_tokens": audio, "text_tokens": 1024,
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
    from hlwq.quant.core import quantize_tensor
    from hlwq.runtime.offload import apply_offload
    from hlwq.runtime.packed_linear import PackedLinear
    from hlwq.testing.fixtures import load_tiny_pipeline, make_tiny_ltx23

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    memory = DeviceMemory(device)
    results, reference = {}, None
    with tempfile.TemporaryDirectory() as scratch:
        source = make_tiny_ltx23(Path(scratch) / "tiny")
        for mode in ("none", "model", "sequential", "group"):
            pipeline = load_tiny_pipeline(source, dtype=dtype)
            for component in ("transformer", "text_encoder"):
                model = getattr(pipeline, component)
                for name, module in list(model.named_modules()):
                    if isinstance(module, torch.nn.Linear) and "vision" not in name:
                        tensor = quantize_tensor(module.weight.detach().float(), bits=5,
                                                 block_size=128, mode="reference", name=name)
                        model.set_submodule(name, PackedLinear.from_packed(tensor, module.bias))
            pipeline.set_progress_bar_config(disable=True)
            apply_offload(pipeline, mode, device)
            memory.reset_peak()
            started = time.perf_counter()
            with torch.inference_mode():
                out = pipeline(**OFFLOAD_RENDER, generator=torch.Generator().manual_seed(0))
            latents = out.frames[0].double().cpu()
            reference = latents if reference is None else reference
            results[mode] = {"wall_s": round(time.perf_counter() - started, 3),
                             "peak_bytes": memory.peak(),
                             "max_abs_diff_vs_none": float((latents - reference).abs().max())}
            del pipeline
    return results


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
