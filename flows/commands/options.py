"""Click options that more than one command takes."""

from __future__ import annotations

import click

from tasks.budget import SCOPE_HELP, SCOPES


def target_size_options(command):
    """``--target-size`` and ``--target-scope`` (a size budget instead of one --bits)."""
    size = click.option(
        "--target-size", help="Instead of one --bits: bits per tensor (2..8) chosen so "
                              "--target-scope fits SIZE (e.g. 15GB, 14.5GiB, 800MB) with the "
                              "least expected damage.")
    scope = click.option("--target-scope", type=click.Choice(SCOPES), default="package",
                         show_default=True, help=f"What --target-size counts. {SCOPE_HELP}.")
    return size(scope(command))
