"""The HTML validation report opened in a real headless browser (Debian's chromium).

The report comes from synthetic renders (no model): the metrics, the gates, the contact sheets,
the plots and the page are the real code. The page sets ``<body data-images=...>`` once every
image decoded; ``--dump-dom`` after a virtual-time budget shows it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hlwq.runtime.report import (
    FRAME_DIR,
    PLOT_DIR,
    SHEET_DIR,
    write_comparison_sheet,
    write_frame_comparison,
    write_report,
)
from hlwq.tasks.gates import load_gate_config
from hlwq.tasks.validate_output import compare_renderings, gate_results, output_gates

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="chromium not found (./dev.sh test installs Debian's chromium)")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
RATE = 16_000


def rendering(seed: int, noise: float, frames: int = 9, size=(32, 48)) -> dict:
    """A fake render: textured frames, a tone, latents (final and per step) and two blocks of
    activations."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(0)
    video = np.clip(base.uniform(0, 1, (frames, *size, 3)) + rng.normal(0, noise, (frames, *size, 3)),
                    0, 1).astype(np.float32)
    t = np.arange(RATE // 4) / RATE
    hiss = base.normal(0, 0.05, (2, len(t)))            # a broadband floor, as real audio has
    audio = np.stack([np.sin(2 * np.pi * 440 * t)] * 2) + hiss + rng.normal(0, noise, (2, len(t)))
    latents = torch.as_tensor(base.normal(size=(1, 24, 16)) + rng.normal(0, noise, (1, 24, 16)))
    blocks = {b: {s: torch.as_tensor(base.normal(size=64) + rng.normal(0, noise * (b + 1), 64))
                  for s in ("video", "audio")} for b in range(2)}
    steps = [torch.as_tensor(base.normal(size=96) + rng.normal(0, noise * (s + 1), 96))
             for s in range(3)]
    return {"frames": video, "audio": audio, "latents": latents, "sample_rate": RATE,
            "blocks": blocks, "steps": steps}


def metrics_parquet(path):
    rng = np.random.default_rng(7)
    rows = [{"tensor": f"transformer_blocks.{b}.{m}.weight", "component": "transformer",
             "action": "quantize", "bits": 5, "rel_mse": float(rng.uniform(1e-3, 3e-3)),
             "cosine": float(1 - rng.uniform(5e-4, 1.5e-3))}
            for b in range(2) for m in ("attn1.to_q", "attn1.to_k", "ff.net.0.proj", "ff.net.2")]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report with one passing and one failing prompt, each against its control."""
    directory = tmp_path_factory.mktemp("report")
    source = rendering(seed=1, noise=0.0)
    control = rendering(seed=4, noise=0.001)
    prompts = {}
    for pid, noise in (("close-match", 0.001), ("far-off", 0.2)):
        candidate = rendering(seed=2, noise=noise)
        entry = compare_renderings(source, candidate, control)
        prompts[pid] = {"prompt": f"a test prompt <{pid}>", "width": 48, "height": 32,
                        "frames": 9, "seed": 3, "steps": 3, **entry}
        write_comparison_sheet(directory / SHEET_DIR / f"{pid}.png", source["frames"],
                               candidate["frames"])
        write_frame_comparison(directory / FRAME_DIR / f"{pid}.png", source["frames"],
                               control["frames"], candidate["frames"], entry["worst_frame"])
    results = gate_results(prompts, output_gates(load_gate_config()), source="src", artifact="art",
                           device="cpu", suite={"name": "v1", "sha256": "0" * 64, "path": "v1.jsonl"},
                           report=str(directory / "report.html"),
                           control={"bits": 8, "mode": "refined", "tensors": 8})
    path = write_report(directory, results, metrics_parquet(directory.parent / "metrics.parquet"))
    return path, results


def body_tag(path, tmp_path) -> str:
    """The <body> tag after the page loaded, as the browser's DOM has it."""
    result = subprocess.run(
        [BROWSER, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    match = re.search(r"<body[^>]*>", result.stdout)
    assert match, f"no <body> in chromium's output (exit {result.returncode}): {result.stderr[-2000:]}"
    return match.group(0)


def test_report_renders_with_every_image_loaded(report, tmp_path):
    path, results = report
    page = path.read_text()
    images = re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)
    # a worst frame and a sheet per prompt + 5 plots
    assert len(images) == 2 * len(results["prompts"]) + 5
    assert {f"{PLOT_DIR}/{name}.png" for name in ("prompts", "trajectory", "blocks",
                                                  "module_types", "tensor_errors")} <= set(images)
    assert {f"{FRAME_DIR}/{pid}.png" for pid in results["prompts"]} <= set(images)
    body = body_tag(path, tmp_path)
    assert 'data-images="loaded"' in body
    assert f'data-images-total="{len(images)}"' in body
    assert f'data-images-loaded="{len(images)}"' in body


def test_report_states_the_verdicts(report):
    path, results = report
    page = path.read_text()
    assert not results["passed"] and results["failed_prompts"] == ["far-off"]
    assert "Output gates FAILED" in page
    assert "a test prompt &lt;far-off&gt;" in page                  # escaped, never raw HTML
    for name in results["gates"]:
        assert name in page
    assert "Distances per prompt: packed / control (ratio)" in page
    assert "re-quantized at 8 bits" in page


def test_a_missing_image_is_caught(report, tmp_path):
    path, _ = report
    copy = tmp_path / "copy"
    shutil.copytree(path.parent, copy)
    (copy / PLOT_DIR / "blocks.png").unlink()
    body = body_tag(copy / path.name, tmp_path)
    assert 'data-images="broken"' in body
