"""Fused numba kernels for the HLWQ encoder and decoder.

Work is cut into tiles of ``LANES`` rotation blocks (consecutive in row-major
block order, so any shape fills the tiles) held transposed: ``tile[j, lane]``
is value ``j`` of block ``lane``. Every step then runs the same operation on
``LANES`` blocks at once, which the compiler turns into SIMD: the load (bf16
bits or fp32), the L2 norm, the Walsh-Hadamard butterflies, the per-group
scale search, the nearest-level lookup and the packing. Tiles run in parallel.

Everything works in the *unnormalised* Hadamard domain ``u = w @ (sqrt(B) H)``
where a stored scale ``s`` reconstructs ``u_hat = s * level`` directly; the
reference's scale ``||w||`` is then ``rms(u)`` and errors in ``u`` are ``B``
times errors in ``w``.

Nearest level: a uniform lookup table over the midpoints whose cells are at
most half the smallest midpoint gap, so a cell holds at most one midpoint and
``code = first[cell] + (z > threshold[cell])`` is exact and branch free.

Scale search (refined mode), per group and per lane: the reference scale plus a
golden-section search for ``k`` in ``scale = k * rms(u)``; each candidate takes
the nearest codes at that scale and refits the scale by least squares; the
error is measured after rounding the scale to fp16. Last, one Lloyd step: the
codes at the best refitted scale, refitted again. The smallest error wins.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

LANES = 16
NORM_FLOOR = 1e-10
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_FASTMATH = {"reassoc", "nsz", "contract"}   # no nnan/ninf: the tables use +inf
_jit = numba.njit(inline="always", cache=True, fastmath=_FASTMATH)


class NearestTable:
    """Lookup table for the nearest level of a sorted codebook (see module docstring)."""

    def __init__(self, codebook: np.ndarray):
        levels = np.ascontiguousarray(codebook, dtype=np.float32)
        mids = (levels[:-1] + levels[1:]) / np.float32(2)
        width = float(np.min(np.diff(mids))) / 2 if mids.size > 1 else 1.0
        if not width > 0:
            raise ValueError("codebook levels must be strictly increasing")
        cells = int(math.ceil((float(mids[-1]) - float(mids[0])) / width)) + 2
        starts = float(mids[0]) + width * np.arange(cells, dtype=np.float64)
        first = np.searchsorted(mids.astype(np.float64), starts - 0.01 * width, side="left")
        self.levels = levels
        self.origin = np.float32(mids[0])
        self.inv_width = np.float32(1.0 / width)
        self.first = first.astype(np.int32)
        self.threshold = np.append(mids, np.float32(np.inf))[first].astype(np.float32)


@_jit
def _nearest(z, origin, inv_width, first, threshold):
    f = min(max((z - origin) * inv_width, np.float32(0.0)), np.float32(first.size - 1))
    cell = np.int32(f)
    return first[cell] + np.int32(z > threshold[cell])


@_jit
def _fwht_tile(t, n):
    """Unnormalised Walsh-Hadamard butterflies down the rows of a transposed tile."""
    half = 1
    while half < n:
        for i in range(0, n, 2 * half):
            for j in range(i, i + half):
                a = (j) * LANES
                b = (j + half) * LANES
                for k in range(LANES):
                    x = t[a + k]
                    y = t[b + k]
                    t[a + k] = x + y
                    t[b + k] = x - y
        half *= 2


@_jit
def _fp16_round(x):
    """The fp16 value nearest to a non-negative float (ties to even), as float64."""
    if x <= 0.0:
        return 0.0
    if x >= 65520.0:
        return math.inf
    step = max(math.frexp(x)[1] - 11, -24)
    return np.rint(math.ldexp(x, -step)) * math.ldexp(1.0, step)


@_jit
def _block_of(tile, lane, n_blocks):
    flat = tile * LANES + lane
    return flat // n_blocks, flat % n_blocks


@_jit
def _load_tile(src, tile, n_tiles_blocks, n_blocks, block, in_features, bits32):
    """Transposed copy of one tile as fp32 bit patterns (bf16 is the top half of fp32)."""
    shift = 16 if src.itemsize == 2 else 0
    for lane in range(LANES):
        if tile * LANES + lane >= n_tiles_blocks:
            for j in range(block):
                bits32[j * LANES + lane] = 0
            continue
        row, blk = _block_of(tile, lane, n_blocks)
        col0 = blk * block
        stop = min(block, in_features - col0)
        for j in range(stop):
            bits32[j * LANES + lane] = np.uint32(src[row, col0 + j]) << shift
        for j in range(stop, block):
            bits32[j * LANES + lane] = 0


@_jit
def _evaluate(t, lo, hi, inv_t, levels, origin, inv_width, first, threshold, uu, err, scale):
    """Per lane: codes at scale 1/inv_t, least-squares refit, error with the fp16 scale."""
    uc = np.zeros(LANES)
    cc = np.zeros(LANES)
    for j in range(lo, hi):
        base = j * LANES
        for k in range(LANES):
            lev = levels[_nearest(t[base + k] * inv_t[k], origin, inv_width, first, threshold)]
            uc[k] += t[base + k] * lev
            cc[k] += lev * lev
    for k in range(LANES):
        s = _fp16_round(max(uc[k] / cc[k], 0.0))
        scale[k] = s
        err[k] = uu[k] - 2.0 * s * uc[k] + s * s * cc[k]


@_jit
def _error_at(t, lo, hi, inv_t, s16, levels, origin, inv_width, first, threshold, uu, err):
    """Per lane: error of the codes at scale 1/inv_t kept with the given fp16 scale."""
    uc = np.zeros(LANES)
    cc = np.zeros(LANES)
    for j in range(lo, hi):
        base = j * LANES
        for k in range(LANES):
            lev = levels[_nearest(t[base + k] * inv_t[k], origin, inv_width, first, threshold)]
            uc[k] += t[base + k] * lev
            cc[k] += lev * lev
    for k in range(LANES):
        err[k] = uu[k] - 2.0 * s16[k] * uc[k] + s16[k] * s16[k] * cc[k]


@_jit
def _keep_better(err, scale, inv_t, best_err, best_scale, best_inv_t):
    for k in range(LANES):
        if err[k] < best_err[k]:
            best_err[k] = err[k]
            best_scale[k] = scale[k]
            best_inv_t[k] = inv_t[k]


@_jit
def _search_group(t, lo, hi, rms, search, levels, origin, inv_width, first, threshold,
                  uu, best_err, best_scale, best_inv_t):
    """Golden-section search of k in [search[0], search[1]] (search[2] evaluations), then
    one Lloyd step from the best refitted scale; improves the best_* arrays in place."""
    err = np.empty(LANES)
    scale = np.empty(LANES)
    inv_t = np.empty(LANES, np.float32)
    lo_k = np.full(LANES, search[0])
    hi_k = np.full(LANES, search[1])
    x1 = hi_k - GOLDEN * (hi_k - lo_k)
    x2 = lo_k + GOLDEN * (hi_k - lo_k)
    e1 = np.empty(LANES)
    e2 = np.empty(LANES)
    for which in range(2):
        x = x1 if which == 0 else x2
        for k in range(LANES):
            inv_t[k] = np.float32(1.0 / (x[k] * rms[k]))
        _evaluate(t, lo, hi, inv_t, levels, origin, inv_width, first, threshold, uu, err, scale)
        _keep_better(err, scale, inv_t, best_err, best_scale, best_inv_t)
        (e1 if which == 0 else e2)[:] = err
    for _ in range(int(search[2]) - 2):
        for k in range(LANES):   # shrink towards the better point, place the next probe
            if e1[k] <= e2[k]:
                hi_k[k] = x2[k]
                x2[k] = x1[k]
                e2[k] = e1[k]
                x1[k] = hi_k[k] - GOLDEN * (hi_k[k] - lo_k[k])
                inv_t[k] = np.float32(1.0 / (x1[k] * rms[k]))
            else:
                lo_k[k] = x1[k]
                x1[k] = x2[k]
                e1[k] = e2[k]
                x2[k] = lo_k[k] + GOLDEN * (hi_k[k] - lo_k[k])
                inv_t[k] = np.float32(1.0 / (x2[k] * rms[k]))
        _evaluate(t, lo, hi, inv_t, levels, origin, inv_width, first, threshold, uu, err, scale)
        _keep_better(err, scale, inv_t, best_err, best_scale, best_inv_t)
        for k in range(LANES):
            if e1[k] <= e2[k] and inv_t[k] == np.float32(1.0 / (x1[k] * rms[k])):
                e1[k] = err[k]
            else:
                e2[k] = err[k]
    for k in range(LANES):   # Lloyd step: codes at the refitted scale
        inv_t[k] = np.float32(1.0 / max(best_scale[k], NORM_FLOOR))
    _evaluate(t, lo, hi, inv_t, levels, origin, inv_width, first, threshold, uu, err, scale)
    _keep_better(err, scale, inv_t, best_err, best_scale, best_inv_t)


@_jit
def _store_codes_and_pack(t, codes, inv_t_col, group, block, bits, levels_unused,
                          origin, inv_width, first, threshold, tile, n_tiles_blocks,
                          n_blocks, packed):
    for j in range(block):
        base = j * LANES
        col = (j // group) * LANES
        for k in range(LANES):
            codes[base + k] = _nearest(t[base + k] * inv_t_col[col + k], origin, inv_width,
                                       first, threshold)
    for lane in range(LANES):
        if tile * LANES + lane >= n_tiles_blocks:
            break
        row, blk = _block_of(tile, lane, n_blocks)
        byte0 = blk * block * bits // 8
        for i in range(0, block, 8):
            word = np.uint64(0)
            for q in range(8):
                word |= np.uint64(codes[(i + q) * LANES + lane]) << np.uint64(q * bits)
            out = byte0 + (i // 8) * bits
            for q in range(bits):
                packed[row, out + q] = np.uint8((word >> np.uint64(8 * q)) & np.uint64(0xFF))


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def encode(src, in_features, block, group, bits, refined, search,
           levels, origin, inv_width, first, threshold, packed, scales, tile_error):
    """Quantize ``src`` (uint16 bf16 bits or uint32 fp32 bits, shape (rows, in)).

    Writes packed codes, float32 scales (fp16-representable) and the squared
    weight-domain error of each tile. ``search`` = (k_low, k_high, evaluations).
    """
    rows = src.shape[0]
    n_blocks = packed.shape[1] * 8 // (bits * block)
    total = rows * n_blocks
    n_tiles = -(-total // LANES)
    groups = block // group
    for tile in prange(n_tiles):
        bits32 = np.empty(block * LANES, np.uint32)
        t = bits32.view(np.float32)
        codes = np.empty(block * LANES, np.uint8)
        inv_t_col = np.empty(groups * LANES, np.float32)
        _load_tile(src, tile, total, n_blocks, block, in_features, bits32)
        norm = np.zeros(LANES)
        for j in range(block):
            for k in range(LANES):
                norm[k] += np.float64(t[j * LANES + k]) * t[j * LANES + k]
        inv_norm = np.empty(LANES, np.float32)
        ref_scale = np.empty(LANES)
        for k in range(LANES):
            n32 = np.float32(max(math.sqrt(norm[k]), NORM_FLOOR))
            inv_norm[k] = np.float32(1.0) / n32
            ref_scale[k] = _fp16_round(n32)
        _fwht_tile(t, block)
        error = 0.0
        uu = np.zeros(LANES)
        best_err = np.empty(LANES)
        best_scale = np.empty(LANES)
        best_inv_t = np.empty(LANES, np.float32)
        rms = np.empty(LANES)
        for g in range(groups):
            lo = g * group
            hi = lo + group
            uu[:] = 0.0
            for j in range(lo, hi):
                for k in range(LANES):
                    uu[k] += np.float64(t[j * LANES + k]) * t[j * LANES + k]
            best_scale[:] = ref_scale
            best_inv_t[:] = inv_norm
            _error_at(t, lo, hi, inv_norm, ref_scale, levels, origin, inv_width, first,
                      threshold, uu, best_err)
            if refined:
                for k in range(LANES):
                    rms[k] = max(math.sqrt(uu[k] / group), NORM_FLOOR)
                _search_group(t, lo, hi, rms, search, levels, origin, inv_width, first,
                              threshold, uu, best_err, best_scale, best_inv_t)
            for k in range(LANES):
                inv_t_col[g * LANES + k] = best_inv_t[k]
                if tile * LANES + k < total:
                    row, blk = _block_of(tile, k, n_blocks)
                    scales[row, blk * groups + g] = best_scale[k]
                    error += best_err[k]
        _store_codes_and_pack(t, codes, inv_t_col, group, block, bits, levels, origin,
                              inv_width, first, threshold, tile, total, n_blocks, packed)
        tile_error[tile] = error / block


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def decode(packed, scales, levels, bits, block, group, in_features, out):
    """Rebuild rows from codes and scales; ``out`` is float32 or uint16 (bf16 bits)."""
    rows = packed.shape[0]
    n_blocks = packed.shape[1] * 8 // (bits * block)
    total = rows * n_blocks
    n_tiles = -(-total // LANES)
    groups = block // group
    mask = np.uint64((1 << bits) - 1)
    inv_block = np.float32(1.0 / block)
    for tile in prange(n_tiles):
        t = np.zeros(block * LANES, np.float32)
        for lane in range(LANES):
            if tile * LANES + lane >= total:
                break
            row, blk = _block_of(tile, lane, n_blocks)
            byte0 = blk * block * bits // 8
            for i in range(0, block, 8):
                word = np.uint64(0)
                for q in range(bits):
                    word |= np.uint64(packed[row, byte0 + (i // 8) * bits + q]) << np.uint64(8 * q)
                for q in range(8):
                    t[(i + q) * LANES + lane] = levels[(word >> np.uint64(q * bits)) & mask]
            for g in range(groups):
                s = np.float32(scales[row, blk * groups + g]) * inv_block
                for j in range(g * group, (g + 1) * group):
                    t[j * LANES + lane] *= s
        _fwht_tile(t, block)
        bits32 = t.view(np.uint32)
        for lane in range(LANES):
            if tile * LANES + lane >= total:
                break
            row, blk = _block_of(tile, lane, n_blocks)
            col0 = blk * block
            stop = min(block, in_features - col0)
            for j in range(stop):
                if out.itemsize == 2:   # fp32 -> bf16 bits, round to nearest even
                    b = bits32[j * LANES + lane]
                    out[row, col0 + j] = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                else:
                    out[row, col0 + j] = t[j * LANES + lane]
