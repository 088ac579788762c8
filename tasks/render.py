"""One render as a Prefect task: pipeline from a per-process cache, MP4 + contact sheet, one catalog row.

The pipeline is built once per worker process (the first render that needs it) and reused by
every later render in that process; image-to-video renders share the text-to-video pipeline's
modules. Each render makes exactly its own LoRAs active on that shared pipeline (loading a file
once, deleting adapters no longer asked for), under the same lock as the render itself. Which
function builds it is a "module:function" string, called as
``factory(artifact, device=, dtype=, verify=False)`` (the batch verified the artifact), so flows
and deployments can pass it as a plain parameter (tests point it at a fixture; production uses
the packed loader).
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task

from hlwq.quant.errors import HLWQError, InvalidOptionError
from hlwq.runtime.hub import resolve_artifact
from hlwq.runtime.memory_plan import RenderShape
from hlwq.runtime.offload import check_offload
from hlwq.runtime.peak_memory import PeakMemory
from hlwq.runtime.video import write_contact_sheet, write_mp4
from hlwq.store.catalog import RENDERED
from hlwq.store.hash_cache import sha256_file
from hlwq.store.prompts import RenderRequest

DEFAULT_PIPELINE_FACTORY = "hlwq.runtime.loader:load_pipeline"
DEFAULT_PLACEMENT = {"offload": "auto", "vae_tiling": False, "dtype": "auto"}
VIDEO_DIR, SHEET_DIR = "videos", "contact-sheets"

_PIPELINES: dict[tuple, Any] = {}        # (factory, artifact, device, options) -> pipeline
_IMAGE_TO_VIDEO: dict[tuple, Any] = {}    # same key -> image-to-video view of the same modules
_PIPELINE_LOCK = threading.Lock()  # one render at a time per pipeline: schedulers keep state


@task(name="resolve-artifact", task_run_name="resolve {artifact}", persist_result=False)
def resolve_artifact_task(artifact: str) -> str:
    """The artifact's local folder; a Hub repo's files are downloaded and verified first."""
    return str(resolve_artifact(artifact))


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """'auto' -> CUDA when present, else the CPU; dtype 'auto' -> bfloat16 on CUDA, float32
    on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidOptionError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    check_offload("auto", dtype)
    if dtype == "auto":
        return device, (torch.float32 if device == "cpu" else torch.bfloat16)
    return device, getattr(torch, dtype)


def resolve_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InvalidOptionError(
            f"pipeline factory {spec!r} cannot be imported ({exc}); expected 'module:function'"
        ) from exc


def cached_pipeline(artifact: str, image_to_video: bool, device: str, factory: str,
                    placement: dict[str, Any] | None = None,
                    shapes: list[dict[str, Any]] | None = None) -> Any:
    """The process's pipeline for this artifact, device and placement; built on first use only.

    ``placement``: ``offload``, ``vae_tiling`` and ``dtype`` (runtime/offload.py); the factory
    gets the first two as keyword arguments, and ``render_shapes``: the memory plan's shapes
    of ``shapes`` (:func:`render_shapes`), which ``auto`` offload places the pipeline for. A
    pipeline is placed once, for the batch that builds it; later batches in the process reuse
    it as placed."""
    placement = {**DEFAULT_PLACEMENT, **(placement or {})}
    device, dtype = resolve_device(device, placement["dtype"])
    key = (factory, str(Path(artifact).resolve()), device, tuple(sorted(placement.items())))
    if key not in _PIPELINES:
        # The batch verified the artifact once (flows/render_flow.py); no second read of it.
        pipeline = resolve_factory(factory)(
            artifact, device=device, dtype=dtype, verify=False, offload=placement["offload"],
            vae_tiling=placement["vae_tiling"],
            render_shapes=[RenderShape(**shape) for shape in shapes] if shapes else None)
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)  # Prefect logs carry the progress
        _PIPELINES[key] = pipeline
    if not image_to_video:
        return _PIPELINES[key]
    if key not in _IMAGE_TO_VIDEO:
        _IMAGE_TO_VIDEO[key] = image_to_video_variant(_PIPELINES[key])
    return _IMAGE_TO_VIDEO[key]


def image_to_video_variant(pipeline: Any) -> Any:
    """The image-to-video pipeline over the same modules: no second load, no second copy."""
    from diffusers import DiffusionPipeline

    from hlwq.runtime.lora import PackedLTX2ImageToVideoPipeline

    if isinstance(pipeline, DiffusionPipeline):
        return PackedLTX2ImageToVideoPipeline.from_pipe(pipeline)
    return pipeline  # anything else must take `image=` itself


def loaded_pipelines() -> int:
    """How many pipelines this process has built (since the last clear)."""
    return len(_PIPELINES)


def clear_pipeline_cache() -> None:
    _PIPELINES.clear()
    _IMAGE_TO_VIDEO.clear()


