"""The volume protocol: readers and writers of boxes, their metadata and their errors.

A *box* is a tuple of ``slice(start, stop)`` objects, one per array axis (missing
trailing axes mean "all of it"). Readers return the box as a C-contiguous,
native-endian array; writers store a box as soon as it is given, into a temporary
file beside the target that :meth:`VolumeWriter.commit` renames onto the target.

This module also holds the positional I/O shared by the formats whose data is
one raw array at a byte offset (``.npy`` and uncompressed NIfTI).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import importlib
import operator
import os
import secrets
import shutil
import socket
import weakref
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "Box",
    "OutputExistsError",
    "VolumeError",
    "VolumeMetadata",
    "VolumeReader",
    "VolumeWriteError",
    "VolumeWriter",
    "box_shape",
    "close_quietly",
    "fsync_and_close",
    "fsync_path",
    "import_optional",
    "is_live_local_temp",
    "normalize_box",
    "pwrite_all",
    "read_raw_box",
    "remove_dead_temps",
    "rename_noreplace",
    "temp_path",
    "write_raw_box",
]

Box = tuple[slice, ...]

# When the gaps between a box's runs total at most this many bytes, one read
# fetches the whole span and the box is picked out in memory; otherwise each
# contiguous run is read straight into the result, so memory stays at the box size.
COALESCE_SLACK_BYTES = 4 << 20


class VolumeError(ValueError):
    """A volume file cannot be opened, read or written (the message names the file)."""


class VolumeWriteError(VolumeError):
    """Writing failed part way (disk full, I/O error); the partial output was removed.

    A failure of the run rather than of its arguments, for callers that tell the two apart.
    """

    #: The command line's exit code for it: a runtime failure.
    exit_code = 1


class OutputExistsError(VolumeError):
    """The target appeared while it was being written and overwriting was not allowed.

    The finished output was removed and the target left as it is.
    """


@dataclass
class VolumeMetadata:
    """What a volume knows about itself besides its voxels.

    Attributes
    ----------
    affine : numpy.ndarray or None
        4x4 float64 voxel-to-world matrix, or None when the format has none.
    voxel_size : tuple of float or None
        Voxel sizes along the first three axes: the column norms of ``affine``.
    attrs : dict
        HDF5 dataset attributes (empty for other formats).
    nifti_header : nibabel header or None
        A copy of the NIfTI header, for use as a template when writing.
    dataset : str or None
        The HDF5 dataset path inside the file.
    """

    affine: np.ndarray | None = None
    voxel_size: tuple[float, ...] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    nifti_header: Any = None
    dataset: str | None = None


def normalize_box(box: Box | None, shape: tuple[int, ...]) -> Box:
    """Return ``box`` as one ``slice(start, stop)`` per axis with explicit bounds.

    Parameters
    ----------
    box : tuple of slice or None
        None means the whole array; missing trailing axes mean whole axes; a
        slice's ``None`` start or stop means the axis's start or end.
    shape : tuple of int
        The array's shape.

    Raises
    ------
    ValueError
        When the box has too many axes, a step other than 1, or bounds that are
        negative, reversed or beyond the shape.
    """
    if box is None:
        box = ()
    elif isinstance(box, slice):
        box = (box,)
    if not isinstance(box, tuple) or len(box) > len(shape):
        raise ValueError(
            f"`box` must be a tuple of at most {len(shape)} slices for shape {shape}. "
            f"Received box={box!r}"
        )
    result = []
    for axis, length in enumerate(shape):
        part = box[axis] if axis < len(box) else slice(None)
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise ValueError(
                f"`box` entries must be slices with step 1; axis {axis} is {part!r}. "
                f"Received box={box!r}"
            )
        try:
            start = 0 if part.start is None else operator.index(part.start)
            stop = length if part.stop is None else operator.index(part.stop)
        except TypeError:
            raise ValueError(
                f"`box` bounds must be integers; axis {axis} is {part!r}. Received box={box!r}"
            ) from None
        if not 0 <= start <= stop <= length:
            raise ValueError(
                f"`box` axis {axis} is {part!r}, outside 0..{length} or reversed "
                f"(shape {shape}). Received box={box!r}"
            )
        result.append(slice(start, stop))
    return tuple(result)


def box_shape(box: Box) -> tuple[int, ...]:
    """The shape of the array a normalized box selects."""
    return tuple(s.stop - s.start for s in box)


class VolumeReader:
    """A volume on disk, read one box at a time.

    Attributes
    ----------
    path : str
        The path as given (``"-"`` for standard input).
    format : str
        ``"npy"``, ``"hdf5"`` or ``"nifti"``.
    shape : tuple of int
        The array shape as stored (NIfTI: ``(i, j, k)`` or ``(i, j, k, c)``).
    dtype : numpy.dtype
        The native-endian dtype :meth:`read` returns.
    metadata : VolumeMetadata
    """

    format: str = ""

    def __init__(self, path: str) -> None:
        self.path = path
        self.shape: tuple[int, ...] = ()
        self.dtype: np.dtype = np.dtype(np.float32)
        self.metadata = VolumeMetadata()
        self._closed = False

    @property
    def ndim(self) -> int:
        """Number of array axes."""
        return len(self.shape)

    def read(self, box: Box | None = None) -> np.ndarray:
        """Read one box (None: the whole volume) as a C-contiguous native-endian array.

        Raises
        ------
        ValueError
            When ``box`` does not fit the shape.
        VolumeError
            When the file cannot be read (truncated, corrupt, closed).
        """
        if self._closed:
            raise VolumeError(f"{self.path}: the volume is closed")
        box = normalize_box(box, self.shape)
        array = self._read(box)
        return np.ascontiguousarray(array, dtype=self.dtype)

    def verify(self) -> None:
        """Check what reading boxes could not, once the last box is read.

        Formats whose integrity checks sit at the end of a stream (the gzip
        CRC32 of a ``.nii.gz``) check them here; callers verify before they
        declare an output complete.

        Raises
        ------
        VolumeError
            When the file turns out to be damaged.
        """
        if self._closed:
            raise VolumeError(f"{self.path}: the volume is closed")

    def close(self) -> None:
        """Release the file; further reads raise :class:`VolumeError`."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> VolumeReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.path!r} format={self.format} "
            f"shape={self.shape} dtype={self.dtype}>"
        )

    def _read(self, box: Box) -> np.ndarray:
        raise NotImplementedError

    def _close(self) -> None:
        """Release format resources."""


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_failure(target: str, exc: BaseException) -> VolumeWriteError:
    """Turn an OS-level write failure into a VolumeError naming the target."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or "No space left" in text:
        reason = "no space left on device"
    elif code == getattr(errno, "EDQUOT", None) or "quota exceeded" in text.lower():
        reason = "disk quota exceeded"
    elif code == errno.EFBIG:
        reason = "file too large (the file system's or the process's file size limit)"
    else:
        reason = getattr(exc, "strerror", None) or text
    return VolumeWriteError(f"cannot write {target}: {reason}; the partial output was removed")


_TEMP_MARK = ".conv3dt-tmp-"


def _host() -> str:
    """This machine's name as temporary names carry it (no path separators)."""
    return socket.gethostname().replace(os.sep, "_") or "localhost"


