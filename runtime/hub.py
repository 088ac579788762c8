"""The Hub as seen from here: repo ids, the client, its errors, and artifacts stored in Hub repos.

``resolve_artifact`` turns what a user wrote after ``--artifact`` into a local folder: an
existing path as it is, or ``owner/name[@revision]`` downloaded into the Hub cache, where
only the files the artifact's manifest lists are fetched, at one commit, and their hashes
are checked against the manifest before anything loads them. Hub access goes through
huggingface_hub (its cache, its resumable downloads, its token lookup); the endpoint is
``HF_ENDPOINT`` read at call time, so a test server or a mirror can be chosen per call.

Shared by the render path (no Prefect here) and by tasks/sources.py and tasks/publish.py.
"""

from __future__ import annotations

import contextlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, get_token, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from hlwq.quant.errors import (
    ArtifactError,
    AuthenticationError,
    InvalidOptionError,
    SourceError,
)
from hlwq.store.artifact import MANIFEST_NAME, parse_manifest, safe_relative_path, verify_artifact

HUB_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^@\s]+))?")
LIBRARY = "hlwq-pipeline"
DOWNLOAD_THREADS = 8


@dataclass(frozen=True)
class HubSource:
    repo: str
    revision: str  # as asked: branch, tag or commit sha


def parse_hub_source(source: str, revision: str | None = None) -> HubSource:
    """``owner/name[@revision]`` (plus an optional separate revision) -> HubSource."""
    match = HUB_REPO_ID.fullmatch(source)
    if match is None or looks_like_path(source):
        raise SourceError(
            f"{source!r}: no such file or directory, and not a Hub repo id "
            "(owner/name or owner/name@revision)"
        )
    repo, pinned = match["repo"], match["revision"]
    if pinned and revision and pinned != revision:
        raise InvalidOptionError(
            f"{source!r} pins revision {pinned!r} but --revision says {revision!r}; "
            "give one of them"
        )
    return HubSource(repo, pinned or revision or constants.DEFAULT_REVISION)


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.endswith(".safetensors")


def is_hub_reference(reference: str | os.PathLike) -> bool:
    """Whether ``reference`` names a Hub repo rather than a local path (an existing path wins)."""
    text = str(reference)
    return (not Path(text).expanduser().exists() and not looks_like_path(text)
            and HUB_REPO_ID.fullmatch(text) is not None)


def hub_api(token: str | None = None) -> HfApi:
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    return HfApi(endpoint=endpoint, token=token, library_name=LIBRARY)


def resolve_commit(api: HfApi, hub: HubSource) -> str:
    return api.model_info(hub.repo, revision=hub.revision).sha


def remote_files(api: HfApi, repo: str, revision: str) -> dict[str, RepoFile]:
    """Every file of a repo at ``revision``: path -> RepoFile (size, blob id, LFS sha256)."""
    return {entry.path: entry for entry in api.list_repo_tree(repo, recursive=True,
                                                              revision=revision)
            if isinstance(entry, RepoFile)}


