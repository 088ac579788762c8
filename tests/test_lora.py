"""LoRA on the packed tiny LTX-2.3: diffusers' API, equality with PEFT on the dequantized model,
the accepted file formats and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_helpers import quantize_source
from safetensors.torch import save_file
from torch import nn

import hlwq.quant.core
from hlwq.quant.core import quantize_tensor
from hlwq.quant.errors import LoraError
from hlwq.runtime.loader import load_pipeline
from hlwq.runtime.lora import PackedLoraLinear, load_lora_into_model
from hlwq.runtime.packed_linear import PackedLinear
from hlwq.store.export import export_dequantized
from hlwq.store.lora_file import official_module_name, read_lora_file
from hlwq.store.package import package_artifact
from hlwq.testing.fixtures import load_tiny_pipeline, make_tiny_ltx23

RENDER = {"prompt": "a red fox runs through fresh snow at dawn", "num_frames": 9, "height": 32,
          "width": 32, "num_inference_steps": 2}
# Packed layers of both streams, a kept (BF16) transformer layer, and the connectors (text side).
TRANSFORMER_TARGETS = [f"transformer_blocks.{b}.{m}" for b in (0, 1) for m in (
    "attn1.to_q", "attn1.to_out.0", "audio_attn2.to_k", "ff.net.0.proj", "audio_ff.net.2")] + [
    "proj_in"]
CONNECTOR_TARGETS = ["video_text_proj_in", "video_connector.transformer_blocks.0.attn1.to_v"]
EXACT = 1e-5      # packed fp32 vs dense fp32 with the exact dequantized weights (test_runtime_loader)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    (root / "staging").mkdir()
    fetched, inventory, staged, metrics = quantize_source(make_tiny_ltx23(root / "source"),
                                                          root / "staging", policy="ltx23")
    package_artifact(fetched.root, inventory, staged, root / "artifact", lineage=fetched.lineage,
                     quantization={"bits": 5, "block_size": 128, "group_size": 128,
                                   "mode": "refined", "policy": "ltx23", "code_version": "test"},
                     metrics=metrics, validation={"tensor_gates": {"passed": True},
                                                  "output_gates": {"skipped": "not a whole pipeline"}})
    return root / "artifact"


@pytest.fixture(scope="module")
def pipelines(artifact, tmp_path_factory):
    """The packed pipeline, and the dequantized export with the exact fp32 dequantized weights."""
    packed = load_pipeline(artifact)
    exported = tmp_path_factory.mktemp("exported")
    export_dequantized(artifact, exported)
    reference = load_tiny_pipeline(exported)
    with torch.no_grad():
        for name, module in packed.transformer.named_modules():
            if isinstance(module, PackedLinear):
                reference.transformer.get_submodule(name).weight.copy_(
                    hlwq.quant.core.dequantize(module.packed))
    for pipeline in (packed, reference):
        pipeline.set_progress_bar_config(disable=True)
    yield packed, reference


@pytest.fixture
def clean(pipelines):
    yield pipelines
    for pipeline in pipelines:
        pipeline.unload_lora_weights()


def latents(pipeline) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        out = pipeline(**RENDER, output_type="latent", generator=torch.Generator().manual_seed(0))
    return out.frames.double().numpy(), out.audio.double().numpy()


def frames(pipeline) -> np.ndarray:
    with torch.inference_mode():
        out = pipeline(**RENDER, output_type="np", generator=torch.Generator().manual_seed(0))
    return np.asarray(out.frames[0], dtype=np.float64)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_close(found, expected, tolerance=EXACT):
    for a, b in zip(found, expected):
        assert rel(a, b) < tolerance


def random_lora(pipeline, seed: int, rank: int = 4, gain: float = 1.0,
                targets=None) -> dict[str, torch.Tensor]:
    """diffusers-format LoRA tensors: random A and B sized to change the output visibly."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for component, names in targets or (("transformer", TRANSFORMER_TARGETS),
                                        ("connectors", CONNECTOR_TARGETS)):
        for name in names:
            layer = getattr(pipeline, component).get_submodule(name)
            state[f"{component}.{name}.lora_A.weight"] = (
                torch.randn(rank, layer.in_features, generator=g) / layer.in_features ** 0.5)
            state[f"{component}.{name}.lora_B.weight"] = (
                gain * torch.randn(layer.out_features, rank, generator=g) / rank ** 0.5)
    return state


