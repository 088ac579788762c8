"""The LTX-2.3 fixtures: tiny pipeline (both layouts), real-width transformer, real layout rows."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from hlwq.quant.errors import CorruptCheckpointError, InvalidOptionError, SourceError
from hlwq.quant.sizes import packed_nbytes
from hlwq.runtime.ltx23_models import (
    build_model,
    checkpoint_tensors,
    load_ltx23_pipeline,
    load_single_file,
    ltx23_22b_package_rows,
)
from hlwq.store.ltx23_config import (
    BLOCK_LINEAR_PATTERN,
    LTX23_TRANSFORMER,
    SINGLE_FILE_COMPONENTS,
    diffusers_to_official_key,
    official_to_diffusers_key,
    real_config,
    real_width_transformer_config,
    tiny_config,
)
from hlwq.testing import fixtures
from hlwq.testing.fixtures import (
    SINGLE_FILE_NAME,
    TensorSpec,
    load_tiny_pipeline,
    load_tiny_upsampler,
    make_tiny_ltx23,
    make_transformer_checkpoint,
    synthetic_tensor,
    tensor_kind,
)

RENDER = {"prompt": "a red fox runs through fresh snow", "negative_prompt": "", "num_frames": 9,
          "height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 1.0, "stg_scale": 0.0,
          "audio_stg_scale": 0.0, "modality_scale": 1.0, "audio_modality_scale": 1.0,
          "audio_guidance_scale": 1.0, "max_sequence_length": 128, "output_type": "pt"}
OFFICIAL_PREFIXES = ("model.diffusion_model.", "text_embedding_projection.", "vae.",
                     "audio_vae.", "vocoder.")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine run far faster without OpenMP thread contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_ltx23(tmp_path_factory.mktemp("tiny") / "ltx23")


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory):
    return make_tiny_ltx23(tmp_path_factory.mktemp("tiny") / "ltx23-single", single_file=True)


def render(pipe, seed=0):
    with torch.no_grad():
        return pipe(**RENDER, generator=torch.Generator().manual_seed(seed))


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach() for name, tensor in checkpoint_tensors(model)}


# --------------------------------------------------------------------------- tiny pipeline


def test_tiny_pipeline_loads_with_from_pretrained_and_renders(tiny_dir):
    from diffusers import LTX2Pipeline
    from diffusers.pipelines.ltx2 import LTX2VocoderWithBWE

    pipe = LTX2Pipeline.from_pretrained(tiny_dir, dtype=torch.float32, use_safetensors=True)
    assert isinstance(pipe.vocoder, LTX2VocoderWithBWE)
    started = time.perf_counter()
    output = render(pipe)
    assert time.perf_counter() - started < 30
    assert output.frames.shape == (1, 9, 3, 32, 32)
    assert torch.isfinite(output.frames).all() and output.frames.std() > 0.01
    audio = output.audio
    assert audio.shape[:2] == (1, 2) and audio.shape[2] > 0
    assert torch.isfinite(audio).all() and 0 < audio.std() < 0.5   # sound, not clipped noise


def test_tiny_keeps_the_real_flags_and_128_multiple_block_linears(tiny_dir):
    config = json.loads((tiny_dir / "transformer" / "config.json").read_text())
    shrunk = {"num_layers", "num_attention_heads", "attention_head_dim", "cross_attention_dim",
              "audio_num_attention_heads", "audio_attention_head_dim",
              "audio_cross_attention_dim", "audio_in_channels", "audio_out_channels",
              "caption_channels"}
    for key, value in LTX23_TRANSFORMER.items():
        if key not in shrunk:
            assert config[key] == (list(value) if isinstance(value, tuple) else value), key
    assert config["gated_attn"] and config["cross_attn_mod"] and config["perturbed_attn"]
    model = build_model("transformer", config, device="meta")
    linears = [(name, t.shape) for name, t in checkpoint_tensors(model)
               if BLOCK_LINEAR_PATTERN.match(name)]
    assert len(linears) == 28 * config["num_layers"]
    assert all(shape[1] % 128 == 0 for _, shape in linears), linears


def test_tiny_weights_are_bf16(tiny_dir):
    with safe_open(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {"BF16"}


def test_single_file_has_the_official_prefixes_and_config_metadata(single_dir):
    with safe_open(single_dir / SINGLE_FILE_NAME, "pt") as handle:
        names = list(handle.keys())
        metadata = handle.metadata()
    assert all(name.startswith(OFFICIAL_PREFIXES) for name in names)
    assert {prefix for prefix in OFFICIAL_PREFIXES
            if any(name.startswith(prefix) for name in names)} == set(OFFICIAL_PREFIXES)
    assert "model.diffusion_model.transformer_blocks.0.attn1.q_norm.weight" in names
    assert "model.diffusion_model.video_embeddings_connector.learnable_registers" in names
    assert "vocoder.bwe_generator.conv_pre.weight" in names
    config = json.loads(metadata["config"])
    assert set(config) == set(SINGLE_FILE_COMPONENTS)
    assert config["transformer"]["_class_name"] == "LTX2VideoTransformer3DModel"
    assert config["transformer"]["gated_attn"] is True
    assert sorted(p.name for p in single_dir.iterdir() if p.is_dir()) == [
        "scheduler", "text_encoder", "tokenizer"]


def test_single_file_round_trips_to_the_diffusers_state_dicts(tiny_dir, single_dir):
    from diffusers import LTX2Pipeline

    folder = LTX2Pipeline.from_pretrained(tiny_dir, dtype=torch.bfloat16, use_safetensors=True)
    loaded = load_single_file(single_dir / SINGLE_FILE_NAME, dtype=torch.bfloat16)
    for component in SINGLE_FILE_COMPONENTS:
        expected, got = state(getattr(folder, component)), state(loaded[component])
        assert got.keys() == expected.keys(), component
        assert all(torch.equal(got[k], expected[k]) for k in expected), component
    upsamplers = [load_tiny_upsampler(d, dtype=torch.bfloat16) for d in (tiny_dir, single_dir)]
    expected, got = state(upsamplers[0]), state(upsamplers[1])
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with torch.no_grad():   # 2 latent frames of 1x1 (a 9-frame 32x32 clip) -> 2x2
        upscaled = upsamplers[1].float()(torch.randn(1, 128, 2, 1, 1))
    assert upscaled.shape == (1, 128, 2, 2, 2) and torch.isfinite(upscaled).all()


def test_single_file_pipeline_renders_what_the_folder_renders(tiny_dir, single_dir):
    a = render(load_tiny_pipeline(tiny_dir))
    b = render(load_tiny_pipeline(single_dir))
    assert torch.equal(a.frames, b.frames) and torch.equal(a.audio, b.audio)


def test_rebuilding_reuses_the_output_and_refuses_foreign_directories(tiny_dir, tmp_path):
    marker = tiny_dir / fixtures.MARKER_FILE
    before = marker.stat().st_mtime_ns
    assert make_tiny_ltx23(tiny_dir) == tiny_dir
    assert marker.stat().st_mtime_ns == before
    with pytest.raises(InvalidOptionError, match="different fixture"):
        make_tiny_ltx23(tiny_dir, seed=1)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InvalidOptionError, match=str(tmp_path)):
        make_tiny_ltx23(tmp_path)


# --------------------------------------------------------------------------- names and layout


@pytest.mark.parametrize("component", SINGLE_FILE_COMPONENTS)
def test_official_names_round_trip_on_the_real_models(component):
    model = build_model(component, real_config(component), device="meta")
    for name, _ in checkpoint_tensors(model):
        official = diffusers_to_official_key(component, name)
        assert official.startswith(OFFICIAL_PREFIXES)
        assert official_to_diffusers_key(official) == (component, name)


def test_official_names_agree_with_diffusers_converters_but_for_ltx23_additions():
    """diffusers 0.42.1's single-file converters match ours except the renames LTX-2.3 added."""
    from diffusers.loaders import single_file_utils as sfu

    converters = {"transformer": sfu.convert_ltx2_transformer_to_diffusers,
                  "vae": sfu.convert_ltx2_vae_to_diffusers,
                  "audio_vae": sfu.convert_ltx2_audio_vae_to_diffusers}
    disagreeing = {}
    for component, convert in converters.items():
        model = build_model(component, real_config(component), device="meta")
        names = [name for name, _ in checkpoint_tensors(model)]
        theirs = convert({diffusers_to_official_key(component, n): i for i, n in enumerate(names)})
        by_index = {index: name for name, index in theirs.items()}
        disagreeing[component] = {n for i, n in enumerate(names) if by_index[i] != n}
    assert all(n.startswith(("prompt_adaln.", "audio_prompt_adaln."))
               for n in disagreeing["transformer"]) and len(disagreeing["transformer"]) == 12
    assert all(n.startswith(("decoder.up_blocks.3.",)) for n in disagreeing["vae"])
    assert disagreeing["audio_vae"] == set()


