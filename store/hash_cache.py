"""sha256 of local files, remembered across runs.

Hashing a 46 GB checkpoint costs about a minute of disk reads on every fetch; a
rerun (resuming after a crash, re-quantizing at other bits) should not pay it
again. A remembered hash is used only while the file's device, inode, size,
mtime and ctime are all unchanged. ctime moves on every write and cannot be set
by user tools, so modified bytes are always hashed afresh. Files changed in the
last few seconds are not remembered: timestamps are coarser than that on some
file systems, so a second write could keep the ctime of the first.

The cache is one SQLite file (``$HLWQ_CACHE_DIR/file-hashes.sqlite``, default
``~/.cache/hlwq``); SQLite serializes concurrent runs. A cache that cannot be
opened or written only costs the hashing, never the run.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

CACHE_DIR_ENV = "HLWQ_CACHE_DIR"
CACHE_FILE = "file-hashes.sqlite"
FRESH_NS = 3_000_000_000          # younger files are hashed but not remembered
SCHEMA = ("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, device INTEGER, "
          "inode INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT)")


def cache_path() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "hlwq"
    return Path(root) / CACHE_FILE


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes (read once, never cached)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def size_and_sha256(path: str | os.PathLike) -> tuple[int, str]:
    """``(size, sha256)`` of a file, from the cache while its identity is unchanged."""
    path = Path(path).resolve()
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        remembered = _lookup(str(path), identity)
        if remembered is not None:
            return stat.st_size, remembered
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    settled = time.time_ns() - stat.st_ctime_ns > FRESH_NS
    if settled and os.stat(path).st_ctime_ns == stat.st_ctime_ns:   # untouched while read
        _remember(str(path), identity, digest)
    return stat.st_size, digest


def _connect() -> sqlite3.Connection:
    where = cache_path()
    where.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(where, timeout=30)
    connection.execute(SCHEMA)
    return connection


def _lookup(path: str, identity: tuple) -> str | None:
    try:
        with closing(_connect()) as connection:
            row = connection.execute(
                "SELECT sha256 FROM hashes WHERE path = ? AND device = ? AND inode = ? AND "
                "size = ? AND mtime_ns = ? AND ctime_ns = ?", (path, *identity)).fetchone()
    except (OSError, RuntimeError, sqlite3.Error):   # RuntimeError: no home directory
        return None
    return row[0] if row else None


def _remember(path: str, identity: tuple, digest: str) -> None:
    try:
        with closing(_connect()) as connection, connection:
            connection.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (path, *identity, digest))
    except (OSError, RuntimeError, sqlite3.Error):   # RuntimeError: no home directory
        pass
