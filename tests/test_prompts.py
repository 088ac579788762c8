"""Prompt files: the three formats, defaults, and every row rule with its row number."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hlwq.quant.errors import InvalidOptionError, PromptFileError
from hlwq.store.hash_cache import sha256_file
from hlwq.store.prompts import (
    DEFAULTS,
    LoraSpec,
    RenderRequest,
    load_prompts,
    lora_option,
    request_key,
)

GOOD = {"id": "cat", "prompt": "a cat on a sofa", "negative_prompt": "blurry", "seed": 7, "width": 64,
        "height": 32, "frames": 17, "fps": 12, "steps": 3, "guidance": 1.5}


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_jsonl_row_parses_with_all_columns(tmp_path):
    batch = load_prompts(write_jsonl(tmp_path / "p.jsonl", [GOOD]))
    assert batch.rejected == []
    (request,) = batch.requests
    assert request.to_dict() == {**GOOD, "fps": 12.0, "guidance": 1.5, "image": None, "loras": []}
    assert not request.image_to_video


def test_defaults_and_generated_ids(tmp_path):
    batch = load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, "", {"prompt": "b"}]))
    first, second = batch.requests
    assert (first.id, second.id) == ("row-0001", "row-0003")  # JSONL rows are line numbers
    assert {k: getattr(first, k) for k in DEFAULTS} == DEFAULTS


def test_csv_and_parquet_read_the_same_rows(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("id,prompt,seed,width,height,frames,fps,steps,guidance,negative_prompt\n"
                        "cat,a cat on a sofa,7,64,32,17,12,3,1.5,blurry\n"
                        "dog,a dog,,,,,,,,\n")
    parquet_path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"id": "dog", "prompt": "a dog"}]), parquet_path)
    from_csv, from_parquet = load_prompts(csv_path), load_prompts(parquet_path)
    assert from_csv.rejected == from_parquet.rejected == []
    assert from_csv.requests == from_parquet.requests
    assert from_csv.requests[1].width == DEFAULTS["width"]  # empty CSV cells take the default


def test_every_rule_rejects_its_row_and_keeps_the_rest(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "start.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [
        GOOD,                                                    # 1 ok
        {**GOOD, "id": "b", "colour": "red"},                    # 2 unknown column
        {**GOOD, "id": "c", "frames": 16},                       # 3 frames not 8k+1
        {**GOOD, "id": "d", "width": 100},                       # 4 width not multiple of 32
        {**GOOD, "id": "e", "height": 0},                        # 5 height too small
        {"id": "f", "negative_prompt": "x"},                     # 6 missing prompt
        {**GOOD, "id": "g", "prompt": "   "},                    # 7 blank prompt
        {**GOOD, "id": "h", "image": "missing.png"},             # 8 image missing
        {**GOOD, "id": "i", "image": "broken.png"},              # 9 image unreadable
        {**GOOD, "id": "j", "seed": -1},                         # 10 negative seed
        {**GOOD, "id": "k", "steps": 2.5},                       # 11 fractional steps
        {**GOOD, "id": "l", "guidance": "strong"},               # 12 not a number
        {**GOOD, "id": "cat"},                                   # 13 repeated id
        {**GOOD, "id": "../etc"},                                # 14 unsafe id
        "{not json",                                             # 15 bad JSON
        "[1, 2]",                                                # 16 not an object
        {**GOOD, "id": "m", "image": "start.png"},               # 17 ok, image-to-video
        {**GOOD, "id": "n", "fps": 0},                           # 18 fps must be > 0
    ]
    batch = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [r.id for r in batch.requests] == ["cat", "m"]
    assert batch.requests[1].image == str((tmp_path / "start.png").resolve())
    reasons = {r.row: str(r) for r in batch.rejected}
    expected = {
        2: "unknown column(s) 'colour'", 3: "frames must be 8k+1 (e.g. 9 or 17), got 16",
        4: "width must be a multiple of 32, got 100", 5: "height must be between 32 and 8192",
        6: "missing prompt", 7: "missing prompt", 8: "image 'missing.png' is not a readable image",
        9: "image 'broken.png' is not a readable image", 10: "seed must be between 0",
        11: "steps must be a whole number", 12: "guidance must be a number",
        13: "id 'cat' repeats an earlier row", 14: "is not a safe file name", 15: "not valid JSON",
        16: "expected a JSON object", 18: "fps must be a finite number > 0",
    }
    assert sorted(reasons) == sorted(expected)
    for row, text in expected.items():
        assert text in reasons[row] and reasons[row].startswith(f"row {row}")
    assert reasons[3] == "row 3 (c): frames must be 8k+1 (e.g. 9 or 17), got 16"


def test_csv_unknown_column_and_extra_values_are_row_errors(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,Prompt2\nfine,\nbad,oops\ntoo,,many\n")
    batch = load_prompts(path)
    assert [r.prompt for r in batch.requests] == ["fine"]
    assert [(r.row, r.reason.split(";")[0]) for r in batch.rejected] == [
        (2, "unknown column(s) 'Prompt2'"), (3, "1 more values than the header has columns")]


@pytest.mark.parametrize("name, content, message", [
    ("p.txt", "prompt\n", "unknown format '.txt'"),
    ("p.csv", "", "no header row"),
    ("p.parquet", "not parquet", "not a readable Parquet file"),
    ("p.jsonl", b"\xff\xfe\x00bad", "not UTF-8"),
])
def test_unreadable_files_raise_prompt_file_error(tmp_path, name, content, message):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(PromptFileError, match=message):
        load_prompts(path)
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")


def test_request_key_follows_parameters_image_bytes_and_model(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "start.png")
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {**GOOD, "id": "s2", "seed": 8},
                                              {**GOOD, "id": "i2v", "image": "start.png"}])
    first, reseeded, with_image = load_prompts(path).requests
    keys = {request_key(r, "model-a") for r in (first, reseeded, with_image)}
    assert len(keys) == 3
    assert request_key(first, "model-a") == request_key(load_prompts(path).requests[0], "model-a")
    assert request_key(first, "model-a") != request_key(first, "model-b")
    before = request_key(with_image, "model-a")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "start.png")
    assert request_key(with_image, "model-a") != before


def test_an_enormous_number_rejects_its_row_only(tmp_path):
    """5,000 digits: beyond what Python converts at all; the row is named, the batch goes on."""
    digits = "7" * 5000
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(f'{{"prompt": "a", "seed": {digits}}}\n{{"prompt": "b", "steps": {digits}.5}}\n'
                     '{"prompt": "c"}\n')
    csv = tmp_path / "p.csv"
    csv.write_text(f"prompt,seed\na,{digits}\nc,1\n")
    batch = load_prompts(jsonl)
    assert [r.reason for r in batch.rejected] == [
        "seed has 5000 characters; a number has at most 40",
        "steps must be a whole number, got inf"]      # a float literal that large is inf
    assert [r.prompt for r in batch.requests] == ["c"]
    batch = load_prompts(csv)
    assert [str(r) for r in batch.rejected] == ["row 1: seed has 5000 characters; a number has at most 40"]
    assert len(batch.requests) == 1


def write_lora(path, rank=2, scale=1.0):
    import torch
    from safetensors.torch import save_file

    save_file({"transformer.proj_in.lora_A.weight": torch.ones(rank, 8) * scale,
               "transformer.proj_in.lora_B.weight": torch.ones(4, rank)}, path)
    return path


def test_loras_column_defaults_and_csv(tmp_path):
    style, detail = write_lora(tmp_path / "style.safetensors"), write_lora(tmp_path / "d.safetensors", 3)
    (tmp_path / "sub").mkdir()
    rows = [{"id": "own", "prompt": "a", "loras": [{"path": "style.safetensors", "scale": 0.8},
                                                   {"path": str(detail)}]},
            {"id": "default", "prompt": "b"}, {"id": "none", "prompt": "c", "loras": []}]
    batch = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows),
                         default_loras=[{"path": str(detail), "scale": 0.5}])
    assert batch.rejected == []
    own, default, none = batch.requests
    assert own.loras == (LoraSpec(str(style.resolve()), sha256_file(style), 0.8),
                         LoraSpec(str(detail.resolve()), sha256_file(detail), 1.0))
    assert default.loras == (LoraSpec(str(detail.resolve()), sha256_file(detail), 0.5),)
    assert none.loras == ()
    # A request survives the trip through its dict (task parameters are JSON).
    assert RenderRequest(**json.loads(json.dumps(own.to_dict()))) == own

    csv_path = tmp_path / "sub" / "p.csv"
    csv_path.write_text('id,prompt,loras\nx,a cat,"[{""path"": ""../style.safetensors"", '
                        '""scale"": 0.8}]"\ny,a dog,\n')
    x, y = load_prompts(csv_path).requests
    assert x.loras == own.loras[:1] and y.loras == ()


def test_bad_loras_are_rejected_with_the_row(tmp_path):
    import torch

    write_lora(tmp_path / "ok.safetensors")
    torch.save({"a": torch.ones(1)}, tmp_path / "pickled.pt")
    (tmp_path / "notes.safetensors").write_text("hello")
    rows = [{"prompt": "a", "loras": [{"path": "absent.safetensors"}]},
            {"prompt": "a", "loras": [{"path": "pickled.pt"}]},
            {"prompt": "a", "loras": [{"path": "ok.safetensors", "scale": "much"}]},
            {"prompt": "a", "loras": {"path": "ok.safetensors"}},
            {"prompt": "a", "loras": [{"path": "ok.safetensors", "weight": 1}]},
            {"prompt": "a", "loras": [{"path": "ok.safetensors"}, {"path": "./ok.safetensors"}]},
            {"prompt": "a", "loras": [{"path": "notes.safetensors"}]}]
    batch = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert batch.requests == []
    reasons = [r.reason for r in batch.rejected]
    assert "loras[0]: LoRA file" in reasons[0] and "does not exist" in reasons[0]
    assert "pickled PyTorch file" in reasons[1]
    assert "loras[0].scale must be a number" in reasons[2]
    assert "loras must be a list" in reasons[3]
    assert "unknown key(s) 'weight'" in reasons[4]
    assert "loras[1]: './ok.safetensors' repeats an earlier LoRA" in reasons[5]
    assert "notes.safetensors" in reasons[6]
    with pytest.raises(InvalidOptionError, match="default LoRAs: loras\\[0\\]"):
        load_prompts(write_jsonl(tmp_path / "q.jsonl", [GOOD]),
                     default_loras=[{"path": str(tmp_path / "absent.safetensors")}])


def test_request_key_follows_each_loras_bytes_and_scale(tmp_path):
    import hashlib

    lora = write_lora(tmp_path / "l.safetensors")
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {**GOOD, "id": "l8", "loras": [
        {"path": "l.safetensors", "scale": 0.8}]}, {**GOOD, "id": "l4", "loras": [
        {"path": "l.safetensors", "scale": 0.4}]}])
    plain, strong, weak = load_prompts(path).requests
    # Renders without LoRAs keep the key they had before the column existed.
    legacy = {k: v for k, v in plain.to_dict().items() if k != "loras"}
    assert request_key(plain, "m") == hashlib.sha256(
        json.dumps({**legacy, "artifact_id": "m"}, sort_keys=True).encode()).hexdigest()
    assert len({request_key(r, "m") for r in (plain, strong, weak)}) == 3
    before = request_key(strong, "m")
    write_lora(lora, scale=2.0)                                  # same path, new bytes
    assert request_key(load_prompts(path).requests[1], "m") != before


def test_lora_option_text():
    assert lora_option("a/b.safetensors:0.8") == {"path": "a/b.safetensors", "scale": 0.8}
    assert lora_option("a/b.safetensors") == {"path": "a/b.safetensors", "scale": 1.0}
    assert lora_option("c:/x.safetensors") == {"path": "c:/x.safetensors", "scale": 1.0}
    with pytest.raises(InvalidOptionError, match="empty"):
        lora_option("")
