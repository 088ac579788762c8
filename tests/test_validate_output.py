"""Output gates on the tiny LTX-2.3: the suite, the gates, the packed runtime, the CLI, the flow.

The renders are real (diffusers LTX2Pipeline for the source, runtime.loader for the artifacts);
one work directory is shared, so the source renders each prompt once for every test here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hlwq.cli.prefect_env import configure_prefect

configure_prefect()

from artifact_helpers import quantize_source
from flow_support import write_diffusers_checkpoint

from hlwq.quant.errors import GateFailedError, InvalidOptionError, SourceError
from hlwq.store.artifact import read_manifest, verify_artifact
from hlwq.store.package import package_artifact
from hlwq.tasks.gates import load_gate_config
from hlwq.tasks.validate_output import (
    OUTPUT_GATES,
    REPORT_DIR,
    WORST_SHEET_NAME,
    apply_output_gates,
    failure_message,
    load_suite,
    output_gates,
    record_output_gates,
    renderable_source,
    run_output_gates,
    scale_request,
    worst_prompt,
)
from hlwq.testing.fixtures import make_tiny_ltx23

CATEGORIES = ("motion-", "face-", "text-", "portrait-9x16-", "sound-")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two cores shared by many processes: one torch thread avoids spinning OpenMP workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("validate")


@pytest.fixture(scope="module")
def tiny(place) -> Path:
    return make_tiny_ltx23(place / "tiny")


def make_artifact(source: Path, out: Path, bits: int) -> Path:
    """Quantize the tiny model's transformer blocks at ``bits`` (policy ltx23) and package it."""
    staging = out.with_name(f"{out.name}.staging")
    staging.mkdir(parents=True)
    fetched, inventory, staged, metrics = quantize_source(source, staging, bits=bits, policy="ltx23")
    package_artifact(fetched.root, inventory, staged, out, lineage=fetched.lineage,
                     quantization={"bits": bits, "block_size": 128, "group_size": 128,
                                   "mode": "refined", "policy": {"name": "ltx23"},
                                   "code_version": "test"},
                     metrics=metrics,
                     validation={"tensor_gates": {"passed": True}})
    # numba's parallel kernels share torch's OpenMP runtime and set its thread count back to
    # the core count; on a busy machine that makes every later render many times slower.
    torch.set_num_threads(1)
    return out


@pytest.fixture(scope="module")
def artifacts(tiny, place) -> dict[int, Path]:
    return {bits: make_artifact(tiny, place / f"q{bits}", bits) for bits in (5, 2)}


@pytest.fixture(scope="module")
def outcomes(tiny, artifacts, place) -> dict[int, dict]:
    return {bits: run_output_gates(tiny, path, work_dir=place / "renders", device="cpu")
            for bits, path in artifacts.items()}


# ---- the suite and the gates file (no rendering) ---------------------------------------------


def test_the_suite_spans_what_matters():
    requests = load_suite()
    assert len(requests) >= 8
    for category in CATEGORIES:
        assert any(r.id.startswith(category) for r in requests), category
    portrait = next(r for r in requests if r.id.startswith("portrait-9x16-"))
    assert portrait.width * 16 == portrait.height * 9
    assert len({r.seed for r in requests}) == len(requests)
    assert all(r.steps == 2 and r.frames in (9, 17) for r in requests)


def test_the_suite_scales_up_for_the_real_model():
    requests = {r.id: r for r in load_suite(long_side=768, frames=121, steps=30)}
    small = {r.id: r for r in load_suite()}
    assert (requests["sound-waves-wind"].width, requests["sound-waves-wind"].height) == (768, 512)
    assert (requests["portrait-9x16-dancer"].width, requests["portrait-9x16-dancer"].height) == (448, 768)
    assert all(r.frames == 121 and r.steps == 30 for r in requests.values())
    assert all(requests[pid].seed == small[pid].seed for pid in small)
    with pytest.raises(InvalidOptionError, match="8k\\+1"):
        scale_request(small["face-woman-speaks"], frames=120)
    with pytest.raises(InvalidOptionError, match="multiple of 32"):
        scale_request(small["face-woman-speaks"], long_side=700)