def render_shapes(requests: list[RenderRequest]) -> list[dict[str, Any]]:
    """The distinct shapes of a batch's renders, as the memory plan takes them (JSON-able: a
    task parameter). LTX2Pipeline doubles the batch for guidance above 1."""
    shapes = {(r.width, r.height, r.frames, r.fps, r.guidance > 1.0) for r in requests}
    return [{"width": w, "height": h, "frames": f, "fps": fps, "guidance": g}
            for w, h, f, fps, g in sorted(shapes)]


def audio_sample_rate(pipeline: Any) -> int:
    """The waveform's rate is the vocoder's output rate (its input rate is the mel rate)."""
    config = pipeline.vocoder.config
    return int(getattr(config, "output_sampling_rate", None) or pipeline.audio_sampling_rate)


def activate_loras(pipeline: Any, request: RenderRequest) -> None:
    """The request's LoRAs, and no others, active on the shared pipeline."""
    if not request.loras and not hasattr(pipeline, "get_list_adapters"):
        return                      # a pipeline without diffusers' LoRA API, and none asked for
    from hlwq.runtime.lora import use_loras

    use_loras(pipeline, [(lora.path, lora.sha256, lora.scale) for lora in request.loras])


def output_stem(request: RenderRequest, render_key: str) -> str:
    return f"{request.id}-{render_key[:12]}"


def render_arguments(request: RenderRequest, device_name: str) -> dict[str, Any]:
    """The pipeline call of a text-to-video request (image-to-video adds ``image``)."""
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or None,
        "width": request.width,
        "height": request.height,
        "num_frames": request.frames,
        "frame_rate": request.fps,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "generator": torch.Generator(device=device_name).manual_seed(request.seed),
        "output_type": "np",
    }


def render_request(
    request: RenderRequest,
    artifact: str,
    artifact_id: str,
    render_key: str,
    output_dir: str,
    device: str = "auto",
    factory: str = DEFAULT_PIPELINE_FACTORY,
    placement: dict[str, Any] | None = None,
    shapes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Render one request to `<output_dir>/videos/<id>-<key>.mp4` plus its contact sheet; return
    its catalog row, with the render's wall time and peak memory (peak_memory.py: the
    accelerator's on CUDA, the process's RSS on the CPU). ``shapes``: the batch's render
    shapes, for ``auto`` offload (default: this request's)."""
    pipeline = cached_pipeline(artifact, request.image_to_video, device, factory, placement,
                               shapes or render_shapes([request]))
    device_name, _ = resolve_device(device)
    arguments = render_arguments(request, device_name)
    if request.image_to_video:
        from PIL import Image

        arguments["image"] = Image.open(request.image).convert("RGB")
    with _PIPELINE_LOCK:
        activate_loras(pipeline, request)
        started = time.perf_counter()
        try:
            with PeakMemory(device_name) as peak, torch.inference_mode():
                output = pipeline(**arguments)
        except Exception as error:
            # An out-of-memory render's peak is the figure its catalog row most needs.
            error.render_measure = measure_row(time.perf_counter() - started, peak, pipeline)
            raise
        render_seconds = time.perf_counter() - started

    frames = np.asarray(output.frames[0])
    audio = output.audio[0].float().cpu().numpy() if torch.is_tensor(output.audio) else np.asarray(output.audio[0])
    stem = output_stem(request, render_key)
    video_path = write_mp4(Path(output_dir) / VIDEO_DIR / f"{stem}.mp4", frames, request.fps,
                           audio, audio_sample_rate(pipeline))
    sheet_path = write_contact_sheet(Path(output_dir) / SHEET_DIR / f"{stem}.png", frames)
    return {
        **request.to_dict(),
        "render_key": render_key,
        "artifact_id": artifact_id,
        "artifact": str(artifact),
        "output_path": str(video_path.resolve()),
        "contact_sheet": str(sheet_path.resolve()),
        "sha256": sha256_file(video_path),
        "duration_s": len(frames) / request.fps,
        **measure_row(render_seconds, peak, pipeline),
        "status": RENDERED,
        "error": None,
        "rendered_at": datetime.now(UTC).isoformat(),
    }


def measure_row(seconds: float, peak: PeakMemory, pipeline) -> dict[str, Any]:
    """The catalog's measure of one render attempt, rendered or failed."""
    return {"render_seconds": seconds, "peak_memory_bytes": int(peak.peak_bytes),
            "peak_memory_kind": peak.kind, "offload": getattr(pipeline, "offload_mode", None)}


def retry_transient(task, task_run, state) -> bool:
    """Retry what may pass next time (a CUDA hiccup, I/O); an HLWQError is bad data: it stays."""
    return not isinstance(state.result(raise_on_failure=False), HLWQError)


@task(name="render", task_run_name="render {request[id]}", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_transient, persist_result=False)
def render_task(
    request: dict[str, Any],
    artifact: str,
    artifact_id: str,
    render_key: str,
    output_dir: str,
    device: str = "auto",
    factory: str = DEFAULT_PIPELINE_FACTORY,
    placement: dict[str, Any] | None = None,
    shapes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return render_request(RenderRequest(**request), artifact, artifact_id, render_key, output_dir,
                          device, factory, placement, shapes)
