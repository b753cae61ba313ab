"""Voxel-to-world affines of resampled grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["output_affine", "voxel_sizes"]


def _as_affine(affine: np.ndarray) -> np.ndarray:
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"`affine` must be a finite 4x4 matrix. Received affine={affine!r}")
    return matrix


def output_affine(
    affine: np.ndarray,
    strides: Sequence[float],
    offsets: Sequence[float],
) -> np.ndarray:
    """The voxel-to-world affine of a grid resampled from an input grid.

    Output index ``o`` on axis ``a`` sits at input index
    ``o / strides[a] + offsets[a]``, so the result is
    ``affine @ [[1/s0, 0, 0, t0], [0, 1/s1, 0, t1], [0, 0, 1/s2, t2], [0, 0, 0, 1]]``.

    Parameters
    ----------
    affine : numpy.ndarray
        The input's 4x4 voxel-to-world matrix.
    strides : sequence of 3 floats
        Output voxels per input voxel on each axis (positive).
    offsets : sequence of 3 floats
        The (fractional) input index of output index 0 on each axis.

    Returns
    -------
    numpy.ndarray
        The output's 4x4 float64 voxel-to-world matrix.

    Raises
    ------
    ValueError
        When the affine is not a finite 4x4 matrix, or strides or offsets are not
        3 finite numbers (strides positive).
    """
    matrix = _as_affine(affine)
    steps = np.asarray(strides, dtype=np.float64)
    shifts = np.asarray(offsets, dtype=np.float64)
    if steps.shape != (3,) or not np.all(np.isfinite(steps)) or np.any(steps <= 0):
        raise ValueError(f"`strides` must be 3 positive numbers. Received strides={strides!r}")
    if shifts.shape != (3,) or not np.all(np.isfinite(shifts)):
        raise ValueError(f"`offsets` must be 3 finite numbers. Received offsets={offsets!r}")
    index_map = np.eye(4)
    index_map[[0, 1, 2], [0, 1, 2]] = 1.0 / steps
    index_map[:3, 3] = shifts
    return matrix @ index_map


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel size along each array axis: the norms of the affine's first three columns.

    Raises
    ------
    ValueError
        When the affine is not a finite 4x4 matrix.
    """
    matrix = _as_affine(affine)
    return tuple(float(v) for v in np.linalg.norm(matrix[:3, :3], axis=0))
