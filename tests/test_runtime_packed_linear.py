"""PackedLinear against F.linear with the dequantized weight, and its decoders against each other."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from hlwq.quant import dequant_into
from hlwq.quant.core import dequantize, quantize_tensor
from hlwq.quant.dequant_into import decode_rotated, decode_rotated_into
from hlwq.quant.errors import InvalidTensorError
from hlwq.runtime import packed_linear, triton_kernels
from hlwq.runtime.packed_linear import (
    DequantCache,
    PackedLinear,
    enable_dequant_cache,
    release_workspaces,
    workspace,
)

# (out, in, bits, block_size, group_size): padding (in not a multiple of B), groups, widths.
SHAPES = [
    (64, 256, 5, 128, None),
    (48, 300, 5, 128, None),
    (33, 200, 3, 64, 16),
    (16, 1000, 8, 256, 32),
    (40, 96, 4, 32, None),
    (24, 130, 6, 128, 8),
    (8, 64, 2, 32, 8),
]


def weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) / in_features ** 0.5


def rel_err(found: torch.Tensor, expected: torch.Tensor) -> float:
    found, expected = found.double(), expected.double()
    return float((found - expected).norm() / expected.norm())


@pytest.fixture(scope="module")
def layers():
    built = []
    for i, (out_f, in_f, bits, block, group) in enumerate(SHAPES):
        packed = quantize_tensor(weight(out_f, in_f, i), bits=bits, block_size=block,
                                 group_size=group)
        bias = torch.randn(out_f, generator=torch.Generator().manual_seed(100 + i))
        built.append((packed, bias))
    return built


@pytest.mark.parametrize("index", range(len(SHAPES)))
@pytest.mark.parametrize("lead", [(5,), (2, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear_with_dequantized_weight_fp32(layers, index, lead, with_bias):
    packed, bias = layers[index]
    bias = bias if with_bias else None
    layer = PackedLinear.from_packed(packed, bias=bias)
    x = torch.randn(*lead, packed.shape[1], generator=torch.Generator().manual_seed(index))
    expected = F.linear(x, dequantize(packed), bias)
    found = layer(x)
    assert found.shape == expected.shape and found.dtype == torch.float32
    assert rel_err(found, expected) < 1e-5
    assert float((found - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index", [0, 1, 3])
def test_half_precision_activations(layers, dtype, index):
    packed, bias = layers[index]
    layer = PackedLinear.from_packed(packed, bias=bias)
    x = torch.randn(3, 4, packed.shape[1], generator=torch.Generator().manual_seed(7)).to(dtype)
    expected = F.linear(x.float(), dequantize(packed), bias)
    found = layer(x)
    assert found.dtype == dtype
    # The same order of error as F.linear with the weight rounded to this dtype.
    rounded = F.linear(x, dequantize(packed, dtype), bias.to(dtype))
    assert rel_err(found, expected) < 2 * rel_err(rounded, expected) + 1e-3


def test_model_wide_cast_keeps_packed_buffers(layers):
    packed, bias = layers[1]
    layer = PackedLinear.from_packed(packed, bias=bias).to(torch.bfloat16)
    assert layer.codes.dtype == torch.uint8
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, packed.scales)
    assert layer.codebook.dtype == torch.float32 and torch.equal(layer.codebook, packed.codebook)
    assert layer.bias.dtype == torch.bfloat16


def test_holds_only_packed_state(layers):
    packed, bias = layers[0]
    layer = PackedLinear.from_packed(packed, bias=bias)
    layer(torch.randn(2, packed.shape[1]))
    assert set(layer.state_dict()) == {"codes", "scales", "codebook", "bias"}
    assert set(vars(layer)) & {"weight", "_weight"} == set()
    assert layer.codes.data_ptr() == packed.codes.data_ptr()   # wrapped, not copied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_chunks_match_one_pass(layers, monkeypatch, dtype):
    packed, bias = layers[1]                                   # 48 rows
    layer = PackedLinear.from_packed(packed, bias=bias)
    x = torch.randn(2, 3, packed.shape[1], generator=torch.Generator().manual_seed(3)).to(dtype)
    whole = layer(x)
    monkeypatch.setattr(packed_linear, "CHUNK_ELEMENTS", 10 * packed.in_padded)   # 5 passes
    chunked = layer(x)
    assert chunked.shape == whole.shape and torch.allclose(chunked, whole, rtol=1e-5, atol=1e-6)


def test_layers_share_one_reused_workspace(layers):
    release_workspaces()
    first = workspace((64, 256), torch.float32, torch.device("cpu"))
    second = workspace((48, 128), torch.float32, torch.device("cpu"))
    assert first.data_ptr() == second.data_ptr()


def test_cache_returns_same_output_and_stays_bounded(layers):
    model = torch.nn.Sequential(*(PackedLinear.from_packed(p) for p, _ in layers[:1] * 3))
    x = torch.randn(2, layers[0][0].shape[1])
    expected = [layer(x) for layer in model]
    one_layer = 64 * 256 * 4
    cache = enable_dequant_cache(model, max_bytes=2 * one_layer)
    for _ in range(2):
        for layer, want in zip(model, expected):
            assert torch.equal(layer(x), want)
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert enable_dequant_cache(model, 0) is None and all(m.cache is None for m in model)


def test_lru_evicts_least_recent():
    cache = DequantCache(max_bytes=3 * 4)
    for key in "abc":
        cache.put(key, torch.zeros(1))
    cache.get("a")
    cache.put("d", torch.zeros(1))
    assert cache.get("b") is None and cache.get("a") is not None


def test_typed_errors(layers):
    packed, _ = layers[0]
    layer = PackedLinear.from_packed(packed)
    with pytest.raises(InvalidTensorError, match="expected 256"):
        layer(torch.randn(2, 255))
    with pytest.raises(InvalidTensorError, match="bias shape"):
        PackedLinear.from_packed(packed, bias=torch.zeros(3))
    bad = type(packed)(packed.codes[:, :-1], packed.scales, packed.codebook, packed.shape,
                       packed.bits, packed.block_size, packed.group_size, packed.mode)
    with pytest.raises(InvalidTensorError, match="codes"):
        PackedLinear.from_packed(bad)


@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_numba_decoder_matches_portable_path(layers, index):
    packed, _ = layers[index]
    reference = decode_rotated(packed, 0.37)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.empty(packed.shape[0], packed.in_padded, dtype=dtype)
        assert torch.equal(decode_rotated_into(packed, out, 0.37), reference.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threaded_decode_equals_one_thread(dtype, monkeypatch):
    monkeypatch.setattr(dequant_into, "PARALLEL_MIN_VALUES", 1)
    packed = quantize_tensor(weight(37, 256))
    one, three = (torch.empty(37, 256, dtype=dtype) for _ in range(2))
    decode_rotated_into(packed, one, threads=1)
    decode_rotated_into(packed, three, threads=3)
    assert torch.equal(one, three)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_triton_kernel_in_interpreter_matches_cpu(layers, index, monkeypatch):
    # The interpreter runs the kernel on CPU tensors; on a GPU it is the same kernel compiled.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_kernels._decode_kernel.cache_clear()
    packed, _ = layers[index]
    reference = decode_rotated(packed, 0.37)
    try:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            out = torch.empty(packed.shape[0], packed.in_padded, dtype=dtype)
            found = triton_kernels.decode_rotated_into(packed, out, 0.37)
            if dtype == torch.bfloat16:
                # The interpreter truncates fp32 -> bf16 (GPUs round to nearest even): 1 ulp.
                assert torch.allclose(found.float(), reference, rtol=2 ** -7, atol=0)
            else:
                assert torch.equal(found, reference.to(dtype))
    finally:
        triton_kernels._decode_kernel.cache_clear()
