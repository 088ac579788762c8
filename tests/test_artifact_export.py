"""export-dequantized: quantize -> package -> export equals `dequantize` of each tensor."""

import json
import os

import pytest
import torch
from artifact_helpers import (
    SINGLE_FILE_CONFIG,
    SINGLE_FILE_NAME,
    make_diffusers_source,
    make_single_file_source,
    package_source,
)
from click.testing import CliRunner
from safetensors import safe_open

from hlwq.cli.commands.artifact import export_dequantized as export_command
from hlwq.quant.core import dequantize
from hlwq.store.artifact import open_artifact
from hlwq.store.export import export_dequantized
from hlwq.store.safetensors_io import read_header


def _assert_export_matches(artifact_dir, exported_file, artifact_file_prefix):
    """Every tensor of ``exported_file`` equals dequantize (or the kept bytes) of its entry."""
    artifact = open_artifact(artifact_dir)
    entries = {e.name: e for e in artifact.tensor_entries.values()
               if e.file.startswith(artifact_file_prefix)}
    with safe_open(exported_file, "pt") as exported:
        names = set(exported.keys())
        for name in names:
            entry = entries[name]
            tensor = exported.get_tensor(name)
            if entry.quantized:
                expected = dequantize(artifact.load_packed(entry.key), dtype=torch.bfloat16)
            else:
                expected = artifact.load_kept(entry.key)
            assert tensor.dtype == expected.dtype and tensor.shape == expected.shape
            assert torch.equal(tensor.view(torch.uint8), expected.view(torch.uint8)), name
    return names


def test_export_diffusers_equals_dequantize(tmp_path):
    source = make_diffusers_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    art = package_source(source, tmp_path / "art", tmp_path / "staging")
    result = CliRunner().invoke(export_command, [str(art), str(tmp_path / "bf16")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "bf16"
    shard = out / "transformer/diffusion_pytorch_model.safetensors"
    names = _assert_export_matches(art, shard, "transformer/")
    original = read_header(source / "transformer/diffusion_pytorch_model.safetensors")
    assert names == set(original.tensors)            # the source's names, no .codes
    assert read_header(shard).metadata == {"format": "pt"}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors"]
    assert os.path.samefile(out / "vae/diffusion_pytorch_model.safetensors",
                            art / "vae/diffusion_pytorch_model.safetensors")


def test_export_shards_at_the_size_limit(tmp_path):
    source = make_diffusers_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    art = package_source(source, tmp_path / "art", tmp_path / "staging")
    export_dequantized(art, tmp_path / "bf16", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "bf16/transformer/diffusion_pytorch_model.safetensors.index.json")
                       .read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert all(read_header(tmp_path / "bf16/transformer" / s) for s in shards)


def test_export_single_file_layout_is_one_file_with_config(tmp_path):
    source = make_single_file_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    art = package_source(source, tmp_path / "art", tmp_path / "staging", max_shard_bytes=20_000)
    assert len(list(art.glob("ltx-2.3-tiny-dev-*.safetensors"))) > 1   # sharded artifact ...
    export_dequantized(art, tmp_path / "bf16", max_shard_bytes=20_000)
    exported = tmp_path / "bf16" / SINGLE_FILE_NAME                     # ... one exported file
    assert read_header(exported).metadata == {"config": SINGLE_FILE_CONFIG}
    assert not list((tmp_path / "bf16").glob("*.index.json"))
    names = _assert_export_matches(art, exported, "ltx-2.3-tiny-dev")
    assert names == set(read_header(source / SINGLE_FILE_NAME).tensors)
    assert (tmp_path / "bf16/ltx-2.3-spatial-upscaler-x2.safetensors").is_file()


def test_export_refuses_an_unsound_artifact(tmp_path):
    from hlwq.quant.errors import ArtifactError

    source = make_diffusers_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    art = package_source(source, tmp_path / "art", tmp_path / "staging")
    (art / "transformer/config.json").unlink()
    (art / "transformer/config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="transformer/config.json"):
        export_dequantized(art, tmp_path / "bf16")
    assert not (tmp_path / "bf16").exists()
