"""`hlwq verify`, `hlwq inspect`, `hlwq export-dequantized`, `hlwq convert`: artifact commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from hlwq.cli.commands.options import no_wait_option

DIRECTORY = click.Path(file_okay=False, path_type=Path)


@click.command()
@click.argument("artifact")
@click.option("--no-hashes", is_flag=True, help="Check sizes and headers only (skip sha256).")
def verify(artifact: str, no_hashes: bool) -> None:
    """Check ARTIFACT's manifest, every file's size and sha256, and every tensor entry
    against its shard. ARTIFACT is a folder or a Hub repo (owner/name[@revision]: only the
    manifest's files are downloaded, into the Hub cache). Prints one line per problem and
    exits 1 if there is any."""
    from hlwq.runtime.hub import resolve_artifact
    from hlwq.store.artifact import verify_artifact

    directory = resolve_artifact(artifact, verify=False)
    problems = verify_artifact(directory, hashes=not no_hashes)
    for problem in problems:
        click.echo(problem)
    if problems:
        click.echo(f"{artifact}: {len(problems)} problem(s)", err=True)
        sys.exit(1)
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    click.echo(f"{artifact}: sound ({len(manifest['files'])} files, "
               f"{len(manifest['tensors'])} tensors{', sizes only' if no_hashes else ''})")


@click.command()
@click.argument("artifact")
@click.option("--json", "as_json", is_flag=True, help="Print the tables as JSON.")
@click.option("--no-hashes", is_flag=True, help="Check sizes and headers only (skip sha256).")
def inspect(artifact: str, as_json: bool, no_hashes: bool) -> None:
    """Show ARTIFACT's per-component sizes, its validation (the output gates per prompt and the
    tensor gates, as the model card shows them), quality distribution, worst tensors and the
    other formats at its size (a folder, or a Hub repo owner/name[@revision], downloaded and
    verified first), and whether it is sound (what `hlwq verify` checks). Exits 1 if it is not."""
    from hlwq.runtime.hub import resolve_artifact
    from hlwq.store.artifact import METRICS_NAME, open_artifact, verify_artifact
    from hlwq.store.model_card import (
        QUALITY_HEADER,
        SIZE_HEADER,
        format_comparison_blocks,
        markdown_table,
        quality_rows,
        quality_summary,
        read_metrics,
        size_rows,
        validation_blocks,
    )

    directory = resolve_artifact(artifact)
    manifest = open_artifact(directory, verify=False).manifest
    problems = verify_artifact(directory, hashes=not no_hashes)
    # A manifest's verdict means nothing once the bytes no longer match it.
    validated = manifest["validation"]["validated"] and not problems
    metrics_path = directory / METRICS_NAME
    quality = None
    if metrics_path.is_file():
        quality = quality_summary(read_metrics(metrics_path))
    source = {k: v for k, v in manifest["source"].items() if k != "files"}
    if as_json:
        click.echo(json.dumps({"source": source, "quantization": manifest["quantization"],
                               "sizes": manifest["sizes"], "quality": quality,
                               "validation": manifest["validation"],
                               "format_comparison": manifest.get("format_comparison"),
                               "sound": not problems,
                               "problems": problems, "validated": validated},
                              indent=2, sort_keys=True))
        sys.exit(1 if problems else 0)
    click.echo(f"{artifact}: {source.get('repo') or source.get('source')} "
               f"({source['layout']}), {json.dumps(manifest['quantization'], sort_keys=True)}")
    click.echo("\n" + markdown_table(SIZE_HEADER, size_rows(manifest)))
    click.echo("\n" + "\n\n".join(validation_blocks(manifest["validation"])))
    if quality:
        click.echo("\n" + markdown_table(QUALITY_HEADER, quality_rows(quality)))
        click.echo("\nworst tensors by relative MSE:")
        for worst in quality["worst_tensors"]:
            click.echo(f"  {worst['component']}/{worst['tensor']}: cosine {worst['cosine']:.6f}, "
                       f"relative MSE {worst['rel_mse']:.3e}")
    else:
        click.echo("\nno metrics.parquet: no quality table")
    comparison = format_comparison_blocks(manifest.get("format_comparison"), manifest["sizes"])
    if comparison:
        click.echo("\n" + "\n\n".join(comparison))
    if problems:
        click.echo(f"\nsound: no, {len(problems)} problem(s) (`hlwq verify` lists them all):")
        for problem in problems[:10]:
            click.echo(f"  {problem}")
    else:
        click.echo(f"\nsound: yes{' (sizes only)' if no_hashes else ''}")
    click.echo(f"validated: {validated}"
               + (" (the manifest says validated, but the artifact is unsound)"
                  if manifest["validation"]["validated"] and problems else ""))
    sys.exit(1 if problems else 0)


@click.command(name="export-dequantized")
@click.argument("directory", type=DIRECTORY)
@click.argument("out", type=DIRECTORY)
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest shard for sharded layouts (the single-file layout stays one file).")
@click.option("--no-verify", is_flag=True, help="Skip hash verification of the artifact first.")
@no_wait_option
def export_dequantized(directory: Path, out: Path, max_shard_size: str, no_verify: bool,
                       no_wait: bool) -> None:
    """Write a plain checkpoint (quantized tensors dequantized to their source dtype, BF16
    for LTX-2.3) in the source's layout to OUT, streaming one tensor at a time."""
    from hlwq.cli.preflight import check_new_output
    from hlwq.store.output_dir import folder_lock

    check_new_output(out, option="OUT")      # before the numerics' imports: fast
    from hlwq.quant.sizes import parse_size

    max_shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    with folder_lock(out, wait=not no_wait, option="OUT"):
        from hlwq.store.export import export_dequantized as export

        summary = export(directory, out, max_shard_bytes=max_shard_bytes, verify=not no_verify)
    click.echo(f"{summary['path']}: {summary['dequantized_tensors']} tensors dequantized, "
               f"{summary['files']} files, {summary['total_bytes']:,} bytes")


@click.command()
@click.argument("source", type=DIRECTORY)
@click.argument("out", type=DIRECTORY)
@click.option("--to", "target_format", type=click.Choice(["auto", "polarquant", "hlwq"]),
              default="auto", show_default=True,
              help="auto: an HLWQ artifact (manifest.json) becomes polarquant, a polarquant "
                   "checkpoint (polar_config.json) becomes HLWQ.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard.")
@no_wait_option
def convert(source: Path, out: Path, target_format: str, max_shard_size: str,
            no_wait: bool) -> None:
    """Convert SOURCE between an HLWQ artifact and the polarquant 0.6.0 layout, into OUT."""
    from hlwq.cli.preflight import check_new_output
    from hlwq.store.output_dir import folder_lock

    check_new_output(out, option="OUT")      # before the numerics' imports: fast
    from hlwq.quant.sizes import parse_size

    max_shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    with folder_lock(out, wait=not no_wait, option="OUT"):
        from hlwq.store.convert import detect_format, from_polarquant, to_polarquant

        if target_format == "auto":
            target_format = "polarquant" if detect_format(source) == "hlwq" else "hlwq"
        if target_format == "polarquant":
            summary = to_polarquant(source, out, max_shard_bytes=max_shard_bytes)
        else:
            from hlwq.tasks.sources import fetch_source

            summary = from_polarquant(source, out,
                                      source_lineage=fetch_source(str(source)).lineage,
                                      max_shard_bytes=max_shard_bytes)
    click.echo(f"{summary['path']}: {target_format} layout, {summary['quantized_tensors']} "
               f"quantized tensors, {summary['files']} files")
