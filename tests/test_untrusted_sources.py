"""What enters an artifact from an untrusted source: regular files inside it, never a link
out, never a pickle, no local path; a component that vanishes fails the run."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest
import torch
from artifact_helpers import make_diffusers_source, package_source, quantize_source
from hub_server import LocalHub

from hlwq.quant.errors import CorruptCheckpointError, SourceError, UnsafeSourceError
from hlwq.store.artifact import MANIFEST_NAME, verify_artifact
from hlwq.store.inventory import build_inventory
from hlwq.store.package import package_artifact
from hlwq.store.safetensors_io import iter_safetensors_files
from hlwq.tasks.sources import fetch_source

TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"


@pytest.fixture
def source(tmp_path):
    return make_diffusers_source(tmp_path / "src")


@pytest.fixture
def secret(tmp_path):
    outside = tmp_path / "outside" / "secret.txt"
    outside.parent.mkdir()
    outside.write_text("not the source's\n")
    return outside


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with LocalHub() as local_hub:
        local_hub.use(monkeypatch, tmp_path / "hf-home")
        yield local_hub


def files_of(directory):
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


# ---- links ------------------------------------------------------------------------------------


def test_a_link_out_of_the_source_is_refused_naming_link_and_target(source, secret):
    (source / "tokenizer").mkdir()
    os.symlink(secret, source / "tokenizer" / "extra.txt")
    with pytest.raises(UnsafeSourceError, match=rf"^tokenizer/extra\.txt: link to {secret}, "
                                                r"outside the source"):
        fetch_source(source)
    with pytest.raises(UnsafeSourceError, match=r"tokenizer/extra\.txt: link to"):
        list(iter_safetensors_files(source))


def test_a_component_folder_linked_from_elsewhere_is_refused(source, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (source / "vae").rename(elsewhere)
    os.symlink(elsewhere, source / "vae")
    with pytest.raises(UnsafeSourceError, match=rf"^vae: link to {elsewhere}, outside"):
        fetch_source(source)
    with pytest.raises(UnsafeSourceError, match=r"^vae: link to"):
        build_inventory(source, "ltx23")


def test_links_inside_the_source_are_followed_and_loops_refused(source):
    (source / "docs").mkdir()
    (source / "docs" / "notes.txt").write_text("notes\n")
    os.symlink("../docs/notes.txt", source / "vae" / "notes.txt")
    assert "vae/notes.txt" in [f["path"] for f in fetch_source(source).lineage["files"]]
    os.symlink("..", source / "docs" / "up")
    with pytest.raises(UnsafeSourceError, match=r"^docs/up: link to .* loops back"):
        fetch_source(source)


def test_only_a_hub_cache_snapshot_may_link_into_blobs(tmp_path):
    fake = tmp_path / "not-a-cache"
    source = make_diffusers_source(fake / "snapshots" / "abc")
    (fake / "blobs").mkdir()
    (fake / "blobs" / "secret").write_text("secret\n")
    os.symlink(fake / "blobs" / "secret", source / "vae" / "notes.txt")
    with pytest.raises(UnsafeSourceError, match=r"^vae/notes\.txt: link to .*/blobs/secret"):
        fetch_source(source)


def test_special_files_are_refused(source):
    os.mkfifo(source / "vae" / "pipe")
    with pytest.raises(UnsafeSourceError, match=r"^vae/pipe: a named pipe, not a regular file"):
        fetch_source(source)


def test_a_single_file_source_given_as_a_link_is_refused(source, tmp_path):
    link = tmp_path / "model.safetensors"
    os.symlink(source / TRANSFORMER, link)
    with pytest.raises(SourceError, match=r"must be the file itself, not a link"):
        fetch_source(link)


def test_packaging_refuses_a_link_planted_after_the_fetch(source, secret, tmp_path):
    (tmp_path / "staging").mkdir()
    fetched, inventory, staged, _ = quantize_source(source, tmp_path / "staging")
    (source / "vae" / "config.json").unlink()
    os.symlink(secret, source / "vae" / "config.json")
    with pytest.raises(UnsafeSourceError, match=rf"^vae/config\.json: link to {secret}"):
        package_artifact(fetched.root, inventory, staged, tmp_path / "art",
                         lineage=fetched.lineage)
    assert not (tmp_path / "art").exists()


def test_carried_files_are_read_only_links_into_the_source(source, tmp_path):
    (tmp_path / "staging").mkdir()
    art = package_source(source, tmp_path / "art", tmp_path / "staging")
    for carried in ("model_index.json", "vae/config.json", VAE):
        target = art / carried
        assert os.path.samefile(target, source / carried)
        assert stat.S_IMODE(target.stat().st_mode) & 0o222 == 0, carried
    assert stat.S_IMODE((art / TRANSFORMER).stat().st_mode) & 0o200     # written, not carried
    assert verify_artifact(art) == []


# ---- pickles ----------------------------------------------------------------------------------


def test_pickles_never_enter_the_artifact(source, tmp_path):
    torch.save({"w": torch.zeros(2)}, source / "transformer" / "diffusion_pytorch_model.bin")
    (source / "vae" / "extra.dat").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    names = [f["path"] for f in fetch_source(source).lineage["files"]]
    assert "transformer/diffusion_pytorch_model.bin" not in names
    assert "vae/extra.dat" not in names                         # a pickle by its content
    (tmp_path / "staging").mkdir()
    art = package_source(source, tmp_path / "art", tmp_path / "staging")
    assert not {"transformer/diffusion_pytorch_model.bin", "vae/extra.dat"} & set(files_of(art))


def test_a_component_with_only_pickled_weights_is_refused(source):
    (source / VAE).unlink()
    torch.save({"decoder.conv_in.weight": torch.zeros(2)},
               source / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeSourceError, match=r"vae/diffusion_pytorch_model\.bin is a pickle "
                                                r"and its folder holds no \.safetensors"):
        fetch_source(source)


def test_the_hub_never_sends_a_pickle(hub, source, tmp_path):
    torch.save({"w": torch.zeros(2)}, source / "transformer" / "diffusion_pytorch_model.bin")
    sha = hub.add_repo("acme/pickled", source)
    fetched = fetch_source("acme/pickled")
    assert "transformer/diffusion_pytorch_model.bin" not in [
        f["path"] for f in fetched.lineage["files"]]
    assert not [r for r in hub.requests if r.path.endswith(".bin")]
    assert not (fetched.root / "transformer" / "diffusion_pytorch_model.bin").exists()
    # A cache snapshot's files are links into the repo's blobs/: they may be read and carried.
    assert (fetched.root / TRANSFORMER).is_symlink()
    (tmp_path / "staging").mkdir()
    art = package_source(fetched.root, tmp_path / "art", tmp_path / "staging")
    assert verify_artifact(art) == []
    assert json.loads((art / MANIFEST_NAME).read_text())["source"]["source"] == (
        f"acme/pickled@{sha}")

    (source / VAE).unlink()
    torch.save({"w": torch.zeros(2)}, source / "vae" / "diffusion_pytorch_model.bin")
    hub.add_repo("acme/pickle-only", source)
    before = len(hub.requests)
    with pytest.raises(UnsafeSourceError, match=r"Hub repo acme/pickle-only@main: "
                                                r"vae/diffusion_pytorch_model\.bin is a pickle"):
        fetch_source("acme/pickle-only")
    assert not [r for r in hub.requests[before:] if "/resolve/" in r.path]


def test_every_from_pretrained_asks_for_safetensors():
    """No weight load can fall back to a pickle (diffusers and transformers would, without
    use_safetensors=True, when a folder holds only .bin weights)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    calls = []
    for folder in ("runtime", "tasks", "store", "flows", "cli", "testing", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "from_pretrained"):
                    owner = ast.unparse(node.func.value)
                    if owner.endswith(("Scheduler", "AutoTokenizer", "AutoConfig")):
                        continue            # configs and tokenizers: no weights to load
                    keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    calls.append((f"{path.relative_to(root)}:{node.lineno}",
                                  keywords.get("use_safetensors")))
    assert calls and [c for c in calls if c[1] != "True"] == []


