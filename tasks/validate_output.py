"""Output gates: does the packed model still make the same videos as its source?

Every prompt of a versioned suite (``store/prompt_suite/v1.jsonl``) is rendered by the source
model and by the packed artifact with the same seed and settings. Per prompt the renders are
compared (quant/video_metrics.py): per-frame PSNR and SSIM (mean and worst frame), temporal
stability, waveform SNR and log-mel distance of the audio, relative error of the final latents,
and, inside the transformer, each block's output on the first denoising step
(runtime/block_probe.py). The ``[output]`` thresholds of ``tasks/gates.toml`` decide; a failure
names the prompts and the blocks.

The two models never sit in memory together: the source renders every prompt first (kept
in ``work_dir``, reusable across artifacts of the same source), is released, then the
artifact renders. The report (runtime/report.py) goes to ``ARTIFACT/validation/`` by default and
``record_output_gates`` lists it in the manifest with the verdict.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task
from safetensors import safe_open
from safetensors.torch import save_file

from hlwq.quant.errors import GateFailedError, InvalidOptionError, SourceError
from hlwq.quant.video_metrics import audio_metrics, relative_l2_error, video_metrics
from hlwq.runtime.block_probe import BlockProbe, compare_block_outputs
from hlwq.runtime.memory_plan import RenderShape
from hlwq.store.artifact import (
    MANIFEST_NAME,
    MODEL_CARD_NAME,
    is_validated,
    read_manifest,
)
from hlwq.store.atomic import (
    atomic_path,
    atomic_write_text,
    directory_transaction,
)
from hlwq.store.package import file_record, write_card_and_manifest
from hlwq.store.prompts import DEFAULT_SUITE, FRAME_STEP, SIDE_MULTIPLE, RenderRequest, load_prompts
from hlwq.store.source_tree import source_name
from hlwq.tasks.gates import gate_sources, load_gate_config
from hlwq.tasks.render import (
    audio_sample_rate,
    render_arguments,
    render_shapes,
    resolve_device,
    resolve_factory,
)

SOURCE_FACTORY = "hlwq.runtime.ltx23_models:load_ltx23_pipeline"
CANDIDATE_FACTORY = "hlwq.runtime.loader:load_pipeline"
REPORT_DIR = "validation"
RESULTS_NAME = "results.json"
WORST_SHEET_NAME = "worst-prompt.png"   # the model card's picture: source above, packed below
# What LTX2Pipeline needs to render: a source without all of them (a transformer alone)
# cannot be rendered, and its output gates are skipped.
PIPELINE_PARTS = ("transformer", "connectors", "vae", "audio_vae", "vocoder", "text_encoder",
                  "tokenizer", "scheduler")

# gate name in [output] -> (metric it reads, True when larger is better)
OUTPUT_GATES = {
    "min_psnr_mean": ("psnr_mean", True),
    "min_psnr_min": ("psnr_min", True),
    "min_ssim_mean": ("ssim_mean", True),
    "max_temporal_diff": ("temporal_diff", False),
    "min_audio_snr_db": ("audio_snr_db", True),
    "max_mel_distance": ("mel_distance", False),
    "max_latent_rel_err": ("latent_rel_err", False),
    "max_block_rel_err": ("block_rel_err", False),
}
BLOCK_GATE = "max_block_rel_err"


# --------------------------------------------------------------------------- gates


@dataclass(frozen=True)
class OutputGate:
    name: str
    metric: str
    threshold: float
    higher_is_better: bool

    def passes(self, value: float) -> bool:
        # Written so that NaN fails.
        return value >= self.threshold if self.higher_is_better else value <= self.threshold

    def describe(self, value: float) -> str:
        sign = "<" if self.higher_is_better else ">"
        return f"{self.metric} {value:.4g} {sign} {self.name} {self.threshold:g}"


def output_gates(config: dict, source: str | os.PathLike = "gates config") -> dict[str, OutputGate]:
    """The ``[output]`` table as ``{name: OutputGate}``; raises on a missing or unknown key."""
    section = config.get("output")
    if not isinstance(section, dict):
        raise InvalidOptionError(f"{source}: no [output] table (output gates need one with "
                                 f"{', '.join(OUTPUT_GATES)})")
    unknown = sorted(set(section) - set(OUTPUT_GATES))
    missing = sorted(set(OUTPUT_GATES) - set(section))
    if unknown or missing:
        raise InvalidOptionError(f"{source}: [output] has unknown key(s) {unknown} and lacks "
                                 f"{missing}; expected exactly {', '.join(OUTPUT_GATES)}")
    gates = {}
    for name, (metric, higher) in OUTPUT_GATES.items():
        value = section[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise InvalidOptionError(f"{source}: [output] {name}={value!r} must be a finite number")
        gates[name] = OutputGate(name, metric, float(value), higher)
    return gates


def apply_output_gates(prompts: dict[str, dict], gates: dict[str, OutputGate]) -> dict:
    """Each gate over every prompt: its worst value, threshold, verdict and what failed.

    Sets ``passed`` and ``failed_gates`` on each prompt's entry; returns ``{"gates", "passed",
    "failures" (one line per failing prompt), "failed_prompts", "failed_blocks"}``.
    """
    verdicts, broken, failed_blocks = {}, {pid: [] for pid in prompts}, []
    for gate in gates.values():
        values = {pid: entry[gate.metric] for pid, entry in prompts.items()}
        worst = (min if gate.higher_is_better else max)(values.values(), key=_nan_worst(gate))
        failed = [pid for pid, value in values.items() if not gate.passes(value)]
        verdict = {"metric": gate.metric, "value": worst, "threshold": gate.threshold,
                   "verdict": "fail" if failed else "pass", "failed_prompts": failed}
        for pid in failed:
            broken[pid].append(gate)
        if gate.name == BLOCK_GATE:
            blocks = [{"prompt": pid, **row} for pid in failed for row in prompts[pid]["blocks"]
                      if not gate.passes(row["rel_err"])]
            verdict["failed_blocks"] = sorted({f"block {b['block']} ({b['stream']})" for b in blocks},
                                              key=_block_order)
            failed_blocks += blocks
        verdicts[gate.name] = verdict
    for pid, entry in prompts.items():
        entry["failed_gates"] = [gate.name for gate in broken[pid]]
        entry["passed"] = not broken[pid]
    failures = [f"prompt {pid}: " + "; ".join(gate.describe(prompts[pid][gate.metric])
                                              for gate in failing)
                for pid, failing in broken.items() if failing]
    return {"gates": verdicts, "passed": not failures, "failures": failures,
            "failed_prompts": [pid for pid, failing in broken.items() if failing],
            "failed_blocks": failed_blocks}


def _nan_worst(gate: OutputGate):
    """Sort key putting NaN at the worst end, so a NaN is the value a gate reports."""
    def key(value: float) -> float:
        if math.isnan(value):
            return -math.inf if gate.higher_is_better else math.inf
        return value
    return key


def _block_order(label: str) -> tuple[int, str]:
    number, _, stream = label.removeprefix("block ").partition(" ")
    return int(number), stream


def failure_message(results: dict, consequence: str) -> str:
    failed = results["failed_prompts"]
    head = (f"output gates failed on {len(failed)} of {len(results['prompts'])} prompt(s) "
            f"({', '.join(failed)}); {consequence}:")
    lines = [head]
    lines += [f"  {line}" for line in results["failures"]]
    blocks = results["gates"].get(BLOCK_GATE, {}).get("failed_blocks")
    if blocks:
        lines.append(f"  blocks that drift past {BLOCK_GATE}: {', '.join(blocks)}")
    if results.get("report"):
        lines.append(f"  report: {results['report']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the suite


def load_suite(path: str | os.PathLike | None = None, long_side: int | None = None,
               frames: int | None = None, steps: int | None = None) -> list[RenderRequest]:
    """The suite's prompts, optionally scaled up for a real model (see prompt_suite/README.md)."""
    path = Path(path) if path else DEFAULT_SUITE
    batch = load_prompts(path)
    if batch.rejected:
        raise InvalidOptionError(f"prompt suite {path}: " + "; ".join(map(str, batch.rejected)))
    if not batch.requests:
        raise InvalidOptionError(f"prompt suite {path}: holds no prompts")
    for request in batch.requests:
        if request.image_to_video:
            raise InvalidOptionError(f"prompt suite {path}: {request.id}: conditioning images are "
                                     "not supported by the output gates (text-to-video only)")
    return [scale_request(r, long_side, frames, steps) for r in batch.requests]


