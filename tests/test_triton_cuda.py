"""The Triton decode kernel compiled for CUDA (skipped without a GPU; run by the GPU check,
benchmarks/gpu_check.py): the same values as the CPU decoder, and PackedLinear on CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from hlwq.quant.core import dequantize, quantize_tensor
from hlwq.quant.dequant_into import decode_rotated
from hlwq.runtime import triton_kernels
from hlwq.runtime.packed_linear import PackedLinear

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs a CUDA device and triton")


@pytest.mark.parametrize("shape, bits", [((256, 512), 5), ((300, 200), 4), ((64, 4096), 3)])
def test_triton_on_cuda_matches_the_cpu_decoder(shape, bits):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    packed = quantize_tensor(weight, bits=bits, block_size=128, mode="reference", name="w")
    reference = decode_rotated(packed, 0.37)
    on_gpu = PackedLinear.from_packed(packed).to("cuda").packed
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = torch.empty(shape[0], reference.shape[1], dtype=dtype, device="cuda")
        found = triton_kernels.decode_rotated_into(on_gpu, out, 0.37)
        assert torch.equal(found.cpu(), reference.to(dtype)), dtype


def test_packed_linear_on_cuda_equals_dense():
    weight = torch.randn(384, 1024, generator=torch.Generator().manual_seed(1))
    packed = quantize_tensor(weight, bits=5, block_size=128, mode="reference", name="w")
    layer = PackedLinear.from_packed(packed).to("cuda")
    x = torch.randn(2, 77, 1024, device="cuda")
    expected = F.linear(x, dequantize(packed).to("cuda"))
    assert torch.allclose(layer(x), expected, rtol=1e-4, atol=1e-4)
    assert layer.codes.dtype == torch.uint8 and layer(x.bfloat16()).dtype == torch.bfloat16
