import json
import logging
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from hlwq.quant.errors import CorruptCheckpointError, SourceError
from hlwq.quant.sizes import packed_nbytes
from hlwq.store.inventory import (
    INVENTORY_SCHEMA,
    build_inventory,
    component_of,
    default_policy_for,
    detect_layout,
    save_inventory,
)
from hlwq.store.policy import load_policy
from hlwq.store.safetensors_io import read_header
from hlwq.tasks.plan import inventory_task

OFFICIAL = "model.diffusion_model."
BLOCK = "transformer_blocks.0."


def save(path, shapes: dict, metadata=None, dtype=torch.bfloat16):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}, str(path),
              metadata=metadata)
    return path


def official_single_file(path, metadata=None):
    return save(path, {
        f"{OFFICIAL}{BLOCK}attn1.to_q.weight": (128, 128),
        f"{OFFICIAL}{BLOCK}attn1.to_q.bias": (128,),
        f"{OFFICIAL}{BLOCK}ff.net.2.weight": (128, 512),
        f"{OFFICIAL}patchify_proj.weight": (128, 128),
        f"{OFFICIAL}video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight": (64, 64),
        "vae.decoder.conv_in.conv.weight": (8, 8, 3, 3, 3),
        "audio_vae.decoder.conv_in.weight": (8, 8, 3, 3),
        "vocoder.conv_pre.weight": (8, 8, 7),
    }, metadata=metadata)


