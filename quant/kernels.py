"""Fused numba kernels: the HLWQ encoder, the decoder and the metric sums.

Work is cut into tiles of ``LANES`` rotation blocks, consecutive in row-major
block order (so any shape fills the tiles), and tiles run in parallel. Per tile:

1. load the blocks (bf16 bit patterns or fp32) and their L2 norms;
2. rotate: the Walsh-Hadamard butterflies run on a transposed copy
   (``tile[j, lane]``) so every butterfly is one SIMD operation across lanes;
   two buffers alternate because in-place updates defeat the vectoriser;
3. per group of rotated values: reference codes, or a scale search (below);
4. pack the codes.

Everything works in the *unnormalised* Hadamard domain ``u = w @ (sqrt(B) H)``
where a stored scale ``s`` reconstructs ``u_hat = s * level`` directly: the
reference's scale ``||w||`` is ``rms(u)`` and errors in ``u`` are ``B`` times
errors in ``w``.

Nearest level: a uniform lookup table over the midpoints whose cells are at
most half the smallest midpoint gap, so a cell holds at most one midpoint and
``code = first[cell] + (z > threshold[cell])`` is exact and branch free. The
search uses a one-lookup approximation (the level nearest the cell's centre),
which only differs for values within a cell of a midpoint, where both levels
are almost equally good.

Scale search (refined mode), per group: candidate scales ``factor * anchor``
where the anchor is the group's rms or its absmax divided by the largest
level; each candidate takes the nearest codes and refits the scale by least
squares; then Lloyd steps (codes at the best refitted scale, refit again).
The winner and the reference choice (``||w||``, its codes) are then scored
exactly, with the scale rounded to fp16, and the better one is kept, so no
group ends up worse than the reference encoder's. A zero-padded block is
finally compared with the reference on its real columns only (decode crops
the padding, which the rotated-domain error counts).

Speed notes: array indices are unsigned (signed ones carry negative-index
wrap checks that block vectorisation), and table indices are masked to 31 bits
so the gathers use 32-bit offsets.
"""

from __future__ import annotations

import functools
import math
import sys

import numba
import numpy as np
from numba import prange

LANES = 32
NORM_FLOOR = 1e-10
ANCHOR_RMS, ANCHOR_ABSMAX = 0, 1
_FASTMATH = {"reassoc", "nsz", "contract"}   # no nnan/ninf: the tables hold +inf
_U = np.uint64                               # unsigned indices: no negative-index wrap checks
_inline = numba.njit(inline="always", cache=True, fastmath=_FASTMATH)


class NearestTable:
    """Lookup tables for the nearest level of a sorted codebook (see module docstring)."""

    def __init__(self, codebook: np.ndarray):
        levels = np.ascontiguousarray(codebook, dtype=np.float32)
        mids = (levels[:-1] + levels[1:]) / np.float32(2)
        width = float(np.min(np.diff(mids))) / 2 if mids.size > 1 else 1.0
        if not width > 0:
            raise ValueError("codebook levels must be strictly increasing")
        origin = float(mids[0]) - width   # cell 0 holds everything below the first midpoint
        cells = math.ceil((float(mids[-1]) - origin) / width) + 2
        starts = origin + width * np.arange(cells, dtype=np.float64)
        first = np.searchsorted(mids.astype(np.float64), starts - 0.01 * width, side="left")
        centre = np.searchsorted(mids.astype(np.float64), starts + 0.5 * width, side="left")
        self.levels = levels
        self.origin = np.float32(origin)
        self.inv_width = np.float32(1.0 / width)
        self.first = first.astype(np.uint32)
        self.threshold = np.append(mids, np.float32(np.inf))[first].astype(np.float32)
        self.approx = levels[centre]


@_inline
def _index(i):
    """A table index the compiler knows is non-negative and 31-bit (cheap SIMD gathers)."""
    return np.uint32(i) & np.uint32(0x7FFFFFFF)


@_inline
def _cell(z, origin, inv_width, top):
    f = (z - origin) * inv_width
    # Explicit selects, not min/max: a NaN must land on a valid index too.
    f = f if f < top else top  # noqa: FURB136
    return _index(f if f > np.float32(0.0) else np.float32(0.0))  # noqa: FURB136


@_inline
def _fp16_round(x):
    """The fp16 value nearest to a non-negative float (ties to even), as float64."""
    if x <= 0.0:
        return 0.0
    if x >= 65520.0:
        return math.inf
    step = max(math.frexp(x)[1] - 11, -24)
    return np.rint(math.ldexp(x, -step)) * math.ldexp(1.0, step)


