"""Which files of a local folder may be read: regular files really inside it, never pickles.

A source folder is untrusted input. A symlink can point anywhere (``extra.txt ->
/etc/passwd``), a component folder can be a link to another tree, and a pickle runs
code when it is loaded. So every entry is resolved before anything reads, hashes,
inventories or links it: it must be a regular file (or a folder) whose real path lies
inside the source, and pickles never count as weights. Links that stay inside are
followed (they are the source's own files under a second name).

One exception, because it is how huggingface_hub stores downloads: a cache snapshot
(``models--owner--name/snapshots/<sha>``) holds links into the same repo's ``blobs/``
folder, so its files may lie there too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from hlwq.quant.errors import UnsafeSourceError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_PROTOCOL_MARK = 0x80          # protocols 2-5 start with PROTO (0x80) and the version
TORCH_ZIP_MARK = b"PK\x03\x04"       # torch.save's zip: data.pkl inside
HUB_CACHE_PREFIX = "models--"        # huggingface_hub's cache folder of a model repo


# Folders of links this process built itself (a source joined with its separate text encoder):
# their links may reach the joined sources. Kept in memory only, so no file can claim it.
_JOINED_VIEWS: dict[Path, tuple[Path, ...]] = {}


def register_joined_view(view: str | os.PathLike, sources: list[str | os.PathLike]) -> None:
    """Let the links of ``view`` (built by this process) reach inside each of ``sources``."""
    _JOINED_VIEWS[Path(view).resolve()] = tuple(
        inside for source in sources for inside in allowed_roots(source))


def allowed_roots(root: str | os.PathLike) -> tuple[Path, ...]:
    """The real folders a source's files may lie in (see the module docstring)."""
    real = Path(root).resolve()
    if real in _JOINED_VIEWS:
        return (real, *_JOINED_VIEWS[real])
    cache = _hub_cache_of(real)
    return (real,) if cache is None else (real, cache / "blobs")


def source_name(path: str | os.PathLike) -> str:
    """How lineage and reports name a local source: never a path, only the folder's (or
    file's) name; a huggingface_hub cache snapshot is named ``owner/name@<commit>``."""
    real = Path(path).resolve()
    cache = _hub_cache_of(real)
    if cache is None:
        return real.name
    return f"{cache.name.removeprefix(HUB_CACHE_PREFIX).replace('--', '/', 1)}@{real.name}"


def _hub_cache_of(real: Path) -> Path | None:
    """The repo cache folder of a huggingface_hub snapshot (``models--o--n/snapshots/<sha>``)."""
    cache = real.parent.parent
    is_snapshot = real.parent.name == "snapshots" and cache.name.startswith(HUB_CACHE_PREFIX)
    return cache if is_snapshot else None


def checked_file(root: str | os.PathLike, relative: str) -> Path:
    """The real path of ``root/relative`` after checking it is a regular file inside the
    source tree; raises UnsafeSourceError naming the entry (and the link's target)."""
    path = Path(root).joinpath(*PurePosixPath(relative).parts)
    real = _checked_real_path(path, relative, allowed_roots(root))
    if not real.is_file():
        raise UnsafeSourceError(f"{relative}: {_kind(real)}, not a regular file; a source may "
                                "hold only regular files and folders")
    return real


def visible_files(directory: str | os.PathLike) -> list[str]:
    """Every regular file below ``directory`` (posix paths relative to it, sorted), hidden
    entries (``.git``, ``.cache``) skipped. Links are followed when they stay inside the
    tree; a link leading out, a link loop or a special file raises UnsafeSourceError."""
    directory = Path(directory)
    names: list[str] = []
    _walk(directory, "", allowed_roots(directory), {directory.resolve()}, names)
    return sorted(names)


def is_pickle_name(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def is_pickle(path: str | os.PathLike) -> bool:
    """A pickle by name, or by content: a pickle protocol 2+ stream, or torch.save's zip."""
    if is_pickle_name(str(path)):
        return True
    with open(path, "rb") as handle:
        head = handle.read(4)
    return (len(head) >= 2 and head[0] == PICKLE_PROTOCOL_MARK and 2 <= head[1] <= 5) or (
        head == TORCH_ZIP_MARK and _zip_holds_pickle(path))


def _zip_holds_pickle(path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _walk(directory: Path, prefix: str, inside: tuple[Path, ...], ancestors: set[Path],
          names: list[str]) -> None:
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            relative = f"{prefix}{entry.name}"
            real = _checked_real_path(Path(entry.path), relative, inside)
            if real.is_dir():
                if real in ancestors:
                    raise UnsafeSourceError(f"{relative}: link to {real} loops back to a folder "
                                            "above it")
                _walk(Path(entry.path), f"{relative}/", inside, ancestors | {real}, names)
            elif real.is_file():
                names.append(relative)
            else:
                raise UnsafeSourceError(f"{relative}: {_kind(real)}, not a regular file; a "
                                        "source may hold only regular files and folders")


def _checked_real_path(path: Path, relative: str, inside: tuple[Path, ...]) -> Path:
    real = path.resolve()
    if not any(real.is_relative_to(folder) for folder in inside):
        raise UnsafeSourceError(f"{relative}: link to {real}, outside the source {inside[0]}; "
                                "copy the file into the source or remove the link")
    if not real.exists():
        raise UnsafeSourceError(f"{relative}: link to {real}, which does not exist")
    return real


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def without_pickles(names: list[str], where: str, is_pickle_file=is_pickle_name) -> list[str]:
    """``names`` less every pickle (``is_pickle_file(name)`` says which). A folder whose
    weights exist only as pickles is refused, naming the file: it would be loaded by
    unpickling, which runs code."""
    pickles = {name for name in names if is_pickle_file(name)}
    kept = [name for name in names if name not in pickles]
    with_safetensors = {_folder(name) for name in kept if name.endswith(".safetensors")}
    for name in sorted(pickles):
        if _folder(name) not in with_safetensors:
            raise UnsafeSourceError(
                f"{where}: {name} is a pickle and its folder holds no .safetensors weights; "
                "pickles are never loaded (convert the weights to safetensors, or leave the "
                "file out with --exclude-files)")
    return kept


def _folder(name: str) -> str:
    return PurePosixPath(name).parent.as_posix()
