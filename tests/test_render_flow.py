"""The render_batch flow: rejections, retries, recorded failures, catalog, skips, artifacts, one load.

The flow mechanics run on a scripted pipeline (`scripted_factory`, named as a "module:function"
parameter like the real loader); `test_real_tiny_pipeline_*` renders with the packed runtime
on the tiny LTX-2.3 artifact.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hlwq.cli.prefect_env import configure_prefect

configure_prefect()  # before Prefect loads its settings: the ephemeral API's longer start timeout

from hlwq.quant.errors import ArtifactError
from hlwq.runtime.memory_plan import RenderShape
from hlwq.runtime.video import probe_mp4
from hlwq.store.catalog import read_catalog
from hlwq.tasks import render as render_module

ATTEMPTS: dict[str, int] = {}
PLACEMENTS: list[dict] = []     # what each scripted_factory call was asked for


class ScriptedPipeline:
    """Answers like LTX2Pipeline with output_type="np": frames (1, T, H, W, 3) and audio (1, 2, S).

    Prompts script failures: "boom" always fails, "flaky" fails its first attempt.
    """

    vocoder = SimpleNamespace(config=SimpleNamespace(output_sampling_rate=24000))

    def __call__(self, prompt, width, height, num_frames, frame_rate, generator, output_type, image=None, **_):
        assert output_type == "np"
        ATTEMPTS[prompt] = ATTEMPTS.get(prompt, 0) + 1
        if "boom" in prompt or ("flaky" in prompt and ATTEMPTS[prompt] == 1):
            raise RuntimeError(f"scripted failure for {prompt!r}")
        if "typed" in prompt:
            raise ArtifactError(f"scripted typed failure for {prompt!r}")
        rng = np.random.default_rng(generator.initial_seed())
        frames = rng.random((1, num_frames, height, width, 3), dtype=np.float32)
        if image is not None:
            frames[:, 0] = np.asarray(image.resize((width, height)), dtype=np.float32) / 255
        samples = int(24000 * num_frames / frame_rate)
        return SimpleNamespace(frames=frames, audio=torch.zeros(1, 2, samples))


def scripted_factory(artifact, device, dtype, **placement):
    PLACEMENTS.append({"device": device, "dtype": dtype, **placement})
    return ScriptedPipeline()


FACTORY = f"{__name__}:scripted_factory"


@pytest.fixture()
def fake_artifact(tmp_path):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(json.dumps({"format": "scripted", "version": 1}))
    return artifact


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_batch(artifact, prompts, out, **options):
    from hlwq.flows.render_flow import render_batch

    options = {"verify": False, **options}   # a scripted artifact has no shards to verify
    return render_batch(str(artifact), str(prompts), str(out), retries=1, retry_delay_s=0,
                        pipeline_factory=FACTORY, return_state=True, **options)


def read_artifacts(flow_run_id):
    """The run's artifacts by key, straight from the REST API."""
    from prefect.client.orchestration import get_client

    query = {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 200, "offset": 0,
             "sort": "CREATED_DESC"}
    with get_client(sync_client=True) as client:
        found = client.request("POST", "/artifacts/filter", json=query).json()
    return {artifact["key"]: artifact for artifact in found}