@contextlib.contextmanager
def hub_errors(hub: HubSource, token: str | None):
    """Turn huggingface_hub's and the transport's errors into ours, naming repo and revision."""
    where = f"Hub repo {hub.repo!r} (revision {hub.revision!r})"
    try:
        yield
    except RevisionNotFoundError as exc:
        raise SourceError(
            f"{where}: the revision does not exist; give a branch, tag or full "
            "commit sha the repo has"
        ) from exc
    except GatedRepoError as exc:
        raise AuthenticationError(
            f"{where}: the repo is gated; accept its conditions on the Hub "
            "with the account whose token you use"
        ) from exc
    except RemoteEntryNotFoundError as exc:
        raise SourceError(
            f"{where}: a listed file is missing on the Hub ({exc.server_message or exc}); "
            "fetch again, or pin another revision"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            who = "with the token given" if token or get_token() else "without a token"
            raise AuthenticationError(
                f"{where}: the Hub refused access (HTTP {status}) {who}; for a private repo "
                "or an upload set HF_TOKEN, pass a token or run `hf auth login`; also check "
                "the repo id, since the Hub answers 401 for repos that do not exist"
            ) from exc
        if isinstance(exc, RepositoryNotFoundError):
            raise SourceError(
                f"{where}: the repo does not exist (HTTP {status}); check the repo id (owner/name)"
            ) from exc
        detail = f" ({exc.server_message})" if exc.server_message else ""
        raise SourceError(
            f"{where}: the Hub answered HTTP {status}{detail}; try again later (finished "
            "files stay in the cache and are not transferred twice)"
        ) from exc
    except (httpx2.TransportError, LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise SourceError(
            f"{where}: cannot reach the Hub ({type(exc).__name__}: {exc}); check the "
            "network, HF_ENDPOINT and HF_HUB_OFFLINE"
        ) from exc
    except OSError as exc:
        if "Consistency check failed" not in str(exc):
            raise
        raise SourceError(f"{where}: a download ended short ({exc}); fetch again") from exc


# ---- artifacts stored in Hub repos ----------------------------------------------------------


def resolve_artifact(reference: str | os.PathLike, token: str | None = None,
                     cache_dir: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """The local folder of an artifact: a path as it is, or a Hub repo's files in the Hub cache.

    For ``owner/name[@revision]`` only the files its manifest lists are downloaded, all at
    the commit the revision points to now. With ``verify`` (the default) their sizes and
    sha256 are checked against the manifest, and any disagreement raises ArtifactError
    naming the file; a Hub artifact that fails is never handed on.
    """
    if not is_hub_reference(reference):
        return Path(reference).expanduser()
    hub = parse_hub_source(str(reference))
    try:
        root, commit = download_artifact(hub, token, cache_dir)
    except SourceError as exc:   # say that it was taken for a repo id, not a folder
        missing = (isinstance(exc.__cause__, RepositoryNotFoundError)
                   and not isinstance(exc, AuthenticationError))
        error = ArtifactError if missing else type(exc)
        raise error(f"artifact {str(reference)!r}: no such local directory; as a Hub repo: "
                    f"{exc}") from exc
    if verify:
        problems = verify_artifact(root)
        if problems:
            raise ArtifactError(
                f"Hub artifact {hub.repo}@{commit}: refused, {len(problems)} problem(s) with "
                f"the downloaded files: {problems[0]}; delete {root} from the Hub cache and "
                "try again, or ask the publisher")
    return root


def download_artifact(hub: HubSource, token: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(snapshot folder in the Hub cache, commit sha) holding the manifest's files.

    The repo's own listing is checked against the manifest first (every listed file is in
    the repo, sizes agree, LFS sha256 agree), so a repo whose files and manifest disagree is
    refused before its weights are downloaded.
    """
    api = hub_api(token)
    label = f"Hub artifact {hub.repo}@{hub.revision}"
    with hub_errors(hub, token):
        commit = resolve_commit(api, hub)
        listed = remote_files(api, hub.repo, commit)
        if MANIFEST_NAME not in listed:
            raise ArtifactError(f"{label}: the repo holds no {MANIFEST_NAME} at commit {commit}; "
                                "it is not an HLWQ artifact (publish one with `hlwq publish`)")

        def download(path: str) -> Path:
            return Path(hf_hub_download(hub.repo, path, revision=commit, cache_dir=cache_dir,
                                        token=token, endpoint=api.endpoint,
                                        library_name=LIBRARY))

        manifest_path = download(MANIFEST_NAME)
        root = manifest_path.parent
        manifest = parse_manifest(manifest_path.read_bytes(), f"{label}/{MANIFEST_NAME}")
        for path, info in sorted(manifest["files"].items()):
            safe_relative_path(root, path)           # no path may leave the snapshot
            _check_listing(label, commit, path, info, listed.get(path))
        with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
            list(pool.map(download, sorted(manifest["files"])))
    return root, commit


def _check_listing(label: str, commit: str, path: str, info: dict, remote: RepoFile | None) -> None:
    where = f"{label} (commit {commit}): {path}"
    if remote is None:
        raise ArtifactError(f"{where}: listed in {MANIFEST_NAME} but not in the repo")
    if remote.size != info["size"]:
        raise ArtifactError(f"{where}: the repo's file is {remote.size:,} bytes, "
                            f"{MANIFEST_NAME} says {info['size']:,}; refused")
    if remote.lfs is not None and remote.lfs.sha256 != info["sha256"]:
        raise ArtifactError(f"{where}: the repo's sha256 {remote.lfs.sha256[:16]}... differs "
                            f"from {MANIFEST_NAME}'s {info['sha256'][:16]}...; refused")


def published_manifest(repo: str, token: str | None = None) -> dict | None:
    """The manifest of an artifact published at ``owner/name[@branch]``; None when the repo,
    the branch or the manifest does not exist yet (nothing published there)."""
    hub = parse_hub_source(repo)
    api = hub_api(token)
    try:
        with hub_errors(hub, token):
            path = hf_hub_download(hub.repo, MANIFEST_NAME, revision=hub.revision, token=token,
                                   endpoint=api.endpoint, library_name=LIBRARY)
    except AuthenticationError:
        raise
    except SourceError as exc:
        if isinstance(exc.__cause__, (RepositoryNotFoundError, RevisionNotFoundError,
                                      RemoteEntryNotFoundError)):
            return None
        raise
    return parse_manifest(Path(path).read_bytes(), f"{hub.repo}@{hub.revision}/{MANIFEST_NAME}")
