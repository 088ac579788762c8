"""Checkpoint sources: a Hub repo (``owner/name[@revision]``), a local folder, a .safetensors file.

``fetch_source`` makes a source's files local and records their lineage: repo, the commit
the revision resolved to, and every file's name, size and sha256. Hub access goes through
huggingface_hub: its cache (or a target folder), its resumable downloads (a broken transfer
continues with a Range request), and its token lookup (argument, ``HF_TOKEN``, the user's
login). Its errors become ``SourceError`` / ``AuthenticationError`` naming the repo, the
revision and what to do.

The Hub endpoint is ``HF_ENDPOINT`` read at call time (huggingface_hub reads it only when
imported), so a test server or a mirror can be chosen per call.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_url, snapshot_download
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import (
    build_hf_headers,
    filter_repo_objects,
    get_session,
    hf_raise_for_status,
)
from prefect import task

from hlwq.quant.errors import CorruptCheckpointError, InvalidOptionError, SourceError
from hlwq.runtime.hub import (
    LIBRARY,
    HubSource,
    hub_api,
    hub_errors,
    parse_hub_source,
    remote_files,
    resolve_commit,
)
from hlwq.store.hash_cache import size_and_sha256
from hlwq.store.safetensors_io import SafetensorsHeader, header_length, parse_header
from hlwq.store.source_tree import (
    PICKLE_SUFFIXES,
    is_pickle,
    register_joined_view,
    source_name,
    visible_files,
    without_pickles,
)

HEADER_PREFETCH_BYTES = 1 << 20  # one ranged GET covers most headers, even LTX-2.3's config
PICKLE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES]   # never downloaded


@dataclass(frozen=True)
class FetchResult:
    """Where a source's files are, and their lineage.

    ``lineage`` keys: ``kind`` ("hub" | "local_dir" | "file"), ``source``, ``repo`` (Hub),
    ``endpoint`` (Hub), ``revision`` (as asked), ``commit_sha`` (the Hub
    commit it resolved to, or for local sources a sha256 over the files' paths, sizes and
    hashes), ``commit_sha_kind`` ("hub-commit" | "content-sha256"), ``allow_patterns``,
    ``ignore_patterns`` and ``files`` (``[{path, size, sha256}]``, paths relative to root).
    Nothing in it depends on where the files lie: a local source is named by its folder's
    (or file's) name only.
    """

    root: Path  # the snapshot folder, target folder, or the local source's folder
    files: list[Path]  # absolute paths of every file fetched (weights, configs, ...)
    lineage: dict  # kind, source, repo, endpoint, revision, commit_sha, files, ...

    def to_dict(self) -> dict:
        """JSON-able form (what the Prefect task returns)."""
        return {
            "root": str(self.root),
            "files": [str(p) for p in self.files],
            "lineage": self.lineage,
        }

    @classmethod
    def from_dict(cls, data: dict) -> FetchResult:
        return cls(Path(data["root"]), [Path(p) for p in data["files"]], data["lineage"])


# ---- public API -----------------------------------------------------------------------------


def fetch_source(
    source: str | os.PathLike,
    revision: str | None = None,
    allow_patterns: list[str] | str | None = None,
    ignore_patterns: list[str] | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_dir: str | os.PathLike | None = None,
    token: str | None = None,
) -> FetchResult:
    """Make ``source`` local and record its lineage.

    An existing path wins over a Hub id of the same spelling. Local sources are read in
    place (``cache_dir``/``local_dir`` apply to the Hub only); their ``commit_sha`` is a
    content hash (``commit_sha_kind`` says which kind of sha the lineage holds).
    """
    path = Path(source).expanduser()
    if path.exists():
        if revision is not None:
            raise InvalidOptionError(
                f"--revision {revision!r}: only a Hub source has revisions, "
                f"but {str(source)!r} is a local path"
            )
        return _fetch_local(path, allow_patterns, ignore_patterns)
    hub = parse_hub_source(str(source), revision)
    return _fetch_hub(hub, allow_patterns, ignore_patterns, cache_dir, local_dir, token)


def latest_revision(repo: str, revision: str = "main", token: str | None = None) -> str:
    """The commit sha ``revision`` of a Hub repo points to now (asks the Hub, never the cache)."""
    hub = parse_hub_source(repo, revision)
    with hub_errors(hub, token):
        return resolve_commit(hub_api(token), hub)


def list_remote_files(
    repo: str,
    revision: str | None = None,
    token: str | None = None,
    allow_patterns: list[str] | str | None = None,
    ignore_patterns: list[str] | str | None = None,
) -> tuple[str, dict[str, int]]:
    """(commit sha, {path: size}) of a Hub repo's files, filtered by the patterns; no download."""
    hub = parse_hub_source(repo, revision)
    api = hub_api(token)
    with hub_errors(hub, token):
        sha = resolve_commit(api, hub)
        files = _remote_files(api, hub.repo, sha, allow_patterns, ignore_patterns)
    return sha, {path: entry.size for path, entry in files.items()}


def remote_safetensors_headers(
    repo: str,
    revision: str | None = None,
    token: str | None = None,
    allow_patterns: list[str] | str | None = None,
    ignore_patterns: list[str] | str | None = None,
) -> dict[str, SafetensorsHeader]:
    """Every ``.safetensors`` header of a Hub repo, read with HTTP Range requests only.

    Keys are paths in the repo; values are the same validated ``SafetensorsHeader`` that
    ``hlwq.store.safetensors_io.read_header`` gives for a local file (absolute offsets), so a
    plan of a Hub repo and of a local folder share one code path.
    """
    hub = parse_hub_source(repo, revision)
    api = hub_api(token)
    with hub_errors(hub, token):
        sha = resolve_commit(api, hub)
        files = _remote_files(api, hub.repo, sha, allow_patterns, ignore_patterns)
        _require_safetensors(
            list(files), f"Hub repo {hub.repo}@{hub.revision}", allow_patterns, ignore_patterns
        )
        return {
            path: _remote_header(api, hub.repo, sha, path, entry.size, token)
            for path, entry in files.items()
            if path.endswith(".safetensors")
        }


@task(name="fetch-source", task_run_name="fetch {source}", persist_result=False)
def fetch_source_task(
    source: str,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    cache_dir: str | None = None,
    local_dir: str | None = None,
) -> dict:
    """Prefect task around ``fetch_source``; returns ``FetchResult.to_dict()``.

    No token parameter on purpose: a token passed down from a flow would be stored with the
    flow run's parameters. Workers take it from ``HF_TOKEN`` or the Hub login instead.
    """
    return fetch_source(
        source, revision, allow_patterns, ignore_patterns, cache_dir, local_dir
    ).to_dict()


# ---- a separate text encoder -----------------------------------------------------------------

TEXT_ENCODER_DIR = "text_encoder"


def with_text_encoder(main: FetchResult, text_encoder: FetchResult, view: Path) -> FetchResult:
    """``main`` plus ``text_encoder``'s files under ``text_encoder/``, as one source folder.

    For checkpoints that ship the text encoder as its own repo (LTX-2.3's Gemma 3). ``view``
    is rebuilt as a folder of symlinks to both sources' fetched files (a Hub snapshot is made
    of symlinks already), so the rest of the run reads one folder; the artifact receives the
    files themselves. The lineage is ``main``'s with the text encoder's files added, its own
    lineage under ``text_encoder`` and a commit over both commits.
    """
    lineage = main.lineage
    if lineage["kind"] == "file":
        raise InvalidOptionError(f"--text-encoder: the source {lineage['source']!r} is one file; "
                                 "give the folder (or Hub repo) that holds it, with --files NAME")
    if any(f["path"].split("/")[0] == TEXT_ENCODER_DIR for f in lineage["files"]):
        raise SourceError(f"{lineage['source']}: already holds {TEXT_ENCODER_DIR}/; drop "
                          f"--text-encoder or leave them out with --exclude-files "
                          f"'{TEXT_ENCODER_DIR}/*'")
    encoder_files = [{**f, "path": f"{TEXT_ENCODER_DIR}/{f['path']}"}
                     for f in text_encoder.lineage["files"]]
    targets = {f["path"]: main.root / f["path"] for f in lineage["files"]}
    targets |= {f["path"]: text_encoder.root / f["path"].split("/", 1)[1] for f in encoder_files}
    if view.exists():
        shutil.rmtree(view)
    for name, target in targets.items():
        link = view / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target.resolve())
    register_joined_view(view, [main.root, text_encoder.root])
    commits = f"{lineage['commit_sha']}\n{text_encoder.lineage['commit_sha']}\n"
    combined = {**lineage, "files": lineage["files"] + encoder_files,
                "commit_sha": hashlib.sha256(commits.encode()).hexdigest(),
                "commit_sha_kind": "sha256-of-source-and-text-encoder-commits",
                TEXT_ENCODER_DIR: text_encoder.lineage}
    return FetchResult(view, [view / name for name in targets], combined)


