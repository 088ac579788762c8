"""Publishing artifacts to a Hub repo and reading them back, with the real huggingface_hub
client against the local Hub (tests/hub_server.py): one commit per change, none for the same
bytes, Hub front matter, and Hub artifacts downloaded file by file and verified before use."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from artifact_helpers import all_files, make_diffusers_source, package_source
from hub_server import LocalHub
from huggingface_hub import CommitOperationAdd, HfApi

from hlwq.quant.errors import ArtifactError, AuthenticationError, InvalidOptionError
from hlwq.runtime.hub import is_hub_reference, published_manifest, resolve_artifact
from hlwq.store.artifact import MANIFEST_NAME, open_artifact, verify_artifact
from hlwq.store.model_card import card_license, front_matter
from hlwq.tasks.publish import publish_artifact

SOURCE_REPO = "Lightricks/tiny-src"
REPO = "me/tiny-hlwq"
SHARD = "transformer/diffusion_pytorch_model.safetensors"
SOURCE_CARD = ("---\nlicense: other\nlicense_name: ltx-2-community-license\n"
               "license_link: LICENSE\ntags:\n- video\n---\n# the source's own card\n")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with LocalHub(chunk_bytes=8192) as local_hub:   # the 30 kB shard goes in multipart parts
        local_hub.use(monkeypatch, tmp_path / "hf-home")
        yield local_hub


@pytest.fixture
def source(hub, tmp_path):
    """A small diffusers-like source on the Hub, its card declaring a license."""
    folder = make_diffusers_source(tmp_path / "source")
    (folder / "README.md").write_text(SOURCE_CARD)
    hub.add_repo(SOURCE_REPO, folder)
    return folder


def make_artifact(tmp_path, name="artifact", **options):
    return package_source(SOURCE_REPO, tmp_path / name, tmp_path / f"{name}.staging", **options)


@pytest.fixture
def artifact(source, tmp_path):
    return make_artifact(tmp_path)


def repo_bytes(hub, repo=REPO, revision="main"):
    return {path: hub.read(repo, path, revision) for path in hub.files(repo, revision)}


def hlwq(monkeypatch, capsys, *args):
    """Run the `hlwq` entry point in-process: (exit code, stdout, stderr)."""
    from hlwq.cli.main import main

    monkeypatch.setattr(sys, "argv", ["hlwq", *args])
    capsys.readouterr()   # what ran before (download progress bars) is not this command's
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- publishing --------------------------------------------------------------------------------


def test_publish_creates_the_repo_and_the_same_bytes_make_no_second_commit(hub, artifact):
    result = publish_artifact(artifact, REPO)
    assert result["created_repo"] and result["committed"]
    assert result["commit"] == hub.head(REPO)
    assert repo_bytes(hub) == {**all_files(artifact), ".gitattributes": repo_bytes(hub)[
        ".gitattributes"]}
    shard_parts = [r for r in hub.uploads() if "/part/" in r.path]
    assert len(shard_parts) >= 4, "the shard went up in multipart parts"

    commits, uploads = len(hub.commits_made()), len(hub.uploads())
    again = publish_artifact(artifact, REPO)
    assert (again["committed"], again["commit"], again["uploaded"]) == (False, result["commit"], [])
    assert (len(hub.commits_made()), len(hub.uploads())) == (commits, uploads)


def test_a_changed_artifact_is_one_commit_that_deletes_what_it_no_longer_has(hub, artifact,
                                                                            tmp_path):
    first = publish_artifact(artifact, REPO)
    resharded = make_artifact(tmp_path, "resharded", max_shard_bytes=10_000)
    uploads = len(hub.uploads())
    second = publish_artifact(resharded, REPO, commit_message="Reshard")
    assert second["committed"] and second["commit"] != first["commit"]
    assert SHARD in second["deleted"]
    assert "vae/diffusion_pytorch_model.safetensors" not in second["uploaded"]   # same bytes
    assert set(hub.files(REPO)) == set(all_files(resharded)) | {".gitattributes"}
    assert len(hub.uploads()) > uploads
    assert hub.files(REPO, first["commit"]).keys() == set(all_files(artifact)) | {".gitattributes"}


def test_a_failed_commit_is_resumed_without_sending_the_large_files_again(hub, artifact):
    hub.fail_route("commit", 500)
    with pytest.raises(Exception, match="500"):
        publish_artifact(artifact, REPO)
    sent = len(hub.uploads())
    assert sent > 0 and len(hub.commits_made()) == 0
    result = publish_artifact(artifact, REPO)
    assert result["committed"] and len(hub.uploads()) == sent   # the blobs were already there


def test_branch_private_and_token(tmp_path, monkeypatch, source):
    with LocalHub(token="s3cret") as guarded:
        guarded.add_repo(SOURCE_REPO, source, token="s3cret")
        guarded.use(monkeypatch, tmp_path / "guarded-home")
        monkeypatch.setenv("HF_TOKEN", "s3cret")
        art = make_artifact(tmp_path, "guarded")
        monkeypatch.setenv("HF_TOKEN", "")
        with pytest.raises(AuthenticationError, match="refused access.*without a token"):
            publish_artifact(art, REPO)
        with pytest.raises(AuthenticationError, match="refused access"):
            published_manifest(REPO)
        monkeypatch.setenv("HF_TOKEN", "s3cret")
        result = publish_artifact(art, f"{REPO}@q5", private=True)
        assert result["revision"] == "q5" and result["created_repo"]
        assert set(guarded.files(REPO, "main")) == {".gitattributes"}   # main untouched
        assert MANIFEST_NAME in guarded.files(REPO, "q5")
        assert HfApi(token="s3cret").repo_info(REPO).private
        monkeypatch.setenv("HF_TOKEN", "wrong")
        with pytest.raises(AuthenticationError, match="with the token given"):
            publish_artifact(art, REPO)


def test_publish_refuses_unsound_unvalidated_and_an_existing_public_repo(hub, source, tmp_path,
                                                                        monkeypatch, capsys):
    unvalidated = make_artifact(tmp_path, "unvalidated")
    manifest = json.loads((unvalidated / MANIFEST_NAME).read_text())
    manifest["validation"]["validated"] = False
    (unvalidated / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, _, err = hlwq(monkeypatch, capsys, "publish", str(unvalidated), REPO)
    assert code == 2 and err.startswith("ArtifactError: ") and "--allow-unvalidated" in err
    assert REPO not in hub._repos, "nothing reached the Hub"
    code, out, _ = hlwq(monkeypatch, capsys, "publish", str(unvalidated), REPO,
                        "--allow-unvalidated")
    assert code == 0 and "repo created" in out

    broken = make_artifact(tmp_path, "broken")
    with open(broken / SHARD, "r+b") as handle:
        handle.seek(200)
        handle.write(b"\xff\xff")
    with pytest.raises(ArtifactError, match=f"unsound artifact.*{SHARD}: sha256"):
        publish_artifact(broken, "me/other")
    with pytest.raises(ArtifactError, match="exists and is public"):
        publish_artifact(unvalidated, REPO, private=True, allow_unvalidated=True)


# ---- the card's front matter -------------------------------------------------------------------


def test_front_matter_names_base_model_relation_library_tags_and_license(hub, artifact):
    card = (artifact / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    commit = hub.head(SOURCE_REPO)
    assert metadata == {
        "library_name": "hlwq", "base_model": [SOURCE_REPO], "base_model_relation": "quantized",
        "base_model_revision": commit, "license": "other",
        "license_name": "ltx-2-community-license", "license_link": "LICENSE",
        "tags": ["hlwq", "quantized", "5-bit"]}
    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    manifest["quantization"]["policy"] = {"name": "ltx23"}
    manifest["tensors"]["transformer/transformer_blocks.0.attn1.to_k.weight"]["bits"] = 4
    manifest["source"] |= {"repo": None, "license": None}
    local = yaml.safe_load(front_matter(manifest).strip("-\n"))
    assert local == {"library_name": "hlwq", "tags": ["hlwq", "quantized", "ltx-video", "4-bit",
                                                      "5-bit"]}
    assert card_license("# no front matter\n") is None
    assert card_license("---\nlicense: [unclosed\n---\n") is None


# ---- Hub artifacts -----------------------------------------------------------------------------


def test_a_hub_artifact_downloads_only_its_files_and_loads_verified(hub, artifact, tmp_path):
    publish_artifact(artifact, REPO)
    extra = tmp_path / "notes.bin"
    extra.write_bytes(b"\0" * 50_000)
    HfApi().create_commit(REPO, [CommitOperationAdd("extras/notes.bin", str(extra))],
                          commit_message="not part of the artifact")
    assert is_hub_reference(REPO) and not is_hub_reference(str(artifact))
    assert resolve_artifact(artifact) == artifact
    root = resolve_artifact(f"{REPO}@main")
    assert root.parent.name == "snapshots" and root.name == hub.head(REPO)
    assert all_files(root) == all_files(artifact)
    assert not hub.gets("notes.bin") and not (root / "extras").exists()
    assert verify_artifact(root) == []
    loaded = open_artifact(root)
    key = "transformer/transformer_blocks.0.attn1.to_q.weight"
    assert (loaded.load_packed(key).codes == open_artifact(artifact).load_packed(key).codes).all()
    assert published_manifest(REPO)["source"]["repo"] == SOURCE_REPO
    assert published_manifest("me/never-published") is None


def test_a_hub_artifact_whose_hashes_disagree_is_refused_naming_the_file(hub, artifact, tmp_path):
    publish_artifact(artifact, REPO)
    root = resolve_artifact(REPO)
    blob = (root / SHARD).resolve()                   # the cached bytes, corrupted
    data = bytearray(blob.read_bytes())
    data[300] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"refused.*{SHARD}: sha256"):
        resolve_artifact(REPO)

    tampered = tmp_path / "tampered.safetensors"      # the repo's shard replaced, manifest kept
    tampered.write_bytes(bytes(data))
    commit = HfApi().create_commit(REPO, [CommitOperationAdd(SHARD, str(tampered))],
                                   commit_message="swap a shard").oid
    downloads = len(hub.requests)
    with pytest.raises(ArtifactError, match=f"commit {commit}\\): {SHARD}: the repo's sha256"):
        resolve_artifact(REPO)
    assert not [r for r in hub.requests[downloads:] if r.path.startswith("/blobs/")], \
        "refused before any weights were downloaded"


def test_cli_verify_inspect_and_validate_take_a_repo_id(hub, artifact, monkeypatch, capsys):
    publish_artifact(artifact, REPO)
    code, out, _ = hlwq(monkeypatch, capsys, "verify", REPO)
    assert code == 0 and out.startswith(f"{REPO}: sound (")
    code, out, _ = hlwq(monkeypatch, capsys, "inspect", f"{REPO}@main", "--json")
    assert code == 0 and json.loads(out)["source"]["repo"] == SOURCE_REPO
    code, _, err = hlwq(monkeypatch, capsys, "verify", "me/missing-art")
    assert code == 2 and err.startswith("ArtifactError: artifact 'me/missing-art': no such "
                                        "local directory; as a Hub repo:")
    code, _, err = hlwq(monkeypatch, capsys, "validate", REPO, "--against", str(artifact))
    assert code == 2 and err.startswith("InvalidOptionError: ") and "give --report-dir" in err


# ---- the deployments' side: requantize publishes, watch-upstream keeps it current -------------


@pytest.mark.slow
def test_round_trip_quantize_publish_then_render_from_the_repo_id(hub, tmp_path, monkeypatch,
                                                                 capsys):
    """quantize, `hlwq publish`, then render_batch from the repo id with the packed runtime:
    the MP4 frames equal those rendered from the folder. (Output gates off: their renders of
    the prompt suite are tested in tests/test_validate_output.py; publishing a validated
    artifact from the flow is the next test.)"""
    from flow_support import patient_prefect

    from hlwq.flows.quantize_flow import run_quantize
    from hlwq.flows.render_flow import render_batch
    from hlwq.runtime.video import read_frames
    from hlwq.store.catalog import read_catalog
    from hlwq.tasks.render import clear_pipeline_cache
    from hlwq.testing.fixtures import make_tiny_ltx23

    hub.add_repo(SOURCE_REPO, make_tiny_ltx23(tmp_path / "tiny"))
    out = tmp_path / "artifact"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "fox", "prompt": "a red fox in the snow", "width": 32,
                                   "height": 32, "frames": 9, "steps": 2, "seed": 7}) + "\n")
    with patient_prefect():
        run_quantize(SOURCE_REPO, str(out), workers=1, gates=False)
        code, published, _ = hlwq(monkeypatch, capsys, "publish", str(out), REPO,
                                  "--allow-unvalidated")
        assert code == 0 and "repo created" in published
        renders = {}
        for name, artifact in (("folder", str(out)), ("hub", REPO)):
            clear_pipeline_cache()
            state = render_batch(artifact, str(prompts), str(tmp_path / name), device="cpu",
                                 retries=0, return_state=True)
            assert state.is_completed(), state.message
            (row,) = read_catalog(tmp_path / name).to_pylist()
            renders[name] = read_frames(row["output_path"])
    assert row["artifact"] == str(resolve_artifact(REPO))    # the Hub cache's snapshot
    assert renders["hub"].shape == (9, 32, 32, 3)
    assert (renders["hub"] == renders["folder"]).all()


@pytest.mark.slow
def test_requantize_publishes_a_validated_artifact_once(hub, tmp_path):
    from flow_support import patient_prefect, write_generic_file

    from hlwq.flows.quantize_flow import run_quantize

    write_generic_file(tmp_path / "src" / "model.safetensors")
    hub.add_repo(SOURCE_REPO, tmp_path / "src")
    out = tmp_path / "artifact"
    with patient_prefect():   # not a whole pipeline: the output gates skip, tensor gates pass
        first = run_quantize(SOURCE_REPO, str(out), workers=1, publish_to=f"{REPO}@q5")
        again = run_quantize(SOURCE_REPO, str(out), workers=1, publish_to=f"{REPO}@q5")
    assert first["validated"] and first["published"]["committed"]
    assert again["published"]["committed"] is False
    assert all_files(resolve_artifact(f"{REPO}@q5")) == all_files(out)


def test_publish_to_needs_gates_and_a_repo_id(tmp_path):
    from hlwq.flows.quantize_flow import check_publish_to

    check_publish_to(None, gates=False)
    with pytest.raises(InvalidOptionError, match="gates off"):
        check_publish_to(REPO, gates=False)
    with pytest.raises(Exception, match="not a Hub repo id"):
        check_publish_to("./folder", gates=True)


@pytest.mark.slow
def test_watch_upstream_keeps_the_published_quantization_current(hub, artifact, source,
                                                                 tmp_path, monkeypatch):
    from flow_support import patient_prefect

    from hlwq.flows import watch_flow

    triggered = []
    monkeypatch.setattr(watch_flow, "trigger_requantize", lambda deployment, parameters:
                        triggered.append(parameters) or "00000000-0000-0000-0000-000000000000")
    publish_artifact(artifact, REPO)
    options = {"source": SOURCE_REPO, "output_root": str(tmp_path / "artifacts"), "bits": 5,
               "policy": "test-transformer", "publish_to": REPO}
    with patient_prefect():
        assert watch_flow.watch_upstream(**options) == {
            "triggered": False, "revision": hub.head(SOURCE_REPO), "published": True}
        assert triggered == []
        (source / "model_index.json").write_text("{}")
        moved = hub.commit(SOURCE_REPO, source)               # upstream moves on
        result = watch_flow.watch_upstream(**options)
    assert result["triggered"] and result["revision"] == moved
    assert triggered[0]["publish_to"] == REPO and triggered[0]["revision"] == moved