def test_real_package_rows():
    started = time.perf_counter()
    rows = ltx23_22b_package_rows()
    assert time.perf_counter() - started < 20
    by_component: dict[str, list] = {}
    for row in rows:
        by_component.setdefault(row["component"], []).append(row)
    counts = {c: (len(r), sum(math.prod(x["shape"]) for x in r)) for c, r in by_component.items()}
    assert counts["transformer"] == (4186, 18_988_838_144)
    assert counts["connectors"] == (262, 3_172_227_584)
    assert counts["text_encoder"] == (1065, 12_187_325_040)
    assert set(counts) == {"transformer", "connectors", "vae", "audio_vae", "vocoder",
                           "latent_upsampler", "text_encoder"}
    linears = [r for r in by_component["transformer"] if BLOCK_LINEAR_PATTERN.match(r["tensor"])]
    assert len(linears) == 1344
    assert all(r["shape"][1] % 128 == 0 and r["dtype"] == "BF16" for r in linears)
    assert 18.4e9 < sum(math.prod(r["shape"]) for r in linears) < 18.6e9
    assert 11.8e9 < sum(packed_nbytes(r["shape"], 5) for r in linears) < 12.0e9


# --------------------------------------------------------------------------- synthetic weights


def test_synthetic_weights_are_seeded_heavy_tailed_with_outlier_columns():
    spec = TensorSpec("transformer/transformer_blocks.0.ff.net.0.proj.weight", "w", (512, 4096),
                      "linear")
    weight = synthetic_tensor(spec, seed=0)
    assert torch.equal(weight, synthetic_tensor(spec, seed=0))
    assert not torch.equal(weight, synthetic_tensor(spec, seed=1))
    w = weight.double()
    assert w.std().item() == pytest.approx(1 / math.sqrt(4096), rel=0.05)
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert kurtosis > 5                      # Gaussian: 3; Student-t(5): 9
    column_rms = w.square().mean(0).sqrt().sort(descending=True).values
    median = column_rms.median()
    assert (column_rms > 4 * median).sum() == 4096 // 512   # the outlier input channels
    assert column_rms[4096 // 512] < 2 * median


def test_tensor_kinds_of_the_real_transformer():
    model = build_model("transformer", real_width_transformer_config(1), device="meta")
    tensors = dict(checkpoint_tensors(model))

    def kind(name):
        return tensor_kind(model, name, tensors[name])

    assert kind("transformer_blocks.0.attn1.to_q.weight") == "linear"
    assert kind("transformer_blocks.0.attn1.to_q.bias") == "bias"
    assert kind("transformer_blocks.0.attn1.norm_q.weight") == "norm"
    assert kind("transformer_blocks.0.scale_shift_table") == "table"
    assert {kind(name) for name in tensors} <= {"linear", "bias", "norm", "table"}


# --------------------------------------------------------------------------- real-width writer


def test_real_width_transformer_config_on_meta():
    model = build_model("transformer", real_width_transformer_config(2), device="meta")
    shapes = {name: tuple(t.shape) for name, t in checkpoint_tensors(model)
              if BLOCK_LINEAR_PATTERN.match(name)}
    assert len(shapes) == 56
    assert shapes["transformer_blocks.1.attn1.to_q.weight"] == (4096, 4096)
    assert shapes["transformer_blocks.1.ff.net.0.proj.weight"] == (16384, 4096)
    assert shapes["transformer_blocks.1.audio_ff.net.2.weight"] == (2048, 8192)
    assert shapes["transformer_blocks.1.audio_to_video_attn.to_k.weight"] == (2048, 2048)
    with pytest.raises(InvalidOptionError, match="layers=0"):
        real_width_transformer_config(0)


def _small_transformer():
    return {**tiny_config("transformer"), "num_layers": 1}


def test_transformer_checkpoint_is_sharded_loadable_and_reused(tmp_path):
    from diffusers import LTX2VideoTransformer3DModel

    out = make_transformer_checkpoint(tmp_path / "t", _small_transformer(), seed=3,
                                      shard_bytes=1_000_000)
    folder = out / "transformer"
    shards = sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert json.loads((out / "model_index.json").read_text())["transformer"] == [
        "diffusers", "LTX2VideoTransformer3DModel"]
    model = LTX2VideoTransformer3DModel.from_pretrained(folder, dtype=torch.bfloat16,
                                                        use_safetensors=True)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for _, t in
                                                  checkpoint_tensors(model))
    for name, tensor in checkpoint_tensors(model):
        spec = TensorSpec(f"transformer/{name}", name, tuple(tensor.shape),
                          tensor_kind(model, name, tensor))
        assert torch.equal(tensor, synthetic_tensor(spec, 3).to(torch.bfloat16)), name
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert make_transformer_checkpoint(out, _small_transformer(), seed=3,
                                       shard_bytes=1_000_000) == out
    assert [p.stat().st_mtime_ns for p in shards] == stamps


