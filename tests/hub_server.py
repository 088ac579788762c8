"""A local Hugging Face Hub for tests: loopback HTTP, real huggingface_hub client.

It answers the requests huggingface_hub 2.4 makes, with the headers it reads:

    GET  /api/models/{repo}[/revision/{rev}]     model_info / repo_info: id, sha, siblings
    GET  /api/models/{repo}/tree/{rev}[/{dir}]   list_repo_tree (?recursive=...), LFS info
    GET  /api/models/{repo}/refs                 list_repo_refs
    HEAD|GET /{repo}/resolve/{rev}/{path}        file metadata and download
    HEAD|GET {blob_url}/blobs/{sha256}           the "CDN" the Hub redirects LFS files to

Plain files answer 200 with ETag (git blob sha1), X-Repo-Commit and Content-Length.
LFS files (``*.safetensors``, as in the Hub's default .gitattributes) answer 302 to a
second loopback port (another origin, like the Hub's CDN) with X-Linked-Etag (sha256),
X-Linked-Size and X-Repo-Commit, so the client drops the token and downloads from
``Location``. Range requests answer 206 with Content-Range. Errors look like the Hub's:
404 with ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``, and 401 when a
repo has a token and the request carries none (``RepoNotFound``, as the Hub says) or a
wrong one (``Invalid credentials in Authorization header``).

Usage (pytest)::

    from hub_server import LocalHub

    def test_x(tmp_path, monkeypatch):
        with LocalHub() as hub:
            sha = hub.add_repo("acme/tiny", fixture_dir)      # main -> sha
            hub.use(monkeypatch, tmp_path / "hf-home")
            fetch_source("acme/tiny")                         # real snapshot_download
            new_sha = hub.commit("acme/tiny", other_dir)      # main moves on
            hub.set_ref("acme/tiny", "main", sha)             # ... or back

Pointing huggingface_hub at the server. huggingface_hub copies ``HF_ENDPOINT`` into
``huggingface_hub.constants`` when it is imported, so setting the variable later does not
move it. In-process, ``hub.use(monkeypatch, home)`` sets ``HF_ENDPOINT`` (tasks/sources.py
reads it at call time and passes ``endpoint=`` to every call), patches
``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` and the module-level
``HfApi`` (so bare ``hf_hub_download``/``model_info`` calls land here too), and isolates
the client from the user's login and cache (``HF_TOKEN`` unset, token file and
``HF_HUB_CACHE`` under ``home``). For subprocesses (CLI, Prefect or Dask workers) pass
``env={**os.environ, **hub.environ(home)}``: the variables are read at their import.

Faults, for resume and retry tests: ``hub.interrupt(path, after_bytes)`` makes the next GET
of that file send ``after_bytes`` bytes of its body, then drop the connection (the client
resumes with ``Range: bytes=N-``); ``hub.fail(path, status)`` answers the next GET with an
error status. ``hub.requests`` records every request (method, path, Range, status) for
assertions.

Files are copied into the server's own content-addressed store when committed, so a test
may change or delete its fixture directory afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors",)
_CHUNK = 1 << 20
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("tree", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")),
    ("refs", re.compile(rf"^/api/models/{_REPO}/refs$")),
    ("resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
    ("blob", re.compile(r"^/blobs/(?P<sha>[0-9a-f]{64})$")),
]


@dataclass(frozen=True)
class HubFile:
    path: str  # posix path inside the repo
    size: int
    sha256: str
    git_oid: str  # git blob sha1 of the content, or of the LFS pointer for LFS files
    lfs_pointer_size: int | None  # None for a plain (non-LFS) file


@dataclass
class HubRepo:
    token: str | None
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    range: str | None
    status: int
    authorized: bool


class LocalHub:
    """Serve fixture repos to huggingface_hub from 127.0.0.1 (a context manager)."""

    def __init__(self) -> None:
        self._store = Path(tempfile.mkdtemp(prefix="local-hub-"))
        self._repos: dict[str, HubRepo] = {}
        self._paths_by_sha: dict[str, set[str]] = {}
        self._faults: dict[str, list[tuple[str, int]]] = {}
        self._lock = threading.Lock()
        self.requests: list[RequestRecord] = []
        self._servers = [_HubHTTPServer(self), _HubHTTPServer(self)]
        self.url, self.blob_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        for server in self._servers:  # a short poll interval keeps close() quick
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        shutil.rmtree(self._store, ignore_errors=True)

    # ---- repos and revisions -------------------------------------------------------------

    def add_repo(
        self, repo_id: str, directory: str | os.PathLike, *, token: str | None = None
    ) -> str:
        """Create a repo whose ``main`` holds the files of ``directory``; return the commit sha."""
        self._repos[repo_id] = HubRepo(token=token)
        return self.commit(repo_id, directory)

    def commit(self, repo_id: str, directory: str | os.PathLike, branch: str = "main") -> str:
        """Commit the files of ``directory``, point ``branch`` at the commit, return its sha."""
        repo = self._repos[repo_id]
        files = {f.path: f for f in self._store_files(Path(directory))}
        parent = repo.refs.get(branch, "")
        tree = "".join(
            f"{f.path}\0{f.sha256}\n" for f in sorted(files.values(), key=lambda f: f.path)
        )
        sha = hashlib.sha1(f"{repo_id}\n{parent}\n{len(repo.commits)}\n{tree}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.refs[branch] = sha
        return sha

    def set_ref(self, repo_id: str, name: str, sha: str) -> None:
        """Point a branch or tag at an existing commit (e.g. move ``main`` back)."""
        repo = self._repos[repo_id]
        if sha not in repo.commits:
            raise KeyError(f"{repo_id} has no commit {sha}")
        repo.refs[name] = sha

    # ---- faults and pointing the client here -----------------------------------------------

    def interrupt(self, path: str, after_bytes: int, times: int = 1) -> None:
        """The next ``times`` GETs of ``path`` with a body over ``after_bytes`` break off there."""
        with self._lock:
            self._faults.setdefault(path, []).extend([("interrupt", after_bytes)] * times)

    def fail(self, path: str, status: int = 500, times: int = 1) -> None:
        """The next ``times`` GETs of ``path`` answer ``status`` with no body."""
        with self._lock:
            self._faults.setdefault(path, []).extend([("fail", status)] * times)

    def environ(self, home: str | os.PathLike) -> dict[str, str]:
        """Environment for a subprocess: this endpoint, no user login, a private cache."""
        home = Path(home)
        return {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_TOKEN": "",  # empty means no token to huggingface_hub
            "HUGGING_FACE_HUB_TOKEN": "",
        }

    def use(self, monkeypatch, home: str | os.PathLike) -> None:
        """Point this process's huggingface_hub here (undone by monkeypatch at test end)."""
        from huggingface_hub import constants, hf_api

        for name, value in self.environ(home).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            self.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(home) / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(Path(home) / "token"))
        monkeypatch.setattr(hf_api.api, "endpoint", self.url)

    def gets(self, path_suffix: str) -> list[RequestRecord]:
        """GET requests whose path ends with ``path_suffix`` (a file or blob sha)."""
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(path_suffix)]

    # ---- internals used by the handler ---------------------------------------------------------

    def _store_files(self, directory: Path) -> list[HubFile]:
        files = []
        for source in sorted(p for p in directory.rglob("*") if p.is_file()):
            with open(source, "rb") as handle:
                sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
            blob = self._store / sha256
            if not blob.exists():
                shutil.copyfile(source, blob)
            path = source.relative_to(directory).as_posix()
            files.append(_hub_file(path, blob, sha256))
            self._paths_by_sha.setdefault(sha256, set()).add(path)
        return files

    def _take_fault(self, sha256: str, body_size: int) -> tuple[str, int] | None:
        with self._lock:
            for path in self._paths_by_sha.get(sha256, ()):
                queue = self._faults.get(path, [])
                for i, (kind, value) in enumerate(queue):
                    if kind == "fail" or body_size > value:
                        return queue.pop(i)
        return None

    def _resolve(self, repo_id: str, rev: str, token: str | None) -> tuple[HubRepo, str]:
        """Return (repo, commit sha) or raise _HubError like the Hub would."""
        repo = self._repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        if repo.token is not None and token != repo.token:
            if token is None:
                raise _HubError(401, "RepoNotFound", "Repository not found")
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, sha


