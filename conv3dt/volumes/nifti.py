"""NIfTI-1 and NIfTI-2 volumes (``.nii``, ``.nii.gz``) through nibabel.

Reads go through nibabel's array proxy, which reads only the requested box and
applies ``scl_slope`` / ``scl_inter``. Writes build the header with nibabel and
place the voxels (first index fastest on disk) at computed offsets.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import zlib
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from conv3dt.volumes.affine import voxel_sizes
from conv3dt.volumes.base import (
    Box,
    VolumeError,
    VolumeMetadata,
    VolumeReader,
    VolumeWriter,
    fsync_path,
    pwrite_all,
    write_raw_box,
)

__all__ = ["NIFTI_DTYPES", "NiftiReader", "NiftiWriter", "int_scaling"]

NIFTI_DTYPES = tuple(np.dtype(t) for t in ("float32", "float64", "int16", "uint8"))
_NIFTI1_MAX_DIM = 32767
_NATIVE = "<" if sys.byteorder == "little" else ">"
# nibabel's own default for .nii.gz: fast, and voxel data compresses little more at 9.
_GZIP_LEVEL = 1
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError)


class NiftiReader(VolumeReader):
    """Read boxes of a NIfTI-1 or NIfTI-2 image, with its scaling applied.

    :attr:`dtype` is float64 when the stored data is float64, float32 otherwise.
    :attr:`stored_dtype` is the dtype on disk and :attr:`scaling` the
    ``(slope, inter)`` that reads apply. A ``.nii.gz`` is decompressed from its
    start up to the box for every read that goes backwards in the file, so read
    such files in increasing ``k``.
    """

    format = "nifti"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        try:
            # No memory map: a whole-volume read must not leave the file mapped.
            image = nib.load(path, mmap=False, keep_file_open=True)
        except FileNotFoundError:
            raise VolumeError(f"cannot open {path}: no such file") from None
        except _READ_ERRORS as exc:
            raise VolumeError(f"{path}: not a readable NIfTI file: {exc}") from None
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VolumeError(f"{path}: not a NIfTI image but {type(image).__name__}")
        header = image.header
        stored = header.get_data_dtype()
        if stored.kind not in "biuf" or stored.fields is not None:
            raise VolumeError(f"{path}: unsupported NIfTI data type {stored}; expected numbers")
        if not path.lower().endswith(".gz"):
            needed = int(image.dataobj.offset) + int(np.prod(image.shape)) * stored.itemsize
            size = os.path.getsize(path)
            if size < needed:
                raise VolumeError(
                    f"{path}: truncated NIfTI file: its data needs {needed} bytes "
                    f"but the file has {size}"
                )
        self._image = image
        self.shape = tuple(int(n) for n in image.shape)
        self.dtype = np.dtype(np.float64 if stored == np.float64 else np.float32)
        self.stored_dtype = stored
        # nibabel moves the scaling from the header to the proxy when loading.
        self.scaling = (float(image.dataobj.slope), float(image.dataobj.inter))
        affine = np.array(image.affine, dtype=np.float64)
        self.metadata = VolumeMetadata(
            affine=affine,
            # From the affine nibabel chose (sform, qform or pixdim), so the two agree.
            voxel_size=voxel_sizes(affine),
            nifti_header=header.copy(),
        )

    def _read(self, box: Box) -> np.ndarray:
        try:
            return np.asarray(self._image.dataobj[box])
        except _READ_ERRORS as exc:
            raise VolumeError(f"{self.path}: cannot read box {box}: {exc}") from None

    def _close(self) -> None:
        # Dropping the image closes the file the proxy keeps open.
        self._image = None


def int_scaling(dtype: np.dtype, lo: float, hi: float) -> tuple[float, float]:
    """``(scl_slope, scl_inter)`` mapping ``[lo, hi]`` onto an integer dtype's range.

    Zero stays exactly representable whenever the range contains it and the
    dtype allows (at most one bit of precision is given up for that); otherwise
    the whole integer range is used.

    Parameters
    ----------
    dtype : numpy.dtype
        An integer dtype (int16 or uint8 in NIfTI).
    lo, hi : float
        The finite value range, ``lo <= hi``.
    """
    info = np.iinfo(dtype)
    if hi == lo:
        return 1.0, float(lo)
    if lo <= 0 <= hi and (info.min < 0 or lo == 0):
        slope = max(hi / info.max, lo / info.min if info.min < 0 else 0.0)
        return float(slope), 0.0
    slope = (hi - lo) / (float(info.max) - float(info.min))
    return float(slope), float(lo - info.min * slope)


def _build_header(
    shape: tuple[int, ...],
    dtype: np.dtype,
    template: Any,
    affine: np.ndarray | None,
    attrs: dict[str, Any] | None,
) -> Any:
    needs_nifti2 = len(shape) > 7 or any(n > _NIFTI1_MAX_DIM for n in shape)
    if template is None:
        header = nib.Nifti2Header() if needs_nifti2 else nib.Nifti1Header()
        codes = (1, 1)
    else:
        klass = (
            nib.Nifti2Header
            if needs_nifti2 or isinstance(template, nib.Nifti2Header)
            else nib.Nifti1Header
        )
        header = template.copy() if type(template) is klass else klass.from_header(template)
        if header.endianness != _NATIVE:
            header = header.as_byteswapped(_NATIVE)
        codes = (int(template["qform_code"]), int(template["sform_code"]))
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    if affine is not None:
        header.set_qform(affine, code=codes[0])
        header.set_sform(affine, code=codes[1])
    header["magic"] = header.single_magic
    # The template's display window describes its data, not ours.
    header["cal_min"] = 0
    header["cal_max"] = 0
    header.set_slope_inter(1.0, 0.0)
    if attrs:
        text = json.dumps(attrs, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        header.extensions.append(nib.nifti1.Nifti1Extension("comment", text.encode()))
    return header


def _header_bytes(header: Any) -> bytes:
    header.set_data_offset(0)  # nibabel then places the data right after the extensions
    buffer = io.BytesIO()
    header.write_to(buffer)
    data = buffer.getvalue()
    return data + b"\0" * (int(header.get_data_offset()) - len(data))


class NiftiWriter(VolumeWriter):
    """Write a NIfTI image box by box.

    ``.nii``: the header is written first and every box goes straight to its
    place in the file. ``.nii.gz``: in this version the whole array is buffered in
    memory and compressed at commit (streaming comes later).

    Float outputs store identity scaling. Integer outputs (int16, uint8) store
    ``scl_slope`` / ``scl_inter`` from :func:`int_scaling`: with ``value_range``
    known up front boxes are quantized as they come; without it the float data is
    buffered in memory until commit, when the range is known.

    With a ``template`` header the output keeps its fields (codes, units,
    intent, extensions, NIfTI version); the affine, when given, is set into both
    qform and sform with the template's codes (scanner, 1, without template).
    ``attrs`` are stored as JSON in a comment extension.
    """

    format = "nifti"

    def __init__(
        self,
        path: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        *,
        template_header: Any = None,
        affine: np.ndarray | None = None,
        attrs: dict[str, Any] | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> None:
        dtype = np.dtype(dtype)
        if dtype not in NIFTI_DTYPES:
            raise VolumeError(
                f"NIfTI output cannot store dtype {dtype}; use one of "
                f"{', '.join(str(d) for d in NIFTI_DTYPES)}"
            )
        if value_range is not None:
            lo, hi = (float(v) for v in value_range)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise ValueError(
                    "`value_range` must be two finite numbers lo <= hi. "
                    f"Received value_range={value_range!r}"
                )
            value_range = (lo, hi)
        self._header = _build_header(tuple(shape), dtype, template_header, affine, attrs)
        self._integer = dtype.kind in "iu"
        self._value_range = value_range if self._integer else None
        self._compressed = path.lower().endswith(".gz")
        self._direct = not self._compressed and (not self._integer or value_range is not None)
        self._fd: int | None = None
        self._buffer: np.ndarray | None = None
        self._slope, self._inter = 1.0, 0.0
        super().__init__(path, shape, dtype)

    def _open(self) -> None:
        if self._integer and self._value_range is not None:
            self._set_scaling(*self._value_range)
        self._fd = self._create_temp()
        if self._direct:
            header = _header_bytes(self._header)
            self._offset = len(header)
            pwrite_all(self._fd, header, 0)
            os.ftruncate(self._fd, self._offset + int(np.prod(self.shape)) * self.dtype.itemsize)
        else:
            quantize_now = not self._integer or self._value_range is not None
            # Fortran order, so that each last-axis slab is contiguous on disk.
            buffer_dtype = self.dtype if quantize_now else np.float32
            self._buffer = np.zeros(self.shape, dtype=buffer_dtype, order="F")

    def _set_scaling(self, lo: float, hi: float) -> None:
        self._header.set_slope_inter(*int_scaling(self.dtype, lo, hi))
        # Quantize with the values as stored (float32 in NIfTI-1).
        self._slope = float(self._header["scl_slope"])
        self._inter = float(self._header["scl_inter"])

    def _quantize(self, array: np.ndarray) -> np.ndarray:
        values = np.asarray(array, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"`array` holds NaN or infinity, which {self.dtype} cannot store")
        if self._value_range is not None and values.size:
            lo, hi = self._value_range
            low, high = values.min(), values.max()
            if low < lo or high > hi:
                raise ValueError(
                    f"`array` holds values in [{low}, {high}], outside value_range=({lo}, {hi})"
                )
        info = np.iinfo(self.dtype)
        stored = np.rint((values - self._inter) / self._slope)
        return np.clip(stored, info.min, info.max).astype(self.dtype)

    def _write(self, box: Box, array: np.ndarray) -> None:
        if self._integer and self._value_range is not None:
            array = self._quantize(array)
        if self._direct:
            file_dtype = self._header.get_data_dtype()
            file_box = box[::-1]
            write_raw_box(self._fd, self._offset, self.shape[::-1], file_dtype, file_box, array.T)
        else:
            self._buffer[box] = array

    def _finish(self) -> None:
        if self._direct:
            os.fsync(self._fd)
            fd, self._fd = self._fd, None
            os.close(fd)
        else:
            self._write_buffer()
            fsync_path(self.tmp_path)

    def _write_buffer(self) -> None:
        """Write header and buffered voxels in file order, one last-axis slab at a time."""
        deferred_scaling = self._integer and self._value_range is None
        if deferred_scaling and self._buffer.size:
            if not np.all(np.isfinite(self._buffer)):
                raise ValueError(f"`array` held NaN or infinity, which {self.dtype} cannot store")
            self._set_scaling(float(self._buffer.min()), float(self._buffer.max()))
        file_dtype = self._header.get_data_dtype()
        buffer, self._buffer = self._buffer, None
        slabs = [buffer] if buffer.ndim == 0 else (buffer[..., t] for t in range(buffer.shape[-1]))
        fd, self._fd = self._fd, None
        with open(fd, "wb") as raw:
            stream: Any = raw
            if self._compressed:
                stream = gzip.GzipFile(os.path.basename(self.path), "wb", _GZIP_LEVEL, raw)
            with stream:
                stream.write(_header_bytes(self._header))
                for slab in slabs:
                    values = self._quantize(slab) if deferred_scaling else slab
                    stream.write(np.asarray(values, dtype=file_dtype).tobytes(order="F"))

    def _discard(self) -> None:
        self._buffer = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass
