"""HDF5 volumes: one dataset of a file, read and written by dataset slicing.

A path may name the dataset: ``scan.h5:/group/volume``. Without one, a reader
takes the file's only dataset and a writer creates ``/data``. A 4x4 ``affine``
dataset attribute, when present, is the voxel-to-world matrix; writers store
the affine they are given there. Without an affine, the voxel size is read
from ``element_size_um`` (ImageJ, ilastik), ``resolution`` or ``spacing``
(three numbers, stored axis order); writers divide those by the stride.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import h5py
import numpy as np

from conv3dt.hdf5_guard import Hdf5Guard, dataset_names
from conv3dt.volumes.affine import voxel_sizes
from conv3dt.volumes.base import (
    Box,
    VolumeError,
    VolumeMetadata,
    VolumeReader,
    VolumeWriter,
    box_shape,
)

__all__ = [
    "AFFINE_ATTR",
    "DEFAULT_DATASET",
    "VOXEL_SIZE_ATTRS",
    "Hdf5Reader",
    "Hdf5Writer",
    "scale_voxel_attrs",
    "split_hdf5_path",
    "voxel_size_from_attrs",
]

AFFINE_ATTR = "affine"
# Dataset attributes that hold the voxel size as one number per axis: ImageJ's
# and ilastik's ``element_size_um``, and the common ``resolution`` / ``spacing``.
VOXEL_SIZE_ATTRS = ("element_size_um", "resolution", "spacing")
DEFAULT_DATASET = "/data"
COMPRESSIONS = (None, "gzip", "lzf")

_DATASET_SUFFIX = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5))(?::(?P<dataset>.*))?$", re.IGNORECASE)


def split_hdf5_path(path: str) -> tuple[str, str | None]:
    """Split ``"file.h5:/group/ds"`` into the file path and the dataset path.

    Parameters
    ----------
    path : str
        A file path, optionally followed by ``:`` and a dataset path.

    Returns
    -------
    tuple
        The file path and the dataset path (with a leading ``/``), or None when
        the path names no dataset.
    """
    match = _DATASET_SUFFIX.match(path)
    if match:
        file_path, dataset = match["file"], match["dataset"]
    elif ":" in path and not os.path.exists(path) and len(path.rpartition(":")[0]) > 1:
        # Any other file name with an explicit format; a one-letter part is a drive.
        file_path, _, dataset = path.rpartition(":")
    else:
        file_path, dataset = path, None
    if not dataset:
        return file_path, None
    return file_path, "/" + dataset.lstrip("/")


def _plain_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """The attributes that mean something outside this file (object references do not)."""
    result: dict[str, Any] = {}
    for name in attrs:
        try:
            value = attrs[name]
        except (OSError, TypeError, ValueError):
            continue  # a type h5py cannot convert; nothing to carry over
        dtype = getattr(value, "dtype", None)
        if isinstance(value, h5py.Reference) or (
            dtype is not None and h5py.check_dtype(ref=dtype) is not None
        ):
            continue
        result[name] = value
    return result


def _voxel_vector(value: Any) -> np.ndarray | None:
    """``value`` as 3 positive finite floats, or None when it is anything else."""
    try:
        vector = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if vector.shape != (3,) or not np.all(np.isfinite(vector)) or np.any(vector <= 0):
        return None
    return vector


def voxel_size_from_attrs(attrs: dict[str, Any]) -> tuple[float, float, float] | None:
    """The voxel size (stored axis order) a dataset's attributes give, without an affine.

    The first of :data:`VOXEL_SIZE_ATTRS` that holds three positive numbers
    (ImageJ / ilastik write ``element_size_um`` in the dataset's axis order).
    """
    for name in VOXEL_SIZE_ATTRS:
        vector = _voxel_vector(attrs.get(name))
        if vector is not None:
            return tuple(float(v) for v in vector)  # type: ignore[return-value]
    return None


def scale_voxel_attrs(attrs: dict[str, Any], strides: tuple[float, ...]) -> dict[str, Any]:
    """``attrs`` with every voxel-size 3-vector divided by ``strides`` (stored axis order).

    Other attributes, and voxel-size attributes that are not three positive
    numbers (their meaning is unknown), are returned unchanged.
    """
    result = dict(attrs)
    for name in VOXEL_SIZE_ATTRS:
        if name not in attrs:
            continue
        vector = _voxel_vector(attrs[name])
        if vector is not None:
            stored = np.asarray(attrs[name])
            dtype = stored.dtype if stored.dtype.kind == "f" else np.float64
            result[name] = (vector / np.asarray(strides, dtype=np.float64)).astype(dtype)
    return result


def _affine_from_attrs(attrs: dict[str, Any]) -> np.ndarray | None:
    value = attrs.get(AFFINE_ATTR)
    if value is None:
        return None
    try:
        affine = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return affine if affine.shape == (4, 4) else None


class Hdf5Reader(VolumeReader):
    """Read boxes of one HDF5 dataset.

    Attributes
    ----------
    file_path : str
        The HDF5 file.
    datasets : list of str
        Every dataset in the file.
    chunks : tuple of int or None
        The dataset's chunk shape (None when stored contiguously), for
        callers that align their reads to it.
    """

    format = "hdf5"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.file_path, dataset = split_hdf5_path(path)
        try:
            self._file = h5py.File(self.file_path, "r")
        except FileNotFoundError:
            raise VolumeError(f"cannot open {self.file_path}: no such file") from None
        except OSError as exc:
            raise VolumeError(f"{self.file_path}: not a readable HDF5 file: {exc}") from None
        try:
            self._select(dataset)
        except BaseException:
            self._file.close()
            raise

    def _select(self, dataset: str | None) -> None:
        self.datasets = dataset_names(self._file)
        listing = ", ".join(self.datasets) or "(none)"
        if dataset is None:
            if len(self.datasets) != 1:
                raise VolumeError(
                    f"{self.file_path}: the file holds {len(self.datasets)} datasets, "
                    f"choose one as {self.file_path}:/path/to/dataset; datasets: {listing}"
                )
            dataset = self.datasets[0]
        # Only data stored in this file is read: links to other files, external
        # raw storage and virtual datasets are refused.
        guard = Hdf5Guard(self._file, self.file_path, VolumeError)
        node = guard.node(dataset)
        if not isinstance(node, h5py.Dataset):
            raise VolumeError(
                f"{self.file_path}: no dataset {dataset} in the file; datasets: {listing}"
            )
        guard.check_dataset(node, dataset)
        self._dataset = node
        stored = self._dataset.dtype
        if stored.kind not in "biuf" or stored.fields is not None:
            raise VolumeError(
                f"{self.file_path}:{dataset}: unsupported dtype {stored}; expected numbers"
            )
        self.shape = tuple(self._dataset.shape)
        self.chunks = self._dataset.chunks
        self.dtype = stored.newbyteorder("=")
        attrs = _plain_attrs(self._dataset.attrs)
        affine = _affine_from_attrs(attrs)
        self.metadata = VolumeMetadata(
            affine=affine,
            voxel_size=voxel_size_from_attrs(attrs) if affine is None else voxel_sizes(affine),
            attrs=attrs,
            dataset=self._dataset.name,
        )

    @property
    def chunk_itemsize(self) -> int:
        """Bytes per stored value when reads decode whole chunks (filtered, e.g. gzip), else 0.

        HDF5 reads parts of unfiltered chunks straight from the file, but must
        decode a compressed chunk whole for any part of it.
        """
        if self.chunks is None or self._dataset.id.get_create_plist().get_nfilters() == 0:
            return 0
        return self._dataset.dtype.itemsize

    @property
    def chunk_cache_bytes(self) -> int:
        """Bytes of decoded chunks HDF5 keeps for the next reads (1 MiB unless set)."""
        return int(self._dataset.id.get_access_plist().get_chunk_cache()[1])

    @chunk_cache_bytes.setter
    def chunk_cache_bytes(self, value: int) -> None:
        chunk_bytes = int(np.prod(self.chunks or (1,))) * self._dataset.dtype.itemsize
        access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        # HDF5's advice: about 100 hash slots per chunk the cache can hold. With
        # w0 = 1 chunks read whole go first, those a tile read in part stay.
        slots = 100 * (int(value) // max(1, chunk_bytes) + 1)
        access.set_chunk_cache(slots, int(value), 1.0)
        name = self._dataset.name.encode()
        # The open handles of a dataset share the cache of the first: close it first.
        self._dataset.id.close()
        self._dataset = h5py.Dataset(h5py.h5d.open(self._file.id, name, dapl=access))

    def _read(self, box: Box) -> np.ndarray:
        shape = box_shape(box)
        if 0 in shape:
            return np.empty(shape, dtype=self.dtype)
        try:
            return self._dataset[box]
        except (OSError, RuntimeError) as exc:
            raise VolumeError(f"{self.path}: cannot read box {box}: {exc}") from None

    def _close(self) -> None:
        self._file.close()


def _set_attr(attributes: h5py.AttributeManager, name: str, value: object) -> None:
    try:
        attributes[name] = value
        return
    except (TypeError, ValueError):
        pass
    # Nested structures (a layer config, say) are kept as JSON text.
    try:
        attributes[name] = json.dumps(value)
    except TypeError:
        raise ValueError(
            f"`attrs` value for {name!r} cannot be stored in HDF5. Received {value!r}"
        ) from None


class Hdf5Writer(VolumeWriter):
    """Write one chunked HDF5 dataset box by box; the file is created anew.

    Attributes are the template's, then ``affine`` (when given), then ``attrs``.
    With ``strides`` (output voxels per input voxel along the three spatial
    axes), the template's voxel-size 3-vectors (:data:`VOXEL_SIZE_ATTRS`) are
    divided by them.

    Attributes
    ----------
    dataset_name : str
        The dataset path inside the file.
    """

    format = "hdf5"

    def __init__(
        self,
        path: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        *,
        template_attrs: dict[str, Any] | None = None,
        affine: np.ndarray | None = None,
        attrs: dict[str, Any] | None = None,
        chunks: tuple[int, ...] | None = None,
        compression: str | None = None,
        strides: tuple[float, ...] | None = None,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"`compression` must be one of {COMPRESSIONS}. Received compression={compression!r}"
            )
        file_path, dataset = split_hdf5_path(path)
        self.dataset_name = dataset or DEFAULT_DATASET
        self._attrs: dict[str, Any] = dict(template_attrs or {})
        if strides is not None:
            self._attrs = scale_voxel_attrs(self._attrs, strides)
        if affine is not None:
            self._attrs[AFFINE_ATTR] = np.asarray(affine, dtype=np.float64)
        self._attrs.update(attrs or {})
        self._chunks = chunks
        self._compression = compression
        self._file: h5py.File | None = None
        self._dataset: h5py.Dataset | None = None
        self._sink: _FailSafeFile | None = None
        super().__init__(file_path, shape, dtype)

    def _open(self) -> None:
        # The HDF5 library goes through a file object of ours rather than its
        # own descriptor: HDF5 cannot recover from a failed write (disk full,
        # file size limit) and crashes when it closes the file later, at the
        # latest at interpreter exit.
        self._sink = _FailSafeFile(self._create_temp())
        self._file = h5py.File(self._sink, "w")
        chunked = bool(self.shape) and 0 not in self.shape
        try:
            self._dataset = self._file.create_dataset(
                self.dataset_name,
                shape=self.shape,
                dtype=self.dtype,
                chunks=(self._chunks or True) if chunked else None,
                compression=self._compression if chunked else None,
            )
        except (TypeError, ValueError) as exc:
            if self._chunks is None:
                raise
            raise ValueError(
                f"`chunks` must be a tuple of {len(self.shape)} positive ints no larger "
                f"than the shape {self.shape}. Received chunks={self._chunks!r} ({exc})"
            ) from None
        for name, value in self._attrs.items():
            _set_attr(self._dataset.attrs, name, value)

    def _write(self, box: Box, array: np.ndarray) -> None:
        if array.size:
            self._dataset[box] = np.asarray(array, dtype=self.dtype)
        self._sink.check()

    def _finish(self) -> None:
        file, self._file = self._file, None
        self._dataset = None
        file.close()
        self._sink.check()
        self._sink.close(sync=True)

    def _discard(self) -> None:
        file, self._file = self._file, None
        self._dataset = None
        if file is not None:
            try:
                file.close()
            except (OSError, RuntimeError, ValueError):
                pass
        if self._sink is not None:
            self._sink.close(sync=False)


class _FailSafeFile:
    """The temporary file as HDF5 sees it: after the first failed write, a scratchpad.

    Writes go to the file with ``os.pwrite`` until one fails; from then on the
    error is kept for :meth:`check` and writes land in memory (reads see them),
    so the library's own bookkeeping never meets an error and it can close the
    file. The writer then reports the error and removes the file. What lands in
    memory is what HDF5 still had to flush: its caches and the rest of the box
    being written, since the writer stops at the first failure.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._position = 0
        self._size = 0
        self._error: OSError | None = None
        self._overlay: list[tuple[int, bytes]] = []

    def check(self) -> None:
        """Raise the first write error, if any."""
        if self._error is not None:
            raise self._error

    def close(self, sync: bool) -> None:
        """Close the descriptor, first flushing the data to disk with ``sync``."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    # -- what h5py's file-object driver calls ------------------------------

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._position = offset
        elif whence == os.SEEK_CUR:
            self._position += offset
        else:
            self._position = self._size + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        size = max(0, self._size - self._position) if size is None or size < 0 else size
        buffer = bytearray(size)
        return bytes(buffer[: self.readinto(buffer)])

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        start = self._position
        count = 0
        while count < len(view):
            data = os.pread(self._fd, len(view) - count, start + count)
            if not data:
                break
            view[count : count + len(data)] = data
            count += len(data)
        end = start + len(view)
        for offset, data in self._overlay:
            low, high = max(offset, start), min(offset + len(data), end)
            if low < high:
                view[low - start : high - start] = data[low - offset : high - offset]
                count = max(count, high - start)
        self._position += count
        return count

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._error is None:
            try:
                written = 0
                while written < len(view):
                    written += os.pwrite(self._fd, view[written:], self._position + written)
            except OSError as exc:
                self._error = exc
        if self._error is not None:
            self._overlay.append((self._position, bytes(view)))
        self._position += len(view)
        self._size = max(self._size, self._position)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        if self._error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:
                self._error = exc
        self._size = size
        return size

    def flush(self) -> None:
        """Nothing to do: every write went straight to the descriptor."""
