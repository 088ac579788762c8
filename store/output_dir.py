"""Output folders: one writer each, and what a run may replace.

One writer per folder: an OS lock (``flock``) on a lock file beside the folder.

The kernel drops the lock when its process dies, however it dies, so a SIGKILLed run never
leaves a stale lock. The lock file sits beside the folder (``.NAME.lock``), not inside it,
because artifacts are renamed into place whole. It holds the holder's pid, for messages.
Locks are re-entrant within a process: the CLI takes them before Prefect starts (to fail fast)
and the flows take them again (for runs that do not come through the CLI).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from hlwq.quant.errors import ArtifactError, OutputLockedError

MANIFEST_NAME = "manifest.json"   # what makes a folder an HLWQ artifact

_HELD: dict[Path, int] = {}     # lock file -> depth, for this process
_HELD_GUARD = threading.Lock()


def lock_file(folder: str | os.PathLike) -> Path:
    folder = Path(folder).absolute()
    return folder.with_name(f".{folder.name}.lock")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, wait: bool = True, option: str = "--out") -> Iterator[None]:
    """Hold the lock of ``folder`` for the block. Waits for another holder, or with
    ``wait=False`` raises OutputLockedError naming the holder's pid."""
    path = lock_file(folder)
    with _HELD_GUARD:
        if path in _HELD:
            _HELD[path] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, path, Path(folder), wait, option)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _HELD_GUARD:
            _HELD[path] = 1
        try:
            yield
        finally:
            with _HELD_GUARD:
                del _HELD[path]
    finally:
        os.close(fd)      # closing the last descriptor releases the lock


def _acquire(fd: int, path: Path, folder: Path, wait: bool, option: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    holder = holder_pid(path)
    if not wait:
        raise OutputLockedError(f"{option} {folder}: another run (pid {holder}) is writing it "
                                f"(lock {path}); wait for it, or run without --no-wait to queue")
    print(f"waiting for pid {holder}, which is writing {folder} (lock {path})", file=sys.stderr)
    fcntl.flock(fd, fcntl.LOCK_EX)


def holder_pid(path: Path) -> str:
    """The pid written by the lock's holder ('unknown' while it has not written it yet)."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def folder_locks(folders: dict[str, str | os.PathLike], wait: bool = True) -> Iterator[None]:
    """Locks of several folders (option -> folder), always taken in the same order."""
    with contextlib.ExitStack() as stack:
        for option, folder in sorted(folders.items(), key=lambda item: str(lock_file(item[1]))):
            stack.enter_context(folder_lock(folder, wait=wait, option=option))
        yield


def check_output_dir(target: str | os.PathLike, replace_artifact: bool = False) -> None:
    """Refuse to overwrite anything but an empty directory or, when asked, an HLWQ artifact."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise ArtifactError(f"{target}: exists and is not a directory; choose another output")
    if replace_artifact and (target / MANIFEST_NAME).is_file():
        return
    if any(target.iterdir()):
        what = "an HLWQ artifact" if replace_artifact else "empty"
        raise ArtifactError(f"{target}: exists and is not {what}; refusing to replace it "
                            "(choose a new directory or delete it)")
