"""`hlwq render`: render a prompt file with the packed runtime into MP4s, contact sheets and a catalog."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from hlwq.cli.commands.options import no_wait_option
from hlwq.cli.prefect_env import configure_prefect, quiet_typed_errors
from hlwq.quant.choices import DTYPE_NAMES, OFFLOAD_MODES


@click.command()
@click.option("--artifact", required=True,
              help="Packed HLWQ artifact: a folder, or a Hub repo owner/name[@revision] (only "
                   "the manifest's files are downloaded, and verified before anything loads).")
@click.option("--prompts", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Prompt file: .jsonl, .csv or .parquet (columns: id, prompt, negative_prompt, seed, "
                   "width, height, frames, fps, steps, guidance, image, loras).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: videos/, contact-sheets/ and catalog/ go there.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--offload", type=click.Choice(OFFLOAD_MODES), default="auto", show_default=True,
              help="Which weights stay on the device: none (all), model (one component at a "
                   "time), sequential (one layer at a time), group (one block at a time, "
                   "streamed on CUDA); auto picks, on CUDA, the fastest whose peak the memory "
                   "plan predicts for the batch's largest render fits the free memory (hlwq plan "
                   "ARTIFACT --device-memory shows it), and on the CPU none.")
@click.option("--vae-tiling", is_flag=True, help="Decode the video in tiles (less memory).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="auto", show_default=True,
              help="Compute dtype (auto: bfloat16 on CUDA, float32 on the CPU).")
@click.option("--retries", default=2, show_default=True, type=click.IntRange(min=0),
              help="Retries per render failing for a transient reason (never for bad data).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="Default LoRA of rows without a `loras` column (repeatable; scale default 1).")
@no_wait_option
@click.option("--json", "as_json", is_flag=True, help="Print the batch summary as JSON.")
def render(artifact, prompts, out, device, offload, vae_tiling, dtype, retries, loras, no_wait,
           as_json):
    """Render every valid row of a prompt file. Bad rows are listed and skipped; renders already
    in the catalog with an intact output are skipped. Exit 1 when a render failed or a row was
    rejected."""
    from hlwq.cli.preflight import check_folder_option
    from hlwq.store.catalog import artifact_id, read_catalog
    from hlwq.store.output_dir import folder_lock
    from hlwq.store.prompts import load_prompts, lora_option

    # Before Prefect starts: a manifest, a readable prompt file and LoRAs, an output folder
    # whose catalog reads.
    if Path(artifact).expanduser().exists():   # else a Hub repo: the flow fetches and checks it
        artifact_id(artifact)
    default_loras = [lora_option(text) for text in loras] or None
    load_prompts(prompts, default_loras=default_loras)
    check_folder_option(out, "--out")
    read_catalog(out)
    with folder_lock(out, wait=not no_wait):
        configure_prefect()
        from hlwq.flows.render_flow import render_batch

        quiet_typed_errors()
        state = render_batch(artifact, prompts, out, device=device, retries=retries,
                             offload=offload, vae_tiling=vae_tiling, dtype=dtype,
                             loras=default_loras, return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):  # the flow itself failed before it could summarize
        raise summary if isinstance(summary, BaseException) else click.ClickException(str(state.message))
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary)
    sys.exit(0 if state.is_completed() else 1)


def print_summary(summary: dict) -> None:
    click.echo(summary["message"])
    for row in summary["rendered"] + summary["skipped"]:
        click.echo(f"  {row['id']}: {row['output_path']}")
    for row in summary["failed"]:
        click.echo(f"  FAILED {row['id']}: {row['error']}")
    for text in summary["rejected"]:
        click.echo(f"  REJECTED {text}")
    click.echo(f"catalog: {summary['output_dir']}/catalog/")
