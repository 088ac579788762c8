"""`hlwq bench lora`: one denoising step packed + LoRA vs packed alone, and vs the dequantized model.

The fixture and the artifact are the runtime benchmark's (real-width transformer, ``generic``
policy: every large 2-D weight packed); the LoRA is rank ``--rank`` (32) on every quantized
linear, random A and B in BF16 (seeded, written once). Four worker processes of
``runtime_bench`` take the step in turns (same inputs, bf16 activations):

- ``packed``: the artifact alone;
- ``packed_lora``: the artifact plus the LoRA through runtime/lora.py (PackedLoraLinear);
- ``dequantized``: ``hlwq export-dequantized`` of the artifact, as nn.Linear in BF16;
- ``dequantized_lora``: the same plus the LoRA through diffusers' own ``load_lora_adapter``
  (PEFT's nn.Linear LoRA layers): the reference.

Reported: ``latency_ratio`` (packed_lora / packed step), ``memory_overhead_bytes`` (peak growth
of packed_lora minus packed) against ``lora_params_bytes`` (the LoRA's own bytes in BF16),
``lora_load_rss_bytes`` (the resident growth from loading the LoRA, same process),
``max_rel_diff_vs_dequantized`` (packed_lora vs dequantized_lora, max |a - b| / max |b|) next
to the packed runtime's own ``max_rel_diff_packed_vs_dequantized`` without a LoRA, and
``dense_weight_copies`` (decodes of a packed weight into a tensor of its own: 0 means no
dequantized copy of a base weight was made).
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from pathlib import Path

import click

from hlwq.benchmarks import runtime_bench

RESULTS = Path(__file__).resolve().parent / "results" / "lora.json"
TARGETS = {"latency_ratio": 1.10, "memory_overhead_vs_lora_params": 0.10}
POLICY = runtime_bench.HEADLINE


@click.command("lora")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--layers", default=2, show_default=True, help="Transformer blocks in the fixture.")
@click.option("--rank", default=32, show_default=True, help="LoRA rank on every quantized linear.")
@click.option("--frames", default=4, show_default=True, help="Latent frames (x 16 x 16 tokens).")
@click.option("--text-tokens", default=1024, show_default=True, help="Prompt tokens.")
@click.option("--steps", default=3, show_default=True,
              help="Timed steps per model (after one warm-up step), taken in turns.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Fixture, artifacts and LoRA, kept between runs [default: <tmp>/hlwq-bench-runtime].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--allocator", type=click.Choice(list(runtime_bench.ALLOCATORS)), default="glibc",
              show_default=True, help="Process allocator settings (see `hlwq bench runtime`).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Result file [default: {RESULTS} (lora-cuda.json for cuda)].")
def bench_lora(as_json: bool, layers: int, rank: int, frames: int, text_tokens: int, steps: int,
               work_dir: Path | None, device: str, allocator: str, out: Path | None) -> None:
    """Step latency, memory and exactness: packed + LoRA vs packed, and vs the dequantized model."""
    from hlwq.store.atomic import atomic_write_text

    work = work_dir or Path(tempfile.gettempdir()) / "hlwq-bench-runtime"
    out = out or (RESULTS if device == "cpu" else RESULTS.with_name("lora-cuda.json"))
    source = runtime_bench.prepare_source(work, layers)
    artifact = runtime_bench.prepare_artifact(source, work / f"artifact-{POLICY}-{layers}", POLICY)
    dequantized = prepare_export(artifact, work / f"dequantized-{POLICY}-{layers}")
    lora, params = prepare_lora(artifact, work / f"lora-r{rank}-{POLICY}-{layers}.safetensors", rank)
    inputs = runtime_bench.write_inputs(work / f"inputs-{frames}-{text_tokens}.safetensors", source,
                                        frames, text_tokens)
    models = {"packed": ("packed", artifact), "packed_lora": ("packed", artifact, lora),
              "dequantized": ("bf16", dequantized), "dequantized_lora": ("bf16", dequantized, lora)}
    outputs = {name: work / f"out-lora-{name}.safetensors" for name in models}
    runs = runtime_bench.measure_in_turns(models, inputs, outputs, steps, device,
                                          runtime_bench.ALLOCATORS[allocator])
    result = summarize(runs, outputs, params, device, layers, rank, frames, text_tokens, allocator)
    atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else report(result, out))


def prepare_export(artifact: Path, out: Path) -> Path:
    from hlwq.store.export import export_dequantized

    if not (out / "transformer" / "config.json").is_file():
        export_dequantized(artifact, out)
    return out


def prepare_lora(artifact: Path, path: Path, rank: int) -> tuple[Path, dict]:
    """Rank-``rank`` A and B (BF16, seeded) for every quantized linear of the artifact."""
    import torch
    from safetensors.torch import save_file

    manifest = json.loads((artifact / "manifest.json").read_text())
    targets = sorted((e["name"].removesuffix(".weight"), e["shape"])
                     for e in manifest["tensors"].values()
                     if e["action"] == "quantize" and e["component"] == "transformer")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out_features, in_features) in targets:
        tensors[f"transformer.{module}.lora_A.weight"] = (
            torch.randn(rank, in_features, generator=g) / in_features ** 0.5).to(torch.bfloat16)
        tensors[f"transformer.{module}.lora_B.weight"] = (
            torch.randn(out_features, rank, generator=g) * 0.01).to(torch.bfloat16)
    if not path.is_file():
        save_file(tensors, path)
    numel = sum(t.numel() for t in tensors.values())
    return path, {"layers": len(targets), "params": numel, "bytes": 2 * numel}


def summarize(runs: dict, outputs: dict, params: dict, device: str, layers: int, rank: int,
              frames: int, text_tokens: int, allocator: str) -> dict:
    import torch

    packed, with_lora = runs["packed"], runs["packed_lora"]
    overhead = with_lora["peak_growth_bytes"] - packed["peak_growth_bytes"]
    return {
        "latency_ratio": with_lora["step_s"] / packed["step_s"],
        "memory_overhead_bytes": overhead,
        "lora_params_bytes": params["bytes"],
        # Resident growth from loading the LoRA (VmRSS after - before, same process): the
        # LoRA's own footprint without the step's activations and the allocator's timing in it.
        "lora_load_rss_bytes": with_lora["lora_load_rss_bytes"],
        "memory_overhead_vs_lora_params": overhead / params["bytes"] - 1.0,
        "max_rel_diff_vs_dequantized": runtime_bench.max_rel_diff(outputs["packed_lora"],
                                                                  outputs["dequantized_lora"]),
        "max_rel_diff_packed_vs_dequantized": runtime_bench.max_rel_diff(outputs["packed"],
                                                                         outputs["dequantized"]),
        "dense_weight_copies": with_lora["dense_weight_copies"],
        "lora_effect_rel_diff": runtime_bench.max_rel_diff(outputs["packed_lora"],
                                                           outputs["packed"]),
        "runs": {name: {"step_s": run["step_s"], "peak_growth_bytes": run["peak_growth_bytes"],
                        "load_s": run["load_s"], "step_times_s": run["step_times_s"]}
                 for name, run in runs.items()},
        "targets": TARGETS, "device": device, "policy": POLICY, "allocator": allocator,
        "setup": {"layers": layers, "rank": rank, "lora_layers": params["layers"],
                  "lora_params": params["params"], "video_tokens": frames * 256,
                  "text_tokens": text_tokens, "activations": "bf16", "lora_dtype": "bf16",
                  "torch_threads": packed["threads"]},
        "machine": runtime_bench.machine(), "torch": torch.__version__,
        "command": shlex.join(["hlwq", "bench", "lora", *sys.argv[sys.argv.index("lora") + 1:]]
                              if "lora" in sys.argv else sys.argv),
    }


def report(result: dict, out: Path) -> str:
    mib, setup = 2 ** 20, result["setup"]
    lines = [
        (f"lora bench on {result['device']} ({setup['layers']} blocks, rank {setup['rank']} on "
         f"{setup['lora_layers']} packed linears) -> {out}"),
        (f"  latency packed+LoRA / packed: {result['latency_ratio']:.3f}x "
         f"(target <= {TARGETS['latency_ratio']})"),
        (f"  memory overhead {result['memory_overhead_bytes'] / mib:.1f} MiB vs LoRA params "
         f"{result['lora_params_bytes'] / mib:.1f} MiB "
         f"({result['memory_overhead_vs_lora_params']:+.1%}, target within "
         f"{TARGETS['memory_overhead_vs_lora_params']:.0%})"),
        (f"  max rel diff vs dequantized + PEFT LoRA: {result['max_rel_diff_vs_dequantized']:.1e} "
         f"(packed vs dequantized, no LoRA: {result['max_rel_diff_packed_vs_dequantized']:.1e})"),
        (f"  resident growth from loading the LoRA: {result['lora_load_rss_bytes'] / mib:.1f} MiB"),
        f"  dense copies of packed weights: {result['dense_weight_copies']}",
    ]
    return "\n".join(lines)