# ---- local sources ---------------------------------------------------------------------------


def local_source_files(path: Path, allow_patterns=None, ignore_patterns=None
                       ) -> tuple[str, Path, list[str]]:
    """(kind, root, names relative to root) of a local source after the file patterns.

    Only regular files really inside the source count (store/source_tree.py): a link
    leading out or a special file raises UnsafeSourceError naming it. Pickles are left
    out, and a folder whose weights are only pickles is refused. Raises SourceError when
    no .safetensors file is left."""
    if path.is_dir():
        kind, root, names = "local_dir", path.resolve(), visible_files(path)
    elif path.suffix == ".safetensors" and not path.is_symlink():
        kind, root, names = "file", path.resolve().parent, [path.name]
    elif path.suffix == ".safetensors":
        raise SourceError(f"{path}: a single-file source must be the file itself, not a link "
                          f"(to {path.resolve()}); give the file it points to")
    else:
        raise SourceError(
            f"{path}: a single-file source must be a .safetensors file "
            "(or give the folder that holds the checkpoint)"
        )
    names = sorted(
        filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    )
    names = without_pickles(names, str(path), lambda name: is_pickle(root / name))
    _require_safetensors(names, str(path), allow_patterns, ignore_patterns)
    return kind, root, names


def _fetch_local(path: Path, allow_patterns, ignore_patterns) -> FetchResult:
    kind, root, names = local_source_files(path, allow_patterns, ignore_patterns)
    records = _hash_files(root, names)
    named = root / names[0] if kind == "file" else root
    lineage = _lineage(
        kind, source_name(named), _content_sha256(records), "content-sha256", records,
        allow_patterns, ignore_patterns,
    )
    return FetchResult(root, [root / name for name in names], lineage)


