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
from hlwq.store.model_card import OUTPUT_METRICS, output_gate_table, render_model_card
from hlwq.tasks.gates import gate_sources, load_gate_config
from hlwq.tasks.validate_output import (
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


def prompt_entry(seed: int, **metrics) -> dict:
    good = {"psnr_mean": 41.0, "psnr_min": 40.0, "ssim_mean": 0.998, "ssim_min": 0.997,
            "temporal_diff": 0.005, "audio_snr_db": 45.0, "mel_distance": 0.03,
            "latent_rel_err": 0.02, "block_rel_err": 0.02,
            "blocks": [{"block": 0, "stream": "video", "rel_err": 0.02, "cosine": 0.999}]}
    return {"prompt": f"prompt number {seed}", "width": 64, "height": 32, "frames": 9,
            "seed": seed, "steps": 2, **good, **metrics}


def frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((9, 32, 64, 3), dtype=np.float32)


def record(art, source, gates_file=None) -> dict:
    """Record results of two prompts, ``neon-sign`` failing two gates, as the output gates do."""
    prompts = {"calm-lake": prompt_entry(1),
               "neon-sign": prompt_entry(2, psnr_mean=30.0, psnr_min=29.0)}
    results = gate_results(prompts, output_gates(load_gate_config(gates_file)), source=str(source),
                           artifact=str(art), device="cpu", suite=suite_identity(None),
                           report=str(art / REPORT_DIR / "report.html"),
                           thresholds_from=gate_sources(gates_file))
    write_stacked_sheet(art / SHEET, frames(1), frames(2))
    record_output_gates(art, results)
    return results


def test_card_shows_a_row_per_prompt_the_thresholds_and_the_worst_prompt(packaged, art):
    results = record(art, packaged[0])
    card = (art / MODEL_CARD_NAME).read_text()
    assert results["worst_prompt"] == "neon-sign"
    assert "**Not validated**: tensor gates passed; output gates failed." in card
    assert "Output gates **failed** on 1 of 2 prompts" in card
    assert all(label in card for _, label, _ in OUTPUT_METRICS)
    threshold_row = next(line for line in card.splitlines() if line.startswith("| **threshold**"))
    for gate in results["gates"].values():
        assert f"{gate['threshold']:g}" in threshold_row
    assert ">= 35.5" in threshold_row and "<= 0.055" in threshold_row  # tasks/gates.toml's [output]
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows[:2]] == ["`calm-lake`", "`neon-sign`"]
    assert "**30.00**" in rows[1] and "FAIL (min_psnr_mean, min_psnr_min)" in rows[1]
    assert rows[0].endswith("| pass |")
    assert "of `tasks/gates.toml` (sha256" in card and "how its default was measured" in card
    assert f"![neon-sign: source above, packed below]({SHEET})" in card
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


def test_a_user_gates_file_is_named_by_its_name_and_hash(packaged, art, tmp_path):
    strict = tmp_path / "private" / "strict.toml"
    strict.parent.mkdir()
    strict.write_text("[output]\nmin_psnr_mean = 99.0\n")
    record(art, packaged[0], gates_file=strict)
    card = (art / MODEL_CARD_NAME).read_text()
    assert "with the keys of `strict.toml` (sha256" in card and ">= 99 |" in card
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
    table = output_gate_table(read_manifest(art)["validation"]["output_gates"])
    assert table in result.output and table in (art / MODEL_CARD_NAME).read_text()
    assert SHEET in result.output
