"""Vectorized NumPy engine: one product per kernel tap, scattered at the stride.

Taps are added in a fixed order, and each tap's product sums the channels in a
fixed order with elementwise operations (:func:`channel_products`), so a tile's
values equal the untiled ones bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conv3dt.engine.buffers import result_array
from conv3dt.engine.epilogue import Epilogue

__all__ = ["channel_products", "conv_transpose_region_numpy", "tap_slices"]


def channel_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for 2D ``a``, summed channel by channel in ascending order.

    Each result row is computed from that row of ``a`` alone by the same
    elementwise multiplies and adds, so its bits never depend on how many rows
    ``a`` has or where the row sits. BLAS gives no such promise: an OpenBLAS
    GEMM may round a row differently depending on its position in the matrix.
    """
    result = a[:, :1] * b[:1]
    for c in range(1, a.shape[1]):
        result += a[:, c : c + 1] * b[c : c + 1]
    return result


def tap_slices(
    tap: int,
    stride: int,
    dilation: int,
    in_origin: int,
    in_length: int,
    out_start: int,
    out_length: int,
) -> tuple[slice, slice] | None:
    """Input and output slices through which one kernel tap flows on one axis.

    Input index ``i`` (absolute) meets full-output index ``i * stride + tap * dilation``.
    ``in_origin``/``in_length`` describe the input box held in memory and
    ``out_start``/``out_length`` the full-output box being computed; slices are
    relative to those boxes. Returns None when the tap reaches no output.
    """
    shift = tap * dilation
    lo = max(in_origin, -((shift - out_start) // stride))
    hi = min(in_origin + in_length, (out_start + out_length - 1 - shift) // stride + 1)
    if hi <= lo:
        return None
    first = lo * stride + shift - out_start
    src = slice(lo - in_origin, hi - in_origin)
    dst = slice(first, first + (hi - lo - 1) * stride + 1, stride)
    return src, dst


def conv_transpose_region_numpy(
    x: np.ndarray,
    kernel: np.ndarray,
    strides: Sequence[int],
    dilation: Sequence[int],
    in_origin: Sequence[int],
    out_start: Sequence[int],
    out_shape: Sequence[int],
    compute_dtype: np.dtype,
    epilogue: Epilogue | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Compute a box of the full (uncropped) transposed-convolution output.

    Parameters
    ----------
    x : ndarray, shape (batch, d, h, w, in_channels)
        The input box, channels last; ``x[:, 0, 0, 0]`` is input voxel ``in_origin``.
    kernel : ndarray, shape (kd, kh, kw, filters, in_channels)
    strides, dilation : three ints
    in_origin : three ints
        Absolute input index of the box's first voxel.
    out_start, out_shape : three ints
        The full-output box to compute (absolute full-output indices).
    compute_dtype : numpy dtype
        Accumulation dtype.
    epilogue : Epilogue, optional
        Bias and activation, applied after the sum (a separate pass here).
    out : ndarray, optional
        The array to write the result into (checked by the caller).

    Returns
    -------
    ndarray, shape (batch, *out_shape, filters)
    """
    out = result_array(out, (x.shape[0], *out_shape, kernel.shape[3]), compute_dtype, zeroed=True)
    _sum_taps(x, kernel, strides, dilation, in_origin, out_start, out_shape, compute_dtype, out)
    if epilogue is not None:
        epilogue.apply(out)
    return out


def _sum_taps(
    x: np.ndarray,
    kernel: np.ndarray,
    strides: Sequence[int],
    dilation: Sequence[int],
    in_origin: Sequence[int],
    out_start: Sequence[int],
    out_shape: Sequence[int],
    compute_dtype: np.dtype,
    out: np.ndarray,
) -> None:
    """Add every tap's contribution to the zeroed ``out``."""
    filters = kernel.shape[3]
    xc = x.astype(compute_dtype, copy=False)
    kc = kernel.astype(compute_dtype, copy=False)
    per_axis: list[list[tuple[int, slice, slice]]] = []
    for a in range(3):
        found = []
        for t in range(kernel.shape[a]):
            sl = tap_slices(
                t, strides[a], dilation[a], in_origin[a], x.shape[1 + a], out_start[a], out_shape[a]
            )
            if sl is not None:
                found.append((t, *sl))
        if not found:
            return
        per_axis.append(found)
    for t0, s0, d0 in per_axis[0]:
        for t1, s1, d1 in per_axis[1]:
            for t2, s2, d2 in per_axis[2]:
                src = xc[:, s0, s1, s2, :]
                contribution = channel_products(src.reshape(-1, src.shape[-1]), kc[t0, t1, t2].T)
                out[:, d0, d1, d2, :] += contribution.reshape(*src.shape[:-1], filters)
