"""Verification and safety: corrupt, missing, extra and escaping files; bad manifests; the CLI."""

import json
import os
import shutil

import pytest
from artifact_helpers import make_diffusers_source, package_source
from click.testing import CliRunner

from hlwq.cli.commands.artifact import inspect, verify
from hlwq.quant.errors import ArtifactError, InvalidOptionError, UnsafePathError
from hlwq.quant.sizes import parse_size
from hlwq.store.artifact import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    open_artifact,
    read_manifest,
    safe_relative_path,
    verify_artifact,
)

SHARD = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    source = make_diffusers_source(base / "src")
    (base / "staging").mkdir()
    return package_source(source, base / "art", base / "staging")


@pytest.fixture
def art(pristine, tmp_path):
    """A private copy (real copies, not hard links: tests modify files)."""
    return shutil.copytree(pristine, tmp_path / "art")


def _edit_manifest(art, edit):
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    edit(manifest)
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_sound_artifact_verifies_and_cli_exits_zero(art):
    assert verify_artifact(art) == []
    result = CliRunner().invoke(verify, [str(art)])
    assert result.exit_code == 0 and "sound" in result.output


def test_flipped_byte_names_the_shard(art):
    data = bytearray((art / SHARD).read_bytes())
    data[-10] ^= 0x01
    (art / SHARD).write_bytes(bytes(data))
    problems = verify_artifact(art)
    assert len(problems) == 1 and problems[0].startswith(f"{SHARD}: sha256")
    result = CliRunner().invoke(verify, [str(art)])
    assert result.exit_code == 1 and SHARD in result.output
    with pytest.raises(ArtifactError, match="unsound"):
        open_artifact(art)


def test_deleted_shard_is_named_with_its_tensors(art):
    (art / SHARD).unlink()
    problems = verify_artifact(art)
    assert problems[0] == f"{SHARD}: missing (listed in {MANIFEST_NAME})"
    assert problems[1].startswith(f"{SHARD}: holds 6 tensor entries that cannot be checked")
    assert len(problems) == 2


def test_truncated_manifest_is_a_clear_parse_error(art):
    raw = (art / MANIFEST_NAME).read_bytes()
    (art / MANIFEST_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArtifactError, match=r"manifest.json: not valid JSON at line \d+ column \d+"):
        read_manifest(art)
    result = CliRunner().invoke(verify, [str(art)])
    assert result.exit_code == 1 and "truncated or corrupt" in result.output


def test_newer_format_version_is_refused_naming_it(art):
    _edit_manifest(art, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError, match=f"reads format version {FORMAT_VERSION + 1}"):
        open_artifact(art)


@pytest.mark.parametrize("path", ["../outside.bin", "/etc/passwd", "a/./b", "a//b", "a\\..\\b"])
def test_manifest_paths_outside_are_refused(art, path):
    _edit_manifest(art, lambda m: m["files"].update({path: {"size": 1, "sha256": "0" * 64}}))
    assert any(p.startswith(f"{path}: ") and "must be relative" in p for p in verify_artifact(art))
    with pytest.raises(UnsafePathError):
        open_artifact(art, verify=False)


def test_symlink_leaving_the_artifact_is_refused(art, tmp_path):
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", art / "link.json")
    _edit_manifest(art, lambda m: m["files"].update({"link.json": {"size": 1, "sha256": "0" * 64}}))
    problems = verify_artifact(art)
    assert any(p.startswith("link.json: ") and "outside the artifact" in p for p in problems)
    with pytest.raises(UnsafePathError, match="outside the artifact"):
        safe_relative_path(art, "link.json")


def test_unlisted_file_is_reported(art):
    (art / "vae" / "notes.txt").write_text("hello")
    assert verify_artifact(art) == [f"vae/notes.txt: present but not listed in {MANIFEST_NAME}"]


def test_tensor_entry_inconsistent_with_shard_names_the_tensor(art):
    key = "transformer/transformer_blocks.0.attn1.to_q.weight"
    _edit_manifest(art, lambda m: m["tensors"][key].update(bits=4))
    problems = verify_artifact(art)
    assert problems and all(p.startswith((f"tensor {key}: ", "sizes.")) for p in problems)
    assert any("to_q.weight.codes" in p and "U8 [64, 128]" in p for p in problems)


QUANTIZED = "transformer/transformer_blocks.0.attn1.to_q.weight"


def _fix_arithmetic(manifest):
    """Make an edited entry's byte counts and the sizes table agree with it again."""
    from hlwq.quant.sizes import original_nbytes, packed_nbytes, size_table

    entry = manifest["tensors"][QUANTIZED]
    entry["original_bytes"] = original_nbytes(entry["shape"], entry["dtype"])
    entry["packed_bytes"] = packed_nbytes(entry["shape"], entry["bits"], entry["block_size"],
                                          entry["group_size"])
    manifest["sizes"] = size_table(list(manifest["tensors"].values()))


