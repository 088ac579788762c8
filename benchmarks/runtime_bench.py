"""`hlwq bench runtime`: one LTX-2.3 denoising step from BF16 weights vs from packed weights.

The real-width transformer fixture (``make_real_width_transformer``, 2 blocks
by default) is quantized into artifacts (hlwq.quant.core, packaged with
hlwq.store.package), then every model runs in its own process
(``python -m hlwq.benchmarks.runtime_bench worker ...``), so one model's memory
never hides another's:

- ``bf16``: ``LTX2VideoTransformer3DModel.from_pretrained`` of the BF16 source;
- packed, ``generic`` policy (the headline keys): every large 2-D weight packed;
- packed, ``ltx23`` policy (``variants.ltx23``): the block linears packed, the
  model-level AdaLN / timestep / projection layers kept in BF16.

Why the headline is ``generic``: those model-level layers do not grow with
depth. In the 2-block fixture they are 0.43B of 1.2B parameters (36 %), in the
real 48-block transformer 0.5B of 19.0B (2.6 %); so ``ltx23`` on 2 blocks
cannot go below ~0.56x BF16 whatever the runtime does, while ``generic`` on 2
blocks packs 99 % of the weights, close to the real model's 97 %. The real
model's numbers under ``ltx23`` are given by arithmetic (``full_model``:
hlwq.quant.sizes over the transformer built on the meta device).

Each worker imports diffusers' LTX-2 module and loads its decode kernels (code:
~170 MB of RSS in either mode, a per-process constant), resets the peak mark (CPU: the kernel's
RSS high-water mark via ``/proc/self/clear_refs``; CUDA: the allocator's peak)
and loads its model; then the parent has the workers take one denoising step
each in turn (bf16 activations, >= 1,024 video tokens, prompts padded to 1,024
tokens as the pipelines do): a warm-up round, then ``--steps`` timed rounds.
Taking turns spreads a shared machine's other load evenly over the models;
each reports its peak growth and its best timed step (other load only ever
adds time). ``max_rel_diff`` compares packed and BF16 outputs: max |a - b| /
max |b| over the video and audio predictions, in float64.

The whole measurement runs once per allocator setting (``ALLOCATORS``), both
models under the same one each time: with glibc's defaults, freed activation
memory stays in the process and counts in both peaks; with ``compact`` it goes
back to the OS. The headline keys are the glibc round; ``allocators`` holds both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

RESULTS = Path(__file__).resolve().parent / "results" / "runtime.json"
POLICIES = ("generic", "ltx23")
HEADLINE = "generic"
TARGETS = {"cpu": {"memory_ratio": 0.40, "latency_ratio": 1.25},
           "cuda": {"memory_ratio": 0.35, "latency_ratio": 1.15}}
BITS = 5
# Process settings every worker of a round shares. glibc keeps freed activation memory
# for reuse (its mmap threshold grows to 32 MiB after the first large free), which
# inflates both models' peak RSS alike; "compact" pins the threshold at 1 MiB so large
# tensors go back to the OS when freed (slower: their pages fault in again).
ALLOCATORS = {"glibc": {}, "compact": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


@click.command("runtime")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--layers", default=2, show_default=True, help="Transformer blocks in the fixture.")
@click.option("--frames", default=4, show_default=True, help="Latent frames (x 16 x 16 tokens).")
@click.option("--text-tokens", default=1024, show_default=True,
              help="Prompt tokens (the pipelines pad prompts to 1,024).")
@click.option("--steps", default=3, show_default=True,
              help="Timed steps per model (after one warm-up step), taken in turns.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the fixture and artifacts are kept between runs "
                   "[default: <tmp>/hlwq-bench-runtime].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--allocator", "allocators", type=click.Choice([*ALLOCATORS, "both"]), default="both",
              show_default=True, help="glibc defaults, a 1 MiB mmap threshold (compact), or "
                                      "both in turn; the headline keys are the first.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Result file [default: {RESULTS} (runtime-cuda.json for cuda)].")
def bench_runtime(as_json: bool, layers: int, frames: int, text_tokens: int, steps: int,
                  work_dir: Path | None, device: str, allocators: str, out: Path | None) -> None:
    """Peak memory and step latency: packed runtime vs BF16 (separate processes)."""
    from hlwq.store.atomic import atomic_write_text

    work = work_dir or Path(tempfile.gettempdir()) / "hlwq-bench-runtime"
    out = out or (RESULTS if device == "cpu" else RESULTS.with_name("runtime-cuda.json"))
    source = prepare_source(work, layers)
    artifacts = {p: prepare_artifact(source, work / f"artifact-{p}-{layers}", p) for p in POLICIES}
    inputs = write_inputs(work / f"inputs-{frames}-{text_tokens}.safetensors", source, frames,
                          text_tokens)
    models = {"bf16": ("bf16", source), **{p: ("packed", a) for p, a in artifacts.items()}}
    rounds = {}
    for allocator in ALLOCATORS if allocators == "both" else [allocators]:
        outputs = {name: work / f"out-{allocator}-{name}.safetensors" for name in models}
        runs = measure_in_turns(models, inputs, outputs, steps, device, ALLOCATORS[allocator])
        rounds[allocator] = summarize(runs, outputs, device, layers, frames, text_tokens)
    result = combine_rounds(rounds)
    atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else report(result, out))


# ---------------------------------------------------------------- preparation


def prepare_source(work: Path, layers: int) -> Path:
    from hlwq.testing.fixtures import make_real_width_transformer

    return make_real_width_transformer(work / f"source-{layers}", layers)


def prepare_artifact(source: Path, out: Path, policy_name: str) -> Path:
    """Quantize every tensor the policy selects (hlwq.quant.core) and package an artifact (once)."""
    from hlwq.quant.core import quantize_tensor
    from hlwq.store.inventory import build_inventory
    from hlwq.store.package import package_artifact
    from hlwq.store.policy import load_policy
    from hlwq.store.safetensors_io import TensorEntry, read_tensor
    from hlwq.store.staging import write_staged
    from hlwq.tasks.sources import fetch_source

    if (out / "manifest.json").is_file():
        return out
    fetched = fetch_source(str(source))
    inventory = build_inventory(fetched.root, load_policy(policy_name, bits=BITS))
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-staging-") as staging:
        staged = {}
        for row in inventory.to_pylist():
            if row["action"] != "quantize":
                continue
            entry = TensorEntry(row["tensor"], row["dtype"], tuple(row["shape"]),
                                row["data_start"], row["data_end"])
            packed = quantize_tensor(read_tensor(fetched.root / row["file"], entry),
                                     bits=row["bits"], name=row["tensor"])
            staged[f"{row['component']}/{row['tensor']}"] = write_staged(
                staging, f"{len(staged):05d}", row["tensor"], packed)
        package_artifact(fetched.root, inventory, staged, out, lineage=fetched.lineage,
                         quantization={"bits": BITS, "block_size": 128, "group_size": 128,
                                       "mode": "refined", "policy": policy_name,
                                       "code_version": "bench"},
                         validation={})
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


def measure_in_turns(models: dict, inputs: Path, outputs: dict[str, Path], steps: int,
                     device: str, env: dict[str, str]) -> dict[str, dict]:
    """One worker process per model, all loaded first, then stepped in turns.

    Each process measures its own memory; taking turns spreads the load of a
    shared machine evenly over the models, which one-after-another runs do not.
    ``models`` maps a name to ``(mode, model)`` or ``(mode, model, lora file)``.
    """
    workers = {}
    try:
        for name, (mode, model, *lora) in models.items():
            workers[name] = Worker(mode, model, inputs, outputs[name], device, env, *lora)
        for _ in range(1 + steps):               # the first step warms caches and kernels up
            for worker in workers.values():
                worker.step()
        return {name: worker.finish() for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()


class Worker:
    """A ``runtime_bench worker`` process driven over its stdin/stdout, one JSON line a reply."""

    def __init__(self, mode: str, model: Path, inputs: Path, out: Path, device: str,
                 env: dict[str, str], lora: Path | None = None):
        self.command = [sys.executable, "-m", "hlwq.benchmarks.runtime_bench", "worker", mode,
                        str(model), str(inputs), str(out), "--device", device,
                        *(["--lora", str(lora)] if lora else [])]
        self.errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.errors, text=True,
                                        cwd=Path(__file__).resolve().parents[1],
                                        env={**os.environ, **env})
        self.times: list[float] = []
        self.ready = self._reply()

    def step(self) -> None:
        self.times.append(self._ask("step")["step_s"])

    def finish(self) -> dict:
        return {**self.ready, **self._ask("finish"), "step_s": min(self.times[1:]),
                "step_times_s": self.times}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.errors.close()

    def _ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._reply()

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.errors.seek(0)
            raise click.ClickException(f"worker failed ({shlex.join(self.command)}):\n"
                                       f"{self.errors.read()[-3000:]}")
        return json.loads(line)


# ---------------------------------------------------------------- the worker process


def worker_main(argv: list[str]) -> None:
    """Load one model, then answer ``step`` (one timed step) and ``finish`` on stdin."""
    parser = argparse.ArgumentParser(prog="runtime_bench worker")
    parser.add_argument("mode", choices=("bf16", "packed"))
    parser.add_argument("model", type=Path)
    parser.add_argument("inputs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lora", type=Path, default=None,
                        help="A LoRA to add after loading: packed through runtime/lora.py, bf16 "
                             "through diffusers' own load_lora_adapter (PEFT's layers)")
    args = parser.parse_args(argv)

    import torch
    from diffusers import LTX2VideoTransformer3DModel
    from safetensors.torch import load_file, save_file

    from hlwq.runtime.loader import load_component
    from hlwq.runtime.packed_linear import PackedLinear
    from hlwq.runtime.peak_memory import PeakMemory

    device = torch.device(args.device)
    # Code is loaded before the baseline in both modes: importing diffusers' LTX-2 module
    # (about 170 MB of RSS, mostly libraries) and the decode kernels is a per-process
    # constant, not memory the model's weights or activations need.
    import diffusers.models.transformers.transformer_ltx2  # noqa: F401
    if args.lora:   # PEFT and the LoRA layers are code too
        import hlwq.runtime.lora  # noqa: F401
    for dtype in (torch.float32, torch.bfloat16):
        PackedLinear.from_packed(_tiny_packed()).to(device)(
            torch.zeros(1, 128, dtype=dtype, device=device))
    step = step_arguments(load_file(args.inputs, device=str(device)), args.inputs)
    memory = PeakMemory(device).start()
    started = time.perf_counter()
    if args.mode == "bf16":
        model = LTX2VideoTransformer3DModel.from_pretrained(
            args.model / "transformer", torch_dtype=torch.bfloat16,
            use_safetensors=True).eval().to(device)
    else:
        model = load_component(args.model, "transformer", device=device, dtype=torch.bfloat16)
    rss_before_lora = _status_kib("VmRSS") * 1024
    if args.lora:
        add_lora(model, args.mode, args.lora)
    lora_rss = _status_kib("VmRSS") * 1024 - rss_before_lora
    dense_copies = count_dense_weight_copies()
    reply({"load_s": time.perf_counter() - started, "threads": torch.get_num_threads(),
           "lora_load_rss_bytes": lora_rss})
    for command in sys.stdin:
        if command.strip() == "finish":
            break
        with torch.inference_mode():
            started = time.perf_counter()
            video, audio = model(**step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        reply({"step_s": time.perf_counter() - started})
    save_file({"video": video.contiguous().cpu(), "audio": audio.contiguous().cpu()}, args.out)
    memory.stop()
    reply({"peak_growth_bytes": memory.growth_bytes, "dense_weight_copies": dense_copies["count"]})


def add_lora(model, mode: str, path: Path) -> None:
    if mode == "bf16":
        model.load_lora_adapter(str(path), prefix="transformer", adapter_name="bench")
        return
    from hlwq.runtime.lora import load_lora_into_model
    from hlwq.store.lora_file import read_lora_file

    _, by_component = read_lora_file(path)
    load_lora_into_model(model, by_component["transformer"], "bench", str(path))


def count_dense_weight_copies() -> dict:
    """Count every decode of a packed weight into a tensor of its own (cache or autograd): the
    packed runtime's only dense copies. Steps decode into the reused workspace instead."""
    from hlwq.runtime.packed_linear import PackedLinear

    counter = {"count": 0}
    whole_weight = PackedLinear._whole_weight

    def counted(self, *args, **kwargs):
        counter["count"] += 1
        return whole_weight(self, *args, **kwargs)

    PackedLinear._whole_weight = counted
    return counter


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def step_arguments(inputs: dict, path: Path) -> dict:
    """The transformer's keyword arguments for one denoising step (batch 1, no guidance)."""
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        frames = int(handle.metadata()["frames"])
    device = inputs["hidden_states"].device
    text = inputs["encoder_hidden_states"].shape[1]
    return dict(inputs, timestep=torch.tensor([500.0], device=device),
                sigma=torch.tensor([500.0], device=device),
                encoder_attention_mask=torch.ones(1, text, device=device),
                audio_encoder_attention_mask=torch.ones(1, text, device=device),
                num_frames=frames, height=16, width=16, fps=24.0,
                audio_num_frames=inputs["audio_hidden_states"].shape[1],
                use_cross_timestep=True, return_dict=False)


