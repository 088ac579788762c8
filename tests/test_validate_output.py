"""Output gates on the tiny LTX-2.3: the suite, the gates against the 8-bit control, the packed
runtime, the CLI, the flow; and the same gates file at real width.

The renders are real (diffusers LTX2Pipeline for the source and the control, runtime.loader for
the artifacts); one work directory is shared, so the source and the control render each prompt
once for every test here (the Q5 and 2-bit artifacts quantize the same tensors: one control).
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
    FRAME_DIR,
    OUTPUT_DISTANCES,
    REPORT_DIR,
    WORST_SHEET_NAME,
    OutputGate,
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
    """Quantize the tiny model's transformer blocks at ``bits`` (policy ltx23, the default
    refined encoder the gates were measured with) and package it."""
    staging = out.with_name(f"{out.name}.staging")
    staging.mkdir(parents=True)
    fetched, inventory, staged, metrics = quantize_source(source, staging, bits=bits,
                                                          policy="ltx23", mode="refined")
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
    assert set(gates) == set(OUTPUT_DISTANCES)
    assert all(gate.k > 1 and gate.floor > 0 for gate in gates.values())
    extra = tmp_path / "extra.toml"
    extra.write_text("[output.frame_mse]\nk = 10.0\nfloor = 0.0\n[output.vibes]\nk = 1\nfloor = 0\n")
    with pytest.raises(InvalidOptionError, match="vibes"):
        output_gates(load_gate_config(extra), source=extra)
    stricter = tmp_path / "strict.toml"
    stricter.write_text("[output.frame_mse]\nk = 2.0\nfloor = 0.0\n")
    merged = output_gates(load_gate_config(stricter))
    assert merged["frame_mse"] == OutputGate("frame_mse", 2.0, 0.0)
    assert merged["block_rel_err"] == gates["block_rel_err"]          # the rest: the defaults
    half = tmp_path / "half.toml"
    half.write_text("[output.frame_mse]\nk = 2.0\n")          # merged: floor from the defaults
    assert output_gates(load_gate_config(half))["frame_mse"].floor == gates["frame_mse"].floor
    broken = tmp_path / "broken.toml"
    broken.write_text("[output.frame_mse]\nk = 0\nfloor = 0.0\n")
    with pytest.raises(InvalidOptionError, match="k=0"):
        output_gates(load_gate_config(broken), source=broken)


def test_an_old_absolute_gates_file_says_what_to_write_instead(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text("[output]\nmin_psnr_mean = 35.5\nmax_block_rel_err = 0.053\n")
    with pytest.raises(InvalidOptionError) as failed:
        output_gates(load_gate_config(old), source=old)
    message = str(failed.value)
    assert "\n" not in message and "min_psnr_mean = 35.5" in message
    assert "8-bit control" in message and "write [output.frame_mse] with k =" in message


def test_a_gate_passes_within_k_times_the_control_above_the_floor():
    gate = OutputGate("frame_mse", k=10.0, floor=1e-6)
    assert gate.passes(9e-4, 1e-4) and not gate.passes(1.1e-3, 1e-4)
    assert gate.passes(1e-6, 0.0) and not gate.passes(2e-6, 0.0)      # no drift: the floor
    assert gate.passes(5e-7, math.nan) and not gate.passes(2e-6, math.inf)
    assert not gate.passes(math.nan, 1e-4)                            # NaN fails
    judged = gate.judge(5e-4, 1e-4)
    assert judged == {"candidate": 5e-4, "control": 1e-4, "ratio": pytest.approx(5.0),
                      "limit": pytest.approx(1e-3), "passed": True}
    assert gate.judge(1.0, 0.0)["ratio"] is None                      # JSON holds no Infinity


def metrics(**overrides) -> dict:
    good = {"psnr_mean": 60.0, "psnr_min": 60.0, "mse_mean": 1e-6, "mse_max": 1e-6,
            "worst_frame": 0, "ssim_mean": 0.99999, "ssim_min": 0.99999, "temporal_diff": 1e-4,
            "audio_snr_db": 60.0, "audio_noise_ratio": 1e-6, "mel_distance": 1e-3,
            "latent_rel_err": 1e-3, "first_step_latent_rel_err": 1e-3,
            "latent_trajectory": [1e-3, 1e-3], "block_rel_err": 1e-3}
    return {**good, **overrides}


def prompt_entry(blocks=None, control=None, **overrides) -> dict:
    rows = blocks or [{"block": 0, "stream": "video", "rel_err": 1e-3, "cosine": 1.0,
                       "control_rel_err": 1e-3}]
    return {**metrics(**overrides), "blocks": rows, "control": control or metrics()}


def test_gates_name_the_prompts_and_blocks_and_nan_fails():
    gates = output_gates(load_gate_config())
    k = gates["block_rel_err"].k
    drifting = [{"block": 0, "stream": "video", "rel_err": 1e-3, "cosine": 1.0,
                 "control_rel_err": 1e-3},
                {"block": 3, "stream": "audio", "rel_err": 2 * k * 1e-2, "cosine": 0.1,
                 "control_rel_err": 1e-2}]
    prompts = {"fine": prompt_entry(), "broken": prompt_entry(mse_mean=math.nan),
               "drifts": prompt_entry(blocks=drifting, block_rel_err=2 * k * 1e-2)}
    verdict = apply_output_gates(prompts, gates)
    assert not verdict["passed"] and verdict["failed_prompts"] == ["broken", "drifts"]
    assert math.isnan(verdict["gates"]["frame_mse"]["candidate"])
    assert verdict["gates"]["frame_mse"]["worst_prompt"] == "broken"
    assert verdict["gates"]["block_rel_err"]["failed_blocks"] == ["block 3 (audio)"]
    assert prompts["fine"]["passed"] and prompts["broken"]["failed_gates"] == ["frame_mse"]
    assert prompts["drifts"]["distances"]["block_rel_err"]["ratio"] == pytest.approx(2 * k)
    message = failure_message({**verdict, "prompts": prompts}, "not validated")
    assert "broken" in message and "drifts" in message and "block 3 (audio)" in message
    assert "8-bit control" in message and f"ratio {2 * k:.3g}x" in message


def test_the_same_drift_passes_on_a_model_whose_control_drifts_as_much():
    """A model whose outputs move under any perturbation: the absolute distances are large,
    but so are the control's; judged against it, the candidate passes or fails on its ratio."""
    gates = output_gates(load_gate_config())
    chaotic = metrics(mse_mean=4e-3, mse_max=9e-3, ssim_mean=0.8, temporal_diff=0.05,
                      audio_noise_ratio=0.3, mel_distance=2.0, latent_rel_err=0.6)
    fine = {"p": prompt_entry(control=chaotic, **{**chaotic, "mse_mean": 8e-3})}
    assert apply_output_gates(fine, gates)["passed"]
    bad = {"p": prompt_entry(control=chaotic, **{**chaotic, "first_step_latent_rel_err": 1.0})}
    verdict = apply_output_gates(bad, gates)
    assert verdict["failed_prompts"] == ["p"]
    assert bad["p"]["failed_gates"] == ["first_step_latent_rel_err"]


