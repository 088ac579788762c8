"""Output gates: does the packed model still make the same videos as its source?

Every prompt of a versioned suite (``store/prompt_suite/v1.jsonl``) is rendered three times
with the same seed and settings: by the source model, by a near-lossless **control** (the
source with the very tensors the candidate quantized replaced by their 8-bit HLWQ
reconstruction, runtime/control.py) and by the packed artifact (the candidate). Per prompt
the candidate's and the control's renders are each compared with the source's
(quant/video_metrics.py): per-frame MSE/PSNR and SSIM (mean and worst frame), temporal
stability, waveform noise ratio/SNR and log-mel distance of the audio, the video latents after
every denoising step (the first step's and the final ones gate), and, inside the transformer,
each block's output on the first denoising step (runtime/block_probe.py).

Each metric is a *distance* (larger is worse). A gate passes on a prompt when

    candidate distance <= max(k * control distance, floor)

with ``k`` and the absolute ``floor`` per distance in ``[output.<distance>]`` of
``tasks/gates.toml``. The control calibrates the gates per model, in the same run: on a model
whose outputs drift under any perturbation, the control drifts too and the bar moves with it;
the first-step distances (block outputs, latents after step one) do not compound over the
steps and keep their resolution there. A failure names the prompts and the blocks.

No two models sit in memory together: the source is loaded once, renders what the cache
lacks, becomes the control in place and renders again, and is released; then the artifact
renders. Renders are cached in ``work_dir`` (the source's by its fingerprint, the control's by
the source's fingerprint, the selection and the encoder version; every render by its prompt,
seed and settings), so reruns and further candidates of one source render only themselves.
The report (runtime/report.py) goes to ``ARTIFACT/validation/`` by default and
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
from hlwq.runtime.block_probe import BlockProbe, compare_block_outputs, strided_sample
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
WORST_SHEET_NAME = "worst-prompt.png"   # the model card's picture: source, control, packed
FRAME_DIR = "frames"      # runtime/report.py's: per prompt its worst frame, source | control | packed
# What LTX2Pipeline needs to render: a source without all of them (a transformer alone)
# cannot be rendered, and its output gates are skipped.
PIPELINE_PARTS = ("transformer", "connectors", "vae", "audio_vae", "vocoder", "text_encoder",
                  "tokenizer", "scheduler")
RENDER_FORMAT = "v2"      # v2: the latents after every step, sampled (render keys change)
STEP_SAMPLE_VALUES = 1 << 18

# [output.<distance>] -> what it measures (tasks/gates.toml documents each). Every distance
# is 0 for identical renders and grows with the damage.
OUTPUT_DISTANCES = {
    "frame_mse": "mean over frames of the per-frame mean squared error (full scale 1.0)",
    "worst_frame_mse": "mean squared error of the worst frame",
    "ssim_distance": "1 - mean over frames of the per-frame SSIM",
    "temporal_diff": "mean |frame-to-frame change of the render - that of the source|",
    "audio_noise_ratio": "energy of the waveform difference / the source's energy",
    "mel_distance": "mean |log-mel difference| (dB)",
    "first_step_latent_rel_err": "relative L2 error of the video latents after the first step",
    "latent_rel_err": "relative L2 error of the final video latents",
    "block_rel_err": "relative L2 error of each block's output on the first step (per block)",
}
BLOCK_GATE = "block_rel_err"
FIRST_STEP_GATES = ("first_step_latent_rel_err", "block_rel_err")
GATE_KEYS = ("k", "floor")
# The absolute thresholds of the old output gates and the distance that replaced each.
LEGACY_OUTPUT_KEYS = {
    "min_psnr_mean": "frame_mse", "min_psnr_min": "worst_frame_mse",
    "min_ssim_mean": "ssim_distance", "max_temporal_diff": "temporal_diff",
    "min_audio_snr_db": "audio_noise_ratio", "max_mel_distance": "mel_distance",
    "max_latent_rel_err": "latent_rel_err", "max_block_rel_err": "block_rel_err",
}


# --------------------------------------------------------------------------- gates


@dataclass(frozen=True)
class OutputGate:
    """``candidate <= max(k * control, floor)``, on one distance."""
    name: str
    k: float
    floor: float

    def limit(self, control: float) -> float:
        """The most the candidate may drift; the floor alone where the control is not finite."""
        if not math.isfinite(control):
            return self.floor
        return max(self.k * control, self.floor)

    def passes(self, candidate: float, control: float) -> bool:
        return candidate <= self.limit(control)       # written so that NaN fails

    def judge(self, candidate: float, control: float) -> dict:
        """The distance pair, their ratio, the limit and the verdict, JSON-able (no Infinity)."""
        return {"candidate": candidate, "control": control,
                "ratio": distance_ratio(candidate, control), "limit": self.limit(control),
                "passed": self.passes(candidate, control)}

    def describe(self, judged: dict) -> str:
        ratio = judged["ratio"]
        times = "-" if ratio is None else f"{ratio:.3g}x"
        return (f"{self.name} {judged['candidate']:.4g} > limit {judged['limit']:.4g} "
                f"(control {judged['control']:.4g}, ratio {times}, k {self.k:g}, "
                f"floor {self.floor:g})")


def distance_ratio(candidate: float, control: float) -> float | None:
    """candidate / control; None where that is undefined (a zero or non-finite control)."""
    if not (math.isfinite(candidate) and math.isfinite(control)):
        return None
    if control <= 0:
        return 1.0 if candidate <= 0 else None
    return candidate / control


def output_gates(config: dict, source: str | os.PathLike = "gates config") -> dict[str, OutputGate]:
    """The ``[output.<distance>]`` tables as ``{distance: OutputGate}``.

    Raises InvalidOptionError on a missing, unknown or malformed entry; a key of the old
    absolute gates (``min_psnr_mean`` and the rest) gets one line saying what to write instead.
    """
    section = config.get("output")
    if not isinstance(section, dict):
        raise InvalidOptionError(f"{source}: no [output] table (output gates need "
                                 f"[output.<distance>] tables for {', '.join(OUTPUT_DISTANCES)})")
    legacy = [key for key in section if key in LEGACY_OUTPUT_KEYS]
    if legacy:
        key = legacy[0]
        raise InvalidOptionError(
            f"{source}: [output] {key} = {section[key]!r} is an absolute threshold of the old "
            "output gates; they now compare the candidate with an 8-bit control rendered in the "
            f"same run: write [output.{LEGACY_OUTPUT_KEYS[key]}] with k = <times the control's "
            "distance> and floor = <distance always allowed> instead (tasks/gates.toml documents "
            "each)")
    unknown = sorted(set(section) - set(OUTPUT_DISTANCES))
    missing = sorted(set(OUTPUT_DISTANCES) - set(section))
    if unknown or missing:
        raise InvalidOptionError(f"{source}: [output] has unknown entries {unknown} and lacks "
                                 f"{missing}; expected a table [output.<distance>] for each of "
                                 f"{', '.join(OUTPUT_DISTANCES)}")
    gates = {}
    for name in OUTPUT_DISTANCES:
        table = section[name]
        where = f"{source}: [output.{name}]"
        if not isinstance(table, dict) or set(table) != set(GATE_KEYS):
            raise InvalidOptionError(f"{where}: needs exactly the keys k and floor, got "
                                     f"{sorted(table) if isinstance(table, dict) else table!r}")
        for key in GATE_KEYS:
            value = table[key]
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value < 0 or (key == "k" and value == 0)):
                raise InvalidOptionError(f"{where}: {key}={value!r} must be a finite number, "
                                         f"{'> 0' if key == 'k' else '>= 0'}")
        gates[name] = OutputGate(name, float(table["k"]), float(table["floor"]))
    return gates


def distance(metrics: dict, name: str) -> float:
    """One distance of a comparison's metrics (``compare_renderings``, or the control's)."""
    if name == "frame_mse":
        return metrics["mse_mean"]
    if name == "worst_frame_mse":
        return metrics["mse_max"]
    if name == "ssim_distance":
        return 1.0 - metrics["ssim_mean"]
    return metrics[name]


def judge_prompt(entry: dict, gates: dict[str, OutputGate], prompt: str = "prompt") -> dict:
    """Each gate on one prompt's entry: ``{distance: judged}`` (block gate: its worst block)."""
    control = entry.get("control")
    if not isinstance(control, dict):
        raise InvalidOptionError(
            f"{prompt}: no control metrics; the output gates judge a candidate against the 8-bit "
            "control rendered in the same run (compare_renderings(source, candidate, control))")
    judged = {}
    for name, gate in gates.items():
        if name == BLOCK_GATE and entry.get("blocks"):
            rows = [{**gate.judge(row["rel_err"], row.get("control_rel_err", math.nan)),
                     "block": row["block"], "stream": row["stream"]} for row in entry["blocks"]]
            judged[name] = max(rows, key=_margin)
            judged[name]["failed_blocks"] = [f"block {r['block']} ({r['stream']})"
                                             for r in rows if not r["passed"]]
        else:
            judged[name] = gate.judge(distance(entry, name), distance(control, name))
    return judged


