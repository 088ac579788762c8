"""Offload modes on the CPU, where their hooks run too: PackedLinear's packed buffers move
with the hooks, are never cast, and every mode renders what the whole pipeline renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hlwq.quant.core import quantize_tensor
from hlwq.quant.errors import InvalidOptionError
from hlwq.runtime.memory_plan import (
    DEVICE_RESERVE_BYTES,
    RenderShape,
    component_weights,
    layout_configs,
    render_peaks,
)
from hlwq.runtime.offload import OFFLOAD_MODES, apply_offload, choose_offload
from hlwq.runtime.packed_linear import PackedLinear
from hlwq.testing.fixtures import load_tiny_pipeline, make_tiny_ltx23

RENDER = {"prompt": "a red fox runs through fresh snow at dawn", "num_frames": 9, "height": 32,
          "width": 32, "num_inference_steps": 2, "output_type": "latent"}
PACKED_DTYPES = {"codes": torch.uint8, "scales": torch.float16, "codebook": torch.float32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_ltx23(tmp_path_factory.mktemp("offload") / "tiny")


def packed_pipeline(source):
    """The tiny pipeline with every linear of the transformer and the text encoder packed."""
    pipeline = load_tiny_pipeline(source)
    for component in ("transformer", "text_encoder"):
        model = getattr(pipeline, component)
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and "vision" not in name:
                packed = quantize_tensor(module.weight.detach(), bits=5, block_size=128,
                                         mode="reference", name=name)
                model.set_submodule(name, PackedLinear.from_packed(packed, module.bias))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def packed_layers(pipeline) -> list[PackedLinear]:
    return [m for c in ("transformer", "text_encoder") for m in getattr(pipeline, c).modules()
            if isinstance(m, PackedLinear)]


def latents(pipeline) -> np.ndarray:
    with torch.inference_mode():
        out = pipeline(**RENDER, generator=torch.Generator().manual_seed(0))
    return out.frames[0].double().numpy()


@pytest.fixture(scope="module")
def reference(source):
    return latents(packed_pipeline(source))


@pytest.mark.parametrize("mode", ["model", "sequential", "group"])
def test_each_mode_renders_like_the_whole_pipeline(source, reference, mode):
    pipeline = packed_pipeline(source)
    assert apply_offload(pipeline, mode, "cpu") == mode
    layers = packed_layers(pipeline)
    if mode == "sequential":    # the weight itself is offloaded: nothing left at rest
        assert {m.codes.device.type for m in layers} == {"meta"}
    np.testing.assert_array_equal(latents(pipeline), reference)
    for layer in layers:        # moved by the hooks, never cast
        assert {name: getattr(layer, name).dtype for name in PACKED_DTYPES} == PACKED_DTYPES


def test_auto_on_the_cpu_keeps_everything_in_place(source):
    pipeline = packed_pipeline(source)
    assert apply_offload(pipeline, "auto", "cpu") == "none"
    with pytest.raises(InvalidOptionError, match="--offload 'disk'"):
        apply_offload(pipeline, "disk", "cpu")


def test_auto_picks_the_first_mode_of_the_plan_that_fits_the_free_memory(monkeypatch):
    weights = component_weights([
        {"component": c, "tensor": f"blocks.{i}.{part}", "packed_bytes": 15 * 10**8}
        for c in ("transformer", "vae", "text_encoder", "connectors", "audio_vae", "vocoder")
        for i in range(4) for part in "ab"])
    shapes = [RenderShape(), RenderShape(width=1280, height=704, frames=97)]
    peaks = render_peaks(weights, layout_configs(), shapes)
    assert peaks["none"] > peaks["model"] > peaks["group"] > peaks["sequential"]
    cuda = torch.device("cuda")
    for mode in ("none", "model", "group", "sequential"):       # just enough for each, in turn
        assert choose_offload(cuda, peaks, peaks[mode] + DEVICE_RESERVE_BYTES) == mode
    assert choose_offload(cuda, peaks, peaks["model"] + DEVICE_RESERVE_BYTES - 1) == "group"
    assert choose_offload(cuda, peaks, 10**6) == "sequential"   # nothing fits: the least memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (peaks["none"] * 2, 0))
    assert choose_offload(cuda, peaks) == "none"                # the device's own free figure
    assert choose_offload(torch.device("cpu"), peaks, 0) == "none"
    with pytest.raises(InvalidOptionError, match="needs the memory plan"):
        choose_offload(cuda, None)
    assert set(OFFLOAD_MODES) == {"auto", "none", "model", "sequential", "group"}
