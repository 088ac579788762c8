"""`hlwq validate ARTIFACT --against SOURCE`: the output gates alone, with their report."""

from __future__ import annotations

import json
import sys

import click

from hlwq.cli.commands.options import no_wait_option
from hlwq.cli.prefect_env import configure_prefect, quiet_typed_errors

PROMPT_KEYS = ("psnr_mean", "psnr_min", "ssim_mean", "temporal_diff", "audio_snr_db",
               "mel_distance", "first_step_latent_rel_err", "latent_rel_err", "block_rel_err")
GATE_KEYS = ("distance", "k", "floor", "worst_prompt", "candidate", "control", "ratio", "limit",
             "verdict", "failed_prompts")
JUDGED_KEYS = ("candidate", "control", "ratio", "limit", "passed")


@click.command()
@click.argument("artifact")
@click.option("--against", "source", required=True, type=click.Path(exists=True, file_okay=False),
              help="The unquantized source the artifact was made from (diffusers folder or "
                   "LTX-2.3 single-file folder).")
@click.option("--suite", type=click.Path(exists=True, dir_okay=False),
              help="Prompt suite (.jsonl); default store/prompt_suite/v1.jsonl.")
@click.option("--gates", "gates_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML merged over tasks/gates.toml (its [output.<distance>] tables: k and "
                   "floor of each gate).")
@click.option("--report-dir", type=click.Path(file_okay=False),
              help="Write the report here and leave the artifact untouched (default: "
                   "ARTIFACT/validation, recorded in the manifest).")
@click.option("--work-dir", type=click.Path(file_okay=False),
              help="Keep the renders here; the source's are reused by later runs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--long-side", type=int, help="Scale every prompt so its longer side is this "
              "(multiple of 32), e.g. 768 for the real model.")
@click.option("--frames", type=int, help="Frames of every prompt (8k+1), e.g. 121.")
@click.option("--steps", type=int, help="Denoising steps of every prompt, e.g. 30.")
@no_wait_option
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def validate(artifact, source, suite, gates_file, report_dir, work_dir, device, long_side, frames,
             steps, no_wait, as_json):
    """Render the prompt suite with SOURCE, with an 8-bit control (SOURCE with the tensors
    ARTIFACT quantized re-quantized at 8 bits, in memory) and with ARTIFACT (same seeds and
    settings), compare each with SOURCE (video, audio, latents, per-block activations) and
    apply the output gates: ARTIFACT's distance <= max(k x the control's, floor). ARTIFACT is
    a folder or a Hub repo (owner/name[@revision], downloaded and verified first; give
    --report-dir, since a Hub artifact is not changed). Exit 1 when a gate fails."""
    from hlwq.cli.preflight import check_folder_option
    from hlwq.quant.errors import InvalidOptionError
    from hlwq.runtime.hub import is_hub_reference, resolve_artifact
    from hlwq.store.catalog import artifact_id
    from hlwq.store.output_dir import folder_locks

    # Before Prefect starts: the artifact, the folders written.
    if is_hub_reference(artifact) and report_dir is None:
        raise InvalidOptionError(f"{artifact}: a Hub artifact is read-only here (its manifest "
                                 "records no verdict); give --report-dir")
    if not is_hub_reference(artifact):
        artifact_id(artifact)
    check_folder_option(report_dir, "--report-dir")
    check_folder_option(work_dir, "--work-dir")
    artifact = str(resolve_artifact(artifact))
    # Without --report-dir the report and the manifest's verdict go into the artifact.
    written = {"--report-dir" if report_dir else "ARTIFACT": report_dir or artifact}
    if work_dir:
        written["--work-dir"] = work_dir
    with folder_locks(written, wait=not no_wait):
        configure_prefect()
        from hlwq.flows.validate_flow import validate_artifact

        quiet_typed_errors()
        state = validate_artifact(artifact, source, suite=suite, gates_file=gates_file,
                                  report_dir=report_dir, work_dir=work_dir, device=device,
                                  long_side=long_side, frames=frames, steps=steps,
                                  return_state=True)
    results = state.result(raise_on_failure=False)
    if not isinstance(results, dict):      # the flow failed before it could compare anything
        raise results if isinstance(results, BaseException) else click.ClickException(
            str(state.message))
    if as_json:
        click.echo(json.dumps(json_view(results), indent=2, sort_keys=True))
    else:
        click.echo(state.message)
        click.echo(f"report: {results['report']}")
    sys.exit(0 if results["passed"] else 1)


def json_view(results: dict) -> dict:
    """Per prompt the headline metrics, the control's and the judged distances; each gate's
    worst prompt, distances, ratio, limit and verdict; ``passed``."""
    return {
        "prompts": {pid: {key: entry[key] for key in PROMPT_KEYS}
                    | {"control": {key: entry["control"][key] for key in PROMPT_KEYS},
                       "distances": {name: {key: judged[key] for key in JUDGED_KEYS}
                                     for name, judged in entry["distances"].items()},
                       "passed": entry["passed"]}
                    for pid, entry in results["prompts"].items()},
        "latent_rel_err": results["latent_rel_err"],
        "control": results.get("control"),
        "gates": {name: {key: gate[key] for key in GATE_KEYS}
                  | ({"failed_blocks": gate["failed_blocks"]} if "failed_blocks" in gate else {})
                  for name, gate in results["gates"].items()},
        "passed": results["passed"],
        "failures": results["failures"],
        "report": results["report"],
        "suite": results["suite"],
    }
