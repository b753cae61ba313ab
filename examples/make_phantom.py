"""Write the example volume: a small 3D phantom as NIfTI (.nii.gz), and the 2x-upsampling weights.

The phantom is an ellipsoid "head" with two inner ellipsoids and a bright
sphere, on a rotated, anisotropic (1 x 1 x 2 mm) grid, so world alignment of
the upsampled output can be checked in a viewer.

The weights are those of trilinear 2x upsampling written as a Conv3DTranspose
(kernel 4, strides 2, padding "same"): along each axis the taps are
(0.25, 0.75, 0.75, 0.25), the linear-interpolation weights, so the layer
behaves as a trained upsampler whose result is easy to judge by eye.

Usage: python examples/make_phantom.py [DIRECTORY]   (default: examples/data/)
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def phantom(shape: tuple[int, int, int] = (48, 56, 32)) -> np.ndarray:
    """An ellipsoid phantom with values in [0, 1]."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), axis=-1)
    volume = np.zeros(shape, dtype=np.float32)

    def ellipsoid(centre, radii, value):
        inside = (((grid - centre) / radii) ** 2).sum(axis=-1) <= 1
        volume[inside] = value

    ellipsoid((0, 0, 0), (0.9, 0.8, 0.85), 0.4)
    ellipsoid((0.2, -0.2, 0.0), (0.3, 0.2, 0.4), 0.7)
    ellipsoid((-0.3, 0.25, 0.1), (0.2, 0.3, 0.3), 0.55)
    ellipsoid((0.0, 0.45, -0.3), (0.1, 0.1, 0.1), 1.0)
    return volume


def linear_upsampling_kernel() -> np.ndarray:
    """Kernel (4, 4, 4, 1, 1) of trilinear 2x upsampling."""
    taps = np.array([0.25, 0.75, 0.75, 0.25], dtype=np.float32)
    kernel = taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
    return kernel[:, :, :, None, None]


def main() -> None:
    default = Path(__file__).resolve().parent / "data"
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    data.mkdir(parents=True, exist_ok=True)
    angle = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 1.0, 2.0])
    affine[:3, 3] = (-24.0, -28.0, -32.0)
    image = nib.Nifti1Image(phantom(), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, data / "phantom.nii.gz")
    second = nib.Nifti1Image(np.flip(phantom(), axis=0).copy(), affine)
    nib.save(second, data / "phantom_flipped.nii.gz")
    np.save(data / "upsample2x_kernel.npy", linear_upsampling_kernel())
    np.save(data / "upsample2x_bias.npy", np.zeros(1, dtype=np.float32))
    print(f"wrote {data}/phantom.nii.gz, phantom_flipped.nii.gz and the 2x weights")


if __name__ == "__main__":
    main()
