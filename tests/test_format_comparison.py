"""The card's "against other formats at this size" table: measured at packaging on a sample of
the artifact's own tensors, the artifact's own codes beside every format, the sample recorded,
missing libraries named; and the same sample as a plot in the validation report."""

from __future__ import annotations

import json
import math

import pytest
from artifact_helpers import make_diffusers_source, package_source, quantize_source

from hlwq.quant.formats import FORMATS, missing_dependency
from hlwq.runtime.report import plot_format_comparison
from hlwq.store.artifact import METRICS_NAME, MODEL_CARD_NAME, read_manifest, verify_artifact
from hlwq.store.format_comparison import compare_formats, sample_tensors
from hlwq.store.model_card import format_comparison_blocks, read_metrics


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    base = tmp_path_factory.mktemp("formats-card")
    source = make_diffusers_source(base / "src")
    (base / "staging").mkdir()
    return source, package_source(source, base / "art", base / "staging")


def test_packaging_measures_every_format_on_the_artifacts_own_tensors(artifact):
    _, art = artifact
    manifest = read_manifest(art)
    comparison = manifest["format_comparison"]
    sample = comparison["sample"]
    assert sample["quantized_tensors"] == len(sample["tensors"]) == 3    # all of them, all rows
    assert all(t["rows"] == t["of_rows"] and t["bits"] == 5 for t in sample["tensors"])
    # the artifact's figures are its stored codes: on all rows they are metrics.parquet's
    metrics = read_metrics(art / METRICS_NAME).to_pylist()
    own = comparison["artifact"]
    assert own["rel_mse_mean"] == pytest.approx(math.fsum(r["rel_mse"] for r in metrics) / 3)
    assert own["rel_mse_worst"] == pytest.approx(max(r["rel_mse"] for r in metrics))
    measured = {e["name"] for e in comparison["formats"]}
    missing = {e["name"] for e in comparison["not_measured"]}
    assert measured | missing == set(FORMATS) and not measured & missing
    assert {f for f in FORMATS if missing_dependency(FORMATS[f])} == missing
    q5 = next(e for e in comparison["formats"] if e["name"] == "hlwq-q5-b128")
    assert q5["bits_per_weight"] == pytest.approx(own["bits_per_weight"])   # same layout
    assert verify_artifact(art) == []


def test_the_card_shows_the_table_the_nearest_sizes_and_what_was_not_measured(artifact):
    _, art = artifact
    card = (art / MODEL_CARD_NAME).read_text()
    section = card.split("## Against other formats at this size", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(read_manifest(art)["format_comparison"]["formats"]) + 1
    bits = [float(row.split("|")[2]) for row in rows]
    assert bits == sorted(bits)
    ours = next(row for row in rows if row.startswith("| **this artifact**"))
    assert ours.rstrip().endswith("| 1 |")
    assert sum("(nearest size)" in row for row in rows) == 2
    assert "3 of this artifact's 3 quantized tensors" in section
    assert "Over all its quantized tensors this artifact stores 5.422 bits per weight" in section
    for entry in read_manifest(art)["format_comparison"]["not_measured"]:
        assert f"`{entry['name']}`" in section and entry["reason"] in section


def test_older_and_skipped_comparisons_say_not_measured():
    assert format_comparison_blocks(None)[0].startswith("**Not measured**")
    assert format_comparison_blocks({"skipped": "converted"}) == ["**Not measured**: converted."]


def test_the_sample_is_capped_and_deterministic(artifact, tmp_path):
    source, _ = artifact
    rows = [{"component": "transformer", "tensor": f"blocks.{i}.proj.weight",
             "action": "quantize"} for i in range(20)] + [{"component": "transformer",
                                                          "tensor": "norm", "action": "keep"}]
    chosen = [r["tensor"] for r in sample_tensors(rows, 4)]
    assert chosen == ["blocks.0.proj.weight", "blocks.5.proj.weight", "blocks.10.proj.weight",
                      "blocks.15.proj.weight"]
    (tmp_path / "staging").mkdir()
    fetched, inventory, staged, _ = quantize_source(source, tmp_path / "staging")
    first = compare_formats(fetched.root, inventory.to_pylist(), staged, tensors=2,
                            rows_per_tensor=16)
    assert [t["rows"] for t in first["sample"]["tensors"]] == [16, 16]
    assert first == compare_formats(fetched.root, inventory.to_pylist(), staged, tensors=2,
                                    rows_per_tensor=16)


def test_the_validation_report_plots_the_sample_with_the_artifact_marked(artifact, tmp_path):
    _, art = artifact
    plots = plot_format_comparison(tmp_path, art / METRICS_NAME)
    (title, path), = plots.items()
    assert "this artifact" in title and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_format_comparison(tmp_path, None) == {}


def test_write_report_puts_the_plot_on_the_page(artifact, tmp_path, monkeypatch):
    from hlwq.runtime import report

    _, art = artifact
    monkeypatch.setattr(report, "write_plots", lambda *args: {})       # the gates' own plots
    monkeypatch.setattr(report, "report_html", lambda results, plots, directory:
                        " ".join(p.relative_to(directory).as_posix() for p in plots.values()))
    page = report.write_report(tmp_path, {}, art / METRICS_NAME).read_text()
    assert page == f"{report.PLOT_DIR}/formats.png"


def test_inspect_prints_the_comparison_and_its_json_holds_it(artifact):
    from click.testing import CliRunner

    from hlwq.cli.main import cli

    _, art = artifact
    text = CliRunner().invoke(cli, ["inspect", str(art)])
    assert text.exit_code == 0, text.output
    assert "| **this artifact** |" in text.output and "(nearest size)" in text.output
    as_json = CliRunner().invoke(cli, ["inspect", str(art), "--json"])
    assert as_json.exit_code == 0
    assert json.loads(as_json.output)["format_comparison"] == read_manifest(art)["format_comparison"]