def write_lora(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


# ------------------------------------------------------------------ equality with PEFT


def test_packed_lora_equals_peft_on_the_dequantized_model(clean, tmp_path, monkeypatch):
    packed, reference = clean
    base = latents(packed)
    lora = write_lora(tmp_path / "random.safetensors", random_lora(packed, seed=1))

    packed.load_lora_weights(lora, adapter_name="random")
    reference.load_lora_weights(lora, adapter_name="random")   # diffusers' and PEFT's own path
    assert isinstance(packed.transformer.transformer_blocks[0].attn1.to_q, PackedLoraLinear)
    assert isinstance(packed.transformer.transformer_blocks[0].attn1.to_q.base_layer, PackedLinear)
    assert packed.get_list_adapters() == {"transformer": ["random"], "connectors": ["random"]}
    # Rendering with the LoRA never rebuilds a dense base weight.
    monkeypatch.setattr(hlwq.quant.core, "dequantize", lambda *a, **k: pytest.fail("dequantized"))
    monkeypatch.setattr(PackedLinear, "_whole_weight", lambda *a, **k: pytest.fail("dense copy"))
    with_lora = latents(packed)
    monkeypatch.undo()
    assert_close(with_lora, latents(reference))
    assert rel(with_lora[0], base[0]) > 1e-2          # the LoRA does change the render


def test_trained_lora_changes_the_render_and_matches_peft(clean, tmp_path):
    """A LoRA trained a few steps on the tiny transformer (PEFT, dense), saved by diffusers."""
    from diffusers import LTX2Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    packed, reference = clean
    transformer = reference.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, target_modules=[
        "attn1.to_q", "attn1.to_v", "attn2.to_k", "ff.net.2", "audio_ff.net.0.proj"]),
        adapter_name="trained")
    trainable = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=3e-2)
    inputs = step_inputs(transformer.config)
    with torch.no_grad():
        target = transformer(**inputs)[0] + 1.0           # teach it to brighten every latent
    for _ in range(6):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(transformer(**inputs)[0], target)
        loss.backward()
        optimizer.step()
    trained = {k: v.detach().clone() for k, v in
               get_peft_model_state_dict(transformer, adapter_name="trained").items()}
    transformer.delete_adapters("trained")
    LTX2Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=trained,
                                   transformer_lora_adapter_metadata=None)
    lora = tmp_path / "pytorch_lora_weights.safetensors"

    base = frames(packed)
    packed.load_lora_weights(lora, adapter_name="trained")
    reference.load_lora_weights(lora, adapter_name="trained")
    assert rel(frames(packed), base) > 0.05           # visibly different video
    assert_close(latents(packed), latents(reference))


def step_inputs(config, frames=2, side=2, text=8, audio=4) -> dict:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return {"hidden_states": randn(1, frames * side * side, config.in_channels),
                "audio_hidden_states": randn(1, audio, config.audio_in_channels),
                "encoder_hidden_states": randn(1, text, config.cross_attention_dim),
                "audio_encoder_hidden_states": randn(1, text, config.audio_cross_attention_dim),
                "timestep": torch.tensor([500.0]), "sigma": torch.tensor([500.0]),
                "encoder_attention_mask": torch.ones(1, text),
                "audio_encoder_attention_mask": torch.ones(1, text), "num_frames": frames,
                "height": side, "width": side, "fps": 24.0, "audio_num_frames": audio,
                "use_cross_timestep": True, "return_dict": False}


def transformer_out(pipeline) -> tuple[np.ndarray, ...]:
    with torch.inference_mode():
        return tuple(t.double().numpy() for t in
                     pipeline.transformer(**step_inputs(pipeline.transformer.config)))


# ------------------------------------------------------------------ the API


