"""A local Hugging Face Hub for tests: loopback HTTP, real huggingface_hub client.

It answers the requests huggingface_hub 2.4 makes, with the headers it reads. Reading:

    GET  /api/models/{repo}[/revision/{rev}]     model_info / repo_info: id, sha, siblings
    GET  /api/models/{repo}/tree/{rev}[/{dir}]   list_repo_tree (?recursive=...), LFS info
    GET  /api/models/{repo}/refs                 list_repo_refs
    HEAD|GET /{repo}/resolve/{rev}/{path}        file metadata and download
    HEAD|GET {blob_url}/blobs/{sha256}           the "CDN" the Hub redirects LFS files to

Writing (create_repo, create_branch, create_commit / upload_folder over the LFS protocol):

    POST /api/repos/create                       409 when the repo exists (exist_ok)
    POST /api/models/{repo}/branch/{branch}      from ``startingPoint`` or main; 409 if it exists
    POST /api/validate-yaml                      the model card's front matter must parse
    POST /api/models/{repo}/preupload/{rev}      upload mode (lfs | regular) and remote oid
    POST /{repo}.git/info/lfs/objects/batch      upload actions; none for blobs already stored
    PUT  {blob_url}/upload/{sha256}              basic transfer (one PUT), sha256 checked
    PUT  {blob_url}/upload/{sha256}/part/{n}     multipart transfer, parts of ``chunk_size``
    POST {blob_url}/upload/{sha256}              multipart completion (parts and their ETags)
    POST /{repo}.git/info/lfs/objects/verify     the blob is stored with that size
    POST /api/models/{repo}/commit/{rev}         ndjson: header (parentCommit), file, lfsFile,
                                                 deletedFile, deletedFolder; 412 on a stale parent

Plain files answer 200 with ETag (git blob sha1), X-Repo-Commit and Content-Length.
LFS files (``*.safetensors`` and the other LFS_SUFFIXES, as in the Hub's default
.gitattributes, or any file over 10 MB) answer 302 to a second loopback port (another
origin, like the Hub's CDN) with X-Linked-Etag (sha256), X-Linked-Size and X-Repo-Commit,
so the client drops the token and downloads from ``Location``. Range requests answer 206
with Content-Range. Errors look like the Hub's: 404 with ``X-Error-Code: RepoNotFound |
RevisionNotFound | EntryNotFound``, and 401 when a repo (or the whole server) has a token
and the request carries none (``RepoNotFound``, as the Hub says) or a wrong one (``Invalid
credentials in Authorization header``). Uploads to the blob origin carry no token, like the
Hub's pre-signed storage URLs.

Usage (pytest)::

    from hub_server import LocalHub

    def test_x(tmp_path, monkeypatch):
        with LocalHub() as hub:
            sha = hub.add_repo("acme/tiny", fixture_dir)      # main -> sha
            hub.use(monkeypatch, tmp_path / "hf-home")
            fetch_source("acme/tiny")                         # real snapshot_download
            new_sha = hub.commit("acme/tiny", other_dir)      # main moves on
            hub.set_ref("acme/tiny", "main", sha)             # ... or back
            HfApi().upload_folder(repo_id="acme/tiny", folder_path=d)   # real uploads

By hand (the whole round trip, from the repository root)::

    python -m tests.hub_server --root /tmp/hub --port 8765 [--token T] [--repo o/n=DIR]
    HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1 hlwq publish ART me/art

``--root`` keeps the repos (state.json and the blobs) across restarts; no token is needed
unless ``--token`` is given.

Pointing huggingface_hub at the server. huggingface_hub copies ``HF_ENDPOINT`` into
``huggingface_hub.constants`` when it is imported, so setting the variable later does not
move it. In-process, ``hub.use(monkeypatch, home)`` sets ``HF_ENDPOINT`` (tasks/sources.py
and runtime/hub.py read it at call time and pass ``endpoint=`` to every call), patches
``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` and the module-level
``HfApi`` (so bare ``hf_hub_download``/``model_info`` calls land here too), turns the Xet
upload protocol off (``HF_HUB_DISABLE_XET``: this server speaks LFS, which the client uses
without Xet), and isolates the client from the user's login and cache (``HF_TOKEN`` unset,
token file and ``HF_HUB_CACHE`` under ``home``). For subprocesses (CLI, Prefect or Dask
workers) pass ``env={**os.environ, **hub.environ(home)}``: the variables are read at their
import.

Faults, for resume and retry tests: ``hub.interrupt(path, after_bytes)`` makes the next GET
of that file send ``after_bytes`` bytes of its body, then drop the connection (the client
resumes with ``Range: bytes=N-``); ``hub.fail(path, status)`` answers the next GET with an
error status; ``hub.fail_route(name, status)`` the next request of a route (``"commit"``,
``"upload"``, ...). ``hub.requests`` records every request (method, path, Range, status)
for assertions.

Files are copied into the server's own content-addressed store when committed, so a test
may change or delete its fixture directory afterwards.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".parquet", ".bin", ".pt", ".pth", ".mp4", ".png", ".jpg")
LFS_MIN_BYTES = 10 * 1000 * 1000  # the Hub stores any file over 10 MB in LFS
DEFAULT_CHUNK_BYTES = 64 << 20  # multipart transfer for larger files, in parts of this size
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n"
                        for suffix in LFS_SUFFIXES)
_CHUNK = 1 << 20
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_GIT = r"^/(?P<repo>[^/]+/[^/]+?)\.git/info/lfs/objects"
_SHA = r"(?P<sha>[0-9a-f]{64})"
_ROUTES = {
    "GET": [
        ("info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
        ("tree", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")),
        ("refs", re.compile(rf"^/api/models/{_REPO}/refs$")),
        ("resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
        ("blob", re.compile(rf"^/blobs/{_SHA}$")),
    ],
    "POST": [
        ("create_repo", re.compile(r"^/api/repos/create$")),
        ("branch", re.compile(rf"^/api/models/{_REPO}/branch/(?P<branch>[^/]+)$")),
        ("validate_yaml", re.compile(r"^/api/validate-yaml$")),
        ("preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")),
        ("commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")),
        ("lfs_batch", re.compile(rf"{_GIT}/batch$")),
        ("lfs_verify", re.compile(rf"{_GIT}/verify$")),
        ("complete_upload", re.compile(rf"^/upload/{_SHA}$")),
    ],
    "PUT": [
        ("upload", re.compile(rf"^/upload/{_SHA}$")),
        ("upload_part", re.compile(rf"^/upload/{_SHA}/part/(?P<part>\d+)$")),
    ],
}
_ROUTES["HEAD"] = _ROUTES["GET"]


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
    private: bool = False
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
    """Serve repos to huggingface_hub from 127.0.0.1 and take uploads (a context manager).

    ``root``: where blobs and the repos' state live (kept after close; default a temporary
    folder, removed at close). ``token``: required on every API request when given.
    ``chunk_bytes``: files larger than this upload in multipart parts of this size.
    """

    def __init__(self, root: str | os.PathLike | None = None, token: str | None = None,
                 port: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self._keep = root is not None
        self._root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="local-hub-"))
        self._store = self._root / "blobs"
        self._uploads = self._root / "uploads"
        self._store.mkdir(parents=True, exist_ok=True)
        self.token, self.chunk_bytes = token, chunk_bytes
        self._repos: dict[str, HubRepo] = self._load_state()
        self._paths_by_sha: dict[str, set[str]] = {}
        self._faults: dict[str, list[tuple[str, int]]] = {}
        self._route_faults: dict[str, list[int]] = {}
        self._lock = threading.RLock()
        self.requests: list[RequestRecord] = []
        self._servers = [_HubHTTPServer(self, port), _HubHTTPServer(self, 0)]
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
        if not self._keep:
            shutil.rmtree(self._root, ignore_errors=True)

    # ---- repos and revisions -------------------------------------------------------------

    def add_repo(
        self, repo_id: str, directory: str | os.PathLike, *, token: str | None = None
    ) -> str:
        """Create a repo whose ``main`` holds the files of ``directory``; return the commit sha."""
        self._repos[repo_id] = HubRepo(token=token, private=token is not None)
        return self.commit(repo_id, directory)

    def commit(self, repo_id: str, directory: str | os.PathLike, branch: str = "main") -> str:
        """Commit the files of ``directory``, point ``branch`` at the commit, return its sha."""
        files = {f.path: f for f in self._store_files(Path(directory))}
        return self._new_commit(repo_id, branch, files)

    def set_ref(self, repo_id: str, name: str, sha: str) -> None:
        """Point a branch or tag at an existing commit (e.g. move ``main`` back)."""
        repo = self._repos[repo_id]
        if sha not in repo.commits:
            raise KeyError(f"{repo_id} has no commit {sha}")
        repo.refs[name] = sha
        self._save_state()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, HubFile]:
        """The files of a repo at a branch or commit."""
        repo = self._repos[repo_id]
        return dict(repo.commits[repo.refs.get(revision, revision)])

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return (self._store / self.files(repo_id, revision)[path].sha256).read_bytes()

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self._repos[repo_id].refs[branch]

    # ---- faults and pointing the client here -----------------------------------------------

    def interrupt(self, path: str, after_bytes: int, times: int = 1) -> None:
        """The next ``times`` GETs of ``path`` with a body over ``after_bytes`` break off there."""
        with self._lock:
            self._faults.setdefault(path, []).extend([("interrupt", after_bytes)] * times)

    def fail(self, path: str, status: int = 500, times: int = 1) -> None:
        """The next ``times`` GETs of ``path`` answer ``status`` with no body."""
        with self._lock:
            self._faults.setdefault(path, []).extend([("fail", status)] * times)

    def fail_route(self, route: str, status: int = 500, times: int = 1) -> None:
        """The next ``times`` requests of ``route`` (e.g. "commit", "upload") answer ``status``."""
        with self._lock:
            self._route_faults.setdefault(route, []).extend([status] * times)

    def environ(self, home: str | os.PathLike) -> dict[str, str]:
        """Environment for a subprocess: this endpoint, no user login, a private cache."""
        home = Path(home)
        return {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",  # this server speaks LFS, not the Xet protocol
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
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hf_api.api, "endpoint", self.url)

    def gets(self, path_suffix: str) -> list[RequestRecord]:
        """GET requests whose path ends with ``path_suffix`` (a file or blob sha)."""
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(path_suffix)]

    def uploads(self) -> list[RequestRecord]:
        """PUT requests that carried file bytes to the blob origin (basic or multipart)."""
        return [r for r in self.requests if r.method == "PUT" and r.path.startswith("/upload/")]

    def commits_made(self) -> list[RequestRecord]:
        return [r for r in self.requests
                if r.method == "POST" and "/commit/" in r.path and r.status == 200]

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
            files.append(_hub_file(path, blob, sha256, _is_lfs(path, blob.stat().st_size)))
        return files

    def _new_commit(self, repo_id: str, branch: str, files: dict[str, HubFile]) -> str:
        with self._lock:
            repo = self._repos[repo_id]
            parent = repo.refs.get(branch, "")
            tree = "".join(
                f"{f.path}\0{f.sha256}\n" for f in sorted(files.values(), key=lambda f: f.path)
            )
            sha = hashlib.sha1(
                f"{repo_id}\n{parent}\n{len(repo.commits)}\n{tree}".encode()
            ).hexdigest()
            repo.commits[sha] = files
            repo.refs[branch] = sha
            for entry in files.values():
                self._paths_by_sha.setdefault(entry.sha256, set()).add(entry.path)
            self._save_state()
        return sha

    def _take_fault(self, sha256: str, body_size: int) -> tuple[str, int] | None:
        with self._lock:
            for path in self._paths_by_sha.get(sha256, ()):
                queue = self._faults.get(path, [])
                for i, (kind, value) in enumerate(queue):
                    if kind == "fail" or body_size > value:
                        return queue.pop(i)
        return None

    def _take_route_fault(self, route: str) -> int | None:
        with self._lock:
            queue = self._route_faults.get(route)
            return queue.pop(0) if queue else None

    def _check_token(self, token: str | None) -> None:
        if self.token is not None and token != self.token:
            _refuse(token)

    def _repo(self, repo_id: str, token: str | None) -> HubRepo:
        self._check_token(token)
        repo = self._repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        if repo.token is not None and token != repo.token:
            _refuse(token)
        return repo

    def _resolve(self, repo_id: str, rev: str, token: str | None) -> tuple[HubRepo, str]:
        """Return (repo, commit sha) or raise _HubError like the Hub would."""
        repo = self._repo(repo_id, token)
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, sha

    def _state_path(self) -> Path:
        return self._root / "state.json"

    def _load_state(self) -> dict[str, HubRepo]:
        if not self._state_path().is_file():
            return {}
        state = json.loads(self._state_path().read_text())
        return {repo_id: HubRepo(token=r["token"], private=r["private"], refs=r["refs"],
                                 commits={sha: {p: HubFile(**f) for p, f in files.items()}
                                          for sha, files in r["commits"].items()})
                for repo_id, r in state.items()}

    def _save_state(self) -> None:
        if not self._keep:
            return
        state = {repo_id: {"token": r.token, "private": r.private, "refs": r.refs,
                           "commits": {sha: {p: asdict(f) for p, f in files.items()}
                                       for sha, files in r.commits.items()}}
                 for repo_id, r in self._repos.items()}
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_path())


def _refuse(token: str | None):
    if token is None:
        raise _HubError(401, "RepoNotFound", "Repository not found")
    raise _HubError(401, None, "Invalid credentials in Authorization header")


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > LFS_MIN_BYTES


def _hub_file(path: str, blob: Path, sha256: str, lfs: bool) -> HubFile:
    size = blob.stat().st_size
    if not lfs:  # plain git files are small: hash their bytes
        return HubFile(path, size, sha256, _git_blob_sha1(blob.read_bytes()), None)
    spec = "version https://git-lfs.github.com/spec/v1"
    pointer = f"{spec}\noid sha256:{sha256}\nsize {size}\n".encode()
    return HubFile(path, size, sha256, _git_blob_sha1(pointer), len(pointer))


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit
        self.extra = extra or {}  # more fields of the JSON body (create_repo's 409 has "url")


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: LocalHub, port: int):
        super().__init__(("127.0.0.1", port), _HubHandler)
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

    def do_POST(self) -> None:
        self._dispatch(send_body=True)

    def do_PUT(self) -> None:
        self._dispatch(send_body=True)

    # ---- routing -------------------------------------------------------------------------------

    def _dispatch(self, send_body: bool) -> None:
        url = urlsplit(self.path)
        self._send_body = send_body
        self._query = parse_qs(url.query)
        self._body_read = self.command in ("GET", "HEAD")
        try:
            for name, pattern in _ROUTES[self.command]:
                match = pattern.match(url.path)
                if match:
                    status = self.server.hub._take_route_fault(name)
                    if status is not None:
                        raise _HubError(status, None, f"injected failure of {name}")
                    groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return getattr(self, f"_{name}")(**groups)
            raise _HubError(404, None, f"no route for {self.command} {url.path}")
        except _HubError as error:
            if not self._body_read:  # an unread body would be taken for the next request
                self.close_connection = True
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            self._reply_json(error.status, {"error": error.message, **error.extra}, headers)

    # ---- request bodies ------------------------------------------------------------------------

    def _body_chunks(self):
        """The request body in pieces: Content-Length or chunked transfer encoding."""
        self._body_read = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            piece = self.rfile.read(min(_CHUNK, remaining))
            if not piece:
                raise _HubError(400, None, "request body ended early")
            remaining -= len(piece)
            yield piece

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _json_body(self):
        try:
            return json.loads(self._body() or b"null")
        except json.JSONDecodeError as exc:
            raise _HubError(400, None, f"body is not JSON: {exc}") from None

    def _write_body(self, target: Path) -> tuple[int, str]:
        """Stream the body to ``target``; return (size, sha256)."""
        digest, size = hashlib.sha256(), 0
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as handle:
            for piece in self._body_chunks():
                digest.update(piece)
                size += len(piece)
                handle.write(piece)
        return size, digest.hexdigest()

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
                "private": hub_repo.private,
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

    # ---- writing: repos and branches -------------------------------------------------------

    def _create_repo(self) -> None:
        hub, token = self.server.hub, self._token()
        payload = self._json_body() or {}
        hub._check_token(token)
        if payload.get("type", "model") not in (None, "model"):
            raise _HubError(400, None, "this local Hub holds model repos only")
        repo_id = f"{payload.get('organization')}/{payload.get('name')}"
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise _HubError(400, None, f"invalid repo name {repo_id!r}")
        url = f"{hub.url}/{repo_id}"
        with hub._lock:
            if repo_id in hub._repos:
                raise _HubError(409, None, "You already created this model repo",
                                extra={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            hub._repos[repo_id] = HubRepo(token=token if private else None, private=private)
            blob = _put_blob(hub, GITATTRIBUTES.encode())
            hub._new_commit(repo_id, "main", {".gitattributes": blob})
        self._reply_json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(url.encode())
                               .hexdigest()[:24]})

    def _branch(self, repo: str, branch: str) -> None:
        hub, payload = self.server.hub, self._json_body() or {}
        start = payload.get("startingPoint") or "main"
        hub_repo, sha = hub._resolve(repo, start, self._token())
        with hub._lock:
            if branch in hub_repo.refs:
                raise _HubError(409, None, f"Reference already exists: refs/heads/{branch}")
            hub_repo.refs[branch] = sha
            hub._save_state()
        self._reply_json(200, {})

    def _validate_yaml(self) -> None:
        import yaml

        content = (self._json_body() or {}).get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            raise _HubError(400, None, f"Invalid YAML in the model card: {exc}") from None
        if metadata is not None and not isinstance(metadata, dict):
            raise _HubError(400, None, "The model card's metadata must be a YAML mapping")
        self._reply_json(200, {"errors": [], "warnings": []})

    # ---- writing: the LFS protocol --------------------------------------------------------------

    def _preupload(self, repo: str, rev: str) -> None:
        payload = self._json_body() or {}
        hub_repo, sha = self.server.hub._resolve(repo, rev, self._token())
        current = hub_repo.commits[sha]
        files = []
        for item in payload.get("files", []):
            lfs = _is_lfs(item["path"], item["size"])
            existing = current.get(item["path"])
            oid = None
            if existing is not None and (existing.lfs_pointer_size is not None) == lfs:
                oid = existing.sha256 if lfs else existing.git_oid
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self._reply_json(200, {"files": files, "commitOid": sha})

    def _lfs_batch(self, repo: str) -> None:
        hub, payload = self.server.hub, self._json_body() or {}
        hub._repo(repo, self._token())
        if payload.get("operation") != "upload":
            raise _HubError(400, None, "this local Hub takes LFS uploads only")
        multipart = "multipart" in payload.get("transfers", [])
        objects = []
        for item in payload.get("objects", []):
            oid, size = item["oid"], item["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not (hub._store / oid).exists():  # a stored blob needs no upload (resumes)
                upload = {"href": f"{hub.blob_url}/upload/{oid}"}
                if multipart and size > hub.chunk_bytes:
                    parts = -(-size // hub.chunk_bytes)
                    upload["header"] = {"chunk_size": str(hub.chunk_bytes), **{
                        str(n): f"{hub.blob_url}/upload/{oid}/part/{n}"
                        for n in range(1, parts + 1)}}
                entry["actions"] = {"upload": upload, "verify": {
                    "href": f"{hub.url}/{repo}.git/info/lfs/objects/verify"}}
            objects.append(entry)
        transfer = "multipart" if multipart else "basic"
        self._reply_json(200, {"transfer": transfer, "objects": objects},
                         {"Content-Type": "application/vnd.git-lfs+json"})

    def _upload(self, sha: str) -> None:
        hub = self.server.hub
        partial = hub._uploads / f"{sha}.{threading.get_ident()}"
        _, digest = self._write_body(partial)
        _keep_blob(hub, partial, sha, digest)
        self._reply(200, {"Content-Length": "0", "ETag": f'"{sha}"'})

    def _upload_part(self, sha: str, part: str) -> None:
        hub = self.server.hub
        size, digest = self._write_body(hub._uploads / sha / f"{int(part):05d}")
        self._reply(200, {"Content-Length": "0", "ETag": f'"{digest}-{size}"'})

    def _complete_upload(self, sha: str) -> None:
        hub, payload = self.server.hub, self._json_body() or {}
        folder = hub._uploads / sha
        numbers = [part["partNumber"] for part in payload.get("parts", [])]
        if payload.get("oid") != sha or numbers != list(range(1, len(numbers) + 1)):
            raise _HubError(400, None, "completion must list parts 1..N of this object")
        partial = hub._uploads / f"{sha}.{threading.get_ident()}"
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for number in numbers:
                part = folder / f"{number:05d}"
                if not part.is_file():
                    raise _HubError(400, None, f"part {number} was never uploaded")
                with open(part, "rb") as handle:
                    while piece := handle.read(_CHUNK):
                        digest.update(piece)
                        out.write(piece)
        _keep_blob(hub, partial, sha, digest.hexdigest())
        shutil.rmtree(folder, ignore_errors=True)
        self._reply_json(200, {})

    def _lfs_verify(self, repo: str) -> None:
        hub, payload = self.server.hub, self._json_body() or {}
        hub._repo(repo, self._token())
        blob = hub._store / str(payload.get("oid"))
        if not blob.is_file() or blob.stat().st_size != payload.get("size"):
            raise _HubError(404, None, f"object {payload.get('oid')} is not stored")
        self._reply_json(200, {})

    # ---- writing: commits -----------------------------------------------------------------------

    def _commit(self, repo: str, rev: str) -> None:
        hub = self.server.hub
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if self._query.get("create_pr"):
            raise _HubError(400, None, "this local Hub does not open pull requests")
        with hub._lock:
            hub_repo, head = hub._resolve(repo, rev, self._token())
            if rev not in hub_repo.refs:
                raise _HubError(400, None, f"commits go to a branch; {rev!r} is not one")
            files = dict(hub_repo.commits[head])
            for line in lines:
                _apply_operation(hub, files, head, line["key"], line["value"])
            sha = hub._new_commit(repo, rev, files)
        self._reply_json(200, {"success": True, "commitOid": sha, "pullRequestUrl": None,
                               "commitUrl": f"{hub.url}/{repo}/commit/{sha}", "hookOutput": ""})

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


def _put_blob(hub: LocalHub, data: bytes, lfs: bool = False, path: str = ".gitattributes"
              ) -> HubFile:
    """Store ``data`` as a blob; the HubFile of ``path`` holding it."""
    sha256 = hashlib.sha256(data).hexdigest()
    blob = hub._store / sha256
    if not blob.exists():
        partial = hub._uploads / f"{sha256}.{threading.get_ident()}"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)
        os.replace(partial, blob)
    return _hub_file(path, blob, sha256, lfs)


def _keep_blob(hub: LocalHub, partial: Path, sha: str, digest: str) -> None:
    """Move an uploaded object into the store, or refuse it when its bytes are not ``sha``."""
    if digest != sha:
        partial.unlink(missing_ok=True)
        raise _HubError(400, None, f"uploaded bytes hash to {digest}, not {sha}")
    os.replace(partial, hub._store / sha)


def _apply_operation(hub: LocalHub, files: dict[str, HubFile], head: str, key: str,
                     value: dict) -> None:
    """One line of a commit's ndjson payload, applied to ``files`` (the new tree)."""
    if key == "header":
        parent = value.get("parentCommit")
        if parent is not None and parent != head:
            raise _HubError(412, None, "A commit has happened since. Please refresh and try again.")
    elif key == "file":
        if value.get("encoding") != "base64":
            raise _HubError(400, None, "file content must be base64")
        files[value["path"]] = _put_blob(hub, base64.b64decode(value["content"]),
                                         path=value["path"])
    elif key == "lfsFile":
        blob = hub._store / value["oid"]
        if not blob.is_file() or ("size" in value and blob.stat().st_size != value["size"]):
            raise _HubError(422, None, f"LFS object {value['oid']} of {value['path']} was "
                            "not uploaded")
        files[value["path"]] = _hub_file(value["path"], blob, value["oid"], True)
    elif key == "deletedFile":
        if files.pop(value["path"], None) is None:
            raise _HubError(404, "EntryNotFound", f"A file with this name doesn't exist: "
                            f"{value['path']}")
    elif key == "deletedFolder":
        prefix = value["path"].rstrip("/") + "/"
        for path in [p for p in files if p.startswith(prefix)]:
            del files[path]
    else:
        raise _HubError(400, None, f"unknown commit operation {key!r}")


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


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.hub_server --root DIR --port N [--token T] [--repo owner/name=DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="where repos and blobs are kept")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", help="require this token on every API request")
    parser.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=DIR",
                        help="serve DIR's files as a repo (a new commit on main)")
    args = parser.parse_args(argv)
    hub = LocalHub(root=args.root, token=args.token, port=args.port)
    for spec in args.repo:
        repo_id, _, directory = spec.partition("=")
        if repo_id in hub._repos:
            hub.commit(repo_id, directory)
        else:
            hub.add_repo(repo_id, directory)
    print(f"local Hub at {hub.url} (blobs at {hub.blob_url}), state in {args.root}; "
          f"use HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.close()


if __name__ == "__main__":
    sys.exit(main())
