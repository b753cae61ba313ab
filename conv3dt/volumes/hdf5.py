"""HDF5 volumes: one dataset of a file, read and written by dataset slicing.

A path may name the dataset: ``scan.h5:/group/volume``. Without one, a reader
takes the file's only dataset and a writer creates ``/data``. A 4x4 ``affine``
dataset attribute, when present, is the voxel-to-world matrix; writers store
the affine they are given there.
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
    fsync_path,
)

__all__ = ["AFFINE_ATTR", "DEFAULT_DATASET", "Hdf5Reader", "Hdf5Writer", "split_hdf5_path"]

AFFINE_ATTR = "affine"
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
            voxel_size=None if affine is None else voxel_sizes(affine),
            attrs=attrs,
            dataset=self._dataset.name,
        )

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
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"`compression` must be one of {COMPRESSIONS}. Received compression={compression!r}"
            )
        file_path, dataset = split_hdf5_path(path)
        self.dataset_name = dataset or DEFAULT_DATASET
        self._attrs: dict[str, Any] = dict(template_attrs or {})
        if affine is not None:
            self._attrs[AFFINE_ATTR] = np.asarray(affine, dtype=np.float64)
        self._attrs.update(attrs or {})
        self._chunks = chunks
        self._compression = compression
        self._file: h5py.File | None = None
        self._dataset: h5py.Dataset | None = None
        super().__init__(file_path, shape, dtype)

    def _open(self) -> None:
        os.close(self._create_temp())
        self._file = h5py.File(self.tmp_path, "w")
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

    def _finish(self) -> None:
        file, self._file = self._file, None
        self._dataset = None
        file.close()
        fsync_path(self.tmp_path)

    def _discard(self) -> None:
        file, self._file = self._file, None
        self._dataset = None
        if file is not None:
            try:
                file.close()
            except (OSError, RuntimeError, ValueError):
                pass
