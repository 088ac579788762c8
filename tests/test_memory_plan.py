"""`hlwq plan --device-memory`: peak memory per offload mode and stage, and which modes fit."""

from __future__ import annotations

import json

import pytest
from artifact_helpers import make_diffusers_source, package_source
from click.testing import CliRunner

from hlwq.cli.main import cli
from hlwq.quant.errors import InvalidOptionError
from hlwq.runtime.memory_plan import (
    MODES,
    STAGES,
    RenderShape,
    component_weights,
    layout_configs,
    memory_plan,
    parse_resolution,
)

GB = 10**9


def run(*args):
    return CliRunner().invoke(cli, ["plan", *map(str, args)])


def check_shape(memory: dict) -> None:
    assert set(memory["modes"]) == set(MODES) and set(memory["fits"]) == set(MODES)
    for entry in memory["modes"].values():
        assert [s["name"] for s in entry["stages"]] == list(STAGES)
        for stage in entry["stages"]:
            assert stage["peak_bytes"] == stage["weights_bytes"] + stage["activation_bytes"]
        assert entry["peak_bytes"] == max(s["peak_bytes"] for s in entry["stages"])


def test_ltx23_full_renders_768x512x121_on_16gb_with_model_offload():
    result = run("--layout", "ltx23-22b", "--policy", "ltx23-full", "--device-memory", "16GB",
                 "--resolution", "768x512", "--frames", "121", "--json")
    assert result.exit_code == 0, result.output
    memory = json.loads(result.output)["memory"]
    check_shape(memory)
    assert memory["video_tokens"] == 16 * 16 * 24 and memory["audio_tokens"] == 127
    assert memory["fits"] == {"none": False, "model": True, "sequential": True, "group": True}
    assert memory["recommended"] == "model"
    none = {s["name"]: s for s in memory["modes"]["none"]["stages"]}
    assert 26 * GB < none["denoising"]["weights_bytes"] < 27 * GB     # the package, minus upsampler


def test_tiling_shrinks_the_vae_stage_and_resolution_is_checked():
    weights = component_weights([
        {"component": c, "tensor": f"blocks.{i}.w", "packed_bytes": 10**8}
        for c in ("transformer", "vae", "text_encoder", "connectors", "audio_vae", "vocoder")
        for i in range(4)])
    configs = layout_configs()
    plain = memory_plan(weights, configs, RenderShape())
    tiled = memory_plan(weights, configs, RenderShape(vae_tiling=True))
    vae = [next(s for s in p["modes"]["group"]["stages"] if s["name"] == "vae_decode")
           for p in (plain, tiled)]
    assert vae[1]["activation_bytes"] < vae[0]["activation_bytes"] / 3
    assert "fits" not in plain                                     # no device memory given
    assert weights["vae"] == {"bytes": 4 * 10**8, "largest_tensor": 10**8, "outside_blocks": 0,
                              "largest_block": 10**8}
    assert parse_resolution("1280x704") == (1280, 704)
    with pytest.raises(InvalidOptionError, match="WIDTHxHEIGHT"):
        parse_resolution("1280 by 704")


def test_plan_of_a_packed_artifact(tmp_path):
    source = make_diffusers_source(tmp_path / "source")
    (tmp_path / "staging").mkdir()
    artifact = package_source(source, tmp_path / "artifact", tmp_path / "staging")
    result = run(artifact, "--device-memory", "12GB", "--json")   # the untiled VAE needs ~8 GB
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    check_shape(report["memory"])
    assert report["memory"]["fits"]["none"] is True
    text = run(artifact, "--device-memory", "12GB")
    assert "recommended --offload none" in text.output and "denoising" in text.output
    assert "no mode fits" in run(artifact, "--device-memory", "4GB").output
    assert run(artifact).exit_code == 2                            # an artifact needs the option
