"""What a user would write instead of ``conv3dt upsample``: nibabel, PyTorch, nibabel.

Applies a Keras ``Conv3DTranspose`` layer, given by its Keras-layout weights
(``kernel`` of shape ``(kd, kh, kw, filters, in_channels)``, ``bias`` of
``(filters,)``), to a NIfTI volume with ``torch.nn.functional.conv_transpose3d``
and saves the result, the whole volume in memory at every step, the way a short
script does it. It is the baseline ``bench_end_to_end.py`` times conv3dt
against, and its output is checked equal to conv3dt's.

Keras semantics, written out:

- ``padding="valid"`` keeps the full transposed convolution,
  ``(n - 1) * s + (k - 1) * d + 1`` voxels per axis; ``"same"`` keeps ``n * s``
  of them, cropping ``(full - n * s) // 2`` at the start (TensorFlow's rule).
- The kernel is not flipped: Keras's and PyTorch's transposed convolutions
  agree once the kernel is laid out ``(in_channels, filters, kd, kh, kw)``.
- The output's voxel-to-world affine puts the centre of each kernel footprint
  on the centre of the input voxel it came from: output index ``o`` is input
  index ``(o + crop - ((k - 1) * d) / 2) / s`` on each axis.

Usage::

    python benchmarks/baseline_nibabel_torch.py IN.nii.gz OUT.nii.gz \\
        --kernel kernel.npy [--bias bias.npy] --strides 2 --padding same

``OUT`` may end in ``.nii``, ``.nii.gz``, ``.npy`` or ``.h5`` (dataset ``/data``).
A 3D input is one channel; a 4D NIfTI's 4th axis holds the channels. Several
filters give an output with the channels last.
"""

from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np
import torch


def keras_crop(n: int, k: int, s: int, d: int, padding: str) -> tuple[int, int]:
    """``(crop_left, output_length)`` of one axis of a Keras ``Conv3DTranspose``."""
    full = (n - 1) * s + (k - 1) * d + 1
    if padding == "valid":
        return 0, full
    out = n * s
    return (full - out) // 2, out


def main() -> None:
    """Load, convolve, save: the script as a user writes it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--kernel", required=True, help="Keras-layout kernel .npy")
    parser.add_argument("--bias", help="bias .npy")
    parser.add_argument("--strides", type=int, default=2)
    parser.add_argument("--dilation", type=int, default=1)
    parser.add_argument("--padding", choices=["same", "valid"], default="same")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    image = nib.load(args.input)
    volume = np.asarray(image.dataobj, dtype=np.float32)  # (i, j, k[, channels])
    if volume.ndim == 3:
        volume = volume[..., np.newaxis]
    kernel = np.load(args.kernel).astype(np.float32)  # (kd, kh, kw, filters, in)
    s, d = args.strides, args.dilation

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 0)))[None]
    w = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))
    b = torch.from_numpy(np.load(args.bias).astype(np.float32)) if args.bias else None
    with torch.no_grad():
        y = torch.nn.functional.conv_transpose3d(x, w, b, stride=s, dilation=d)
    crops = [
        keras_crop(n, k, s, d, args.padding)
        for n, k in zip(volume.shape[:3], kernel.shape[:3], strict=True)
    ]
    window = tuple(slice(c, c + n) for c, n in crops)
    out = np.moveaxis(y[0][(slice(None), *window)].numpy(), 0, -1)  # (i, j, k, filters)
    if out.shape[-1] == 1:
        out = out[..., 0]

    # World alignment: voxels shrink by the stride, footprint centres on input centres.
    scale = np.eye(4)
    for axis, ((crop, _), k) in enumerate(zip(crops, kernel.shape[:3], strict=True)):
        scale[axis, axis] = 1 / s
        scale[axis, 3] = (crop - (k - 1) * d / 2) / s
    affine = image.affine @ scale

    if args.output.endswith((".nii", ".nii.gz")):
        result = nib.Nifti1Image(np.ascontiguousarray(out), affine, image.header)
        result.set_data_dtype(np.float32)
        result.header.set_zooms(tuple(z / s for z in image.header.get_zooms()[:3]))
        nib.save(result, args.output)
    elif args.output.endswith(".npy"):
        np.save(args.output, out)
    elif args.output.endswith((".h5", ".hdf5")):
        import h5py

        with h5py.File(args.output, "w") as handle:
            handle.create_dataset("data", data=out).attrs["affine"] = affine
    else:
        parser.error(f"{args.output}: give a .nii, .nii.gz, .npy or .h5 output")


if __name__ == "__main__":
    main()
