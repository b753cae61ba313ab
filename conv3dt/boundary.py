"""Boundary modes: what the layer sees beyond the volume's edges.

Keras pads a transposed convolution's input with zeros, which darkens the edge
voxels of an upsampled volume; that stays the default (``"zeros"``). The other
modes are an extension beyond Keras, defined once, here:

    the result equals padding the input with ``numpy.pad(mode=...)`` (``edge``
    for ``"replicate"``, ``reflect``, ``symmetric``), applying the layer, and
    cropping the output back to the shape and grid of the unpadded result.

Only a few voxels of padding can reach the cropped output on each side (those
whose kernel footprint meets it); :func:`axis_pads` says how many, and maps each
padded index to the input voxel ``numpy.pad`` copies there. Both the whole-volume
call and every tile read their input through these maps, so tiles stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from conv3dt.geometry import AxisGeometry

__all__ = ["BOUNDARIES", "AxisPad", "axis_pads", "check_boundary", "pad_volume"]

BOUNDARIES = ("zeros", "replicate", "reflect", "symmetric")
_NUMPY_MODES = {"replicate": "edge", "reflect": "reflect", "symmetric": "symmetric"}


def check_boundary(boundary: object) -> str:
    """``boundary`` itself when it names a mode.

    Raises
    ------
    ValueError
        Naming the argument, the modes and the value received.
    """
    if not isinstance(boundary, str) or boundary not in BOUNDARIES:
        raise ValueError(
            f"The `boundary` argument must be one of {', '.join(BOUNDARIES)}. "
            f"Received: boundary={boundary!r}"[:300]
        )
    return boundary


@dataclass(frozen=True)
class AxisPad:
    """The padding one axis needs, and where each padded voxel comes from.

    Attributes
    ----------
    left, right : int
        Voxels of padding before and after the input.
    source : ndarray of int64, shape (left + length + right,)
        ``source[i + left]`` is the input index ``numpy.pad`` puts at index ``i``
        (``-left <= i < length + right``).
    """

    left: int
    right: int
    source: np.ndarray

    def span(self, geometry: AxisGeometry, out_start: int, out_stop: int) -> tuple[int, int]:
        """Padded input range ``[start, stop)`` (0 is the first padded voxel) for an output box."""
        if out_stop <= out_start:
            return 0, 0
        full_start = out_start + geometry.crop_left
        full_stop = out_stop + geometry.crop_left
        start = -((geometry.k_eff - 1 - full_start) // geometry.stride)
        stop = (full_stop - 1) // geometry.stride + 1
        start = max(start, -self.left)
        stop = min(stop, geometry.input_length + self.right)
        if stop <= start:
            return 0, 0
        return start + self.left, stop + self.left


def _reach(geometry: AxisGeometry) -> tuple[int, int]:
    """Voxels beyond each edge whose footprint meets the (cropped) output."""
    full_start = geometry.crop_left
    full_stop = geometry.crop_left + geometry.output_length
    if full_stop <= full_start:
        return 0, 0
    first = -((geometry.k_eff - 1 - full_start) // geometry.stride)
    last = (full_stop - 1) // geometry.stride
    return max(0, -first), max(0, last + 1 - geometry.input_length)


def axis_pads(axes: Sequence[AxisGeometry], boundary: str) -> tuple[AxisPad, ...] | None:
    """The padding of each axis under ``boundary``; None when nothing is padded.

    ``"zeros"`` pads nothing (the engine's own zeros are Keras's padding), nor
    does a mode under which no voxel beyond the edges reaches the output.

    Raises
    ------
    ValueError
        On an unknown mode, or a ``reflect`` axis of one voxel (which
        ``numpy.pad`` cannot reflect).
    """
    check_boundary(boundary)
    if boundary == "zeros":
        return None
    reaches = [_reach(g) for g in axes]
    if not any(left or right for left, right in reaches):
        return None
    pads = []
    for g, (left, right) in zip(axes, reaches, strict=True):
        if boundary == "reflect" and g.input_length < 2 and (left or right):
            raise ValueError(
                "boundary='reflect' needs at least 2 voxels along each padded axis. "
                f"Received an axis of {g.input_length} voxel(s)"
            )
        source = np.pad(
            np.arange(g.input_length, dtype=np.int64), (left, right), _NUMPY_MODES[boundary]
        )
        pads.append(AxisPad(left, right, source))
    return tuple(pads)


def pad_volume(x: np.ndarray, pads: Sequence[AxisPad]) -> np.ndarray:
    """``x`` (``(batch, d, h, w, channels)``) padded as ``pads`` say: numpy.pad's result.

    One copy of ``x`` into the padded array, then the margins, axis by axis,
    from what is already in place (each axis's margins span the earlier axes'
    margins, as ``numpy.pad`` pads one axis after another).
    """
    lengths = x.shape[1:4]
    out = np.empty(
        (
            x.shape[0],
            *(n + p.left + p.right for n, p in zip(lengths, pads, strict=True)),
            x.shape[4],
        ),
        dtype=x.dtype,
    )
    inner = [slice(p.left, p.left + n) for p, n in zip(pads, lengths, strict=True)]
    out[(slice(None), *inner, slice(None))] = x
    for a, (pad, n) in enumerate(zip(pads, lengths, strict=True)):
        span = [slice(None) if b < a else inner[b] for b in range(3)]
        span[a] = slice(None)
        block = out[(slice(None), *span, slice(None))]
        for first, stop in ((0, pad.left), (pad.left + n, pad.left + n + pad.right)):
            if stop > first:
                lead = (slice(None),) * (1 + a)
                block[(*lead, slice(first, stop))] = _margin(
                    block, lead, pad.source[first:stop] + pad.left
                )
    return out


def _margin(block: np.ndarray, lead: tuple[slice, ...], source: np.ndarray) -> np.ndarray:
    """``block``'s slices ``source`` along the axis after ``lead``: a view where one will do.

    The margins of every mode are runs of one repeated slice (``replicate``) or
    consecutive slices in reverse (``reflect``, ``symmetric``, unless the pad is
    wider than the axis); a strided view of them costs nothing to take, where
    ``numpy.take`` gathers a copy.
    """
    first = int(source[0])
    if np.all(source == first):
        return block[(*lead, slice(first, first + 1))]
    steps = np.diff(source)
    if np.all(steps == -1):
        stop = int(source[-1]) - 1
        return block[(*lead, slice(first, stop if stop >= 0 else None, -1))]
    return np.take(block, source, axis=len(lead))
