"""Click options that more than one command takes."""

from __future__ import annotations

import click

from hlwq.quant.choices import SCOPE_HELP, SCOPES, SENSITIVITY_CHOICES


def target_size_options(command):
    """``--target-size`` and ``--target-scope`` (a size budget instead of one --bits)."""
    size = click.option(
        "--target-size", help="Instead of one --bits: a format per tensor (2..8 bits, one "
                              "scale per 128-value block or per 64/32 values) chosen so "
                              "--target-scope fits SIZE (e.g. 15GB, 14.5GiB, 800MB) with the "
                              "least expected damage.")
    scope = click.option("--target-scope", type=click.Choice(SCOPES), default="package",
                         show_default=True, help=f"What --target-size counts. {SCOPE_HELP}.")
    return size(scope(command))


def sensitivity_option(command):
    """``--sensitivity``: how a size budget weighs each tensor's error."""
    return click.option(
        "--sensitivity", type=click.Choice(SENSITIVITY_CHOICES), default="auto",
        show_default=True,
        help="What --target-size minimises: activations = the model's output error, measured "
             "on the first denoising step of the suite's prompts; params = weight error "
             "weighted by parameter count; auto = activations where the whole model runs here, "
             "params otherwise (the budget report says which).")(command)


def source_file_options(command):
    """``--files`` / ``--exclude-files``: which of the source's files count (globs over
    paths relative to the folder or repo root, as huggingface_hub's allow/ignore patterns)."""
    files = click.option(
        "--files", multiple=True, metavar="GLOB",
        help="Only the source files matching GLOB (repeatable), e.g. --files "
             "'ltx-2.3-22b-dev.safetensors' when a repo holds several checkpoints.")
    exclude = click.option("--exclude-files", multiple=True, metavar="GLOB",
                           help="Leave out the source files matching GLOB (repeatable).")
    return files(exclude(command))


def no_wait_option(command):
    """``--no-wait``: fail at once when another run holds the output's lock (store/output_dir.py)."""
    return click.option("--no-wait", is_flag=True,
                        help="When another run is writing the same output, fail naming its pid "
                             "instead of waiting for it.")(command)
