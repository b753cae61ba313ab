"""A slow, obviously right transposed convolution, kept to check the fast ones.

It scatters every kernel tap of every input voxel into the full (uncropped)
output in float64, then takes Keras's window of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conv3dt.geometry import AxisGeometry

__all__ = ["reference_conv_transpose"]


def reference_conv_transpose(
    x: np.ndarray, kernel: np.ndarray, axes: Sequence[AxisGeometry]
) -> np.ndarray:
    """Transposed convolution of a channels-last 5D array, in float64.

    Parameters
    ----------
    x : ndarray, shape (batch, d, h, w, in_channels)
    kernel : ndarray, shape (kd, kh, kw, filters, in_channels)
    axes : three AxisGeometry
        The geometry of the depth, height and width axes.

    Returns
    -------
    ndarray, shape (batch, out_d, out_h, out_w, filters), float64
    """
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    batch = x.shape[0]
    filters = kernel.shape[3]
    full = np.zeros((batch, *(g.full_length for g in axes), filters))
    n0, n1, n2 = x.shape[1:4]
    for t0 in range(kernel.shape[0]):
        for t1 in range(kernel.shape[1]):
            for t2 in range(kernel.shape[2]):
                tap = kernel[t0, t1, t2]  # (filters, in_channels)
                for i0 in range(n0):
                    f0 = i0 * axes[0].stride + t0 * axes[0].dilation
                    for i1 in range(n1):
                        f1 = i1 * axes[1].stride + t1 * axes[1].dilation
                        for i2 in range(n2):
                            f2 = i2 * axes[2].stride + t2 * axes[2].dilation
                            full[:, f0, f1, f2, :] += x[:, i0, i1, i2, :] @ tap.T
    out = np.zeros((batch, *(g.output_length for g in axes), filters))
    src = []
    dst = []
    for g in axes:
        lo = max(g.crop_left, 0)
        hi = min(g.crop_left + g.output_length, g.full_length)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - g.crop_left, max(hi, lo) - g.crop_left))
    out[(slice(None), *dst, slice(None))] = full[(slice(None), *src, slice(None))]
    return out
