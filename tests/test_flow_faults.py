"""Faults during real runs (subprocesses, temporary Prefect API, LocalCluster worker processes):
`hlwq quantize` SIGKILLed, a Dask worker SIGKILLed while it holds unfinished tensors (both must
end with an artifact byte-identical to an uninterrupted run's), and a render batch SIGKILLed
(its rerun renders only what was not catalogued).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def start_quantize(checkpoint: Path, out: Path, prefect_home: Path,
                   log_level: str = "WARNING") -> subprocess.Popen:
    """The CLI in its own session (so everything it started can be cleaned up), logging to a file."""
    env = {**cli_env(prefect_home), "PREFECT_LOGGING_LEVEL": log_level}
    with open(out.parent / "run.log", "w") as log:   # a pipe could fill up and stall the run
        return subprocess.Popen(
            hlwq_command("quantize", str(checkpoint), "--out", str(out), "--workers", "2"),
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


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


def scheduler_client(log: Path, timeout: float = 240):
    """A Dask client on the run's cluster, at the address the flow logs when it starts."""
    from distributed import Client

    deadline = time.monotonic() + timeout
    while not (found := re.search(r"Dask workers \((tcp://[\d.]+:\d+)\)", log.read_text())):
        assert time.monotonic() < deadline, "the run never logged its scheduler"
        time.sleep(0.05)
    return Client(found.group(1), timeout=60)


def busy_worker(client, staging: Path, timeout: float = 120) -> tuple[int, list[str]]:
    """A worker pid and the units it holds whose staged result is not written yet."""
    deadline = time.monotonic() + timeout
    pids = client.run(os.getpid)                      # worker address -> pid
    while time.monotonic() < deadline:
        for address, keys in client.processing().items():
            unfinished = [key for key in keys if key.startswith("quantize-") and
                          not (staging / f"{key.removeprefix('quantize-')}.safetensors").exists()]
            if unfinished and address in pids:
                return pids[address], unfinished
        time.sleep(0.05)
    raise AssertionError("no worker held an unfinished tensor")


def test_killed_dask_worker_is_replaced_and_the_output_is_unchanged(checkpoint, reference, tmp_path):
    out, staging = tmp_path / "artifact", tmp_path / "artifact.staging"
    process = start_quantize(checkpoint, out, tmp_path / "prefect", log_level="INFO")
    try:
        client = scheduler_client(tmp_path / "run.log")
        pid, unfinished = busy_worker(client, staging)
        os.kill(pid, signal.SIGKILL)                  # mid-tensor: its units must be redone
        assert not all(finished(staging, key) for key in unfinished), "the kill came too late"
        client.close()
        returncode = process.wait(timeout=300)
    finally:
        kill_session(process)
    log = (tmp_path / "run.log").read_text()
    assert returncode == 0, log[-3000:]
    assert tree_bytes(out) == reference


def finished(staging: Path, key: str) -> bool:
    return (staging / f"{key.removeprefix('quantize-')}.safetensors").exists()


RENDER_SCRIPT = """
import json, sys
from hlwq.cli.prefect_env import configure_prefect
configure_prefect()
from hlwq.flows.render_flow import render_batch
state = render_batch(*sys.argv[1:4], retries=0, pipeline_factory="flow_support:paced_factory",
                     verify=False, return_state=True)
print(json.dumps(state.result(raise_on_failure=False)["counts"]))
"""
RENDERS = 6


def start_render(artifact: Path, prompts: Path, out: Path, home: Path) -> subprocess.Popen:
    env = cli_env(home)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    with open(out.parent / "render.log", "a") as log:
        return subprocess.Popen([sys.executable, "-c", RENDER_SCRIPT, str(artifact), str(prompts),
                                 str(out)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def test_sigkilled_render_batch_keeps_finished_renders_and_renders_only_the_rest(tmp_path):
    from hlwq.store.catalog import read_catalog

    artifact, out, home = tmp_path / "artifact", tmp_path / "renders", tmp_path / "prefect"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(json.dumps({"format": "paced"}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"prompt {i}", "seed": i,
                                           "width": 32, "height": 32, "frames": 9}) + "\n"
                               for i in range(RENDERS)))
    process = start_render(artifact, prompts, out, home)
    try:
        deadline = time.monotonic() + 240
        while len(read_catalog(out)) < 2:
            assert process.poll() is None, (tmp_path / "render.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no render finished in time"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)        # between two renders, or in one
        process.wait()
    finally:
        kill_session(process)
    done = {row["render_key"] for row in read_catalog(out).to_pylist()}
    assert 2 <= len(done) < RENDERS, f"{len(done)} of {RENDERS} renders were catalogued"

    process = start_render(artifact, prompts, out, home)
    assert process.wait(timeout=300) == 0, (tmp_path / "render.log").read_text()[-3000:]
    counts = json.loads((tmp_path / "render.log").read_text().strip().splitlines()[-1])
    assert counts == {"rendered": RENDERS - len(done), "skipped": len(done), "failed": 0,
                      "rejected": 0}
    rows = read_catalog(out).to_pylist()
    assert len(rows) == RENDERS and len({row["render_key"] for row in rows}) == RENDERS
