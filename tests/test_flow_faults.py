"""Faults during a real run of `hlwq quantize` (CLI subprocess, temporary Prefect API,
LocalCluster worker processes): the flow's process SIGKILLed, a Dask worker SIGKILLed.

Both must end with an artifact byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from flow_support import (
    REPO,
    cli_env,
    hlwq_command,
    patient_prefect,
    run_cli,
    tree_bytes,
    write_diffusers_checkpoint,
)

pytestmark = pytest.mark.slow
LAYERS = 4
TENSORS = LAYERS * 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_diffusers_checkpoint(tmp_path_factory.mktemp("source") / "ckpt", layers=LAYERS,
                                      width=512)


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """The artifact of an uninterrupted run (in-process: the same flow, one process start less)."""
    from hlwq.flows.quantize_flow import run_quantize

    out = tmp_path_factory.mktemp("reference") / "artifact"
    with patient_prefect():
        summary = run_quantize(str(checkpoint), str(out), workers=2)
    assert summary["skipped"] == 0 and summary["quantized"] == TENSORS
    return tree_bytes(out)


def quantize(checkpoint: Path, out: Path, prefect_home: Path) -> dict:
    result = run_cli(["quantize", str(checkpoint), "--out", str(out), "--workers", "2", "--json"],
                     prefect_home)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


def start_quantize(checkpoint: Path, out: Path, prefect_home: Path) -> subprocess.Popen:
    """The CLI in its own session (so everything it started can be cleaned up), logging to a file."""
    with open(out.parent / "run.log", "w") as log:   # a pipe could fill up and stall the run
        return subprocess.Popen(
            hlwq_command("quantize", str(checkpoint), "--out", str(out), "--workers", "2"),
            cwd=REPO, env=cli_env(prefect_home), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)


def finished_units(staging: Path) -> list[Path]:
    return [path for path in staging.glob("*.json") if not path.name.startswith(".")]


def wait_for_first_units(process: subprocess.Popen, staging: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not finished_units(staging):
        assert process.poll() is None, "the run ended before any tensor was finished"
        assert time.monotonic() < deadline, "no tensor finished in time"
        time.sleep(0.01)


def kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def test_sigkilled_run_resumes_and_matches_an_uninterrupted_one(checkpoint, reference, tmp_path):
    out, home = tmp_path / "artifact", tmp_path / "prefect"
    staging = tmp_path / "artifact.staging"
    process = start_quantize(checkpoint, out, home)
    try:
        wait_for_first_units(process, staging)
        os.kill(process.pid, signal.SIGKILL)          # the flow's own process, mid-run
        process.wait()
    finally:
        kill_session(process)                         # its orphans: workers, the Prefect server
    done = len(finished_units(staging))
    assert 1 <= done < TENSORS, f"{done} of {TENSORS} tensors were done at the kill"
    assert not (out / "manifest.json").exists()

    summary = quantize(checkpoint, out, home)
    assert summary["skipped"] == done
    assert tree_bytes(out) == reference


def test_killed_dask_worker_is_replaced_and_the_output_is_unchanged(checkpoint, reference, tmp_path):
    out = tmp_path / "artifact"
    process = start_quantize(checkpoint, out, tmp_path / "prefect")
    try:
        wait_for_first_units(process, tmp_path / "artifact.staging")
        workers = [child for child in psutil.Process(process.pid).children(recursive=True)
                   if "spawn_main" in " ".join(child.cmdline())]
        assert len(workers) == 2, [child.cmdline() for child in workers]
        workers[0].send_signal(signal.SIGKILL)
        returncode = process.wait(timeout=300)
    finally:
        kill_session(process)
    log = (tmp_path / "run.log").read_text()
    assert returncode == 0, log[-3000:]
    assert tree_bytes(out) == reference