def test_several_loras_set_adapters_disable_enable_unload(clean, tmp_path):
    packed, reference = clean
    base = transformer_out(packed)
    for seed, name in ((2, "a"), (3, "b")):
        lora = write_lora(tmp_path / f"{name}.safetensors", random_lora(packed, seed=seed))
        packed.load_lora_weights(lora, adapter_name=name)
        reference.load_lora_weights(lora, adapter_name=name)
    for pipeline in clean:
        pipeline.set_adapters(["a", "b"], adapter_weights=[0.5, 1.2])
    mixed = transformer_out(packed)
    assert_close(mixed, transformer_out(reference))
    assert rel(mixed[0], base[0]) > 1e-2

    packed.set_adapters("a", adapter_weights=0.5)
    assert rel(transformer_out(packed)[0], mixed[0]) > 1e-3
    packed.disable_lora()
    assert_close(transformer_out(packed), base, 1e-12)
    packed.enable_lora()
    packed.set_adapters(["a", "b"], adapter_weights=[0.5, 1.2])
    assert_close(transformer_out(packed), mixed, 1e-12)
    packed.delete_adapters("a")
    assert packed.get_list_adapters()["transformer"] == ["b"]
    packed.unload_lora_weights()
    assert isinstance(packed.transformer.transformer_blocks[0].attn1.to_q, PackedLinear)
    assert_close(transformer_out(packed), base, 1e-12)


def test_fuse_lora_is_refused_and_changes_nothing(clean, tmp_path):
    packed, _ = clean
    packed.load_lora_weights(write_lora(tmp_path / "a.safetensors", random_lora(packed, seed=4)),
                             adapter_name="a")
    before = transformer_out(packed)
    with pytest.raises(LoraError, match="fuse_lora: transformer layer 'transformer_blocks.0.attn1"
                                        ".to_q' is HLWQ-packed.*re-quantizing"):
        packed.fuse_lora(lora_scale=0.5)
    with pytest.raises(LoraError, match="re-quantizing"):   # the model-level call too
        packed.transformer.transformer_blocks[0].attn1.to_q.merge()
    assert_close(transformer_out(packed), before, 1e-12)


# ------------------------------------------------------------------ formats


def test_official_ltx2_names_with_down_up_and_alpha(clean, tmp_path):
    packed, _ = clean
    rank, alpha = 4, 2.0
    diffusers_format = random_lora(packed, seed=5, rank=rank)
    official = {}
    for key, tensor in diffusers_format.items():
        component, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        name = official_module_name(component, module)
        if part == "A.weight":
            official[f"{name}.lora_down.weight"] = tensor
            official[f"{name}.alpha"] = torch.tensor(alpha)
        else:
            official[f"{name}.lora_up.weight"] = tensor
    assert any(k.startswith("diffusion_model.transformer_blocks.") for k in official)
    assert any(k.startswith("text_embedding_projection.") for k in official)
    assert any(k.startswith("diffusion_model.video_embeddings_connector.") for k in official)
    official_file = write_lora(tmp_path / "official.safetensors", official)

    _, by_component = read_lora_file(official_file)
    for key, tensor in diffusers_format.items():
        component, rest = key.split(".", 1)
        expected = tensor * alpha / rank if ".lora_B." in key else tensor
        torch.testing.assert_close(by_component[component][rest], expected, rtol=0, atol=0)

    scaled = {k: v * alpha / rank if ".lora_B." in k else v for k, v in diffusers_format.items()}
    packed.load_lora_weights(official_file, adapter_name="official")
    from_official = transformer_out(packed)
    packed.unload_lora_weights()
    packed.load_lora_weights(scaled, adapter_name="dict")       # a state dict works too
    assert_close(from_official, transformer_out(packed), 1e-12)


# ------------------------------------------------------------------ refusals


def refused(pipeline, lora, match):
    with pytest.raises(LoraError, match=match):
        pipeline.load_lora_weights(lora, adapter_name="bad")
    assert pipeline.get_list_adapters() in ({}, {"transformer": [], "connectors": []})


