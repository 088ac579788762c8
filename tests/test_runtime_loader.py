"""load_pipeline on real tiny LTX-2.3 artifacts: packed layers, renders, manifest mismatches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_helpers import quantize_source

import hlwq.quant.core
from hlwq.quant.errors import ArtifactError, InvalidOptionError
from hlwq.runtime.loader import load_component, load_pipeline
from hlwq.runtime.packed_linear import PackedLinear
from hlwq.store.artifact import tensor_key
from hlwq.store.export import export_dequantized
from hlwq.store.package import package_artifact
from hlwq.testing.fixtures import load_tiny_pipeline, make_tiny_ltx23

LAYOUTS = ("diffusers", "single_file")
BLOCK_LINEARS = 28
Q_WEIGHT = "transformer_blocks.0.attn1.to_q.weight"
RENDER = {"prompt": "a red fox runs through fresh snow at dawn", "num_frames": 9, "height": 32,
          "width": 32, "num_inference_steps": 2, "output_type": "np"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only adds synchronisation (and spinning on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_artifact(root: Path, single_file: bool) -> Path:
    source = make_tiny_ltx23(root / "source", single_file=single_file)
    fetched, inventory, staged, metrics = quantize_source(source, root / "staging", policy="ltx23")
    out = root / "artifact"
    package_artifact(fetched.root, inventory, staged, out, lineage=fetched.lineage,
                     quantization={"bits": 5, "block_size": 128, "group_size": 128,
                                   "mode": "refined", "policy": "ltx23", "code_version": "test"},
                     metrics=metrics, validation={"tensor_gates": {"passed": True},
                                 "output_gates": {"skipped": "not a whole pipeline"}})
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Artifacts by layout, each built once for the module, on first use."""
    cache: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in cache:
            root = tmp_path_factory.mktemp(layout)
            (root / "staging").mkdir()
            cache[layout] = build_artifact(root, single_file=layout == "single_file")
        return cache[layout]

    return get


@pytest.fixture(params=LAYOUTS)
def artifact(request, built) -> Path:
    return built(request.param)


@pytest.fixture
def diffusers_artifact(built) -> Path:
    return built("diffusers")


def render(pipeline, **extra):
    """Frames and audio (or, with output_type="latent", the two latents) as float64 arrays."""
    pipeline.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        out = pipeline(**{**RENDER, **extra}, generator=torch.Generator().manual_seed(0))
    return np.asarray(out.frames[0], dtype=np.float64), out.audio[0].double().numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def quantized_names(artifact: Path) -> list[str]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    return [e["name"] for e in manifest["tensors"].values() if e["action"] == "quantize"]