def scale_request(request: RenderRequest, long_side: int | None = None,
                  frames: int | None = None, steps: int | None = None) -> RenderRequest:
    """Scale the longer side to ``long_side`` (aspect kept, sides multiples of 32); replace
    frames and steps. The seed never changes."""
    changes: dict[str, Any] = {}
    if long_side is not None:
        if long_side < SIDE_MULTIPLE or long_side % SIDE_MULTIPLE:
            raise InvalidOptionError(f"--long-side {long_side}: must be a multiple of "
                                     f"{SIDE_MULTIPLE}")
        factor = long_side / max(request.width, request.height)
        changes["width"], changes["height"] = (
            max(SIDE_MULTIPLE, SIDE_MULTIPLE * round(side * factor / SIDE_MULTIPLE))
            for side in (request.width, request.height))
    if frames is not None:
        if frames < 1 or frames % FRAME_STEP != 1:
            raise InvalidOptionError(f"--frames {frames}: must be 8k+1 (9, 17, ..., 121)")
        changes["frames"] = frames
    if steps is not None:
        if steps < 1:
            raise InvalidOptionError(f"--steps {steps}: must be at least 1")
        changes["steps"] = steps
    return RenderRequest(**{**request.to_dict(), **changes})


def suite_identity(path: str | os.PathLike | None) -> dict:
    path = Path(path) if path else DEFAULT_SUITE
    return {"file": path.name, "name": path.stem,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def renderable_source(root: str | os.PathLike) -> str | None:
    """None when ``root`` holds a whole LTX-2 pipeline; else why it cannot be rendered.

    The reason names no path: it is recorded in the manifest and the model card.
    """
    root = Path(root)
    index = root / "model_index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text()))
        except (OSError, ValueError) as exc:
            return f"the source's model_index.json is unreadable ({getattr(exc, 'strerror', None) or exc})"
        missing = [part for part in PIPELINE_PARTS if part not in names or not (root / part).is_dir()]
    else:
        from hlwq.runtime.ltx23_models import find_single_file

        if not root.is_dir() or find_single_file(root) is None:
            return "the source is neither a diffusers pipeline folder nor an LTX-2.3 single-file folder"
        missing = [part for part in ("text_encoder", "tokenizer", "scheduler")
                   if not (root / part).is_dir()]
    if missing:
        return f"the source is not a whole LTX-2 pipeline (lacks {', '.join(missing)})"
    return None


def output_gates_skip_reason(source_root: str | os.PathLike, gates: bool = True) -> str | None:
    """Why a requantization run skips the output gates (None: it runs them)."""
    if not gates:
        return "--no-gates was given"
    return renderable_source(source_root)


# --------------------------------------------------------------------------- rendering


def render_for_comparison(pipeline, request: RenderRequest, device: str, path: Path) -> Path:
    """Render one request; save frames, audio, final latents and first-step block outputs."""
    final = {}

    def keep_latents(pipe, step, timestep, tensors):
        final["latents"] = tensors["latents"]
        return {}

    with BlockProbe(pipeline.transformer) as probe, torch.inference_mode():
        output = pipeline(**render_arguments(request, device), callback_on_step_end=keep_latents,
                          callback_on_step_end_tensor_inputs=["latents"])
    audio = output.audio[0]
    tensors = {
        # float16 halves the disk a real-size render takes; its rounding (< 5e-4) sits
        # far below any PSNR a gate asks for.
        "frames": torch.as_tensor(np.asarray(output.frames[0], dtype=np.float16)),
        "audio": (audio.float().cpu() if torch.is_tensor(audio)
                  else torch.as_tensor(np.asarray(audio, dtype=np.float32))),
        "latents": final["latents"].float().cpu(),
        **{f"block.{block}.{stream}": value for block, streams in probe.outputs.items()
           for stream, value in streams.items()},
    }
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"sample_rate": str(audio_sample_rate(pipeline)), "id": request.id})
    return path


