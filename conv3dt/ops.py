"""The functional transposed convolution: :func:`conv3d_transpose`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from conv3dt import geometry
from conv3dt.boundary import axis_pads, pad_volume
from conv3dt.engine import conv_transpose_region, resolve_engine
from conv3dt.validation import (
    standardize_data_format,
    standardize_padding,
    standardize_tuple,
)

__all__ = ["compute_dtype_for", "conv3d_transpose", "layer_geometry"]

IntOrTriple = int | Sequence[int]


def compute_dtype_for(*arrays: np.ndarray) -> np.dtype:
    """Float dtype in which to compute: the arrays' common float type, else float32."""
    dtype = np.result_type(*[a.dtype for a in arrays])
    if dtype.kind != "f" or dtype.itemsize > 8:
        return np.dtype(np.float32)
    return dtype


def layer_geometry(
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    strides: Sequence[int],
    padding: str,
    output_padding: Sequence[int] | None,
    dilation_rate: Sequence[int],
) -> tuple[geometry.AxisGeometry, ...]:
    """The three :class:`~conv3dt.geometry.AxisGeometry` of a 3D transposed convolution."""
    return tuple(
        geometry.axis_geometry(
            spatial_shape[a],
            kernel_size[a],
            strides[a],
            padding,
            None if output_padding is None else output_padding[a],
            dilation_rate[a],
        )
        for a in range(3)
    )


def conv3d_transpose(
    x: np.ndarray,
    kernel: np.ndarray,
    bias: np.ndarray | None = None,
    strides: IntOrTriple = 1,
    padding: str = "valid",
    output_padding: IntOrTriple | None = None,
    data_format: str = "channels_last",
    dilation_rate: IntOrTriple = 1,
    *,
    engine: str = "auto",
    boundary: str = "zeros",
) -> np.ndarray:
    """3D transposed convolution, as ``keras.ops.conv_transpose`` computes it, plus a bias.

    Parameters
    ----------
    x : array_like, 5D
        ``(batch, d, h, w, channels)`` or, with ``data_format="channels_first"``,
        ``(batch, channels, d, h, w)``.
    kernel : array_like, shape (kd, kh, kw, filters, in_channels)
        Keras's kernel layout.
    bias : array_like, shape (filters,), optional
        Added to every output voxel.
    strides, dilation_rate : int or 3 ints
    padding : {"valid", "same"}
        Case-insensitive.
    output_padding : int or 3 ints, optional
    data_format : {"channels_last", "channels_first"}
    engine : str
        Force an engine implementation (for testing and benchmarking);
        ``"auto"`` picks one for the whole call
        (:func:`conv3dt.engine.engine_for_volume`).
    boundary : {"zeros", "replicate", "reflect", "symmetric"}
        What lies beyond the input's edges (an extension beyond Keras, see
        :mod:`conv3dt.boundary`): the result equals padding the input with
        ``numpy.pad`` (modes ``edge``, ``reflect``, ``symmetric``), convolving
        and cropping back to the same shape and grid. ``"zeros"`` is Keras's.

    Returns
    -------
    ndarray
        5D, in ``data_format``; float dtype of the inputs (float32 for integers).

    Raises
    ------
    ValueError
        On an input or kernel that is not 5D, mismatched channels, or invalid arguments.
    """
    x = np.asarray(x)
    kernel = np.asarray(kernel)
    data_format = standardize_data_format(data_format)
    padding = standardize_padding(padding)
    strides_t = standardize_tuple(strides, 3, "strides")
    dilation_t = standardize_tuple(dilation_rate, 3, "dilation_rate")
    output_padding_t = (
        None
        if output_padding is None
        else standardize_tuple(output_padding, 3, "output_padding", allow_zero=True)
    )
    if x.ndim != 5:
        raise ValueError(
            "Inputs to a 3D transposed convolution must be 5D "
            f"(batch, spatial x3, channels). Received input shape: {x.shape}."
        )
    if kernel.ndim != 5:
        raise ValueError(
            "The kernel must be 5D (kd, kh, kw, filters, in_channels). "
            f"Received kernel shape: {kernel.shape}."
        )
    spatial = x.shape[1:4] if data_format == "channels_last" else x.shape[2:5]
    if 0 in spatial:
        raise ValueError(
            f"Inputs to a 3D transposed convolution need non-empty spatial axes. "
            f"Received input shape: {x.shape}."
        )
    channels = x.shape[-1] if data_format == "channels_last" else x.shape[1]
    if channels != kernel.shape[-1]:
        raise ValueError(
            "The number of input channels must match the kernel's input channels. "
            f"Received: input channels={channels}, kernel input channels={kernel.shape[-1]}, "
            f"data_format='{data_format}'."
        )
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (kernel.shape[3],):
            raise ValueError(
                f"The bias must have shape ({kernel.shape[3]},) (one value per filter). "
                f"Received bias shape: {bias.shape}."
            )
    xl = x if data_format == "channels_last" else np.moveaxis(x, 1, -1)
    axes = layer_geometry(
        xl.shape[1:4], kernel.shape[:3], strides_t, padding, output_padding_t, dilation_t
    )
    dtype = compute_dtype_for(x, kernel)
    work_dtype = np.dtype(np.float32) if dtype == np.float16 else dtype
    engine = resolve_engine(
        engine, kernel.shape, strides_t, dilation_t, math.prod(xl.shape[:4]), kernel=kernel
    )
    pads = axis_pads(axes, boundary)
    out_start = tuple(g.crop_left for g in axes)
    if pads is not None:
        # In the padded input's coordinates: its voxel 0 is the original -left.
        xl = pad_volume(xl, pads)
        out_start = tuple(
            o + p.left * g.stride for o, p, g in zip(out_start, pads, axes, strict=True)
        )
    out = conv_transpose_region(
        xl,
        kernel,
        strides_t,
        dilation_t,
        (0, 0, 0),
        out_start,
        tuple(g.output_length for g in axes),
        work_dtype,
        engine=engine,
        bias=None if bias is None else bias.astype(work_dtype, copy=False),
    )
    out = out.astype(dtype, copy=False)
    if data_format == "channels_first":
        out = np.ascontiguousarray(np.moveaxis(out, -1, 1))
    return out
