"""`hlwq bench formats`: each format's true bits per weight and round trip on small tensors,
GGUF through ggml's own code (skipped without the bench extra), and the command's JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from hlwq.quant import formats
from hlwq.quant import ggml as ggml_binding
from hlwq.quant.formats import FORMATS, bits_per_weight, e2m1, missing_dependency
from hlwq.cli.main import cli
from hlwq.quant.metrics import tensor_metrics
from hlwq.quant.sizes import packed_nbytes

ROWS, COLS = 8, 512
N = ROWS * COLS
GGUF_MISSING = missing_dependency(FORMATS["gguf-q4_k"])
HQQ_MISSING = missing_dependency(FORMATS["hqq-4bit-g64"])


def weight(rows=ROWS, cols=COLS, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


# Stored bytes of an (8, 512) weight: codes, every scale, codebooks.
EXPECTED_BYTES = {
    "hlwq-q3-b128": packed_nbytes((ROWS, COLS), 3),
    "hlwq-q5-b128": packed_nbytes((ROWS, COLS), 5),
    "hlwq-q4-g32": packed_nbytes((ROWS, COLS), 4, 128, 32),
    "fp8-e4m3-tensor": N + 4,                      # one fp32 scale
    "fp8-e4m3-row": N + 4 * ROWS,                  # fp32 per row
    "int8-row": N + 4 * ROWS,
    "int8-row-hadamard256": N + 4 * ROWS,
    "nvfp4": N // 2 + N // 16 + 4,                 # E2M1 + E4M3 per 16 + fp32 per tensor
    "mxfp4": N // 2 + N // 32,                     # E2M1 + E8M0 per 32
}
# Largest relative MSE each format may reach on Gaussian weights (measured well below).
ERROR_BOUND = {"hlwq-q3-b128": 0.04, "hlwq-q5-b128": 0.004, "hlwq-q4-g32": 0.01,
               "fp8-e4m3-tensor": 2e-3, "fp8-e4m3-row": 2e-3, "int8-row": 1e-4,
               "int8-row-hadamard256": 1e-4, "nvfp4": 0.015, "mxfp4": 0.03}


def test_bits_per_weight_count_every_stored_byte():
    assert packed_nbytes((ROWS, COLS), 5) == N * 5 // 8 + ROWS * 4 * 2 + 32 * 4
    w = weight()
    for name, nbytes in EXPECTED_BYTES.items():
        result = FORMATS[name].apply(w)
        assert result.nbytes == nbytes, name
        assert bits_per_weight(result.nbytes, w) == pytest.approx(8 * nbytes / N)
    assert bits_per_weight(EXPECTED_BYTES["nvfp4"], w) == pytest.approx(4.5 + 32 / N)
    assert bits_per_weight(EXPECTED_BYTES["mxfp4"], w) == 4.25


def test_padding_counts_its_bytes_but_not_its_values():
    w = weight(4, 300)                            # not a multiple of 16, 32 or 256
    for name in ("nvfp4", "mxfp4", "int8-row-hadamard256"):
        result = FORMATS[name].apply(w)
        assert result.weight.shape == w.shape
        assert tensor_metrics(w, result.weight)["rel_mse"] < ERROR_BOUND[name]
    assert FORMATS["nvfp4"].apply(w).nbytes == 4 * 304 // 2 + 4 * 304 // 16 + 4
    assert FORMATS["mxfp4"].apply(w).nbytes == 4 * 320 // 2 + 4 * 320 // 32
    assert FORMATS["int8-row-hadamard256"].apply(w).nbytes == 4 * 512 + 4 * 4


def test_round_trips_stay_within_their_error():
    w = weight()
    for name, bound in ERROR_BOUND.items():
        restored = FORMATS[name].apply(w).weight
        assert restored.dtype == torch.float32 and restored.shape == w.shape
        assert tensor_metrics(w, restored)["rel_mse"] < bound, name
    zeros = torch.zeros(4, 64)
    for name in ("fp8-e4m3-tensor", "fp8-e4m3-row", "int8-row", "nvfp4", "mxfp4"):
        assert torch.equal(FORMATS[name].apply(zeros).weight, zeros), name


def test_e2m1_rounds_to_nearest_ties_to_even_and_saturates():
    values = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.75, 0.3, -100.0])
    assert e2m1(values).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -1.0, 0.5, -6.0]


def test_fp4_formats_reproduce_values_on_their_grid():
    grid = torch.tensor(formats.E2M1_GRID)
    block = torch.cat([grid, -grid, grid, -grid]) / 8          # amax 0.75: scale 2^-3 exactly
    mx = block.repeat(2, 1)
    assert torch.equal(FORMATS["mxfp4"].apply(mx).weight, mx)
    nv = torch.cat([grid, -grid]).repeat(3, 2)                  # block amax 6 -> scale 1
    assert torch.equal(FORMATS["nvfp4"].apply(nv).weight, nv)


def test_int8_hadamard_spreads_an_outlier_column():
    w = weight()
    w[:, 7] *= 50                                               # one loud input column
    plain = tensor_metrics(w, FORMATS["int8-row"].apply(w).weight)["rel_mse"]
    rotated = tensor_metrics(w, FORMATS["int8-row-hadamard256"].apply(w).weight)["rel_mse"]
    assert rotated < plain / 3


@pytest.mark.skipif(HQQ_MISSING is not None, reason=str(HQQ_MISSING))
def test_hqq_4bit_g64_is_4_5_bits():
    w = weight()
    result = FORMATS["hqq-4bit-g64"].apply(w)
    assert result.nbytes == N // 2 + N // 64 * 4                # fp16 scale + zero per 64
    assert tensor_metrics(w, result.weight)["rel_mse"] < 0.012


@pytest.mark.skipif(GGUF_MISSING is not None, reason=str(GGUF_MISSING))
def test_gguf_formats_come_from_ggml():
    gguf = pytest.importorskip("gguf")
    w = weight(8, 1024)
    bits = {"gguf-q4_k": 4.5, "gguf-q5_k": 5.5, "gguf-q6_k": 6.5625, "gguf-q8_0": 8.5,
            "gguf-q4_0": 4.5, "gguf-q5_0": 5.5}
    for name, expected in bits.items():
        result = FORMATS[name].apply(w)
        assert bits_per_weight(result.nbytes, w) == expected, name
        assert tensor_metrics(w, result.weight)["rel_mse"] < 0.02, name
    # The simple types agree bit for bit with gguf-py's own (numpy) reference implementation.
    for name, kind in (("gguf-q4_0", "Q4_0"), ("gguf-q8_0", "Q8_0")):
        kind = gguf.GGMLQuantizationType[kind]
        ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind)
        assert torch.equal(FORMATS[name].apply(w).weight, torch.from_numpy(ref))


def test_missing_ggml_is_reported_with_the_extra_to_install(monkeypatch):
    monkeypatch.setattr(ggml_binding, "ggml_library_path", lambda: None)
    ggml_binding.ggml.cache_clear()
    try:
        reason = missing_dependency(FORMATS["gguf-q5_k"])
        assert "ggml" in reason and "pip install 'hlwq-pipeline[bench]'" in reason
        assert missing_dependency(FORMATS["nvfp4"]) is None
    finally:
        ggml_binding.ggml.cache_clear()


@pytest.fixture()
def checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(1)
    path = tmp_path / "model.safetensors"
    save_file({"layers.0.proj.weight": (torch.randn(256, 512, generator=gen) * 0.02).bfloat16(),
               "layers.0.proj.bias": torch.zeros(256).bfloat16(),
               "embed_tokens.weight": torch.randn(512, 256, generator=gen).bfloat16()},
              str(path))
    return path


def test_command_writes_the_formats_json_and_plot(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(ggml_binding, "ggml_library_path", lambda: None)
    ggml_binding.ggml.cache_clear()
    out = tmp_path / "formats.json"
    chosen = "hlwq-q5-b128,int8-row,nvfp4,gguf-q4_k"
    try:
        result = CliRunner().invoke(cli, ["bench", "formats", "--source", str(checkpoint),
                                          "--formats", chosen, "--rows", "64", "--no-output",
                                          "--no-equal-size", "--out", str(out)])
    finally:
        ggml_binding.ggml.cache_clear()
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [f["name"] for f in data["formats"]] == ["hlwq-q5-b128", "int8-row", "nvfp4"]
    for entry in data["formats"]:
        assert {"name", "bits_per_weight", "rel_mse_mean", "rel_mse_worst", "cosine_mean",
                "seconds"} <= set(entry)
        assert entry["tensors"] == 1 and entry["rel_mse_worst"] >= entry["rel_mse_mean"]
    assert data["formats"][0]["bits_per_weight"] == pytest.approx(
        8 * packed_nbytes((64, 512), 5) / (64 * 512))
    assert [s["name"] for s in data["skipped"]] == ["gguf-q4_k"]
    assert "gguf-q4_k" in result.output and "skipped" in result.output
    assert (tmp_path / "formats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_format_is_a_one_line_error():
    hlwq = Path(sys.executable).with_name("hlwq")
    run = subprocess.run([str(hlwq), "bench", "formats", "--formats", "gguf-q4_k_m"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(
        "InvalidOptionError: --formats gguf-q4_k_m: unknown; known: hlwq-q3-b128")
    assert "Traceback" not in run.stderr