def load_rendering(path: Path) -> dict:
    """A saved render: frames, audio, latents, sample_rate and blocks {index: {stream: tensor}}."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        sample_rate = int(handle.metadata()["sample_rate"])
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for key in [k for k in tensors if k.startswith("block.")]:
        _, index, stream = key.split(".")
        blocks.setdefault(int(index), {})[stream] = tensors.pop(key)
    return {**tensors, "sample_rate": sample_rate, "blocks": blocks}


def render_all(load, requests: list[RenderRequest], device: str, out_dir: Path,
               fingerprint: str, label: str) -> dict[str, Path]:
    """Render what ``out_dir`` lacks with the pipeline ``load()`` builds (only if needed)."""
    paths = {r.id: out_dir / f"{r.id}-{render_key(r, fingerprint)[:16]}.safetensors"
             for r in requests}
    todo = [r for r in requests if not paths[r.id].is_file()]
    if todo:
        pipeline = load()
        pipeline.set_progress_bar_config(disable=True)
        try:
            for request in todo:
                _log(f"rendering {request.id} with the {label}")
                render_for_comparison(pipeline, request, device, paths[request.id])
        finally:
            del pipeline
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return paths


def render_key(request: RenderRequest, fingerprint: str) -> str:
    fields = {**request.to_dict(), "model": fingerprint, "probe": "v1"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def model_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a model folder: every file's relative path, size and mtime."""
    root = Path(path)
    digest = hashlib.sha256(str(root.resolve()).encode())
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = file.stat()
        relative = file.relative_to(root).as_posix()
        if relative.startswith(f"{REPORT_DIR}/") or relative in (MANIFEST_NAME, MODEL_CARD_NAME):
            continue     # the report, the verdict and the card change; the weights do not
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- comparing