def test_output_gates_are_read_from_the_one_gates_file(tmp_path):
    gates = output_gates(load_gate_config())
    assert set(gates) == set(OUTPUT_GATES)
    extra = tmp_path / "extra.toml"
    extra.write_text("[output]\nmin_psnr_mean = 35.0\nmin_vibes = 1\n")
    with pytest.raises(InvalidOptionError, match="min_vibes"):
        output_gates(load_gate_config(extra), source=extra)
    stricter = tmp_path / "strict.toml"
    stricter.write_text("[output]\nmin_psnr_mean = 99.0\n")
    assert output_gates(load_gate_config(stricter))["min_psnr_mean"].threshold == 99.0


def prompt_entry(**overrides) -> dict:
    good = {"psnr_mean": 60.0, "psnr_min": 60.0, "ssim_mean": 1.0, "temporal_diff": 0.0,
            "audio_snr_db": 60.0, "mel_distance": 0.0, "latent_rel_err": 0.0,
            "block_rel_err": 0.0, "blocks": [{"block": 0, "stream": "video", "rel_err": 0.0,
                                              "cosine": 1.0}]}
    return {**good, **overrides}


def test_gates_name_the_prompts_and_blocks_and_nan_fails():
    gates = output_gates(load_gate_config())
    drifting = [{"block": 0, "stream": "video", "rel_err": 0.001, "cosine": 1.0},
                {"block": 3, "stream": "audio", "rel_err": 5.0, "cosine": 0.1}]
    prompts = {"fine": prompt_entry(), "broken": prompt_entry(psnr_mean=math.nan),
               "drifts": prompt_entry(block_rel_err=5.0, blocks=drifting)}
    verdict = apply_output_gates(prompts, gates)
    assert not verdict["passed"] and verdict["failed_prompts"] == ["broken", "drifts"]
    assert math.isnan(verdict["gates"]["min_psnr_mean"]["value"])
    assert verdict["gates"]["max_block_rel_err"]["failed_blocks"] == ["block 3 (audio)"]
    assert prompts["fine"]["passed"] and prompts["broken"]["failed_gates"] == ["min_psnr_mean"]
    message = failure_message({**verdict, "prompts": prompts}, "not validated")
    assert "broken" in message and "drifts" in message and "block 3 (audio)" in message


def test_the_worst_prompt_fails_most_gates_then_has_the_lowest_psnr():
    prompts = {"a": prompt_entry(psnr_mean=20.0), "b": prompt_entry(psnr_mean=30.0),
               "c": prompt_entry(psnr_mean=40.0)}
    assert worst_prompt(prompts) == "a"
    prompts["c"]["failed_gates"] = ["min_audio_snr_db"]
    assert worst_prompt(prompts) == "c"
    prompts["b"].update(psnr_mean=math.nan, failed_gates=["min_psnr_mean"])
    assert worst_prompt(prompts) == "b"


def test_only_whole_pipelines_are_rendered(tmp_path, tiny):
    assert renderable_source(tiny) is None
    partial = write_diffusers_checkpoint(tmp_path / "partial")
    reason = renderable_source(partial)       # goes into the manifest and the card: no path
    assert "not a whole LTX-2 pipeline (lacks" in reason and str(tmp_path) not in reason
    with pytest.raises(SourceError, match="cannot render the source"):
        run_output_gates(partial, partial)


# ---- the tiny model, rendered -----------------------------------------------------------------


@pytest.mark.slow
def test_q5_passes_and_2_bit_fails_the_default_gates(outcomes):
    q5, q2 = outcomes[5], outcomes[2]
    assert q5["passed"], failure_message(q5, "Q5 should pass")
    assert all(gate["verdict"] == "pass" for gate in q5["gates"].values())
    assert not q2["passed"]
    assert set(q2["failed_prompts"]) == set(q2["prompts"])       # every prompt drifts at 2 bits
    assert q2["gates"]["max_block_rel_err"]["failed_blocks"]      # and the blocks are named
    for metric in ("psnr_mean", "ssim_mean", "latent_rel_err", "mel_distance"):
        better = max if metric in ("psnr_mean", "ssim_mean") else min
        assert better(q5["prompts"][p][metric] for p in q5["prompts"]) == \
            better(r["prompts"][p][metric] for r in (q5, q2) for p in r["prompts"])


@pytest.mark.slow
def test_block_errors_come_from_the_first_step_of_every_block(outcomes):
    for results in outcomes.values():
        for entry in results["prompts"].values():
            assert {(r["block"], r["stream"]) for r in entry["blocks"]} == \
                {(b, s) for b in (0, 1) for s in ("video", "audio")}
    q5_worst = max(e["block_rel_err"] for e in outcomes[5]["prompts"].values())
    q2_best = min(e["block_rel_err"] for e in outcomes[2]["prompts"].values())
    assert q5_worst < q2_best


