"""The array an engine writes its box into: the caller's ``out``, or a new one.

Writing into memory the process already holds skips what a fresh output costs
where the work is bound by memory traffic: the kernel zeroes each new page on
first touch, so a new array is written twice. Callers that compute many boxes
in a row (the tiles of a volume) pass the same buffers again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["check_out", "result_array"]


def check_out(out: np.ndarray, shape: Sequence[int], dtype: np.dtype) -> None:
    """Refuse an ``out`` array an engine cannot write the box into.

    Raises
    ------
    ValueError
        Unless ``out`` is a writeable C-contiguous array of ``shape`` and ``dtype``.
    """
    shape = tuple(int(n) for n in shape)
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype:
        got = (
            f"shape={out.shape}, dtype={out.dtype}"
            if isinstance(out, np.ndarray)
            else type(out).__name__
        )
        raise ValueError(
            f"The `out` array must have shape={shape} and dtype={dtype}. Received: {got}"
        )
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("The `out` array must be C-contiguous and writeable.")


def result_array(
    out: np.ndarray | None, shape: Sequence[int], dtype: np.dtype, *, zeroed: bool
) -> np.ndarray:
    """``out`` (zeroed if asked), or a new array of ``shape`` and ``dtype``.

    Parameters
    ----------
    out : ndarray or None
        The caller's array, already checked by :func:`check_out`.
    shape : ints
    dtype : dtype
    zeroed : bool
        Whether the engine needs zeros to start from (it accumulates, or leaves
        voxels without input unwritten).
    """
    if out is None:
        return (np.zeros if zeroed else np.empty)(tuple(shape), dtype=dtype)
    if zeroed:
        out.fill(0)
    return out
