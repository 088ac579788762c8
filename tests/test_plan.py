import json

import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from hlwq.cli.commands.plan import format_count
from hlwq.cli.main import cli
from hlwq.quant.errors import InvalidOptionError, PolicyError, SourceError
from hlwq.quant.sizes import format_bytes, packed_nbytes, size_table
from hlwq.store.safetensors_io import read_header

OFFICIAL = "model.diffusion_model."


def test_size_table_arithmetic():
    rows = [
        {"component": "transformer", "shape": [256, 256], "dtype": "BF16", "action": "quantize", "bits": 5},
        {"component": "transformer", "shape": [256, 200], "dtype": "F32", "action": "quantize", "bits": 4},
        {"component": "transformer", "shape": [256], "dtype": "F32", "action": "keep", "bits": None},
        {"component": "vae", "shape": [8, 8, 3, 3], "dtype": "BF16", "action": "keep", "bits": None},
    ]
    table = size_table(rows)
    q5 = 256 * 256 * 5 // 8 + 256 * 2 * 2 + 32 * 4       # codes + fp16 scales + fp32 codebook
    q4 = 256 * 256 * 4 // 8 + 256 * 2 * 2 + 16 * 4       # in=200 is padded to 256
    transformer = table["components"]["transformer"]
    assert transformer == {
        "tensors": 3, "quantized_tensors": 2, "params": 65536 + 51200 + 256,
        "quantized_params": 65536 + 51200, "original_bytes": 65536 * 2 + 51200 * 4 + 1024,
        "packed_bytes": q5 + q4 + 1024, "quantized_packed_bytes": q5 + q4,
        "bits_per_weight": 8 * (q5 + q4 + 1024) / (65536 + 51200 + 256),
    }
    assert table["components"]["vae"]["packed_bytes"] == table["components"]["vae"]["original_bytes"] == 1152
    assert table["components"]["vae"]["bits_per_weight"] == 16.0
    assert (table["total_tensors"], table["quantized_tensors"]) == (4, 2)
    assert table["total_original_bytes"] == transformer["original_bytes"] + 1152
    assert table["total_packed_bytes"] == q5 + q4 + 1024 + 1152
    assert table["quantized_packed_bytes"] == q5 + q4
    assert list(table["components"]) == ["transformer", "vae"]
    # block and group sizes: arguments, or a row's own, through packed_nbytes
    assert size_table(rows[:1], block_size=64, group_size=32)["total_packed_bytes"] == \
        packed_nbytes((256, 256), 5, 64, 32)
    own = [{**rows[0], "block_size": 256}]
    assert size_table(own)["total_packed_bytes"] == packed_nbytes((256, 256), 5, 256)
    assert size_table(pa.Table.from_pylist(rows)) == table
    assert size_table([])["bits_per_weight"] == 0.0


def test_readable_units():
    assert format_bytes(11_870_000_000) == "11.87 GB"
    assert format_bytes(1_500_000) == "1.50 MB"
    assert format_bytes(512) == "512 B"
    assert format_count(18_520_000_000) == "18.52B"
    assert format_count(999) == "999"


@pytest.fixture
def single_file(tmp_path):
    tensors = {
        f"{OFFICIAL}transformer_blocks.0.attn1.to_q.weight": (256, 256),
        f"{OFFICIAL}transformer_blocks.0.ff.net.0.proj.weight": (1024, 256),
        f"{OFFICIAL}transformer_blocks.0.attn1.to_q.bias": (256,),
        "vae.decoder.conv_in.conv.weight": (16, 16, 3, 3, 3),
    }
    path = tmp_path / "ltx-2.3-tiny.safetensors"
    save_file({name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in tensors.items()},
              str(path))
    return path


def run(*args):
    return CliRunner().invoke(cli, ["plan", *map(str, args)])


def test_plan_prints_aligned_table(single_file):
    result = run(single_file)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "layout ltx23-single, policy ltx23, 5-bit, block 128" in lines[0]
    table = lines[2:lines.index("", 2)]
    assert table[0].split() == ["component", "tensors", "quantized", "params", "original",
                                "packed", "bits/weight"]
    assert len({len(line) for line in table}) == 1            # aligned columns
    assert table[1].split()[:3] == ["transformer", "3", "2"]
    assert table[2].split()[:3] == ["vae", "1", "0"]
    assert table[-1].split()[:3] == ["total", "4", "2"]
    assert "kB" in result.output and "quantized: 2 tensors" in result.output


def test_plan_json(single_file):
    result = run(single_file, "--json", "--bits", "4", "--block-size", "64")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for key in ("quantized_tensors", "total_packed_bytes", "total_original_bytes", "components"):
        assert key in report
    transformer = report["components"]["transformer"]
    assert {"tensors", "params", "original_bytes", "packed_bytes", "bits_per_weight"} <= set(transformer)
    assert report["quantized_tensors"] == 2 and (report["bits"], report["block_size"]) == (4, 64)
    assert transformer["quantized_packed_bytes"] == packed_nbytes((256, 256), 4, 64) + \
        packed_nbytes((1024, 256), 4, 64)