def compare_renderings(source: dict, candidate: dict) -> dict:
    """Every per-prompt metric of the candidate's render against the source's."""
    blocks = compare_block_outputs(source["blocks"], candidate["blocks"])
    return {
        **video_metrics(source["frames"], candidate["frames"]),
        **audio_metrics(source["audio"], candidate["audio"], source["sample_rate"]),
        "latent_rel_err": relative_l2_error(source["latents"], candidate["latents"]),
        "block_rel_err": max((row["rel_err"] for row in blocks), default=0.0),
        "block_cosine_min": min((row["cosine"] for row in blocks), default=1.0),
        "blocks": blocks,
    }


def run_output_gates(source_root: str | os.PathLike, candidate: str | os.PathLike,
                     suite: str | os.PathLike | None = None, *, gates_file=None,
                     report_dir: str | os.PathLike | None = None,
                     work_dir: str | os.PathLike | None = None, device: str = "auto",
                     long_side: int | None = None, frames: int | None = None,
                     steps: int | None = None, source_factory: str = SOURCE_FACTORY,
                     candidate_factory: str = CANDIDATE_FACTORY) -> dict:
    """Render the suite with both models, compare, apply the ``[output]`` gates, write the report.

    ``candidate``: the packed artifact (loaded with ``candidate_factory``, the packed runtime).
    ``report_dir``: default ``<candidate>/validation`` (replaced as a whole). ``work_dir`` keeps
    the renders; pass the same one to reuse the source's renders for another artifact.
    Returns the JSON-able results (``prompts``, ``gates``, ``passed``, ``failures``, ...).
    """
    gates = output_gates(load_gate_config(gates_file), source=gates_file or "tasks/gates.toml")
    requests = load_suite(suite, long_side, frames, steps)
    problem = renderable_source(source_root)
    if problem:
        raise SourceError(f"output gates cannot render the source {source_root}: {problem}")
    device, dtype = resolve_device(device)
    report_dir = Path(report_dir) if report_dir else Path(candidate) / REPORT_DIR
    # Real-size renders take gigabytes: keep them beside the artifact, not in /tmp.
    with tempfile.TemporaryDirectory(prefix=".hlwq-validate-",
                                     dir=Path(candidate).resolve().parent) as scratch:
        work = Path(work_dir) if work_dir else Path(scratch)
        (work / "source").mkdir(parents=True, exist_ok=True)
        (work / "candidate").mkdir(parents=True, exist_ok=True)
        source_paths = render_all(
            lambda: resolve_factory(source_factory)(source_root, dtype=dtype).to(device),
            requests, device, work / "source", model_fingerprint(source_root), "source model")
        # placed as a render batch would be: auto offload, planned for the suite's shapes
        shapes = [RenderShape(**shape) for shape in render_shapes(requests)]
        candidate_paths = render_all(
            lambda: resolve_factory(candidate_factory)(str(candidate), device=device, dtype=dtype,
                                                       offload="auto", render_shapes=shapes),
            requests, device, work / "candidate", model_fingerprint(candidate), "packed artifact")
        return _compare_and_report(source_root, candidate, suite, requests, gates, source_paths,
                                   candidate_paths, report_dir, device, gate_sources(gates_file))