def _tiny_packed():
    import torch

    from hlwq.quant.codebook import lloyd_max_codebook
    from hlwq.quant.packed import PackedTensor

    return PackedTensor(torch.zeros(8, 80, dtype=torch.uint8), torch.ones(8, 1, dtype=torch.float16),
                        lloyd_max_codebook(BITS), (8, 128), BITS, 128, 128, "refined")


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


def summarize(runs: dict, outputs: dict[str, Path], device: str, layers: int, frames: int,
              text_tokens: int) -> dict:
    import torch

    bf16 = runs["bf16"]
    sizes = {p: _transformer_sizes(layers, p) for p in POLICIES}
    # The BF16 run's memory beyond its weights (activations, loading machinery) is needed by
    # the packed run too: this floor is the ratio a runtime with no overhead of its own reaches.
    not_weights = bf16["peak_growth_bytes"] - sizes[HEADLINE]["bf16_bytes"]
    variants = {}
    for policy in POLICIES:
        run = runs[policy]
        variants[policy] = {
            "peak_bytes": run["peak_growth_bytes"], "step_s": run["step_s"],
            "weight_bytes": sizes[policy]["packed_bytes"],
            "memory_floor_ratio": (not_weights + sizes[policy]["packed_bytes"])
            / bf16["peak_growth_bytes"],
            "memory_ratio": run["peak_growth_bytes"] / bf16["peak_growth_bytes"],
            "latency_ratio": run["step_s"] / bf16["step_s"],
            "max_rel_diff": max_rel_diff(outputs[policy], outputs["bf16"]),
            "load_s": run["load_s"], "step_times_s": run["step_times_s"],
        }
    head = variants[HEADLINE]
    return {
        "bf16_peak_bytes": bf16["peak_growth_bytes"], "packed_peak_bytes": head["peak_bytes"],
        "memory_ratio": head["memory_ratio"], "bf16_step_s": bf16["step_s"],
        "packed_step_s": head["step_s"], "latency_ratio": head["latency_ratio"],
        "max_rel_diff": head["max_rel_diff"], "device": device, "packed_policy": HEADLINE,
        "variants": variants, "targets": TARGETS[device],
        "bf16": {"load_s": bf16["load_s"], "step_times_s": bf16["step_times_s"]},
        "setup": {"layers": layers, "video_tokens": frames * 256, "text_tokens": text_tokens,
                  "audio_tokens": audio_frames(frames), "activations": "bf16", "bits": BITS,
                  "torch_threads": bf16["threads"],
                  "fixture_params": {p: sizes[p]["params"] for p in POLICIES},
                  "bf16_weight_bytes": sizes[HEADLINE]["bf16_bytes"]},
        "full_model": full_model_residency(),
        "machine": machine(), "torch": torch.__version__,
        "command": shlex.join(["hlwq", "bench", "runtime", *sys.argv[sys.argv.index("runtime") + 1:]]
                              if "runtime" in sys.argv else sys.argv),
    }