def test_render_equals_export_dequantized(artifact, tmp_path, monkeypatch):
    exported = tmp_path / "exported"
    export_dequantized(artifact, exported)
    reference = load_tiny_pipeline(exported)
    frames_bf16, audio_bf16 = render(reference)

    # Loading and rendering from packed weights never rebuilds a dense weight.
    monkeypatch.setattr(hlwq.quant.core, "dequantize", lambda *a, **k: pytest.fail("dequantized"))
    packed = load_pipeline(artifact)
    linears = [m for m in packed.transformer.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == BLOCK_LINEARS * packed.transformer.config.num_layers
    assert len(linears) == len(quantized_names(artifact))
    assert not any(p.is_meta for p in packed.transformer.parameters())
    frames, audio = render(packed)
    monkeypatch.undo()

    # The export holds BF16 weights: the renders differ by that rounding only ...
    assert np.abs(frames - frames_bf16).max() < 5e-3 and rel(frames, frames_bf16) < 2e-3
    assert rel(audio, audio_bf16) < 1e-3
    # ... and with the exact fp32 dequantized weights the transformer's results (the latents)
    # agree to float rounding.
    with torch.no_grad():
        for module_name, module in packed.transformer.named_modules():
            if isinstance(module, PackedLinear):
                reference.transformer.get_submodule(module_name).weight.copy_(
                    hlwq.quant.core.dequantize(module.packed))
    for found, expected in zip(render(packed, output_type="latent"),
                               render(reference, output_type="latent")):
        assert rel(found, expected) < 1e-5


def test_load_component_alone_in_bf16(artifact):
    transformer = load_component(artifact, "transformer", dtype=torch.bfloat16, verify=False)
    packed = [m for m in transformer.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == len(quantized_names(artifact))
    assert {m.codes.dtype for m in packed} == {torch.uint8}
    assert {m.scales.dtype for m in packed} == {torch.float16}
    assert transformer.scale_shift_table.dtype == torch.bfloat16
    with pytest.raises(ArtifactError, match="upsampler"):
        load_component(artifact, "upsampler", verify=False)


def test_image_to_video_pipeline(diffusers_artifact):
    from diffusers import LTX2ImageToVideoPipeline
    from PIL import Image

    pipeline = load_pipeline(diffusers_artifact, image_to_video=True, verify=False)
    assert isinstance(pipeline, LTX2ImageToVideoPipeline)
    assert isinstance(pipeline.transformer.get_submodule(Q_WEIGHT[:-7]), PackedLinear)
    latents, _ = render(pipeline, image=Image.new("RGB", (32, 32), (200, 40, 40)),
                        output_type="latent")
    assert np.isfinite(latents).all() and np.abs(latents).max() > 0


def copy_with_manifest(artifact: Path, target: Path, edit) -> Path:
    shutil.copytree(artifact, target)
    manifest = json.loads((target / "manifest.json").read_text())
    edit(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return target


def entry(manifest: dict, name: str) -> dict:
    return manifest["tensors"][tensor_key("transformer", name)]


@pytest.mark.parametrize("verify", [True, False])
def test_missing_tensor_names_it(diffusers_artifact, tmp_path, verify):
    bad = copy_with_manifest(diffusers_artifact, tmp_path / "bad", lambda m: m["tensors"].pop(
        tensor_key("transformer", Q_WEIGHT)))
    with pytest.raises(ArtifactError, match=r"transformer_blocks\.0\.attn1\.to_q"):
        load_pipeline(bad, verify=verify)


@pytest.mark.parametrize("verify", [True, False])
def test_wrong_bits_names_the_tensor(diffusers_artifact, tmp_path, verify):
    bad = copy_with_manifest(diffusers_artifact, tmp_path / "bad",
                             lambda m: entry(m, Q_WEIGHT).update(bits=4))
    with pytest.raises(ArtifactError, match=r"transformer_blocks\.0\.attn1\.to_q"):
        load_pipeline(bad, verify=verify)


def test_config_mismatch_names_the_tensor(diffusers_artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(diffusers_artifact, bad)
    config_path = bad / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 2 * config["cross_attention_dim"]  # attn2.to_k/to_v widen
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"transformer/config\.json"):
        load_pipeline(bad)                          # verify: the file's hash changed
    with pytest.raises(ArtifactError, match=r"attn2\.to_k\.weight.*shape"):
        load_pipeline(bad, verify=False)            # the model check: shape against config


def test_layer_missing_from_config_names_the_tensor(diffusers_artifact, tmp_path):
    bad = copy_with_manifest(diffusers_artifact, tmp_path / "bad", lambda m: m["tensors"].update({
        tensor_key("transformer", "transformer_blocks.0.attn1.to_z.weight"):
            {**entry(m, Q_WEIGHT), "name": "transformer_blocks.0.attn1.to_z.weight"}}))
    with pytest.raises(ArtifactError, match=r"to_z\.weight.*not the weight of a linear"):
        load_pipeline(bad, verify=False)


def test_offload_mode_is_checked(diffusers_artifact):
    with pytest.raises(InvalidOptionError, match="--offload 'yes'"):
        load_pipeline(diffusers_artifact, device="cpu", offload="yes", verify=False)


def test_auto_offload_on_cuda_plans_for_the_render_shapes(diffusers_artifact, monkeypatch):
    """On CUDA, auto is given the memory plan's peaks of this artifact for the renders asked
    for (placement itself faked: this machine may have no GPU); on the CPU it is none."""
    import hlwq.runtime.loader as loader
    from hlwq.runtime.memory_plan import RenderShape, artifact_peaks

    seen = {}
    monkeypatch.setattr(loader, "apply_offload",
                        lambda pipeline, mode, device, peaks: seen.update(peaks=peaks) or mode)
    shape = RenderShape(width=512, height=320, frames=49)
    load_pipeline(diffusers_artifact, device="cuda", dtype=torch.bfloat16, verify=False,
                  render_shapes=[shape])
    assert seen["peaks"] == artifact_peaks(diffusers_artifact, [shape])    # bf16: 2 bytes
    assert seen["peaks"]["none"] > seen["peaks"]["model"] > seen["peaks"]["sequential"]
    monkeypatch.undo()
    assert load_pipeline(diffusers_artifact, verify=False).offload_mode == "none"   # CPU
