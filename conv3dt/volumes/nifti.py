"""NIfTI-1 and NIfTI-2 volumes (``.nii``, ``.nii.gz``) in bounded memory.

The voxels are stored first index fastest, so the file is a sequence of planes
(the first two axes) along the third axis. ``.nii`` reads go through nibabel's
array proxy, which reads only the requested box and applies ``scl_slope`` /
``scl_inter``; ``.nii`` writes place each box at its offsets. A ``.nii.gz`` can
only be read and written front to back: reads decompress forward, keeping the
planes the next read will need, and writes compress each plane once every
plane before it is complete. Headers are built with nibabel.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.volumeutils import apply_read_scaling

from conv3dt import interrupt
from conv3dt.volumes import gzip_codec
from conv3dt.volumes.affine import voxel_sizes
from conv3dt.volumes.base import (
    Box,
    VolumeError,
    VolumeMetadata,
    VolumeReader,
    VolumeWriter,
    box_shape,
    pwrite_all,
    read_raw_box,
    write_raw_box,
)

__all__ = ["NIFTI_DTYPES", "NiftiReader", "NiftiWriter", "header_summary", "int_scaling"]

NIFTI_DTYPES = tuple(np.dtype(t) for t in ("float32", "float64", "int16", "uint8"))
_NIFTI1_MAX_DIM = 32767
_NATIVE = "<" if sys.byteorder == "little" else ">"
# Default bounds of what a .nii.gz reader keeps per volume and a writer buffers;
# conv3dt.run sets them from the tile plan.
_DEFAULT_WINDOW = 256 << 20
_DEFAULT_BUFFER = 256 << 20
# Most bytes and runs one write of a box covers before a stop request is checked
# again: a few milliseconds of I/O, so an interrupted run stops promptly.
_WRITE_BYTES = 8 << 20
_WRITE_RUNS = 4096
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, *gzip_codec.ERRORS)


class NiftiReader(VolumeReader):
    """Read boxes of a NIfTI-1 or NIfTI-2 image, with its scaling applied.

    :attr:`dtype` is float64 when the stored data is float64, float32 otherwise.
    :attr:`stored_dtype` is the dtype on disk and :attr:`scaling` the
    ``(slope, inter)`` that reads apply.

    A ``.nii`` is read through nibabel's array proxy (only the box's bytes). A
    ``.nii.gz`` is decompressed forward in whole planes (the first two axes),
    keeping per volume the last planes a read returned, at most
    :attr:`window_limit` bytes: read it in increasing third index, as tiles that
    are slabs along it do, and every byte is decompressed once.
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
        compressed = path.lower().endswith(".gz")
        # Python ints: the product of a NIfTI-2 header's int64 dims must not wrap.
        needed = int(image.dataobj.offset) + math.prod(image.shape) * stored.itemsize
        size = os.path.getsize(path)
        # Deflate cannot expand data more than about 1032 times.
        holds = size * _MAX_DEFLATE_RATIO + _GZIP_SLACK if compressed else size
        if holds < needed:
            raise VolumeError(
                f"{path}: truncated or corrupt NIfTI file: its header's dim "
                f"{tuple(image.shape)} needs {needed} bytes of data, more than the file "
                f"{'can decompress to' if compressed else 'has'} ({holds})"
            )
        self._compressed = compressed
        self._image = image
        self.shape = tuple(int(n) for n in image.shape)
        # A 5D image with one time point stores several values per voxel in its
        # 5th dimension (intent vector and the like): those are the channels.
        self._vector = len(self.shape) == 5 and self.shape[3] == 1
        if self._vector:
            self.shape = (*self.shape[:3], self.shape[4])
        self.dtype = np.dtype(np.float64 if stored == np.float64 else np.float32)
        self.stored_dtype = stored
        # nibabel moves the scaling from the header to the proxy when loading.
        self.scaling = (float(image.dataobj.slope), float(image.dataobj.inter))
        # The proxy's own scale factors, so that reads scale exactly as nibabel does.
        self._slope = np.asanyarray(image.dataobj.slope)
        self._inter = np.asanyarray(image.dataobj.inter)
        self._planes: _GzipPlanes | None = None
        if compressed and len(self.shape) >= 3 and 0 not in self.shape:
            try:
                self._planes = _GzipPlanes(path, int(image.dataobj.offset), self.shape, stored)
            except _READ_ERRORS as exc:
                raise VolumeError(f"{path}: not a readable NIfTI file: {exc}") from None
        affine = np.array(image.affine, dtype=np.float64)
        self.metadata = VolumeMetadata(
            affine=affine,
            voxel_size=_header_voxel_size(header, affine),
            nifti_header=header.copy(),
        )

    @property
    def stream_itemsize(self) -> int:
        """Bytes per stored value when reads decompress planes (``.nii.gz``), else 0."""
        return self.stored_dtype.itemsize if self._planes is not None else 0

    @property
    def window_limit(self) -> int:
        """Bytes of decompressed planes a ``.nii.gz`` read may keep per volume for the next."""
        return self._planes.window_limit if self._planes is not None else 0

    @window_limit.setter
    def window_limit(self, value: int) -> None:
        if self._planes is not None:
            self._planes.window_limit = int(value)

    def _read(self, box: Box) -> np.ndarray:
        try:
            if self._planes is None or 0 in box_shape(box):
                if self._vector:
                    return np.asarray(self._image.dataobj[(*box[:3], 0, *box[3:])])
                return np.asarray(self._image.dataobj[box])
            return self._read_planes(box)
        except _READ_ERRORS as exc:
            raise VolumeError(f"{self.path}: cannot read box {box}: {exc}") from None

    def _read_planes(self, box: Box) -> np.ndarray:
        assert self._planes is not None
        out = np.empty(box_shape(box), dtype=self.dtype)
        rest = self.shape[3:]
        combos = list(itertools.product(*(range(s.start, s.stop) for s in box[3:])))
        volumes = [int(np.ravel_multi_index(c, rest, order="F")) if rest else 0 for c in combos]
        stacks = self._planes.read(volumes, box[2].start, box[2].stop)
        for combo, planes in zip(combos, stacks, strict=True):
            raw = planes[:, box[1], box[0]].transpose(2, 1, 0)
            local = tuple(i - s.start for i, s in zip(combo, box[3:], strict=True))
            out[(Ellipsis, *local)] = apply_read_scaling(raw, self._slope, self._inter)
        return out

    def verify(self) -> None:
        """Check the gzip CRC32 and length of every member of a ``.nii.gz``.

        Reads stop where the data they need ends, so the checksums that gzip
        keeps at each member's end are only reached here: the stream is
        decompressed on from the furthest point a read reached (from the start
        when none did) to the end of the file.

        Raises
        ------
        VolumeError
            When the compressed stream is damaged or truncated.
        """
        if not self._compressed:
            return
        try:
            if self._planes is not None:
                self._planes.verify()
            else:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                try:
                    _Inflater(fd).drain()
                finally:
                    os.close(fd)
        except (OSError, EOFError, *gzip_codec.ERRORS) as exc:
            raise VolumeError(
                f"{self.path}: damaged gzip stream ({exc}); the file is corrupt or truncated"
            ) from None

    def _close(self) -> None:
        # Dropping the image closes the file the proxy keeps open.
        self._image = None
        if self._planes is not None:
            planes, self._planes = self._planes, None
            planes.close()