def combine_rounds(rounds: dict[str, dict]) -> dict:
    """The first round's result, with every round's headline figures under ``allocators``."""
    first = next(iter(rounds.values()))
    keys = ("bf16_peak_bytes", "packed_peak_bytes", "memory_ratio", "bf16_step_s",
            "packed_step_s", "latency_ratio", "max_rel_diff")
    first["allocator"] = next(iter(rounds))
    first["allocators"] = {
        name: {"env": ALLOCATORS[name], **{key: result[key] for key in keys},
               "variants": {policy: {key: v[key] for key in ("peak_bytes", "memory_ratio",
                                                             "step_s", "latency_ratio")}
                            for policy, v in result["variants"].items()}}
        for name, result in rounds.items()}
    return first


def full_model_residency() -> dict:
    """What the real 48-block LTX-2.3 transformer keeps resident under ``ltx23``, by arithmetic."""
    sizes = _transformer_sizes(48, "ltx23")
    resident = sizes["packed_bytes"] + sizes["decode_buffer_bf16_bytes"]
    return {"transformer_params": sizes["params"]["total"], "policy": "ltx23", "bits": BITS,
            "bf16_bytes": sizes["bf16_bytes"], "packed_bytes": sizes["packed_bytes"],
            "decode_buffer_bf16_bytes": sizes["decode_buffer_bf16_bytes"],
            "packed_resident_bytes": resident, "ratio": resident / sizes["bf16_bytes"]}


