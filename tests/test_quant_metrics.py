"""Reconstruction metrics: float64 accumulation and the edge cases."""

import math

import pytest
import torch

from hlwq.quant.errors import InvalidTensorError
from hlwq.quant.metrics import tensor_metrics


def test_known_values():
    ref = torch.tensor([[3.0, 4.0]])
    approx = torch.tensor([[3.0, 3.0]])
    m = tensor_metrics(ref, approx)
    assert m["rel_mse"] == pytest.approx(1 / 25)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(25))
    assert m["max_abs_err"] == pytest.approx(1.0)
    assert m["cosine"] == pytest.approx(21 / (5 * math.sqrt(18)))


def test_identical_large_tensor_has_cosine_one_not_more():
    # A float32 sum over 16M elements can drift above 1; float64 must not.
    x = torch.rand(2048, 4096).bfloat16()
    m = tensor_metrics(x, x)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-12) and m["cosine"] <= 1.0 + 1e-15
    assert m["rel_mse"] == 0.0 and m["sqnr_db"] == math.inf and m["max_abs_err"] == 0.0


def test_zero_reference():
    zero = torch.zeros(2, 3)
    assert tensor_metrics(zero, zero)["cosine"] == 1.0
    m = tensor_metrics(zero, torch.ones(2, 3))
    assert m["rel_mse"] == math.inf and m["cosine"] == 0.0


def test_mixed_dtypes_are_compared_in_float64():
    ref = torch.randn(64, 64)
    m = tensor_metrics(ref, ref.bfloat16())
    assert 0 < m["rel_mse"] < 1e-4


def test_shape_mismatch():
    with pytest.raises(InvalidTensorError, match="shapes differ"):
        tensor_metrics(torch.zeros(2, 3), torch.zeros(3, 2))


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.float64, torch.float16)])
def test_matches_float64_torch_for_any_rank_and_dtype(shape, dtypes):
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(shape, generator=gen).to(dtypes[0])
    approx = (ref.float() + 0.1 * torch.randn(shape, generator=gen)).to(dtypes[1])
    r = ref.float().double()        # the kernel reads float32 / bfloat16 values
    a = approx.float().double()
    m = tensor_metrics(ref, approx)
    assert m["rel_mse"] == pytest.approx(float(((a - r) ** 2).sum() / (r * r).sum()), rel=1e-9)
    assert m["cosine"] == pytest.approx(float((a * r).sum() / (a.norm() * r.norm())), rel=1e-9)
    assert m["max_abs_err"] == pytest.approx(float((a - r).abs().max()), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [1 << 22, 3 * 200])   # one pass; 3 rows a pass, last one short
def test_packed_metrics_equal_metrics_of_the_whole_dequantized_weight(dtype, chunk, monkeypatch):
    from hlwq.quant import metrics
    from hlwq.quant.core import dequantize, quantize_tensor

    monkeypatch.setattr(metrics, "CHUNK_VALUES", chunk)
    weight = torch.randn(17, 200, generator=torch.Generator().manual_seed(3)).to(dtype)
    packed = quantize_tensor(weight, bits=5)
    assert metrics.packed_metrics(weight, packed) == tensor_metrics(weight, dequantize(packed))
    with pytest.raises(InvalidTensorError, match="shapes differ"):
        metrics.packed_metrics(weight[:3], packed)
