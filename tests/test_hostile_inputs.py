"""Hostile and unlucky inputs through the real `hlwq` CLI (a subprocess per case).

For every case: exit code 2 (1 for a partial batch), the last stderr line is one
``ErrorType: message`` line naming the file, tensor, row or option and the rule, no traceback,
and the source and the existing artifact are unchanged. Cases that fail before Prefect starts
must answer within seconds; the ones that reach a flow are marked slow.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from artifact_helpers import make_diffusers_source, package_source
from flow_support import REPO, cli_env, hlwq_command, write_generic_file

FAST_S = 3.0   # a pre-Prefect failure, Python's start included (0.2-2 s measured under load)


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def source(place) -> Path:
    return make_diffusers_source(place / "source")


@pytest.fixture(scope="module")
def artifact(place, source) -> Path:
    return package_source(source, place / "artifact", place / "artifact-staging")


@pytest.fixture(scope="module")
def generic_file(place) -> Path:
    return write_generic_file(place / "generic" / "model.safetensors")


def snapshot(*roots: Path) -> dict[str, tuple[bytes, int]]:
    return {f"{root}/{path.relative_to(root)}": (path.read_bytes(), path.stat().st_mtime_ns)
            for root in roots for path in sorted(root.rglob("*")) if path.is_file()}


def hlwq(place: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(hlwq_command(*map(str, args)), cwd=REPO, env=cli_env(place / "prefect"),
                            capture_output=True, text=True, timeout=timeout, check=False)
    return result, time.perf_counter() - started


def assert_one_line_error(result: subprocess.CompletedProcess, error: str, *names: str,
                          code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{error}: "), result.stderr[-3000:]
    for name in names:
        assert str(name) in line, (name, line)
    return line


# ---------------------------------------------------------------- before Prefect starts


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bad_options(place: Path, source: Path, artifact: Path) -> list[tuple]:
    """(case, arguments, error type, names the line must hold)."""
    crowded = place / "crowded"
    crowded.mkdir(exist_ok=True)
    (crowded / "notes.txt").write_text("not an artifact")
    port = free_port()
    return [
        ("missing source", ["quantize", place / "nope", "--out", place / "o1"], "SourceError",
         ["nope", "no such file"]),
        ("non-empty --out", ["quantize", source, "--out", crowded], "ArtifactError",
         ["--out", "crowded", "not an HLWQ artifact"]),
        ("--out is a file", ["quantize", source, "--out", crowded / "notes.txt"], "BadParameter",
         ["--out", "notes.txt", "is a file"]),
        ("--dask-address notanaddress", ["quantize", source, "--out", place / "o2",
                                         "--dask-address", "notanaddress"],
         "InvalidOptionError", ["--dask-address", "notanaddress", "not a scheduler address"]),
        ("no scheduler listening", ["quantize", source, "--out", place / "o3", "--dask-address",
                                    f"tcp://127.0.0.1:{port}"],
         "InvalidOptionError", ["--dask-address", str(port), "no scheduler answers"]),
        ("--workers 0", ["quantize", source, "--out", place / "o4", "--workers", "0"],
         "BadParameter", ["--workers", "0"]),
        ("export into a non-empty folder", ["export-dequantized", artifact, crowded],
         "ArtifactError", ["OUT", "crowded"]),
        ("render: no manifest", ["render", "--artifact", crowded, "--prompts",
                                 crowded / "notes.txt", "--out", place / "r1"],
         "ArtifactError", ["crowded", "manifest.json"]),
        ("render: unknown prompt format", ["render", "--artifact", artifact, "--prompts",
                                           crowded / "notes.txt", "--out", place / "r2"],
         "PromptFileError", ["notes.txt", ".txt"]),
        ("render: --retries -1", ["render", "--artifact", artifact, "--prompts",
                                  crowded / "notes.txt", "--out", place / "r3", "--retries", "-1"],
         "BadParameter", ["--retries", "-1"]),
    ]


def test_bad_options_and_paths_fail_fast_as_one_line(place, source, artifact):
    before = snapshot(source, artifact)
    for case, args, error, names in bad_options(place, source, artifact):
        result, seconds = hlwq(place, *args)
        assert_one_line_error(result, error, *names)
        print(f"{case}: {seconds:.2f} s")
        # render's options come from runtime/offload.py, which imports torch: not timed.
        assert args[0] == "render" or seconds < FAST_S, f"{case}: {seconds:.1f} s"
    assert snapshot(source, artifact) == before


def test_debug_adds_the_traceback(place):
    result, _ = hlwq(place, "--debug", "quantize", place / "nope", "--out", place / "o8")
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("SourceError: ")


def test_encoder_options_are_checked_before_prefect_starts(place, source):
    """These need the numerics' imports (torch), not a Prefect server: seconds, not tens."""
    for args, error, names in [
        (["--bits", "9"], "InvalidOptionError", ["bits", "9"]),
        (["--group-size", "100"], "InvalidOptionError", ["group_size", "100"]),
        (["--target-size", "lots"], "InvalidOptionError", ["--target-size", "lots"]),
    ]:
        result, _ = hlwq(place, "quantize", source, "--out", place / "o5", *args)
        assert_one_line_error(result, error, *names)
        assert "Prefect" not in result.stderr and not (place / "o5.staging").exists()