def _transformer_sizes(layers: int, policy_name: str) -> dict:
    """Params and bytes of the LTX-2.3 transformer with ``layers`` blocks under a policy."""
    from hlwq.quant.sizes import padded_in_features, size_table
    from hlwq.runtime.ltx23_models import build_model, checkpoint_tensors
    from hlwq.runtime.packed_linear import CHUNK_ELEMENTS
    from hlwq.store.ltx23_config import real_width_transformer_config
    from hlwq.store.policy import load_policy

    model = build_model("transformer", real_width_transformer_config(layers), device="meta")
    policy = load_policy(policy_name, bits=BITS)
    rows = []
    for name, tensor in checkpoint_tensors(model):
        decision = policy.decide(name, tuple(tensor.shape), "BF16", "transformer")
        rows.append({"component": "transformer", "shape": list(tensor.shape), "dtype": "BF16",
                     "action": decision.action, "bits": decision.bits})
    table = size_table(rows)
    decode_buffer = 0    # PackedLinear decodes at most CHUNK_ELEMENTS weights (whole rows) at once
    for row in rows:
        if row["action"] == "quantize":
            width = padded_in_features(row["shape"][1], 128)
            decode_buffer = max(decode_buffer,
                                min(row["shape"][0], max(1, CHUNK_ELEMENTS // width)) * width)
    return {"params": {"total": table["total_params"], "quantized": table["quantized_params"]},
            "bf16_bytes": table["total_original_bytes"], "packed_bytes": table["total_packed_bytes"],
            "decode_buffer_bf16_bytes": 2 * decode_buffer}


def machine() -> dict:
    import psutil

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                  .splitlines() if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average_1m": os.getloadavg()[0]}


def report(result: dict, out: Path) -> str:
    gib, targets = 2 ** 30, result["targets"]
    setup = result["setup"]
    lines = [
        (f"runtime bench on {result['device']} ({setup['layers']} blocks, "
         f"{setup['video_tokens']} video tokens, bf16 activations) -> {out}"),
        (f"  bf16            peak {result['bf16_peak_bytes'] / gib:6.2f} GiB            "
         f"step {result['bf16_step_s']:7.2f} s"),
    ]
    for policy, v in result["variants"].items():
        lines.append(f"  packed {policy:<8} peak {v['peak_bytes'] / gib:6.2f} GiB "
                     f"({v['memory_ratio']:.2f}x)   step {v['step_s']:7.2f} s "
                     f"({v['latency_ratio']:.2f}x)   max rel diff {v['max_rel_diff']:.1e}   "
                     f"[memory floor {v['memory_floor_ratio']:.2f}x]")
    for name, figures in result["allocators"].items():
        lines.append(f"  allocator {name:<8} packed {result['packed_policy']}: memory "
                     f"{figures['memory_ratio']:.3f}x, latency {figures['latency_ratio']:.3f}x "
                     f"(env {figures['env'] or 'default'})")
    full = result["full_model"]
    lines.append(f"  targets ({result['packed_policy']} policy): memory <= "
                 f"{targets['memory_ratio']}x, latency <= {targets['latency_ratio']}x")
    lines.append(f"  real 48-block transformer (ltx23, arithmetic): BF16 "
                 f"{full['bf16_bytes'] / gib:.1f} GiB, packed resident "
                 f"{full['packed_resident_bytes'] / gib:.1f} GiB ({full['ratio']:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
    else:
        bench_runtime()
