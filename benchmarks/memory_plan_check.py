"""Check the memory plan's activation estimates against peaks measured on the CPU.

Renders the tiny LTX-2.3 fixture (float32 on the CPU, dense: no decode workspace) at a few
sizes; while each stage runs
(text encoder + connectors, transformer, VAE decode, audio VAE + vocoder) a thread samples the
process RSS, and the stage's measured activation peak is its highest RSS minus the RSS when the
stage began (the weights are already resident). The plan's estimate for the same render
(runtime/memory_plan.py, dtype_bytes 4) is recorded beside it, with the ratio.

    python -m hlwq.benchmarks.memory_plan_check --out benchmarks/results/memory-plan.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from hlwq.runtime.memory_plan import STAGES, RenderShape, activation_bytes, folder_configs
from hlwq.store.atomic import atomic_write_text
from hlwq.testing.fixtures import load_tiny_pipeline, make_tiny_ltx23

# (component attribute, method) -> stage: what the pipeline calls in each stage
STAGE_CALLS = {("text_encoder", "forward"): "text_encoding", ("connectors", "forward"): "text_encoding",
               ("transformer", "forward"): "denoising", ("vae", "decode"): "vae_decode",
               ("audio_vae", "decode"): "audio_decode", ("vocoder", "forward"): "audio_decode"}
SIZES = ((256, 256, 49), (512, 320, 97))


class StagePeaks:
    """Per stage, the largest RSS rise above the RSS at the start of a call of that stage."""

    def __init__(self, interval_s: float = 0.002):
        self.process, self.interval_s = psutil.Process(), interval_s
        self.stage, self.start, self.peaks = None, 0, {}
        self._stop = threading.Event()

    def wrap(self, pipeline):
        for (attribute, method), stage in STAGE_CALLS.items():
            module = getattr(pipeline, attribute)
            setattr(module, method, self._timed(getattr(module, method), stage))

    def _timed(self, call, stage):
        @functools.wraps(call)
        def run(*args, **kwargs):
            self.stage, self.start = stage, self.process.memory_info().rss
            try:
                return call(*args, **kwargs)
            finally:
                self._sample()
                self.stage = None
        return run

    def _sample(self):
        if self.stage is not None:
            rise = self.process.memory_info().rss - self.start
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rise)

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(source: Path, width: int, height: int, frames: int) -> dict:
    pipeline = load_tiny_pipeline(source)
    pipeline.set_progress_bar_config(disable=True)
    peaks = StagePeaks()
    peaks.wrap(pipeline)
    started = time.perf_counter()
    with peaks, torch.inference_mode():
        pipeline(prompt="a red fox runs through fresh snow", width=width, height=height,
                 num_frames=frames, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0))
    shape = RenderShape(width=width, height=height, frames=frames, dtype_bytes=4, packed=False)
    configs = folder_configs(source)
    stages = {}
    for stage in STAGES:
        estimate = activation_bytes(stage, shape, configs)
        measured = peaks.peaks.get(stage, 0)
        stages[stage] = {"estimate_bytes": estimate, "measured_bytes": measured,
                         "estimate_over_measured": round(estimate / measured, 3) if measured else None}
    return {"width": width, "height": height, "frames": frames, "wall_s":
            round(time.perf_counter() - started, 2), "stages": stages}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory-plan.json"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        source = make_tiny_ltx23(Path(scratch) / "tiny")
        runs = [measure(source, *size) for size in SIZES]
    result = {
        "command": " ".join(["python -m hlwq.benchmarks.memory_plan_check", *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": psutil.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
                    "torch": torch.__version__, "threads": args.threads},
        "fixture": "tiny LTX-2.3 (float32, CPU, RSS sampled every 2 ms)",
        "runs": runs,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
