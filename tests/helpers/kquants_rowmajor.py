"""The previous row-major numpy port of llama.cpp's K-quant reference quantizers (train/export/kquants.py
before it went column-major), kept as a test oracle: sums left to right over the last axis by a column
loop, `nearest_int` by the bit trick everywhere, every candidate's levels tracked. It matched the C
fixture (tests/fixtures/kquant_blocks.json); tests/unit/test_export_kquants.py checks that the product's
bytes equal these on random and adversarial blocks, which the 9 C blocks alone do not cover."""
from __future__ import annotations

from typing import Callable

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml-quants.c nearest_int: add 1.5 * 2^23 in float32 and read the low mantissa bits
    (round half to even for |v| < 2^22; the same wrapped value as C beyond)."""
    val = (np.asarray(v, dtype=F32) + F32(12582912.0)).view(np.int32)
    return (val & 0x007FFFFF) - 0x00400000


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in float32, left to right, as the C loops accumulate (not np.sum's
    pairwise order); column by column over a transposed copy, 3x faster than np.cumsum."""
    cols = np.ascontiguousarray(np.moveaxis(np.asarray(a, dtype=F32), -1, 0))
    acc = cols[0].copy()
    for col in cols[1:]:
        acc += col
    return acc


def _fp16(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=F32).astype(np.float16)


def _signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max |x|, the x that has it: the first such, as the C loops' strict `>` keeps)."""
    idx = np.abs(x).argmax(axis=-1)[..., None]
    signed = np.take_along_axis(x, idx, axis=-1)[..., 0]
    return np.abs(signed), signed


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) on rows of x: (scale, L in [0, 2*nmax))."""
    amax, vmax = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    w = x * x
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lq = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lq.astype(F32)
        return lq, _seqsum(wx * lf), _seqsum((w * lf) * lf)

    with np.errstate(divide="ignore", invalid="ignore"):
        lq, sumlx, suml2 = trial(F32(-nmax) / vmax)
        levels = lq + nmax
        scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0)).astype(F32)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            lq, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / vmax)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            levels = np.where(better[:, None], lq + nmax, levels)
            scale = np.where(better, sumlx / np.where(better, suml2, F32(1)), scale).astype(F32)
            best = np.where(better, scale * sumlx, best).astype(F32)
    levels[zero] = 0
    scale[zero] = 0
    return scale, levels


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): a greedy per-value refinement of the levels.

    The C loop stops after a pass that changed nothing; such a pass leaves the state as it was,
    so running all 5 passes vectorized gives the same result."""
    amax, vmax = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        levels = np.clip(nearest_int((F32(-nmax) / vmax)[:, None] * x), -nmax, nmax - 1)
        lf = levels.astype(F32)
        sumlx = _seqsum(wx * lf)
        suml2 = _seqsum((w * lf) * lf)
        for _ in range(5):
            for i in range(x.shape[1]):
                wi, xi, li = w[:, i], x[:, i], levels[:, i].astype(F32)
                slx = sumlx - wx[:, i] * li
                sl2 = suml2 - (wi * li) * li
                positive = slx > 0
                new = np.clip(nearest_int((xi * sl2) / np.where(positive, slx, F32(1))), -nmax, nmax - 1)
                nf = new.astype(F32)
                slx = slx + wx[:, i] * nf
                sl2 = sl2 + (wi * nf) * nf
                take = (positive & (new != levels[:, i]) & (sl2 > 0)
                        & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2))
                levels[:, i] = np.where(take, new, levels[:, i])
                sumlx = np.where(take, slx, sumlx).astype(F32)
                suml2 = np.where(take, sl2, suml2).astype(F32)
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0)).astype(F32)
    levels = levels + nmax
    levels[zero] = 0
    scale[zero] = 0
    return scale, levels


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants(..., use_mad=false) on rows of x: (scale, -min, L in [0, nmax])."""
    lo = np.minimum(x.min(axis=-1), F32(0))
    hi = x.max(axis=-1)
    sum_w = _seqsum(weights)
    sum_x = _seqsum(weights * x)
    flat = hi == lo
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / np.where(flat, F32(1), hi - lo)
        scale = (F32(1) / iscale).astype(F32)
        levels = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        diff = (scale[:, None] * levels.astype(F32) + lo[:, None]) - x
        best = _seqsum(weights * (diff * diff))
        for step in range(nstep + 1):
            rng = np.where(flat, F32(1), hi - lo)
            iscale = ((F32(rmin) + F32(rdelta) * F32(step)) + F32(nmax)) / rng
            lq = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
            lf = lq.astype(F32)
            wl = weights * lf
            sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, F32(0), this_min).astype(F32)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale).astype(F32)
            diff = (this_scale[:, None] * lf + this_min[:, None]) - x
            cur = _seqsum(weights * (diff * diff))
            better = (det > 0) & (cur < best) & ~flat
            levels = np.where(better[:, None], lq, levels)
            best = np.where(better, cur, best).astype(F32)
            scale = np.where(better, this_scale, scale).astype(F32)
            lo = np.where(better, this_min, lo).astype(F32)
    levels[flat] = 0
    scale[flat] = 0
    return scale, -lo, levels


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
    sub = blocks.reshape(nb * 8, 32)
    av_x = np.sqrt(_seqsum(sub * sub) / F32(32)).astype(F32)
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, levels = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins, levels = scales.reshape(nb, 8), mins.reshape(nb, 8), levels.reshape(nb, 8, 32)
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
        fresh = np.clip(nearest_int((blocks.reshape(nb, 8, 32) + ml[..., None]) / dl[..., None]), 0, nmax)
    levels = np.where((dl != 0)[..., None], fresh, levels).reshape(nb, QK_K).astype(np.uint8)
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
    scales, levels = make_qx_quants(blocks.reshape(nb * 16, 16), 32)
    scales, levels = scales.reshape(nb, 16), levels.reshape(nb, 16, 16)
    max_abs, max_scale = _signed_absmax(scales)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (F32(-128) / np.where(zero, F32(1), max_scale)).astype(F32)
        d = _fp16(F32(1) / iscale)
        sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
        dl = d.astype(F32)[:, None] * sc.astype(F32)
        fresh = np.clip(nearest_int(blocks.reshape(nb, 16, 16) / dl[..., None]), -32, 31) + 32
    levels = np.where((dl != 0)[..., None], fresh, levels).reshape(nb, 2, 4, 32).astype(np.uint8)
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
    scales, levels = make_q3_quants(blocks.reshape(nb * 16, 16), 4)
    scales, levels = scales.reshape(nb, 16), levels.reshape(nb, 16, 16)
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
