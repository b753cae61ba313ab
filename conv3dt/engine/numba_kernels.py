"""Numba kernels of the fast engines. Import this module only when a Numba path runs.

The order in which an output voxel's terms are added never depends on the box
being computed, so a tile's values equal the untiled ones bit for bit: the
direct kernels add taps in ascending order (each tap's channels first, in
ascending order); the GEMM engine's kernels only move data, except that
:func:`scatter_rows` sums the parts of a split product in their fixed order.
"""

from __future__ import annotations

import numba
import numpy as np

from conv3dt.engine import numba_cache

__all__ = [
    "UPSAMPLE_FIXED",
    "direct_region",
    "gather_rows",
    "reverse_axes",
    "scatter_rows",
    "separable_region",
    "upsample_rows",
]

# The epilogue's activation codes (conv3dt.engine.epilogue).
_RELU, _RELU6 = 1, 2


@numba.njit(inline="always")
def _finish(v: float, bias: np.ndarray, index: int, limits: np.ndarray, code: int) -> float:
    """``v`` plus ``bias[index]`` (when there is a bias), then the activation ``code``.

    NumPy's semantics: ``relu`` is ``np.maximum(v, 0)`` (NaN stays, -0 becomes
    +0), ``relu6`` is ``np.clip(v, 0, 6)`` (NaN and -0 stay).
    """
    if bias.shape[0] > 0:
        v = v + bias[index]
    zero = limits[0]
    if code == _RELU:
        v = v if (v > zero or v != v) else zero
    elif code == _RELU6:
        v = zero if v < zero else (limits[1] if v > limits[1] else v)
    return v


@numba.njit(inline="always")
def _finish_run(a: np.ndarray, bias: np.ndarray, limits: np.ndarray, code: int) -> None:
    """:func:`_finish` on every value of the 1D ``a`` in place, ``bias[i]`` to ``a[i]``.

    One loop per step with the choices made outside it, so that each vectorizes.
    """
    n = a.shape[0]
    zero = limits[0]
    six = limits[1]
    if bias.shape[0] > 0:
        for i in range(n):
            a[i] = a[i] + bias[i]
    if code == _RELU:
        for i in range(n):
            v = a[i]
            a[i] = v if (v > zero or v != v) else zero
    elif code == _RELU6:
        for i in range(n):
            v = a[i]
            a[i] = zero if v < zero else (six if v > six else v)


@numba.njit(nogil=True)
def gather_rows(
    src: np.ndarray,
    first: int,
    grid: np.ndarray,
    shift: np.ndarray,
    line_order: np.ndarray,
    line_start: np.ndarray,
    offsets: np.ndarray,
    dst: np.ndarray,
) -> None:
    """Fill a GEMM operand: row ``i`` is stream row ``first + i``, its taps side by side.

    The stream holds the lines ``(batch, grid[0], grid[1])`` of the grid (C
    order numbers them) one after another: the ``n``-th is line
    ``line_order[n]``, its points ``u2 = 0 .. grid[2] - 1`` at stream rows
    ``line_start[n] + u2`` (``line_start`` ascends, lines do not overlap);
    every other stream row is padding, a row of zeros. Point ``(b, u0, u1,
    u2)`` is voxel ``(b, u + shift)`` of the input box ``src`` and tap ``j``
    reads voxel ``(b, u + shift + offsets[j])``, or zeros outside the box.
    Only the first ``n_taps * channels`` columns of ``dst`` are written.
    """
    rows = dst.shape[0]
    n0, n1, n2, channels = src.shape[1], src.shape[2], src.shape[3], src.shape[4]
    width = offsets.shape[0] * channels
    flat = src.reshape(-1, channels)
    n_taps = offsets.shape[0]
    n_lines = line_start.shape[0]
    # Per tap, on the current line: first voxel's row, and the run's part inside the box.
    base = np.empty(n_taps, dtype=np.int64)
    lo = np.empty(n_taps, dtype=np.int64)
    hi = np.empty(n_taps, dtype=np.int64)
    n = max(np.searchsorted(line_start, first, side="right") - 1, 0)
    i = 0
    while i < rows:
        row = first + i
        if n >= n_lines:
            dst[i:, :width] = 0
            return
        u2 = row - line_start[n]
        if u2 >= grid[2]:
            n += 1
            continue
        if u2 < 0:
            run = min(-u2, rows - i)
            dst[i : i + run, :width] = 0
            i += run
            continue
        line = line_order[n]
        u1 = line % grid[1]
        plane = line // grid[1]
        u0 = plane % grid[0]
        b = plane // grid[0]
        run = min(grid[2] - u2, rows - i)
        for j in range(n_taps):
            v0 = u0 + shift[0] + offsets[j, 0]
            v1 = u1 + shift[1] + offsets[j, 1]
            v2 = u2 + shift[2] + offsets[j, 2]
            base[j] = ((b * n0 + v0) * n1 + v1) * n2 + v2
            lo[j] = 0
            hi[j] = 0
            if 0 <= v0 < n0 and 0 <= v1 < n1:
                lo[j] = min(max(0, -v2), run)
                hi[j] = max(min(run, n2 - v2), lo[j])
        for k in range(run):
            for j in range(n_taps):
                col = j * channels
                if lo[j] <= k < hi[j]:
                    s = base[j] + k
                    for c in range(channels):
                        dst[i + k, col + c] = flat[s, c]
                else:
                    for c in range(channels):
                        dst[i + k, col + c] = 0
        i += run