def test_transformer_checkpoint_resumes_after_an_interruption(tmp_path, monkeypatch):
    real_chunks = fixtures.synthetic_chunks
    calls = []

    def failing_chunks(spec, seed):
        calls.append(spec.name)
        if len(calls) == 60:
            raise KeyboardInterrupt
        return real_chunks(spec, seed)

    monkeypatch.setattr(fixtures, "synthetic_chunks", failing_chunks)
    with pytest.raises(KeyboardInterrupt):
        make_transformer_checkpoint(tmp_path / "t", _small_transformer(), shard_bytes=1_000_000)
    partial = tmp_path / ".t.partial" / "transformer"
    done = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.safetensors")}
    assert done and not (tmp_path / "t").exists()
    monkeypatch.setattr(fixtures, "synthetic_chunks", real_chunks)
    out = make_transformer_checkpoint(tmp_path / "t", _small_transformer(), shard_bytes=1_000_000)
    assert {name: (out / "transformer" / name).stat().st_mtime_ns for name in done} == done
    fresh = make_transformer_checkpoint(tmp_path / "fresh", _small_transformer(),
                                        shard_bytes=1_000_000)
    for shard in (fresh / "transformer").glob("*.safetensors"):
        assert (out / "transformer" / shard.name).read_bytes() == shard.read_bytes()


