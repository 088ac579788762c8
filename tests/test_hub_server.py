"""The local Hub test server answers huggingface_hub's own calls (not only tasks/sources.py's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub
from huggingface_hub import HfApi, get_safetensors_metadata, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.utils import get_session
from safetensors.torch import save_file

REPO = "acme/served"


@pytest.fixture
def repo_dir(tmp_path):
    directory = tmp_path / "repo"
    (directory / "text_encoder").mkdir(parents=True)
    save_file({"w": torch.ones(4, 8)}, directory / "model.safetensors", metadata={"config": "{}"})
    save_file({"e": torch.zeros(3)}, directory / "text_encoder" / "model.safetensors")
    (directory / "config.json").write_text('{"hidden": 8}')
    return directory


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with LocalHub() as local_hub:
        local_hub.use(monkeypatch, tmp_path / "hf-home")
        yield local_hub


@pytest.fixture
def sha(hub, repo_dir):
    return hub.add_repo(REPO, repo_dir)


def test_repo_info_tree_and_refs(hub, sha):
    api = HfApi()  # built after use(): its endpoint is the local hub
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == sha
    assert sorted(s.rfilename for s in info.siblings) == [
        "config.json",
        "model.safetensors",
        "text_encoder/model.safetensors",
    ]
    assert {s.rfilename: s.lfs is not None for s in info.siblings}["model.safetensors"]

    top = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO)}
    assert top == {
        "config.json": "RepoFile",
        "model.safetensors": "RepoFile",
        "text_encoder": "RepoFolder",
    }
    assert [e.path for e in api.list_repo_tree(REPO, "text_encoder")] == [
        "text_encoder/model.safetensors"
    ]
    assert len(list(api.list_repo_tree(REPO, recursive=True))) == 4
    assert [(b.name, b.target_commit) for b in api.list_repo_refs(REPO).branches] == [("main", sha)]


def test_bare_huggingface_hub_calls_reach_the_local_hub(sha):
    path = hf_hub_download(REPO, "config.json")  # no endpoint argument: constants are patched
    assert Path(path).read_text() == '{"hidden": 8}'
    metadata = get_safetensors_metadata(REPO)
    assert metadata.files_metadata["model.safetensors"].metadata == {"config": "{}"}
    assert HfApi().file_exists(REPO, "model.safetensors")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json")


def test_ranges(hub, sha, repo_dir):
    data = (repo_dir / "config.json").read_bytes()
    url = f"{hub.url}/{REPO}/resolve/main/config.json"
    assert get_session().get(url, headers={"Range": "bytes=-4"}).content == data[-4:]
    assert get_session().get(url, headers={"Range": "bytes=2-5"}).content == data[2:6]
    assert get_session().get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416


def test_subprocess_uses_the_environment(hub, sha, tmp_path):
    code = f"from huggingface_hub import model_info; print(model_info({REPO!r}).sha)"
    env = {**os.environ, **hub.environ(tmp_path / "child-home")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.stdout.strip() == sha, out.stderr