# ---------------------------------------------------------------- rotation
@_inline
def _radix8(src, dst, n, h, lanes):
    """Three butterfly stages (strides h, 2h, 4h) from src to dst, on rows i + r*h."""
    s = _U(h * lanes)
    for start in range(0, n, 8 * h):
        for i in range(start, start + h):
            o = _U(i * lanes)
            for q in range(_U(lanes)):
                x0 = src[o + q]
                x1 = src[o + s + q]
                x2 = src[o + _U(2) * s + q]
                x3 = src[o + _U(3) * s + q]
                x4 = src[o + _U(4) * s + q]
                x5 = src[o + _U(5) * s + q]
                x6 = src[o + _U(6) * s + q]
                x7 = src[o + _U(7) * s + q]
                a0 = x0 + x1
                a1 = x0 - x1
                a2 = x2 + x3
                a3 = x2 - x3
                a4 = x4 + x5
                a5 = x4 - x5
                a6 = x6 + x7
                a7 = x6 - x7
                b0 = a0 + a2
                b2 = a0 - a2
                b1 = a1 + a3
                b3 = a1 - a3
                b4 = a4 + a6
                b6 = a4 - a6
                b5 = a5 + a7
                b7 = a5 - a7
                dst[o + q] = b0 + b4
                dst[o + _U(4) * s + q] = b0 - b4
                dst[o + s + q] = b1 + b5
                dst[o + _U(5) * s + q] = b1 - b5
                dst[o + _U(2) * s + q] = b2 + b6
                dst[o + _U(6) * s + q] = b2 - b6
                dst[o + _U(3) * s + q] = b3 + b7
                dst[o + _U(7) * s + q] = b3 - b7


@_inline
def _radix4(src, dst, n, h, lanes):
    s = _U(h * lanes)
    for start in range(0, n, 4 * h):
        for i in range(start, start + h):
            o = _U(i * lanes)
            for q in range(_U(lanes)):
                x0 = src[o + q]
                x1 = src[o + s + q]
                x2 = src[o + _U(2) * s + q]
                x3 = src[o + _U(3) * s + q]
                a0 = x0 + x1
                a1 = x0 - x1
                a2 = x2 + x3
                a3 = x2 - x3
                dst[o + q] = a0 + a2
                dst[o + _U(2) * s + q] = a0 - a2
                dst[o + s + q] = a1 + a3
                dst[o + _U(3) * s + q] = a1 - a3


@_inline
def _radix2(src, dst, n, h, lanes):
    s = _U(h * lanes)
    for start in range(0, n, 2 * h):
        for i in range(start, start + h):
            o = _U(i * lanes)
            for q in range(_U(lanes)):
                x0 = src[o + q]
                x1 = src[o + s + q]
                dst[o + q] = x0 + x1
                dst[o + s + q] = x0 - x1


@_inline
def _fwht_transposed(a, b, n, lanes):
    """Unnormalised Walsh-Hadamard transform of each lane of ``a`` (rows of ``lanes``).

    Uses ``b`` as the second buffer; returns the buffer holding the result."""
    h = 1
    src, dst = a, b
    while h < n:
        if h * 8 <= n:
            _radix8(src, dst, n, h, lanes)
            h *= 8
        elif h * 4 <= n:
            _radix4(src, dst, n, h, lanes)
            h *= 4
        else:
            _radix2(src, dst, n, h, lanes)
            h *= 2
        src, dst = dst, src
    return src


@_inline
def _untranspose(t, u, block):
    for k in range(_U(LANES)):
        for j in range(_U(block)):
            u[k * _U(block) + j] = t[j * _U(LANES) + k]