def test_gates_need_the_control():
    with pytest.raises(InvalidOptionError, match="no control metrics"):
        apply_output_gates({"p": {**metrics(), "blocks": []}}, output_gates(load_gate_config()))


def test_the_worst_prompt_fails_most_gates_then_has_the_lowest_psnr():
    prompts = {"a": prompt_entry(psnr_mean=20.0), "b": prompt_entry(psnr_mean=30.0),
               "c": prompt_entry(psnr_mean=40.0)}
    assert worst_prompt(prompts) == "a"
    prompts["c"]["failed_gates"] = ["audio_noise_ratio"]
    assert worst_prompt(prompts) == "c"
    prompts["b"].update(psnr_mean=math.nan, failed_gates=["frame_mse"])
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
def test_q5_passes_and_2_bit_fails_against_the_8_bit_control(outcomes, place):
    q5, q2 = outcomes[5], outcomes[2]
    assert q5["passed"], failure_message(q5, "Q5 should pass")
    assert all(gate["verdict"] == "pass" for gate in q5["gates"].values())
    assert not q2["passed"]
    assert set(q2["failed_prompts"]) == set(q2["prompts"])       # every prompt drifts at 2 bits
    assert q2["gates"]["block_rel_err"]["failed_blocks"]          # and the blocks are named
    for results in (q5, q2):
        assert results["control"]["bits"] == 8 and results["control"]["tensors"] == 56
        for entry in results["prompts"].values():
            control = entry["control"]
            assert control["psnr_mean"] > entry["psnr_mean"]       # the control is nearer
            for name, judged in entry["distances"].items():
                assert judged["limit"] == max(q5["gates"][name]["k"] * judged["control"],
                                              q5["gates"][name]["floor"])
    # One control for both artifacts: the same tensors are quantized, so its renders are shared.
    assert len(list((place / "renders" / "control").glob("*.safetensors"))) == len(q5["prompts"])
    assert q5["prompts"][next(iter(q5["prompts"]))]["control"] == \
        q2["prompts"][next(iter(q2["prompts"]))]["control"]