def _margin(judged: dict) -> float:
    """candidate / limit, NaN as the worst: the row or prompt nearest to failing (or past it)."""
    value, limit = judged["candidate"], judged["limit"]
    if math.isnan(value):
        return math.inf
    return value / limit if limit > 0 else (0.0 if value <= 0 else math.inf)


def apply_output_gates(prompts: dict[str, dict], gates: dict[str, OutputGate]) -> dict:
    """Each gate over every prompt: the worst prompt's distances, limit, verdict, what failed.

    Each prompt's entry needs its ``control`` metrics (``compare_renderings`` with a control).
    Sets ``distances``, ``passed`` and ``failed_gates`` on each entry; returns ``{"gates",
    "passed", "failures" (one line per failing prompt), "failed_prompts", "failed_blocks"}``.
    """
    for pid, entry in prompts.items():
        entry["distances"] = judge_prompt(entry, gates, f"prompt {pid}")
    verdicts, failed_blocks = {}, []
    for name, gate in gates.items():
        judged = {pid: entry["distances"][name] for pid, entry in prompts.items()}
        worst = max(judged, key=lambda pid: _margin(judged[pid]))
        failed = [pid for pid, j in judged.items() if not j["passed"]]
        verdict = {"distance": name, "k": gate.k, "floor": gate.floor, "worst_prompt": worst,
                   **{key: judged[worst][key] for key in ("candidate", "control", "ratio",
                                                          "limit")},
                   "verdict": "fail" if failed else "pass", "failed_prompts": failed}
        if name == BLOCK_GATE:
            labels = {label for pid in failed for label in judged[pid].get("failed_blocks", [])}
            verdict["failed_blocks"] = sorted(labels, key=_block_order)
            failed_blocks += [{"prompt": pid, "block": row["block"], "stream": row["stream"],
                               "rel_err": row["rel_err"],
                               "control_rel_err": row.get("control_rel_err")}
                              for pid in failed for row in prompts[pid].get("blocks", [])
                              if not gate.passes(row["rel_err"],
                                                 row.get("control_rel_err", math.nan))]
        verdicts[name] = verdict
    failures = []
    for pid, entry in prompts.items():
        broken = [name for name in gates if not entry["distances"][name]["passed"]]
        entry["failed_gates"] = broken
        entry["passed"] = not broken
        if broken:
            failures.append(f"prompt {pid}: " + "; ".join(
                gates[name].describe(entry["distances"][name]) for name in broken))
    return {"gates": verdicts, "passed": not failures, "failures": failures,
            "failed_prompts": [pid for pid, entry in prompts.items() if not entry["passed"]],
            "failed_blocks": failed_blocks}


