"""`hlwq quantize`: run the requantization flow from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hlwq.cli.commands.options import (
    no_wait_option,
    sensitivity_option,
    source_file_options,
    target_size_options,
)
from hlwq.cli.prefect_env import configure_prefect, quiet_typed_errors
from hlwq.quant.choices import MODES, ON_NONFINITE


@click.command()
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Artifact directory to create (replaced only once the new one is complete).")
@click.option("--policy", help="ltx23, ltx23-full, generic or a policy file [default: ltx23 for LTX-2.3 "
                               "layouts, generic otherwise].")
@click.option("--bits", default=5, show_default=True, type=int, help="Bits per quantized weight.")
@click.option("--mode", type=click.Choice(MODES), default="refined",
              show_default=True, help="Encoder: refined scale search, or the reference's choices.")
@click.option("--group-size", type=int, help="Values per fp16 scale (a divisor of 128; default 128; "
                                        "with --target-size, the only group size it may choose).")
@click.option("--workers", type=click.IntRange(min=1), help="Local Dask workers [default: one per core, memory allowing].")
@click.option("--dask-address", help="Scheduler of an existing Dask cluster (e.g. tcp://host:8786); "
                                     "staging and output must be on storage every worker sees.")
@click.option("--revision", help="Branch, tag or commit of a Hub SOURCE.")
@source_file_options
@click.option("--text-encoder", "text_encoder", metavar="SOURCE",
              help="The text encoder as a separate Hub repo or folder (LTX-2.3's Gemma 3), "
                   "packaged as the artifact's text_encoder/ (with --policy ltx23-full, packed).")
@click.option("--text-encoder-revision", help="Branch, tag or commit of a Hub --text-encoder.")
@click.option("--staging", type=click.Path(file_okay=False),
              help="Where per-tensor results wait for packaging [default: OUT.staging].")
@click.option("--gates/--no-gates", default=True, show_default=True,
              help="Fail before packaging when a tensor gate fails; --no-gates packages anyway "
                   "and marks the artifact unvalidated.")
@click.option("--gates-file", type=click.Path(dir_okay=False, exists=True),
              help="TOML merged over the default thresholds (tasks/gates.toml).")
@click.option("--on-nonfinite", type=click.Choice(ON_NONFINITE), default="fail",
              show_default=True, help="A tensor with NaN/Inf fails the run, or is kept unquantized.")
@target_size_options
@sensitivity_option
@no_wait_option
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
def quantize(source, out, policy, bits, mode, group_size, workers, dask_address, revision, files,
             exclude_files, text_encoder, text_encoder_revision, staging, gates, gates_file,
             on_nonfinite, target_size, target_scope, sensitivity, no_wait, as_json):
    """Quantize SOURCE (a Hub repo id, a folder or a .safetensors file) into a packed HLWQ
    artifact at OUT. Re-running skips tensors already quantized."""
    from hlwq.cli.preflight import (
        check_dask_address,
        check_folder_option,
        check_local_source,
        check_new_output,
    )
    from hlwq.store.output_dir import folder_locks

    # Paths and the cluster first: these checks cost no torch or Prefect import.
    check_local_source(source)
    check_new_output(out, replace_artifact=True)
    check_folder_option(staging, "--staging")
    if dask_address:
        check_dask_address(dask_address)
    if target_size is not None:
        from hlwq.quant.sizes import parse_size

        parse_size(target_size)   # a size that does not parse fails before anything runs
    configure_prefect()   # before Prefect is imported: it reads its settings then
    from hlwq.flows.quantize_flow import check_settings, default_staging, run_quantize

    check_settings(bits, mode, group_size, on_nonfinite, workers, dask_address)
    staging = staging or str(default_staging(Path(out).absolute()))
    with folder_locks({"--out": out, "--staging": staging}, wait=not no_wait):
        quiet_typed_errors()
        summary = run_quantize(source, out, policy=policy, bits=bits, mode=mode,
                               group_size=group_size, workers=workers, dask_address=dask_address,
                               revision=revision, files=list(files) or None,
                               exclude_files=list(exclude_files) or None, staging=staging,
                               gates=gates, gates_file=gates_file, on_nonfinite=on_nonfinite,
                               target_size=target_size, target_scope=target_scope,
                               text_encoder=text_encoder,
                               text_encoder_revision=text_encoder_revision,
                               sensitivity=sensitivity)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    sizes = summary["sizes"]
    click.echo(f"artifact: {summary['artifact']} "
               f"({'validated' if summary['validated'] else 'NOT validated'})")
    click.echo(f"  {sizes['quantized_tensors']} of {sizes['total_tensors']} tensors quantized "
               f"({summary['skipped']} already staged), "
               f"{sizes['total_original_bytes'] / 1e9:.3f} GB -> "
               f"{sizes['total_packed_bytes'] / 1e9:.3f} GB")
    budget = summary.get("budget")
    if budget:
        mix = ", ".join(f"{label} x{entry['tensors']}" for label, entry in budget["formats"].items())
        click.echo(f"  size budget: {mix}; sensitivity {budget['sensitivity']} "
                   f"({budget['sensitivity_source']})")
    quality = summary["quality"]
    if quality:
        click.echo(f"  cosine min {quality['min_cosine']:.6f}, relative MSE mean "
                   f"{quality['mean_rel_mse']:.3e}")
    click.echo(f"  {summary['wall_s']:.1f} s on {summary['workers']} workers; metrics: "
               f"{summary['metrics']}")
