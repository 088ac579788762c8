"""The Walsh-Hadamard rotation: orthonormal, symmetric, self-inverse, the reference's matrix."""

import pytest
import torch
from polarengine_vllm.quantizer import build_hadamard

from hlwq.quant.errors import InvalidOptionError
from hlwq.quant.hadamard import fwht, hadamard_matrix


@pytest.mark.parametrize("n", [1, 2, 32, 64, 128, 256])
def test_matrix_is_orthonormal_and_symmetric(n):
    h = hadamard_matrix(n).double()
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-6)
    assert torch.equal(h, h.T)


@pytest.mark.parametrize("n", [32, 128, 256])
def test_matrix_equals_reference(n):
    assert torch.allclose(hadamard_matrix(n), build_hadamard(n), atol=1e-7)


@pytest.mark.parametrize("n", [32, 64, 128, 256])
def test_fwht_matches_matrix_and_is_its_own_inverse(n):
    x = torch.randn(3, 5, n)
    assert torch.allclose(fwht(x), x @ hadamard_matrix(n), atol=1e-5)
    assert torch.allclose(fwht(fwht(x)), x, atol=1e-5)
    assert fwht(x).shape == x.shape


def test_fwht_preserves_norm():
    x = torch.randn(1000, 128, dtype=torch.float64)
    assert torch.allclose(fwht(x).norm(dim=1), x.norm(dim=1))


def test_returned_matrix_is_a_copy():
    hadamard_matrix(32).zero_()
    assert hadamard_matrix(32).abs().sum() > 0


@pytest.mark.parametrize("n", [0, 3, 48, 100])
def test_not_a_power_of_two_is_rejected(n):
    with pytest.raises(InvalidOptionError, match="power of two"):
        hadamard_matrix(n)
    if n:
        with pytest.raises(InvalidOptionError, match="power of two"):
            fwht(torch.zeros(2, n))