@numba.njit(nogil=True)
def scatter_rows(
    g: np.ndarray,
    first: int,
    grid: np.ndarray,
    q_start: np.ndarray,
    line_order: np.ndarray,
    line_start: np.ndarray,
    strides: np.ndarray,
    out_start: np.ndarray,
    phase_table: np.ndarray,
    bias: np.ndarray,
    limits: np.ndarray,
    code: int,
    out: np.ndarray,
) -> None:
    """Sum GEMM results ``g[0] + g[1] + ...`` (in that order) and copy them to the box.

    Row ``i`` of each ``g[j]`` is stream row ``first + i``, laid out as in
    :func:`gather_rows` (padding rows are skipped); grid point ``u`` is ``q =
    q_start + u``. Column block ``m`` holds the phase ``phase_table[m, a] =
    (phase, q_lo, q_hi)`` on each axis ``a``; its output ``q * stride + phase``
    is written when ``q_lo <= q < q_hi`` on every axis. The epilogue ``(bias,
    limits, code)`` (see :func:`_finish`) is applied to each written voxel.
    """
    parts, rows = g.shape[0], g.shape[1]
    finish = bias.shape[0] > 0 or code != 0
    filters = out.shape[4]
    n_phases = phase_table.shape[0]
    n_lines = line_start.shape[0]
    n = max(np.searchsorted(line_start, first, side="right") - 1, 0)
    i = 0
    while i < rows and n < n_lines:
        u2 = first + i - line_start[n]
        if u2 >= grid[2]:
            n += 1
            continue
        if u2 < 0:
            i += min(-u2, rows - i)
            continue
        line = line_order[n]
        u1 = line % grid[1]
        plane = line // grid[1]
        u0 = plane % grid[0]
        b = plane // grid[0]
        run = min(grid[2] - u2, rows - i)
        q0 = q_start[0] + u0
        q1 = q_start[1] + u1
        for m in range(n_phases):
            if not (phase_table[m, 0, 1] <= q0 < phase_table[m, 0, 2]):
                continue
            if not (phase_table[m, 1, 1] <= q1 < phase_table[m, 1, 2]):
                continue
            o0 = q0 * strides[0] + phase_table[m, 0, 0] - out_start[0]
            o1 = q1 * strides[1] + phase_table[m, 1, 0] - out_start[1]
            # The run's q2 values that fall inside this phase's range.
            lo = max(phase_table[m, 2, 1] - q_start[2] - u2, 0)
            hi = min(phase_table[m, 2, 2] - q_start[2] - u2, run)
            col = m * filters
            for k in range(lo, hi):
                o2 = (q_start[2] + u2 + k) * strides[2] + phase_table[m, 2, 0] - out_start[2]
                target = out[b, o0, o1, o2]
                for f in range(filters):
                    target[f] = g[0, i + k, col + f]
                for j in range(1, parts):
                    for f in range(filters):
                        target[f] += g[j, i + k, col + f]
                if finish:
                    _finish_run(target, bias, limits, code)
        i += run


