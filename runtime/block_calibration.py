"""Output sensitivity of a transformer's linears: one forward and one backward, not a probe each.

:func:`output_gains` gives, for every linear of a module at once, the model output's relative
MSE per unit of the linear's channel-weighted relative error (quant.budget.weighted_relative_mse)
under white weight noise, to first order. For white noise of variance s^2 on ``W`` the
output's expected squared error is ``s^2 * ||J (dW X)||^2`` averaged, which equals
``s^2 * E_v ||G^T X||_F^2`` where ``X`` is the layer's input, ``G`` the gradient at its output
of ``v . output`` and ``v`` a standard Gaussian cotangent (Hutchinson: E_v ||J^T v||^2 =
||J||_F^2). So one backward per cotangent sample measures every layer. HLWQ's error is close to
white inside its rotation blocks; the channel weights carry the rest.
While it measures, LTX-2's text cross-attention applies its value projection after the
attention weights (runtime/calibration_attention.py): the same attention and the same gains
(within 0.4 % in bfloat16) for a fifth to a third less time per block (1.0-1.1 s against
1.3 s over repeats of one real-width block; 1.21 s against 1.83 s in
benchmarks/results/calibration.json).

:func:`streamed_activation_stats` runs it on a transformer too big for memory, one block at
a time: the model is built with a single block (on the meta device, no initialisation) and
everything outside the blocks is read from the source; the keyword arguments of the first
block's call are captured once per calibration input. Then, for each block in turn, its
weights are read from the source into that one block and the captured hidden states are
pushed through it (forward and backward); only activations are kept, and the outputs are
the next block's inputs. While a block computes, the next one is read past the page cache into
a staging buffer (store/safetensors_io.py StagingReader, in a thread that waits on the disk),
then copied into the block. Read through the cache, the kernel's copying competes with the
computing threads: on 2 cores a real-width block took 1.68 s against 1.21 s with direct reads
(benchmarks/results/calibration.json; an earlier run, 2.57 s against 1.45 s). Peak memory is
one block, its staging buffer and the activations; the weights are read once, in file order.
The gain is measured at the block's output, not the model's: each block's relative error is
taken to reach the output undamped (first order).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hlwq.quant.budget import ActivationStats
from hlwq.quant.errors import CorruptCheckpointError
from hlwq.runtime.calibration_attention import values_after_attention
from hlwq.runtime.ltx23_models import build_model
from hlwq.store.artifact import tensor_key
from hlwq.store.safetensors_io import (
    StagingReader,
    iter_safetensors_files,
    read_headers,
    read_tensor,
    torch_dtype,
)

BLOCKS = "transformer_blocks"
STREAMS = ("hidden_states", "audio_hidden_states")   # what a block returns, in this order
ACTIVATIONS = (*STREAMS, "encoder_hidden_states", "audio_encoder_hidden_states")
COTANGENT_SAMPLES = 1        # Gaussian cotangents per input (benchmarks/results/calibration.json:
                             # one already ranks the layers as the noise probes do)


class _Captured(Exception):
    pass


def tensor_index(folder: Path) -> dict[str, tuple[Path, object]]:
    """Every tensor of a diffusers transformer folder: name -> (file, header entry)."""
    headers = read_headers(iter_safetensors_files(folder))
    return {name: (path, entry) for path, header in headers.items()
            for name, entry in header.tensors.items()}


def block_places(module: torch.nn.Module, index: dict, prefix: str,
                 folder: Path) -> dict[str, tuple[Path, object]]:
    """``{name in module: (file, entry)}`` of the tensors named ``prefix*``, in file order (a
    cold disk then reads ahead, not back and forth), checked strictly against ``module``."""
    own = module.state_dict(keep_vars=True)
    found = {name[len(prefix):]: place for name, place in index.items() if name.startswith(prefix)}
    missing = sorted(set(own) - set(found)) if prefix else []
    unexpected = sorted(set(found) - set(own))
    wrong = sorted(name for name, (_, entry) in found.items()
                   if name in own and list(entry.shape) != list(own[name].shape))
    if unexpected or missing or wrong:
        raise CorruptCheckpointError(f"{folder}: tensors under {prefix or 'the root'!r} do not "
                                     f"match the model: missing {missing[:5]}, unexpected "
                                     f"{unexpected[:5]}, wrong shape {wrong[:5]}")
    return dict(sorted(found.items(), key=lambda item: (str(item[1][0]), item[1][1].start)))


def fill_part(module: torch.nn.Module, places: dict, staged: dict[str, memoryview]) -> int:
    """Copy ``staged`` bytes (StagingReader.read of ``places``' values) into ``module``'s
    tensors ``places`` names (converted to their dtype and device); returns bytes copied."""
    own = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, (_, entry) in places.items():
            if entry.numel:
                own[name].data.copy_(torch.frombuffer(staged[entry.name], dtype=torch_dtype(
                    entry.dtype)).view(entry.shape))
    return sum(entry.nbytes for _, entry in places.values())


def output_gains(model: torch.nn.Module, linears: dict[str, torch.nn.Linear], calls: list,
                 seed: int = 0, samples: int = COTANGENT_SAMPLES,
                 values_after_weights: bool = True) -> tuple[dict[str, tuple], list]:
    """``({name: (mean squared input per channel, output gain)}, outputs)`` for ``linears`` of
    ``model``, from one forward of each of ``calls`` (functions returning a tensor or nested
    tuples and lists of tensors) and ``samples`` backwards with Gaussian cotangents (module
    docstring). The model's parameters get no gradients; the outputs come back detached.
    ``values_after_weights=False`` runs the attention as the model does (the bench's baseline;
    runtime/calibration_attention.py)."""
    cache = _InputCache()
    sums, handles = record_channel_energy(linears, cache)
    energy = {name: 0.0 for name in linears}
    handles += [module.register_forward_hook(_gradient_recorder(name, energy, cache))
                for name, module in linears.items()]
    frozen = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    try:
        for p in frozen:
            p.requires_grad_(False)
        with values_after_attention(model, _value_recorder(linears, sums, energy, cache)) \
                if values_after_weights else contextlib.nullcontext():
            outputs, reference = _forward_backward(calls, samples, gen, cache)
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    gains = {}
    for name, module in linears.items():
        x_sum, tokens = sums[name]
        if tokens:
            weight = module.weight.detach()
            gain = energy[name] / samples * _sum_of_squares(weight) / (
                reference * weight.numel()) if reference > 0 else 0.0
            gains[name] = ((x_sum / tokens).float(), gain)
    return gains, outputs


def _forward_backward(calls: list, samples: int, gen: torch.Generator,
                      cache: _InputCache) -> tuple[list, float]:
    """Each call's detached output after its forward and ``samples`` Gaussian backwards, and
    the outputs' summed squares."""
    outputs, reference = [], 0.0
    for call in calls:
        with torch.enable_grad():
            output = call()
            flat = [t for t in _tensors(output) if t.requires_grad]
            for sample in range(samples):
                cotangents = [torch.randn(t.shape, generator=gen).to(t) for t in flat]
                torch.autograd.backward(flat, cotangents, retain_graph=sample < samples - 1)
        cache.clear()
        outputs.append(_detached(output))
        reference += math.fsum(_sum_of_squares(t) for t in _tensors(outputs[-1]))
    return outputs, reference


def _value_recorder(linears: dict, sums: dict, energy: dict, cache: _InputCache):
    """``record`` for calibration_attention.ValuesAfterAttention: a value projection applied
    after the attention weights is measured as if called: its input's channel sums, and the
    energy of its weight gradient, ``sum ||G_h^T (P X)_h||^2`` over sequences and heads."""
    names = {id(module): name for name, module in linears.items()}

    def record(linear, x, mixed, heads):
        name = names.get(id(linear))
        if name is None:
            return heads
        _add_input(sums[name], x.detach(), linear.in_features, cache)
        if not heads.requires_grad:
            heads = heads.detach().requires_grad_()
        mixed = mixed.detach()

        def on_gradient(grad):
            energy[name] += weight_gradient_energy(mixed.flatten(0, 1), grad.flatten(0, 1))
        heads.register_hook(on_gradient)
        return heads
    return record


def add_gains(stats: ActivationStats, gains: dict[str, tuple], component: str,
              prefix: str = "") -> None:
    """Put :func:`output_gains`' results for ``component``'s linears ``prefix + name`` in
    ``stats`` (layers the forward did not use have none)."""
    for name, (channels, gain) in gains.items():
        key = tensor_key(component, f"{prefix}{name}.weight")
        stats.channel_mean_square[key], stats.output_gain[key] = channels, gain


def _gradient_recorder(name: str, energy: dict, cache: _InputCache):
    """Forward hook: make the linear's output part of the graph (a leaf where nothing before
    it is) and add ``||G^T X||^2`` to ``energy[name]`` when its gradient ``G`` arrives."""
    def hook(module, inputs, output):
        x = inputs[0].detach()
        if not output.requires_grad:
            output = output.detach().requires_grad_()

        def on_gradient(grad):
            energy[name] += weight_gradient_energy(x, grad, cache)
        output.register_hook(on_gradient)
        return output
    return hook


class _InputCache:
    """What is computed from a linear's input during one call, by input: a block's key and
    value projections read the same text tokens (the costliest inputs), so they share their
    per-channel sums and their tokens' Gram matrix. An entry holds its input, so the memory
    of a cached input is not reused while the cache lives; clear it after each call."""

    def __init__(self):
        self._entries: dict[tuple, dict] = {}

    def _entry(self, x: torch.Tensor) -> dict:
        return self._entries.setdefault((x.data_ptr(), x.shape, x.stride()), {"input": x})

    def channel_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of squares per input channel over every token of ``x`` (float64)."""
        entry = self._entry(x)
        if "channels" not in entry:
            flat = x.reshape(-1, x.shape[-1])
            entry["channels"] = sum(rows.float().square().sum(0).double()
                                    for rows in flat.split(_rows_per_piece(flat)))
        return entry["channels"]

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens' Gram matrix of every sequence of ``x`` (sequences, tokens, in)."""
        entry = self._entry(x)
        if "gram" not in entry:
            entry["gram"] = (x @ x.mT).float()
        return entry["gram"]

    def clear(self) -> None:
        self._entries.clear()


def weight_gradient_energy(x: torch.Tensor, grad: torch.Tensor,
                           cache: _InputCache | None = None) -> float:
    """``sum_b ||grad_b^T x_b||_F^2`` over the sequences ``b`` of a linear's input ``x``
    (..., tokens, in) and output gradient (..., tokens, out): the weight gradient's energy,
    without cross terms between sequences (whose expectation is zero). Through the tokens'
    Gram matrices (shared through ``cache`` between layers reading the same input) when the
    sequences are short, through the gradient itself otherwise. The products run in the
    activations' dtype (in bfloat16 they accumulate in float32; the energy agrees with float32's
    within 0.3 %, benchmarks/results/calibration.json), the sums in float32 and float64."""
    x = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x[None]
    grad = grad.reshape(-1, *grad.shape[-2:]) if grad.dim() > 2 else grad[None]
    tokens, n_in, n_out = x.shape[1], x.shape[2], grad.shape[2]
    grad = grad.to(x.dtype)
    if tokens * (n_in + n_out) <= n_in * n_out:
        x_gram = (cache or _InputCache()).gram(x)
        return float((x_gram * (grad @ grad.mT).float()).sum(dtype=torch.float64))
    return float(_sum_of_squares(grad.mT @ x))


def _sum_of_squares(tensor: torch.Tensor) -> float:
    """Sum of squares in float64 without a float64 (or float32) copy of the whole tensor: a
    block's weights are gigabytes. The squares are summed in float32 (accurate to about 1e-6)
    about a million values at a time (a 4096 x 4096 weight: 2.7 ms; in pieces of a quarter of
    that, 41 ms), and those sums added in float64."""
    flat = tensor.detach().reshape(-1, tensor.shape[-1]) if tensor.dim() else tensor.reshape(1, 1)
    return math.fsum(float(torch.linalg.vector_norm(rows.float(), dim=-1).double().square().sum())
                     for rows in flat.split(_rows_per_piece(flat)))


def _rows_per_piece(flat: torch.Tensor) -> int:
    return max(1, (1 << 20) // max(1, flat.shape[-1]))


def _tensors(output) -> list[torch.Tensor]:
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for part in output if isinstance(part, (torch.Tensor, tuple, list))
            for t in _tensors(part)]


def _detached(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    return type(output)(_detached(part) for part in output)


def streamed_activation_stats(folder: str | os.PathLike, inputs: list[dict],
                              names: set[str] | None = None, dtype: torch.dtype = torch.float32,
                              device: str = "cpu", seed: int = 0,
                              samples: int = COTANGENT_SAMPLES,
                              direct_reads: bool = True,
                              values_after_weights: bool = True) -> tuple[ActivationStats, dict]:
    """Statistics of the linears in the blocks of the transformer in ``folder`` (diffusers
    layout: ``config.json`` + safetensors), for the transformer calls ``inputs`` (keyword
    arguments, as the pipeline passes them). ``names`` limits them to those weight names
    (``transformer_blocks.3.attn1.to_q.weight``). Returns the statistics and the cost
    (seconds setting up, waiting for reads and copying them in, and running forward + backward,
    and each block's seconds; bytes read; blocks). ``direct_reads=False`` reads through the page
    cache and ``values_after_weights=False`` runs the attention as the model does (the bench's
    baselines; module docstring)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    index = tensor_index(folder)
    started = time.perf_counter()
    shell = build_model("transformer", {**config, "num_layers": 1}, device="meta")
    shell = shell.to_empty(device=device).to(dtype).eval()
    outside = {n: v for n, v in index.items() if not n.startswith(f"{BLOCKS}.")}
    missing, _ = shell.load_state_dict(
        {n: read_tensor(p, e).to(dtype) for n, (p, e) in outside.items()}, strict=False)
    missing = sorted(name for name in missing if not name.startswith(f"{BLOCKS}."))
    if missing:
        raise CorruptCheckpointError(f"{folder}: tensors outside the blocks are missing: "
                                     f"{missing[:5]}")
    block = shell.transformer_blocks[0]
    with torch.no_grad():
        states = [_block_inputs(shell, block, kwargs, device, dtype) for kwargs in inputs]
    places = [block_places(block, index, f"{BLOCKS}.{number}.", folder)   # all checked first
              for number in range(config["num_layers"])]
    cost = {"blocks": config["num_layers"], "inputs": len(inputs), "cotangent_samples": samples,
            "setup_s": time.perf_counter() - started, "read_wait_s": 0.0,
            "forward_backward_s": 0.0, "bytes_read": 0, "block_s": []}
    stats, disk = ActivationStats(), StagingReader(direct_reads)

    def read(number):
        return disk.read(places[number].values())

    with ThreadPoolExecutor(1, thread_name_prefix="block-reader") as reader, freed_memory_kept():
        pending = reader.submit(read, 0)
        for number in range(config["num_layers"]):
            start = time.perf_counter()
            cost["bytes_read"] += fill_part(block, places[number], pending.result())
            if number + 1 < config["num_layers"]:     # the buffer is free again: read the next
                pending = reader.submit(read, number + 1)
            ready = time.perf_counter()
            states = _block_stats(block, states, f"{BLOCKS}.{number}.", names, stats,
                                  seed + number, samples, values_after_weights)
            done = time.perf_counter()
            cost["read_wait_s"] += ready - start
            cost["forward_backward_s"] += done - ready
            cost["block_s"].append(done - start)
    return stats, cost


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20                      # the most glibc accepts (64-bit)


@contextlib.contextmanager
def freed_memory_kept():
    """Keep freed memory in the process while a block calibrates (glibc only). By default glibc
    hands freed blocks back to the kernel, and every new activation tensor of the next call
    faults its pages in again; a real-width block (two calls of both guidance halves) then runs
    about 20 % slower: 1.62 s against 1.26 s, medians of 6 on 2 cores. Afterwards the freed
    memory goes back to the kernel and the thresholds are left at the largest ones glibc's own
    adaptive rule reaches."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX)
        malloc_trim(0)


def calibration_dtype(device: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the streamed calibration computes in: bfloat16 (the checkpoint's own) on a
    CPU that computes it natively (AVX-512 BF16 or AMX: a real-width block calibrates 2x
    faster than in float32, with gains within 0.3 % of float32's, benchmarks/results/
    calibration.json); ``dtype`` elsewhere."""
    if device == "cpu" and torch.backends.mkldnn.is_available() \
            and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return dtype


def _block_inputs(shell, block, kwargs: dict, device: str, dtype: torch.dtype) -> dict:
    """The keyword arguments the model passes its first block for ``kwargs`` (activations
    in ``dtype``; timesteps, coordinates and masks as they come)."""
    captured = {}

    def grab(module, args, block_kwargs):
        captured.update(block_kwargs)
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        shell(**{k: v.to(device, dtype if k in ACTIVATIONS else v.dtype) if torch.is_tensor(v)
                 else v for k, v in kwargs.items()}, return_dict=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured


def _block_stats(block, states: list[dict], prefix: str, names, stats: ActivationStats,
                 seed: int, samples: int, values_after_weights: bool = True) -> list[dict]:
    """Record one block's statistics; return the next block's inputs."""
    linears = {name: module for name, module in block.named_modules()
               if isinstance(module, torch.nn.Linear)
               and (names is None or f"{prefix}{name}.weight" in names)}
    calls = [lambda state=state: block(**state) for state in states]
    gains, outputs = output_gains(block, linears, calls, seed, samples, values_after_weights)
    add_gains(stats, gains, "transformer", prefix)
    return [{**state, **dict(zip(STREAMS, output))} for state, output in zip(states, outputs)]


def record_channel_energy(linears: dict[str, torch.nn.Module],
                          cache: _InputCache | None = None) -> tuple[dict[str, list], list]:
    """Forward hooks summing each linear's squared input per channel: ``{name: [sum of x^2
    per input channel, tokens seen]}`` and the hook handles (remove them when done)."""
    sums: dict[str, list] = {name: [0.0, 0] for name in linears}

    def recorder(name):
        def hook(module, inputs, output):
            _add_input(sums[name], inputs[0].detach(), module.in_features, cache)
        return hook

    return sums, [module.register_forward_hook(recorder(name)) for name, module in linears.items()]


def _add_input(sums: list, x: torch.Tensor, in_features: int,
               cache: _InputCache | None) -> None:
    """Add ``x``'s squares per input channel and its tokens to ``sums`` ([sum, tokens])."""
    sums[0] = sums[0] + (cache or _InputCache()).channel_sums(x)
    sums[1] += x.numel() // in_features
