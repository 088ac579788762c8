"""`render_batch`: render a prompt file with the packed runtime into MP4s, contact sheets and a catalog.

Rows that break a rule are rejected up front (named with their row numbers); the artifact is
verified once; every valid row is one `render` task, retried on transient errors only (never
on an HLWQError: bad data stays bad); renders already in the catalog with an intact output are
skipped; each finished render's row is catalogued before the next starts; a render that still fails after its retries is recorded and the batch goes on. The
final state's message counts rendered, skipped, failed and rejected renders; the run is Failed
when any render failed or any row was rejected.
"""

from __future__ import annotations

import base64
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.exceptions import MissingResult
from prefect.states import Completed, Failed, State

from hlwq.runtime.hub import is_hub_reference
from hlwq.runtime.offload import check_offload
from hlwq.store.catalog import FAILED, append_catalog, artifact_id, completed_renders, read_catalog
from hlwq.store.output_dir import folder_lock
from hlwq.store.prompts import PromptBatch, RenderRequest, load_prompts, request_key
from hlwq.tasks.render import (
    DEFAULT_PIPELINE_FACTORY,
    render_shapes,
    render_task,
    resolve_artifact_task,
)

EMBEDDED_SHEETS = 24  # contact sheets embedded in the markdown artifact (bounds its size)
THUMBNAIL_WIDTH = 640


@dataclass
class BatchSummary:
    output_dir: str
    artifact_id: str
    rendered: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.rejected

    @property
    def message(self) -> str:
        return (f"{len(self.rendered)} rendered, {len(self.skipped)} skipped (already catalogued), "
                f"{len(self.failed)} failed, {len(self.rejected)} rows rejected")

    def to_dict(self) -> dict[str, Any]:
        counts = {name: len(getattr(self, name)) for name in ("rendered", "skipped", "failed", "rejected")}
        return {**asdict(self), "counts": counts, "message": self.message}


def render_run_name() -> str:
    """'<prompt file> with <artifact>', the way a user tells runs apart in the UI."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    return (f"{Path(parameters['prompt_file']).stem} with "
            f"{Path(parameters['artifact']).resolve().name}")


@flow(name="render-batch", flow_run_name=render_run_name, persist_result=False)
def render_batch(
    artifact: str,
    prompt_file: str,
    output_dir: str,
    device: str = "auto",
    retries: int = 2,
    retry_delay_s: float = 5.0,
    pipeline_factory: str = DEFAULT_PIPELINE_FACTORY,
    offload: str = "auto",
    vae_tiling: bool = False,
    dtype: str = "auto",
    verify: bool = True,
    wait: bool = True,
    loras: list[dict[str, Any]] | None = None,
) -> State:
    """Render every valid row of `prompt_file` with the pipeline of `artifact` into `output_dir`.

    `artifact` is a folder or a Hub repo (`owner/name[@revision]`): then the manifest's files
    of the revision's current commit are downloaded into the Hub cache and verified first.

    `offload` (auto, none, model, sequential, group), `vae_tiling` and `dtype` (auto,
    float32, bfloat16, float16) place the pipeline (runtime/offload.py); `auto` plans for
    the largest render still to do (the memory plan of every shape in the batch).
    The artifact is verified once per batch (``verify``), never per render. One batch writes
    an output folder at a time: a second one waits for the lock, or fails with ``wait=False``.
    ``loras`` (``[{"path": ..., "scale": ...}]``) are the default LoRAs of rows without a
    ``loras`` column.
    """
    logger = get_run_logger()
    check_offload(offload, dtype)
    placement = {"offload": offload, "vae_tiling": vae_tiling, "dtype": dtype}
    batch = load_prompts(prompt_file, default_loras=loras)
    for rejected in batch.rejected:
        logger.warning("prompt file %s: rejected %s", prompt_file, rejected)
    local = resolve_artifact_task(artifact)      # a Hub artifact is verified as it is fetched
    model_id = artifact_id(local)
    if verify and not is_hub_reference(artifact):
        verify_or_raise(local)
    artifact = local
    with folder_lock(output_dir, wait=wait):
        summary = render_rows(batch, artifact, model_id, output_dir, device, retries,
                              retry_delay_s, pipeline_factory, placement)
    publish_artifacts(summary, batch)
    logger.info("render batch: %s", summary.message)
    final = Completed if summary.ok else Failed
    return final(message=summary.message, data=summary.to_dict())


def render_rows(batch: PromptBatch, artifact: str, model_id: str, output_dir: str, device: str,
                retries: int, retry_delay_s: float, pipeline_factory: str,
                placement: dict) -> BatchSummary:
    """Each request not done yet, one task each; each row is catalogued as its render ends,
    so a batch killed midway keeps every finished render and its rerun does only the rest."""
    summary = BatchSummary(str(Path(output_dir).resolve()), model_id,
                           rejected=[str(row) for row in batch.rejected])
    render = render_task.with_options(retries=retries, retry_delay_seconds=retry_delay_s)
    done = completed_renders(read_catalog(output_dir))
    run_id = current_flow_run_id()
    keyed = [(request, request_key(request, model_id)) for request in batch.requests]
    shapes = render_shapes([request for request, key in keyed if key not in done])
    for request, key in keyed:
        if key in done:
            summary.skipped.append(done[key])
            continue
        state = render(request.to_dict(), artifact, model_id, key, output_dir, device,
                       pipeline_factory, placement, shapes, return_state=True)
        row = (state.result() if state.is_completed()
               else failure_row(request, key, model_id, artifact, state))
        append_catalog(output_dir, [{**row, "flow_run_id": run_id}])
        (summary.rendered if state.is_completed() else summary.failed).append(row)
    return summary


def verify_or_raise(artifact: str) -> None:
    """Every file's size and hash and every tensor entry, once per batch."""
    from hlwq.store.artifact import open_artifact

    open_artifact(artifact, verify=True)


