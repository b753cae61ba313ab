"""Interpolation presets: nearest-neighbour and linear upsampling as transposed convolutions.

For an integer factor ``f`` on an axis:

- ``nearest`` is a box kernel of ``f`` ones with stride ``f``: every input voxel
  is copied to the ``f`` output voxels it covers;
- ``linear`` is the triangle kernel ``1 - |t - c| / f`` (``c`` its centre) of
  size ``2f`` for even ``f`` and ``2f - 1`` for odd ``f``, stride ``f``,
  ``padding="same"``. With the input's edge values replicated outward
  (``boundary="replicate"``) it equals PyTorch's
  ``interpolate(mode="trilinear", align_corners=False)`` and SciPy's
  ``ndimage.zoom(order=1, grid_mode=True, mode="nearest")``, and the world
  alignment rule puts each output voxel where those tools put it.

A factor of 1 leaves its axis alone (a kernel of one tap, weight 1). The kernel
is the outer product of the three axes' 1D kernels, and diagonal in channels:
each channel is upsampled on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conv3dt.layer import Conv3DTranspose

__all__ = ["PRESETS", "check_factor", "preset_config", "preset_kernel", "preset_layer"]

PRESETS = ("nearest", "linear")


def check_factor(factor: int | Sequence[int]) -> tuple[int, int, int]:
    """``factor`` as three positive ints (one int applies to every axis).

    Raises
    ------
    ValueError
        Naming the argument and the value received.
    """
    values = [factor] * 3 if isinstance(factor, int) and not isinstance(factor, bool) else factor
    try:
        triple = tuple(values)  # type: ignore[arg-type]
    except TypeError:
        triple = ()
    if len(triple) != 3 or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) and 1 <= v <= 64 for v in triple
    ):
        raise ValueError(
            "The `factor` argument must be an integer from 1 to 64 or 3 of them. "
            f"Received: factor={factor!r}"[:200]
        )
    return tuple(int(v) for v in triple)  # type: ignore[return-value]


def _check_name(name: object) -> str:
    if name not in PRESETS:
        raise ValueError(
            f"The `name` argument must be one of {', '.join(PRESETS)}. Received: name={name!r}"[
                :200
            ]
        )
    return str(name)


def _axis_kernel(name: str, factor: int) -> np.ndarray:
    """One axis's 1D kernel, float64."""
    if name == "nearest":
        return np.ones(factor)
    size = 2 * factor - factor % 2
    centre = (size - 1) / 2
    return 1.0 - np.abs(np.arange(size) - centre) / factor


def preset_kernel(
    name: str, factor: int | Sequence[int], channels: int = 1, dtype: str = "float32"
) -> np.ndarray:
    """The preset's kernel, ``(kd, kh, kw, channels, channels)``, diagonal in channels."""
    name = _check_name(name)
    factors = check_factor(factor)
    axes = [_axis_kernel(name, f) for f in factors]
    cube = np.einsum("i,j,k->ijk", *axes)
    kernel = np.zeros((*cube.shape, channels, channels))
    for c in range(channels):
        kernel[..., c, c] = cube
    return kernel.astype(dtype)


def preset_config(name: str, factor: int | Sequence[int], channels: int = 1) -> dict:
    """The Keras layer config of a preset: ``channels`` filters, no bias, ``same`` padding."""
    name = _check_name(name)
    factors = check_factor(factor)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(
            f"The `channels` argument must be a positive integer. Received: channels={channels!r}"
        )
    sizes = [len(_axis_kernel(name, f)) for f in factors]
    return {
        "name": f"{name}_upsample",
        "filters": channels,
        "kernel_size": sizes,
        "strides": list(factors),
        "padding": "same",
        "use_bias": False,
    }


def preset_layer(name: str, factor: int | Sequence[int] = 2, channels: int = 1) -> Conv3DTranspose:
    """A built :class:`~conv3dt.Conv3DTranspose` that upsamples by ``factor`` as ``name`` does.

    Parameters
    ----------
    name : {"nearest", "linear"}
    factor : int or three ints
        The upsampling factor per axis (1 leaves an axis alone).
    channels : int
        Input channels, each upsampled on its own (``filters == channels``).

    Returns
    -------
    Conv3DTranspose
        Channels last. Call it with ``boundary="replicate"`` for the results of
        PyTorch's and SciPy's interpolation; the default ``"zeros"`` is Keras's
        zero padding, which darkens the edges.

    Examples
    --------
    >>> import numpy as np, conv3dt
    >>> layer = conv3dt.preset_layer("linear", factor=2)
    >>> layer(np.ones((1, 4, 4, 4, 1), np.float32), boundary="replicate").max()
    np.float32(1.0)
    """
    layer = Conv3DTranspose.from_config(preset_config(name, factor, channels))
    layer.build((None, None, None, None, channels))
    layer.set_weights([preset_kernel(name, factor, channels)])
    return layer
