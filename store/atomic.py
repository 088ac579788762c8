"""Atomic writes: temp file beside the target, fsync, rename. Readers never see half a file.

Files go through ``atomic_path``; whole folders (an artifact, an export, a report) through
``directory_transaction``: a hidden partial folder beside the target, fsynced, renamed into place
(a full disk on the way is an InsufficientDiskError; the target stays as it was).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hlwq.quant.errors import InsufficientDiskError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success fsync and rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- whole folders


@contextlib.contextmanager
def directory_transaction(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new hidden folder beside ``target``; on success fsync it and rename it onto
    ``target`` (an existing one is moved aside, then deleted); on failure remove it."""
    target = Path(target)
    partial = fresh_partial_dir(target)
    try:
        yield partial
        fsync_tree(partial)
        replace_directory(partial, target)
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientDiskError(
                f"{target}: disk full while writing it ({exc.filename or partial}: "
                f"{exc.strerror}); nothing was replaced; free space and run again") from None
        raise


def fresh_partial_dir(target: Path) -> Path:
    """A new hidden work directory beside ``target``; stale ones of earlier crashed runs go."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.hlwq-partial-"
    for stale in target.parent.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = target.parent / f"{prefix}{secrets.token_hex(4)}"
    partial.mkdir()
    return partial


def fsync_tree(directory: Path) -> None:
    """fsync every file below ``directory`` and every folder, so a rename publishes bytes on disk."""
    for current, _, names in os.walk(directory):
        for name in names:
            fd = os.open(Path(current) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(current)


def replace_directory(partial: Path, target: Path) -> None:
    """Rename ``partial`` to ``target``; an existing target (checked by ``check_output_dir``)
    is moved aside first, then deleted."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.hlwq-old-{secrets.token_hex(4)}"
        os.rename(target, old)
    os.rename(partial, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