# ---------------------------------------------------------------- load / pack
@_inline
def _load_transposed(src, fp32, tile, total, n_blocks, block, in_features, t, norm):
    """Transposed copy of a tile (``t[j * LANES + lane]``) as fp32, and the block norms.

    ``src`` is uint16: bf16 bit patterns (the top half of an fp32) or, when ``fp32``,
    fp32 values as little-endian pairs of halves. NaN/Inf values are loaded as 0 and
    counted; the count is returned."""
    exponent = np.uint32(0x7F800000)
    stride = _U(1 + np.int64(fp32))                  # uint16 words per value
    low_mask = np.uint32(0xFFFF) * np.uint32(fp32)   # bf16 has no low half
    non_finite = 0
    for lane in range(LANES):
        flat = tile * LANES + lane
        stop = 0
        sq = 0.0
        if flat < total:
            src_row = src[flat // n_blocks]
            col0 = (flat % n_blocks) * block
            stop = min(block, in_features - col0)
            for j in range(_U(stop)):
                at = stride * (_U(col0) + j)
                bits = np.uint32((np.uint32(src_row[at + stride - _U(1)]) << np.uint32(16))
                                 | (np.uint32(src_row[at]) & low_mask))
                bad = (bits & exponent) == exponent
                non_finite += bad
                x = np.float32(0.0) if bad else bits.view(np.float32)
                t[j * _U(LANES) + _U(lane)] = x
                sq += np.float64(x) * x
        for j in range(_U(stop), _U(block)):
            t[j * _U(LANES) + _U(lane)] = 0.0
        norm[lane] = max(math.sqrt(sq), NORM_FLOOR)
    return non_finite


@_inline
def _pack(codes, lane, block, bits, packed_row, byte0):
    first_code = _U(lane * block)
    for i in range(_U(0), _U(block), _U(8)):
        word = _U(0)
        for q in range(_U(8)):
            word |= _U(codes[first_code + i + q]) << (q * _U(bits))
        at = _U(byte0) + (i >> _U(3)) * _U(bits)
        for q in range(_U(bits)):
            packed_row[at + q] = np.uint8((word >> (_U(8) * q)) & _U(0xFF))


# ---------------------------------------------------------------- passes over one group
@_inline
def _approx_fit(u, lo, hi, inv_t, approx, origin, inv_width, top):
    """Least-squares fit at scale 1/inv_t with approximate nearest levels: (uc, cc)."""
    uc = np.float32(0.0)
    cc = np.float32(0.0)
    for j in range(_U(lo), _U(hi)):
        lev = approx[_cell(u[j] * inv_t, origin, inv_width, top)]
        uc += u[j] * lev
        cc += lev * lev
    return np.float64(uc), np.float64(cc)


@_inline
def _nearest_codes(u, lo, hi, inv_t, codes, origin, inv_width, first, threshold, top):
    """Nearest codes at scale 1/inv_t written to ``codes`` (the reference encoder)."""
    for j in range(_U(lo), _U(hi)):
        z = u[j] * inv_t
        cell = _cell(z, origin, inv_width, top)
        codes[j] = first[cell] + np.uint32(z > threshold[cell])


@_inline
def _search(u, lo, hi, uu, norm, levels, anchors, factors, lloyd_steps, approx, origin,
            inv_width, top):
    """Best candidate scale (1/inv_t to take codes at) by approximate least-squares error."""
    amax = np.float32(0.0)
    for j in range(_U(lo), _U(hi)):
        amax = max(amax, abs(u[j]))
    rms = max(math.sqrt(uu / (hi - lo)), NORM_FLOOR)
    by_absmax = max(amax / levels[levels.size - 1], NORM_FLOOR)
    best_err = np.inf
    best_inv_t = np.float32(1.0 / norm)
    best_fit = norm
    for c in range(factors.size):
        anchor = rms if anchors[c] == ANCHOR_RMS else by_absmax
        inv_t = np.float32(1.0 / (factors[c] * anchor))
        uc, cc = _approx_fit(u, lo, hi, inv_t, approx, origin, inv_width, top)
        err = -uc * uc / cc          # least-squares error minus ||u||^2
        if err < best_err:
            best_err, best_inv_t, best_fit = err, inv_t, max(uc / cc, NORM_FLOOR)
    for _ in range(lloyd_steps):     # codes at the refitted scale, refit again
        inv_t = np.float32(1.0 / best_fit)
        uc, cc = _approx_fit(u, lo, hi, inv_t, approx, origin, inv_width, top)
        err = -uc * uc / cc
        if not err < best_err:
            break
        best_err, best_inv_t, best_fit = err, inv_t, max(uc / cc, NORM_FLOOR)
    return best_inv_t


@_inline
def _exact_pair(u, lo, hi, inv_a, inv_b, codes_a, codes_b, levels, origin, inv_width, first,
                threshold, top):
    """Nearest codes at two scales in one pass (``codes_b`` indexed from 0); returns the
    least-squares sums (uc_a, cc_a, uc_b, cc_b) in float64."""
    uc_a = cc_a = uc_b = cc_b = 0.0
    for j in range(_U(lo), _U(hi)):
        x = u[j]
        za = x * inv_a
        zb = x * inv_b
        cell_a = _cell(za, origin, inv_width, top)
        cell_b = _cell(zb, origin, inv_width, top)
        code_a = _index(first[cell_a] + np.uint32(za > threshold[cell_a]))
        code_b = _index(first[cell_b] + np.uint32(zb > threshold[cell_b]))
        codes_a[j] = code_a
        codes_b[j - _U(lo)] = code_b
        lev_a = np.float64(levels[code_a])
        lev_b = np.float64(levels[code_b])
        uc_a += x * lev_a
        cc_a += lev_a * lev_a
        uc_b += x * lev_b
        cc_b += lev_b * lev_b
    return uc_a, cc_a, uc_b, cc_b


@_inline
def _refine_group(u, lo, hi, inv_norm, ref_scale, norm, codes, alt_codes, levels, anchors,
                  factors, lloyd_steps, approx, origin, inv_width, first, threshold, top):
    """Reference codes in ``codes``, replaced by the searched ones when those are better
    in the rotated domain; returns (scale, squared error)."""
    uu = 0.0
    for j in range(_U(lo), _U(hi)):
        uu += np.float64(u[j]) * u[j]
    inv_t = _search(u, lo, hi, uu, norm, levels, anchors, factors, lloyd_steps, approx, origin,
                    inv_width, top)
    uc_r, cc_r, uc, cc = _exact_pair(u, lo, hi, inv_norm, inv_t, codes, alt_codes, levels,
                                     origin, inv_width, first, threshold, top)
    ref_err = uu - 2.0 * ref_scale * uc_r + ref_scale * ref_scale * cc_r
    scale = _fp16_round(max(uc / cc, 0.0))
    err = uu - 2.0 * scale * uc + scale * scale * cc
    if err < ref_err:
        codes[lo:hi] = alt_codes[: hi - lo]
        return scale, err
    return ref_scale, ref_err


@_inline
def _cropped_error(src, fp32, row, col0, stop, codes, group_scales, group, levels, work):
    """Squared error over the real columns [0, stop) of one block given its codes and
    scales: padding columns are cropped on decode, so they do not count."""
    block = work.size
    for j in range(block):
        work[j] = np.float32(group_scales[j // group]) * levels[codes[j]]
    half = 1
    while half < block:   # one block only: plain butterflies
        for i in range(0, block, 2 * half):
            for j in range(i, i + half):
                a = work[j]
                b = work[j + half]
                work[j] = a + b
                work[j + half] = a - b
        half *= 2
    stride = 1 + np.int64(fp32)
    low_mask = np.uint32(0xFFFF) * np.uint32(fp32)
    err = 0.0
    for j in range(stop):
        at = stride * (col0 + j)
        bits = np.uint32((np.uint32(src[row, at + stride - 1]) << np.uint32(16))
                         | (np.uint32(src[row, at]) & low_mask))
        diff = np.float64(bits.view(np.float32)) - np.float64(work[j]) / block
        err += diff * diff
    return err


@_inline
def _prefer_reference_if_better(src, fp32, row, col0, stop, u, inv_norm, ref_scale, codes,
                                group_scales, ref_codes, ref_scales, work, levels, group,
                                origin, inv_width, first, threshold, top):
    """For a zero-padded block the rotated-domain error also counts the padding, which
    decode crops: keep the reference choice unless the real columns gained."""
    ours = _cropped_error(src, fp32, row, col0, stop, codes, group_scales, group, levels, work)
    _nearest_codes(u, 0, u.size, inv_norm, ref_codes, origin, inv_width, first, threshold, top)
    ref_scales[:] = ref_scale
    if _cropped_error(src, fp32, row, col0, stop, ref_codes, ref_scales, group, levels,
                      work) <= ours:
        codes[:] = ref_codes
        group_scales[:] = ref_scale


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def encode(src, fp32, in_features, block, group, bits, refined, anchors, factors, lloyd_steps,
           levels, approx, origin, inv_width, first, threshold, packed, scales, tile_error,
           tile_non_finite):
    """Quantize ``src`` (rows of bf16 bits, or of fp32 bits as uint16 pairs when ``fp32``).

    Writes packed codes, float32 scales (fp16-representable), the squared
    weight-domain error of each tile (padding included) and its count of NaN/Inf
    inputs (a tile with any is garbage: the caller raises).
    """
    rows = src.shape[0]
    n_blocks = packed.shape[1] * 8 // (bits * block)
    total = rows * n_blocks
    groups = block // group
    top = np.float32(first.size - 1)
    for tile in prange(-(-total // LANES)):
        u = np.empty(block * LANES, np.float32)
        t1 = np.empty(block * LANES, np.float32)
        t2 = np.empty(block * LANES, np.float32)
        codes = np.empty(block * LANES, np.uint8)
        alt_codes = np.empty(block, np.uint8)
        work = np.empty(block, np.float32)
        group_scales = np.empty(groups)
        ref_scales = np.empty(groups)
        norm = np.empty(LANES)
        tile_non_finite[tile] = _load_transposed(src, fp32, tile, total, n_blocks, block,
                                                 in_features, t1, norm)
        _untranspose(_fwht_transposed(t1, t2, block, LANES), u, block)
        error = 0.0
        for lane in range(min(LANES, total - tile * LANES)):
            flat = tile * LANES + lane
            row = flat // n_blocks
            col0 = (flat % n_blocks) * block
            inv_norm = np.float32(1.0) / np.float32(norm[lane])
            ref_scale = _fp16_round(norm[lane])
            lo = lane * block
            if not refined:
                _nearest_codes(u, lo, lo + block, inv_norm, codes, origin, inv_width, first,
                               threshold, top)
                group_scales[:] = ref_scale
            else:
                for g in range(groups):
                    group_scales[g], err = _refine_group(
                        u, lo + g * group, lo + (g + 1) * group, inv_norm, ref_scale,
                        norm[lane], codes, alt_codes, levels, anchors, factors, lloyd_steps,
                        approx, origin, inv_width, first, threshold, top)
                    error += max(err, 0.0)
                stop = min(block, in_features - col0)
                if stop < block:
                    _prefer_reference_if_better(
                        src, fp32, row, col0, stop, u[lo:lo + block], inv_norm, ref_scale,
                        codes[lo:lo + block], group_scales, alt_codes, ref_scales, work, levels,
                        group, origin, inv_width, first, threshold, top)
            scales[row, col0 // group:col0 // group + groups] = group_scales
            _pack(codes, lane, block, bits, packed[row], col0 * bits // 8)
        tile_error[tile] = error / block


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def decode(packed, scales, levels, bits, block, group, in_features, fp32, out):
    """Rebuild rows from codes and scales into ``out`` (uint16): bf16 bits, or when
    ``fp32`` the fp32 values as little-endian pairs of halves."""
    rows = packed.shape[0]
    n_blocks = packed.shape[1] * 8 // (bits * block)
    total = rows * n_blocks
    groups = block // group
    mask = _U((1 << bits) - 1)
    inv_block = np.float32(1.0 / block)
    for tile in prange(-(-total // LANES)):
        t1 = np.empty(block * LANES, np.float32)
        t2 = np.empty(block * LANES, np.float32)
        lanes = min(LANES, total - tile * LANES)
        if lanes < LANES:
            t1[:] = 0.0
        for lane in range(lanes):
            flat = tile * LANES + lane
            row = flat // n_blocks
            blk = flat % n_blocks
            byte0 = blk * block * bits // 8
            codes_row = packed[row]
            for g in range(groups):
                s = np.float32(scales[row, blk * groups + g]) * inv_block
                for i in range(g * group, (g + 1) * group, 8):   # 8 codes fill `bits` bytes
                    at = _U(byte0 + (i >> 3) * bits)
                    word = _U(0)
                    for q in range(_U(bits)):
                        word |= _U(codes_row[at + q]) << (_U(8) * q)
                    base = _U(i * LANES + lane)
                    for q in range(_U(8)):
                        t1[base + q * _U(LANES)] = s * levels[(word >> (q * _U(bits))) & mask]
        r_bits = _fwht_transposed(t1, t2, block, LANES).view(np.uint32)
        if fp32:
            halves = r_bits.view(np.uint16)     # little-endian: low half first
        else:
            halves = np.empty(block * LANES, np.uint16)
            for j in range(_U(block * LANES)):  # fp32 -> bf16, rounding to nearest even
                b = r_bits[j]
                halves[j] = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        width = _U(1 + np.int64(fp32))          # uint16 words per output value
        for lane in range(lanes):
            flat = tile * LANES + lane
            out_row = out[flat // n_blocks]
            col0 = _U((flat % n_blocks) * block)
            stop = _U(min(block, in_features - (flat % n_blocks) * block))
            for j in range(stop):
                for h in range(width):
                    out_row[(col0 + j) * width + h] = halves[(j * _U(LANES) + _U(lane)) * width + h]


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def level_sums(src, fp32, in_features, block, group, bits, packed, scales, n_levels, chunks):
    """Per level ``i``: sums of ``s * u`` and ``s * s`` over the values coded ``i``.

    The least-squares codebook for fixed codes and scales is their ratio (one
    Lloyd update on this tensor's own rotated coordinates). Returns (chunks, 2, L).
    """
    rows = src.shape[0]
    n_blocks = packed.shape[1] * 8 // (bits * block)
    total = rows * n_blocks
    n_tiles = -(-total // LANES)
    groups = block // group
    mask = _U((1 << bits) - 1)
    sums = np.zeros((chunks, 2, n_levels))
    for chunk in prange(chunks):
        u = np.empty(block * LANES, np.float32)
        t1 = np.empty(block * LANES, np.float32)
        t2 = np.empty(block * LANES, np.float32)
        norm = np.empty(LANES)
        for tile in range(chunk, n_tiles, chunks):
            _load_transposed(src, fp32, tile, total, n_blocks, block, in_features, t1, norm)
            _untranspose(_fwht_transposed(t1, t2, block, LANES), u, block)
            for lane in range(min(LANES, total - tile * LANES)):
                flat = tile * LANES + lane
                row = flat // n_blocks
                blk = flat % n_blocks
                byte0 = blk * block * bits // 8
                for i in range(0, block, 8):
                    word = _U(0)
                    for q in range(bits):
                        word |= _U(packed[row, byte0 + (i // 8) * bits + q]) << _U(8 * q)
                    for q in range(8):
                        j = i + q
                        s = np.float64(scales[row, blk * groups + j // group])
                        code = (word >> _U(q * bits)) & mask
                        sums[chunk, 0, code] += s * u[lane * block + j]
                        sums[chunk, 1, code] += s * s
    return sums


@_inline
def _value(row, j, fp32):
    """Element ``j`` of a row of bf16 bits, or of fp32 bits as uint16 pairs, as float64."""
    stride = _U(1 + np.int64(fp32))
    at = stride * _U(j)
    bits = np.uint32((np.uint32(row[at + stride - _U(1)]) << np.uint32(16))
                     | (np.uint32(row[at]) & (np.uint32(0xFFFF) * np.uint32(fp32))))
    return np.float64(bits.view(np.float32))


@numba.njit(parallel=True, cache=True, fastmath=_FASTMATH)
def metric_sums(ref, ref_fp32, approx, approx_fp32, cols):
    """Per row: sum r^2, sum a^2, sum r*a, sum (a-r)^2 and max |a-r|, in float64.

    Both inputs are uint16 rows (bf16 bits, or fp32 bits as pairs when the flag is set)."""
    rows = ref.shape[0]
    out = np.zeros((rows, 5))
    for i in prange(rows):
        ref_row = ref[i]
        approx_row = approx[i]
        ref_sq = approx_sq = dot = err_sq = 0.0
        max_abs = 0.0
        for j in range(_U(cols)):
            r = _value(ref_row, j, ref_fp32)
            a = _value(approx_row, j, approx_fp32)
            ref_sq += r * r
            approx_sq += a * a
            dot += r * a
            err_sq += (a - r) * (a - r)
            max_abs = max(max_abs, abs(a - r))
        out[i, 0] = ref_sq
        out[i, 1] = approx_sq
        out[i, 2] = dot
        out[i, 3] = err_sq
        out[i, 4] = max_abs
    return out


# ---------------------------------------------------------------- thread count

def _keeping_torch_threads(kernel):
    """Call ``kernel``, then restore torch's intra-op thread count.

    numba's OpenMP threading layer shares the process's OpenMP runtime with
    torch and sets its thread count on every parallel launch; without this, one
    quantize call silently switches a process pinned to 1 torch thread to one
    per core (a render after it then fights its own threads). torch is only
    consulted when the process already imported it: this module stays numpy-only.
    """
    @functools.wraps(kernel)
    def call(*args):
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch is not None else None
        try:
            return kernel(*args)
        finally:
            if threads is not None and torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    return call


encode = _keeping_torch_threads(encode)
decode = _keeping_torch_threads(decode)
level_sums = _keeping_torch_threads(level_sums)
metric_sums = _keeping_torch_threads(metric_sums)