def test_an_unreachable_scheduler_is_given_seconds_not_a_minute(place, source):
    # TEST-NET-1 (RFC 5737): nothing answers there; the wait is bounded.
    result, seconds = hlwq(place, "quantize", source, "--out", place / "o7", "--dask-address",
                           "tcp://192.0.2.1:8786")
    assert_one_line_error(result, "InvalidOptionError", "--dask-address", "192.0.2.1:8786")
    assert seconds < FAST_S


def damaged_copy(artifact: Path, place: Path, name: str) -> Path:
    copy = place / name
    shutil.copytree(artifact, copy)
    return copy


def edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_damaged_artifacts_are_named(place, artifact):
    before = snapshot(artifact)
    truncated = damaged_copy(artifact, place, "truncated-metrics")
    metrics = truncated / "metrics.parquet"
    metrics.write_bytes(metrics.read_bytes()[:100])
    result, _ = hlwq(place, "inspect", truncated)
    assert_one_line_error(result, "ArtifactError", "metrics.parquet", "not a readable")

    future = damaged_copy(artifact, place, "future-version")
    edit_manifest(future, lambda m: m.update(format_version=99))
    result, _ = hlwq(place, "inspect", future)
    assert_one_line_error(result, "ArtifactError", "99")

    escape = damaged_copy(artifact, place, "path-escape")
    edit_manifest(escape, lambda m: m["files"].update({"../outside.txt": {"size": 1, "sha256": "0" * 64}}))
    result, _ = hlwq(place, "inspect", escape)
    assert_one_line_error(result, "UnsafePathError", "../outside.txt", "must be relative")
    result, _ = hlwq(place, "export-dequantized", escape, place / "x1")   # verifies first
    assert_one_line_error(result, "ArtifactError", "../outside.txt", "unsound")

    result, _ = hlwq(place, "convert", place / "crowded", place / "x2")
    assert_one_line_error(result, "ArtifactError", "crowded", "polar_config.json")
    assert snapshot(artifact) == before


def test_a_locked_output_fails_with_no_wait_naming_the_holder(place, source, artifact):
    from hlwq.store.output_dir import folder_lock

    prompts = place / "one.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    with folder_lock(place / "locked-renders"), folder_lock(place / "locked-artifact"):
        result, _ = hlwq(place, "render", "--artifact", artifact, "--prompts", prompts,
                         "--out", place / "locked-renders", "--no-wait")
        assert_one_line_error(result, "OutputLockedError", "locked-renders", f"pid {os.getpid()}")
        result, _ = hlwq(place, "quantize", source, "--out", place / "locked-artifact",
                         "--no-wait")
        assert_one_line_error(result, "OutputLockedError", "locked-artifact",
                              f"pid {os.getpid()}")


def test_a_corrupt_catalog_part_is_named(place, artifact):
    out = place / "renders-corrupt"
    (out / "catalog").mkdir(parents=True)
    (out / "catalog" / "part-20260101T000000000000Z-deadbeef.parquet").write_bytes(b"PAR1 garbage")
    prompts = place / "two.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    result, _ = hlwq(place, "render", "--artifact", artifact, "--prompts", prompts, "--out", out)
    assert_one_line_error(result, "CatalogError", "part-20260101T000000000000Z-deadbeef.parquet")


def test_disk_full_while_packaging_is_a_typed_error(place, source, artifact, monkeypatch):
    from hlwq.quant.errors import InsufficientDiskError
    from hlwq.store import atomic

    def full(directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "model.safetensors"))

    before = snapshot(artifact)
    monkeypatch.setattr(atomic, "fsync_tree", full)
    with pytest.raises(InsufficientDiskError, match="disk full while writing it") as caught:
        package_source(source, artifact, place / "full-staging")
    assert "\n" not in str(caught.value)
    assert snapshot(artifact) == before
    assert not list(artifact.parent.glob(f".{artifact.name}.hlwq-partial-*"))


# ---------------------------------------------------------------- through a flow


