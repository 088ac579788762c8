"""`hlwq demo`: the whole journey on the tiny LTX-2.3 in a few minutes on a laptop CPU.

Builds the tiny fixture, requantizes it with the real flow (Q5, packed artifact with model card
and metrics), renders two prompts with the packed runtime, and says where everything is.
Re-running reuses what is done (the fixture, staged tensors, catalogued renders).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from hlwq.cli.prefect_env import configure_prefect

DEMO_PROMPTS = [
    {"id": "lighthouse", "prompt": "a lighthouse on a cliff at dusk, waves breaking, gulls calling",
     "seed": 11},
    {"id": "street-band", "prompt": "a street band playing brass instruments in the rain",
     "negative_prompt": "blurry, distorted", "seed": 23},
]
# Small enough for a 2-core CPU; the sizes the model takes (sides 32k, frames 8k+1).
DEMO_SIZE = {"width": 64, "height": 64, "frames": 9, "fps": 24, "steps": 2, "guidance": 3.0}


@click.command()
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the fixture, the artifact and the renders.")
@click.option("--workers", default=None, type=int, help="Dask workers for quantization [default: per core].")
@click.option("--server-home", default=None, help="Home of a local `hlwq server` to record the runs in.")
def demo(out: str, workers: int | None, server_home: str | None) -> None:
    """Build the tiny LTX-2.3, quantize it, render two prompts, print where it all is."""
    from hlwq.cli.commands.serve import running_api_url, use_local_server

    use_local_server(server_home)
    configure_prefect()
    out_dir = Path(out).resolve()
    started = time.perf_counter()

    step("1/3 building the tiny LTX-2.3 fixture")
    from hlwq.testing.fixtures import make_tiny_ltx23

    source = make_tiny_ltx23(out_dir / "tiny-ltx23")

    step("2/3 requantizing it (flow quantize_checkpoint, Q5; output gates on the demo prompts)")
    from hlwq.flows.quantize_flow import run_quantize

    prompts = out_dir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({**row, **DEMO_SIZE}) + "\n" for row in DEMO_PROMPTS))
    artifact = out_dir / "artifact"
    # The demo's two prompts double as the output-gate suite: the full suite takes minutes here.
    quantized = run_quantize(str(source), str(artifact), bits=5, workers=workers,
                             output_suite=str(prompts))

    step("3/3 rendering the two prompts with the packed runtime (flow render-batch)")
    from hlwq.flows.render_flow import render_batch

    state = render_batch(str(artifact), str(prompts), str(out_dir / "renders"), device="cpu",
                         return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):
        raise summary if isinstance(summary, BaseException) else click.ClickException(str(state.message))

    report(out_dir, source, artifact, quantized, summary, running_api_url(server_home),
           time.perf_counter() - started)
    if not state.is_completed():
        raise click.ClickException(f"render batch: {summary['message']}")


def step(text: str) -> None:
    click.secho(f"==> {text}", bold=True)


def report(out_dir: Path, source: Path, artifact: Path, quantized: dict, summary: dict,
           ui_api: str | None, seconds: float) -> None:
    sizes = quantized["sizes"]
    renders = summary["rendered"] + summary["skipped"]
    lines = [
        "",
        f"Demo done in {seconds:.0f} s. Everything is under {out_dir}:",
        f"  source model   {source}",
        (f"  artifact       {artifact}  ({sizes['quantized_tensors']} tensors quantized, "
         f"{sizes['total_original_bytes'] / 1e6:.1f} MB -> {sizes['total_packed_bytes'] / 1e6:.1f} MB)"),
        f"  model card     {artifact / 'README.md'}",
        f"  metrics        {artifact / 'metrics.parquet'}",
        f"  render catalog {Path(summary['output_dir']) / 'catalog'}",
    ]
    for row in renders:
        lines += [f"  video          {row['output_path']}",
                  f"  contact sheet  {row['contact_sheet']}"]
    lines.append(f"  renders: {summary['message']}")
    if ui_api:
        lines.append(f"  Prefect UI     {ui_api.rstrip('/').removesuffix('/api')}  (runs, artifacts, logs)")
    else:
        lines.append("  Prefect UI     start one with `hlwq server start`, then run the demo again to "
                     "see these runs in it")
    click.echo("\n".join(lines))
