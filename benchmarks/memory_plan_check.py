"""Check the memory plan's activation estimates against peaks measured on the CPU.

Two fixtures, each stage's measured activation peak being the process's peak RSS while the
stage runs minus its RSS when the stage began (runtime/peak_memory.py: the kernel's VmHWM,
reset per stage; the weights are already resident):

- ``tiny``: the tiny LTX-2.3 pipeline (float32, dense: no decode workspace) rendered at a few
  sizes, each stage (text encoder + connectors, transformer, VAE decode, audio VAE + vocoder)
  timed inside the pipeline;
- ``real_width``: the stages at LTX-2.3's real widths, called directly with the pipeline's
  inputs: one denoising step of a 1-block real-width transformer (bf16, thousands of video
  tokens; blocks run one after another, so one block's working set is the stage's), the real
  video VAE decoding a short clip, the real audio VAE and vocoder (with its bandwidth
  extension) decoding a few seconds, and a 2-layer real-width Gemma 3 encoding two prompts
  (prompt and negative, as LTX2Pipeline does) into their stacked hidden states.

The process runs with glibc's mmap threshold pinned at 1 MiB (it re-executes itself so), so a
freed activation goes back to the OS and the next stage's baseline is not inflated by it.
The plan's estimate for the same shape (runtime/memory_plan.py) is recorded beside each
measurement, with the ratio.

    python -m hlwq.benchmarks.memory_plan_check --out benchmarks/results/memory-plan.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from hlwq.runtime.memory_plan import (
    PROMPT_TOKENS,
    STAGES,
    RenderShape,
    activation_bytes,
    audio_tokens,
    folder_configs,
    layout_configs,
    video_tokens,
)
from hlwq.runtime.peak_memory import PeakMemory
from hlwq.store.atomic import atomic_write_text

# (component attribute, method) -> stage: what the pipeline calls in each stage
STAGE_CALLS = {("text_encoder", "forward"): "text_encoding", ("connectors", "forward"): "text_encoding",
               ("transformer", "forward"): "denoising", ("vae", "decode"): "vae_decode",
               ("audio_vae", "decode"): "audio_decode", ("vocoder", "forward"): "audio_decode"}
TINY_SIZES = ((256, 256, 49), (512, 320, 97))
# (width, height, frames) per real-width stage: a few thousand video tokens for denoising
REAL_WIDTH_SIZES = {"denoising": ((512, 512, 49), (512, 512, 121)),
                    "vae_decode": ((256, 256, 17), (384, 256, 25), (512, 384, 33)),
                    "audio_decode": ((256, 256, 49), (256, 256, 121)),
                    "text_encoding": ((256, 256, 9),)}
COMPACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
NOTES = {
    "real_width": "what the plan is fitted to (runtime/memory_plan.py's coefficients): LTX-2.3's "
                  "real widths, where a stage's activations are hundreds of MB to GB",
    "tiny": "at the tiny fixture's widths a stage's activations are a few MB to tens of MB, the "
            "size of fixed per-call costs the plan does not model (likely oneDNN and thread "
            "scratch buffers, masks, allocations under glibc's mmap threshold that it keeps; "
            "not broken down): text, VAE and audio read 0.3-0.7x there, denoising 1.3-1.4x. On a GPU such costs fall under the plan's 1 GiB reserve",
    "not_measured": "the connectors at real width (3.17B parameters; their share of the text "
                    "stage is the stacked hidden states the estimate counts), and anything on a "
                    "GPU (benchmarks/gpu_check.sh)",
}


class StagePeaks:
    """Per stage, the largest peak-RSS rise above the RSS at the start of a call of that stage."""

    def __init__(self):
        self.peaks: dict[str, int] = {}

    def wrap(self, pipeline):
        for (attribute, method), stage in STAGE_CALLS.items():
            module = getattr(pipeline, attribute)
            setattr(module, method, self._measured(getattr(module, method), stage))

    def _measured(self, call, stage):
        @functools.wraps(call)
        def run(*args, **kwargs):
            with PeakMemory("cpu") as peak:
                result = call(*args, **kwargs)
            self.peaks[stage] = max(self.peaks.get(stage, 0), peak.growth_bytes)
            return result
        return run


def compared(stage: str, shape: RenderShape, configs: dict, measured: int) -> dict:
    estimate = activation_bytes(stage, shape, configs)
    return {"estimate_bytes": estimate, "measured_bytes": measured,
            "estimate_over_measured": round(estimate / measured, 3) if measured else None}


# --------------------------------------------------------------------------- tiny pipeline


def tiny_runs() -> list[dict]:
    from hlwq.testing.fixtures import make_tiny_ltx23

    with tempfile.TemporaryDirectory() as scratch:
        source = make_tiny_ltx23(Path(scratch) / "tiny")
        return [measure_tiny(source, *size) for size in TINY_SIZES]


def measure_tiny(source: Path, width: int, height: int, frames: int) -> dict:
    from hlwq.testing.fixtures import load_tiny_pipeline

    pipeline = load_tiny_pipeline(source)
    pipeline.set_progress_bar_config(disable=True)
    peaks = StagePeaks()
    peaks.wrap(pipeline)
    started = time.perf_counter()
    with torch.inference_mode():
        pipeline(prompt="a red fox runs through fresh snow", width=width, height=height,
                 num_frames=frames, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0))
    shape = RenderShape(width=width, height=height, frames=frames, dtype_bytes=4, packed=False)
    configs = folder_configs(source)
    return {"width": width, "height": height, "frames": frames,
            "wall_s": round(time.perf_counter() - started, 2),
            "stages": {stage: compared(stage, shape, configs, peaks.peaks.get(stage, 0))
                       for stage in STAGES}}


# --------------------------------------------------------------------------- real width


def real_width_runs() -> list[dict]:
    configs = layout_configs()
    runs = []
    for stage, sizes in REAL_WIDTH_SIZES.items():
        setup = REAL_WIDTH_STAGES[stage]
        model, dtype, config_update = setup["build"](configs)
        stage_configs = {**configs, **config_update}
        for width, height, frames in sizes:
            shape = RenderShape(width=width, height=height, frames=frames,
                                guidance=setup.get("guidance", False),
                                dtype_bytes=torch.finfo(dtype).bits // 8, packed=False)
            call = setup["call"](model, shape, stage_configs, dtype)
            gc.collect()
            started = time.perf_counter()
            with PeakMemory("cpu") as peak, torch.inference_mode():
                call()
            runs.append({"stage": stage, "width": width, "height": height, "frames": frames,
                         "dtype": str(dtype).removeprefix("torch."), "batch": shape.batch,
                         "video_tokens": video_tokens(shape, configs["vae"]),
                         "audio_tokens": audio_tokens(shape, configs["audio_vae"]),
                         "wall_s": round(time.perf_counter() - started, 2),
                         **setup["describe"](stage_configs),
                         **compared(stage, shape, stage_configs, peak.growth_bytes)})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
            del call
        del model
        gc.collect()
    return runs


def _built(component: str, config: dict, dtype: torch.dtype):
    from hlwq.runtime.ltx23_models import build_model

    with torch.random.fork_rng():
        return build_model(component, config).to(dtype).eval()


def _transformer(configs):
    from hlwq.store.ltx23_config import real_width_transformer_config

    config = real_width_transformer_config(1)
    return _built("transformer", config, torch.bfloat16), torch.bfloat16, {"transformer": config}


def _denoising_call(model, shape: RenderShape, configs: dict, dtype: torch.dtype):
    t, vae = configs["transformer"], configs["vae"]
    latent_frames = (shape.frames - 1) // vae["temporal_compression_ratio"] + 1
    height = shape.height // vae["spatial_compression_ratio"]
    width = shape.width // vae["spatial_compression_ratio"]
    video, audio, batch = video_tokens(shape, vae), audio_tokens(shape, configs["audio_vae"]), shape.batch
    g = torch.Generator().manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=g).to(dtype)

    inputs = dict(hidden_states=randn(batch, video, t["in_channels"]),
                  audio_hidden_states=randn(batch, audio, t["audio_in_channels"]),
                  encoder_hidden_states=randn(batch, PROMPT_TOKENS, t["cross_attention_dim"]),
                  audio_encoder_hidden_states=randn(batch, PROMPT_TOKENS,
                                                    t["audio_cross_attention_dim"]),
                  timestep=torch.full((batch,), 500.0), sigma=torch.full((batch,), 500.0),
                  encoder_attention_mask=torch.ones(batch, PROMPT_TOKENS),
                  audio_encoder_attention_mask=torch.ones(batch, PROMPT_TOKENS),
                  num_frames=latent_frames, height=height, width=width, fps=shape.fps,
                  audio_num_frames=audio, use_cross_timestep=True, return_dict=False)
    return lambda: model(**inputs)


def _vae(configs):
    return _built("vae", configs["vae"], torch.float32), torch.float32, {}


def _vae_call(model, shape: RenderShape, configs: dict, dtype: torch.dtype):
    vae = configs["vae"]
    latents = torch.randn(1, vae["latent_channels"], (shape.frames - 1) // 8 + 1,
                          shape.height // 32, shape.width // 32, dtype=dtype)
    # what LTX2Pipeline keeps: the decoded video, post-processed to float32
    return lambda: model.decode(latents, None, return_dict=False)[0].float()


class _AudioDecoder(torch.nn.Module):
    def __init__(self, audio_vae, vocoder):
        super().__init__()
        self.audio_vae, self.vocoder = audio_vae, vocoder


def _audio(configs):
    dtype = torch.float32
    pair = _AudioDecoder(_built("audio_vae", configs["audio_vae"], dtype),
                         _built("vocoder", configs["vocoder"], dtype))
    return pair, dtype, {}


def _audio_call(model, shape: RenderShape, configs: dict, dtype: torch.dtype):
    audio_vae = configs["audio_vae"]
    mel_bins = audio_vae["mel_bins"] // 2 ** (len(audio_vae["ch_mult"]) - 1)
    latents = torch.randn(1, audio_vae["latent_channels"], audio_tokens(shape, audio_vae),
                          mel_bins, dtype=dtype)

    def call():
        mel = model.audio_vae.decode(latents, return_dict=False)[0]
        return model.vocoder(mel)
    return call


def _text(configs):
    """The real-width Gemma 3 language model with 2 layers and a small vocabulary."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    text = {**configs["text_encoder"]["text_config"], "num_hidden_layers": 2, "vocab_size": 1024}
    with torch.random.fork_rng():
        model = Gemma3TextModel(Gemma3TextConfig(**text)).to(torch.bfloat16).eval()
    return model, torch.bfloat16, {"text_encoder": {"text_config": text}}