# --------------------------------------------------------------------------- bad input and CLI


def test_bad_inputs(tmp_path):
    with pytest.raises(InvalidOptionError, match="not an official LTX-2.3 name"):
        official_to_diffusers_key("model.layers.0.weight")
    with pytest.raises(InvalidOptionError, match="text_encoder"):
        diffusers_to_official_key("text_encoder", "model.embed_tokens.weight")
    with pytest.raises(InvalidOptionError, match="shard_bytes=0"):
        make_transformer_checkpoint(tmp_path / "t", _small_transformer(), shard_bytes=0)
    with pytest.raises(SourceError, match="not a directory"):
        load_ltx23_pipeline(tmp_path / "missing")
    with pytest.raises(SourceError, match="neither model_index.json"):
        load_ltx23_pipeline(tmp_path)
    from safetensors.torch import save_file

    bare = tmp_path / "ltx-2.3-bare.safetensors"
    save_file({"vae.latents": torch.zeros(2)}, bare)
    with pytest.raises(CorruptCheckpointError, match="no 'config' key"):
        load_single_file(bare)
    garbage = tmp_path / "ltx-2.3-garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptCheckpointError, match="ltx-2.3-garbage"):
        load_single_file(garbage)


def test_cli_fixture_commands(tmp_path, monkeypatch):
    from hlwq.cli.main import cli

    runner = CliRunner()
    result = runner.invoke(cli, ["fixture", "ltx23-tiny", str(tmp_path / "tiny"), "--single-file",
                                 "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny" / SINGLE_FILE_NAME).is_file() and "files" in result.output
    # the real-width command, shrunk so the test writes megabytes rather than gigabytes
    monkeypatch.setattr(fixtures, "real_width_transformer_config",
                        lambda layers: {**tiny_config("transformer"), "num_layers": layers})
    result = runner.invoke(cli, ["fixture", "ltx23-transformer", str(tmp_path / "t"),
                                 "--layers", "1", "--shard-mb", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t" / "transformer" / "config.json").is_file()
    result = runner.invoke(cli, ["fixture", "ltx23-transformer", str(tmp_path / "u"),
                                 "--layers", "0"])
    assert result.exit_code == 2 and "--layers" in result.output
