"""The output grid's affine: known points on a rotated, non-isotropic input grid."""

from __future__ import annotations

import numpy as np
import pytest

from conv3dt.volumes.affine import output_affine, voxel_sizes


def rotated_affine() -> np.ndarray:
    """Voxel sizes (0.7, 1.3, 2.9), rotated 30 degrees about z and 50 about x, translated."""
    a, b = np.deg2rad(30.0), np.deg2rad(50.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.7, 1.3, 2.9])
    affine[:3, 3] = [-40.0, 12.5, 3.0]
    return affine


def test_known_points_map_to_the_same_world_position():
    affine = rotated_affine()
    strides, offsets = (2, 3, 1), (-0.25, 1 / 3, 0.5)
    result = output_affine(affine, strides, offsets)
    rng = np.random.default_rng(0)
    for out_index in [(0, 0, 0), (4, 6, 2), *rng.integers(0, 50, size=(5, 3)).tolist()]:
        in_index = [o / s + t for o, s, t in zip(out_index, strides, offsets, strict=True)]
        np.testing.assert_allclose(
            result @ [*out_index, 1.0], affine @ [*in_index, 1.0], rtol=0, atol=1e-12
        )


def test_stride_two_centred_footprint():
    # Kernel 3, stride 2, Keras 'same': input voxel i spreads over output 2i..2i+2,
    # centred on 2i + 1, so output o sits at input (o - 1) / 2: offset -0.5.
    affine = rotated_affine()
    result = output_affine(affine, (2, 2, 2), (-0.5, -0.5, -0.5))
    for i in range(4):
        centre = 2 * i + 1
        np.testing.assert_allclose(result @ [centre, centre, centre, 1], affine @ [i, i, i, 1])
    # The first output voxel lies half an input voxel before input voxel 0.
    np.testing.assert_allclose(result @ [0, 0, 0, 1], affine @ [-0.5, -0.5, -0.5, 1])


def test_voxel_sizes_divide_by_the_strides():
    affine = rotated_affine()
    assert voxel_sizes(affine) == pytest.approx((0.7, 1.3, 2.9))
    result = output_affine(affine, (2.0, 4.0, 1.0), (0.1, 0.2, 0.3))
    assert voxel_sizes(result) == pytest.approx((0.35, 0.325, 2.9))
    np.testing.assert_array_equal(result[3], [0, 0, 0, 1])


@pytest.mark.parametrize(
    "affine, strides, offsets, name",
    [
        (np.eye(3), (1, 1, 1), (0, 0, 0), "affine"),
        (np.full((4, 4), np.nan), (1, 1, 1), (0, 0, 0), "affine"),
        (np.eye(4), (1, 0, 1), (0, 0, 0), "strides"),
        (np.eye(4), (1, 1), (0, 0, 0), "strides"),
        (np.eye(4), (1, 1, 1), (0, np.inf, 0), "offsets"),
    ],
)
def test_bad_arguments_name_themselves(affine, strides, offsets, name):
    with pytest.raises(ValueError, match=f"`{name}`.*Received {name}="):
        output_affine(affine, strides, offsets)
