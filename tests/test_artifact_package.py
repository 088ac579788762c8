"""Packaging: layout, bit-exact kept tensors, determinism, sharding, crash safety, staging."""

import json
import os
from pathlib import Path

import pytest
import torch
from artifact_helpers import (
    SINGLE_FILE_CONFIG,
    SINGLE_FILE_NAME,
    all_files,
    make_diffusers_source,
    make_single_file_source,
    package_source,
    quantize_source,
)
from safetensors import safe_open

from hlwq.quant.errors import ArtifactError
from hlwq.store.artifact import MANIFEST_NAME, open_artifact, verify_artifact
from hlwq.store.package import package_artifact
from hlwq.store.safetensors_io import read_header
from hlwq.store.staging import read_staged, write_staged


@pytest.fixture(scope="module")
def diffusers_artifact(tmp_path_factory):
    base = tmp_path_factory.mktemp("diffusers")
    source = make_diffusers_source(base / "src")
    (base / "staging").mkdir()
    return source, package_source(source, base / "art", base / "staging", mode="refined")


def test_diffusers_artifact_layout_and_manifest(diffusers_artifact):
    source, art = diffusers_artifact
    assert verify_artifact(art) == []
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    assert manifest["source"]["layout"] == "diffusers"
    assert set(manifest["files"]) == {
        "model_index.json", "README.md", "metrics.parquet", "scheduler/scheduler_config.json",
        "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    # carried files are the source's, hard-linked; the source's own README is replaced
    for carried in ("vae/diffusion_pytorch_model.safetensors", "model_index.json"):
        assert os.path.samefile(art / carried, source / carried)
    assert "HLWQ" in (art / "README.md").read_text()
    stored = read_header(art / "transformer/diffusion_pytorch_model.safetensors").tensors
    assert "transformer_blocks.0.attn1.to_q.weight.codes" in stored
    assert "transformer_blocks.0.attn1.to_q.weight" not in stored
    sizes = manifest["sizes"]["components"]["transformer"]
    assert sizes["quantized_tensors"] == 3 and sizes["packed_bytes"] < sizes["original_bytes"]
    assert manifest["validation"]["validated"] is True


def test_kept_tensors_bit_exact_and_packed_tensors_as_staged(diffusers_artifact, tmp_path):
    source, art = diffusers_artifact
    artifact = open_artifact(art)
    with safe_open(source / "transformer/diffusion_pytorch_model.safetensors", "pt") as original:
        for key, record in artifact.component_entries("transformer").items():
            if record.quantized:
                packed = artifact.load_packed(record.key)
                assert packed.shape == tuple(original.get_tensor(key).shape)
                assert packed.codes.dtype == torch.uint8 and packed.bits == 5
            else:
                kept = artifact.load_kept(record.key)
                expected = original.get_tensor(key)
                assert kept.dtype == expected.dtype
                assert torch.equal(kept.view(torch.uint8), expected.view(torch.uint8))
    # the packed parts are exactly what staging held
    staged = quantize_source(source, tmp_path / "staging", mode="refined")[2]
    for key, path in staged.items():
        _, staged_packed = read_staged(path)
        packed = artifact.load_packed(key)
        for part in ("codes", "scales", "codebook"):
            assert torch.equal(getattr(packed, part), getattr(staged_packed, part))


def test_two_packagings_are_byte_identical(tmp_path):
    source = make_diffusers_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    fetched, inventory, staged, metrics = quantize_source(source, tmp_path / "staging")
    options = {"lineage": fetched.lineage, "quantization": {"bits": 5}, "metrics": metrics,
               "remove_staged": False}
    package_artifact(fetched.root, inventory, staged, tmp_path / "a", **options)
    package_artifact(fetched.root, inventory, staged, tmp_path / "b", max_shard_bytes=5 * 10**9,
                     **options)
    assert all_files(tmp_path / "a") == all_files(tmp_path / "b")


def test_small_shards_get_an_index_and_verify(tmp_path):
    source = make_diffusers_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    art = package_source(source, tmp_path / "art", tmp_path / "staging", max_shard_bytes=12_000)
    shards = sorted(p.name for p in (art / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].endswith(f"-00001-of-{len(shards):05d}.safetensors")
    index = json.loads((art / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert verify_artifact(art) == []
    artifact = open_artifact(art)
    key = "transformer/transformer_blocks.0.ff.net.2.weight"
    assert artifact.load_packed(key).shape == (48, 384)


def test_single_file_layout_keeps_official_names_and_config(tmp_path):
    source = make_single_file_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    art = package_source(source, tmp_path / "art", tmp_path / "staging")
    assert verify_artifact(art) == []
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    assert manifest["source"]["layout"] == "ltx23-single"
    header = read_header(art / SINGLE_FILE_NAME)
    assert header.metadata["config"] == SINGLE_FILE_CONFIG
    assert "model.diffusion_model.transformer_blocks.0.attn1.to_q.weight.codes" in header.tensors
    assert "vae.decoder.conv_in.weight" in header.tensors          # kept, same file
    assert os.path.samefile(art / "ltx-2.3-spatial-upscaler-x2.safetensors",
                            source / "ltx-2.3-spatial-upscaler-x2.safetensors")


def test_staged_files_removed_after_packaging_and_missing_ones_refused(tmp_path):
    source = make_diffusers_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    fetched, inventory, staged, _ = quantize_source(source, tmp_path / "staging")
    package_artifact(fetched.root, inventory, staged, tmp_path / "art", lineage=fetched.lineage)
    assert not any(p.exists() for p in staged.values())
    with pytest.raises(ArtifactError, match="3 tensor.*have no staged result.*attn1.to_k.weight"):
        package_artifact(fetched.root, inventory, {}, tmp_path / "art2", lineage=fetched.lineage)
    assert not (tmp_path / "art2").exists()
    assert not list(tmp_path.glob(".art2.hlwq-partial-*"))


def test_staged_files_are_consumed_shard_by_shard(tmp_path, monkeypatch):
    """Disk never holds all staged results and all shards at once: each shard's staged
    inputs are gone before the next shard is written."""
    from hlwq.store import shard_writer

    source = make_diffusers_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    fetched, inventory, staged, _ = quantize_source(source, tmp_path / "staging")
    left_when_written = []
    real_write_shard = shard_writer.write_shard

    def spying_write_shard(*args, **kwargs):
        left_when_written.append(sum(Path(p).exists() for p in staged.values()))
        return real_write_shard(*args, **kwargs)

    monkeypatch.setattr(shard_writer, "write_shard", spying_write_shard)
    package_artifact(fetched.root, inventory, staged, tmp_path / "art", lineage=fetched.lineage,
                     max_shard_bytes=12_000)
    transformer_shards = left_when_written[-len(list((tmp_path / "art/transformer").glob(
        "*.safetensors"))):]
    assert len(transformer_shards) > 1
    assert transformer_shards == sorted(transformer_shards, reverse=True)
    assert transformer_shards[0] > transformer_shards[-1]
    assert verify_artifact(tmp_path / "art") == []


def test_crash_leaves_no_complete_looking_directory_and_keeps_the_old_one(tmp_path, monkeypatch):
    source = make_diffusers_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    fetched, inventory, staged, _ = quantize_source(source, tmp_path / "staging")
    options = {"lineage": fetched.lineage, "remove_staged": False}
    package_artifact(fetched.root, inventory, staged, tmp_path / "art", **options)
    before = all_files(tmp_path / "art")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hlwq.store.shard_writer.write_shard", crash)
    with pytest.raises(OSError, match="disk full"):
        package_artifact(fetched.root, inventory, staged, tmp_path / "art", **options)
    assert all_files(tmp_path / "art") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "policy.toml", "src", "staging"]


def test_staged_roundtrip_and_corrupt_staged_file(tmp_path):
    from hlwq.quant.core import quantize_tensor
    from hlwq.quant.errors import CorruptCheckpointError
    from hlwq.store.staging import is_staged, load_staged_if_valid, staged_key, staged_path

    packed = quantize_tensor(torch.randn(8, 160), bits=4, group_size=32)
    key = staged_key("sha", "transformer/w", "p", 4, 128, 32, "refined", "v1")
    assert key != staged_key("sha", "transformer/w", "p", 5, 128, 32, "refined", "v1")
    path = write_staged(tmp_path, key, "w", packed)
    assert path == staged_path(tmp_path, key) and is_staged(tmp_path, key)
    name, back = read_staged(path)
    assert name == "w" and back.shape == (8, 160) and back.group_size == 32
    assert torch.equal(back.codes, packed.codes) and torch.equal(back.scales, packed.scales)
    path.write_bytes(path.read_bytes()[:-7])        # truncated by a crash
    assert not is_staged(tmp_path, key) and load_staged_if_valid(path) is None
    with pytest.raises(CorruptCheckpointError):
        read_staged(path)


def test_packaging_replaces_an_artifact_but_not_other_directories(tmp_path):
    source = make_diffusers_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    fetched, inventory, staged, _ = quantize_source(source, tmp_path / "staging")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="other: exists and is not an HLWQ artifact"):
        package_artifact(fetched.root, inventory, staged, tmp_path / "other",
                         lineage=fetched.lineage)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
