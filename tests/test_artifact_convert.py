"""Interchange with polarquant 0.6.0, checked against polarquant's own dequantizer.

polarquant (`polarengine_vllm`) is a dev dependency imported only here.
"""

import json

import pytest
import torch
from artifact_helpers import all_files, make_diffusers_source, quantize_source
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from hlwq.cli.commands.artifact import convert
from hlwq.quant.core import dequantize
from hlwq.quant.errors import InvalidOptionError
from hlwq.store.artifact import open_artifact, verify_artifact
from hlwq.store.convert import POLAR_CONFIG, from_polarquant, to_polarquant
from hlwq.store.package import package_artifact
from hlwq.tasks.sources import fetch_source

polar_packing = pytest.importorskip("polarengine_vllm.packing")
polar_converter = pytest.importorskip("polarengine_vllm.weight_converter")


def _artifact(tmp_path, bits, group_size=None, mode="reference"):
    source = make_diffusers_source(tmp_path / "src")
    (tmp_path / "staging").mkdir()
    fetched, inventory, staged, metrics = quantize_source(source, tmp_path / "staging", bits=bits,
                                                          group_size=group_size, mode=mode)
    out = tmp_path / f"art-q{bits}"
    package_artifact(fetched.root, inventory, staged, out, lineage=fetched.lineage,
                     quantization={"bits": bits}, metrics=metrics)
    return out


def polarquant_dequantized(model_dir) -> dict[str, torch.Tensor]:
    """Everything polarquant's vLLM weight converter yields for a polarquant folder."""
    config = json.loads((model_dir / POLAR_CONFIG).read_text())
    weights = []
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = handle.get_tensor(name)
                module = name.rsplit(".", 1)[0]
                meta = config["layers"].get(module, {})
                if name.endswith(".codes") and meta.get("packed_q5"):
                    tensor = polar_packing.unpack_codes_q5(tensor, meta["block_size"])
                elif name.endswith(".codes") and meta.get("packed"):
                    tensor = polar_packing.unpack_codes_half_block(tensor, meta["block_size"])
                weights.append((name, tensor))
    return dict(polar_converter.polar_dequant_iterator(iter(weights), str(model_dir)))


def _assert_polarquant_reads_like_us(artifact_dir, polar_dir):
    artifact = open_artifact(artifact_dir)
    theirs = polarquant_dequantized(polar_dir / "transformer")
    entries = artifact.component_entries("transformer")
    assert set(theirs) == set(entries)
    for name, entry in entries.items():
        if entry.quantized:
            ours = dequantize(artifact.load_packed(entry.key), dtype=torch.float32)
            assert theirs[name].dtype == torch.bfloat16
            # polarquant rounds to BF16; beyond that the two decoders agree
            torch.testing.assert_close(theirs[name].float(), ours, rtol=1 / 256, atol=1e-6)
        else:
            assert torch.equal(theirs[name], artifact.load_kept(entry.key))


@pytest.mark.parametrize("bits", [5, 4, 6])
def test_hlwq_to_polarquant_reads_back_with_polarquant(tmp_path, bits):
    art = _artifact(tmp_path, bits)
    to_polarquant(art, tmp_path / "polar")
    config = json.loads((tmp_path / "polar/transformer" / POLAR_CONFIG).read_text())
    layer = config["layers"]["transformer_blocks.0.attn1.to_k"]
    assert layer["in_features"] == 200 and layer["in_features_padded"] == 256
    assert config["format"] == ("polar_engine_v5" if bits == 5 else "polar_engine_v4")
    assert not (tmp_path / "polar/manifest.json").exists()
    _assert_polarquant_reads_like_us(art, tmp_path / "polar")


