"""Checkpoint sources: the Hub path against a local Hub server (real huggingface_hub client),
local folders and single files, lineage, and every bad input as a typed error."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from hub_server import LocalHub
from safetensors.torch import save_file

from hlwq.quant.errors import (
    AuthenticationError,
    CorruptCheckpointError,
    InvalidOptionError,
    SourceError,
)
from hlwq.store.safetensors_io import read_header
from hlwq.tasks import sources
from hlwq.tasks.sources import (
    FetchResult,
    fetch_source,
    fetch_source_task,
    latest_revision,
    list_remote_files,
    remote_safetensors_headers,
)

REPO = "acme/tiny-ltx"
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"


def make_checkpoint(directory, seed=0):
    """A small diffusers-like folder: index, two weight files, a config, a README."""
    torch.manual_seed(seed)
    (directory / "transformer").mkdir(parents=True)
    (directory / "vae").mkdir()
    save_file(
        {
            "proj_in.weight": torch.randn(64, 128),
            "blocks.0.attn.to_q.weight": torch.randn(128, 128),
        },
        directory / TRANSFORMER,
        metadata={"format": "pt"},
    )
    save_file({"decoder.conv.weight": torch.randn(8, 4, 3, 3)}, directory / VAE)
    (directory / "model_index.json").write_text(
        json.dumps({"_class_name": "LTX2Pipeline", "seed": seed})
    )
    (directory / "transformer" / "config.json").write_text('{"num_layers": 1}')
    (directory / "README.md").write_text("tiny\n")
    return directory


def sha256_of(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_tree(root, fixture, names):
    return all((root / n).read_bytes() == (fixture / n).read_bytes() for n in names)


@pytest.fixture
def fixture_dir(tmp_path):
    return make_checkpoint(tmp_path / "fixture")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with LocalHub() as local_hub:
        local_hub.use(monkeypatch, tmp_path / "hf-home")
        yield local_hub


# ---- Hub: downloads ----------------------------------------------------------------------------


def test_full_download_records_commit_and_hashes(hub, fixture_dir, tmp_path):
    sha = hub.add_repo(REPO, fixture_dir)
    result = fetch_source(REPO, cache_dir=tmp_path / "cache")

    names = ["README.md", "model_index.json", "transformer/config.json", TRANSFORMER, VAE]
    assert result.root == tmp_path / "cache" / "models--acme--tiny-ltx" / "snapshots" / sha
    assert result.files == [result.root / n for n in names]
    assert same_tree(result.root, fixture_dir, names)
    lineage = result.lineage
    assert (lineage["kind"], lineage["repo"], lineage["revision"]) == ("hub", REPO, "main")
    assert (lineage["commit_sha"], lineage["commit_sha_kind"]) == (sha, "hub-commit")
    assert lineage["endpoint"] == hub.url
    assert lineage["files"] == [
        {"path": n, "size": (fixture_dir / n).stat().st_size, "sha256": sha256_of(fixture_dir / n)}
        for n in names
    ]
    json.dumps(lineage)  # lineage goes into manifests as JSON

    # The weights came through the CDN redirect, without the token header.
    assert [r.status for r in hub.gets(sha256_of(fixture_dir / TRANSFORMER))] == [200]

    # A second fetch finds everything in the cache: no file is downloaded again.
    before = len(hub.requests)
    assert fetch_source(REPO, cache_dir=tmp_path / "cache").lineage == lineage
    assert not [r for r in hub.requests[before:] if r.method == "GET" and "/api/" not in r.path]


def test_download_into_a_target_folder(hub, fixture_dir, tmp_path):
    hub.add_repo(REPO, fixture_dir)
    target = tmp_path / "target"
    result = fetch_source(REPO, local_dir=target)
    assert result.root == target.resolve()
    assert same_tree(target, fixture_dir, [TRANSFORMER, VAE, "model_index.json"])


def test_interrupted_download_resumes_with_a_range_request(hub, tmp_path):
    # Bigger than huggingface_hub's 10 MiB read chunk, so bytes reach the disk before the break.
    big = tmp_path / "big"
    big.mkdir()
    save_file({"w": torch.randn(1600, 2048)}, big / "model.safetensors")
    hub.add_repo(REPO, big)
    hub.interrupt("model.safetensors", after_bytes=11 << 20)

    result = fetch_source(REPO, cache_dir=tmp_path / "cache")

    gets = hub.gets(sha256_of(big / "model.safetensors"))
    assert [(r.status, r.range) for r in gets] == [(200, None), (206, f"bytes={10 << 20}-")]
    assert (result.root / "model.safetensors").read_bytes() == (
        big / "model.safetensors"
    ).read_bytes()
    assert result.lineage["files"][0]["sha256"] == sha256_of(big / "model.safetensors")


def test_failed_fetch_is_an_error_and_a_rerun_fetches_only_what_is_missing(
    hub, fixture_dir, tmp_path
):
    hub.add_repo(REPO, fixture_dir)
    hub.fail(VAE, status=500)
    with pytest.raises(SourceError, match=r"acme/tiny-ltx.*HTTP 500"):
        fetch_source(REPO, cache_dir=tmp_path / "cache")

    before = len(hub.requests)
    fetch_source(REPO, cache_dir=tmp_path / "cache")
    downloads = [
        r.path for r in hub.requests[before:] if r.method == "GET" and "/api/" not in r.path
    ]
    assert downloads == [f"/blobs/{sha256_of(fixture_dir / VAE)}"]


# ---- Hub: revisions ----------------------------------------------------------------------------


def test_pinned_commit_and_branch(hub, fixture_dir, tmp_path):
    first = hub.add_repo(REPO, fixture_dir)
    second_dir = make_checkpoint(tmp_path / "second", seed=1)
    second = hub.commit(REPO, second_dir)
    dev = hub.commit(REPO, make_checkpoint(tmp_path / "dev", seed=2), branch="dev")

    assert fetch_source(REPO).lineage["commit_sha"] == second
    pinned = fetch_source(REPO, revision=first)
    assert (pinned.lineage["revision"], pinned.lineage["commit_sha"]) == (first, first)
    assert same_tree(pinned.root, fixture_dir, [TRANSFORMER, "model_index.json"])
    assert fetch_source(f"{REPO}@{first}").lineage["commit_sha"] == first
    on_dev = fetch_source(REPO, revision="dev")
    assert (on_dev.lineage["revision"], on_dev.lineage["commit_sha"]) == ("dev", dev)


def test_latest_revision_follows_the_branch(hub, fixture_dir, tmp_path):
    first = hub.add_repo(REPO, fixture_dir)
    assert latest_revision(REPO) == first
    second = hub.commit(REPO, make_checkpoint(tmp_path / "second", seed=1))
    assert latest_revision(REPO) == second
    hub.set_ref(REPO, "main", first)
    assert latest_revision(REPO, "main") == first


def test_unknown_revision(hub, fixture_dir):
    hub.add_repo(REPO, fixture_dir)
    with pytest.raises(SourceError, match=r"acme/tiny-ltx.*'v9'.*revision does not exist"):
        fetch_source(REPO, revision="v9")
    with pytest.raises(SourceError, match="revision does not exist"):
        latest_revision(REPO, "0" * 40)


def test_repo_that_does_not_exist(hub):
    with pytest.raises(SourceError, match=r"acme/nope.*does not exist \(HTTP 404\)") as info:
        fetch_source("acme/nope")
    assert not isinstance(info.value, AuthenticationError)


# ---- Hub: tokens -------------------------------------------------------------------------------


def test_private_repo_needs_a_token(hub, fixture_dir, monkeypatch):
    hub.add_repo(REPO, fixture_dir, token="hf_secret")
    with pytest.raises(
        AuthenticationError, match=r"acme/tiny-ltx.*HTTP 401\) without a token.*HF_TOKEN"
    ):
        fetch_source(REPO)
    with pytest.raises(AuthenticationError, match="with the token given"):
        fetch_source(REPO, token="hf_wrong")

    assert fetch_source(REPO, token="hf_secret").lineage["kind"] == "hub"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert latest_revision(REPO) == fetch_source(REPO).lineage["commit_sha"]
    assert all(r.authorized for r in hub.requests if "/api/" in r.path and r.status == 200)


# ---- Hub: patterns and headers -------------------------------------------------------------------


def test_allow_and_ignore_patterns(hub, fixture_dir, tmp_path):
    hub.add_repo(REPO, fixture_dir)
    result = fetch_source(
        REPO,
        allow_patterns=["transformer/*", "*.json"],
        ignore_patterns="README*",
        cache_dir=tmp_path / "cache",
    )
    names = [f["path"] for f in result.lineage["files"]]
    assert names == ["model_index.json", "transformer/config.json", TRANSFORMER]
    assert result.lineage["allow_patterns"] == ["transformer/*", "*.json"]
    assert result.lineage["ignore_patterns"] == ["README*"]
    assert not hub.gets(sha256_of(fixture_dir / VAE))

    before = len(hub.requests)
    with pytest.raises(
        SourceError, match=r"no \.safetensors file matching allow_patterns=\['\*\.json'\]"
    ):
        fetch_source(REPO, allow_patterns=["*.json"])
    assert not [r for r in hub.requests[before:] if "/resolve/" in r.path or "/blobs/" in r.path]


def test_remote_headers_read_only_header_bytes(hub, fixture_dir, monkeypatch):
    hub.add_repo(REPO, fixture_dir)
    monkeypatch.setattr(sources, "HEADER_PREFETCH_BYTES", 64)  # force the second ranged GET too

    headers = remote_safetensors_headers(f"{REPO}@main", allow_patterns=["transformer/*", "vae/*"])

    assert sorted(headers) == [TRANSFORMER, VAE]
    for name, header in headers.items():
        local = read_header(fixture_dir / name)
        assert header.tensors == local.tensors and header.metadata == local.metadata
    blob_gets = [r for r in hub.requests if r.method == "GET" and r.path.startswith("/blobs/")]
    assert len(blob_gets) == 4 and all(r.range and r.status == 206 for r in blob_gets)
    sha, files = list_remote_files(REPO, allow_patterns="*.json")
    assert sha == latest_revision(REPO) and files == {
        "model_index.json": (fixture_dir / "model_index.json").stat().st_size,
        "transformer/config.json": (fixture_dir / "transformer/config.json").stat().st_size,
    }


def test_remote_header_longer_than_the_file(hub, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    hub.add_repo(REPO, bad)
    with pytest.raises(
        CorruptCheckpointError, match=r"model\.safetensors: header length 10,000 exceeds"
    ):
        remote_safetensors_headers(REPO)


# ---- local sources -----------------------------------------------------------------------------


def test_local_directory(fixture_dir):
    (fixture_dir / ".cache").mkdir()
    (fixture_dir / ".cache" / "junk.safetensors").write_bytes(b"x")
    result = fetch_source(fixture_dir)
    names = ["README.md", "model_index.json", "transformer/config.json", TRANSFORMER, VAE]
    assert result.root == fixture_dir and result.files == [fixture_dir / n for n in names]
    lineage = result.lineage
    # named by the folder's name only: the lineage must not depend on where the source lies
    assert (lineage["kind"], lineage["repo"], lineage["source"]) == ("local_dir", None, "fixture")
    assert str(fixture_dir.parent) not in json.dumps(lineage)
    assert lineage["commit_sha_kind"] == "content-sha256"
    assert [f["sha256"] for f in lineage["files"]] == [sha256_of(fixture_dir / n) for n in names]

    assert fetch_source(fixture_dir).lineage["commit_sha"] == lineage["commit_sha"]
    (fixture_dir / "README.md").write_text("changed\n")
    assert fetch_source(fixture_dir).lineage["commit_sha"] != lineage["commit_sha"]
    only_vae = fetch_source(fixture_dir, allow_patterns=["vae/*"])
    assert only_vae.files == [fixture_dir / VAE]


def test_single_file(fixture_dir):
    result = fetch_source(str(fixture_dir / TRANSFORMER))
    assert result.root == fixture_dir / "transformer"
    assert result.files == [fixture_dir / TRANSFORMER]
    assert result.lineage["kind"] == "file"
    assert result.lineage["files"] == [
        {
            "path": "diffusion_pytorch_model.safetensors",
            "size": (fixture_dir / TRANSFORMER).stat().st_size,
            "sha256": sha256_of(fixture_dir / TRANSFORMER),
        }
    ]


def test_prefect_task_returns_json(fixture_dir):
    assert fetch_source_task.name == "fetch-source"
    payload = fetch_source_task.fn(str(fixture_dir / VAE))
    assert json.loads(json.dumps(payload)) == payload
    assert FetchResult.from_dict(payload) == fetch_source(fixture_dir / VAE)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "/no/such/dir",
        "./missing",
        "~/nope/model.safetensors",
        "model.safetensors",
        "a/b/c",
        "not a repo",
    ],
)
def test_missing_paths_and_malformed_ids(source):
    with pytest.raises(SourceError, match="no such file or directory, and not a Hub repo id"):
        fetch_source(source)


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match=rf"{tmp_path}: no \.safetensors file; give"):
        fetch_source(tmp_path)


def test_single_file_that_is_not_safetensors(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(
        SourceError, match=r"model\.bin: a single-file source must be a \.safetensors"
    ):
        fetch_source(tmp_path / "model.bin")


def test_conflicting_revisions(fixture_dir):
    with pytest.raises(InvalidOptionError, match="only a Hub source has revisions"):
        fetch_source(fixture_dir, revision="main")
    with pytest.raises(InvalidOptionError, match=r"pins revision 'v1' but --revision says 'v2'"):
        fetch_source("acme/x@v1", revision="v2")


def test_unreachable_hub(tmp_path, monkeypatch):
    with LocalHub() as gone:
        gone.use(monkeypatch, tmp_path / "hf-home")
    with pytest.raises(SourceError, match=r"acme/x.*cannot reach the Hub.*HF_ENDPOINT"):
        fetch_source("acme/x")
