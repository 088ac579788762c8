"""The requantization flow: fetch -> inventory -> disk check -> quantize on Dask -> gates -> package.

Prefect orchestrates, Dask computes. The quantize stage is a subflow whose task
runner is a ``prefect_dask.DaskTaskRunner`` (a LocalCluster sized to the machine,
or an existing cluster at ``dask_address``), so the cluster lives only while
tensors are quantized. Inside it, one Prefect task per group of tensors (a
transformer block) runs in the flow's process and hands each tensor to Dask as
its own unit: workers read their tensor's bytes from the source file and write
the packed result to staging; only small metrics rows come back. Prefect tasks
therefore never run on workers (workers need not reach the Prefect API), and a
killed worker only costs Dask a rescheduled unit.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, tags
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect_dask import DaskTaskRunner

from hlwq.quant.choices import MODES, ON_NONFINITE
from hlwq.quant.core import check_options
from hlwq.quant.errors import InvalidOptionError
from hlwq.quant.names import block_and_module, natural_key
from hlwq.quant.sizes import size_table
from hlwq.runtime.hub import parse_hub_source
from hlwq.store.artifact import read_manifest, tensor_key
from hlwq.store.atomic import atomic_path
from hlwq.store.output_dir import folder_locks
from hlwq.store.staging import staged_key, staged_path
from hlwq.store.tensor_jobs import TensorJob, code_version, finished_row, row_path
from hlwq.tasks.budget import budget_task
from hlwq.tasks.disk import disk_check_task
from hlwq.tasks.gates import tensor_gates_task
from hlwq.tasks.packaging import package_artifact_task
from hlwq.tasks.plan import inventory_task
from hlwq.tasks.publish import publish_task
from hlwq.tasks.quantize import RunProgress, dask_client, quantize_group, submit_units
from hlwq.tasks.sources import FetchResult, fetch_source_task, with_text_encoder
from hlwq.tasks.validate_output import output_gates_skip_reason, output_gates_task

BLOCK_SIZE = 128
SCHEDULER_TIMEOUT_S = 10
WORKER_MEMORY_BYTES = 3 << 30        # one worker quantizing LTX-2.3's largest linear (16384 x 4096)
WORST_TENSORS = 20
METRICS_SCHEMA = pa.schema([
    ("tensor", pa.string()), ("component", pa.string()), ("shape", pa.list_(pa.int64())),
    ("dtype", pa.string()), ("action", pa.string()), ("reason", pa.string()),
    ("bits", pa.int64()), ("mode", pa.string()),
    ("original_bytes", pa.int64()), ("packed_bytes", pa.int64()),
    ("cosine", pa.float64()), ("rel_mse", pa.float64()), ("sqnr_db", pa.float64()),
    ("max_abs_err", pa.float64()), ("seconds", pa.float64()), ("worker", pa.string()),
])
RUN_ONLY_COLUMNS = ("seconds", "worker")   # differ run to run: kept out of the artifact


# ---- the Dask side ---------------------------------------------------------------------------


def default_workers() -> int:
    """One single-threaded worker per core, as many as memory allows."""
    by_memory = psutil.virtual_memory().total // WORKER_MEMORY_BYTES
    return max(1, min(os.cpu_count() or 1, by_memory))


def dask_task_runner(workers: int | None = None, dask_address: str | None = None) -> DaskTaskRunner:
    """A LocalCluster of single-threaded worker processes, or the cluster at ``dask_address``."""
    if dask_address:   # a scheduler that does not answer fails the run in seconds
        return DaskTaskRunner(address=dask_address,
                              client_kwargs={"timeout": f"{SCHEDULER_TIMEOUT_S}s"})
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": workers or default_workers(), "threads_per_worker": 1, "processes": True,
        # Each worker may use an equal share of the machine's memory; Dask pauses a
        # worker at 80 % of it and restarts it at 95 %.
        "memory_limit": "auto",
        # One core per worker: Dask's nanny already pins OpenMP/MKL/BLAS to one thread;
        # the numba kernels would otherwise start a thread per core in every worker.
        "env": {"NUMBA_NUM_THREADS": "1"},
        "dashboard_address": None,
    })


def group_of(job: TensorJob) -> str:
    """The Prefect task a tensor belongs to: its block (``transformer_blocks.7``) or component."""
    block, _ = block_and_module(job.tensor)
    return f"{job.component}: {block}" if block else job.component


def plan_jobs(rows: list[dict], source_base: str, file_ids: dict[str, str], staging_dir: str,
              settings: dict) -> list[TensorJob]:
    """One job per tensor the policy quantizes, keyed by content."""
    jobs = []
    for row in rows:
        if row["action"] != "quantize":
            continue
        group_size = row.get("group_size") or settings["group_size"]   # a budget chose it
        key = staged_key(file_ids[row["file"]], tensor_key(row["component"], row["tensor"]),
                         settings["policy"], row["bits"], BLOCK_SIZE, group_size,
                         settings["mode"], settings["code_version"])
        jobs.append(TensorJob(
            key=key, file=str(Path(source_base) / row["file"]), tensor=row["tensor"],
            component=row["component"], dtype=row["dtype"], shape=tuple(row["shape"]),
            data_start=row["data_start"], data_end=row["data_end"], bits=row["bits"],
            block_size=BLOCK_SIZE, group_size=group_size, mode=settings["mode"],
            staging_dir=staging_dir, on_nonfinite=settings["on_nonfinite"]))
    return jobs


@flow(name="quantize_tensors", flow_run_name="quantize {tensors} tensors", persist_result=False,
      validate_parameters=False)
def quantize_tensors(jobs: list[TensorJob], tensors: int) -> dict:
    """Quantize ``jobs`` on the Dask cluster of this subflow.

    Returns the metrics rows and the stage's timing: wall time (cluster start
    included), the cluster's start, the units' own seconds (busy) and what the
    Prefect task machinery cost (``prefect_task_s``).
    """
    logger = get_run_logger()
    started = time.perf_counter()
    client = dask_client()          # starts the LocalCluster, or connects
    cluster_start_s = time.perf_counter() - started
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    logger.info("quantizing %d tensors on %d Dask workers (%s)", len(jobs), workers,
                client.scheduler.address)
    artifact_id = create_progress_artifact(0.0, key="quantize-progress",
                                           description=f"{len(jobs)} tensors quantized or skipped")
    progress = RunProgress(len(jobs), lambda percent: update_progress_artifact(artifact_id, percent))
    groups: dict[str, list[TensorJob]] = {}
    for job in jobs:
        groups.setdefault(group_of(job), []).append(job)
    # Every unit is queued at once (Dask runs them in this order), so workers never
    # wait for the next group's task to start. Holding the futures keeps their results
    # until each group's task collects them (a dropped future is forgotten by Dask).
    queued = submit_units(client, [job for name in sorted(groups, key=natural_key)
                                   for job in groups[name]])
    rows, prefect_task_s = [], 0.0
    for name in sorted(groups, key=natural_key):
        called = time.perf_counter()
        result = quantize_group(name, groups[name], progress)
        prefect_task_s += time.perf_counter() - called - result["body_s"]
        rows += result["rows"]
    wall_s = time.perf_counter() - started
    del queued
    return {"rows": rows, "wall_s": wall_s, "cluster_start_s": cluster_start_s, "workers": workers,
            "prefect_tasks": len(groups), "prefect_task_s": prefect_task_s,
            "busy_s": sum(row["seconds"] for row in rows if not row["skipped"])}


# ---- the flow --------------------------------------------------------------------------------


def default_staging(out: Path) -> Path:
    """Beside the output, so staged results and shards share a file system."""
    return out.with_name(f"{out.name}.staging")


def check_settings(bits: int, mode: str, group_size: int | None, on_nonfinite: str,
                   workers: int | None, dask_address: str | None) -> None:
    if workers is not None and dask_address:
        raise InvalidOptionError("--workers sizes a local cluster; with --dask-address the "
                                 "cluster's own workers are used")
    if workers is not None and workers < 1:
        raise InvalidOptionError(f"--workers {workers}: must be at least 1")
    if mode not in MODES:
        raise InvalidOptionError(f"--mode {mode!r}: must be one of {', '.join(MODES)}")
    if on_nonfinite not in ON_NONFINITE:
        raise InvalidOptionError(f"--on-nonfinite {on_nonfinite!r}: must be one of "
                                 f"{', '.join(ON_NONFINITE)}")
    check_options(bits, BLOCK_SIZE, group_size, mode)


def check_publish_to(publish_to: str | None, gates: bool) -> None:
    """A bad repo id, or publishing what cannot be validated, fails before any work."""
    if publish_to is None:
        return
    parse_hub_source(publish_to)
    if not gates:
        raise InvalidOptionError(f"publish_to={publish_to!r} with gates off: the artifact would "
                                 "be unvalidated and is not published; turn the gates on, or "
                                 "publish it yourself with `hlwq publish --allow-unvalidated`")


def run_tags(source: str, revision: str | None, bits: int) -> list[str]:
    """Tags known before the run starts; the flow adds ``policy:`` once it has resolved it."""
    return [f"source:{source}", f"revision:{revision or 'default'}", f"bits:{bits}"]


@flow(name="quantize_checkpoint", flow_run_name="quantize {source}", persist_result=False)
def quantize_checkpoint(source: str, out: str, policy: str | None = None, bits: int = 5,
                        mode: str = "refined", group_size: int | None = None,
                        workers: int | None = None, dask_address: str | None = None,
                        revision: str | None = None, files: list[str] | None = None,
                        exclude_files: list[str] | None = None, staging: str | None = None,
                        gates: bool = True, gates_file: str | None = None,
                        on_nonfinite: str = "fail", output_suite: str | None = None,
                        target_size: str | None = None, target_scope: str = "package",
                        publish_to: str | None = None,
                        text_encoder: str | None = None,
                        text_encoder_revision: str | None = None,
                        sensitivity: str = "auto") -> dict:
    """Quantize a checkpoint (Hub id, folder or .safetensors file) into a packed HLWQ artifact.

    ``files`` / ``exclude_files``: globs choosing which of the source's files count (only
    those are downloaded, inventoried and carried), e.g. one checkpoint of a repo holding several.

    After packaging, the output gates render ``output_suite`` (default: the versioned suite
    of tasks/validate_output.py) with the source, an 8-bit control of the same tensors and the
    artifact, and judge the artifact against the control; only then is the artifact marked
    validated. The source's and the control's renders stay in the staging folder
    (``output-renders/``) for a rerun. Sources that are not whole pipelines skip them
    (recorded in the manifest).

    ``target_size`` (e.g. "15GB") replaces the uniform ``bits`` by a format per tensor (2..8
    bits, 128-value blocks or 64-/32-value scale groups) chosen to fit ``target_scope`` with
    the least measured damage (tasks/budget.py). ``sensitivity`` weighs that damage: "auto"
    measures the model's output on the first step of ``output_suite``'s prompts where the
    source runs, else falls back to "params"; the allocation's report (saying which was
    used) goes into the manifest's ``quantization.budget``.

    ``publish_to`` (a Hub repo, ``owner/name[@branch]``): once the artifact is validated,
    publish it there (tasks/publish.py; the same bytes again make no commit).

    ``text_encoder``: a separate Hub repo (``text_encoder_revision``) or folder holding the
    text encoder (LTX-2.3's Gemma 3), quantized and packaged as the source's ``text_encoder/``.
    """
    started = time.perf_counter()
    check_settings(bits, mode, group_size, on_nonfinite, workers, dask_address)
    check_publish_to(publish_to, gates)
    out_dir = Path(out).absolute()
    staging_dir = Path(staging).absolute() if staging else default_staging(out_dir)
    settings = {"bits": bits, "block_size": BLOCK_SIZE, "group_size": group_size, "mode": mode,
                "policy": policy, "code_version": code_version(), "on_nonfinite": on_nonfinite}

    # One run per output and staging folder (re-entrant: the CLI may hold them already).
    with folder_locks({"--out": out_dir, "--staging": staging_dir}):
        staging_dir.mkdir(parents=True, exist_ok=True)
        plan = plan_run(source, revision, files, exclude_files, settings, staging_dir, out_dir,
                        target_size, target_scope, text_encoder, text_encoder_revision,
                        sensitivity, output_suite)
        with tags(f"revision:{plan.lineage['commit_sha'][:12]}",
                  f"policy:{plan.settings['policy']}"):
            stage = quantize_tensors.with_options(
                task_runner=dask_task_runner(workers, dask_address))(plan.jobs, len(plan.jobs))
            finished = finish_run(plan, stage, out_dir, gates, gates_file, output_suite)

    summary = run_summary(source, out_dir, staging_dir, plan.settings, finished["rows"], stage,
                          finished["packaged"], finished["tensor_gates"], gates,
                          time.perf_counter() - started)
    if plan.budget:
        summary["budget"] = plan.budget
    summary["output_gates"] = finished["output_gates"]
    summary["published"] = publish_task(str(out_dir), publish_to) if publish_to else None
    publish_artifacts(summary, stage["rows"])
    return summary


# ---- the stages ------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """What the plan stage decided: the fetched source, its inventory and one job per tensor."""
    fetched: FetchResult
    inventory_root: Path
    layout: str
    settings: dict                 # bits, block and group size, mode, policy, code version
    rows: list[dict]               # the inventory, with the budget's bits when there is one
    jobs: list[TensorJob]
    staging_dir: Path
    budget: dict | None

    @property
    def lineage(self) -> dict:
        return self.fetched.lineage


def plan_run(source: str, revision: str | None, files, exclude_files, settings: dict,
             staging_dir: Path, out_dir: Path, target_size: str | None,
             target_scope: str, text_encoder: str | None = None,
             text_encoder_revision: str | None = None, sensitivity: str = "auto",
             output_suite: str | None = None) -> RunPlan:
    """Fetch (with a separately given text encoder joined in as text_encoder/), then
    inventory (headers read once; the layout picks the default policy), then the jobs, then
    the disk check: nothing is quantized before all of it holds."""
    fetched = FetchResult.from_dict(fetch_source_task(source, revision, files, exclude_files))
    if text_encoder is not None:
        encoder = FetchResult.from_dict(fetch_source_task(text_encoder, text_encoder_revision))
        fetched = with_text_encoder(fetched, encoder, staging_dir / "source-view")
    lineage = fetched.lineage
    inventory_root = fetched.files[0] if lineage["kind"] == "file" else fetched.root
    inventory_path = staging_dir / "inventory.parquet"
    inventory = inventory_task(str(inventory_root), str(inventory_path), policy=settings["policy"],
                               bits=settings["bits"], block_size=BLOCK_SIZE,
                               group_size=settings["group_size"],
                               files=[f["path"] for f in lineage["files"]])
    settings = {**settings, "policy": inventory["policy"]}
    budget = None
    if target_size is not None:
        budget = budget_task(str(inventory_path), str(inventory_root), target_size, target_scope,
                             BLOCK_SIZE, settings["group_size"], settings["mode"],
                             sensitivity=sensitivity, suite=output_suite)
    rows = pq.read_table(inventory_path).to_pylist()
    file_ids = {f["path"]: f"sha256:{f['sha256']}" for f in lineage["files"]}
    jobs = plan_jobs(rows, str(fetched.root), file_ids, str(staging_dir), settings)
    plan = RunPlan(fetched, inventory_root, inventory["layout"], settings, rows, jobs,
                   staging_dir, budget)
    check_disk_for(plan, out_dir)
    return plan


def check_disk_for(plan: RunPlan, out_dir: Path) -> None:
    keys = {(job.component, job.tensor): job.key for job in plan.jobs}
    done = {job.key for job in plan.jobs if finished_row(job) is not None}
    get_run_logger().info("%d tensors to quantize, %d already staged", len(plan.jobs), len(done))
    disk_check_task(
        [{**row, "key": keys.get((row["component"], row["tensor"]))} for row in plan.rows],
        {f["path"]: f["size"] for f in plan.lineage["files"]}, done, str(plan.fetched.root),
        str(out_dir), str(plan.staging_dir))


def finish_run(plan: RunPlan, stage: dict, out_dir: Path, gates: bool, gates_file: str | None,
               output_suite: str | None) -> dict:
    """Tensor gates, then package, then output gates (which mark the artifact validated)."""
    metrics = metrics_table(stage["rows"])
    with atomic_path(plan.staging_dir / "metrics.parquet") as tmp:
        pq.write_table(metrics, tmp)
    gate_report = tensor_gates_task(stage["rows"], gates_file, enforce=gates)

    final_rows = decided_rows(plan.rows, stage["rows"])
    quantized = {(row["component"], row["tensor"]) for row in stage["rows"]
                 if row["action"] == "quantize"}
    staged = {tensor_key(job.component, job.tensor): str(staged_path(plan.staging_dir, job.key))
              for job in plan.jobs if (job.component, job.tensor) in quantized}
    skip_output = output_gates_skip_reason(plan.fetched.root, gates)
    settings = plan.settings
    packaged = package_artifact_task(
        str(plan.inventory_root), final_rows, staged, str(out_dir), lineage=plan.lineage,
        layout=plan.layout,
        quantization={"bits": settings["bits"], "block_size": BLOCK_SIZE,
                      "group_size": settings["group_size"] or BLOCK_SIZE, "mode": settings["mode"],
                      "policy": {"name": Path(settings["policy"]).name},   # a name, never a path
                      "code_version": settings["code_version"],
                      **({"budget": plan.budget} if plan.budget else {})},
        metrics=metrics.drop_columns(list(RUN_ONLY_COLUMNS)),
        # Not validated yet when output gates are to run: they mark it (record_output_gates).
        validation={"tensor_gates": gate_report,
                    "output_gates": {"skipped": skip_output} if skip_output else None})
    for job in plan.jobs:
        row_path(job).unlink(missing_ok=True)   # their staged results are in the artifact now
    if skip_output is None:
        # Raises GateFailedError naming prompts and blocks; the artifact stays unvalidated.
        report = output_gates_task(str(plan.fetched.root), str(out_dir), output_suite,
                                   gates_file=gates_file,
                                   work_dir=str(plan.staging_dir / "output-renders"))
        output_gates = {"passed": report["passed"], "report": report["report"]}
    else:
        get_run_logger().info("output gates skipped: %s", skip_output)
        output_gates = {"skipped": skip_output}
    return {"rows": final_rows, "packaged": packaged, "tensor_gates": gate_report,
            "output_gates": output_gates}


def decided_rows(inventory_rows: list[dict], result_rows: list[dict]) -> list[dict]:
    """The inventory as the run decided it: tensors kept for non-finite values become 'keep'."""
    kept = {(row["component"], row["tensor"]): row["reason"]
            for row in result_rows if row["action"] == "keep"}
    decided = []
    for row in inventory_rows:
        reason = kept.get((row["component"], row["tensor"]))
        if reason is not None:
            row = {**row, "action": "keep", "bits": None, "group_size": None, "reason": reason,
                   "packed_bytes": row["original_bytes"]}
        decided.append(row)
    return decided


def metrics_table(result_rows: list[dict]) -> pa.Table:
    ordered = sorted(result_rows, key=lambda row: (row["component"], row["tensor"]))
    return pa.Table.from_pylist([{name: row.get(name) for name in METRICS_SCHEMA.names}
                                 for row in ordered], schema=METRICS_SCHEMA)


# ---- what the run reports ---------------------------------------------------------------------


def run_summary(source, out_dir, staging_dir, settings, final_rows, stage, packaged, gate_report,
                gates, wall_s) -> dict:
    quantized = [row for row in stage["rows"] if row["action"] == "quantize"]
    computed = [row for row in stage["rows"] if not row["skipped"]]
    input_bytes = sum(row["original_bytes"] for row in computed)
    capacity = stage["workers"] * stage["wall_s"]
    return {
        "source": source, "artifact": str(out_dir),
        "metrics": str(staging_dir / "metrics.parquet"),
        "inventory": str(staging_dir / "inventory.parquet"),
        "bits": settings["bits"], "mode": settings["mode"], "policy": settings["policy"],
        "tensors": len(stage["rows"]), "quantized": len(quantized),
        "kept_nonfinite": len(stage["rows"]) - len(quantized),
        "skipped": len(stage["rows"]) - len(computed),
        "sizes": size_table(final_rows),
        "artifact_bytes": packaged["total_bytes"],
        "wall_s": wall_s, "quantize_wall_s": stage["wall_s"],
        "cluster_start_s": stage["cluster_start_s"], "workers": stage["workers"],
        "busy_s": stage["busy_s"], "input_bytes": input_bytes,
        "gb_per_s": input_bytes / 1e9 / stage["wall_s"] if stage["wall_s"] else 0.0,
        # Share of the workers' time in the quantize stage not spent quantizing:
        # scheduling, Prefect bookkeeping, idle tails.
        "overhead_fraction": 1.0 - stage["busy_s"] / capacity if computed and capacity else 0.0,
        "prefect_tasks": stage["prefect_tasks"], "prefect_task_s": stage["prefect_task_s"],
        "quality": quality_of(quantized),
        "gates": {"enforced": gates, "passed": gate_report["passed"]},
        "validated": read_manifest(out_dir)["validation"]["validated"],
    }


def quality_of(quantized: list[dict]) -> dict:
    if not quantized:
        return {}
    cosines = [row["cosine"] for row in quantized]
    errors = [row["rel_mse"] for row in quantized]
    return {"min_cosine": min(cosines), "median_cosine": statistics.median(cosines),
            "mean_rel_mse": math.fsum(errors) / len(errors), "max_rel_mse": max(errors)}


def publish_artifacts(summary: dict, result_rows: list[dict]) -> None:
    create_markdown_artifact(summary_markdown(summary), key="quantize-summary",
                             description="sizes, speed and quality of this quantization")
    worst = sorted((row for row in result_rows if row["action"] == "quantize"),
                   key=lambda row: -row["rel_mse"])[:WORST_TENSORS]
    create_table_artifact(
        [{"tensor": row["tensor"], "component": row["component"], "bits": row["bits"],
          "cosine": round(row["cosine"], 6), "rel_mse": float(f"{row['rel_mse']:.4g}"),
          "sqnr_db": round(row["sqnr_db"], 2), "max_abs_err": float(f"{row['max_abs_err']:.4g}")}
         for row in worst],
        key="quantize-worst-tensors", description=f"the {WORST_TENSORS} tensors with the largest "
                                                  "relative MSE")


def summary_markdown(summary: dict) -> str:
    sizes, quality, gates = summary["sizes"], summary["quality"], summary["gates"]
    verdict = "validated" if summary["validated"] else "NOT validated"
    lines = [
        f"# {summary['source']} at {summary['bits']} bits "
        + f"({summary['mode']}, policy {summary['policy']})",
        "",
        f"Artifact: `{summary['artifact']}` ({verdict})",
        "",
        "| component | tensors | quantized | original GB | packed GB | bits/weight |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    totals = {"tensors": sizes["total_tensors"], "quantized_tensors": sizes["quantized_tensors"],
              "original_bytes": sizes["total_original_bytes"],
              "packed_bytes": sizes["total_packed_bytes"], "bits_per_weight": sizes["bits_per_weight"]}
    for name, entry in [*sizes["components"].items(), ("**total**", totals)]:
        lines.append(f"| {name} | {entry['tensors']} | {entry['quantized_tensors']} | "
                     f"{entry['original_bytes'] / 1e9:.3f} | {entry['packed_bytes'] / 1e9:.3f} | "
                     f"{entry['bits_per_weight']:.3f} |")
    lines += ["", (
        f"Speed: {summary['tensors'] - summary['skipped']} tensors "
        f"({summary['input_bytes'] / 1e9:.2f} GB) in {summary['quantize_wall_s']:.1f} s on "
        f"{summary['workers']} workers = {summary['gb_per_s']:.3f} GB/s; {summary['skipped']} "
        f"already staged; whole run {summary['wall_s']:.1f} s; orchestration overhead "
        f"{100 * summary['overhead_fraction']:.1f} %.")]
    if quality:
        enforced = "" if gates["enforced"] else " (not enforced: --no-gates)"
        lines += ["", (
            f"Quality: cosine min {quality['min_cosine']:.6f}, median "
            f"{quality['median_cosine']:.6f}; relative MSE mean {quality['mean_rel_mse']:.3e}, "
            f"max {quality['max_rel_mse']:.3e}; tensor gates "
            f"{'passed' if gates['passed'] else 'FAILED'}{enforced}.")]
    if summary["kept_nonfinite"]:
        lines += ["", f"{summary['kept_nonfinite']} tensor(s) with NaN/Inf kept unquantized."]
    return "\n".join(lines)


def run_quantize(source: str, out: str, **options) -> dict:
    """Run the flow with tags for source, revision, bits and policy (what the CLI calls)."""
    with tags(*run_tags(source, options.get("revision"), options.get("bits", 5))):
        return quantize_checkpoint(source, out, **options)