def test_plan_policy_options(single_file, tmp_path):
    generic = json.loads(run(single_file, "--json", "--policy", "generic").output)
    assert generic["policy"] == "generic" and generic["quantized_tensors"] == 2   # both >= 65,536
    excluded = json.loads(run(single_file, "--json", "--exclude", "*.ff.*").output)
    assert excluded["quantized_tensors"] == 1
    overrides = tmp_path / "o.yaml"
    overrides.write_text("bits:\n  '*.ff.*': 3\n")
    mixed = json.loads(run(single_file, "--json", "--overrides", overrides).output)
    assert mixed["quantized_packed_bytes"] == packed_nbytes((256, 256), 5) + packed_nbytes((1024, 256), 3)


def test_plan_of_hub_repo_reads_headers_only(single_file, monkeypatch):
    """The Hub path: the repo's file list and headers come from hlwq.tasks.sources (HTTP Range there)."""
    from hlwq.tasks import sources

    calls = []

    def list_remote_files(repo, revision, allow_patterns, ignore_patterns):
        calls.append(("list", repo, revision, allow_patterns, ignore_patterns))
        return "c0ffee" * 6 + "abcd", {"model_index.json": 100, "transformer/m.safetensors": 1}

    def remote_safetensors_headers(repo, revision, allow_patterns, ignore_patterns):
        calls.append(("headers", repo, revision, allow_patterns, ignore_patterns))
        return {"transformer/m.safetensors": read_header(single_file)}

    monkeypatch.setattr(sources, "list_remote_files", list_remote_files)
    monkeypatch.setattr(sources, "remote_safetensors_headers", remote_safetensors_headers)
    result = run("owner/ltx-repo", "--revision", "v1", "--files", "transformer/*", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["layout"] == "diffusers" and report["source"].startswith("owner/ltx-repo@v1")
    assert list(report["components"]) == ["transformer"]
    assert report["quantized_tensors"] == 2
    commit = "c0ffee" * 6 + "abcd"
    assert calls == [("list", "owner/ltx-repo", "v1", ["transformer/*"], None),
                     ("headers", "owner/ltx-repo", commit, ["transformer/*"], None)]


def test_plan_real_ltx23_transformer_layout(monkeypatch):
    """--layout ltx23-22b reads no source: the real transformer built on the meta device."""
    from hlwq.runtime import ltx23_models as layout

    real_rows = layout.ltx23_22b_package_rows
    monkeypatch.setattr(layout, "ltx23_22b_package_rows",
                        lambda: real_rows(components=("transformer",)))   # keep the test short
    result = run("--layout", "ltx23-22b", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["quantized_tensors"] == 1344
    assert 18.4e9 < report["quantized_params"] < 18.6e9
    assert 11.8e9 < report["quantized_packed_bytes"] < 12.0e9       # 18.5B x 5.125 bits
    assert report["components"]["transformer"]["tensors"] == 4186


def test_plan_bad_input(tmp_path, single_file):
    assert run().exit_code == 2                                   # neither SOURCE nor --layout
    assert run(single_file, "--layout", "ltx23-22b").exit_code == 2
    missing = run(tmp_path / "nothing" / "here.safetensors")
    assert isinstance(missing.exception, SourceError) and "here.safetensors" in str(missing.exception)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert isinstance(run(empty).exception, SourceError)
    assert isinstance(run(single_file, "--revision", "main").exception, InvalidOptionError)
    assert isinstance(run(single_file, "--bits", "9").exception, InvalidOptionError)
    assert isinstance(run(single_file, "--block-size", "100").exception, InvalidOptionError)
    assert isinstance(run(single_file, "--policy", "nope").exception, PolicyError)


def test_a_folder_with_two_checkpoints_needs_files(single_file):
    """The real repo holds dev and distilled checkpoints side by side: plan one of them."""
    (single_file.parent / "ltx-2.3-tiny-distilled.safetensors").write_bytes(single_file.read_bytes())
    error = str(run(single_file.parent).exception)
    assert "ltx-2.3-tiny-distilled.safetensors" in error and "--files" in error
    for options in (["--files", single_file.name], ["--exclude-files", "*distilled*"]):
        result = run(single_file.parent, *options, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["total_tensors"] == 4
    assert "--layout reads no checkpoint" in str(run("--layout", "ltx23-22b", "--files", "x").exception)


def test_plan_ltx23_full_package_is_about_28gb():
    """Every large component packed: the whole Q5 package, Gemma included (46 GB in ltx23)."""
    result = run("--layout", "ltx23-22b", "--policy", "ltx23-full", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    components = report["components"]
    assert components["connectors"]["quantized_tensors"] == 98
    assert components["text_encoder"]["quantized_tensors"] == 336
    assert 27.0e9 < report["total_packed_bytes"] < 28.5e9


@pytest.mark.slow
def test_plan_ltx23_full_fits_15gb_checkpoint():
    """The ltx23 policy stops at 15.01 GB (BF16 connectors); ltx23-full fits 15 GB."""
    result = run("--layout", "ltx23-22b", "--policy", "ltx23-full", "--target-size", "15GB",
                 "--target-scope", "checkpoint", "--json")
    assert result.exit_code == 0, result.output
    budget = json.loads(result.output)["budget"]
    assert budget["total_bytes"] <= budget["target_bytes"] == 15e9