def _block_order(label: str) -> tuple[int, str]:
    number, _, stream = label.removeprefix("block ").partition(" ")
    return int(number), stream


def failure_message(results: dict, consequence: str) -> str:
    failed = results["failed_prompts"]
    head = (f"output gates failed on {len(failed)} of {len(results['prompts'])} prompt(s) "
            f"({', '.join(failed)}) against the {_control_words(results)}; {consequence}:")
    lines = [head]
    lines += [f"  {line}" for line in results["failures"]]
    blocks = results["gates"].get(BLOCK_GATE, {}).get("failed_blocks")
    if blocks:
        lines.append(f"  blocks that drift past their {BLOCK_GATE} limit: {', '.join(blocks)}")
    if results.get("report"):
        lines.append(f"  report: {results['report']}")
    return "\n".join(lines)


def _control_words(results: dict) -> str:
    control = results.get("control") or {}
    return f"{control.get('bits', 8)}-bit control"


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
    """Render one request; save frames, audio, the final latents, the latents after every
    denoising step (sampled, ``STEP_SAMPLE_VALUES`` evenly strided values at the same positions
    in every model) and the first step's block outputs."""
    final, steps = {}, []

    def keep_latents(pipe, step, timestep, tensors):
        final["latents"] = tensors["latents"]
        steps.append(strided_sample(tensors["latents"], STEP_SAMPLE_VALUES))
        return {}

    with BlockProbe(pipeline.transformer) as probe, torch.inference_mode():
        output = pipeline(**render_arguments(request, device), callback_on_step_end=keep_latents,
                          callback_on_step_end_tensor_inputs=["latents"])
    audio = output.audio[0]
    tensors = {
        # float16 halves the disk a real-size render takes; its rounding (< 5e-4, a frame MSE
        # near 4e-8) sits far below what even the 8-bit control drifts.
        "frames": torch.as_tensor(np.asarray(output.frames[0], dtype=np.float16)),
        "audio": (audio.float().cpu() if torch.is_tensor(audio)
                  else torch.as_tensor(np.asarray(audio, dtype=np.float32))),
        "latents": final["latents"].float().cpu(),
        **{f"step.{index}": sample for index, sample in enumerate(steps)},
        **{f"block.{block}.{stream}": value for block, streams in probe.outputs.items()
           for stream, value in streams.items()},
    }
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"sample_rate": str(audio_sample_rate(pipeline)), "id": request.id})
    return path


