"""Bit packing: exact inverse pairs at 2..8 bits, the reference's Q5 byte layout."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from polarengine_vllm.packing import pack_codes_q5, unpack_codes_q5

from hlwq.quant.errors import InvalidOptionError, InvalidTensorError
from hlwq.quant.packing import pack_codes, packed_row_bytes, unpack_codes


def test_q5_layout_is_byte_identical_to_reference():
    codes = torch.randint(0, 32, (9, 384), dtype=torch.uint8)
    packed = pack_codes(codes, 5)
    assert torch.equal(packed, pack_codes_q5(codes.to(torch.int8)))
    assert torch.equal(unpack_codes_q5(packed).to(torch.uint8), codes)
    assert packed.shape == (9, 384 * 5 // 8)


def test_lsb_first_bit_stream():
    codes = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    # 3-bit codes 1, 2, 3 -> bits 001 | 010 << 3 | 011 << 6 = 0b11010001, then 0b0 ...
    assert pack_codes(codes, 3).tolist() == [[0b11010001, 0b00000000, 0]]
    assert pack_codes(codes, 8).tolist() == [[1, 2, 3, 0, 0, 0, 0, 0]]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 4), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_round_trip(bits, rows, n, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (rows, n), dtype=torch.uint8, generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_row_bytes(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_code_too_large_for_bits():
    with pytest.raises(InvalidTensorError, match="does not fit in 3 bits"):
        pack_codes(torch.full((1, 8), 8, dtype=torch.uint8), 3)


def test_wrong_dtype_or_rank():
    with pytest.raises(InvalidTensorError, match="2-D uint8"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 4)
    with pytest.raises(InvalidTensorError, match="2-D uint8"):
        pack_codes(torch.zeros(1, 8, dtype=torch.int32), 4)


def test_unpack_width_mismatch():
    with pytest.raises(InvalidOptionError, match="cannot hold"):
        unpack_codes(torch.zeros(1, 4, dtype=torch.uint8), 5, 8)


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(InvalidOptionError, match="bits"):
        pack_codes(torch.zeros(1, 8, dtype=torch.uint8), bits)
