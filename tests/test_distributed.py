"""`hlwq quantize --dask-address`: a real `dask scheduler` and two `dask worker` processes on
loopback; the artifact must equal the one a LocalCluster run makes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flow_support import (
    REPO,
    cli_env,
    patient_prefect,
    run_cli,
    tree_bytes,
    write_diffusers_checkpoint,
)

from hlwq.flows.quantize_flow import run_quantize

pytestmark = pytest.mark.slow
DASK = Path(sys.executable).parent / "dask"


@pytest.fixture(autouse=True, scope="module")
def _patient_prefect():
    with patient_prefect():
        yield


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and two single-threaded workers, each its own process; yields the address."""
    scheduler_file = tmp_path / "scheduler.json"
    env = {**cli_env(tmp_path / "prefect-unused"), "NUMBA_NUM_THREADS": "1"}   # as OPERATIONS.md says
    common = {"cwd": REPO, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                   "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                  **common)]
    try:
        deadline = time.monotonic() + 120
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "the dask scheduler did not start"
            time.sleep(0.1)
        for name in ("worker-a", "worker-b"):
            processes.append(subprocess.Popen(
                [str(DASK), "worker", "--scheduler-file", str(scheduler_file), "--name", name,
                 "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"], **common))
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            yield client.scheduler.address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def test_dask_address_run_equals_a_local_cluster_run(dask_cluster, tmp_path):
    checkpoint = write_diffusers_checkpoint(tmp_path / "ckpt", layers=2)
    local = run_quantize(str(checkpoint), str(tmp_path / "local"), workers=2)
    assert local["workers"] == 2

    result = run_cli(["quantize", str(checkpoint), "--out", str(tmp_path / "remote"),
                      "--dask-address", dask_cluster, "--json"], tmp_path / "prefect")
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout[result.stdout.index("{"):])
    assert remote["workers"] == 2 and remote["skipped"] == 0

    metrics = tmp_path / "remote.staging" / "metrics.parquet"
    import pyarrow.parquet as pq

    assert {row["worker"] for row in pq.read_table(metrics).to_pylist()} == {"worker-a", "worker-b"}
    assert tree_bytes(tmp_path / "remote") == tree_bytes(tmp_path / "local")