def _compare_and_report(source_root, candidate, suite, requests, gates, source_paths,
                        candidate_paths, report_dir: Path, device: str,
                        thresholds_from: list[dict]) -> dict:
    from hlwq.runtime.report import (
        REPORT_NAME,
        SHEET_DIR,
        write_comparison_sheet,
        write_report,
        write_stacked_sheet,
    )

    with directory_transaction(report_dir) as partial:
        prompts = {}
        for request in requests:
            source = load_rendering(source_paths[request.id])
            packed = load_rendering(candidate_paths[request.id])
            prompts[request.id] = {"prompt": request.prompt, "width": request.width,
                                   "height": request.height, "frames": request.frames,
                                   "seed": request.seed, "steps": request.steps,
                                   **compare_renderings(source, packed)}
            write_comparison_sheet(partial / SHEET_DIR / f"{request.id}.png", source["frames"],
                                   packed["frames"])
        # Names, not paths: the report lands inside the artifact, which must not depend on
        # where it (or the source) was written.
        results = gate_results(prompts, gates, source=source_name(source_root),
                               artifact=Path(candidate).resolve().name, device=device,
                               suite=suite_identity(suite), thresholds_from=thresholds_from)
        worst = results["worst_prompt"]
        write_stacked_sheet(partial / WORST_SHEET_NAME, load_rendering(source_paths[worst])["frames"],
                            load_rendering(candidate_paths[worst])["frames"])
        write_report(partial, results, metrics_path(candidate))
        atomic_write_text(partial / RESULTS_NAME, json.dumps(results, indent=2, sort_keys=True))
    return {**results, "report": str(report_dir / REPORT_NAME)}


def gate_results(prompts: dict[str, dict], gates: dict[str, OutputGate], **identity) -> dict:
    """The whole result: ``identity`` (source, artifact, device, suite, thresholds_from),
    the prompts, the worst prompt, the worst latent error and the gates' verdicts."""
    verdict = apply_output_gates(prompts, gates)
    return {**identity, "prompts": prompts, "worst_prompt": worst_prompt(prompts),
            "latent_rel_err": max(p["latent_rel_err"] for p in prompts.values()), **verdict}


def worst_prompt(prompts: dict[str, dict]) -> str:
    """The prompt failing the most gates, then the one with the lowest mean PSNR (NaN lowest):
    the one whose contact sheet the model card shows."""
    def badness(pid: str) -> tuple[int, float]:
        entry = prompts[pid]
        psnr = entry["psnr_mean"]
        return len(entry.get("failed_gates", [])), math.inf if math.isnan(psnr) else -psnr
    return max(prompts, key=badness)