def test_batch_renders_records_failures_skips_done_work_and_publishes_artifacts(tmp_path, fake_artifact):
    render_module.clear_pipeline_cache()
    ATTEMPTS.clear()
    Image.new("RGB", (64, 32), (255, 0, 0)).save(tmp_path / "first.png")
    size = {"width": 64, "height": 32, "frames": 9, "fps": 8, "steps": 1}
    prompts = write_prompts(tmp_path / "prompts.jsonl", [
        {"id": "calm", "prompt": "a calm lake", "seed": 1, **size},
        {"id": "boom", "prompt": "boom", **size},
        {"id": "bad", "prompt": "wrong size", **size, "width": 50},
        {"id": "flaky", "prompt": "a flaky render", **size},
        {"id": "i2v", "prompt": "red start", "image": "first.png", **size},
    ])
    out = tmp_path / "out"

    state = run_batch(fake_artifact, prompts, out)
    assert state.is_failed()
    assert state.message == "3 rendered, 0 skipped (already catalogued), 1 failed, 1 rows rejected"
    summary = state.result(raise_on_failure=False)
    assert summary["rejected"] == ["row 3 (bad): width must be a multiple of 32, got 50"]
    assert ATTEMPTS["boom"] == 2 and ATTEMPTS["a flaky render"] == 2  # one retry each
    assert render_module.loaded_pipelines() == 1  # one pipeline for the whole process

    catalog = {row["id"]: row for row in read_catalog(out).to_pylist()}
    assert sorted(catalog) == ["boom", "calm", "flaky", "i2v"]
    assert catalog["boom"]["status"] == "failed"
    assert catalog["boom"]["error"] == "RuntimeError: scripted failure for 'boom'"
    # a failed attempt is measured too: an out-of-memory render's peak is what its row is for
    assert catalog["boom"]["render_seconds"] >= 0 and catalog["boom"]["peak_memory_kind"] == "cpu_rss"
    assert catalog["boom"]["peak_memory_bytes"] > 10 * 2**20
    for name in ("calm", "flaky", "i2v"):
        row = catalog[name]
        assert row["status"] == "rendered" and row["error"] is None
        info = probe_mp4(row["output_path"])
        assert (info.frames, info.width, info.height, info.audio_codec) == (9, 64, 32, "aac")
        assert row["duration_s"] == pytest.approx(9 / 8) and row["render_seconds"] > 0
        assert row["peak_memory_bytes"] > 10 * 2**20  # peak RSS of this process
        assert row["peak_memory_kind"] == "cpu_rss"
        assert row["flow_run_id"] == str(state.state_details.flow_run_id)
        assert len(row["artifact_id"]) == 64 and row["sha256"] and row["contact_sheet"].endswith(".png")
    assert catalog["i2v"]["image"] == str((tmp_path / "first.png").resolve())

    artifacts = read_artifacts(state.state_details.flow_run_id)
    assert {"render-summary", "render-table", "render-contact-sheets", "contact-sheet-calm",
            "contact-sheet-i2v"} <= set(artifacts)
    assert "1 failed" in artifacts["render-summary"]["data"] and "row 3 (bad)" in artifacts["render-summary"]["data"]
    table = artifacts["render-table"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert {row["id"]: row["status"] for row in table} == {"calm": "rendered", "flaky": "rendered",
                                                           "i2v": "rendered", "boom": "failed"}
    assert all(row["video"].startswith("file://") for row in table if row["status"] == "rendered")
    assert artifacts["contact-sheet-calm"]["data"].startswith("file://")
    assert "data:image/jpeg;base64," in artifacts["render-contact-sheets"]["data"]

    # Rerun: done renders are skipped, the failed one is tried again and catalogued again.
    calm_before = (out / catalog["calm"]["output_path"]).read_bytes()
    state = run_batch(fake_artifact, prompts, out)
    assert state.message == "0 rendered, 3 skipped (already catalogued), 1 failed, 1 rows rejected"
    assert len(read_catalog(out)) == 5

    # An output that no longer matches its catalogued hash is rendered again, identically.
    (out / catalog["calm"]["output_path"]).write_bytes(b"damaged")
    state = run_batch(fake_artifact, prompts, out)
    assert state.message.startswith("1 rendered, 2 skipped")
    assert (out / catalog["calm"]["output_path"]).read_bytes() == calm_before


def test_a_clean_batch_completes_and_a_new_artifact_renders_again(tmp_path, fake_artifact):
    render_module.clear_pipeline_cache()
    prompts = write_prompts(tmp_path / "p.jsonl", [
        {"prompt": "one", "width": 32, "height": 32, "frames": 9, "steps": 1},
        {"prompt": "two", "width": 32, "height": 32, "frames": 9, "steps": 1},
    ])
    state = run_batch(fake_artifact, prompts, tmp_path / "out")
    assert state.is_completed()
    assert state.message == "2 rendered, 0 skipped (already catalogued), 0 failed, 0 rows rejected"
    (fake_artifact / "manifest.json").write_text(json.dumps({"format": "scripted", "version": 2}))
    assert run_batch(fake_artifact, prompts, tmp_path / "out").message.startswith("2 rendered, 0 skipped")
    rows = read_catalog(tmp_path / "out").to_pylist()
    assert len({row["artifact_id"] for row in rows}) == 2 and len({row["output_path"] for row in rows}) == 4


def test_missing_manifest_and_unimportable_factory_are_named(tmp_path):
    from hlwq.quant.errors import ArtifactError, InvalidOptionError

    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "one", "width": 32, "height": 32, "frames": 9}])
    with pytest.raises(ArtifactError, match="no manifest.json"):
        run_batch(tmp_path, prompts, tmp_path / "out").result()
    with pytest.raises(InvalidOptionError, match="cannot be imported"):
        render_module.resolve_factory("no_such_module_xyz:load")