def test_round_trip_hlwq_polarquant_hlwq_is_bit_exact(tmp_path):
    art = _artifact(tmp_path, 5, mode="refined")        # refined scales and mode survive
    result = CliRunner().invoke(convert, [str(art), str(tmp_path / "polar")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(convert, [str(tmp_path / "polar"), str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    back = tmp_path / "back"
    assert verify_artifact(back) == []
    original, converted = open_artifact(art), open_artifact(back)
    assert set(original.tensor_entries) == set(converted.tensor_entries)
    for key, entry in original.tensor_entries.items():
        if entry.quantized:
            a, b = original.load_packed(key), converted.load_packed(key)
            assert (a.shape, a.bits, a.mode, a.group_size) == (b.shape, b.bits, b.mode, b.group_size)
            for part in ("codes", "scales", "codebook"):
                assert torch.equal(getattr(a, part), getattr(b, part)), (key, part)
    shard = "transformer/diffusion_pytorch_model.safetensors"
    assert all_files(art)[shard] == all_files(back)[shard]
    assert json.loads((back / "manifest.json").read_text())["validation"]["validated"] is False


def test_checkpoint_in_polarquant_layout_converts_to_hlwq(tmp_path):
    """A folder laid out the way polarquant's quantize_model writes one: unpacked codes packed
    by polarquant's own packers, norms, ct_scaled, polar_config.json. (Codes come from our
    reference encoder, which matches polarquant's: importing its quantizer costs 5 s.)"""
    from hlwq.quant.core import quantize_tensor
    from hlwq.quant.packing import unpack_codes

    generator = torch.Generator().manual_seed(3)
    weights = {"layers.0.mlp.up.weight": (torch.randn(32, 384, generator=generator), 5),
               "layers.0.attn.q.weight": (torch.randn(16, 250, generator=generator), 4)}
    tensors, layers = {"layers.0.norm.weight": torch.ones(384, dtype=torch.float16)}, {}
    for name, (weight, bits) in weights.items():
        packed = quantize_tensor(weight, bits=bits, mode="reference")
        codes = unpack_codes(packed.codes, bits, packed.in_padded).to(torch.int8)
        module = name.removesuffix(".weight")
        packer = polar_packing.pack_codes_q5 if bits == 5 else polar_packing.pack_codes_half_block
        tensors[f"{module}.codes"] = packer(codes, 128)
        tensors[f"{module}.norms"] = packed.scales
        tensors[f"{module}.ct_scaled"] = packed.codebook / 128 ** 0.5
        out, in_features = weight.shape
        layers[module] = {"in_features": in_features, "out_features": out,
                          "in_features_padded": -(-in_features // 128) * 128,
                          "n_blocks": -(-in_features // 128), "bits": bits, "block_size": 128,
                          "packed": bits <= 4, "scale_dtype": "float16",
                          **({"packed_q5": True} if bits == 5 else {})}
    polar = tmp_path / "polar"
    polar.mkdir()
    save_file(tensors, polar / "model.safetensors")
    (polar / POLAR_CONFIG).write_text(json.dumps(
        {"format": "polar_engine_v5", "quantization": "polarengine", "block_size": 128,
         "bit_assignment": {}, "layers": layers}))
    (polar / "config.json").write_text("{}")
    summary = from_polarquant(polar, tmp_path / "hlwq",
                              source_lineage=fetch_source(str(polar)).lineage)
    assert summary["quantized_tensors"] == 2
    artifact = open_artifact(tmp_path / "hlwq")
    theirs = polarquant_dequantized(polar)
    for name in weights:
        entry = next(e for e in artifact.tensor_entries.values() if e.name == name)
        ours = dequantize(artifact.load_packed(entry.key), dtype=torch.float32)
        assert entry.mode == "reference"
        torch.testing.assert_close(theirs[name].float(), ours, rtol=1 / 256, atol=1e-6)
    assert (tmp_path / "hlwq/config.json").is_file()
    assert not (tmp_path / "hlwq" / POLAR_CONFIG).exists()


def test_scale_groups_smaller_than_the_block_cannot_become_polarquant(tmp_path):
    art = _artifact(tmp_path, 5, group_size=32, mode="refined")
    with pytest.raises(InvalidOptionError, match="group_size 32 < block_size 128"):
        to_polarquant(art, tmp_path / "polar")
    assert not (tmp_path / "polar").exists()
