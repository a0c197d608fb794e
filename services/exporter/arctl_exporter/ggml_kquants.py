"""K-quant quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in numpy, which the ``gguf`` package lacks (it
dequantizes them but quantizes only the legacy types).

Each is a vectorized port of ggml's reference ``quantize_row_qN_K_ref`` (ggml-quants.c): the same
per-sub-block search (``make_qkx2_quants``, ``make_q3_quants``, ``make_qx_quants``), the same 6/4/8-bit
sub-block scales under fp16 super-block scales, the same byte layout. Rounding uses ``np.rint``
(half to even) where ggml's ``nearest_int`` does the same, so results agree with llama.cpp's
reference quantizer except, rarely, where float summation order changes a search decision. The byte
layouts are checked against ``gguf.quants.dequantize`` in tests/unit/test_export_gguf.py.

Input: float32 ``[n_blocks, 256]``; output: uint8 ``[n_blocks, type_size]``.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
GROUP_MAX_EPS = 1e-15


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _safe_div(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator != 0, numerator / np.where(denominator != 0, denominator, 1), 0).astype(
            np.float32
        )


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``x`` ``[rows, n]``: (scale, the_min) minimising the weighted error of
    ``scale * L - the_min`` with ``L`` in ``0..nmax`` (ggml's make_qkx2_quants)."""
    xmin = np.minimum(x.min(axis=-1), 0).astype(np.float32)
    xmax = x.max(axis=-1).astype(np.float32)
    span = xmax - xmin
    flat = span <= 0
    span = np.where(flat, 1, span)
    sum_w = weights.sum(axis=-1)
    sum_x = (weights * x).sum(axis=-1)

    def levels(iscale: np.ndarray, low: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(iscale[:, None] * (x - low[:, None])), 0, nmax)

    def error(scale: np.ndarray, low: np.ndarray, lv: np.ndarray) -> np.ndarray:
        diff = scale[:, None] * lv + low[:, None] - x
        return (weights * (np.abs(diff) if use_mad else diff * diff)).sum(axis=-1)

    iscale = nmax / span
    scale = (1 / iscale).astype(np.float32)
    low = xmin
    best = error(scale, low, levels(iscale, xmin))
    for step in range(nstep + 1):
        lv = levels((rmin + rdelta * step + nmax) / span, xmin)
        sum_l = (weights * lv).sum(axis=-1)
        sum_l2 = (weights * lv * lv).sum(axis=-1)
        sum_xl = (weights * lv * x).sum(axis=-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _safe_div(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = _safe_div(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive = this_min > 0
        this_scale = np.where(positive, _safe_div(sum_xl, sum_l2), this_scale)
        this_min = np.where(positive, 0, this_min)
        current = error(this_scale, this_min, lv)
        better = (det > 0) & (current < best)
        best = np.where(better, current, best)
        scale = np.where(better, this_scale, scale)
        low = np.where(better, this_min, low)
    return np.where(flat, 0, scale).astype(np.float32), np.where(flat, -xmin, -low).astype(np.float32)


def _signed_extreme(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = np.abs(x).argmax(axis=-1)
    peak = np.take_along_axis(x, index[:, None], axis=-1)[:, 0]
    return peak, np.abs(peak)


def make_q3_quants(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per row: the scale of symmetric levels ``-nmax .. nmax-1`` refined by ggml's rmse descent."""
    peak, amax = _signed_extreme(x)
    empty = amax < GROUP_MAX_EPS
    iscale = _safe_div(np.full_like(peak, -nmax), np.where(empty, 1, peak))
    lv = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    sumlx = (w * x * lv).sum(axis=-1)
    suml2 = (w * lv * lv).sum(axis=-1)
    for _ in range(5):
        changed = np.zeros(x.shape[0], dtype=bool)
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], lv[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = np.clip(np.rint(_safe_div(xi * sl2, slx)), -nmax, nmax - 1)
            slx_new = slx + wi * xi * new
            sl2_new = sl2 + wi * new * new
            take = (
                (slx > 0)
                & (new != li)
                & (sl2_new > 0)
                & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            )
            lv[:, i] = np.where(take, new, li)
            sumlx = np.where(take, slx_new, sumlx)
            suml2 = np.where(take, sl2_new, suml2)
            changed |= take
        if not changed.any():
            break
    return np.where(empty, 0, _safe_div(sumlx, suml2)).astype(np.float32)


def make_qx_quants(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per row: ggml's make_qx_quants with rmse_type 1 (weights x**2), levels ``-nmax .. nmax-1``."""
    peak, amax = _signed_extreme(x)
    empty = amax < GROUP_MAX_EPS
    safe_peak = np.where(empty, 1, peak)
    w = x * x

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lv = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return (w * x * lv).sum(axis=-1), (w * lv * lv).sum(axis=-1)

    sumlx, suml2 = sums(-nmax / safe_peak)
    scale = _safe_div(sumlx, suml2)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        slx, sl2 = sums(-(nmax + 0.1 * step) / safe_peak)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = np.where(better, _safe_div(slx, sl2), scale)
        best = np.where(better, _safe_div(slx, sl2) * slx, best)
    return np.where(empty, 0, scale).astype(np.float32)


def _pack_crumbs(levels: np.ndarray) -> np.ndarray:
    """2-bit levels ``[n, 256]`` -> ``[n, 64]``: per 128 values, byte l = L[l] | L[l+32]<<2 | L[l+64]<<4 | L[l+96]<<6."""
    parts = levels.reshape(-1, 2, 4, 32).astype(np.uint8)
    packed = parts[:, :, 0] | (parts[:, :, 1] << 2) | (parts[:, :, 2] << 4) | (parts[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _sub_levels(x: np.ndarray, step: np.ndarray, offset: np.ndarray, low: int, high: int) -> np.ndarray:
    """``clamp(rint((x + offset) / step), low, high)`` per sub-block; 0 where the step is 0 (ggml skips)."""
    q = np.clip(
        np.rint(_safe_div(x + offset[..., None], np.broadcast_to(step[..., None], x.shape))), low, high
    )
    return np.where(step[..., None] != 0, q, 0)


def _k4_scale_bytes(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins ``[n, 8]`` -> the 12 bytes of Q4_K/Q5_K."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _k4_common(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    n = blocks.shape[0]
    sub = blocks.reshape(n * 8, 32)
    av_x = np.sqrt((sub * sub).sum(axis=-1) / 32)
    scales, mins = make_qkx2_quants(sub, av_x[:, None] + np.abs(sub), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.max(axis=-1), mins.max(axis=-1)
    ls = np.minimum(63, np.rint(_safe_div(np.full_like(max_scale, 63), max_scale)[:, None] * scales))
    lm = np.minimum(63, np.rint(_safe_div(np.full_like(max_min, 63), max_min)[:, None] * mins))
    d, dmin = _fp16(max_scale / 63), _fp16(max_min / 63)
    step = d.astype(np.float32)[:, None] * ls
    offset = dmin.astype(np.float32)[:, None] * lm
    levels = _sub_levels(blocks.reshape(n, 8, 32), step, offset, 0, nmax).reshape(n, QK_K)
    return d, dmin, _k4_scale_bytes(ls, lm), levels.astype(np.uint8)


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _k4_common(blocks, 15, -1.0, 20)
    parts = levels.reshape(-1, 4, 2, 32)
    qs = (parts[:, :, 0] | (parts[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales, qs], axis=-1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _k4_common(blocks, 31, -0.5, 15)
    parts = levels.reshape(-1, 4, 2, 32)
    low = parts & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (parts >> 4).astype(np.uint8)  # [n, 4 pairs, 2, 32]: bit 2*pair + half
    qh = np.zeros((levels.shape[0], 32), dtype=np.uint8)
    for pair in range(4):
        for half in range(2):
            qh |= high[:, pair, half] << (2 * pair + half)
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales, qh, qs], axis=-1)


def quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n * 16, 16)
    scales, mins = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale, max_min = scales.max(axis=-1), mins.max(axis=-1)
    ls = np.rint(_safe_div(np.full_like(max_scale, 15), max_scale)[:, None] * scales)
    lm = np.rint(_safe_div(np.full_like(max_min, 15), max_min)[:, None] * mins)
    d, dmin = _fp16(max_scale / 15), _fp16(max_min / 15)
    step = d.astype(np.float32)[:, None] * ls
    offset = dmin.astype(np.float32)[:, None] * lm
    levels = _sub_levels(blocks.reshape(n, 16, 16), step, offset, 0, 3).reshape(n, QK_K)
    packed_scales = (ls.astype(np.uint8) & 0xF) | (lm.astype(np.uint8) << 4)
    return np.concatenate(
        [packed_scales, _pack_crumbs(levels), d[:, None].view(np.uint8), dmin[:, None].view(np.uint8)],
        axis=-1,
    )


def quantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    scales = make_q3_quants(blocks.reshape(n * 16, 16), 4).reshape(n, 16)
    peak, _ = _signed_extreme(scales)
    iscale = _safe_div(np.full_like(peak, -32), peak)
    ls = np.clip(np.rint(iscale[:, None] * scales), -32, 31) + 32  # 0..63
    ls8 = ls.astype(np.uint8)
    packed = np.zeros((n, 12), dtype=np.uint8)
    packed[:, 0:8] = (ls8[:, 0:8] & 0xF) | ((ls8[:, 8:16] & 0xF) << 4)
    for j in range(16):
        packed[:, 8 + j % 4] |= (ls8[:, j] >> 4) << (2 * (j // 4))
    d = _fp16(_safe_div(np.ones_like(iscale), iscale))
    step = d.astype(np.float32)[:, None] * (ls - 32)
    levels = _sub_levels(blocks.reshape(n, 16, 16), step, np.zeros_like(step), -4, 3).reshape(n, QK_K) + 4
    levels = levels.astype(np.uint8)
    hmask = np.zeros((n, 32), dtype=np.uint8)
    for bit in range(8):
        hmask |= ((levels[:, 32 * bit : 32 * (bit + 1)] > 3).astype(np.uint8)) << bit
    levels = np.where(levels > 3, levels - 4, levels)
    return np.concatenate([hmask, _pack_crumbs(levels), packed, d[:, None].view(np.uint8)], axis=-1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    scales = make_qx_quants(blocks.reshape(n * 16, 16), 32).reshape(n, 16)
    peak, amax = _signed_extreme(scales)
    empty = amax < GROUP_MAX_EPS
    iscale = _safe_div(np.full_like(peak, -128), np.where(empty, 1, peak))
    ls = np.where(empty[:, None], 0, np.minimum(127, np.rint(iscale[:, None] * scales)))
    d = _fp16(np.where(empty, 0, _safe_div(np.ones_like(iscale), iscale)))
    step = d.astype(np.float32)[:, None] * ls
    levels = _sub_levels(blocks.reshape(n, 16, 16), step, np.zeros_like(step), -32, 31).reshape(n, QK_K) + 32
    levels = np.where(step.repeat(16, axis=1) != 0, levels, 0).astype(np.uint8)
    parts = levels.reshape(n, 2, 4, 32)  # [half of 128, quarter, 32]
    low = parts & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    high = parts >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate(
        [ql.reshape(n, 128), qh.reshape(n, 64), ls.astype(np.int8).view(np.uint8), d[:, None].view(np.uint8)],
        axis=-1,
    )


QUANTIZERS = {
    "Q2_K": quantize_q2_k,
    "Q3_K": quantize_q3_k,
    "Q4_K": quantize_q4_k,
    "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k,
}
