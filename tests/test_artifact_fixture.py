"""The tiny LTX-2.3 fixture in the official single-file layout: package, verify, export, load."""

import pytest
import torch
from artifact_helpers import POLICY_TOML, package_source

from hlwq.quant.core import dequantize
from hlwq.store.artifact import open_artifact, verify_artifact
from hlwq.store.export import export_dequantized
from hlwq.store.safetensors_io import read_header, read_tensor

pytestmark = pytest.mark.slow


def test_tiny_single_file_fixture_round_trip(tmp_path):
    from hlwq.testing.fixtures import load_tiny_pipeline, make_tiny_ltx23

    source = make_tiny_ltx23(tmp_path / "tiny", single_file=True)
    (tmp_path / "staging").mkdir()
    policy = tmp_path / "block0.toml"       # block 0's linears: enough, and half the time
    policy.write_text(POLICY_TOML.replace("re:.*\\.weight", "re:.*transformer_blocks\\.0\\..*\\.weight"))
    art = package_source(source, tmp_path / "art", tmp_path / "staging", policy=str(policy))
    assert verify_artifact(art) == []
    artifact = open_artifact(art)
    assert artifact.layout == "ltx23-single"
    quantized = [e for e in artifact.tensor_entries.values() if e.quantized]
    assert quantized and all(e.name.startswith("model.diffusion_model.") for e in quantized)
    carried = {"text_encoder/model.safetensors", "tokenizer/tokenizer.json",
               "scheduler/scheduler_config.json", "ltx-2.3-spatial-upscaler-x2-tiny.safetensors"}
    assert carried <= set(artifact.manifest["files"])

    export_dequantized(art, tmp_path / "bf16")
    exported = tmp_path / "bf16" / "ltx-2.3-tiny.safetensors"
    header = read_header(exported)
    assert header.metadata["config"] == read_header(source / "ltx-2.3-tiny.safetensors").metadata["config"]
    for entry in quantized[:8]:
        weight = read_tensor(exported, header.tensors[entry.name])
        expected = dequantize(artifact.load_packed(entry.key), dtype=weight.dtype)
        assert torch.equal(weight, expected), entry.name
    pipeline = load_tiny_pipeline(tmp_path / "bf16")       # a standard checkpoint again
    assert pipeline.transformer is not None