def load_rendering(path: Path) -> dict:
    """A saved render: frames, audio, latents, sample_rate, steps (the latents after each step,
    sampled) and blocks {index: {stream: tensor}}."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        sample_rate = int(handle.metadata()["sample_rate"])
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for key in [k for k in tensors if k.startswith("block.")]:
        _, index, stream = key.split(".")
        blocks.setdefault(int(index), {})[stream] = tensors.pop(key)
    steps = {int(key.split(".")[1]): tensors.pop(key) for key in list(tensors)
             if key.startswith("step.")}
    return {**tensors, "sample_rate": sample_rate, "blocks": blocks,
            "steps": [steps[i] for i in sorted(steps)]}


def render_paths(requests: list[RenderRequest], out_dir: Path, fingerprint: str,
                 settings: dict | None = None) -> dict[str, Path]:
    return {r.id: out_dir / f"{r.id}-{render_key(r, fingerprint, settings)[:16]}.safetensors"
            for r in requests}


def render_all(load, requests: list[RenderRequest], device: str, out_dir: Path,
               fingerprint: str, label: str, settings: dict | None = None) -> dict[str, Path]:
    """Render what ``out_dir`` lacks with the pipeline ``load()`` builds (only if needed)."""
    paths = render_paths(requests, out_dir, fingerprint, settings)
    todo = [r for r in requests if not paths[r.id].is_file()]
    if todo:
        pipeline = load()
        try:
            _render_each(pipeline, todo, device, paths, label)
        finally:
            del pipeline
            _release(device)
    return paths


def render_source_and_control(load_source, selection: list[dict], control: dict,
                              requests: list[RenderRequest], device: str, work: Path,
                              source_fingerprint: str, settings: dict
                              ) -> tuple[dict[str, Path], dict[str, Path]]:
    """The source's renders and the control's, from one load of the source (only if either
    cache lacks a prompt): the source renders first, then becomes the control in place
    (runtime/control.py: its selected weights at 8 bits) and renders again."""
    from hlwq.runtime.control import apply_control

    source_paths = render_paths(requests, work / "source", source_fingerprint, settings)
    control_paths = render_paths(requests, work / "control", control["fingerprint"], settings)
    source_todo = [r for r in requests if not source_paths[r.id].is_file()]
    control_todo = [r for r in requests if not control_paths[r.id].is_file()]
    if source_todo or control_todo:
        pipeline = load_source()
        try:
            _render_each(pipeline, source_todo, device, source_paths, "source model")
            if control_todo:
                count = apply_control(pipeline, selection)
                _log(f"8-bit control: {count} tensors of the source re-quantized in memory")
                _render_each(pipeline, control_todo, device, control_paths, "8-bit control")
        finally:
            del pipeline
            _release(device)
    return source_paths, control_paths


def _render_each(pipeline, requests, device, paths, label) -> None:
    if not requests:
        return
    pipeline.set_progress_bar_config(disable=True)
    for request in requests:
        _log(f"rendering {request.id} with the {label}")
        paths[request.id].parent.mkdir(parents=True, exist_ok=True)
        render_for_comparison(pipeline, request, device, paths[request.id])


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def render_key(request: RenderRequest, fingerprint: str, settings: dict | None = None) -> str:
    """The identity of one render: the request (prompt, seed, size, steps...), the model's
    fingerprint, the render format and the device and dtype it ran on."""
    fields = {**request.to_dict(), "model": fingerprint, "probe": RENDER_FORMAT,
              **(settings or {})}
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


def latent_trajectory(source: dict, candidate: dict) -> list[float]:
    """Relative error of the video latents after each denoising step (sampled values)."""
    return [relative_l2_error(s, c) for s, c in zip(source.get("steps", []),
                                                    candidate.get("steps", []), strict=False)]


def compare_renderings(source: dict, candidate: dict, control: dict | None = None) -> dict:
    """Every per-prompt metric of the candidate's render against the source's; with
    ``control`` (the 8-bit control's render), the control's own metrics under ``control``
    and each block row's ``control_rel_err``, which the gates judge against."""
    entry = _metrics(source, candidate)
    if control is not None:
        reference = _metrics(source, control)
        by_row = {(r["block"], r["stream"]): r["rel_err"] for r in reference.pop("blocks")}
        for row in entry["blocks"]:
            row["control_rel_err"] = by_row.get((row["block"], row["stream"]), math.nan)
        entry["control"] = reference
    return entry


def _metrics(source: dict, candidate: dict) -> dict:
    blocks = compare_block_outputs(source["blocks"], candidate["blocks"])
    trajectory = latent_trajectory(source, candidate)
    final = relative_l2_error(source["latents"], candidate["latents"])
    return {
        **video_metrics(source["frames"], candidate["frames"]),
        **audio_metrics(source["audio"], candidate["audio"], source["sample_rate"]),
        "latent_rel_err": final,
        # A render without step samples (1 step, or another tool's) has only its final latents.
        "first_step_latent_rel_err": trajectory[0] if trajectory else final,
        "latent_trajectory": trajectory,
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
    """Render the suite with the source, the 8-bit control and the candidate; compare; apply
    the ``[output.<distance>]`` gates; write the report.

    ``candidate``: the packed artifact (loaded with ``candidate_factory``, the packed runtime);
    its manifest names the tensors the control re-quantizes. ``report_dir``: default
    ``<candidate>/validation`` (replaced as a whole). ``work_dir`` keeps the renders; pass the
    same one to reuse the source's and the control's renders for another artifact of that
    source. Returns the JSON-able results (``prompts``, ``gates``, ``passed``, ...).
    """
    from hlwq.runtime.control import control_identity, control_selection

    gates = output_gates(load_gate_config(gates_file), source=gates_file or "tasks/gates.toml")
    requests = load_suite(suite, long_side, frames, steps)
    problem = renderable_source(source_root)
    if problem:
        raise SourceError(f"output gates cannot render the source {source_root}: {problem}")
    device, dtype = resolve_device(device)
    settings = {"device": device, "dtype": str(dtype).removeprefix("torch.")}
    selection = control_selection(candidate)
    source_fingerprint = model_fingerprint(source_root)
    control = control_identity(source_fingerprint, selection)
    report_dir = Path(report_dir) if report_dir else Path(candidate) / REPORT_DIR
    # Real-size renders take gigabytes: keep them beside the artifact, not in /tmp.
    with tempfile.TemporaryDirectory(prefix=".hlwq-validate-",
                                     dir=Path(candidate).resolve().parent) as scratch:
        work = Path(work_dir) if work_dir else Path(scratch)
        source_paths, control_paths = render_source_and_control(
            lambda: resolve_factory(source_factory)(source_root, dtype=dtype).to(device),
            selection, control, requests, device, work, source_fingerprint, settings)
        # placed as a render batch would be: auto offload, planned for the suite's shapes
        shapes = [RenderShape(**shape) for shape in render_shapes(requests)]
        candidate_paths = render_all(
            lambda: resolve_factory(candidate_factory)(str(candidate), device=device, dtype=dtype,
                                                       offload="auto", render_shapes=shapes),
            requests, device, work / "candidate", model_fingerprint(candidate), "packed artifact",
            settings)
        control = {key: value for key, value in control.items() if key != "fingerprint"}
        return _compare_and_report(source_root, candidate, suite, requests, gates, source_paths,
                                   control_paths, candidate_paths, report_dir, device,
                                   gate_sources(gates_file), control)


def _compare_and_report(source_root, candidate, suite, requests, gates, source_paths,
                        control_paths, candidate_paths, report_dir: Path, device: str,
                        thresholds_from: list[dict], control: dict) -> dict:
    from hlwq.runtime.report import (
        REPORT_NAME,
        SHEET_DIR,
        write_comparison_sheet,
        write_frame_comparison,
        write_report,
        write_stacked_sheet,
    )

    with directory_transaction(report_dir) as partial:
        prompts = {}
        for request in requests:
            source = load_rendering(source_paths[request.id])
            reference = load_rendering(control_paths[request.id])
            packed = load_rendering(candidate_paths[request.id])
            entry = {"prompt": request.prompt, "width": request.width, "height": request.height,
                     "frames": request.frames, "seed": request.seed, "steps": request.steps,
                     **compare_renderings(source, packed, reference)}
            prompts[request.id] = entry
            write_comparison_sheet(partial / SHEET_DIR / f"{request.id}.png", source["frames"],
                                   packed["frames"])
            write_frame_comparison(partial / FRAME_DIR / f"{request.id}.png", source["frames"],
                                   reference["frames"], packed["frames"], entry["worst_frame"])
        # Names, not paths: the report lands inside the artifact, which must not depend on
        # where it (or the source) was written.
        results = gate_results(prompts, gates, source=source_name(source_root),
                               artifact=Path(candidate).resolve().name, device=device,
                               suite=suite_identity(suite), thresholds_from=thresholds_from,
                               control=control)
        worst = results["worst_prompt"]
        write_stacked_sheet(partial / WORST_SHEET_NAME, load_rendering(source_paths[worst])["frames"],
                            load_rendering(candidate_paths[worst])["frames"],
                            load_rendering(control_paths[worst])["frames"])
        write_report(partial, results, metrics_path(candidate))
        atomic_write_text(partial / RESULTS_NAME, json.dumps(results, indent=2, sort_keys=True))
    return {**results, "report": str(report_dir / REPORT_NAME)}


def gate_results(prompts: dict[str, dict], gates: dict[str, OutputGate], **identity) -> dict:
    """The whole result: ``identity`` (source, artifact, device, suite, thresholds_from,
    control), the prompts, the worst prompt, the worst latent error and the gates' verdicts."""
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
    """What the manifest keeps: per-prompt metrics (the candidate's, the control's and the
    judged distances) and the verdicts (block rows stay in ``validation/results.json``)."""
    worst = results["worst_prompt"]
    return {
        "passed": results["passed"], "device": results["device"],
        "suite": {key: results["suite"][key] for key in ("name", "sha256")},   # no local path
        "control": results.get("control"),
        "prompts": {pid: {k: v for k, v in entry.items() if k != "blocks"}
                    for pid, entry in results["prompts"].items()},
        "gates": results["gates"], "thresholds_from": results["thresholds_from"],
        "failures": results["failures"],
        "failed_blocks": sorted({f"block {b['block']} ({b['stream']})"
                                 for b in results["failed_blocks"]}, key=_block_order),
        "worst_prompt": {"id": worst, "sheet": f"{REPORT_DIR}/{WORST_SHEET_NAME}",
                         "frame": f"{REPORT_DIR}/{FRAME_DIR}/{worst}.png"},
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
    worst = validation["output_gates"]["worst_prompt"]
    if not (artifact / worst["frame"]).is_file():
        del worst["frame"]               # results made without a report's frame pictures
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
