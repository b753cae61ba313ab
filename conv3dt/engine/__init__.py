"""Compute any box of a transposed convolution's output from the input box it needs.

:func:`conv_transpose_region` is the one entry point; it dispatches to an
implementation. The reference implementation in :mod:`conv3dt.engine.reference`
is for tests only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conv3dt.engine.numpy_engine import conv_transpose_region_numpy

__all__ = ["ENGINES", "conv_transpose_region"]

ENGINES = ("auto", "numpy")


def conv_transpose_region(
    x: np.ndarray,
    kernel: np.ndarray,
    strides: Sequence[int],
    dilation: Sequence[int],
    in_origin: Sequence[int],
    out_start: Sequence[int],
    out_shape: Sequence[int],
    compute_dtype: np.dtype | type = np.float32,
    engine: str = "auto",
) -> np.ndarray:
    """Compute a box of the full (uncropped) output of a transposed convolution.

    Parameters
    ----------
    x : ndarray, shape (batch, d, h, w, in_channels)
        Channels-last input box; ``x[:, 0, 0, 0]`` is absolute input voxel ``in_origin``.
        Input outside the box is treated as absent (it must not contribute to the
        requested output box for the result to be exact, see
        :meth:`conv3dt.geometry.AxisGeometry.input_range`).
    kernel : ndarray, shape (kd, kh, kw, filters, in_channels)
    strides, dilation : three ints
    in_origin : three ints
    out_start, out_shape : three ints
        The box in full-output coordinates: Keras's output index ``o`` is full
        index ``o + crop_left``. Indices outside the full output give zeros.
    compute_dtype : dtype
        Accumulation and result dtype.
    engine : {"auto", "numpy"}
        Force an implementation; "auto" picks one.

    Returns
    -------
    ndarray, shape (batch, *out_shape, filters), ``compute_dtype``
    """
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; expected one of {', '.join(ENGINES)}.")
    return conv_transpose_region_numpy(
        x, kernel, strides, dilation, in_origin, out_start, out_shape, np.dtype(compute_dtype)
    )