def bad_prompt_rows() -> tuple[str, list[str]]:
    """Every kind of bad row (JSON Lines) and a fragment of each rejection."""
    rows = [
        ('{"prompt": "a", "seed": %s}' % ("7" * 5000), "seed has 5000 characters"),
        ('{"prompt": ""}', "missing prompt"),
        ('{"prompt": "a", "width": 50}', "width must be a multiple of 32"),
        ('{"prompt": "a", "frames": 10}', "frames must be 8k+1"),
        ('{"prompt": "a", "fps": 0}', "fps must be a finite number"),
        ('{"prompt": "a", "steps": 1.5}', "steps must be a whole number"),
        ('{"prompt": "a", "guidance": "lots"}', "guidance must be a number"),
        ('{"prompt": "a", "id": "../escape"}', "not a safe file name"),
        ('{"prompt": "a", "image": "missing.png"}', "not a readable image"),
        ('{"prompt": "a", "colour": "red"}', "unknown column"),
        ('{"prompt": "a", "seed": -1}', "seed must be between"),
        ('{"prompt": "a", "seed": true}', "seed must be a number"),
        ('not json', "not valid JSON"),
        ('[1, 2]', "expected a JSON object"),
    ]
    return "\n".join(text for text, _ in rows) + "\n", [reason for _, reason in rows]


@pytest.mark.slow
def test_a_batch_of_bad_rows_rejects_each_row_and_goes_on(place, artifact):
    text, reasons = bad_prompt_rows()
    prompts = place / "bad-rows.jsonl"
    prompts.write_text(text)
    before = snapshot(artifact)
    result, _ = hlwq(place, "render", "--artifact", artifact, "--prompts", prompts, "--out",
                     place / "bad-row-renders", "--device", "cpu")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    rejected = [line for line in result.stdout.splitlines() if "REJECTED" in line]
    assert len(rejected) == len(reasons), result.stdout
    for number, (line, reason) in enumerate(zip(rejected, reasons, strict=True), start=1):
        assert f"row {number}" in line and reason in line and len(line) < 300, line
    assert snapshot(artifact) == before


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def hostile_sources(place: Path, generic_file: Path) -> list[tuple]:
    """(case, source, error type, names the line must hold)."""
    truncated = place / "truncated" / "model.safetensors"
    truncated.parent.mkdir(parents=True, exist_ok=True)
    truncated.write_bytes(generic_file.read_bytes()[:-1000])
    weight = {"dtype": "BF16", "shape": [256, 256]}
    overlapping = write_raw_safetensors(
        place / "overlapping" / "model.safetensors",
        {"a.weight": {**weight, "data_offsets": [0, 131072]},
         "b.weight": {**weight, "data_offsets": [65536, 196608]}}, bytes(196608))
    unknown = write_raw_safetensors(
        place / "unknown-dtype" / "model.safetensors",
        {"a.weight": {"dtype": "Q9_WEIRD", "shape": [256, 256], "data_offsets": [0, 65536]}},
        bytes(65536))
    nan = write_raw_safetensors(
        place / "nan" / "model.safetensors",
        {"layers.0.mlp.up.weight": {"dtype": "F32", "shape": [256, 256],
                                    "data_offsets": [0, 262144]}},
        struct.pack("<f", float("nan")) * 65536)
    empty = place / "empty-source"
    empty.mkdir(exist_ok=True)
    return [
        ("truncated", truncated, "CorruptCheckpointError", ["model.safetensors"]),
        ("overlapping", overlapping, "CorruptCheckpointError", ["model.safetensors"]),
        ("unknown dtype", unknown, "CorruptCheckpointError", ["Q9_WEIRD"]),
        ("NaN weights", nan, "NonFiniteTensorError", ["layers.0.mlp.up.weight"]),
        ("empty source", empty, "SourceError", ["empty-source"]),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(5), ids=["truncated", "overlapping", "unknown-dtype",
                                                "nan", "empty"])
def test_hostile_sources_fail_with_one_typed_line(place, generic_file, artifact, case):
    _, path, error, names = hostile_sources(place, generic_file)[case]
    before = snapshot(path.parent if path.is_file() else path, artifact)
    result, _ = hlwq(place, "quantize", path, "--out", place / f"out-{case}", "--workers", "1")
    assert_one_line_error(result, error, *names)
    assert snapshot(path.parent if path.is_file() else path, artifact) == before
    assert not (place / f"out-{case}" / "manifest.json").exists()


def test_a_missing_component_is_named_when_the_pipeline_loads(place, artifact):
    """What the output gates and render meet when an artifact lacks a part of its pipeline."""
    from hlwq.quant.errors import ArtifactError
    from hlwq.runtime.loader import load_pipeline

    partial = damaged_copy(artifact, place, "no-vae")
    shutil.rmtree(partial / "vae")
    with pytest.raises(ArtifactError, match=r"component\(s\) vae named in model_index.json"):
        load_pipeline(partial, verify=False)
