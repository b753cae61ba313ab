"""NumPy ``.npy`` volumes: positional box reads and writes, never a pickle.

A ``.npy`` file is a small text header followed by one raw array, so a box is a
set of byte runs at computable offsets: reads use ``os.pread`` and writes
``os.pwrite`` of only those runs, keeping memory near the box size. The path
``"-"`` reads a whole ``.npy`` stream from standard input, or writes the output
to standard output as its boxes arrive (the header first, then the array in C
order).
"""

from __future__ import annotations

import errno
import io
import math
import os
import sys
import tempfile
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npformat

from conv3dt.volumes.base import (
    Box,
    VolumeError,
    VolumeReader,
    VolumeWriteError,
    VolumeWriter,
    box_shape,
    close_quietly,
    fsync_and_close,
    pwrite_all,
    read_raw_box,
    write_raw_box,
)

__all__ = ["NpyReader", "NpyStreamReader", "NpyStreamWriter", "NpyWriter"]

# How the files people pipe in by mistake begin (a NIfTI header begins with its size).
_OTHER_FORMATS = (
    (b"\x1f\x8b", "gzip (a .nii.gz?)"),
    (b"\x5c\x01\x00\x00", "NIfTI"),
    (b"\x00\x00\x01\x5c", "NIfTI"),
    (b"\x1c\x02\x00\x00", "NIfTI-2"),
    (b"\x00\x00\x02\x1c", "NIfTI-2"),
    (b"\x89HDF\r\n\x1a\n", "HDF5"),
)


def _check_dtype(dtype: np.dtype, label: str) -> None:
    if dtype.hasobject:
        raise VolumeError(
            f"{label}: the array holds Python objects, which would need unpickling; "
            "conv3dt never unpickles files"
        )
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.shape:
        raise VolumeError(f"{label}: unsupported dtype {dtype}; expected a numeric array")