def test_offload_tiling_and_dtype_reach_the_pipeline_factory(tmp_path, fake_artifact):
    from hlwq.quant.errors import InvalidOptionError

    render_module.clear_pipeline_cache()
    PLACEMENTS.clear()
    prompts = write_prompts(tmp_path / "p.jsonl", [
        {"prompt": "one", "width": 32, "height": 32, "frames": 9, "steps": 1}])
    state = run_batch(fake_artifact, prompts, tmp_path / "out", device="cpu", offload="group",
                      vae_tiling=True, dtype="bfloat16")
    assert state.is_completed()
    # auto offload plans for the batch's render shapes: the factory is given them
    assert PLACEMENTS == [{"device": "cpu", "dtype": torch.bfloat16, "offload": "group",
                           "vae_tiling": True, "verify": False, "render_shapes": [
                               RenderShape(width=32, height=32, frames=9, fps=24.0)]}]
    with pytest.raises(InvalidOptionError, match="--offload 'disk'"):
        run_batch(fake_artifact, prompts, tmp_path / "out2", offload="disk").result()


def tiny_fixture_factory(artifact, device, dtype, **placement):
    """The real diffusers LTX-2.3 pipeline of the tiny fixture (unquantized)."""
    from hlwq.testing.fixtures import load_tiny_pipeline

    pipeline = load_tiny_pipeline(artifact, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.slow
def test_real_tiny_pipeline_writes_video_with_its_audio(tmp_path):
    """Text- and image-to-video through diffusers' LTX-2 pipelines: frames, audio and its rate."""
    from hlwq.testing.fixtures import make_tiny_ltx23

    render_module.clear_pipeline_cache()
    model = make_tiny_ltx23(tmp_path / "tiny")
    (model / "manifest.json").write_text("{}")  # stands in for an artifact's manifest
    Image.new("RGB", (32, 32), (0, 200, 0)).save(tmp_path / "start.png")
    size = {"width": 32, "height": 32, "frames": 9, "fps": 24, "steps": 2, "guidance": 1.0}
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": "t2v", "prompt": "a red fox", **size},
                                                   {"id": "i2v", "prompt": "a green field", **size,
                                                    "image": "start.png"}])
    from hlwq.flows.render_flow import render_batch

    state = render_batch(str(model), str(prompts), str(tmp_path / "out"), device="cpu", retries=0,
                         pipeline_factory=f"{__name__}:tiny_fixture_factory", verify=False,
                         return_state=True)
    assert state.is_completed(), state.message
    assert render_module.loaded_pipelines() == 1  # image-to-video reuses the loaded modules
    for row in read_catalog(tmp_path / "out").to_pylist():
        info = probe_mp4(row["output_path"])
        assert (info.frames, info.width, info.height, info.fps) == (9, 32, 32, 24.0)
        assert (info.audio_codec, info.audio_channels, info.audio_sample_rate) == ("aac", 2, 48000)
        assert info.audio_samples >= 0.3 * 48000  # the vocoder's 9/24 s of sound


def test_one_verify_per_batch_and_no_retry_of_a_typed_error(tmp_path, fake_artifact, monkeypatch):
    from hlwq.flows import render_flow

    render_module.clear_pipeline_cache()
    ATTEMPTS.clear()
    verified = []
    monkeypatch.setattr(render_flow, "verify_or_raise", verified.append)
    size = {"width": 32, "height": 32, "frames": 9, "steps": 1}
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "one", **size}, {"prompt": "two", **size},
                                                   {"prompt": "a typed one", **size}])
    state = run_batch(fake_artifact, prompts, tmp_path / "out", verify=True)
    assert state.message == "2 rendered, 0 skipped (already catalogued), 1 failed, 0 rows rejected"
    assert verified == [str(fake_artifact)]            # once, not per render
    assert ATTEMPTS["a typed one"] == 1                  # retries=1, but bad data stays bad
    assert ATTEMPTS["one"] == 1 and ATTEMPTS["two"] == 1
