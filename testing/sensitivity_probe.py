"""The noise probe: output sensitivity measured the slow way, one forward per linear.

A test oracle for runtime/block_calibration.py:output_gains (never used by the flow): each
linear's weight gets white noise of relative energy ``probe_error`` and the model's output
is run again; the gain is the output's relative MSE per unit of the weight's relative MSE
(for white noise, channel weighting leaves that ratio unchanged).
"""

from __future__ import annotations

import math

import torch

from hlwq.quant.budget import weighted_relative_mse

PROBE_ERROR = 0.03           # relative energy of the probe noise (about what Q3 does)


def _flat(output) -> torch.Tensor:
    from hlwq.runtime.block_calibration import _tensors

    return torch.cat([t.detach().double().reshape(-1) for t in _tensors(output)])


@torch.no_grad()
def probe_gains(linears: dict[str, torch.nn.Linear], forward, probe_error: float = PROBE_ERROR,
                seed: int = 0) -> dict[str, float]:
    """``{name: output gain}`` of each linear by a white-noise probe of ``forward()``."""
    gen = torch.Generator().manual_seed(seed)
    reference = _flat(forward())
    gains = {}
    for name, module in linears.items():
        original = module.weight.detach().clone()
        scale = float(original.double().norm()) * math.sqrt(probe_error / original.numel())
        noise = torch.randn(original.shape, generator=gen).to(original) * scale
        module.weight.add_(noise)
        try:
            probed = _flat(forward())
        finally:
            module.weight.copy_(original)
        output_error = float((probed - reference).square().sum() / reference.square().sum())
        gains[name] = output_error / weighted_relative_mse(original, original + noise)
    return gains
