"""llama.cpp's reference K-quant quantizers (Q3_K, Q4_K, Q5_K, Q6_K) in numpy, and chunked quantization.

Written by hand because no well-kept Python package quantizes K-quants: the `gguf` package (0.19)
dequantizes them but raises NotImplementedError on quantize, and llama-cpp-python ships only as
a source build of all of llama.cpp (no wheel on the package index), far too heavy for an export step.

These are ports of ggml/src/ggml-quants.c (llama.cpp, MIT licence): `quantize_row_q{3,4,5,6}_K_ref`
with their helpers `make_qx_quants` (rmse_type 1, no importance weights), `make_q3_quants`
(do_rmse) and `make_qkx2_quants`. They are the functions `llama-quantize` runs when no
importance matrix is given (`quantize_q*_K(..., quant_weights=NULL)` calls the `_ref` rows).
Bit-exactness with the C code: every value is float32; sums are accumulated sequentially
(row after row of a column-major array, unlike `np.sum`'s pairwise reduction) in the C loop's
order and operand grouping; `nearest_int` is emulated bit for bit (the 1.5 * 2^23 trick); fp16
scales round to nearest even as GGML_FP32_TO_FP16 does. A C compiler that contracts `a*b + c`
into FMA (e.g. -march=native without -ffp-contract=off) can differ in the last bit of a
scale, and then in the odd code; tests/fixtures/kquant_blocks.json holds blocks from the C code
compiled with -ffp-contract=off (tests/fixtures/make_kquant_fixture.py).

Vectorized over sub-blocks, column-major: the work arrays hold one sub-block per column (values
along axis 0), so each C accumulation loop is one `np.add.reduce(axis=0)`, which adds row after row
(`_colsum`, tested against the explicit loop); the one difference from the old left-to-right loop is
that a sum starts from +0 as the C code's `float s = 0` does. `nearest_int` followed by a clip is
computed as (v + 1.5 * 2^23) - 1.5 * 2^23 in float32 when every v of the trial is within +-2^21 (the
same integer, checked per trial from the two extreme inputs), else by the bit trick. The levels the
scale searches find are only kept for the few sub-blocks whose scale rounds to 0 (the others are
requantized from the packed scales, as in C): the search runs again on those columns with levels.
A tensor is processed CHUNK_VALUES values at a time (work arrays of about 1 MB, near the CPU caches),
in WORKERS threads. tests/helpers/kquants_rowmajor.py keeps the previous row-major port, and a test
compares the bytes of both on random and adversarial blocks (NaN, inf, denormals, zeros, outliers).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
CHUNK_VALUES = 1 << 18
WORKERS = min(4, os.cpu_count() or 1)
"""Threads quantizing chunks of one tensor at once (each holds about 10 MB of work arrays)."""
F32 = np.float32
# bytes per 256-value super-block (ggml-common.h block_q*_K), checked against gguf.GGML_QUANT_SIZES in tests
BLOCK_BYTES = {"Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml-quants.c nearest_int: add 1.5 * 2^23 in float32 and read the low mantissa bits
    (round half to even for |v| < 2^22; the same wrapped value as C beyond)."""
    val = (np.asarray(v, dtype=F32) + F32(12582912.0)).view(np.int32)
    return (val & 0x007FFFFF) - 0x00400000


MAGIC = F32(12582912.0)
"""1.5 * 2^23: nearest_int's constant; (v + MAGIC) - MAGIC rounds v half to even (see EXACT for the range)."""
EXACT = F32(2097152.0)
"""2^21: for |v| below it the float rounding above equals nearest_int (v + MAGIC stays well inside
[2^23, 2^24), where the float32 spacing is 1); otherwise (or NaN) the bit trick is used."""
REDUCE_MIN_COLUMNS = 16
"""np.add.reduce over axis 0 of a C-contiguous (n, m) array adds row after row (out[j] += a[i, j]) when
m > 1; with one column it is a contiguous pairwise sum. Below this many columns rows are added in a loop."""