# ---- components that vanish -------------------------------------------------------------------


def test_an_index_naming_shards_elsewhere_is_refused(source, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (source / TRANSFORMER).rename(elsewhere / "weights.safetensors")
    index = {"metadata": {}, "weight_map": {"proj_out.bias": "../../elsewhere/weights.safetensors"}}
    (source / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=r"lists shard '\.\./\.\./elsewhere/weights"
                                                     r"\.safetensors', which is not a file name "
                                                     r"in the index's own folder"):
        build_inventory(source, "ltx23")


def test_a_model_component_without_tensors_fails_naming_it(source):
    fetched = fetch_source(source, ignore_patterns=[TRANSFORMER])
    files = [f["path"] for f in fetched.lineage["files"]]
    with pytest.raises(SourceError, match=r"^component 'transformer': model_index\.json lists "
                                          r"it and it has a config\.json, but none of its files "
                                          r"holds safetensors weights"):
        build_inventory(fetched.root, "ltx23", files=files)


# ---- no local paths ---------------------------------------------------------------------------


def test_the_artifact_does_not_depend_on_where_it_was_written(tmp_path):
    built = []
    for place in ("one", "two/deeper"):
        base = tmp_path / place
        source = make_diffusers_source(base / "src")
        (base / "staging").mkdir()
        built.append(package_source(source, base / "out" / "art", base / "staging"))
    first, second = built
    manifest = (first / MANIFEST_NAME).read_text()
    assert manifest == (second / MANIFEST_NAME).read_text()
    assert json.loads(manifest)["source"]["source"] == "src"
    for art in built:
        for name in files_of(art):
            assert str(tmp_path).encode() not in (art / name).read_bytes(), name
