"""Small checkpoints and helpers shared by the quantize-flow tests (real files, seeded)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
ATTENTIONS = ("attn1", "attn2")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def weight(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Heavy-tailed BF16 weights with a few outlier input columns, like trained ones."""
    w = torch.distributions.StudentT(5.0).sample((rows, cols)) * 0.02
    w[:, torch.randint(0, cols, (2,), generator=generator)] *= 8
    return w.to(torch.bfloat16)


def write_diffusers_checkpoint(root: Path, layers: int = 2, width: int = 256, seed: int = 0) -> Path:
    """A diffusers-like pipeline folder: an LTX-named transformer and a small VAE (carried)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tensors = {"proj_in.weight": weight(width, 128, generator), "proj_in.bias": torch.zeros(width)}
    for layer in range(layers):
        prefix = f"transformer_blocks.{layer}"
        for attention in ATTENTIONS:
            for projection in PROJECTIONS:
                tensors[f"{prefix}.{attention}.{projection}.weight"] = weight(width, width, generator)
            tensors[f"{prefix}.{attention}.to_out.0.bias"] = torch.zeros(width, dtype=torch.bfloat16)
        tensors[f"{prefix}.ff.net.0.proj.weight"] = weight(2 * width, width, generator)
        tensors[f"{prefix}.ff.net.2.weight"] = weight(width, 2 * width, generator)
        tensors[f"{prefix}.norm1.weight"] = torch.ones(width, dtype=torch.bfloat16)
    (root / "transformer").mkdir(parents=True)
    save_file(tensors, root / "transformer" / "diffusion_pytorch_model.safetensors")
    (root / "transformer" / "config.json").write_text(json.dumps({"num_layers": layers}))
    (root / "vae").mkdir()
    save_file({"decoder.conv.weight": torch.randn(8, 4, 3, 3)},
              root / "vae" / "diffusion_pytorch_model.safetensors")
    (root / "vae" / "config.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "LTX2Pipeline"}))
    return root


def write_generic_file(path: Path, layers: int = 2, seed: int = 1) -> Path:
    """One .safetensors file of a generic model (policy "generic": 2-D weights >= 65,536 values)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tensors = {"embed_tokens.weight": weight(512, 128, generator)}
    for layer in range(layers):
        tensors[f"layers.{layer}.mlp.up.weight"] = weight(512, 256, generator)
        tensors[f"layers.{layer}.mlp.down.weight"] = weight(256, 512, generator)
        tensors[f"layers.{layer}.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), to compare two artifacts exactly."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def hlwq_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from hlwq.cli.main import main; main()", *args]


def cli_env(prefect_home: Path) -> dict[str, str]:
    """Environment for a CLI subprocess: its own Prefect home (a fresh temporary API)."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_LOGGING_LEVEL="WARNING",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PYTHONPATH=str(REPO))
    return env


def run_cli(args: list[str], prefect_home: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(hlwq_command(*args), check=False, cwd=REPO, env=cli_env(prefect_home),
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def patient_prefect(startup_timeout_s: int = 120):
    """In-process runs: give Prefect's temporary server time to start on a loaded machine
    (as the CLI does via flows.prefect_env), whatever imported Prefect first."""
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: startup_timeout_s}):
        yield


class PacedPipeline:
    """Answers like LTX2Pipeline (output_type="np") after ``seconds``: renders slow enough to
    kill a batch between two of them. Frames and audio follow the seed."""

    seconds = 1.0

    def __init__(self):
        from types import SimpleNamespace

        self.vocoder = SimpleNamespace(config=SimpleNamespace(output_sampling_rate=24000))

    def __call__(self, prompt, width, height, num_frames, frame_rate, generator, **_):
        import time
        from types import SimpleNamespace

        import numpy as np

        time.sleep(self.seconds)
        rng = np.random.default_rng(generator.initial_seed())
        frames = rng.random((1, num_frames, height, width, 3), dtype=np.float32)
        audio = torch.zeros(1, 2, int(24000 * num_frames / frame_rate))
        return SimpleNamespace(frames=frames, audio=audio)


def paced_factory(artifact, device, dtype, **_):
    return PacedPipeline()