def _hub_file(path: str, blob: Path, sha256: str) -> HubFile:
    size = blob.stat().st_size
    if not path.endswith(LFS_SUFFIXES):  # plain git files are small: hash their bytes
        return HubFile(path, size, sha256, _git_blob_sha1(blob.read_bytes()), None)
    spec = "version https://git-lfs.github.com/spec/v1"
    pointer = f"{spec}\noid sha256:{sha256}\nsize {size}\n".encode()
    return HubFile(path, size, sha256, _git_blob_sha1(pointer), len(pointer))


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: LocalHub):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.hub = hub


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every reply carries Content-Length
    timeout = 30  # idle keep-alive connections end on their own
    server: _HubHTTPServer

    def log_message(self, format, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    # ---- routing -------------------------------------------------------------------------------

    def _dispatch(self, send_body: bool) -> None:
        url = urlsplit(self.path)
        self._send_body = send_body
        self._query = parse_qs(url.query)
        try:
            for name, pattern in _ROUTES:
                match = pattern.match(url.path)
                if match:
                    groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return getattr(self, f"_{name}")(**groups)
            raise _HubError(404, None, f"no route for {url.path}")
        except _HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            self._reply_json(error.status, {"error": error.message}, headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ").strip() or None

    def _info(self, repo: str, rev: str = "main") -> None:
        hub_repo, sha = self.server.hub._resolve(repo, rev, self._token())
        siblings = [_sibling(f) for f in hub_repo.commits[sha].values()]
        self._reply_json(
            200,
            {
                "_id": sha[:24],
                "id": repo,
                "modelId": repo,
                "sha": sha,
                "private": hub_repo.token is not None,
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            },
        )

    def _tree(self, repo: str, rev: str, path: str = "") -> None:
        hub_repo, sha = self.server.hub._resolve(repo, rev, self._token())
        recursive = self._query.get("recursive", ["false"])[0].lower() == "true"
        entries = _tree_entries(hub_repo.commits[sha], path.strip("/"), recursive)
        if entries is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist", commit=sha)
        self._reply_json(200, entries)

    def _refs(self, repo: str) -> None:
        hub_repo, _ = self.server.hub._resolve(repo, "main", self._token())
        branches = [
            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
            for n, s in hub_repo.refs.items()
        ]
        self._reply_json(200, {"branches": branches, "tags": [], "converts": []})

    def _resolve(self, repo: str, rev: str, path: str) -> None:
        hub_repo, sha = self.server.hub._resolve(repo, rev, self._token())
        entry = hub_repo.commits[sha].get(path)
        if entry is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist at {sha}", commit=sha)
        if entry.lfs_pointer_size is not None:
            self._reply(
                302,
                {
                    "Location": f"{self.server.hub.blob_url}/blobs/{entry.sha256}",
                    "X-Repo-Commit": sha,
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": str(entry.size),
                    "ETag": f'"{entry.git_oid}"',
                    "Content-Length": "0",
                },
            )
            return
        self._send_file(
            entry.sha256, entry.size, {"X-Repo-Commit": sha, "ETag": f'"{entry.git_oid}"'}
        )

    def _blob(self, sha: str) -> None:
        blob = self.server.hub._store / sha
        if not blob.exists():
            raise _HubError(404, None, "no such blob")
        self._send_file(sha, blob.stat().st_size, {"ETag": f'"{sha}"'})

    # ---- replies -------------------------------------------------------------------------------

    def _send_file(self, sha256: str, size: int, headers: dict[str, str]) -> None:
        start, end = _parse_range(self.headers.get("Range"), size)
        headers = {
            **headers,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Length": str(end - start),
        }
        status = 200
        if self.headers.get("Range"):
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        fault = self.server.hub._take_fault(sha256, end - start) if self._send_body else None
        if fault and fault[0] == "fail":
            raise _HubError(fault[1], None, "injected failure")
        self._reply(status, headers)
        if not self._send_body:
            return
        stop = start + fault[1] if fault else end
        with open(self.server.hub._store / sha256, "rb") as handle:
            handle.seek(start)
            while (remaining := stop - handle.tell()) > 0:
                self.wfile.write(handle.read(min(_CHUNK, remaining)))
        if fault:  # drop the connection mid-body: the client sees fewer bytes than promised
            self.wfile.flush()
            self.close_connection = True

    def _reply_json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._reply(
            status,
            {
                **(headers or {}),
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
            },
        )
        if self._send_body:
            self.wfile.write(body)

    def _reply(self, status: int, headers: dict[str, str]) -> None:
        self.server.hub.requests.append(
            RequestRecord(
                self.command,
                unquote(urlsplit(self.path).path),
                self.headers.get("Range"),
                status,
                self.headers.get("Authorization") is not None,
            )
        )
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()


def _parse_range(header: str | None, size: int) -> tuple[int, int]:
    """Byte range [start, end) for ``Range: bytes=a-b | a- | -n`` (the whole file if absent)."""
    if not header:
        return 0, size
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not match or match.groups() == ("", ""):
        raise _HubError(416, None, f"unsupported range {header}")
    first, last = match.groups()
    if first == "":
        return max(size - int(last), 0), size
    start, end = int(first), min(int(last) + 1 if last else size, size)
    if start >= size or start >= end:
        raise _HubError(416, None, f"range {header} outside a {size}-byte file")
    return start, end


def _sibling(entry: HubFile) -> dict:
    sibling = {"rfilename": entry.path, "size": entry.size, "blobId": entry.git_oid}
    if entry.lfs_pointer_size is not None:
        sibling["lfs"] = {
            "size": entry.size,
            "sha256": entry.sha256,
            "pointerSize": entry.lfs_pointer_size,
        }
    return sibling


def _tree_entries(files: dict[str, HubFile], directory: str, recursive: bool) -> list[dict] | None:
    """The Hub's tree listing of ``directory`` (None if it does not exist)."""
    prefix = f"{directory}/" if directory else ""
    below = [f for p, f in files.items() if p.startswith(prefix)]
    if directory and not below:
        return None
    dirs, entries = set(), []
    for entry in below:
        parts = entry.path[len(prefix) :].split("/")
        for depth in range(1, len(parts)):
            dirs.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append(_file_entry(entry))
    if not recursive:
        dirs = {d for d in dirs if "/" not in d[len(prefix) :]}
    folder_entries = [
        {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d} for d in dirs
    ]
    return sorted(folder_entries + entries, key=lambda e: e["path"])


def _file_entry(entry: HubFile) -> dict:
    item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": entry.path}
    if entry.lfs_pointer_size is not None:
        item["lfs"] = {
            "oid": entry.sha256,
            "size": entry.size,
            "pointerSize": entry.lfs_pointer_size,
        }
    return item