# ---- Hub sources -----------------------------------------------------------------------------


def _fetch_hub(
    hub: HubSource, allow_patterns, ignore_patterns, cache_dir, local_dir, token
) -> FetchResult:
    api = hub_api(token)
    with hub_errors(hub, token):
        # Resolve first and download that exact commit: a branch that moves mid-fetch cannot
        # mix two revisions, and the lineage names what was really fetched.
        sha = resolve_commit(api, hub)
        remote = _remote_files(api, hub.repo, sha, allow_patterns, ignore_patterns)
        where = f"Hub repo {hub.repo}@{hub.revision}"
        remote = {name: remote[name] for name in without_pickles(list(remote), where)}
        _require_safetensors(list(remote), where, allow_patterns, ignore_patterns)
        root = Path(
            snapshot_download(
                hub.repo,
                revision=sha,
                allow_patterns=allow_patterns,
                ignore_patterns=(_pattern_list(ignore_patterns) or []) + PICKLE_PATTERNS,
                cache_dir=cache_dir,
                local_dir=local_dir,
                token=token,
                endpoint=api.endpoint,
                library_name=LIBRARY,
            )
        )
    names = without_pickles(sorted(remote), where, lambda name: is_pickle(root / name))
    records = _hash_files(root, names)
    for record in records:
        _check_against_hub(hub, sha, root, record, remote[record["path"]])
    lineage = _lineage(
        "hub", f"{hub.repo}@{hub.revision}", sha, "hub-commit", records,
        allow_patterns, ignore_patterns,
        repo=hub.repo, endpoint=api.endpoint, revision=hub.revision,
    )
    return FetchResult(root, [root / name for name in names], lineage)


def _remote_files(
    api: HfApi, repo: str, sha: str, allow_patterns, ignore_patterns
) -> dict[str, RepoFile]:
    selected = filter_repo_objects(
        remote_files(api, repo, sha).values(),
        allow_patterns=allow_patterns,
        ignore_patterns=ignore_patterns,
        key=lambda e: e.path,
    )
    return {entry.path: entry for entry in selected}