@numba.njit(parallel=True)
def direct_region(
    x: np.ndarray,
    w: np.ndarray,
    strides: np.ndarray,
    in_origin: np.ndarray,
    out_start: np.ndarray,
    n_taps: np.ndarray,
    taps: np.ndarray,
    offsets: np.ndarray,
    bias: np.ndarray,
    limits: np.ndarray,
    code: int,
    out: np.ndarray,
) -> None:
    """Transposed convolution of a box by direct summation, for few channels.

    ``x`` is the input box channels-first, ``(batch, C, d, h, w)``; ``w`` the
    kernel as ``(kd, kh, kw, in_channels, filters)``. Axis ``a``'s phase ``p``
    has ``n_taps[a, p]`` taps ``taps[a, p, :]`` reading input offsets
    ``offsets[a, p, :]``. Every voxel of ``out`` is written. Each output value
    is summed over taps in ascending order (depth, height, width), each tap's
    channels in ascending order first; then each row of the box gets the
    epilogue ``(bias, limits, code)`` (see :func:`_finish`; ``bias`` tiled along
    the row, one value per row element).

    Along a row, the outputs of one phase ``p2`` are ``q2 * s2 + p2`` for
    consecutive ``q2``, and each tap reads consecutive input voxels for them:
    the sums run over contiguous runs of ``q2`` (vectorized), and each phase's
    results are then copied into its places in the row.
    """
    batch, len0, len1, len2, filters = out.shape
    channels, n0, n1, n2 = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    s0, s1, s2 = strides[0], strides[1], strides[2]
    finish = bias.shape[0] > 0 or code != 0
    span = len2 // s2 + 1
    for job in numba.prange(batch * len0):
        b = job // len0
        l0 = job % len0
        o0 = out_start[0] + l0
        p0 = o0 % s0
        q0 = o0 // s0
        sums = np.empty((filters, span), dtype=out.dtype)
        tap_sum = np.empty(span, dtype=out.dtype)
        for l1 in range(len1):
            o1 = out_start[1] + l1
            p1 = o1 % s1
            q1 = o1 // s1
            row = out[b, l0, l1]
            for p2 in range(s2):
                # The row's outputs of this phase: q2 in [q_lo, q_hi).
                q_lo = -((p2 - out_start[2]) // s2)
                q_hi = -((p2 - out_start[2] - len2) // s2)
                count = q_hi - q_lo
                if count <= 0:
                    continue
                sums[:, :count] = 0
                for m0 in range(n_taps[0, p0]):
                    i0 = q0 + offsets[0, p0, m0] - in_origin[0]
                    if i0 < 0 or i0 >= n0:
                        continue
                    t0 = taps[0, p0, m0]
                    for m1 in range(n_taps[1, p1]):
                        i1 = q1 + offsets[1, p1, m1] - in_origin[1]
                        if i1 < 0 or i1 >= n1:
                            continue
                        t1 = taps[1, p1, m1]
                        for m2 in range(n_taps[2, p2]):
                            r = offsets[2, p2, m2]
                            t2 = taps[2, p2, m2]
                            # ... whose input q2 + r lies inside the input box.
                            lo = max(q_lo, in_origin[2] - r)
                            hi = min(q_hi, in_origin[2] + n2 - r)
                            if hi <= lo:
                                continue
                            first = lo + r - in_origin[2]
                            at = lo - q_lo
                            n = hi - lo
                            for f in range(filters):
                                target = sums[f, at : at + n]
                                xrow = x[b, 0, i0, i1, first : first + n]
                                weight = w[t0, t1, t2, 0, f]
                                if channels == 1:
                                    for k in range(n):
                                        target[k] += xrow[k] * weight
                                    continue
                                for k in range(n):
                                    tap_sum[k] = xrow[k] * weight
                                for c in range(1, channels):
                                    xrow = x[b, c, i0, i1, first : first + n]
                                    weight = w[t0, t1, t2, c, f]
                                    for k in range(n):
                                        tap_sum[k] += xrow[k] * weight
                                for k in range(n):
                                    target[k] += tap_sum[k]
                l2 = q_lo * s2 + p2 - out_start[2]
                for k in range(count):
                    for f in range(filters):
                        row[l2 + k * s2, f] = sums[f, k]
            if finish:
                _finish_run(row.reshape(len2 * filters), bias, limits, code)


@numba.njit(inline="always")
def _upsample_rows(
    width: int,
    x: np.ndarray,
    w: np.ndarray,
    strides: np.ndarray,
    in_origin: np.ndarray,
    out_start: np.ndarray,
    bias: np.ndarray,
    limits: np.ndarray,
    code: int,
    out: np.ndarray,
) -> None:
    """Transposed convolution with ``kernel == stride`` and no dilation, few channels.

    Every output voxel then receives exactly one tap: ``out[q * s + p] = x[q] @
    kernel[p]``. ``x`` is the input box channels-first, ``(batch, C, d, h, w)``;
    ``w`` is the kernel as ``(kd, kh, C, kw * filters)`` and ``width = kw *
    filters``. ``out`` must be zeroed (voxels without input stay zero). Channels
    are summed in ascending order. Each written voxel gets the epilogue ``(bias,
    limits, code)`` (see :func:`_finish`; ``bias`` tiled along an output row, one
    value per row element), so the caller applies it to any voxel without input.
    """
    batch, len0, len1, len2, filters = out.shape
    channels, n0, n1, n2 = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    finish = bias.shape[0] > 0 or code != 0
    s0, s1, s2 = strides[0], strides[1], strides[2]
    for job in numba.prange(batch * len0):
        b = job // len0
        l0 = job % len0
        o0 = out_start[0] + l0
        i0 = o0 // s0 - in_origin[0]
        if i0 < 0 or i0 >= n0:
            continue
        p0 = o0 % s0
        for l1 in range(len1):
            o1 = out_start[1] + l1
            i1 = o1 // s1 - in_origin[1]
            if i1 < 0 or i1 >= n1:
                continue
            p1 = o1 % s1
            wrow = w[p0, p1]
            row = out[b, l0, l1].reshape(len2 * filters)
            # Flat output position e = (o2 - out_start[2]) * filters + f, with
            # o2 = q * s2 + p: q's block of ``width`` values starts at
            # (q * s2 - out_start[2]) * filters, and j = p * filters + f.
            q_first = max(out_start[2] // s2, in_origin[2])
            q_last = min((out_start[2] + len2 - 1) // s2, in_origin[2] + n2 - 1)
            if q_last < q_first:
                continue
            # Blocks cut by the box's ends (only the first and last can be) go element
            # by element ...
            size = len2 * filters
            q_lo = q_first
            q_hi = q_last + 1
            for end in range(2):
                q = q_lo if end == 0 else q_hi - 1
                if q_hi <= q_lo:
                    break
                base = (q * s2 - out_start[2]) * filters
                if base >= 0 and base + width <= size:
                    continue
                for j in range(max(0, -base), min(width, size - base)):
                    acc = x[b, 0, i0, i1, q - in_origin[2]] * wrow[0, j]
                    for c in range(1, channels):
                        acc += x[b, c, i0, i1, q - in_origin[2]] * wrow[c, j]
                    if finish:
                        acc = _finish(acc, bias, base + j, limits, code)
                    row[base + j] = acc
                if end == 0:
                    q_lo += 1
                else:
                    q_hi -= 1
            # ... whole ones channel by channel with the loop over q innermost: the same
            # additions in the same order, vectorized.
            count = q_hi - q_lo
            if count <= 0:
                continue
            first = q_lo - in_origin[2]
            block = row[(q_lo * s2 - out_start[2]) * filters :]
            xrow = x[b, 0, i0, i1, first:]
            wc = wrow[0]
            for k in range(count):
                xv = xrow[k]
                for j in range(width):
                    block[k * width + j] = xv * wc[j]
            for c in range(1, channels):
                xrow = x[b, c, i0, i1, first:]
                wc = wrow[c]
                for k in range(count):
                    xv = xrow[k]
                    for j in range(width):
                        block[k * width + j] += xv * wc[j]
            if finish:
                offset = (q_lo * s2 - out_start[2]) * filters
                _finish_run(
                    block[: count * width],
                    bias[offset : offset + count * width] if bias.shape[0] > 0 else bias,
                    limits,
                    code,
                )


@numba.njit(parallel=True)
def upsample_rows(
    width: int,
    x: np.ndarray,
    w: np.ndarray,
    strides: np.ndarray,
    in_origin: np.ndarray,
    out_start: np.ndarray,
    bias: np.ndarray,
    limits: np.ndarray,
    code: int,
    out: np.ndarray,
) -> None:
    """:func:`_upsample_rows` for any ``width``."""
    _upsample_rows(width, x, w, strides, in_origin, out_start, bias, limits, code, out)


@numba.njit(nogil=True, inline="always")
def _set_run(
    dst: np.ndarray, first: int, step: int, src: np.ndarray, start: int, count: int, channels: int
) -> None:
    """Copy ``count`` runs of ``channels`` values from ``src[start:]`` to ``dst[first:]``.

    Runs are ``step`` apart in ``dst``, contiguous in ``src``.
    """
    # Views from the offsets, so that indices are known non-negative and the
    # loops carry no wraparound checks.
    d = dst[first:]
    s = src[start:]
    for r in range(count):
        for f in range(channels):
            d[r * step + f] = s[r * channels + f]


@numba.njit(nogil=True, inline="always")
def _width_pass(
    plane: np.ndarray,
    channels: int,
    counts: np.ndarray,
    index: np.ndarray,
    weight: np.ndarray,
    phases: np.ndarray,
    phase_weight: np.ndarray,
    stride: int,
    joint: np.ndarray,
    edges: np.ndarray,
    tmp: np.ndarray,
    q: np.ndarray,
) -> None:
    """``q[h]``: row ``h`` of an input plane upsampled along width, for every ``h``.

    ``plane`` is ``(rows, width * channels)``. Output column ``ow`` (channel
    ``f`` at ``ow * channels + f``) sums ``weight[ow, t] * input[index[ow, t]]``
    for ``t < counts[ow]``, in that order. Columns whose taps all lie inside
    the row are computed phase by phase over contiguous memory, phase ``p``'s
    run into ``tmp[p]``, then set in place; ``phases[p]`` holds the phase's
    tap count, its first and last ``q`` (columns ``q * stride + first_column``),
    its first output column, and from index 4 its taps' input shifts, with
    ``phase_weight[p]`` their weights. Where every phase has a column (``q``
    from ``joint[0]`` to ``joint[1]``, all phases present) the runs are
    interleaved in one loop, which vectorizes for one channel and strides 2 to 4. The other
    columns (``edges``) follow the tables. Either way a column's terms are the
    same, added in the same order.
    """
    qa, qb = joint[0], joint[1]
    for h in range(plane.shape[0]):
        src = plane[h]
        dst = q[h]
        for p in range(phases.shape[0]):
            n = phases[p, 0]
            runs = phases[p, 2] - phases[p, 1]
            if runs <= 0:
                continue
            length = runs * channels
            out = tmp[p]
            seg = src[(phases[p, 1] + phases[p, 4]) * channels :]
            w0 = phase_weight[p, 0]
            for k in range(length):
                out[k] = w0 * seg[k]
            for j in range(1, n):
                seg = src[(phases[p, 1] + phases[p, 4 + j]) * channels :]
                wj = phase_weight[p, j]
                for k in range(length):
                    out[k] += wj * seg[k]
        step = stride * channels
        if qb > qa:
            count = qb - qa
            joined = dst[(phases[0, 3] + (qa - phases[0, 1]) * stride) * channels :]
            if channels == 1 and stride == 2:
                a = tmp[0, qa - phases[0, 1] :]
                b = tmp[1, qa - phases[1, 1] :]
                for r in range(count):
                    joined[2 * r] = a[r]
                    joined[2 * r + 1] = b[r]
            elif channels == 1 and stride == 3:
                a = tmp[0, qa - phases[0, 1] :]
                b = tmp[1, qa - phases[1, 1] :]
                c = tmp[2, qa - phases[2, 1] :]
                for r in range(count):
                    joined[3 * r] = a[r]
                    joined[3 * r + 1] = b[r]
                    joined[3 * r + 2] = c[r]
            elif channels == 1 and stride == 4:
                a = tmp[0, qa - phases[0, 1] :]
                b = tmp[1, qa - phases[1, 1] :]
                c = tmp[2, qa - phases[2, 1] :]
                d = tmp[3, qa - phases[3, 1] :]
                for r in range(count):
                    joined[4 * r] = a[r]
                    joined[4 * r + 1] = b[r]
                    joined[4 * r + 2] = c[r]
                    joined[4 * r + 3] = d[r]
            else:
                for p in range(phases.shape[0]):
                    _set_run(
                        joined, p * channels, step, tmp[p],
                        (qa - phases[p, 1]) * channels, count, channels,
                    )  # fmt: skip
        for p in range(phases.shape[0]):
            # The phase's columns outside the joint run: before it, then after it.
            q0, q1 = phases[p, 1], phases[p, 2]
            before = min(q1, qa) - q0 if qb > qa else q1 - q0
            if before > 0:
                _set_run(dst, phases[p, 3] * channels, step, tmp[p], 0, before, channels)
            after = q1 - max(q0, qb) if qb > qa else 0
            if after > 0:
                skip = max(q0, qb) - q0
                _set_run(
                    dst, (phases[p, 3] + skip * stride) * channels, step, tmp[p],
                    skip * channels, after, channels,
                )  # fmt: skip
        for e in range(edges.shape[0]):
            ow = edges[e]
            n = counts[ow]
            for f in range(channels):
                if n == 0:
                    dst[ow * channels + f] = 0
                    continue
                acc = weight[ow, 0] * src[index[ow, 0] * channels + f]
                for t in range(1, n):
                    acc += weight[ow, t] * src[index[ow, t] * channels + f]
                dst[ow * channels + f] = acc


@numba.njit(nogil=True, inline="always")
def _line_pass(
    src: np.ndarray,
    offset: int,
    counts: np.ndarray,
    index: np.ndarray,
    weight: np.ndarray,
    dst: np.ndarray,
) -> None:
    """``dst[o] = sum_t weight[o, t] * src[index[o, t] - offset]`` row by row, ``t`` ascending.

    ``src`` and ``dst`` are 2D; each output row is a weighted sum of whole
    input rows, so the inner loop runs along contiguous memory and vectorizes.
    """
    row = dst.shape[1]
    for o in range(dst.shape[0]):
        out = dst[o]
        n = counts[o]
        if n == 0:
            out[:] = 0
            continue
        first = src[index[o, 0] - offset]
        w0 = weight[o, 0]
        for j in range(row):
            out[j] = w0 * first[j]
        for t in range(1, n):
            line = src[index[o, t] - offset]
            wt = weight[o, t]
            for j in range(row):
                out[j] += wt * line[j]


@numba.njit(parallel=True)
def separable_region(
    x: np.ndarray,
    d_counts: np.ndarray,
    d_index: np.ndarray,
    d_weight: np.ndarray,
    h_counts: np.ndarray,
    h_index: np.ndarray,
    h_weight: np.ndarray,
    w_counts: np.ndarray,
    w_index: np.ndarray,
    w_weight: np.ndarray,
    w_phases: np.ndarray,
    w_phase_weight: np.ndarray,
    w_stride: int,
    w_joint: np.ndarray,
    w_edges: np.ndarray,
    span: int,
    parts: int,
    band_rows: np.ndarray,
    bias: np.ndarray,
    limits: np.ndarray,
    code: int,
    out: np.ndarray,
) -> None:
    """A separable transposed convolution: three 1D passes, width, height, then depth.

    ``x`` is ``(batch, d, h, w * F)`` and ``out`` is ``(batch, D, H, W * F)``;
    each axis's tables give, for every output index, its taps' input indices
    (in ``x``'s box) and weights, in a fixed order (and the width axis's
    phases, see :func:`_width_pass`). Output voxel
    ``(od, oh, ow, f)`` is therefore
    ``sum_td d_w * (sum_th h_w * (sum_tw w_w * x))``, its terms always added in
    the same order, whatever box it is computed in.

    The work is cut into bands of output rows (``band_rows[k]``: the band's
    first and last output row, and the first and last input row it reads), so
    that what a task keeps stays in cache, and each band's depth into
    ``parts`` runs of consecutive output planes; each task (a batch item, a
    band and a run) upsamples in the plane the input planes its output planes
    need (at most ``span`` consecutive ones), each once, into a ring of
    ``span`` band planes.
    """
    batch = x.shape[0]
    depth, row = out.shape[1], out.shape[3]
    channels = row // max(1, w_counts.shape[0])
    bands = band_rows.shape[0]
    parts = max(1, min(depth, parts))
    for job in numba.prange(batch * bands * parts):
        b = job // (bands * parts)
        band = job // parts % bands
        part = job % parts
        first = part * depth // parts
        stop = (part + 1) * depth // parts
        oh0, oh1, r0, r1 = (
            band_rows[band, 0],
            band_rows[band, 1],
            band_rows[band, 2],
            band_rows[band, 3],
        )
        ring = np.empty((span, oh1 - oh0, row), dtype=out.dtype)
        tags = np.full(span, -1, dtype=np.int64)
        q = np.empty((r1 - r0, row), dtype=out.dtype)
        tmp = np.empty((max(1, w_phases.shape[0]), x.shape[3]), dtype=out.dtype)
        counts = h_counts[oh0:oh1]
        index = h_index[oh0:oh1]
        weight = h_weight[oh0:oh1]
        for od in range(first, stop):
            n = d_counts[od]
            for t in range(n):
                i = d_index[od, t]
                slot = i % span
                if tags[slot] != i:
                    _width_pass(
                        x[b, i, r0:r1],
                        channels,
                        w_counts,
                        w_index,
                        w_weight,
                        w_phases,
                        w_phase_weight,
                        w_stride,
                        w_joint,
                        w_edges,
                        tmp,
                        q,
                    )
                    _line_pass(q, r0, counts, index, weight, ring[slot])
                    tags[slot] = i
            for oh in range(oh1 - oh0):
                dst = out[b, od, oh0 + oh]
                if n == 0:
                    dst[:] = 0
                else:
                    plane = ring[d_index[od, 0] % span, oh]
                    w0 = d_weight[od, 0]
                    for j in range(row):
                        dst[j] = w0 * plane[j]
                    for t in range(1, n):
                        plane = ring[d_index[od, t] % span, oh]
                        wt = d_weight[od, t]
                        for j in range(row):
                            dst[j] += wt * plane[j]
                _finish_run(dst, bias, limits, code)


@numba.njit(parallel=True)
def reverse_axes(a: np.ndarray, out: np.ndarray) -> None:
    """``out[k, j, i] = a[i, j, k]``: a 3D array's axes reversed, in cache-sized blocks.

    A C-order array so copied is the Fortran-order copy of ``a``, which is how
    a NIfTI file lays out its voxels; NumPy's strided copy of that transpose
    touches a new cache line for nearly every value.
    """
    n0, n1, n2 = a.shape
    for j in numba.prange(n1):
        for i0 in range(0, n0, 16):
            for k0 in range(0, n2, 16):
                for i in range(i0, min(n0, i0 + 16)):
                    for k in range(k0, min(n2, k0 + 16)):
                        out[k, j, i] = a[i, j, k]


# The same compiled for one width each: a constant trip count lets LLVM vectorize
# the row loop with interleaved stores.
@numba.njit(parallel=True)
def upsample_rows_2(
    x: np.ndarray,
    w: np.ndarray,
    strides: np.ndarray,
    in_origin: np.ndarray,
    out_start: np.ndarray,
    bias: np.ndarray,
    limits: np.ndarray,
    code: int,
    out: np.ndarray,
) -> None:
    """:func:`_upsample_rows` for ``width == 2``."""
    _upsample_rows(2, x, w, strides, in_origin, out_start, bias, limits, code, out)


@numba.njit(parallel=True)
def upsample_rows_4(
    x: np.ndarray,
    w: np.ndarray,
    strides: np.ndarray,
    in_origin: np.ndarray,
    out_start: np.ndarray,
    bias: np.ndarray,
    limits: np.ndarray,
    code: int,
    out: np.ndarray,
) -> None:
    """:func:`_upsample_rows` for ``width == 4``."""
    _upsample_rows(4, x, w, strides, in_origin, out_start, bias, limits, code, out)


@numba.njit(parallel=True)
def upsample_rows_8(
    x: np.ndarray,
    w: np.ndarray,
    strides: np.ndarray,
    in_origin: np.ndarray,
    out_start: np.ndarray,
    bias: np.ndarray,
    limits: np.ndarray,
    code: int,
    out: np.ndarray,
) -> None:
    """:func:`_upsample_rows` for ``width == 8``."""
    _upsample_rows(8, x, w, strides, in_origin, out_start, bias, limits, code, out)


UPSAMPLE_FIXED = {2: upsample_rows_2, 4: upsample_rows_4, 8: upsample_rows_8}

# Compiled code is kept in the user's cache folder, never beside this file.
numba_cache.enable_cache(
    [
        gather_rows,
        scatter_rows,
        direct_region,
        separable_region,
        reverse_axes,
        upsample_rows,
        *UPSAMPLE_FIXED.values(),
    ]
)
numba_cache.announce_compiles()