def _read_header(fileobj: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Parse the header (a Python literal, never a pickle); leave the file after it."""
    version = npformat.read_magic(fileobj)
    if version == (1, 0):
        return npformat.read_array_header_1_0(fileobj)
    if version in ((2, 0), (3, 0)):
        # Version 3.0 only changes the header's text encoding to UTF-8, which
        # matters for structured field names alone, and those are refused anyway.
        return npformat.read_array_header_2_0(fileobj)
    raise ValueError(f"unsupported .npy format version {version}")


def header_bytes(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The ``.npy`` header of a C-order array (padded so the data is 64-byte aligned)."""
    buffer = io.BytesIO()
    header = {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    npformat.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


class NpyReader(VolumeReader):
    """Read boxes of a ``.npy`` file with positional reads (C or Fortran order, any endianness)."""

    format = "npy"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        try:
            self._file = open(path, "rb")
        except OSError as exc:
            raise VolumeError(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    def _parse(self) -> None:
        try:
            shape, fortran_order, file_dtype = _read_header(self._file)
        except Exception as exc:  # numpy's header parser raises several types on garbage
            raise VolumeError(f"{self.path}: not a valid .npy file: {exc}") from None
        _check_dtype(file_dtype, self.path)
        self._offset = self._file.tell()
        # Python ints: a product of huge dimensions must not wrap to a small number.
        needed = self._offset + math.prod(shape) * file_dtype.itemsize
        size = os.fstat(self._file.fileno()).st_size
        if size < needed:
            raise VolumeError(
                f"{self.path}: truncated or corrupt .npy file: its header's shape "
                f"{tuple(shape)} needs {needed} bytes but the file has {size}"
            )
        self.shape = tuple(shape)
        self.dtype = file_dtype.newbyteorder("=")
        self._file_dtype = file_dtype
        self._fortran = fortran_order
        # Fortran order is C order of the reversed axes.
        self._file_shape = self.shape[::-1] if fortran_order else self.shape

    def _read(self, box: Box) -> np.ndarray:
        file_box = box[::-1] if self._fortran else box
        try:
            array = read_raw_box(
                self._file.fileno(), self._offset, self._file_shape, self._file_dtype, file_box
            )
        except (OSError, EOFError) as exc:
            raise VolumeError(f"{self.path}: cannot read box {box}: {exc}") from None
        return array.T if self._fortran else array

    def _close(self) -> None:
        self._file.close()


class NpyStreamReader(VolumeReader):
    """A ``.npy`` stream (standard input by default), read fully into memory."""

    format = "npy"

    def __init__(self, stream: BinaryIO | None = None, path: str = "-") -> None:
        super().__init__(path)
        label = "<stdin>" if path == "-" else path
        source = sys.stdin.buffer if stream is None else stream
        try:
            data = source.read()
            other = next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), None)
            array = None if other else npformat.read_array(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # numpy's header parser raises several types on garbage
            raise VolumeError(f"{label}: not a valid .npy stream: {exc}") from None
        if array is None:
            raise VolumeError(
                f"{'stdin' if path == '-' else label} takes an .npy stream only; got {other} "
                "data: give the file path instead"
            )
        _check_dtype(array.dtype, label)
        self._array = array
        self.shape = array.shape
        self.dtype = array.dtype.newbyteorder("=")

    def _read(self, box: Box) -> np.ndarray:
        # A copy: callers may change what they get without changing the volume.
        return self._array[box].copy()

    def _close(self) -> None:
        self._array = None


class NpyWriter(VolumeWriter):
    """Write a C-order ``.npy`` file box by box with positional writes."""

    format = "npy"

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._fd: int | None = None
        super().__init__(path, shape, dtype)

    def _open(self) -> None:
        header = header_bytes(self.shape, self.dtype)
        self._offset = len(header)
        self._fd = self._create_temp()
        pwrite_all(self._fd, header, 0)
        # Size the file up front (sparse); boxes then land at their offsets.
        os.ftruncate(self._fd, self._offset + int(np.prod(self.shape)) * self.dtype.itemsize)

    def _write(self, box: Box, array: np.ndarray) -> None:
        write_raw_box(self._fd, self._offset, self.shape, self.dtype, box, array)

    def _finish(self) -> None:
        fd, self._fd = self._fd, None
        fsync_and_close(fd)

    def _discard(self) -> None:
        fd, self._fd = self._fd, None
        close_quietly(fd)


# Bytes per read when boxes that came out of order are copied to the stream.
_COPY_BYTES = 16 << 20


def _contiguous_start(shape: tuple[int, ...], box: Box) -> int | None:
    """The element offset of a box that is one run of a C-order array; None if it is not.

    A box is one run when it is one index thick on the axes before its first
    longer one, and whole on every axis after that.
    """
    extents = box_shape(box)
    first = next((a for a, n in enumerate(extents) if n != 1), len(extents))
    if any(box[a] != slice(0, shape[a]) for a in range(first + 1, len(shape))):
        return None
    start = 0
    for part, length in zip(box, shape, strict=True):
        start = start * length + part.start
    return start


class NpyStreamWriter(VolumeWriter):
    """Write a C-order ``.npy`` to a stream (standard output by default) as boxes arrive.

    The header goes out when the writer opens, and each box as soon as it
    continues the array in C order: slabs whole along every later axis, in
    order, as the tiles planned for a stream are. From the first box that does
    not continue it, boxes go to an anonymous scratch file instead, copied to
    the stream at commit, so memory stays near one box either way. Voxels never
    written are 0.

    What reached the stream cannot be taken back: an aborted writer leaves the
    reader a truncated array.
    """

    format = "npy"

    def __init__(
        self, shape: tuple[int, ...], dtype: np.dtype, stream: BinaryIO | None = None
    ) -> None:
        self._stream = stream
        self._next = 0  # elements already on the stream
        self._scratch: BinaryIO | None = None
        super().__init__("-", shape, dtype)

    def _label(self) -> str:
        return "<stdout>"

    def _open(self) -> None:
        if self._stream is None:
            if sys.stdout is None:
                raise VolumeWriteError("cannot write the output: standard output is closed")
            self._stream = sys.stdout.buffer
        self._send(header_bytes(self.shape, self.dtype))

    def _send(self, data: bytes | memoryview | None) -> None:
        """Write ``data`` to the stream (None: flush it), naming a closed pipe or stream."""
        try:
            if data is None:
                self._stream.flush()
            else:
                self._stream.write(data)
        except BrokenPipeError:
            if self._stream is getattr(sys.stdout, "buffer", None):
                # Nothing more can reach the reader; without this, Python's own
                # flush at exit would fail again, with a traceback.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            raise VolumeWriteError(
                "cannot write the output: the output pipe was closed by the reader"
            ) from None
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise VolumeWriteError(
                    "cannot write the output: standard output is closed"
                ) from None
            raise

    def _write(self, box: Box, array: np.ndarray) -> None:
        if array.size == 0:
            return
        start = None if self._scratch is not None else _contiguous_start(self.shape, box)
        if start == self._next:
            data = np.ascontiguousarray(array, dtype=self.dtype)
            self._send(memoryview(data.reshape(-1).view(np.uint8)))
            self._next += data.size
            return
        if self._scratch is None:
            self._scratch = tempfile.TemporaryFile(prefix="conv3dt-stdout-")
        write_raw_box(self._scratch.fileno(), 0, self.shape, self.dtype, box, array)

    def _finish(self) -> None:
        total = math.prod(self.shape) * self.dtype.itemsize
        position = self._next * self.dtype.itemsize
        while position < total:
            size = min(_COPY_BYTES, total - position)
            if self._scratch is None:
                chunk = bytes(size)
            else:
                # Past the scratch file's end (never written) reads nothing: zeros.
                chunk = os.pread(self._scratch.fileno(), size, position)
                chunk += bytes(size - len(chunk))
            self._send(chunk)
            position += size
        self._send(None)
        self._close_scratch()

    def _close_scratch(self) -> None:
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            scratch.close()

    def _discard(self) -> None:
        try:
            self._close_scratch()
        except OSError:
            pass
