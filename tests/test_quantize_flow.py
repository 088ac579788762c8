"""The quantize flow in-process: real Prefect (temporary local API), real Dask worker processes.

Flow runs here share one LocalCluster (via --dask-address) so each costs seconds;
the default LocalCluster path is exercised by tests/test_flow_faults.py and
tests/test_distributed.py through the CLI.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import namedtuple

import pyarrow.parquet as pq
import pytest
import torch
from flow_support import patient_prefect, write_diffusers_checkpoint, write_generic_file
from safetensors.torch import load_file, save_file

from hlwq.flows.quantize_flow import group_of, plan_jobs, run_quantize
from hlwq.quant.core import quantize_tensor
from hlwq.quant.errors import (
    GateFailedError,
    HLWQError,
    InsufficientDiskError,
    InvalidOptionError,
    NonFiniteTensorError,
)
from hlwq.store.artifact import open_artifact, read_manifest, verify_artifact
from hlwq.store.tensor_jobs import TensorJob
from hlwq.tasks.disk import DiskEstimate, check_disk, estimate_disk
from hlwq.tasks.gates import check_tensor_gates, load_gate_config, tensor_gates

TRANSFORMER_FILE = "transformer/diffusion_pytorch_model.safetensors"
QUANTIZED_PER_LAYER = 10          # 8 attention projections + 2 feed-forward linears


@pytest.fixture(autouse=True, scope="module")
def _patient_prefect():
    with patient_prefect():
        yield


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as local:
        yield local.scheduler_address


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_diffusers_checkpoint(tmp_path_factory.mktemp("source") / "ckpt")


# ---- gates and disk (no flow) ------------------------------------------------------------------


def test_default_gates_follow_the_bit_width():
    gates = tensor_gates(load_gate_config())
    assert sorted(gates) == list(range(2, 9))
    for narrow, wide in zip(range(2, 8), range(3, 9)):
        assert gates[narrow].min_cosine < gates[wide].min_cosine
        assert gates[narrow].max_mean_rel_mse > gates[wide].max_mean_rel_mse
    assert gates[5].max_mean_rel_mse == 0.004


def test_gates_name_offending_tensors_and_a_bad_mean():
    gates = tensor_gates(load_gate_config())
    good = {"tensor": "a", "bits": 5, "cosine": 0.9990, "rel_mse": 0.002, "action": "quantize"}
    bad = {"tensor": "b", "bits": 5, "cosine": 0.990, "rel_mse": 0.02, "action": "quantize"}
    assert check_tensor_gates([good], gates).passed
    report = check_tensor_gates([good, bad], gates)
    assert not report.passed
    assert any(line.startswith("b (5-bit): cosine") for line in report.failures)
    assert any(line.startswith("mean relative MSE of the 2 5-bit tensors") for line in report.failures)
    assert not any(line.startswith("a ") for line in report.failures)


def test_user_gates_file_merges_and_is_validated(tmp_path):
    strict = tmp_path / "strict.toml"
    strict.write_text("[tensor.5]\nmin_cosine = 0.99999\n")
    gates = tensor_gates(load_gate_config(strict))
    assert gates[5].min_cosine == 0.99999 and gates[5].max_mean_rel_mse == 0.004
    assert gates[4] == tensor_gates(load_gate_config())[4]
    broken = tmp_path / "broken.toml"
    broken.write_text("[tensor.5]\nmin_cosine = 'high'\n")
    with pytest.raises(InvalidOptionError, match=r"broken.toml: \[tensor.5\]: min_cosine"):
        load_gate_config(broken)


def test_disk_estimate_and_refusal(tmp_path, monkeypatch):
    rows = [{"file": "t.safetensors", "action": "quantize", "packed_bytes": 300, "key": "k1"},
            {"file": "t.safetensors", "action": "keep", "packed_bytes": 50, "key": None},
            {"file": "vae.safetensors", "action": "keep", "packed_bytes": 1000, "key": None}]
    files = {"t.safetensors": 2000, "vae.safetensors": 1000, "config.json": 10}
    # Staged files are consumed shard by shard: at most one shard's worth sits beside the artifact.
    assert estimate_disk(rows, files, set(), carried_are_linked=True) == DiskEstimate(350, 300, 300)
    assert estimate_disk(rows, files, set(), True, max_shard_bytes=100) == DiskEstimate(350, 300, 100)
    assert estimate_disk(rows, files, {"k1"}, carried_are_linked=False) == DiskEstimate(1360, 0, 0)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(InsufficientDiskError, match=r"need 67\.11 MB \(artifact 350 B \+ staged "
                                                    r"results .* but only 1\.00 MB is free"):
        check_disk(DiskEstimate(350, 300, 300), tmp_path / "out", tmp_path / "staging")


def test_groups_are_blocks_and_keys_follow_every_setting():
    row = {"file": TRANSFORMER_FILE, "action": "quantize", "component": "transformer",
           "tensor": "transformer_blocks.7.attn1.to_q.weight", "dtype": "BF16", "shape": [256, 256],
           "data_start": 8, "data_end": 8 + 2 * 256 * 256, "bits": 5}
    settings = {"policy": "ltx23", "group_size": None, "mode": "refined", "code_version": "v1",
                "on_nonfinite": "fail"}
    ids = {TRANSFORMER_FILE: "sha256:aa"}
    (job,) = plan_jobs([row], "/src", ids, "/staging", settings)
    assert isinstance(job, TensorJob) and job.file == f"/src/{TRANSFORMER_FILE}"
    assert group_of(job) == "transformer: transformer_blocks.7"
    changed = [plan_jobs([row], "/src", ids, "/staging", {**settings, name: value})[0].key
               for name, value in (("mode", "reference"), ("code_version", "v2"),
                                   ("policy", "generic"), ("group_size", 32))]
    changed.append(plan_jobs([{**row, "bits": 4}], "/src", ids, "/staging", settings)[0].key)
    changed.append(plan_jobs([row], "/src", {TRANSFORMER_FILE: "sha256:bb"}, "/staging", settings)[0].key)
    assert len({job.key, *changed}) == len(changed) + 1


# ---- the flow ----------------------------------------------------------------------------------


def test_flow_packages_a_diffusers_checkpoint(checkpoint, tmp_path, cluster):
    out = tmp_path / "artifact"
    summary = run_quantize(str(checkpoint), str(out), dask_address=cluster)

    assert verify_artifact(out) == []
    manifest = read_manifest(out)
    assert manifest["validation"]["validated"] is True
    assert manifest["validation"]["tensor_gates"]["passed"] is True
    card = (out / "README.md").read_text()
    assert "output gates skipped: the source is not a whole LTX-2 pipeline (lacks" in card
    assert f"Tensor gates **passed** on {2 * QUANTIZED_PER_LAYER} quantized tensors" in card
    assert str(tmp_path) not in card
    assert summary["quantized"] == 2 * QUANTIZED_PER_LAYER and summary["skipped"] == 0
    assert summary["prefect_tasks"] == 2            # one task run per transformer block
    assert 0.0 <= summary["overhead_fraction"] < 1.0 and summary["prefect_task_s"] >= 0
    assert len(json.dumps(summary)) < 20_000        # small: it is the flow's return value

    metrics = pq.read_table(tmp_path / "artifact.staging" / "metrics.parquet").to_pylist()
    assert len(metrics) == 2 * QUANTIZED_PER_LAYER
    assert len({row["worker"] for row in metrics}) == 2, "Dask spread single tensors over workers"
    assert all(row["cosine"] > 0.998 and row["seconds"] > 0 for row in metrics)
    assert "seconds" not in pq.read_table(out / "metrics.parquet").column_names

    source = load_file(checkpoint / TRANSFORMER_FILE)
    artifact = open_artifact(out)
    name = "transformer_blocks.1.ff.net.2.weight"
    packed = artifact.load_packed(f"transformer/{name}")
    expected = quantize_tensor(source[name], bits=5, mode="refined")
    assert torch.equal(packed.codes, expected.codes) and torch.equal(packed.scales, expected.scales)
    assert torch.equal(artifact.load_kept("transformer/proj_in.weight"), source["proj_in.weight"])
    assert not list((tmp_path / "artifact.staging").glob("*.safetensors")), "staging consumed"


def test_gate_failure_stops_before_packaging_and_the_rerun_skips_done_work(checkpoint, tmp_path,
                                                                           cluster):
    strict = tmp_path / "strict.toml"
    strict.write_text("[tensor.5]\nmin_cosine = 0.99999\n")
    out = tmp_path / "artifact"
    with pytest.raises(GateFailedError, match=r"transformer_blocks\.0\.attn1\.to_q\.weight \(5-bit\)"
                                              r": cosine 0\.99\d+ < min_cosine 0\.99999"):
        run_quantize(str(checkpoint), str(out), dask_address=cluster, gates_file=str(strict))
    assert not out.exists()

    summary = run_quantize(str(checkpoint), str(out), dask_address=cluster, gates=False,
                           gates_file=str(strict))
    assert summary["skipped"] == 2 * QUANTIZED_PER_LAYER
    manifest = read_manifest(out)
    assert manifest["validation"]["validated"] is False
    assert manifest["validation"]["tensor_gates"]["passed"] is False
    card = (out / "README.md").read_text()
    assert "**Not measured**: output gates skipped: --no-gates was given." in card
    assert "Tensor gates **failed**" in card and "not enforced (--no-gates)" in card
    assert "with the keys of `strict.toml`" in card and str(tmp_path) not in card


def test_generic_single_file(tmp_path, cluster):
    source = write_generic_file(tmp_path / "model" / "model.safetensors")
    out = tmp_path / "artifact"
    summary = run_quantize(str(source), str(out), dask_address=cluster, bits=4, mode="reference")
    assert summary["policy"] == "generic" and summary["quantized"] == 4
    manifest = read_manifest(out)
    assert manifest["quantization"]["bits"] == 4 and manifest["quantization"]["mode"] == "reference"
    assert manifest["tensors"]["model/embed_tokens.weight"]["action"] == "keep"
    assert verify_artifact(out) == []


def test_nonfinite_tensor_fails_naming_it_or_is_kept(checkpoint, tmp_path, cluster):
    source = tmp_path / "nan-ckpt"
    shutil.copytree(checkpoint, source)
    tensors = load_file(source / TRANSFORMER_FILE)
    name = "transformer_blocks.1.attn2.to_v.weight"
    tensors[name][3, 5] = float("nan")
    save_file(tensors, source / TRANSFORMER_FILE)

    with pytest.raises(NonFiniteTensorError, match=rf"tensor '{name}': 1 NaN/Inf .*--on-nonfinite keep"):
        run_quantize(str(source), str(tmp_path / "failed"), dask_address=cluster)

    out = tmp_path / "kept"
    summary = run_quantize(str(source), str(out), dask_address=cluster, on_nonfinite="keep")
    assert summary["kept_nonfinite"] == 1 and summary["quantized"] == 2 * QUANTIZED_PER_LAYER - 1
    entry = read_manifest(out)["tensors"][f"transformer/{name}"]
    assert entry["action"] == "keep" and "NaN" in entry["reason"]
    kept = open_artifact(out).load_kept(f"transformer/{name}")
    assert torch.equal(kept.view(torch.int16), tensors[name].view(torch.int16))   # bit-exact, NaN too


def test_disk_refusal_happens_before_any_work(checkpoint, tmp_path, cluster, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(InsufficientDiskError, match=r"need .* [kMG]?B \(artifact .* staged results .*\) but only"):
        run_quantize(str(checkpoint), str(tmp_path / "artifact"), dask_address=cluster)
    assert not list((tmp_path / "artifact.staging").glob("*.safetensors"))


def test_cli_rejects_bad_options_with_a_clear_message(tmp_path):
    from click.testing import CliRunner

    from hlwq.cli.commands.quantize import quantize

    result = CliRunner().invoke(quantize, ["x", "--out", str(tmp_path / "o"), "--mode", "fast"])
    assert result.exit_code == 2 and "'fast' is not one of 'refined', 'reference'" in result.output
    with pytest.raises(InvalidOptionError, match="--workers sizes a local cluster"):
        run_quantize("x", str(tmp_path / "o"), workers=2, dask_address="tcp://127.0.0.1:1")



def test_tiny_ltx23_single_file(tmp_path, cluster):
    from hlwq.testing.fixtures import make_tiny_ltx23

    source = make_tiny_ltx23(tmp_path / "tiny", single_file=True)
    # Like the real repo, the folder holds a second checkpoint of the same model.
    distilled = "ltx-2.3-tiny-distilled.safetensors"
    shutil.copyfile(source / "ltx-2.3-tiny.safetensors", source / distilled)
    out = tmp_path / "artifact"
    with pytest.raises(HLWQError, match=r"ltx-2.3-tiny-distilled.safetensors.*--files GLOB"):
        run_quantize(str(source), str(out), dask_address=cluster, gates=False)
    # --no-gates: the output gates (renders of the prompt suite) are tested with validation.
    summary = run_quantize(str(source), str(out), dask_address=cluster, gates=False,
                           exclude_files=["*distilled*"])
    manifest = read_manifest(out)
    assert distilled not in {f["path"] for f in manifest["source"]["files"]}
    assert not (out / distilled).exists()
    assert manifest["source"]["layout"] == "ltx23-single"
    assert summary["policy"] == "ltx23" and summary["quantized"] == manifest["sizes"]["quantized_tensors"] > 0
    assert summary["gates"]["passed"] is True                 # recorded even when not enforced
    assert verify_artifact(out) == []


def test_transient_io_error_is_retried_with_backoff(tmp_path, cluster):
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from hlwq.store.safetensors_io import read_header
    from hlwq.tasks.quantize import quantize_group

    source = write_generic_file(tmp_path / "model.safetensors")
    entry = read_header(source).tensors["layers.0.mlp.up.weight"]
    late = tmp_path / "mounted-late.safetensors"
    job = TensorJob(key="k" * 64, file=str(late), tensor=entry.name, component="model",
                    dtype=entry.dtype, shape=entry.shape, data_start=entry.start,
                    data_end=entry.end, bits=5, block_size=128, group_size=None, mode="refined",
                    staging_dir=str(tmp_path / "staging"))

    @flow(task_runner=DaskTaskRunner(address=cluster))
    def one_group() -> dict:
        threading.Timer(0.5, shutil.copyfile, (source, late)).start()   # the file comes back
        return quantize_group("model", [job])

    started = time.monotonic()
    (row,) = one_group()["rows"]
    assert row["cosine"] > 0.998 and not row["skipped"]
    assert time.monotonic() - started >= 2.0, "the first retry waits 2 s"


# The tiny fixture (seed 0), Q5, default policy and encoder, every shard of the artifact in
# path order. Pinned before the restructuring into store/ and the hlwq namespace, then again
# when shards began to record their quantized tensors (__metadata__["hlwq_quantized"]): with
# that one entry removed from each header, the old and new shards hash the same.
TINY_Q5_SHARDS_SHA256 = "9816453f2e57e2f1a10a4d2954527df475f7a60567b6c35c9c67f416a35cbf0b"


@pytest.mark.slow
def test_tiny_fixture_q5_shards_are_byte_identical_to_the_pinned_ones(tmp_path, cluster):
    import hashlib

    from hlwq.testing.fixtures import make_tiny_ltx23

    source = make_tiny_ltx23(tmp_path / "tiny")
    out = tmp_path / "artifact"
    run_quantize(str(source), str(out), dask_address=cluster, bits=5, gates=False)
    digest = hashlib.sha256()
    for shard in sorted(out.rglob("*.safetensors"), key=lambda p: str(p.relative_to(out))):
        digest.update(shard.read_bytes())
    assert digest.hexdigest() == TINY_Q5_SHARDS_SHA256
