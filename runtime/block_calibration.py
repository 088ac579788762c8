"""Output sensitivity of a transformer too big for memory, measured one block at a time.

The model is built with a single block on the CPU (or ``device``) and everything outside
the blocks is read from the source; the keyword arguments of the first block's call are
captured once per calibration input. Then, for each block in turn, its weights are read
from the source into that one block, the captured hidden states are pushed through it,
and only activations are kept: per input channel of each linear, the mean squared input;
per linear, the relative MSE of the block's outputs (both streams) when the weight gets
white noise of relative energy ``probe_error``, per unit of the weight's channel-weighted
relative MSE (quant.budget.weighted_relative_mse). The outputs are the next block's inputs.

Peak memory is one block plus the activations; the weights are read once. The gain is
measured at the block's output, not the model's: each block's relative error is taken to
reach the output undamped (first order), as the in-memory estimate of tasks/budget.py
measures directly. Noise, not quantization, perturbs the weight: HLWQ's error is close to
white inside its rotation blocks, and a noise probe costs no encoder pass.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from hlwq.quant.budget import ActivationStats, weighted_relative_mse
from hlwq.quant.errors import CorruptCheckpointError
from hlwq.runtime.ltx23_models import build_model
from hlwq.store.artifact import tensor_key
from hlwq.store.safetensors_io import iter_safetensors_files, read_headers, read_tensor

BLOCKS = "transformer_blocks"
STREAMS = ("hidden_states", "audio_hidden_states")   # what a block returns, in this order
PROBE_ERROR = 0.03           # relative energy of the probe noise (about what Q3 does)


class _Captured(Exception):
    pass


def tensor_index(folder: Path) -> dict[str, tuple[Path, object]]:
    """Every tensor of a diffusers transformer folder: name -> (file, header entry)."""
    headers = read_headers(iter_safetensors_files(folder))
    return {name: (path, entry) for path, header in headers.items()
            for name, entry in header.tensors.items()}


def load_part(module: torch.nn.Module, index: dict, prefix: str, dtype: torch.dtype,
              folder: Path) -> int:
    """Read the tensors named ``prefix*`` into ``module`` (strictly); returns bytes read."""
    state, read = {}, 0
    for name, (path, entry) in index.items():
        if name.startswith(prefix):
            state[name[len(prefix):]] = read_tensor(path, entry).to(dtype)
            read += entry.nbytes
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or (prefix and missing):
        raise CorruptCheckpointError(f"{folder}: tensors under {prefix or 'the root'!r} do not "
                                     f"match the model: missing {sorted(missing)[:5]}, "
                                     f"unexpected {sorted(unexpected)[:5]}")
    return read


@torch.no_grad()
def streamed_activation_stats(folder: str | os.PathLike, inputs: list[dict],
                              names: set[str] | None = None, dtype: torch.dtype = torch.float32,
                              device: str = "cpu", probe_error: float = PROBE_ERROR,
                              seed: int = 0) -> tuple[ActivationStats, dict]:
    """Statistics of the linears in the blocks of the transformer in ``folder`` (diffusers
    layout: ``config.json`` + safetensors), for the transformer calls ``inputs`` (keyword
    arguments, as the pipeline passes them). ``names`` limits the probes to those weight
    names (``transformer_blocks.3.attn1.to_q.weight``). Returns the statistics and the cost
    (seconds reading, forwarding and probing; bytes read; blocks)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    index = tensor_index(folder)
    started = time.perf_counter()
    shell = build_model("transformer", {**config, "num_layers": 1}).to(device, dtype).eval()
    outside = {n: v for n, v in index.items() if not n.startswith(f"{BLOCKS}.")}
    missing, _ = shell.load_state_dict({n: read_tensor(p, e).to(dtype) for n, (p, e) in outside.items()},
                                       strict=False)
    if any(not name.startswith(f"{BLOCKS}.") for name in missing):
        raise CorruptCheckpointError(f"{folder}: tensors outside the blocks are missing: "
                                     f"{sorted(n for n in missing if not n.startswith(BLOCKS))[:5]}")
    block = shell.transformer_blocks[0]
    states = [_block_inputs(shell, block, kwargs, device) for kwargs in inputs]
    cost = {"blocks": config["num_layers"], "inputs": len(inputs), "setup_s": 0.0, "read_s": 0.0,
            "forward_s": 0.0, "probe_s": 0.0, "probes": 0, "bytes_read": 0}
    cost["setup_s"] = time.perf_counter() - started
    stats = ActivationStats()
    gen = torch.Generator(device=device).manual_seed(seed)
    for number in range(config["num_layers"]):
        prefix = f"{BLOCKS}.{number}."
        tick = time.perf_counter()
        cost["bytes_read"] += load_part(block, index, prefix, dtype, folder)
        cost["read_s"] += time.perf_counter() - tick
        states = _block_stats(block, states, prefix, names, stats, probe_error, gen, cost)
    return stats, cost


def _block_inputs(shell, block, kwargs: dict, device: str) -> dict:
    """The keyword arguments the model passes its first block for ``kwargs``."""
    captured = {}

    def grab(module, args, block_kwargs):
        captured.update(block_kwargs)
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        shell(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()},
              return_dict=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured


def _flat(outputs: list) -> torch.Tensor:
    return torch.cat([t.double().reshape(-1) for out in outputs for t in out])


def _block_stats(block, states: list[dict], prefix: str, names, stats: ActivationStats,
                 probe_error: float, gen: torch.Generator, cost: dict) -> list[dict]:
    """Record one block's statistics; return the next block's inputs."""
    linears = {name: module for name, module in block.named_modules()
               if isinstance(module, torch.nn.Linear)
               and (names is None or f"{prefix}{name}.weight" in names)}
    sums, handles = record_channel_energy(linears)
    tick = time.perf_counter()
    try:
        outputs = [block(**state) for state in states]
    finally:
        for handle in handles:
            handle.remove()
    cost["forward_s"] += time.perf_counter() - tick
    reference = _flat(outputs)
    tick = time.perf_counter()
    for name, module in linears.items():
        x_sum, tokens = sums[name]
        if not tokens:
            continue
        key = tensor_key("transformer", f"{prefix}{name}.weight")
        weights = (x_sum / tokens).float()
        original = module.weight.detach().clone()
        scale = float(original.double().norm()) * math.sqrt(probe_error / original.numel())
        noise = torch.randn(original.shape, generator=gen, device=original.device,
                            dtype=original.dtype) * scale
        module.weight.add_(noise)
        try:
            probed = _flat([block(**state) for state in states])
        finally:
            module.weight.copy_(original)
        output_error = float((probed - reference).square().sum() / reference.square().sum())
        weight_error = weighted_relative_mse(original, original + noise, weights)
        stats.channel_mean_square[key] = weights
        stats.output_gain[key] = output_error / weight_error if weight_error > 0 else 0.0
        cost["probes"] += 1
    cost["probe_s"] += time.perf_counter() - tick
    return [{**state, **dict(zip(STREAMS, output))} for state, output in zip(states, outputs)]


def record_channel_energy(linears: dict[str, torch.nn.Module]) -> tuple[dict[str, list], list]:
    """Forward hooks summing each linear's squared input per channel: ``{name: [sum of x^2
    per input channel, tokens seen]}`` and the hook handles (remove them when done)."""
    sums: dict[str, list] = {name: [0.0, 0] for name in linears}

    def recorder(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().double().reshape(-1, module.in_features)
            sums[name][0] = sums[name][0] + x.square().sum(0)
            sums[name][1] += x.shape[0]
        return hook

    return sums, [module.register_forward_hook(recorder(name)) for name, module in linears.items()]
