"""The `hlwq` command line: parses arguments and calls flows, quant/ or runtime/.

Errors: a typed error (HLWQError) or a usage mistake prints as one line, ``ErrorType:
message``, and exits 2; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from hlwq.cli.lazy_group import LazyGroup

COMMANDS = {
    "demo": ("hlwq.cli.commands.demo:demo",
             "Build the tiny LTX-2.3, quantize it, render two prompts, print where it all is."),
    "fixture": ("hlwq.cli.commands.fixture:fixture",
                "Write a synthetic LTX-2.3 checkpoint (tiny pipeline or real-width transformer)."),
    "plan": ("hlwq.cli.commands.plan:plan",
             "Print per-component tensors, parameters and packed sizes before quantizing."),
    "quantize": ("hlwq.cli.commands.quantize:quantize",
                 "Quantize a checkpoint (Hub id, folder or file) into a packed HLWQ artifact."),
    "verify": ("hlwq.cli.commands.artifact:verify",
               "Check an artifact's manifest, hashes and tensor entries; exit 1 on any problem."),
    "inspect": ("hlwq.cli.commands.artifact:inspect",
                "Show an artifact's size and quality tables."),
    "export-dequantized": ("hlwq.cli.commands.artifact:export_dequantized",
                           "Write a standard BF16 checkpoint from an artifact, tensor by tensor."),
    "convert": ("hlwq.cli.commands.artifact:convert",
                "Convert between an HLWQ artifact and the polarquant 0.6.0 layout."),
    "publish": ("hlwq.cli.commands.publish:publish",
                "Verify an artifact and publish it to a Hub model repo (one commit, no-op if same)."),
    "render": ("hlwq.cli.commands.render:render",
               "Render a prompt file with the packed runtime into MP4s and a catalog."),
    "validate": ("hlwq.cli.commands.validate:validate",
                 "Render the prompt suite with source and artifact and apply the quality gates."),
    "serve": ("hlwq.cli.commands.serve:serve",
              "Serve the requantize, watch-upstream and nightly-render deployments."),
    "server": ("hlwq.cli.commands.serve:server",
               "Start or stop the local Prefect server (127.0.0.1, SQLite)."),
    "bench": ("hlwq.cli.commands.bench:bench",
              "Benchmarks: quantize, scale, runtime, budget, lora (JSON under benchmarks/results/)."),
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, is_eager=True,
              help="Show tracebacks (a typed error is otherwise one line).")
def cli(debug: bool) -> None:
    """hlwq: Hadamard-Lloyd weight quantization for LTX-2.3, from checkpoint to rendered video."""


def main() -> None:
    from hlwq.cli.prefect_env import DEBUG_ENV, configure_prefect
    from hlwq.quant.errors import HLWQError

    args = sys.argv[1:]
    command_at = next((i for i, word in enumerate(args) if word in COMMANDS), len(args))
    debug = "--debug" in args[:command_at]
    if debug:
        os.environ[DEBUG_ENV] = "1"
    configure_prefect()  # before any command imports Prefect
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        # One line, like a typed error: "UsageError: Invalid value for '--bits': ..."
        message = " ".join(exc.format_message().split())
        click.echo(f"{type(exc).__name__}: {message}", err=True)
        sys.exit(exc.exit_code)
    except HLWQError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"{type(exc).__name__}: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)