def _float32_value(value: Any) -> float:
    """A float32 header field as the shortest decimal that reads back as it (0.8)."""
    return float(str(np.float32(value)))


def _header_voxel_size(header: Any, affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel size ``pixdim[1:4]`` records, where it agrees with the affine in use.

    An sform may scale differently from ``pixdim`` (a header written by a tool
    that updated one and not the other); the affine is what places voxels, so
    its column norms win then.
    """
    from_affine = voxel_sizes(affine)
    stored = np.abs(np.asarray(header["pixdim"][1:4], dtype=np.float64))
    if np.allclose(stored, from_affine, rtol=1e-4, atol=0):
        if header["pixdim"].dtype == np.float32:
            return tuple(_float32_value(v) for v in stored)  # type: ignore[return-value]
        return tuple(float(v) for v in stored)  # type: ignore[return-value]
    return from_affine


def _matrix(matrix: np.ndarray | None) -> list[list[float]] | None:
    return None if matrix is None else np.asarray(matrix, dtype=np.float64).tolist()


def header_summary(header: Any) -> dict[str, Any]:
    """What a NIfTI header says besides the voxels, for ``conv3dt info``.

    Returns
    -------
    dict
        ``version`` (1 or 2), ``stored_shape`` (``dim`` as stored, e.g. 5D for a
        vector image), ``qform_code`` / ``sform_code`` (names), ``qform`` /
        ``sform`` (4x4 nested lists, None when the code is 0; a qform whose
        quaternion is invalid is the reader's message), ``pixdim``
        (``pixdim[1:]`` up to the number of dimensions), ``units`` (space and
        time), ``tr`` (seconds, for a 4D series with time units; else None),
        ``intent`` (code, name, parameters) and ``dim_info`` (frequency,
        phase and slice axes, None where unset).
    """
    version = 2 if isinstance(header, nib.Nifti2Header) else 1
    stored_shape = [int(n) for n in header.get_data_shape()]
    try:
        qform, qcode = header.get_qform(coded=True)
    except ValueError as exc:  # a quaternion no rotation has (rounding in its writer)
        qform, qcode = f"invalid: {exc}", int(header["qform_code"])
    sform, scode = header.get_sform(coded=True)
    codes = nib.nifti1.xform_codes
    space, time = header.get_xyzt_units()
    pixdim = [float(v) for v in header["pixdim"][1 : len(stored_shape) + 1]]
    if header["pixdim"].dtype == np.float32:
        pixdim = [_float32_value(v) for v in pixdim]
    tr = None
    if len(stored_shape) >= 4 and stored_shape[3] > 1 and time != "unknown":
        scale = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(time)
        if scale is not None:
            tr = pixdim[3] * scale
    intent_name, intent_params, intent_label = header.get_intent()
    freq, phase, slice_axis = header.get_dim_info()
    return {
        "version": version,
        "stored_shape": stored_shape,
        "qform_code": codes.label[int(qcode)],
        "sform_code": codes.label[int(scode)],
        "qform": (qform if isinstance(qform, str) else _matrix(qform)) if qcode else None,
        "sform": _matrix(sform) if scode else None,
        "pixdim": pixdim,
        "units": {"space": space, "time": time},
        "tr": tr,
        "intent": {
            "code": int(header["intent_code"]),
            "name": intent_name,
            "params": [float(p) for p in intent_params],
            "label": intent_label,
        },
        "dim_info": {"freq": freq, "phase": phase, "slice": slice_axis},
    }


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


def _set_qform(header: Any, affine: np.ndarray, code: int) -> None:
    """Set the qform from ``affine`` so that every reader can turn it back into a rotation.

    nibabel stores the quaternion of the nearest orthonormal rotation (SVD), but
    rounding can leave ``b² + c² + d²`` a hair above 1 in the header's precision,
    which readers refuse (nibabel: "w2 should be positive"); the vector part is
    then shrunk by that hair, a change far below the header's precision.
    """
    header.set_qform(affine, code=code)
    names = ("quatern_b", "quatern_c", "quatern_d")
    stored = header.structarr[names[0]].dtype
    bcd = np.array([header[name] for name in names], dtype=stored)
    # Readers sum in the stored precision (nibabel) or in double (nifti_io).
    wide = bcd.astype(np.float64)
    while 1.0 - np.dot(bcd, bcd) < 0.0 or 1.0 - np.dot(wide, wide) < 0.0:
        bcd = np.nextafter(bcd, np.zeros(3, dtype=stored))
        wide = bcd.astype(np.float64)
    for name, value in zip(names, bcd, strict=True):
        header[name] = value


def _set_voxel_size(header: Any, template: Any, strides: tuple[float, ...] | None) -> None:
    """Store the template's voxel size divided by the strides in ``pixdim[1:4]``.

    Only where the template's ``pixdim`` agrees with the affine just set (as
    nibabel's zooms); a header whose ``pixdim`` contradicts its sform keeps
    the affine's zooms rather than carry the contradiction over.
    """
    if template is None or strides is None:
        return
    wanted = np.asarray(template["pixdim"][1:4], dtype=np.float64) / np.asarray(
        strides, dtype=np.float64
    )
    zooms = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if np.all(wanted > 0) and np.allclose(wanted, zooms, rtol=1e-4, atol=0):
        pixdim = header["pixdim"]
        pixdim[1:4] = wanted
        header["pixdim"] = pixdim


def _build_header(
    shape: tuple[int, ...],
    dtype: np.dtype,
    template: Any,
    affine: np.ndarray | None,
    attrs: dict[str, Any] | None,
    strides: tuple[float, ...] | None = None,
    vector: bool = False,
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
    vector = vector and len(shape) == 4
    header.set_data_shape((*shape[:3], 1, shape[3]) if vector else shape)
    header.set_data_dtype(dtype)
    if vector:
        header.set_intent("vector")
    elif int(header["intent_code"]) == nib.nifti1.intent_codes["vector"]:
        header.set_intent("none")  # the template's components are not this output's
    if affine is not None:
        _set_qform(header, affine, codes[0])
        header.set_sform(affine, code=codes[1])
        _set_voxel_size(header, template, strides)
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


# Rows of the first axis per block of NumPy's transposing copy: long enough for
# few calls, short enough that a block's cache lines stay in cache.
_TRANSPOSE_BLOCK = 64


def fortran_order(array: np.ndarray) -> np.ndarray:
    """``array``'s values in Fortran order (itself when already so), copied in blocks.

    Float arrays of three or more axes go through a Numba kernel, one 3D
    volume at a time, when the engines have already loaded Numba (no import is
    paid for it); others through NumPy a block of rows of the first axis at a
    time. Either is several times as fast as NumPy's one strided copy of a
    large array.
    """
    if array.flags.f_contiguous or array.ndim < 2:
        return array
    out = np.empty(array.shape, dtype=array.dtype, order="F")
    kernels = sys.modules.get("conv3dt.engine.numba_kernels")
    if kernels is not None and array.ndim >= 3 and array.dtype.kind == "f":
        reversed_out = out.T
        for index in np.ndindex(*array.shape[3:]):
            kernels.reverse_axes(array[(..., *index)], reversed_out[index[::-1]])
        return out
    for start in range(0, array.shape[0], _TRANSPOSE_BLOCK):
        out[start : start + _TRANSPOSE_BLOCK] = array[start : start + _TRANSPOSE_BLOCK]
    return out


class NiftiWriter(VolumeWriter):
    """Write a NIfTI image box by box, in bounded memory.

    The voxels are stored in *planes* (the first two axes, first index fastest),
    one after another along the third axis and then the later ones.

    - ``.nii`` with a float dtype, or an integer dtype with ``value_range``: the
      header is written first and every box goes straight to its place in the
      file, one plane at a time.
    - ``.nii.gz`` likewise: the header and then each plane are compressed as
      soon as every plane before it is complete, so boxes that are slabs along
      the third axis, written in increasing order, keep only the planes of the
      slab being filled. Planes that complete out of order wait in memory up to
      :attr:`buffer_limit` bytes, beyond it in a scratch file beside the target.
      Each voxel must be written once (boxes may not overlap). The stream is
      one gzip member compressed by :class:`~conv3dt.volumes.gzip_codec.GzipBlockWriter`:
      ISA-L in blocks on a few threads (outputs of 32 MiB and more), else on
      the writing thread.
    - int16 / uint8 without ``value_range``: the scaling needs the data's range
      before the header can be written, so boxes go as float32 to a scratch file
      beside the target while the range is tracked; at commit the scaling is set
      and the planes are quantized and written (compressed or not) one at a time.

    Integer outputs store ``scl_slope`` / ``scl_inter`` from :func:`int_scaling`
    (voxels never written count as 0); float outputs store identity scaling.

    With a ``template`` header the output keeps its fields (codes, units,
    intent, extensions, NIfTI version); the affine, when given, is set into both
    qform and sform with the template's codes (scanner, 1, without template),
    the qform as a valid unit quaternion. With ``strides`` (output voxels per
    input voxel along i, j, k), ``pixdim[1:4]`` is the template's divided by
    them. With ``vector``, a 4D shape ``(i, j, k, c)`` is stored as a 5D vector
    image ``(i, j, k, 1, c)`` with intent ``NIFTI_INTENT_VECTOR``, which
    :class:`NiftiReader` reads back as ``(i, j, k, c)``; the bytes on disk are
    the same. ``attrs`` are stored as JSON in a comment extension.
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
        strides: tuple[float, ...] | None = None,
        vector: bool = False,
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
        shape = tuple(int(n) for n in shape)
        self._header = _build_header(
            shape, dtype, template_header, affine, attrs, strides=strides, vector=vector
        )
        self._integer = dtype.kind in "iu"
        self._value_range = value_range if self._integer else None
        self._compressed = path.lower().endswith(".gz")
        self._deferred = self._integer and value_range is None
        self._plane_shape = shape[:2] if len(shape) >= 3 else shape
        self._rest = shape[len(self._plane_shape) :]
        self._plane_size = int(np.prod(self._plane_shape))
        self._file_dtype = np.dtype(np.float32) if self._deferred else dtype
        #: Bytes of complete-but-waiting and incomplete planes a ``.nii.gz`` keeps in memory.
        self.buffer_limit = _DEFAULT_BUFFER
        self._fd: int | None = None
        self._raw: Any = None
        self._sink: Any = None
        self._scratch: Any = None
        self._planes: dict[int, np.ndarray] = {}
        self._spilled: set[int] = set()
        self._filled = np.zeros(int(np.prod(self._rest)), dtype=np.int64)
        self._next = 0
        self._range = [np.inf, -np.inf]
        self._slope, self._inter = 1.0, 0.0
        super().__init__(path, shape, dtype)

    # -- opening and the three ways of storing boxes ----------------------------

    def _open(self) -> None:
        if self._integer and self._value_range is not None:
            self._set_scaling(*self._value_range)
        self._fd = self._create_temp()
        if self._deferred:
            self._scratch = self._create_scratch()
        elif self._compressed:
            self._open_sink()
        else:
            header = _header_bytes(self._header)
            self._offset = len(header)
            pwrite_all(self._fd, header, 0)
            os.ftruncate(self._fd, self._offset + len(self._filled) * self._plane_bytes)

    @property
    def _plane_bytes(self) -> int:
        return self._plane_size * self._file_dtype.itemsize

    def _create_scratch(self) -> Any:
        # Beside the target (same disk); an anonymous file leaves nothing behind.
        directory, name = os.path.split(os.path.abspath(self.path))
        return tempfile.TemporaryFile(dir=directory, prefix=f".{name}.conv3dt-scratch-")

    def _open_sink(self) -> None:
        """Start the output stream (compressed or not) with the header."""
        fd, self._fd = self._fd, None
        raw = open(fd, "wb")
        self._sink = raw
        self._raw = raw
        if self._compressed:
            # Compressed on a few threads in blocks, written in order as one gzip
            # member; the name in its header is the file's without ".gz", as gzip's.
            name = os.path.basename(self.path)
            size = len(self._filled) * self._plane_size * self.dtype.itemsize
            self._sink = gzip_codec.GzipBlockWriter(
                raw, name=name[: -len(".gz")], threads=gzip_codec.threads_for(size)
            )
        self._sink.write(_header_bytes(self._header))

    def _set_scaling(self, lo: float, hi: float) -> None:
        self._header.set_slope_inter(*int_scaling(self.dtype, lo, hi))
        # Quantize with the values as stored (float32 in NIfTI-1).
        self._slope = float(self._header["scl_slope"])
        self._inter = float(self._header["scl_inter"])

    def _quantize(self, array: np.ndarray) -> np.ndarray:
        # This runs over every output voxel: one float64 copy, changed in place,
        # and its extremes (NaN and infinities show there) instead of a mask.
        values = np.array(array, dtype=np.float64)
        if values.size:
            low, high = float(values.min()), float(values.max())
            if not (np.isfinite(low) and np.isfinite(high)):
                raise ValueError(f"`array` holds NaN or infinity, which {self.dtype} cannot store")
            if self._value_range is not None:
                lo, hi = self._value_range
                if low < lo or high > hi:
                    raise ValueError(
                        f"`array` holds values in [{low}, {high}], outside value_range=({lo}, {hi})"
                    )
        info = np.iinfo(self.dtype)
        np.subtract(values, self._inter, out=values)
        np.divide(values, self._slope, out=values)
        np.rint(values, out=values)
        np.clip(values, info.min, info.max, out=values)
        return values.astype(self.dtype)

    def _pieces(self, box: Box, array: np.ndarray) -> Any:
        """``(plane, box within the plane, piece)`` for every plane the box meets, in order."""
        lead = len(self._plane_shape)
        inner, outer = box[:lead], box[lead:]
        ranges = [range(s.start, s.stop) for s in outer]
        strides = np.cumprod((1, *self._rest[:-1])) if self._rest else ()
        for reversed_index in itertools.product(*ranges[::-1]):
            index = reversed_index[::-1]
            plane = int(sum(i * s for i, s in zip(index, strides, strict=True)))
            local = tuple(i - s.start for i, s in zip(index, outer, strict=True))
            yield plane, inner, array[(Ellipsis, *local)] if local else array

    def _store_box(
        self,
        fd: int,
        offset: int,
        box: Box,
        array: np.ndarray,
        convert: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """Write a box at its place in a raw F-order file of this shape, in few long runs.

        The box is transposed in memory, a group of consecutive planes at a time,
        and written in the longest runs the file holds it in: one run per group
        when the box spans whole planes, one per plane when it spans whole rows
        (the first axis), else one per row. ``convert`` (quantization) is
        applied to each group. A stop request is honoured between groups.
        """
        lead = len(self._plane_shape)
        rest = self._rest
        if not rest:
            box, array, rest = (*box, slice(0, 1)), array[..., None], (1,)
        inner, depth, others = box[:lead], box[lead], box[lead + 1 :]
        extent = box_shape(inner)
        group = max(1, _WRITE_BYTES // max(1, int(np.prod(extent)) * self._file_dtype.itemsize))
        if extent != self._plane_shape:
            # Runs per plane: one when the box spans whole rows, else one per row.
            runs = 1 if extent[0] == self._plane_shape[0] else int(np.prod(extent[1:]))
            group = max(1, min(group, _WRITE_RUNS // runs))
        strides = np.cumprod((rest[0], *rest[1:-1])) if len(rest) > 1 else ()
        file_shape = (rest[0], *self._plane_shape[::-1])
        for reversed_index in itertools.product(*(range(s.start, s.stop) for s in others[::-1])):
            index = reversed_index[::-1]
            first = int(sum(i * s for i, s in zip(index, strides, strict=True)))
            local = tuple(i - s.start for i, s in zip(index, others, strict=True))
            volume = array[(Ellipsis, slice(None), *local)]
            for start in range(depth.start, depth.stop, group):
                interrupt.check()
                stop = min(start + group, depth.stop)
                piece = volume[..., start - depth.start : stop - depth.start]
                if convert is not None:
                    piece = convert(piece)
                write_raw_box(
                    fd,
                    offset + first * self._plane_bytes,
                    file_shape,
                    self._file_dtype,
                    (slice(start, stop), *inner[::-1]),
                    piece.T,
                )

    def _store(self, fd: int, offset: int, plane: int, inner: Box, piece: np.ndarray) -> None:
        """Write one plane's piece at its place in a raw F-order file of planes."""
        write_raw_box(
            fd,
            offset + plane * self._plane_bytes,
            self._plane_shape[::-1],
            self._file_dtype,
            inner[::-1],
            piece.T,
        )

    def _write(self, box: Box, array: np.ndarray) -> None:
        # The file holds voxels in Fortran order: one transposing copy of the box
        # makes every plane, group of planes and row of it contiguous.
        array = fortran_order(array)
        if self._deferred:
            self._track_range(array)
            self._store_box(self._scratch.fileno(), 0, box, array)
            for plane, _, piece in self._pieces(box, array):
                self._filled[plane] += piece.size
        elif self._sink is None:
            convert = self._quantize if self._integer else None
            self._store_box(self._fd, self._offset, box, array, convert)
        else:
            for plane, inner, piece in self._pieces(box, array):
                interrupt.check()
                values = self._quantize(piece) if self._integer else piece
                self._buffer(plane, inner, values)
            self._emit_ready()

    def _track_range(self, piece: np.ndarray) -> None:
        if not piece.size:
            return
        low, high = float(np.min(piece)), float(np.max(piece))
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(f"`array` holds NaN or infinity, which {self.dtype} cannot store")
        self._range = [min(self._range[0], low), max(self._range[1], high)]

    # -- .nii.gz: planes compressed in order -------------------------------------

    def _buffer(self, plane: int, inner: Box, values: np.ndarray) -> None:
        if plane < self._next:
            raise ValueError(
                f"{self.path}: a box overlaps plane {plane} of the third axis, which is "
                "complete and already compressed; boxes of a .nii.gz must not overlap"
            )
        held = self._planes.get(plane)
        if held is None and plane not in self._spilled:
            if (len(self._planes) + 1) * self._plane_bytes <= self.buffer_limit:
                # Zeros where the box leaves part of the plane unwritten (voxels
                # never written are 0); a box spanning the plane fills it whole.
                whole = box_shape(inner) == self._plane_shape
                held = self._planes[plane] = (np.empty if whole else np.zeros)(
                    self._plane_shape, dtype=self._file_dtype, order="F"
                )
            else:
                if self._scratch is None:
                    self._scratch = self._create_scratch()
                self._spilled.add(plane)
        if held is not None:
            held[inner] = values
        else:
            self._store(self._scratch.fileno(), 0, plane, inner, values)
        self._filled[plane] += values.size

    def _emit_ready(self) -> None:
        while self._next < len(self._filled) and self._filled[self._next] >= self._plane_size:
            interrupt.check()
            self._emit(self._next)

    def _plane(self, plane: int) -> np.ndarray:
        """A plane's stored values as a C-order (reversed axes) array."""
        held = self._planes.pop(plane, None)
        if held is not None:
            return held.T
        if plane in self._spilled or self._deferred:
            self._spilled.discard(plane)
            full = tuple(slice(0, n) for n in self._plane_shape[::-1])
            return read_raw_box(
                self._scratch.fileno(),
                plane * self._plane_bytes,
                self._plane_shape[::-1],
                self._file_dtype,
                full,
            )
        return np.zeros(self._plane_shape[::-1], dtype=self._file_dtype)

    def _emit(self, plane: int) -> None:
        values = self._plane(plane)
        if self._deferred:
            values = self._quantize(values)
        self._sink.write(memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8)))
        self._next = plane + 1

    # -- finishing -------------------------------------------------------------

    def _finish(self) -> None:
        if self._sink is None and not self._deferred:
            os.fsync(self._fd)
            fd, self._fd = self._fd, None
            os.close(fd)
            return
        if self._deferred:
            lo, hi = self._range
            if int(self._filled.sum()) < int(np.prod(self.shape)):
                lo, hi = min(lo, 0.0), max(hi, 0.0)  # unwritten voxels are 0
            if hi >= lo:
                self._set_scaling(lo, hi)
            self._open_sink()
        while self._next < len(self._filled):
            interrupt.check()
            self._emit(self._next)
        if self._sink is not self._raw:
            # The last blocks and the gzip trailer; the file stays open. On an
            # error the writer has stopped its threads and _discard closes the file.
            self._sink.close()
        self._sink = None
        raw, self._raw = self._raw, None
        try:
            raw.flush()
            os.fsync(raw.fileno())
        finally:
            raw.close()
        self._close_scratch()

    def _close_scratch(self) -> None:
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            scratch.close()

    def _discard(self) -> None:
        self._planes.clear()
        sink, self._sink = self._sink, None
        raw, self._raw = self._raw, None
        if isinstance(sink, gzip_codec.GzipBlockWriter):
            # Drop the blocks in flight and end the compression threads.
            sink.abort()
        if raw is not None:
            try:
                raw.close()
            except (OSError, ValueError):
                pass
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self._close_scratch()
        except OSError:
            pass


# -- .nii.gz reading: forward-only decompression, whole planes at a time ------

# Compressed bytes per read from the file, and most bytes one inflate call may return.
_INFLATE_INPUT = 64 << 10
_INFLATE_OUTPUT = 256 << 10
_GZIP_MAGIC = b"\x1f\x8b"
# Deflate's largest expansion is 1032:1; the slack covers gzip headers of tiny files.
_MAX_DEFLATE_RATIO = 1032
_GZIP_SLACK = 1 << 16


class _Inflater:
    """Decompress a gzip file (every member) forward from wherever it stands.

    Reads the compressed file with ``os.pread`` at its own offset, so several
    inflaters share one descriptor; :meth:`copy` snapshots one, position
    included, so a later read can resume there instead of at the file's start.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._offset = 0  # compressed bytes consumed from the file
        self._zlib = gzip_codec.decompressobj()
        self._tail = b""  # compressed bytes read but not yet decompressed
        self.position = 0  # uncompressed bytes produced so far

    def copy(self) -> _Inflater:
        """An independent inflater at the same position.

        The copy holds no compressed bytes of its own (it reads them again from
        the file), so snapshots cost little more than zlib's state.
        """
        twin = object.__new__(_Inflater)
        twin._fd, twin._offset, twin._tail = self._fd, self._offset - len(self._tail), b""
        twin._zlib = self._zlib.copy()
        twin.position = self.position
        return twin

    def _input(self) -> bytes:
        if self._zlib.eof:
            # A member ended: another may follow (concatenated gzip files).
            rest = self._zlib.unused_data
            while len(rest) < len(_GZIP_MAGIC):
                more = self._pread()
                if not more:
                    break
                rest += more
            if rest[:2] != _GZIP_MAGIC:
                raise EOFError("the compressed data ends early")
            self._zlib = gzip_codec.decompressobj()
            self._tail = rest
        if not self._tail:
            self._tail = self._pread()
            if not self._tail:
                raise EOFError("the compressed data ends early")
        return self._tail

    def _pread(self) -> bytes:
        data = os.pread(self._fd, _INFLATE_INPUT, self._offset)
        self._offset += len(data)
        return data

    def _inflate(self, limit: int) -> bytes:
        data = self._input()
        out = self._zlib.decompress(data, min(limit, _INFLATE_OUTPUT))
        self._tail = self._zlib.unconsumed_tail if not self._zlib.eof else b""
        self.position += len(out)
        return out

    def readinto(self, buffer: np.ndarray) -> None:
        """Fill a C-contiguous array with the next ``buffer.nbytes`` bytes.

        Raises
        ------
        EOFError
            When the file ends first.
        zlib.error
            When the compressed data is corrupt.
        """
        view = memoryview(buffer.reshape(-1).view(np.uint8))
        while len(view):
            out = self._inflate(len(view))
            view[: len(out)] = out
            view = view[len(out) :]

    def skip(self, count: int) -> None:
        """Decompress and drop the next ``count`` bytes."""
        while count > 0:
            count -= len(self._inflate(count))

    def drain(self) -> None:
        """Decompress to the end of the file, so zlib checks every member's trailer.

        zlib compares each member's CRC32 and length (ISIZE) with what it
        produced when it reaches the member's end. Zero bytes after the last
        member are allowed, as :mod:`gzip` allows them.

        Raises
        ------
        EOFError
            When the file ends inside a member, or something other than a
            gzip member follows one.
        zlib.error
            When the compressed data, a checksum or a length is wrong.
        """
        while True:
            while not self._zlib.eof:
                self._inflate(_INFLATE_OUTPUT)
            rest = self._zlib.unused_data.lstrip(b"\0")
            while len(rest) < len(_GZIP_MAGIC):
                more = self._pread()
                if not more:
                    if rest:
                        raise EOFError("the file ends inside a gzip member header")
                    return
                rest = (rest + more).lstrip(b"\0")
            if rest[:2] != _GZIP_MAGIC:
                raise EOFError("data that is not gzip follows the compressed stream")
            self._zlib = gzip_codec.decompressobj()
            self._tail = rest


class _GzipPlanes:
    """Planes of a ``.nii.gz``'s data, decompressed forward and windowed per volume.

    The data is an F-order array of ``shape``: a *plane* covers the first two
    axes, planes follow along the third, and a *volume* (index over the axes
    after the third) is a run of planes. Each volume read has a cursor that keeps
    the last planes it returned (at most ``window_limit`` bytes), so reads that
    move forward, or stay put as neighbouring tiles do, decompress every byte
    once. A read further back restarts its volume from a snapshot taken at the
    volume's start, never from the file's start.
    """

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.dtype = dtype
        self.plane_shape = (int(shape[1]), int(shape[0]))  # C order of the F-order plane
        self.planes = int(shape[2])
        self.plane_bytes = int(np.prod(shape[:2])) * dtype.itemsize
        self._volume_bytes = self.plane_bytes * self.planes
        start = _Inflater(self._fd)
        start.skip(offset)
        self._starts: dict[int, _Inflater] = {0: start}
        self._cursors: dict[int, _Cursor] = {}
        self.window_limit = _DEFAULT_WINDOW

    def _start_of(self, volume: int) -> _Inflater:
        known = max(v for v in self._starts if v <= volume)
        while known < volume:
            walker = self._starts[known].copy()
            walker.skip(self._volume_bytes)
            known += 1
            self._starts[known] = walker
        return self._starts[volume].copy()

    def read(self, volumes: list[int], first: int, stop: int) -> list[np.ndarray]:
        """Planes ``first:stop`` of each volume, as ``(planes, j, i)`` arrays (file dtype).

        Cursors of volumes not asked for are dropped with their windows.
        """
        for volume in list(self._cursors):
            if volume not in volumes:
                del self._cursors[volume]
        result = []
        for volume in volumes:
            cursor = self._cursors.get(volume)
            if cursor is None:
                cursor = self._cursors[volume] = _Cursor(self, volume)
            result.append(cursor.planes(first, stop))
        return result

    def verify(self) -> None:
        """Decompress from the furthest point any read reached to the end, checking trailers.

        Every inflater here continues one decompression that began at the
        file's start (snapshots are copies), so members it passed were checked
        then; draining the furthest one checks the rest.
        """
        inflaters = [c._inflater for c in self._cursors.values() if c._inflater is not None]
        inflaters += self._starts.values()
        max(inflaters, key=lambda inflater: inflater.position).copy().drain()

    def close(self) -> None:
        self._cursors.clear()
        self._starts.clear()
        os.close(self._fd)


class _Cursor:
    """One volume's forward decompression and its window of planes."""

    def __init__(self, owner: _GzipPlanes, volume: int) -> None:
        self._owner = owner
        self._volume = volume
        self._inflater: _Inflater | None = None
        self._next = 0  # plane the inflater stands at
        self._window: np.ndarray | None = None
        self._first = 0  # plane index of the window's first plane

    def planes(self, first: int, stop: int) -> np.ndarray:
        owner = self._owner
        window = self._window
        if window is not None and self._first <= first and stop <= self._first + len(window):
            return window[first - self._first : stop - self._first]
        self._window = None
        done = first
        if window is not None and self._first <= first < self._first + len(window):
            # Neighbouring tiles overlap by their halo: keep what is already here,
            # moved to the front of the same buffer when the size repeats.
            kept = window[first - self._first :]
            if len(window) == stop - first:
                planes = window
                planes[: len(kept)] = kept.copy()
            else:
                planes = np.empty((stop - first, *owner.plane_shape), dtype=owner.dtype)
                planes[: len(kept)] = kept
            done = first + len(kept)
        else:
            planes = np.empty((stop - first, *owner.plane_shape), dtype=owner.dtype)
        del window
        if done < stop:
            if self._inflater is None or done < self._next:
                self._inflater = owner._start_of(self._volume)
                self._next = 0
            self._inflater.skip((done - self._next) * owner.plane_bytes)
            self._inflater.readinto(planes[done - first :])
            self._next = stop
        if planes.nbytes <= owner.window_limit:
            self._window, self._first = planes, first
        return planes