def failure_row(request: RenderRequest, key: str, model_id: str, artifact: str, state: State) -> dict[str, Any]:
    try:
        error = state.result(raise_on_failure=False)
    except MissingResult as exc:  # the exception itself may be gone; the state message remains
        error = exc
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else (state.message or "failed")
    return {**request.to_dict(), "render_key": key, "artifact_id": model_id, "artifact": str(artifact),
            **getattr(error, "render_measure", {}), "status": FAILED, "error": text}


def publish_artifacts(summary: BatchSummary, batch: PromptBatch) -> None:
    """Summary, render table and contact sheets as Prefect artifacts of the flow run."""
    rows = ([("rendered", row) for row in summary.rendered] + [("skipped", row) for row in summary.skipped]
            + [("failed", row) for row in summary.failed])
    create_markdown_artifact(markdown=summary_markdown(summary, batch), key="render-summary",
                             description=summary.message)
    create_table_artifact(table=[table_row(status, row) for status, row in rows], key="render-table",
                          description=f"renders of {batch.path.name}")
    sheets = [row for _, row in rows if row.get("contact_sheet")]
    for row in sheets:
        create_image_artifact(image_url=Path(row["contact_sheet"]).as_uri(),
                              key=f"contact-sheet-{artifact_key(row['id'])}",
                              description=f"{row['id']}: {row['prompt'][:120]}")
    if sheets:
        create_markdown_artifact(markdown=contact_sheet_markdown(sheets), key="render-contact-sheets",
                                 description="contact sheets, embedded")


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "render"


def table_row(status: str, row: dict[str, Any]) -> dict[str, Any]:
    link = Path(row["output_path"]).as_uri() if row.get("output_path") else ""
    return {
        "id": row["id"], "status": status, "prompt": row["prompt"][:80],
        "size": f"{row['width']}x{row['height']}x{row['frames']}", "seed": row["seed"],
        "render_s": round(row.get("render_seconds") or 0.0, 2),
        "peak_mb": round((row.get("peak_memory_bytes") or 0) / 2**20, 1),
        "peak_of": row.get("peak_memory_kind") or "", "offload": row.get("offload") or "",
        "video": link, "error": row.get("error") or "",
    }


def summary_markdown(summary: BatchSummary, batch: PromptBatch) -> str:
    lines = [
        "# Render batch", "",
        f"- prompt file: `{batch.path}`",
        f"- artifact id (manifest sha256): `{summary.artifact_id}`",
        f"- output: `{summary.output_dir}`",
        f"- **{summary.message}**", "",
    ]
    if summary.rendered or summary.skipped:
        lines += ["| id | status | video | seconds |", "|---|---|---|---|"]
        for status, rows in (("rendered", summary.rendered), ("skipped", summary.skipped)):
            lines += [f"| {row['id']} | {status} | [{Path(row['output_path']).name}]"
                      f"({Path(row['output_path']).as_uri()}) | {row['render_seconds']:.2f} |" for row in rows]
        lines.append("")
    if summary.failed:
        lines += ["## Failed", ""] + [f"- `{row['id']}`: {row['error']}" for row in summary.failed] + [""]
    if summary.rejected:
        lines += ["## Rejected rows", ""] + [f"- {text}" for text in summary.rejected] + [""]
    return "\n".join(lines)


def contact_sheet_markdown(rows: list[dict[str, Any]]) -> str:
    """Contact sheets as inline JPEG thumbnails: the UI cannot open file:// images."""
    lines = ["# Contact sheets", ""]
    for row in rows[:EMBEDDED_SHEETS]:
        lines += [f"**{row['id']}**: {row['prompt'][:120]}", "",
                  f"![{row['id']}](data:image/jpeg;base64,{thumbnail_base64(row['contact_sheet'])})", ""]
    if len(rows) > EMBEDDED_SHEETS:
        lines.append(f"... and {len(rows) - EMBEDDED_SHEETS} more under `contact-sheets/`.")
    return "\n".join(lines)


def thumbnail_base64(path: str) -> str:
    from hlwq.runtime.video import thumbnail_jpeg

    return base64.b64encode(thumbnail_jpeg(path, THUMBNAIL_WIDTH)).decode("ascii")


def current_flow_run_id() -> str | None:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None
