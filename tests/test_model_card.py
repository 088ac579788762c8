"""The model card and `hlwq inspect` show the validation evidence; no local path enters the card.

Fast: the artifact is a small packaged checkpoint and the output gates' results are made here,
then recorded the real way (record_output_gates). The renders behind real results are tested in
tests/test_validate_output.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from artifact_helpers import make_diffusers_source, package_source
from click.testing import CliRunner
from PIL import Image

from hlwq.cli.commands.artifact import inspect
from hlwq.runtime.report import LABEL_HEIGHT, write_stacked_sheet
from hlwq.runtime.video import contact_sheet, to_uint8_frames
from hlwq.store.artifact import MODEL_CARD_NAME, read_manifest, verify_artifact
from hlwq.store.model_card import (
    DISTANCE_ORDER,
    OUTPUT_METRICS,
    output_gate_table,
    output_metric_table,
    render_model_card,
)
from hlwq.tasks.gates import gate_sources, load_gate_config
from hlwq.tasks.validate_output import (
    OUTPUT_DISTANCES,
    REPORT_DIR,
    WORST_SHEET_NAME,
    gate_results,
    output_gates,
    record_output_gates,
    suite_identity,
)

SHEET = f"{REPORT_DIR}/{WORST_SHEET_NAME}"


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    base = tmp_path_factory.mktemp("card")
    source = make_diffusers_source(base / "src")
    (base / "staging").mkdir()
    return source, package_source(source, base / "art", base / "staging")


@pytest.fixture
def art(packaged, tmp_path):
    return shutil.copytree(packaged[1], tmp_path / "art")


CONTROL = {"psnr_mean": 55.0, "psnr_min": 54.0, "mse_mean": 3.2e-6, "mse_max": 4.0e-6,
           "worst_frame": 0, "ssim_mean": 0.99995, "ssim_min": 0.9999, "temporal_diff": 0.002,
           "audio_snr_db": 56.0, "audio_noise_ratio": 2.5e-6, "mel_distance": 0.01,
           "latent_rel_err": 0.005, "first_step_latent_rel_err": 0.004,
           "latent_trajectory": [0.004, 0.005], "block_rel_err": 0.006}


def prompt_entry(seed: int, **metrics) -> dict:
    good = {"psnr_mean": 41.0, "psnr_min": 40.0, "mse_mean": 8e-5, "mse_max": 1e-4,
            "worst_frame": 2, "ssim_mean": 0.998, "ssim_min": 0.997, "temporal_diff": 0.005,
            "audio_snr_db": 45.0, "audio_noise_ratio": 3e-5, "mel_distance": 0.03,
            "latent_rel_err": 0.02, "first_step_latent_rel_err": 0.02,
            "latent_trajectory": [0.02, 0.02], "block_rel_err": 0.02,
            "blocks": [{"block": 0, "stream": "video", "rel_err": 0.02, "cosine": 0.999,
                        "control_rel_err": 0.006}]}
    return {"prompt": f"prompt number {seed}", "width": 64, "height": 32, "frames": 9,
            "seed": seed, "steps": 2, **good, **metrics, "control": dict(CONTROL)}


def frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((9, 32, 64, 3), dtype=np.float32)


def record(art, source, gates_file=None) -> dict:
    """Record results of two prompts, ``neon-sign`` failing two gates, as the output gates do."""
    prompts = {"calm-lake": prompt_entry(1),
               "neon-sign": prompt_entry(2, psnr_mean=30.0, psnr_min=29.0, mse_mean=1e-3,
                                         mse_max=1.3e-3)}
    results = gate_results(prompts, output_gates(load_gate_config(gates_file)), source=str(source),
                           artifact=str(art), device="cpu", suite=suite_identity(None),
                           report=str(art / REPORT_DIR / "report.html"),
                           thresholds_from=gate_sources(gates_file),
                           control={"bits": 8, "mode": "refined", "group_size": "block",
                                    "tensors": 3, "selection_sha256": "0" * 64,
                                    "code_version": "test", "version": 1})
    write_stacked_sheet(art / SHEET, frames(1), frames(2), frames(3))
    record_output_gates(art, results)
    return results


def test_card_shows_a_row_per_prompt_the_thresholds_and_the_worst_prompt(packaged, art):
    results = record(art, packaged[0])
    card = (art / MODEL_CARD_NAME).read_text()
    assert results["worst_prompt"] == "neon-sign"
    assert "**Not validated**: tensor gates passed; output gates failed." in card
    assert "Output gates **failed** on 1 of 2 prompts" in card
    assert "an 8-bit control (the source with the same 3 tensors re-quantized at 8 bits" in card
    limit_row = next(line for line in card.splitlines() if line.startswith("| **limit**"))
    for gate in results["gates"].values():
        assert f"<= max({gate['k']:g} x ctrl, {gate['floor']:g})" in limit_row
    header = next(line for line in card.splitlines() if line.startswith("| prompt | WxHxF"))
    assert header.split(" | ")[3:12] == list(DISTANCE_ORDER)          # not the JSON's order
    assert tuple(OUTPUT_DISTANCES) == DISTANCE_ORDER
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows[:2]] == ["`calm-lake`", "`neon-sign`"]
    ratio = 1e-3 / CONTROL["mse_mean"]
    assert f"**0.001 / 3.2e-06 ({ratio:.3g}x)**" in rows[1]        # packed / control (ratio)
    assert "FAIL (frame_mse, worst_frame_mse)" in rows[1] and rows[0].endswith("| pass |")
    assert all(label in card for _, label, _ in OUTPUT_METRICS)
    assert "| `neon-sign` | 30.00 (55.00) | 29.00 (54.00) |" in card   # absolute, packed (control)
    assert "of `tasks/gates.toml` (sha256" in card
    assert "measured on the tiny fixture, Q5 to 2 bits against the 8-bit control" in card
    assert (f"![neon-sign: source above, the 8-bit control in the middle, packed below]({SHEET})"
            in card)
    assert f"]({REPORT_DIR}/frames/" not in card       # no worst-frame picture was written here
    assert "Not measured: image-to-video" in card
    # the picture is a file of the artifact like any other: listed, hashed, verified
    manifest = read_manifest(art)
    assert SHEET in manifest["files"] and verify_artifact(art) == []
    assert manifest["validation"]["output_gates"]["worst_prompt"] == {"id": "neon-sign",
                                                                       "sheet": SHEET}


def test_the_worst_prompt_sheet_has_the_source_above_and_the_packed_render_below(tmp_path):
    path = write_stacked_sheet(tmp_path / "sheet.png", frames(1), frames(2))
    image = np.asarray(Image.open(path).convert("RGB"))
    panels = [np.asarray(contact_sheet(to_uint8_frames(frames(seed)))) for seed in (1, 2)]
    height, width = panels[0].shape[:2]
    top = image[LABEL_HEIGHT:LABEL_HEIGHT + height, :width]
    below = LABEL_HEIGHT + height + 4 + LABEL_HEIGHT
    bottom = image[below:below + height, :width]
    assert np.array_equal(top, panels[0]) and np.array_equal(bottom, panels[1])
    # with the control: source, control, packed from top to bottom
    path = write_stacked_sheet(tmp_path / "three.png", frames(1), frames(2), frames(3))
    image = np.asarray(Image.open(path).convert("RGB"))
    step = LABEL_HEIGHT + height + 4
    middle = np.asarray(contact_sheet(to_uint8_frames(frames(3))))
    assert np.array_equal(image[step + LABEL_HEIGHT:step + LABEL_HEIGHT + height, :width], middle)
    last = 2 * step + LABEL_HEIGHT
    assert np.array_equal(image[last:last + height, :width], panels[1])


def test_the_worst_frame_is_shown_source_control_packed(tmp_path):
    from hlwq.runtime.report import frame_comparison

    image = np.asarray(frame_comparison(frames(1), frames(3), frames(2), 4).convert("RGB"))
    # five panels (source, control, packed, two differences); 64-wide frames grow 4x to 256
    assert image.shape[1] == 5 * 256 + 4 * 4 and image.shape[0] == LABEL_HEIGHT + 128
    grown = np.asarray(Image.fromarray(to_uint8_frames(frames(3))[4]).resize(
        (256, 128), Image.Resampling.NEAREST))
    assert np.array_equal(image[LABEL_HEIGHT:, 260:516], grown)      # the control, second


def test_a_user_gates_file_is_named_by_its_name_and_hash(packaged, art, tmp_path):
    strict = tmp_path / "private" / "strict.toml"
    strict.parent.mkdir()
    strict.write_text("[output.frame_mse]\nk = 1.5\nfloor = 0.0\n")
    record(art, packaged[0], gates_file=strict)
    card = (art / MODEL_CARD_NAME).read_text()
    assert "with the keys of `strict.toml` (sha256" in card and "<= max(1.5 x ctrl, 0)" in card
    assert "Output gates **failed** on 2 of 2 prompts" in card


def test_no_local_absolute_path_enters_the_card(packaged, art, tmp_path):
    record(art, packaged[0])
    card = (art / MODEL_CARD_NAME).read_text()
    assert str(packaged[0].parent) not in card and str(tmp_path) not in card
    assert "- source: local folder `src`, layout `diffusers`" in card

    manifest = read_manifest(art)
    manifest["source"].update(kind="hub", source="Lightricks/LTX-2.3@main", repo="Lightricks/LTX-2.3",
                              revision="main", commit_sha="0123abcd", commit_sha_kind="hub-commit")
    manifest["quantization"]["policy"] = {"name": "/home/someone/policies/mine.toml"}
    card = render_model_card(manifest, None)
    assert "- source: Hub repo `Lightricks/LTX-2.3`, layout `diffusers`" in card
    assert "- revision: `main`" in card and "- hub-commit: `0123abcd`" in card
    assert '"name": "mine.toml"' in card and "/home/someone" not in card


def test_what_was_not_measured_is_said(packaged):
    manifest = read_manifest(packaged[1])
    manifest["validation"] = {"validated": False, "output_gates": {"skipped": "--no-gates was given"},
                              "tensor_gates": {"passed": False, "enforced": False,
                                               "tensors_checked": 3, "failures": ["x: bad"]}}
    card = render_model_card(manifest, None)
    assert ("**Not validated**: tensor gates failed, not enforced (--no-gates); output gates "
            "skipped.") in card
    assert "**Not measured**: output gates skipped: --no-gates was given." in card
    assert "Tensor gates **failed** on 3 quantized tensors (1 problem(s)), not enforced" in card
    manifest["validation"] = {"validated": False, "output_gates": None, "tensor_gates": None}
    card = render_model_card(manifest, None)
    assert "**Not measured**: no output gates were recorded" in card
    assert "**Not measured**: no tensor gates were recorded" in card


def test_inspect_prints_the_card_output_table(packaged, art):
    record(art, packaged[0])
    result = CliRunner().invoke(inspect, [str(art)])
    assert result.exit_code == 0, result.output
    output = read_manifest(art)["validation"]["output_gates"]
    for table in (output_gate_table(output), output_metric_table(output)):
        assert table in result.output and table in (art / MODEL_CARD_NAME).read_text()
    assert SHEET in result.output
