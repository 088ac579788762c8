"""`hlwq bench scale`: the quantize flow on the real-width LTX-2.3 transformer, 1 vs 2 workers.

Each run is a fresh `hlwq quantize` process (temporary Prefect API, LocalCluster),
sampled every 0.2 s for the RSS summed over its whole process tree (flow,
Prefect server, Dask workers). Targets for the full 48-layer layout on the
2-core, 24 GiB machine: peak RSS <= 4 GB, wall <= 10 min, speedup >= 1.6x,
orchestration overhead <= 5 %.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
FULL_LAYERS = 48                  # the real layout: its results are scale.json, others scale-<N>L.json
SAMPLE_INTERVAL_S = 0.2


class RunSampler:
    """Sampled in a thread: the peak RSS summed over a process and all its descendants,
    and the peak growth of the used space on the file system holding ``disk_path``."""

    def __init__(self, pid: int, disk_path: Path):
        self.root = psutil.Process(pid)
        self.peak = 0
        self.disk_path = disk_path
        self.disk_start = shutil.disk_usage(disk_path).used
        self.disk_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)
            self.disk_peak = max(self.disk_peak,
                                 shutil.disk_usage(self.disk_path).used - self.disk_start)
            self._stop.wait(SAMPLE_INTERVAL_S)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peak, self.disk_peak


def pressure_totals() -> dict[str, float]:
    """Seconds stalled so far (Linux PSI): CPU "some", I/O "some" and "full"; {} without PSI."""
    totals = {}
    for resource, kinds in (("cpu", ("some",)), ("io", ("some", "full"))):
        try:
            lines = Path(f"/proc/pressure/{resource}").read_text().splitlines()
        except OSError:
            return {}
        for line in lines:
            kind, *fields = line.split()
            if kind in kinds:
                total = next(f for f in fields if f.startswith("total="))
                totals[f"{resource}_{kind}"] = int(total.split("=")[1]) / 1e6
    return totals


def run_flow(fixture: Path, out: Path, workers: int) -> dict:
    """One `hlwq quantize` process; returns its JSON summary plus wall time and peak RSS."""
    for stale in (out, out.with_name(out.name + ".staging")):
        shutil.rmtree(stale, ignore_errors=True)
    command = [sys.executable, "-c", "from hlwq.cli.main import main; main()", "quantize",
               str(fixture), "--out", str(out), "--workers", str(workers), "--json"]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)     # the temporary local API, as a user's first run gets
    stalls_before = pressure_totals()
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    sampler = RunSampler(process.pid, out.parent)
    stdout, stderr = process.communicate()
    wall_s = time.perf_counter() - started
    peak, disk_peak = sampler.stop()
    # Share of the run's wall time the machine spent stalled (other load, a slow disk).
    stalls_after = pressure_totals()
    stalls = {name: (stalls_after[name] - before) / wall_s for name, before in stalls_before.items()}
    if process.returncode != 0:
        raise click.ClickException(f"hlwq quantize with {workers} worker(s) failed:\n{stderr[-3000:]}")
    summary = json.loads(stdout[stdout.index("{"):])
    for stale in (out, out.with_name(out.name + ".staging")):
        shutil.rmtree(stale, ignore_errors=True)
    input_bytes = summary["sizes"]["total_original_bytes"]
    return {
        "workers": workers, "wall_s": wall_s, "flow_wall_s": summary["wall_s"],
        "quantize_wall_s": summary["quantize_wall_s"], "busy_s": summary["busy_s"],
        "cluster_start_s": summary["cluster_start_s"],
        "input_bytes": input_bytes, "gb_per_s": input_bytes / 1e9 / wall_s,
        "quantize_gb_per_s": summary["gb_per_s"], "peak_rss_bytes": peak,
        # Staging is consumed shard by shard, so this stays near the artifact's size.
        "peak_disk_growth_bytes": disk_peak, "stall_fractions": stalls,
        "overhead_fraction": summary["overhead_fraction"],
        "prefect_tasks": summary["prefect_tasks"], "prefect_task_s": summary["prefect_task_s"],
        "artifact_bytes": summary["artifact_bytes"], "quantized_tensors": summary["quantized"],
        "min_cosine": summary["quality"]["min_cosine"],
    }


def machine_description() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "torch": torch.__version__, "load_average_at_start": os.getloadavg()}


@click.command()
@click.option("--layers", default=48, show_default=True, type=int,
              help="Transformer blocks of the real-width fixture (48: the full 38 GB layout).")
@click.option("--workdir", type=click.Path(file_okay=False), default=str(REPO / "work-runs" / "scale"),
              show_default=True, help="Where the fixture (reused) and the outputs go.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_scale(layers, workdir, as_json):
    """Run the quantize flow on the real-width transformer with 1 and 2 workers."""
    from hlwq.testing.fixtures import make_real_width_transformer

    workdir = Path(workdir)
    fixture = make_real_width_transformer(workdir / f"ltx23-transformer-{layers}L", layers)
    runs = {workers: run_flow(fixture, workdir / f"out-{workers}w", workers) for workers in (1, 2)}
    one, two = runs[1], runs[2]
    result = {
        "benchmark": "scale", "layers": layers,
        "command": " ".join(["hlwq", *sys.argv[1:]]),
        "machine": machine_description(),
        "wall_s": two["wall_s"], "gb_per_s": two["gb_per_s"],
        "peak_rss_bytes": max(one["peak_rss_bytes"], two["peak_rss_bytes"]),
        "peak_disk_growth_bytes": max(one["peak_disk_growth_bytes"], two["peak_disk_growth_bytes"]),
        "overhead_fraction": two["overhead_fraction"],
        "speedup_2_vs_1": one["wall_s"] / two["wall_s"],
        "quantize_speedup_2_vs_1": one["quantize_wall_s"] / two["quantize_wall_s"],
        "runs": {"1": one, "2": two},
    }
    results = RESULTS_DIR / ("scale.json" if layers == FULL_LAYERS else f"scale-{layers}L.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{layers} layers, {one['input_bytes'] / 1e9:.2f} GB BF16 "
               f"({one['quantized_tensors']} quantized tensors)")
    for run in (one, two):
        click.echo(f"  {run['workers']} worker(s): {run['wall_s']:.1f} s, {run['gb_per_s']:.3f} GB/s, "
                   f"peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB, overhead "
                   f"{100 * run['overhead_fraction']:.1f} %, disk peak "
                   f"+{run['peak_disk_growth_bytes'] / 1e9:.2f} GB for a "
                   f"{run['artifact_bytes'] / 1e9:.2f} GB artifact; stalled on I/O "
                   f"{100 * run['stall_fractions'].get('io_full', 0):.0f} % of the time")
    click.echo(f"  speedup 2 vs 1: {result['speedup_2_vs_1']:.2f}x; written to {results}")