@pytest.mark.slow
def test_the_report_and_the_verdict_go_into_the_artifact(artifacts, outcomes, place):
    for bits, path in artifacts.items():
        validation = record_output_gates(path, outcomes[bits])
        assert verify_artifact(path) == []                      # the report is listed and hashed
        for name in (f"{REPORT_DIR}/results.json", f"{REPORT_DIR}/report.html", "manifest.json",
                     "README.md"):                              # names, never local paths
            assert str(place) not in (path / name).read_text(), name
        manifest = read_manifest(path)
        assert f"{REPORT_DIR}/report.html" in manifest["files"]
        assert validation["validated"] is (bits == 5)
        assert manifest["validation"]["output_gates"]["passed"] is (bits == 5)
        card = (path / "README.md").read_text()
        assert ("Output gates **passed**" in card) is (bits == 5)
        # the card: a row per prompt, the worst prompt's sheet (a listed file), no local path
        assert all(f"| `{pid}` |" in card for pid in outcomes[bits]["prompts"])
        worst = manifest["validation"]["output_gates"]["worst_prompt"]
        assert worst["id"] == outcomes[bits]["worst_prompt"]
        assert f"]({REPORT_DIR}/{WORST_SHEET_NAME})" in card and worst["sheet"] in manifest["files"]
        assert (path / worst["sheet"]).is_file() and str(path.parent) not in card
    assert (artifacts[2] / REPORT_DIR / "sheets" / "text-neon-sign.png").is_file()


@pytest.mark.slow
def test_cli_prints_json_and_exits_by_the_verdict(tiny, artifacts, outcomes, place):
    from click.testing import CliRunner

    from hlwq.cli.main import cli

    renders = str(place / "renders")             # every render is already there: no model loads
    for bits, code in ((5, 0), (2, 1)):
        result = CliRunner().invoke(cli, ["validate", str(artifacts[bits]), "--against", str(tiny),
                                          "--json", "--work-dir", renders, "--device", "cpu"])
        assert result.exit_code == code, result.output[-3000:]
        printed = json.loads(result.stdout)
        assert printed["passed"] is (code == 0)
        for entry in printed["prompts"].values():
            assert {"psnr_mean", "psnr_min", "ssim_mean", "temporal_diff", "audio_snr_db",
                    "mel_distance", "latent_rel_err"} <= set(entry)
        for gate in printed["gates"].values():
            assert {"value", "threshold", "verdict"} <= set(gate)
        assert printed["prompts"] == {pid: {k: entry[k] for k in printed["prompts"][pid]}
                                      for pid, entry in outcomes[bits]["prompts"].items()}
    assert printed["gates"]["max_block_rel_err"]["failed_blocks"]


@pytest.mark.slow
def test_requantization_flow_runs_the_output_gates_before_marking_validated(tiny, place):
    from distributed import LocalCluster

    from hlwq.flows.quantize_flow import run_quantize

    suite = place / "two-prompts.jsonl"
    lines = (Path(__file__).parents[1] / "store" / "prompt_suite" / "v1.jsonl").read_text().splitlines()
    suite.write_text("\n".join(line for line in lines if '"face-woman-speaks"' in line
                                or '"sound-drummer"' in line) + "\n")
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        # One staging folder: the source's renders are made once for both runs.
        options = {"dask_address": cluster.scheduler_address, "output_suite": str(suite),
                   "staging": str(place / "flow-staging")}
        summary = run_quantize(str(tiny), str(place / "flow-q5"), bits=5, **options)
        with pytest.raises(GateFailedError) as failed:
            run_quantize(str(tiny), str(place / "flow-q2"), bits=2, **options)
    assert summary["validated"] and summary["output_gates"]["passed"]
    validation = read_manifest(place / "flow-q5")["validation"]
    assert validation["validated"] and validation["output_gates"]["passed"]
    assert sorted(validation["output_gates"]["prompts"]) == ["face-woman-speaks", "sound-drummer"]
    assert verify_artifact(place / "flow-q5") == []
    message = str(failed.value)
    assert "face-woman-speaks" in message and "sound-drummer" in message and "block " in message
    rejected = read_manifest(place / "flow-q2")["validation"]
    assert rejected["validated"] is False and rejected["output_gates"]["passed"] is False