def diffusers_folder(root):
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "LTX2Pipeline"}))
    transformer = root / "transformer"
    save(transformer / "diffusion_pytorch_model-00001-of-00002.safetensors",
         {f"{BLOCK}attn1.to_q.weight": (128, 128), f"{BLOCK}attn1.to_q.bias": (128,)})
    save(transformer / "diffusion_pytorch_model-00002-of-00002.safetensors",
         {f"{BLOCK}ff.net.0.proj.weight": (512, 128)})
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {f"{BLOCK}attn1.to_q.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
                        f"{BLOCK}attn1.to_q.bias": "diffusion_pytorch_model-00001-of-00002.safetensors",
                        f"{BLOCK}ff.net.0.proj.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    save(root / "vae" / "diffusion_pytorch_model.safetensors", {"decoder.conv_in.conv.weight": (8, 8, 3, 3, 3)})
    save(root / "text_encoder" / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": (256, 256)})
    return root


def test_detect_layouts(tmp_path, caplog):
    assert detect_layout(official_single_file(tmp_path / "ltx-2.3.safetensors")) == "ltx23-single"
    config_only = save(tmp_path / "cfg" / "x.safetensors", {"w": (2, 2)},
                       metadata={"config": json.dumps({"transformer": {}, "vae": {}})})
    assert detect_layout(config_only.parent) == "ltx23-single"
    assert detect_layout(diffusers_folder(tmp_path / "pipe")) == "diffusers"
    other = save(tmp_path / "gpt" / "model.safetensors", {"h.0.mlp.weight": (4, 4)})
    with caplog.at_level(logging.WARNING, logger="hlwq.store.inventory"):
        assert detect_layout(other) == "generic"
    assert "layout not recognised" in caplog.text and "generic" in caplog.text


def test_components():
    assert component_of("diffusers", "audio_vae/diffusion_pytorch_model.safetensors", "x") == "audio_vae"
    single = "ltx-2.3-22b-dev.safetensors"
    assert component_of("ltx23-single", single, f"{OFFICIAL}{BLOCK}attn1.to_q.weight") == "transformer"
    assert component_of("ltx23-single", single,
                        f"{OFFICIAL}audio_embeddings_connector.learnable_registers") == "connectors"
    assert component_of("ltx23-single", single, "vocoder.conv_post.weight") == "vocoder"
    assert component_of("ltx23-single", "ltx-2.3-spatial-upscaler-x2-1.0.safetensors",
                        "res_blocks.0.conv1.weight") == "latent_upsampler"
    assert component_of("generic", "model.safetensors", "h.0.weight") == "model"
    assert component_of("ltx23-single", "text_encoder/model.safetensors", "model.x") == "text_encoder"
    assert (default_policy_for("generic"), default_policy_for("diffusers")) == ("generic", "ltx23")


def test_inventory_of_official_single_file(tmp_path):
    path = official_single_file(tmp_path / "ckpt" / "ltx-2.3.safetensors")
    table = build_inventory(path, load_policy("ltx23"))
    assert table.schema.equals(INVENTORY_SCHEMA)
    assert table.schema.metadata[b"layout"] == b"ltx23-single"
    rows = {row["tensor"]: row for row in table.to_pylist()}
    header = read_header(path)
    for name, row in rows.items():
        entry = header.tensors[name]
        assert row["file"] == "ltx-2.3.safetensors"
        assert (row["data_start"], row["data_end"]) == (entry.start, entry.end)
        assert row["shape"] == list(entry.shape) and row["numel"] == entry.numel
    q = rows[f"{OFFICIAL}{BLOCK}attn1.to_q.weight"]
    assert (q["component"], q["action"], q["bits"]) == ("transformer", "quantize", 5)
    assert q["packed_bytes"] == packed_nbytes((128, 128), 5) and q["original_bytes"] == 128 * 128 * 2
    ff = rows[f"{OFFICIAL}{BLOCK}ff.net.2.weight"]
    assert ff["action"] == "quantize"
    bias = rows[f"{OFFICIAL}{BLOCK}attn1.to_q.bias"]
    assert (bias["action"], bias["bits"], bias["reason"]) == ("keep", None, "bias")
    assert bias["packed_bytes"] == bias["original_bytes"] == 256
    assert rows["vae.decoder.conv_in.conv.weight"]["component"] == "vae"
    connector = rows[f"{OFFICIAL}video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight"]
    assert (connector["component"], connector["action"]) == ("connectors", "keep")
    assert table.column("action").to_pylist().count("quantize") == 2


def test_inventory_of_diffusers_folder(tmp_path):
    root = diffusers_folder(tmp_path / "pipe")
    table = build_inventory(root, "ltx23")
    by_tensor = {row["tensor"]: row for row in table.to_pylist()}
    ff = by_tensor[f"{BLOCK}ff.net.0.proj.weight"]
    assert ff["file"] == "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
    assert (ff["component"], ff["action"]) == ("transformer", "quantize")
    assert set(table.column("component").to_pylist()) == {"transformer", "vae", "text_encoder"}
    text = by_tensor["model.layers.0.mlp.up_proj.weight"]
    assert text["action"] == "keep" and text["reason"].startswith("text_encoder:")
    generic = build_inventory(root, load_policy("generic"))
    assert {row["tensor"] for row in generic.to_pylist() if row["action"] == "quantize"} == \
        {"model.layers.0.mlp.up_proj.weight", f"{BLOCK}ff.net.0.proj.weight"}   # >= 65,536 elements


def test_inventory_reads_headers_only(tmp_path):
    """A 64 GB tensor (more than RAM) in a sparse file: only its header is ever read."""
    path = tmp_path / "huge.safetensors"
    rows, cols = 1 << 17, 1 << 18
    header = json.dumps({"layer.weight": {"dtype": "BF16", "shape": [rows, cols],
                               "data_offsets": [0, rows * cols * 2]}}).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + rows * cols * 2)
    table = build_inventory(path, "generic")
    assert table.column("original_bytes").to_pylist() == [rows * cols * 2]
    assert table.column("packed_bytes").to_pylist() == [packed_nbytes((rows, cols), 5)]


def test_save_inventory_is_parquet_and_atomic(tmp_path):
    table = build_inventory(official_single_file(tmp_path / "a.safetensors"), "ltx23")
    out = save_inventory(table, tmp_path / "run" / "inventory.parquet")
    assert pq.read_table(out).equals(table)
    assert [p.name for p in out.parent.iterdir()] == ["inventory.parquet"]


def test_inventory_task_returns_small_summary(tmp_path):
    source = official_single_file(tmp_path / "a.safetensors")
    out = tmp_path / "inventory.parquet"
    summary = inventory_task.fn(str(source), str(out), policy="ltx23", bits=4)
    assert summary["layout"] == "ltx23-single" and summary["quantized_tensors"] == 2
    assert summary["tensors"] == 8 and out.is_file()
    assert json.loads(json.dumps(summary)) == summary
    assert pq.read_table(out).column("bits").to_pylist().count(4) == 2


def test_bad_inputs(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        build_inventory(tmp_path / "missing", "ltx23")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .safetensors files"):
        build_inventory(tmp_path / "empty", "ltx23")
    save(tmp_path / "two" / "dev.safetensors", {"model.diffusion_model.x": (2,)})
    save(tmp_path / "two" / "distilled.safetensors", {"model.diffusion_model.x": (2,)})
    with pytest.raises(CorruptCheckpointError, match="dev.safetensors.*distilled.safetensors"):
        build_inventory(tmp_path / "two", "ltx23")


def test_empty_inventory_keeps_schema(tmp_path):
    save(tmp_path / "e.safetensors", {})
    table = build_inventory(tmp_path / "e.safetensors", "generic")
    assert table.num_rows == 0 and table.schema.equals(INVENTORY_SCHEMA)
    assert isinstance(table, pa.Table)
