import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from hlwq.quant.errors import CorruptCheckpointError, SourceError
from hlwq.store.safetensors_io import (
    StagingReader,
    iter_safetensors_files,
    read_header,
    read_headers,
    read_tensor,
)


def write_raw(path, header, data=b"", header_len=None):
    """A safetensors file written by hand: header may be a dict or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def save(path, shapes: dict, dtype=torch.bfloat16):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}, str(path))
    return path


def test_header_has_absolute_offsets_and_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(3, 5, dtype=torch.bfloat16), "b": torch.ones(5)}, str(path),
              metadata={"config": "{}"})
    header = read_header(path)
    raw = path.read_bytes()
    data_offset = 8 + struct.unpack("<Q", raw[:8])[0]
    assert header.metadata == {"config": "{}"}
    w = header.tensors["w"]
    assert (w.dtype, w.shape, w.numel, w.nbytes) == ("BF16", (3, 5), 15, 30)
    assert w.start >= data_offset and w.end <= len(raw)
    assert raw[w.start:w.end] == raw_bytes(torch.ones(3, 5, dtype=torch.bfloat16))


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn]


def test_read_tensor_is_byte_exact_against_safetensors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(DTYPES):
        values = torch.randn(7, 3, generator=generator) * 50
        tensors[f"t{i}"] = values.to(dtype)
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    reference = load_file(str(path))
    for name, entry in read_header(path).tensors.items():
        ours = read_tensor(path, entry)
        assert ours.dtype == reference[name].dtype and ours.shape == reference[name].shape
        assert raw_bytes(ours) == raw_bytes(reference[name]), name


def raw_bytes(tensor):
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_read_tensor_of_truncated_file_names_tensor(tmp_path):
    path = save(tmp_path / "a.safetensors", {"w": (64, 64)})
    entry = read_header(path).tensors["w"]
    path.write_bytes(path.read_bytes()[:entry.start + 10])
    with pytest.raises(CorruptCheckpointError, match="'w'.*file ends"):
        read_tensor(path, entry)


@pytest.mark.parametrize("direct", [True, False])
def test_staging_reader_reads_tensors_of_several_files_byte_exact(tmp_path, direct):
    """Whole pages around each tensor, close tensors in one run, a bigger set in a bigger
    buffer; the same bytes directly (past the page cache) and through it."""
    torch.manual_seed(0)
    tensors = [{"a": torch.randn(3000).to(torch.bfloat16), "b": torch.randn(7, 5),
                "gap": torch.zeros(600_000), "c": torch.randn(2, 3).to(torch.bfloat16)},
               {"d": torch.randn(4096 * 3 + 1).to(torch.bfloat16), "e": torch.zeros(0)}]
    places = []
    for number, part in enumerate(tensors):
        path = tmp_path / f"m{number}.safetensors"
        save_file(part, str(path))
        places += [(path, e) for name, e in read_header(path).tensors.items() if name != "gap"]
    reader = StagingReader(direct)
    for some in (places[:2], places):
        staged = reader.read(some)
        assert set(staged) == {e.name for _, e in some}
        for _, e in some:
            want = next(part[e.name] for part in tensors if e.name in part)
            assert bytes(staged[e.name]) == raw_bytes(want), e.name
    assert len(reader._runs(places)) == 3         # a, b and c are one run; the gap is 2.4 MB
    assert all(lo % StagingReader.PAGE == 0 == hi % StagingReader.PAGE
               for _, lo, hi, _ in reader._runs(places))


def test_staging_reader_reads_through_the_cache_where_direct_reads_are_refused(tmp_path,
                                                                              monkeypatch):
    import errno
    import os

    path = save(tmp_path / "a.safetensors", {"w": (64, 64)}, dtype=torch.float32)
    place = (path, read_header(path).tensors["w"])
    opened = []
    real_open = os.open

    def refusing_open(name, flags, *args):
        opened.append(flags)
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    assert bytes(StagingReader().read([place])["w"]) == bytes(64 * 64 * 4)
    assert len(opened) == (2 if hasattr(os, "O_DIRECT") else 1)


def test_staging_reader_of_a_truncated_file_names_the_tensor(tmp_path):
    path = save(tmp_path / "a.safetensors", {"w": (64, 64)})
    place = (path, read_header(path).tensors["w"])
    path.write_bytes(path.read_bytes()[:place[1].start + 10])
    with pytest.raises(CorruptCheckpointError, match="a.safetensors: tensor 'w' needs bytes"
                                                     ".*file ends at"):
        StagingReader().read([place])


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


CORRUPT = {
    "short file": (lambda p: p.write_bytes(b"\x01\x02"), "shorter than the 8-byte"),
    "header longer than file": (lambda p: write_raw(p, {}, header_len=10**18), "exceeds file size"),
    "not json": (lambda p: write_raw(p, b"{not json"), "not valid JSON"),
    "not utf-8": (lambda p: write_raw(p, b"\xff\xfe"), "not valid JSON"),
    "json array": (lambda p: write_raw(p, [1, 2]), "list, not an object"),
    "duplicate key": (lambda p: write_raw(
        p, b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
           b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"x"), "duplicate keys"),
    "unknown dtype": (lambda p: write_raw(p, {"w": entry("F12", [2], 0, 4)}, b"1234"), "unknown dtype"),
    "bad shape": (lambda p: write_raw(p, {"w": entry("U8", [-1], 0, 1)}, b"1"), "shape"),
    "bad offsets": (lambda p: write_raw(p, {"w": {"dtype": "U8", "shape": [1]}}, b"1"), "data_offsets"),
    "reversed offsets": (lambda p: write_raw(p, {"w": entry("U8", [0], 4, 0)}, b"1234"), "begin <= end"),
    "shape/offset mismatch": (lambda p: write_raw(p, {"w": entry("F32", [2], 0, 4)}, b"1234"),
                              "span 4 bytes but shape \\[2\\] of F32 needs 8"),
    "overlap": (lambda p: write_raw(p, {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)},
                                    b"123456"), "'b'.*overlap tensor 'a'"),
    "past the end": (lambda p: write_raw(p, {"w": entry("U8", [8], 0, 8)}, b"1234"),
                     "'w' ends at data offset 8, past the end"),
    "gap": (lambda p: write_raw(p, {"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 4, 6)},
                                b"123456"), "gap of 2 bytes before tensor 'b'"),
    "trailing bytes": (lambda p: write_raw(p, {"w": entry("U8", [2], 0, 2)}, b"1234"),
                       "2 bytes after the last tensor"),
    "bad metadata": (lambda p: write_raw(p, {"__metadata__": {"n": 1}}), "__metadata__"),
    "entry not object": (lambda p: write_raw(p, {"w": [1]}), "'w': entry is not an object"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_headers_raise_naming_file_and_rule(tmp_path, case):
    make, rule = CORRUPT[case]
    path = tmp_path / "bad-shard.safetensors"
    make(path)
    with pytest.raises(CorruptCheckpointError, match=rule) as info:
        read_header(path)
    assert "bad-shard.safetensors" in str(info.value)


def test_missing_file_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        read_header(tmp_path / "nope.safetensors")


def test_iter_single_file_and_folder_tree(tmp_path):
    single = save(tmp_path / "one" / "model.safetensors", {"w": (2, 2)})
    assert list(iter_safetensors_files(single)) == [single]
    save(tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors", {"w": (2, 2)})
    save(tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors", {"w": (2, 2)})
    save(tmp_path / "pipe" / ".cache" / "junk.safetensors", {"w": (2, 2)})
    found = [p.relative_to(tmp_path / "pipe").as_posix() for p in iter_safetensors_files(tmp_path / "pipe")]
    assert found == ["transformer/diffusion_pytorch_model.safetensors",
                     "vae/diffusion_pytorch_model.safetensors"]


def write_sharded(folder, shards: dict):
    """shards: file name -> {tensor: shape}; writes the shards and their index."""
    weight_map = {}
    for file, shapes in shards.items():
        save(folder / file, shapes)
        weight_map.update(dict.fromkeys(shapes, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_index_lists_exactly_its_shards(tmp_path):
    write_sharded(tmp_path, {"m-00001.safetensors": {"a": (2,)}, "m-00002.safetensors": {"b": (2,)}})
    save(tmp_path / "stray-variant.safetensors", {"a": (2,)})   # not in the index: ignored
    names = [p.name for p in iter_safetensors_files(tmp_path)]
    assert names == ["m-00001.safetensors", "m-00002.safetensors"]
    index = tmp_path / "model.safetensors.index.json"
    assert [p.name for p in iter_safetensors_files(index)] == names


def test_index_errors(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(CorruptCheckpointError, match="missing.safetensors.*does not exist"):
        list(iter_safetensors_files(tmp_path))
    index.write_text("[]")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.index.json.*weight_map"):
        list(iter_safetensors_files(tmp_path))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(SourceError, match="nowhere.*does not exist"):
        list(iter_safetensors_files(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="no .safetensors files"):
        list(iter_safetensors_files(tmp_path))
    with pytest.raises(SourceError, match="not a .safetensors file"):
        list(iter_safetensors_files(tmp_path / "notes.txt"))


def test_duplicate_tensor_across_shards_names_both_files(tmp_path):
    write_sharded(tmp_path, {"m-00001.safetensors": {"a": (2,), "x": (2,)},
                             "m-00002.safetensors": {"b": (2,)}})
    save(tmp_path / "m-00002.safetensors", {"b": (2,), "x": (2,)})   # x now in both shards
    with pytest.raises(CorruptCheckpointError, match="'x'.*m-00001.safetensors.*m-00002.safetensors"):
        read_headers(iter_safetensors_files(tmp_path))


def test_same_name_in_two_components_is_fine(tmp_path):
    save(tmp_path / "vae" / "m.safetensors", {"conv.weight": (2,)})
    save(tmp_path / "vocoder" / "m.safetensors", {"conv.weight": (2,)})
    assert len(read_headers(iter_safetensors_files(tmp_path))) == 2