def metrics_path(candidate: str | os.PathLike) -> Path | None:
    from hlwq.store.artifact import METRICS_NAME

    path = Path(candidate) / METRICS_NAME
    return path if path.is_file() else None


# --------------------------------------------------------------------------- the manifest


def summary_for_manifest(results: dict) -> dict:
    """What the manifest keeps: per-prompt metrics and the verdicts (block rows stay in
    ``validation/results.json``)."""
    return {
        "passed": results["passed"], "device": results["device"],
        "suite": {key: results["suite"][key] for key in ("name", "sha256")},   # no local path
        "prompts": {pid: {k: v for k, v in entry.items() if k != "blocks"}
                    for pid, entry in results["prompts"].items()},
        "gates": results["gates"], "thresholds_from": results["thresholds_from"],
        "failures": results["failures"],
        "failed_blocks": sorted({f"block {b['block']} ({b['stream']})"
                                 for b in results["failed_blocks"]}, key=_block_order),
        "worst_prompt": {"id": results["worst_prompt"],
                         "sheet": f"{REPORT_DIR}/{WORST_SHEET_NAME}"},
        "report": f"{REPORT_DIR}/report.html",
    }


def record_output_gates(artifact_dir: str | os.PathLike, results: dict) -> dict:
    """Record the verdict in the artifact's manifest and list ``validation/`` among its files.

    ``validated`` becomes true only when the tensor gates recorded at packaging passed and the
    output gates passed. The model card is regenerated (it states the verdict); the manifest
    is written last, atomically. Returns the new ``validation`` section.
    """
    artifact = Path(artifact_dir)
    manifest = read_manifest(artifact)
    validation = dict(manifest["validation"])
    validation["output_gates"] = summary_for_manifest(results)
    validation["validated"] = is_validated(validation)
    manifest["validation"] = json.loads(json.dumps(validation, sort_keys=True, default=str))

    files = {name: record for name, record in manifest["files"].items()
             if not name.startswith(f"{REPORT_DIR}/")}
    for path in sorted((artifact / REPORT_DIR).rglob("*")):
        if path.is_file():
            files[path.relative_to(artifact).as_posix()] = file_record(path)
    metrics = metrics_path(artifact)
    metrics_table = None
    if metrics is not None:
        import pyarrow.parquet as pq

        metrics_table = pq.read_table(metrics)
    write_card_and_manifest(artifact, manifest, files, metrics_table)
    return manifest["validation"]


# --------------------------------------------------------------------------- Prefect


def _log(message: str) -> None:
    """Log to the Prefect run when there is one (run_output_gates also runs outside flows)."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        get_run_logger().info("%s", message)


@task(name="output-gates", persist_result=False)
def output_gates_task(source_root: str, artifact: str, suite: str | None = None,
                      gates_file: str | None = None, enforce: bool = True,
                      record: bool = True, report_dir: str | None = None,
                      work_dir: str | None = None, device: str = "auto",
                      long_side: int | None = None, frames: int | None = None,
                      steps: int | None = None,
                      candidate_factory: str = CANDIDATE_FACTORY) -> dict:
    """Run the output gates, record them in the artifact, attach the report to the run.

    Raises GateFailedError when a gate fails and ``enforce`` (after recording: the artifact
    then says ``validated: false`` and holds the report that explains why).
    """
    from hlwq.runtime.report import publish_report

    results = run_output_gates(source_root, artifact, suite, gates_file=gates_file,
                               report_dir=report_dir, work_dir=work_dir, device=device,
                               long_side=long_side, frames=frames, steps=steps,
                               candidate_factory=candidate_factory)
    if record and report_dir is None:
        results["validation"] = record_output_gates(artifact, results)
    publish_report(results, Path(results["report"]).parent)
    logger = get_run_logger()
    if results["passed"]:
        logger.info("output gates passed on %d prompts", len(results["prompts"]))
    elif enforce:
        raise GateFailedError(failure_message(results, "the artifact is not marked validated"))
    else:
        logger.warning("%s", failure_message(results, "recorded only (not enforced)"))
    return results