def test_refusals_name_the_file_and_the_first_bad_key(clean, tmp_path):
    packed, _ = clean
    good = random_lora(packed, seed=6, targets=[("transformer", ["transformer_blocks.0.attn1.to_q"])])
    a_key = "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"

    pickled = tmp_path / "lora.bin"
    torch.save(good, pickled)
    refused(packed, pickled, rf"LoRA file {pickled}: a pickled PyTorch file.*never loaded")

    missing = write_lora(tmp_path / "missing.safetensors", {
        **good, "transformer.transformer_blocks.7.attn1.to_q.lora_A.weight": torch.ones(4, 256),
        "transformer.transformer_blocks.7.attn1.to_q.lora_B.weight": torch.ones(256, 4)})
    refused(packed, missing, rf"{missing}: key 'transformer_blocks\.7\.attn1\.to_q\.lora_A\.weight'"
                             ": LTX2VideoTransformer3DModel has no module")

    wrong = write_lora(tmp_path / "wrong.safetensors", {**good, a_key: torch.ones(4, 128)})
    refused(packed, wrong, rf"{wrong}: key '.*to_q\.lora_A\.weight' has shape \[4, 128\], but "
                           "'transformer_blocks.0.attn1.to_q' has 256 in_features")

    unpaired = write_lora(tmp_path / "unpaired.safetensors", {a_key: good[a_key]})
    refused(packed, unpaired, "has no matching lora_B")
    text = write_lora(tmp_path / "text.safetensors", {
        "text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64),
        "text_encoder.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 4)})
    refused(packed, text, "transformer and the connectors .* only, not the text encoder")
    dora = write_lora(tmp_path / "dora.safetensors", {
        **good, "transformer.transformer_blocks.0.attn1.to_q.dora_scale": torch.ones(1, 256)})
    refused(packed, dora, "dora_scale' is not a LoRA tensor")
    nan = write_lora(tmp_path / "nan.safetensors", {**good, a_key: torch.full((4, 256), np.nan)})
    refused(packed, nan, "must hold finite floats")
    refused(packed, tmp_path / "absent.safetensors", "does not exist")


def test_bias_free_packed_layer_in_a_plain_module():
    """PEFT finds the device of a PackedLinear without parameters; in-place add equals PEFT's."""
    torch.manual_seed(0)
    layer = PackedLinear.from_packed(quantize_tensor(torch.randn(64, 256), bits=5, name="w"))
    model = nn.Sequential(layer, nn.LayerNorm(64))      # the layer itself has no parameter
    state = {"0.lora_A.weight": torch.randn(8, 256), "0.lora_B.weight": torch.randn(64, 8)}
    load_lora_into_model(model, state, "a")
    x = torch.randn(3, 5, 256)
    with torch.inference_mode():
        fast = model(x)
    slow = model(x.requires_grad_(True)).detach()        # PEFT's own forward (autograd)
    expected = model[1](layer(x.detach()) + x.detach() @ state["0.lora_A.weight"].T
                        @ state["0.lora_B.weight"].T)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ renders


@pytest.mark.slow
def test_render_batch_with_loras_keys_and_catalog(artifact, pipelines, tmp_path):
    """Rows with their own LoRAs, with the batch's default ones and with none: one packed pipeline."""
    from hlwq.flows.render_flow import render_batch
    from hlwq.store.catalog import read_catalog
    from hlwq.store.hash_cache import sha256_file
    from hlwq.tasks import render as render_module

    packed, _ = pipelines
    lora = write_lora(tmp_path / "style.safetensors", random_lora(packed, seed=7))
    size = {"width": 32, "height": 32, "frames": 9, "fps": 24, "steps": 2, "guidance": 1.0}
    rows = [{"id": "plain", "prompt": "a red fox", "loras": [], **size},
            {"id": "default", "prompt": "a red fox", **size},
            {"id": "weak", "prompt": "a red fox", "loras": [{"path": lora.name, "scale": 0.5}],
             **size}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    render_module.clear_pipeline_cache()
    try:
        for attempt in range(2):
            state = render_batch(str(artifact), str(prompts), str(tmp_path / "out"), device="cpu",
                                 retries=0, loras=[{"path": str(lora), "scale": 1.0}],
                                 return_state=True)
            assert state.is_completed(), state.message
        assert state.result()["counts"]["skipped"] == 3     # the rerun renders nothing again
        assert render_module.loaded_pipelines() == 1
    finally:
        render_module.clear_pipeline_cache()
    catalog = {row["id"]: row for row in read_catalog(tmp_path / "out").to_pylist()}
    sha = sha256_file(lora)
    assert catalog["plain"]["loras"] == []
    assert catalog["default"]["loras"] == [{"path": str(lora.resolve()), "sha256": sha, "scale": 1.0}]
    assert catalog["weak"]["loras"] == [{"path": str(lora.resolve()), "sha256": sha, "scale": 0.5}]
    assert len({row["render_key"] for row in catalog.values()}) == 3
    assert len({row["sha256"] for row in catalog.values()}) == 3    # three different videos
