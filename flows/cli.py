"""The `hlwq` command line: parses arguments and calls flows, quant/ or runtime/."""

from __future__ import annotations

import sys

import click

from flows.lazy_group import LazyGroup

COMMANDS = {
    "demo": ("flows.commands.demo:demo",
             "Build the tiny LTX-2.3, quantize it, render two prompts, print where it all is."),
    "fixture": ("flows.commands.fixture:fixture",
                "Write a synthetic LTX-2.3 checkpoint (tiny pipeline or real-width transformer)."),
    "plan": ("flows.commands.plan:plan",
             "Print per-component tensors, parameters and packed sizes before quantizing."),
    "quantize": ("flows.commands.quantize:quantize",
                 "Quantize a checkpoint (Hub id, folder or file) into a packed HLWQ artifact."),
    "verify": ("flows.commands.artifact:verify",
               "Check an artifact's manifest, hashes and tensor entries; exit 1 on any problem."),
    "inspect": ("flows.commands.artifact:inspect",
                "Show an artifact's size and quality tables."),
    "export-dequantized": ("flows.commands.artifact:export_dequantized",
                           "Write a standard BF16 checkpoint from an artifact, tensor by tensor."),
    "convert": ("flows.commands.artifact:convert",
                "Convert between an HLWQ artifact and the polarquant 0.6.0 layout."),
    "render": ("flows.commands.render:render",
               "Render a prompt file with the packed runtime into MP4s and a catalog."),
    "validate": ("flows.commands.validate:validate",
                 "Render the prompt suite with source and artifact and apply the quality gates."),
    "serve": ("flows.commands.serve:serve",
              "Serve the requantize, watch-upstream and nightly-render deployments."),
    "server": ("flows.commands.serve:server",
               "Start or stop the local Prefect server (127.0.0.1, SQLite)."),
    "bench": ("benchmarks.cli:bench",
              "Benchmarks: quantize, scale, runtime, budget (JSON under benchmarks/results/)."),
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """hlwq: Hadamard-Lloyd weight quantization for LTX-2.3, from checkpoint to rendered video."""


def main() -> None:
    from flows.prefect_env import configure_prefect
    from quant.errors import HLWQError

    configure_prefect()  # before any command imports Prefect

    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except HLWQError as exc:
        click.echo(f"{type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