@pytest.mark.slow
def test_the_latents_are_followed_through_every_step(outcomes):
    for results in outcomes.values():
        for entry in results["prompts"].values():
            steps = entry["steps"]
            for trajectory in (entry["latent_trajectory"], entry["control"]["latent_trajectory"]):
                assert len(trajectory) == steps and all(v > 0 for v in trajectory)
            assert entry["first_step_latent_rel_err"] == entry["latent_trajectory"][0]
            # the last step's sample tracks the full final latents
            assert entry["latent_trajectory"][-1] == pytest.approx(entry["latent_rel_err"],
                                                                   rel=0.05)


@pytest.mark.slow
def test_block_errors_come_from_the_first_step_of_every_block(outcomes):
    for results in outcomes.values():
        for entry in results["prompts"].values():
            assert {(r["block"], r["stream"]) for r in entry["blocks"]} == \
                {(b, s) for b in (0, 1) for s in ("video", "audio")}
            assert all(0 < r["control_rel_err"] < r["rel_err"] for r in entry["blocks"])
    q5_worst = max(e["block_rel_err"] for e in outcomes[5]["prompts"].values())
    q2_best = min(e["block_rel_err"] for e in outcomes[2]["prompts"].values())
    assert q5_worst < q2_best


@pytest.mark.slow
def test_the_control_is_the_8_bit_reconstruction_of_the_candidates_tensors(tiny, artifacts):
    from hlwq.quant.core import dequantize, quantize_tensor
    from hlwq.quant.errors import ArtifactError
    from hlwq.runtime.control import (
        apply_control,
        control_identity,
        control_selection,
        control_targets,
    )
    from hlwq.runtime.ltx23_models import load_ltx23_pipeline

    selection = control_selection(artifacts[5])
    assert selection == control_selection(artifacts[2]) and len(selection) == 56
    assert control_identity("src", selection) == control_identity("src", selection)
    assert control_identity("src", selection)["fingerprint"] != \
        control_identity("src", selection[1:])["fingerprint"]
    assert control_identity("src", selection)["fingerprint"] != \
        control_identity("other", selection)["fingerprint"]
    before = {f: (artifacts[5] / f).read_bytes() for f in read_manifest(artifacts[5])["files"]
              if f.endswith(".safetensors")}
    pipeline = load_ltx23_pipeline(tiny)
    chosen = selection[0]["name"]
    kept = "proj_out.weight"
    original = {name: pipeline.transformer.get_parameter(name).detach().clone()
                for name in (chosen, kept)}
    assert apply_control(pipeline, selection) == 56
    expected = dequantize(quantize_tensor(original[chosen], 8, 128, "refined"))
    assert torch.equal(pipeline.transformer.get_parameter(chosen), expected)
    assert not torch.equal(expected, original[chosen])
    assert torch.equal(pipeline.transformer.get_parameter(kept), original[kept])   # not selected
    assert {f: (artifacts[5] / f).read_bytes() for f in before} == before   # nothing written
    # An official single-file artifact names its tensors model.diffusion_model.*: the same
    # weight of the source pipeline.
    official = {"component": "transformer", "file": "ltx-2.3-tiny.safetensors", "block_size": 128,
                "name": "model.diffusion_model.transformer_blocks.0.attn1.to_q.weight"}
    (label, module, name), = control_targets(pipeline, [official])
    assert label == "transformer/" + official["name"]
    assert module is pipeline.transformer and name == "transformer_blocks.0.attn1.to_q.weight"
    with pytest.raises(ArtifactError, match="has no parameter"):
        control_targets(pipeline, [{**selection[0], "name": "transformer_blocks.9.nothing.weight"}])


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
        gates = manifest["validation"]["output_gates"]
        assert gates["passed"] is (bits == 5) and gates["control"]["bits"] == 8
        card = (path / "README.md").read_text()
        assert ("Output gates **passed**" in card) is (bits == 5)
        # the card: a row per prompt with packed / control (ratio), where the thresholds come
        # from, the worst prompt's sheet and worst frame (listed files), no local path
        assert all(f"| `{pid}` |" in card for pid in outcomes[bits]["prompts"])
        assert "8-bit control" in card and "<= max(" in card and "x ctrl" in card
        assert "measured on the tiny fixture, Q5 to 2 bits against the 8-bit control" in card
        worst = gates["worst_prompt"]
        assert worst["id"] == outcomes[bits]["worst_prompt"]
        assert f"]({REPORT_DIR}/{WORST_SHEET_NAME})" in card and worst["sheet"] in manifest["files"]
        assert worst["frame"] == f"{REPORT_DIR}/{FRAME_DIR}/{worst['id']}.png"
        assert f"]({worst['frame']})" in card and worst["frame"] in manifest["files"]
        assert (path / worst["sheet"]).is_file() and str(path.parent) not in card
        page = (path / REPORT_DIR / "report.html").read_text()
        assert "plots/trajectory.png" in page and f"{FRAME_DIR}/{worst['id']}.png" in page
    for pid in outcomes[2]["prompts"]:
        assert (artifacts[2] / REPORT_DIR / "sheets" / f"{pid}.png").is_file()
        assert (artifacts[2] / REPORT_DIR / FRAME_DIR / f"{pid}.png").is_file()
    assert (artifacts[2] / REPORT_DIR / "plots" / "trajectory.png").is_file()


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
                    "mel_distance", "latent_rel_err", "first_step_latent_rel_err"} <= set(entry)
            assert set(entry["distances"]) == set(OUTPUT_DISTANCES)
            assert entry["control"]["psnr_mean"] > entry["psnr_mean"]
        for gate in printed["gates"].values():
            assert {"candidate", "control", "ratio", "limit", "k", "floor", "verdict"} <= set(gate)
        for pid, entry in outcomes[bits]["prompts"].items():
            assert printed["prompts"][pid]["psnr_mean"] == entry["psnr_mean"]
            assert printed["prompts"][pid]["passed"] == entry["passed"]
    assert printed["gates"]["block_rel_err"]["failed_blocks"]


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
    assert "8-bit control" in message
    # the second run reused the first's source and control renders (one staging folder)
    for kind in ("source", "control"):
        assert len(list((place / "flow-staging" / "output-renders" / kind).glob("*"))) == 2
    rejected = read_manifest(place / "flow-q2")["validation"]
    assert rejected["validated"] is False and rejected["output_gates"]["passed"] is False


# ---- the same gates file at real width --------------------------------------------------------


@pytest.mark.slow
def test_the_same_gates_file_judges_the_first_step_at_real_width():
    """The real-width fixture (one block at LTX-2.3's width) cannot render: compared is one
    denoising step on synthetic inputs, each block's output and the latents after the step,
    under the first-step gates of the unchanged default gates file (hlwq bench gates)."""
    from hlwq.benchmarks.gates_bench import real_width_comparison
    from hlwq.tasks.validate_output import FIRST_STEP_GATES

    compared = real_width_comparison(1, output_gates(load_gate_config()), lambda message: None,
                                     widths=(5, 2), seeds=(11,))
    q5, q2 = compared["results"][5], compared["results"][2]
    assert set(q5["gates"]) == set(FIRST_STEP_GATES)
    assert q5["passed"], q5["failures"]
    assert not q2["passed"] and set(q2["gates"]) == set(FIRST_STEP_GATES)
    assert all(gate["verdict"] == "fail" for gate in q2["gates"].values()), q2["gates"]
    for width in (5, 2):
        entry = compared["per_width"][width]["seed-11"]
        assert all(row["rel_err"] > row["control_rel_err"] > 0 for row in entry["blocks"])
