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


def test_uploads_branches_and_deletions_through_the_client(hub, tmp_path):
    api = HfApi()
    api.create_repo("acme/made", exist_ok=True)
    api.create_repo("acme/made", exist_ok=True)                      # exists: fine
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "a.json").write_text('{"a": 1}')
    (folder / "w.safetensors").write_bytes(os.urandom(3000))
    first = api.upload_folder(repo_id="acme/made", folder_path=folder).oid
    assert sorted(hub.files("acme/made")) == [".gitattributes", "a.json", "w.safetensors"]
    assert hub.read("acme/made", "w.safetensors") == (folder / "w.safetensors").read_bytes()
    assert api.upload_folder(repo_id="acme/made", folder_path=folder).oid == first  # no-op
    api.create_branch("acme/made", branch="dev", exist_ok=True)
    api.delete_file("a.json", "acme/made", revision="dev")
    assert "a.json" in hub.files("acme/made") and "a.json" not in hub.files("acme/made", "dev")
    assert Path(hf_hub_download("acme/made", "a.json", revision=first)).read_text() == '{"a": 1}'


def test_runs_standalone_keeps_its_repos_and_asks_for_a_token_only_when_given_one(tmp_path,
                                                                               repo_dir):
    import socket

    def start(*extra):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.hub_server", "--root", str(tmp_path / "hub"),
             "--port", str(port), *extra],
            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().startswith(f"local Hub at http://127.0.0.1:{port}")
        return process, HfApi(endpoint=f"http://127.0.0.1:{port}")

    process, api = start("--repo", f"{REPO}={repo_dir}")
    try:
        api.create_repo("me/new")
        api.upload_file(path_or_fileobj=b"hello", path_in_repo="x.txt", repo_id="me/new")
    finally:
        process.terminate()
        process.wait(timeout=30)
    process, api = start("--token", "t0k")
    try:
        with pytest.raises(Exception, match="401"):
            api.model_info("me/new", token=False)
        info = api.model_info("me/new", token="t0k")
        assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "x.txt"]
        assert "config.json" in {s.rfilename for s in api.model_info(REPO, token="t0k").siblings}
    finally:
        process.terminate()
        process.wait(timeout=30)