def test_shape_edit_within_the_padding_fails_verify(art):
    # [64, 256] -> [64, 255] pads to the same 256 columns: the packed parts' shapes cannot
    # tell, the shard's own record of the tensor can (and so can the byte counts).
    _edit_manifest(art, lambda m: m["tensors"][QUANTIZED].update(shape=[64, 255]))
    problems = verify_artifact(art)
    assert (f"tensor {QUANTIZED}: shape is [64, 255] in {MANIFEST_NAME}, {SHARD} records "
            "[64, 256]") in problems
    assert any(p.startswith(f"tensor {QUANTIZED}: original_bytes is") for p in problems)
    assert any(p.startswith("sizes.components.transformer.params is") for p in problems)

    def edit_consistently(manifest):
        manifest["tensors"][QUANTIZED].update(shape=[64, 255])
        _fix_arithmetic(manifest)

    _edit_manifest(art, edit_consistently)
    problems = verify_artifact(art)
    assert problems == [
        f"tensor {QUANTIZED}: shape is [64, 255] in {MANIFEST_NAME}, {SHARD} records [64, 256]"]
    assert CliRunner().invoke(verify, [str(art)]).exit_code == 1


@pytest.mark.parametrize("field, value", [("dtype", "F16"), ("mode", "refined"),
                                          ("group_size", 64)])
def test_quantized_settings_edit_fails_verify(art, field, value):
    def edit(manifest):
        manifest["tensors"][QUANTIZED][field] = value
        _fix_arithmetic(manifest)

    _edit_manifest(art, edit)
    assert any(p.startswith(f"tensor {QUANTIZED}: {field} is {value!r} in {MANIFEST_NAME}")
               for p in verify_artifact(art))


def test_byte_counts_and_sizes_table_are_checked(art):
    kept = "transformer/proj_out.bias"
    _edit_manifest(art, lambda m: m["tensors"][kept].update(packed_bytes=1))
    assert verify_artifact(art) == [
        f"tensor {kept}: packed_bytes is 1 in {MANIFEST_NAME}, its shape and dtype give 64"]

    _edit_manifest(art, lambda m: m["tensors"][kept].update(packed_bytes=64))
    _edit_manifest(art, lambda m: m["sizes"].update(total_packed_bytes=42))
    (problem,) = verify_artifact(art)
    assert problem.startswith(f"sizes.total_packed_bytes is 42 in {MANIFEST_NAME}, the tensor "
                              "entries give ")


def test_inspect_reports_an_unsound_artifact(art):
    (art / SHARD).unlink()
    result = CliRunner().invoke(inspect, [str(art)])
    assert result.exit_code == 1
    assert "sound: no" in result.output and f"{SHARD}: missing" in result.output
    assert "validated: False (the manifest says validated, but the artifact is unsound)" in (
        result.output)
    data = json.loads(CliRunner().invoke(inspect, [str(art), "--json"]).output)
    assert (data["sound"], data["validated"]) == (False, False)
    assert data["validation"]["validated"] is True      # the manifest's own claim, shown as is


def test_schema_problems_are_listed(art):
    key = "transformer/proj_out.bias"
    _edit_manifest(art, lambda m: m["tensors"][key].update(action="shrink", file="nope"))
    (problem,) = verify_artifact(art)
    assert f"tensor {key}: file 'nope' is not listed" in problem and "action 'shrink'" in problem


def test_inspect_shows_sizes_and_quality(art):
    result = CliRunner().invoke(inspect, [str(art)])
    assert result.exit_code == 0, result.output
    assert "| transformer | 6 | 3 |" in result.output and "relative MSE" in result.output
    assert "sound: yes\nvalidated: True" in result.output
    data = json.loads(CliRunner().invoke(inspect, [str(art), "--json"]).output)
    assert data["quality"]["tensors"] == 3 and data["sizes"]["quantized_tensors"] == 3
    assert 0.99 < data["quality"]["cosine"]["worst"] <= data["quality"]["cosine"]["median"] <= 1


def test_parse_byte_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    assert parse_size("5G") == 5 * 10**9 and parse_size("1000") == 1000
    with pytest.raises(InvalidOptionError, match="--max-shard-size '5 parsecs'"):
        parse_size("5 parsecs", "--max-shard-size")


def test_manifest_symlinked_from_outside_is_refused(art, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((art / MANIFEST_NAME).read_bytes())
    (art / MANIFEST_NAME).unlink()
    os.symlink(outside, art / MANIFEST_NAME)
    with pytest.raises(UnsafePathError, match="outside the artifact"):
        read_manifest(art)


def test_outputs_never_replace_unrelated_directories(art, tmp_path):
    from hlwq.store.export import export_dequantized

    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "thesis.txt").write_text("years of work")
    with pytest.raises(ArtifactError, match="precious: exists and is not empty"):
        export_dequantized(art, keep)
    assert (keep / "thesis.txt").read_text() == "years of work"