def _colsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in float32, row after row, as the C loops accumulate `float s = 0; s += ...`
    (not np.sum's pairwise order over a contiguous axis). Callers keep the summed axis first
    (column-major work arrays), so this is one ufunc call; tests check it against the loop."""
    if a.shape[1] < REDUCE_MIN_COLUMNS:
        acc = F32(0) + a[0]
        for row in a[1:]:
            acc += row
        return acc
    return np.add.reduce(np.ascontiguousarray(a, dtype=F32), axis=0)


def _fp16(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=F32).astype(np.float16)


def _signed_absmax(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(max |x|, the x that has it: the first such, as the C loops' strict `>` keeps)."""
    idx = np.expand_dims(np.abs(x).argmax(axis=axis), axis)
    signed = np.take_along_axis(x, idx, axis=axis).squeeze(axis)
    return np.abs(signed), signed


def _exact_by_float(low: np.ndarray, high: np.ndarray) -> bool:
    """Whether every value to round lies strictly within +-2^21 (then float rounding equals nearest_int;
    NaN fails). The caller passes, per column, the values its smallest and largest x give: each value is
    fl(s * fl(x - m)) or fl(x * s), monotone in x, so these two bound the column."""
    return bool((np.maximum(np.abs(low), np.abs(high)) < EXACT).all())


def _round_clip(t: np.ndarray, lo: int, hi: int, by_float: bool) -> np.ndarray:
    """clip(nearest_int(t), lo, hi) as float32, in place in t when by_float."""
    if by_float:
        t += MAGIC
        t -= MAGIC
        return np.clip(t, lo, hi, out=t)
    return np.clip(nearest_int(t), lo, hi).astype(F32)


def make_qx_quants(x: np.ndarray, nmax: int, levels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) on the columns of x (n values by rows,
    column-major): (scale, L in [0, 2*nmax) or None when not asked for)."""
    amax, vmax = _signed_absmax(x, axis=0)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    xlo, xhi = x.min(axis=0), x.max(axis=0)
    w = x * x
    wx = w * x
    t = np.empty_like(x)
    tmp = np.empty_like(x)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        np.multiply(x, iscale, out=t)
        lf = _round_clip(t, -nmax, nmax - 1, _exact_by_float(xlo * iscale, xhi * iscale))
        sumlx = _colsum(np.multiply(wx, lf, out=tmp))
        np.multiply(w, lf, out=tmp)
        suml2 = _colsum(np.multiply(tmp, lf, out=tmp))
        return lf, sumlx, suml2

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lf, sumlx, suml2 = trial(F32(-nmax) / vmax)
        best_levels = lf.copy() if levels else None
        scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0)).astype(F32)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            lf, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / vmax)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if best_levels is not None:
                np.copyto(best_levels, lf, where=better)
            scale = np.where(better, sumlx / np.where(better, suml2, F32(1)), scale).astype(F32)
            best = np.where(better, scale * sumlx, best).astype(F32)
    scale[zero] = 0
    if best_levels is None:
        return scale, None
    out = best_levels.astype(np.int32) + nmax
    out[:, zero] = 0
    return scale, out


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on the columns of x (column-major): a greedy
    per-value refinement of the levels.

    The C loop stops after a pass that changed nothing; such a pass leaves the state as it was,
    so stopping once no column changed in a pass gives the same result."""
    amax, vmax = _signed_absmax(x, axis=0)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        levels = np.clip(nearest_int((F32(-nmax) / vmax) * x), -nmax, nmax - 1)
        lf = levels.astype(F32)
        sumlx = _colsum(wx * lf)
        suml2 = _colsum((w * lf) * lf)
        for _ in range(5):
            changed = np.zeros(x.shape[1], dtype=bool)
            for i in range(x.shape[0]):
                wi, xi, li = w[i], x[i], lf[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (wi * li) * li
                positive = slx > 0
                new = np.clip(nearest_int((xi * sl2) / np.where(positive, slx, F32(1))), -nmax, nmax - 1)
                nf = new.astype(F32)
                slx += wx[i] * nf
                sl2 += (wi * nf) * nf
                take = (positive & (new != levels[i]) & (sl2 > 0)
                        & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2))
                np.copyto(levels[i], new, where=take)
                np.copyto(lf[i], nf, where=take)
                np.copyto(sumlx, slx, where=take)
                np.copyto(suml2, sl2, where=take)
                changed |= take
            if not changed.any():
                break
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0)).astype(F32)
    levels = levels + nmax
    levels[:, zero] = 0
    scale[zero] = 0
    return scale, levels


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int, levels: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """make_qkx2_quants(..., use_mad=false) on the columns of x and weights (n values by rows,
    column-major): (scale, -min, L in [0, nmax] or None when not asked for)."""
    xmin, hi = x.min(axis=0), x.max(axis=0)
    lo = np.minimum(xmin, F32(0))
    sum_w = _colsum(weights)
    sum_x = _colsum(weights * x)
    flat = hi == lo
    t, wl, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def quantize(iscale: np.ndarray) -> np.ndarray:
        """clip(nearest_int(iscale * (x - lo)), 0, nmax) into t."""
        np.subtract(x, lo, out=t)
        np.multiply(t, iscale, out=t)
        return _round_clip(t, 0, nmax, _exact_by_float(iscale * (xmin - lo), iscale * (hi - lo)))

    def error(scale: np.ndarray, mn: np.ndarray, lf: np.ndarray) -> np.ndarray:
        """sum of w * ((scale * L + min) - x)^2, in tmp."""
        np.multiply(lf, scale, out=tmp)
        np.add(tmp, mn, out=tmp)
        np.subtract(tmp, x, out=tmp)
        np.multiply(tmp, tmp, out=tmp)
        return _colsum(np.multiply(tmp, weights, out=tmp))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / np.where(flat, F32(1), hi - lo)
        scale = (F32(1) / iscale).astype(F32)
        lf = quantize(iscale)
        best_levels = lf.copy() if levels else None
        best = error(scale, lo, lf)
        for step in range(nstep + 1):
            iscale = ((F32(rmin) + F32(rdelta) * F32(step)) + F32(nmax)) / np.where(flat, F32(1), hi - lo)
            lf = quantize(iscale)
            np.multiply(weights, lf, out=wl)
            sum_l = _colsum(wl)
            sum_l2 = _colsum(np.multiply(wl, lf, out=tmp))
            sum_xl = _colsum(np.multiply(wl, x, out=tmp))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, F32(0), this_min).astype(F32)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale).astype(F32)
            cur = error(this_scale, this_min, lf)
            better = (det > 0) & (cur < best) & ~flat
            if best_levels is not None:
                np.copyto(best_levels, lf, where=better)
            best = np.where(better, cur, best).astype(F32)
            scale = np.where(better, this_scale, scale).astype(F32)
            lo = np.where(better, this_min, lo).astype(F32)
    scale[flat] = 0
    if best_levels is None:
        return scale, -lo, None
    out = best_levels.astype(np.int32)
    out[:, flat] = 0
    return scale, -lo, out


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 bytes of 8 six-bit scales and mins (get_scale_min_k4's inverse)."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _scale_min_k(blocks: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """The shared half of quantize_row_q4_K_ref / q5_K_ref: sub-block scales and mins, packed."""
    nb = blocks.shape[0]
    sub = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)  # column-major: one sub-block per column
    av_x = np.sqrt(_colsum(sub * sub) / F32(32)).astype(F32)
    weights = av_x + np.abs(sub)
    scales, mins, _ = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d, dmin = _fp16(max_scale / F32(63)), _fp16(max_min / F32(63))
    dl = d.astype(F32)[:, None] * ls.astype(F32)
    ml = dmin.astype(F32)[:, None] * lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.clip(nearest_int((blocks.reshape(nb, 8, 32) + ml[..., None]) / dl[..., None]), 0, nmax)
    keep = np.flatnonzero(dl.reshape(-1) == 0)  # sub-blocks whose scale rounds to 0 keep make_qkx2's levels
    if keep.size:
        _, _, kept = make_qkx2_quants(np.ascontiguousarray(sub[:, keep]), np.ascontiguousarray(weights[:, keep]),
                                      nmax, rmin, 0.1, nstep, levels=True)
        levels.reshape(nb * 8, 32)[keep] = kept.T
    levels = levels.reshape(nb, QK_K).astype(np.uint8)
    head = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2),
                           _pack_scale_min_k4(ls, lm)], axis=1)
    return head, levels


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: d, dmin (fp16), 12 bytes of scales/mins, 128 bytes of nibbles."""
    head, levels = _scale_min_k(blocks, 15, -1.0, 20)
    lv = levels.reshape(-1, 4, 2, 32)
    qs = (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([head, qs], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref: d, dmin, scales/mins, 32 bytes of high bits, 128 bytes of nibbles."""
    head, levels = _scale_min_k(blocks, 31, -0.5, 15)
    lv = levels.reshape(-1, 4, 2, 32)
    high = (lv >> 4).astype(np.uint8)  # bit 2c of qh[j] is value 64c + j, bit 2c+1 value 64c + 32 + j
    shifts = (2 * np.arange(4, dtype=np.uint8)[:, None] + np.arange(2, dtype=np.uint8)[None, :])
    qh = np.bitwise_or.reduce((high << shifts[None, :, :, None]).reshape(-1, 8, 32), axis=1).astype(np.uint8)
    low = lv & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([head, qh, qs], axis=1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, d (fp16)."""
    nb = blocks.shape[0]
    sub = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)  # column-major: one sub-block per column
    scales, _ = make_qx_quants(sub, 32)
    scales = scales.reshape(nb, 16)
    max_abs, max_scale = _signed_absmax(scales)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (F32(-128) / np.where(zero, F32(1), max_scale)).astype(F32)
        d = _fp16(F32(1) / iscale)
        sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
        dl = d.astype(F32)[:, None] * sc.astype(F32)
        levels = np.clip(nearest_int(blocks.reshape(nb, 16, 16) / dl[..., None]), -32, 31) + 32
    keep = np.flatnonzero(dl.reshape(-1) == 0)  # sub-blocks whose scale rounds to 0 keep make_qx's levels
    if keep.size:
        levels.reshape(nb * 16, 16)[keep] = make_qx_quants(np.ascontiguousarray(sub[:, keep]), 32, levels=True)[1].T
    levels = levels.reshape(nb, 2, 4, 32).astype(np.uint8)
    low, high = levels & 0xF, levels >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                          d.view(np.uint8).reshape(nb, 2)], axis=1)
    out[zero] = 0
    return out


def quantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """quantize_row_q3_K_ref: 32 bytes high-bit mask, 64 bytes 2-bit values, 12 bytes 6-bit scales, d."""
    nb = blocks.shape[0]
    scales, levels = make_q3_quants(np.ascontiguousarray(blocks.reshape(nb * 16, 16).T), 4)
    scales, levels = scales.reshape(nb, 16), levels.T.reshape(nb, 16, 16)
    _, max_scale = _signed_absmax(scales)
    live = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (F32(-32) / np.where(live, max_scale, F32(1))).astype(F32)
        lq = np.clip(nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int16) + 32
    lq = np.where(live[:, None], lq, 0).astype(np.uint8)
    packed = np.zeros((nb, 12), dtype=np.uint8)
    packed[:, 0:8] = (lq[:, 0:8] & 0xF) | ((lq[:, 8:16] & 0xF) << 4)
    top = (lq >> 4).reshape(nb, 4, 4)  # top[:, g, k] is scale 4g + k: bits 2g of byte 8 + k
    packed[:, 8:12] = np.bitwise_or.reduce(top << (2 * np.arange(4, dtype=np.uint8))[None, :, None], axis=1)
    d = np.where(live, _fp16(F32(1) / iscale), np.float16(0)).astype(np.float16)
    dl = d.astype(F32)[:, None] * (lq.astype(np.int16) - 32).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(nearest_int(blocks.reshape(nb, 16, 16) / dl[..., None]), -4, 3) + 4
    levels = np.where((dl != 0)[..., None], fresh, levels).reshape(nb, QK_K).astype(np.uint8)
    hi = levels > 3
    levels = np.where(hi, levels - 4, levels).astype(np.uint8)
    hbits = hi.reshape(nb, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    hmask = np.bitwise_or.reduce(hbits, axis=1).astype(np.uint8)
    lv = levels.reshape(nb, 2, 4, 32)
    qs = (lv[:, :, 0] | (lv[:, :, 1] << 2) | (lv[:, :, 2] << 4) | (lv[:, :, 3] << 6)).reshape(nb, 64)
    return np.concatenate([hmask, qs, packed, d.view(np.uint8).reshape(nb, 2)], axis=1)


K_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(array: np.ndarray, qtype: object) -> np.ndarray:
    """Quantize `array` (rows along the last axis) to the ggml type `qtype` (a gguf.GGMLQuantizationType),
    CHUNK_VALUES values at a time; the result is the uint8 byte layout gguf's writer expects."""
    import gguf

    name = qtype.name  # type: ignore[attr-defined]
    if name == "F32":
        return np.asarray(array, dtype=F32)
    if name == "F16":
        return np.asarray(array, dtype=np.float16)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block:
        raise ValueError(f"rows of {array.shape[-1]} values cannot be quantized to {name} (blocks of {block})")
    flat = np.asarray(array, dtype=F32).reshape(-1, block)
    out = np.empty((flat.shape[0], type_size), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // block)
    kquant = K_QUANTIZERS.get(name)

    def one(start: int) -> None:
        chunk = flat[start:start + step]
        if kquant is None:
            out[start:start + step] = gguf.quants.quantize(chunk, qtype).reshape(-1, type_size)
            return
        with np.errstate(all="ignore"):  # per thread; only non-finite or extreme weights overflow
            out[start:start + step] = kquant(chunk)

    starts = range(0, flat.shape[0], step)
    if kquant is None or len(starts) == 1 or WORKERS == 1:
        for start in starts:
            one(start)
    else:  # chunks are independent and numpy releases the GIL in its loops: a few threads help
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            list(pool.map(one, starts))
    return out.reshape(*array.shape[:-1], array.shape[-1] // block * type_size)
