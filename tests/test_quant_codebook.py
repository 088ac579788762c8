"""Lloyd-Max codebooks for N(0, 1): the reference's centroids, sorted and symmetric."""

import pytest
import torch
from polarengine_vllm.utils import get_centroids

from hlwq.quant.codebook import lloyd_max_codebook
from hlwq.quant.errors import InvalidOptionError


@pytest.mark.parametrize("bits", range(2, 7))
def test_equals_reference_centroids(bits):
    ours = lloyd_max_codebook(bits)
    assert ours.dtype == torch.float32 and ours.shape == (2 ** bits,)
    assert (ours - get_centroids(bits)).abs().max() <= 1e-6


# polarquant 0.6.0's get_centroids(7 and 8) take seconds each (scipy per call), so their
# largest level, first positive level and sum of squares are recorded here.
@pytest.mark.parametrize("bits, largest, first_positive, sum_sq", [
    (7, 4.813838481903076, 0.03027956373989582, 691.5853803069701),
    (8, 5.04500675201416, 0.015499363653361797, 1409.6046405083043),
])
def test_equals_recorded_reference_centroids(bits, largest, first_positive, sum_sq):
    ours = lloyd_max_codebook(bits).double()
    assert ours[-1].item() == pytest.approx(largest, abs=1e-6)
    assert ours[2 ** (bits - 1)].item() == pytest.approx(first_positive, abs=1e-6)
    assert (ours * ours).sum().item() == pytest.approx(sum_sq, rel=1e-6)


@pytest.mark.parametrize("bits", range(2, 9))
def test_sorted_and_symmetric(bits):
    levels = lloyd_max_codebook(bits).double()
    assert torch.all(levels[1:] > levels[:-1])
    assert torch.allclose(levels, -levels.flip(0), atol=1e-6)


def test_known_two_bit_levels():
    # The classic 4-level Lloyd-Max quantizer for N(0, 1): +-0.4528, +-1.5104.
    assert torch.allclose(lloyd_max_codebook(2), torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104]),
                          atol=1e-4)


def test_cached_value_cannot_be_mutated_by_callers():
    lloyd_max_codebook(5).zero_()
    assert lloyd_max_codebook(5).abs().sum() > 0


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, "5", True])
def test_bits_out_of_range(bits):
    with pytest.raises(InvalidOptionError, match="bits"):
        lloyd_max_codebook(bits)