def temp_path(target: str) -> str:
    """A fresh temporary name beside ``target``: ``.NAME.conv3dt-tmp-HOST-PID-RANDOM``.

    The host and process id let a later run tell that the writer is gone
    (see :func:`remove_dead_temps`).
    """
    directory, name = os.path.split(os.path.abspath(target))
    suffix = f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    return os.path.join(directory, f".{name}{_TEMP_MARK}{suffix}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _temp_writer(path: str, target: str) -> tuple[str, int] | None:
    """The host and process id a temporary name of ``target`` records (None: another form)."""
    prefix = f".{os.path.basename(os.path.abspath(target))}{_TEMP_MARK}"
    name = os.path.basename(path)
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix) :].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def is_live_local_temp(path: str, target: str) -> bool:
    """Whether ``path`` is a temporary name of ``target`` whose writer runs on this host."""
    writer = _temp_writer(path, target)
    if writer is None or writer[0] != _host():
        return False
    return writer[1] == os.getpid() or _process_alive(writer[1])


def remove_dead_temps(target: str) -> list[str]:
    """Remove the temporary files and directories of ``target`` whose writer has died.

    Only names made by :func:`temp_path` on this host whose process no longer
    exists are removed: a temporary name of a live process, or of another host
    (whose processes cannot be checked from here), is left alone.

    Returns
    -------
    list of str
        The paths removed.
    """
    directory, name = os.path.split(os.path.abspath(target))
    prefix = f".{name}{_TEMP_MARK}"
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*"))):
        writer = _temp_writer(path, target)
        if writer is None or writer[0] != _host() or is_live_local_temp(path, target):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _remove_quietly(path)
        removed.append(path)
    return removed


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2_noreplace(source: str, target: str) -> bool:
    """``renameat2(RENAME_NOREPLACE)``; False where the system or file system lacks it."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return False  # not glibc 2.28+ (or not Linux)
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    status = function(
        _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
    )
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), target)


def rename_noreplace(source: str, target: str) -> None:
    """Rename ``source`` (a file or directory) onto ``target`` only if nothing is there.

    The check and the rename are one step, so of two writers racing for one
    target exactly one succeeds: ``renameat2(RENAME_NOREPLACE)`` where the
    system has it; else a hard link (files) or ``mkdir`` (directories), which
    fail on an existing name, claims the target before the rename.

    Raises
    ------
    FileExistsError
        When ``target`` exists (a dangling symbolic link included); ``source``
        is then left where it is.
    OSError
        When renaming fails otherwise.
    """
    if _renameat2_noreplace(source, target):
        return
    if os.path.isdir(source):
        os.mkdir(target)
        try:
            # Replaces the empty directory just made, which no one else can have claimed.
            os.rename(source, target)
        except BaseException:
            os.rmdir(target)
            raise
        return
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        # No hard links on this file system: claim the name with an exclusive create.
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(source, target)
        return
    _remove_quietly(source)


class VolumeWriter:
    """A volume being written box by box under a temporary name.

    Subclasses open their storage in :meth:`_open` (after :meth:`_create_temp`),
    store boxes in :meth:`_write`, flush and close in :meth:`_finish` and drop
    handles without raising in :meth:`_discard`.

    Used as a context manager, the writer commits when the block ends normally and
    aborts when it raises.

    Attributes
    ----------
    path : str
        The target path.
    format : str
    shape : tuple of int
    dtype : numpy.dtype
        The dtype stored on disk.
    tmp_path : str or None
        The temporary file while writing (None for standard output).
    overwrite : bool
        Whether :meth:`commit` may replace an existing target; when False it
        raises :class:`OutputExistsError` instead, also for a target that
        appeared while writing.
    """

    format: str = ""
    overwrite: bool = True

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = path
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.tmp_path: str | None = None
        self._state = "open"
        self._finalizer: weakref.finalize | None = None
        try:
            self._open()
        except OSError as exc:
            self.abort()
            raise _write_failure(self._label(), exc) from exc
        except BaseException:
            self.abort()
            raise

    # -- public protocol -------------------------------------------------

    def write(self, box: Box | None, array: np.ndarray) -> None:
        """Store ``array`` at ``box`` (None: the whole volume), cast to :attr:`dtype`.

        Raises
        ------
        ValueError
            When the box does not fit the shape or the array does not fit the box.
        VolumeError
            When the write fails (the temporary file is then removed).
        """
        self._check_open()
        box = normalize_box(box, self.shape)
        array = np.asarray(array)
        if array.shape != box_shape(box):
            raise ValueError(
                f"`array` has shape {array.shape} but the box {box} selects {box_shape(box)}"
            )
        try:
            self._write(box, array)
        except OSError as exc:
            self.abort()
            raise _write_failure(self._label(), exc) from exc

    def commit(self) -> None:
        """Finish the file and rename it onto the target atomically.

        Raises
        ------
        OutputExistsError
            When :attr:`overwrite` is False and the target exists (the
            temporary file is then removed, the target left as it is).
        VolumeError
            When finishing or renaming fails (the temporary file is then removed).
        """
        self._check_open()
        try:
            self._finish()
            if self.tmp_path is not None:
                self._place(self.tmp_path)
        except FileExistsError:
            self.abort()
            raise OutputExistsError(
                f"cannot write {self._label()}: it exists (made while this run was writing); "
                "it was left as it is and this run's output removed"
            ) from None
        except OSError as exc:
            self.abort()
            raise _write_failure(self._label(), exc) from exc
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        if self._finalizer is not None:
            self._finalizer.detach()

    def abort(self) -> None:
        """Drop everything written so far; the target is left untouched."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._discard()
        if self.tmp_path is not None:
            _remove_quietly(self.tmp_path)
        if self._finalizer is not None:
            self._finalizer.detach()

    @property
    def closed(self) -> bool:
        """True once committed or aborted."""
        return self._state != "open"

    def __enter__(self) -> VolumeWriter:
        return self

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.closed:
            self.commit()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.path!r} format={self.format} "
            f"shape={self.shape} dtype={self.dtype} state={self._state}>"
        )

    # -- helpers for subclasses ------------------------------------------

    def _place(self, finished: str) -> None:
        """Rename the finished temporary file or directory onto the target.

        Without :attr:`overwrite`, checking that the target is free and renaming
        are one atomic step, so a writer that started later cannot replace it.
        """
        if self.overwrite:
            os.replace(finished, self.path)
        else:
            rename_noreplace(finished, self.path)

    def _create_temp(self) -> int:
        """Create the temporary file beside the target; return its descriptor."""
        target = os.path.abspath(self.path)
        directory = os.path.dirname(target)
        if not os.path.isdir(directory):
            raise VolumeError(f"cannot write {self.path}: directory {directory} does not exist")
        if os.path.isdir(target):
            raise VolumeError(f"cannot write {self.path}: it is a directory")
        remove_dead_temps(target)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        while True:
            candidate = temp_path(target)
            try:
                fd = os.open(candidate, flags, 0o666)
            except FileExistsError:
                continue
            except PermissionError:
                raise VolumeError(
                    f"cannot write {self.path}: directory {directory} is not writable"
                ) from None
            except OSError as exc:
                raise VolumeError(
                    f"cannot write {self.path}: cannot create a file in directory {directory}: "
                    f"{exc.strerror or exc}"
                ) from None
            self.tmp_path = candidate
            # Leave nothing behind if the writer is dropped without commit or abort.
            self._finalizer = weakref.finalize(self, _remove_quietly, candidate)
            return fd

    def _check_open(self) -> None:
        if self._state != "open":
            raise VolumeError(f"{self._label()}: the writer is already {self._state}")

    def _label(self) -> str:
        """How messages name the target."""
        return self.path

    def _open(self) -> None:
        raise NotImplementedError

    def _write(self, box: Box, array: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _discard(self) -> None:
        raise NotImplementedError


# -- positional I/O of a raw C-order array at a byte offset -----------------


def _runs(shape: tuple[int, ...], box: Box) -> tuple[int, np.ndarray]:
    """Split a box of a C-order array into contiguous runs.

    Returns the run length and the element offset of every run, in the box's
    C order. A run spans the last axis the box does not cover fully, together with
    all (fully covered) axes after it.
    """
    ndim = len(shape)
    partial = [a for a in range(ndim) if box[a].stop - box[a].start != shape[a]]
    split = partial[-1] if partial else 0
    strides = [int(np.prod(shape[a + 1 :], dtype=np.int64)) for a in range(ndim)]
    if ndim == 0:
        return 1, np.zeros(1, dtype=np.int64)
    run_length = (box[split].stop - box[split].start) * strides[split]
    offsets = np.array(box[split].start * strides[split], dtype=np.int64)
    for axis in range(split - 1, -1, -1):
        steps = np.arange(box[axis].start, box[axis].stop, dtype=np.int64) * strides[axis]
        offsets = steps.reshape((-1,) + (1,) * offsets.ndim) + offsets
    return run_length, offsets.reshape(-1)


def _pread_into(fd: int, buffer: np.ndarray, offset: int) -> None:
    """Fill a contiguous array from the file at ``offset``, with no intermediate copy."""
    view = memoryview(buffer.reshape(-1).view(np.uint8))
    while len(view):
        if hasattr(os, "preadv"):
            count = os.preadv(fd, [view], offset)
        else:
            data = os.pread(fd, len(view), offset)
            count = len(data)
            view[:count] = data
        if count == 0:
            raise EOFError(f"file ends before byte {offset + len(view)}")
        view = view[count:]
        offset += count


def import_optional(module: str, volumes: str, hint: str) -> ModuleType:
    """The optional package ``module`` that ``volumes`` volumes need.

    Raises
    ------
    VolumeError
        When it is not installed; the message gives ``hint``, how to install it.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise VolumeError(
            f"{volumes} volumes need the {module} package, which is not installed: {hint}"
        ) from None


def fsync_and_close(fd: int) -> None:
    """Flush ``fd`` to disk and close it (closed even when the flush fails)."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def close_quietly(fd: int | None) -> None:
    """Close ``fd`` if there is one, ignoring errors: for writers that are given up."""
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass


def fsync_path(path: str) -> None:
    """Flush a closed file's data to disk, so a crash after a rename cannot expose it empty."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` with ``os.pwrite``, retrying short writes."""
    data = memoryview(data)
    while len(data):
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def read_raw_box(
    fd: int, offset: int, shape: tuple[int, ...], dtype: np.dtype, box: Box
) -> np.ndarray:
    """Read a box of the C-order array of ``shape`` and ``dtype`` stored at ``offset``.

    Reads only the byte runs the box covers (or, when the gaps between them are
    small, the span from its first to its last byte). The result has the file's
    dtype, byte order included.

    Raises
    ------
    EOFError
        When the file is shorter than the box needs.
    OSError
        When reading fails.
    """
    out = np.empty(box_shape(box), dtype=dtype)
    if out.size == 0:
        return out
    run_length, offsets = _runs(shape, box)
    itemsize = dtype.itemsize
    span = int(offsets[-1] - offsets[0]) + run_length
    if len(offsets) > 1 and (span - out.size) * itemsize <= COALESCE_SLACK_BYTES:
        # Many short runs close together: one read of the span, then pick the box out.
        flat = np.empty(span, dtype=dtype)
        _pread_into(fd, flat, offset + int(offsets[0]) * itemsize)
        strides = [itemsize * int(np.prod(shape[a + 1 :])) for a in range(len(shape))]
        out[...] = np.lib.stride_tricks.as_strided(flat, out.shape, strides, writeable=False)
        return out
    for row, start in zip(out.reshape(-1, run_length), offsets.tolist(), strict=True):
        _pread_into(fd, row, offset + start * itemsize)
    return out


def write_raw_box(
    fd: int, offset: int, shape: tuple[int, ...], dtype: np.dtype, box: Box, array: np.ndarray
) -> None:
    """Write ``array`` at a box of the C-order array stored at ``offset`` (with ``os.pwrite``).

    ``array`` is cast to ``dtype`` (the file's, byte order included) first.

    Raises
    ------
    OSError
        When writing fails (for instance ``ENOSPC``).
    """
    data = np.ascontiguousarray(array, dtype=dtype)
    if data.size == 0:
        return
    run_length, offsets = _runs(shape, box)
    rows = data.reshape(-1, run_length)
    itemsize = dtype.itemsize
    for row, start in zip(rows, offsets.tolist(), strict=True):
        pwrite_all(fd, memoryview(row.view(np.uint8)), offset + start * itemsize)
