"""ltx23-full artifacts: the Gemma 3 text encoder and the connectors load packed and render
like the dequantized export, in the diffusers and the single-file layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_helpers import quantize_source

import hlwq.quant.core
from hlwq.runtime.loader import load_pipeline
from hlwq.runtime.packed_linear import PackedLinear
from hlwq.store.export import export_dequantized
from hlwq.store.package import package_artifact
from hlwq.testing.fixtures import load_tiny_pipeline, make_tiny_ltx23

PACKED = ("transformer", "connectors", "text_encoder")
RENDER = {"prompt": "a red fox runs through fresh snow at dawn", "num_frames": 9, "height": 32,
          "width": 32, "num_inference_steps": 2}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_full_artifact(root: Path, single_file: bool) -> Path:
    (root / "staging").mkdir(parents=True)
    source = make_tiny_ltx23(root / "source", single_file=single_file)
    fetched, inventory, staged, metrics = quantize_source(source, root / "staging",
                                                          policy="ltx23-full")
    out = root / "artifact"
    package_artifact(fetched.root, inventory, staged, out, lineage=fetched.lineage,
                     quantization={"bits": 5, "block_size": 128, "group_size": 128,
                                   "mode": "reference", "policy": "ltx23-full",
                                   "code_version": "test"},
                     metrics=metrics, validation={"validated": True})
    return out


def quantized_by_component(artifact: Path) -> dict[str, int]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    counts: dict[str, int] = {}
    for entry in manifest["tensors"].values():
        if entry["action"] == "quantize":
            counts[entry["component"]] = counts.get(entry["component"], 0) + 1
    return counts


def render(pipeline, output_type: str = "np"):
    pipeline.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        out = pipeline(**RENDER, output_type=output_type,
                       generator=torch.Generator().manual_seed(0))
    return np.asarray(out.frames[0], dtype=np.float64), out.audio[0].double().numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("single_file", [
    False, pytest.param(True, marks=pytest.mark.slow)], ids=["diffusers", "single_file"])
def test_full_policy_packs_text_encoder_and_connectors(tmp_path, monkeypatch, single_file):
    artifact = build_full_artifact(tmp_path, single_file)
    counts = quantized_by_component(artifact)
    # tiny fixture: 2 Gemma layers x 7 linears; 2 connector streams x (1 block x 6 + proj_in)
    assert counts == {"transformer": 56, "connectors": 14, "text_encoder": 14}

    exported = tmp_path / "exported"
    export_dequantized(artifact, exported)
    reference = load_tiny_pipeline(exported)
    monkeypatch.setattr(hlwq.quant.core, "dequantize", lambda *a, **k: pytest.fail("dequantized"))
    packed = load_pipeline(artifact)
    for component in PACKED:
        model = getattr(packed, component)
        assert sum(isinstance(m, PackedLinear) for m in model.modules()) == counts[component]
        assert not any(p.is_meta for p in model.parameters())
    assert packed.text_encoder.lm_head.weight is packed.text_encoder.get_input_embeddings().weight
    frames, audio = render(packed)
    monkeypatch.undo()

    frames_bf16, audio_bf16 = render(reference)    # the export holds BF16 weights
    assert np.abs(frames - frames_bf16).max() < 5e-3 and rel(audio, audio_bf16) < 2e-3
    # With the exact fp32 dequantized weights everywhere the latents agree to float rounding.
    with torch.no_grad():
        for component in PACKED:
            for name, module in getattr(packed, component).named_modules():
                if isinstance(module, PackedLinear):
                    getattr(reference, component).get_submodule(name).weight.copy_(
                        hlwq.quant.core.dequantize(module.packed))
    for found, expected in zip(render(packed, "latent"), render(reference, "latent")):
        assert rel(found, expected) < 1e-5