def _check_against_hub(
    hub: HubSource, sha: str, root: Path, record: dict, remote: RepoFile
) -> None:
    """The bytes on disk are the bytes the Hub lists (size always, sha256 for LFS files)."""
    expected = remote.lfs.sha256 if remote.lfs else record["sha256"]
    if record["size"] != remote.size or record["sha256"] != expected:
        raise CorruptCheckpointError(
            f"Hub repo {hub.repo}@{sha}: {record['path']} on disk ({record['size']:,} bytes, "
            f"sha256 {record['sha256']}) differs from the Hub's ({remote.size:,} bytes, sha256 "
            f"{expected}); delete {root / record['path']} and fetch again"
        )


def _remote_header(
    api: HfApi, repo: str, sha: str, name: str, size: int, token
) -> SafetensorsHeader:
    """Parse one remote file's header from ranged GETs (never the tensor data)."""
    label = f"{repo}@{sha}/{name}"
    url = hf_hub_url(repo, name, revision=sha, endpoint=api.endpoint)
    head = _get_range(url, token, 0, min(size, HEADER_PREFETCH_BYTES) - 1) if size >= 8 else b""
    header_len = header_length(head, size, label)
    raw = head[8 : 8 + header_len]
    if len(raw) < header_len:
        raw += _get_range(url, token, len(head), 8 + header_len - 1)
    return parse_header(raw, path=label, data_size=size - 8 - header_len)


def _get_range(url: str, token: str | None, first: int, last: int) -> bytes:
    # The session follows the Hub's redirect to its CDN and drops the token on the way, like
    # huggingface_hub's own get_safetensors_metadata.
    headers = {
        **build_hf_headers(token=token, library_name=LIBRARY),
        "Range": f"bytes={first}-{last}",
    }
    response = get_session().get(url, headers=headers)
    hf_raise_for_status(response)
    if response.status_code != 206 or len(response.content) != last - first + 1:
        raise SourceError(
            f"{url}: asked for bytes {first}-{last}, got HTTP {response.status_code} "
            f"with {len(response.content):,} bytes; the server must support Range requests"
        )
    return response.content


# ---- shared helpers --------------------------------------------------------------------------


def _require_safetensors(names: list[str], where: str, allow_patterns, ignore_patterns) -> None:
    if any(name.endswith(".safetensors") for name in names):
        return
    patterns = ""
    if allow_patterns is not None or ignore_patterns is not None:
        patterns = (
            f" matching allow_patterns={allow_patterns!r}, ignore_patterns={ignore_patterns!r}"
        )
    raise SourceError(
        f"{where}: no .safetensors file{patterns}; give a checkpoint folder, "
        "a .safetensors file or a Hub repo that holds one"
    )


def _hash_files(root: Path, names: list[str]) -> list[dict]:
    """[{path, size, sha256}] of ``names`` under ``root``; threads help (hashlib drops the GIL)."""

    def record(name: str) -> dict:
        size, digest = size_and_sha256(root / name)
        return {"path": name, "size": size, "sha256": digest}

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(record, names))


def _content_sha256(records: list[dict]) -> str:
    """A commit-like identity for local files: sha256 over their paths, sizes and sha256s."""
    lines = "".join(
        f"{r['path']}\t{r['size']}\t{r['sha256']}\n"
        for r in sorted(records, key=lambda r: r["path"])
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def _lineage(
    kind: str,
    source: str,
    commit_sha: str,
    commit_sha_kind: str,
    files: list[dict],
    allow_patterns,
    ignore_patterns,
    *,
    repo: str | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
) -> dict:
    """The lineage record; the same keys for every kind of source (see FetchResult)."""
    return {
        "kind": kind,
        "source": source,
        "repo": repo,
        "endpoint": endpoint,
        "revision": revision,
        "commit_sha": commit_sha,
        "commit_sha_kind": commit_sha_kind,
        "allow_patterns": _pattern_list(allow_patterns),
        "ignore_patterns": _pattern_list(ignore_patterns),
        "files": files,
    }


def _pattern_list(patterns: list[str] | str | None) -> list[str] | None:
    return [patterns] if isinstance(patterns, str) else None if patterns is None else list(patterns)


__all__ = [
    "FetchResult",
    "HubSource",
    "fetch_source",
    "fetch_source_task",
    "latest_revision",
    "list_remote_files",
    "parse_hub_source",
    "remote_safetensors_headers",
    "with_text_encoder",
]
