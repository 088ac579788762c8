"""`hlwq fixture`: write synthetic LTX-2.3 checkpoints (real classes, seeded weights)."""

from __future__ import annotations

from pathlib import Path

import click

from hlwq.quant.sizes import format_bytes


def _summarise(directory: Path) -> str:
    files = [p for p in directory.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    return f"{directory}: {len(files)} files, {format_bytes(size)}"


@click.group()
def fixture() -> None:
    """Write a synthetic LTX-2.3 checkpoint (tiny pipeline or real-width transformer)."""


@fixture.command("ltx23-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--single-file", is_flag=True,
              help="Official single-file layout (model.diffusion_model.*, vae.*, ...) instead of "
                   "a diffusers folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every weight.")
def ltx23_tiny(directory: Path, single_file: bool, seed: int) -> None:
    """A complete LTX-2.3-architecture pipeline that renders on a CPU in seconds."""
    from hlwq.testing.fixtures import make_tiny_ltx23

    click.echo(_summarise(make_tiny_ltx23(directory, single_file=single_file, seed=seed)))


@fixture.command("ltx23-transformer")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--layers", type=click.IntRange(min=1), required=True,
              help="Transformer blocks (48 is the full 19B-parameter, 38 GB model).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every weight.")
@click.option("--shard-mb", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Largest shard size in MiB.")
def ltx23_transformer(directory: Path, layers: int, seed: int, shard_mb: int) -> None:
    """The LTX-2.3 transformer at real width (video 4096, audio 2048), synthetic BF16, sharded."""
    from hlwq.testing.fixtures import make_real_width_transformer

    path = make_real_width_transformer(directory, layers=layers, seed=seed,
                                       shard_bytes=shard_mb * 2**20)
    click.echo(_summarise(path))
