"""Publishing: an artifact folder -> a Hub model repo, as one commit, through huggingface_hub.

The artifact is verified first (every hash, every tensor entry) and must be marked validated
unless ``allow_unvalidated``. The repo is created if needed (private if asked), the branch
too. Then one commit makes the branch hold exactly the artifact: files whose bytes the
branch already has are left out, files the artifact no longer has are deleted
(``.gitattributes`` stays). Publishing the same bytes again makes no commit. Large files go
through the client's large-file path (Xet when ``hf_xet`` is installed, chunked and
deduplicated; else LFS, multipart for big files); either way a rerun after a failure sends
only what the Hub does not hold yet. The commit names its parent, so a branch that moved
meanwhile fails the commit instead of being overwritten.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from prefect import task

from hlwq.quant.errors import ArtifactError
from hlwq.runtime.hub import hub_api, hub_errors, parse_hub_source, remote_files
from hlwq.store.artifact import MANIFEST_NAME, read_manifest, verify_artifact

KEPT_REMOTE_FILES = (".gitattributes",)   # the Hub's own file: it says which paths are LFS
SHOWN_PROBLEMS = 5


def publish_artifact(artifact: str | os.PathLike, repo: str, revision: str | None = None,
                     private: bool = False, commit_message: str | None = None,
                     allow_unvalidated: bool = False, token: str | None = None) -> dict:
    """Publish the artifact folder at ``artifact`` to ``repo`` (``owner/name[@branch]``).

    Returns ``{"repo", "revision", "commit", "committed", "created_repo", "uploaded",
    "deleted", "unchanged", "url"}``; ``committed`` is false when the branch already held
    these bytes (``commit`` is then its current head).
    """
    directory = Path(artifact)
    manifest = checked_artifact(directory, allow_unvalidated)
    hub = parse_hub_source(repo, revision)
    api = hub_api(token)
    with hub_errors(hub, token):
        created = not api.repo_exists(hub.repo)
        if created:
            api.create_repo(hub.repo, private=private, exist_ok=True)
        elif private and not api.repo_info(hub.repo).private:
            raise ArtifactError(f"--private: the Hub repo {hub.repo} exists and is public; "
                                "--private applies when the repo is created (make it private "
                                "on the Hub first, or publish without --private)")
        if hub.revision not in {b.name for b in api.list_repo_refs(hub.repo).branches}:
            api.create_branch(hub.repo, branch=hub.revision, exist_ok=True)
        head = api.repo_info(hub.repo, revision=hub.revision).sha
        remote = remote_files(api, hub.repo, head)
        local = {**manifest["files"], MANIFEST_NAME: None}
        additions = [_addition(directory, path, info) for path, info in sorted(local.items())
                     if not _same_bytes(directory, path, info, remote.get(path))]
        deletions = [CommitOperationDelete(path) for path in sorted(remote)
                     if path not in local and path not in KEPT_REMOTE_FILES]
        commit = head
        if additions or deletions:
            message = commit_message or default_message(manifest)
            with warnings.catch_warnings():   # metrics.parquet belongs here, it is no data set
                warnings.filterwarnings("ignore", "It seems that you are about to commit a data")
                commit = api.create_commit(hub.repo, [*deletions, *additions],
                                           commit_message=message, revision=hub.revision,
                                           parent_commit=head).oid
    return {"repo": hub.repo, "revision": hub.revision, "commit": commit,
            "committed": commit != head, "created_repo": created,
            "uploaded": [op.path_in_repo for op in additions],
            "deleted": [op.path_in_repo for op in deletions],
            "unchanged": len(local) - len(additions), "url": f"{api.endpoint}/{hub.repo}"}


def checked_artifact(directory: Path, allow_unvalidated: bool) -> dict:
    """The manifest of a sound artifact that may be published; ArtifactError otherwise."""
    problems = verify_artifact(directory)
    if problems:
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        raise ArtifactError(f"{directory}: refusing to publish an unsound artifact "
                            f"({len(problems)} problem(s): {shown}); run `hlwq verify`")
    manifest = read_manifest(directory)
    if not manifest["validation"]["validated"] and not allow_unvalidated:
        raise ArtifactError(f"{directory}: not validated (its gates failed or were skipped, "
                            "manifest.json 'validation'); run `hlwq validate`, or publish "
                            "anyway with --allow-unvalidated")
    return manifest


def default_message(manifest: dict) -> str:
    source = manifest["source"]
    name = source.get("repo") or source.get("source") or "checkpoint"
    commit = (source.get("commit_sha") or "")[:12]
    bits = manifest["quantization"].get("bits")
    return f"HLWQ{f' Q{bits}' if bits else ''} of {name}{f' at {commit}' if commit else ''}"


def _addition(directory: Path, path: str, info: dict | None) -> CommitOperationAdd:
    operation = CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(directory / path))
    if info is not None:   # verified just now: spare the client a second pass over the bytes
        operation.upload_info.sha256 = bytes.fromhex(info["sha256"])
    return operation


def _same_bytes(directory: Path, path: str, info: dict | None, remote) -> bool:
    """Whether the branch already holds these bytes at ``path`` (LFS sha256 or git blob id)."""
    if remote is None:
        return False
    if remote.lfs is not None:
        return info is not None and remote.lfs.sha256 == info["sha256"]
    data = (directory / path).read_bytes() if remote.size < 1 << 24 else None
    return data is not None and remote.blob_id == _git_blob_sha1(data)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@task(name="publish", task_run_name="publish {artifact} to {repo}", persist_result=False)
def publish_task(artifact: str, repo: str, private: bool = False,
                 allow_unvalidated: bool = False) -> dict:
    """Prefect task around ``publish_artifact``. No token parameter on purpose (it would be
    stored with the run's parameters): workers take it from ``HF_TOKEN`` or the Hub login."""
    return publish_artifact(artifact, repo, private=private, allow_unvalidated=allow_unvalidated)
