"""Checks the CLI makes before Prefect or Dask start: paths, output folders, cluster addresses.

They import neither torch nor Prefect, so a mistake is named within a second or two, not after
a Prefect server boots. The flows check again (runs from deployments skip the CLI).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from hlwq.quant.errors import ArtifactError, InvalidOptionError, SourceError
from hlwq.store.output_dir import check_output_dir

SCHEDULER_CONNECT_S = 3.0     # a scheduler that does not answer by then is not there
DASK_ADDRESS = re.compile(r"(?:(?P<scheme>tcp|tls|ws|wss)://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\s]+)"
                          r":(?P<port>\d{1,5})/?")


def check_local_source(source: str) -> None:
    """A source spelled as a path (``/``, ``.``, ``~``, ``*.safetensors``) must exist."""
    spelled_as_path = source.startswith(("/", ".", "~")) or source.endswith(".safetensors")
    if spelled_as_path and not Path(source).expanduser().exists():
        raise SourceError(f"{source!r}: no such file or directory")


def check_new_output(out: str | Path, option: str = "--out", replace_artifact: bool = False) -> None:
    """``out`` is absent, empty or (with ``replace_artifact``) an HLWQ artifact."""
    try:
        check_output_dir(Path(out), replace_artifact=replace_artifact)
    except ArtifactError as exc:
        raise ArtifactError(f"{option} {exc}") from None


def check_folder_option(path: str | Path | None, option: str) -> None:
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise InvalidOptionError(f"{option} {path}: exists and is not a directory")


def check_dask_address(address: str, timeout_s: float = SCHEDULER_CONNECT_S) -> None:
    """``[tcp://]HOST:PORT`` (tls, ws, wss too) with a scheduler listening there."""
    match = DASK_ADDRESS.fullmatch(address.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise InvalidOptionError(f"--dask-address {address!r}: not a scheduler address "
                                 "(expected tcp://HOST:PORT, e.g. tcp://10.0.0.5:8786)")
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise InvalidOptionError(f"--dask-address {address}: no scheduler answers at "
                                 f"{host}:{port} within {timeout_s:g} s ({reason})") from None