def _text_call(model, shape: RenderShape, configs: dict, dtype: torch.dtype):
    ids = torch.randint(0, 1024, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, PROMPT_TOKENS, dtype=torch.long)
    mask[:, : PROMPT_TOKENS // 2] = 0           # left padding, as the pipeline's tokenizer does

    def encode():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return torch.stack(states, dim=-1).flatten(2, 3)

    # prompt and negative prompt one after the other, then the guidance batch of both
    return lambda: torch.cat([encode(), encode()])


REAL_WIDTH_STAGES = {
    "denoising": {"build": _transformer, "call": _denoising_call,
                  "describe": lambda c: {"model": "real-width transformer, 1 block"}},
    "vae_decode": {"build": _vae, "call": _vae_call,
                   "describe": lambda c: {"model": "real video VAE decoder"}},
    "audio_decode": {"build": _audio, "call": _audio_call,
                     "describe": lambda c: {"model": "real audio VAE decoder and vocoder (BWE)"}},
    "text_encoding": {"build": _text, "call": _text_call, "guidance": True,
                      "describe": lambda c: {"model": "real-width Gemma 3, 2 layers, 1,024-token "
                                                      "vocabulary, prompt + negative"}},
}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory-plan.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="tiny,real_width",
                        help="comma-separated: tiny, real_width")
    args = parser.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != COMPACT_MALLOC["MALLOC_MMAP_THRESHOLD_"]:
        os.execve(sys.executable, [sys.executable, "-m", "hlwq.benchmarks.memory_plan_check",
                                   *(argv if argv is not None else sys.argv[1:])],
                  {**os.environ, **COMPACT_MALLOC})
    torch.set_num_threads(args.threads)
    parts = {"tiny": tiny_runs, "real_width": real_width_runs}
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    result = {
        "command": " ".join(["python -m hlwq.benchmarks.memory_plan_check",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": psutil.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
                    "torch": torch.__version__, "threads": args.threads},
        "measured": "peak RSS rise per stage (VmHWM reset at each stage's start), glibc mmap "
                    "threshold 1 MiB",
        "notes": NOTES,
    }
    if args.out.is_file():          # a part not rerun keeps its last measurement
        previous = json.loads(args.out.read_text())
        result.update({p: previous[p] for p in parts if p in previous and p not in chosen})
    for part in chosen:
        result[part] = parts[part]()
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
