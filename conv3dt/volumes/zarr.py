"""Zarr volumes: one array in a directory store, read and written by box.

Needs the optional ``zarr`` package (``pip install 'conv3dt[dask]'``); zarr
2.16 and newer work, 3.x included (new arrays get the installed package's
default format: Zarr v2 with zarr 2, v3 with zarr 3). A path ending in
``.zarr`` names an array; an array inside a group is opened by its directory
(``scans.zarr/ct``) with the format given explicitly.

Chunks are separate files, so several processes may write one array at once
as long as no two write into the same chunk: the cluster runner gives each
tile its own chunks. Attributes are JSON: the template's, ``affine`` (the 4x4
voxel-to-world matrix as nested lists) and provenance. As with the other
formats, an array is written under a temporary name beside the target and
renamed onto it when complete.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import secrets
import shutil
import weakref
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from conv3dt.volumes.affine import voxel_sizes
from conv3dt.volumes.base import (
    Box,
    VolumeError,
    VolumeMetadata,
    VolumeReader,
    VolumeWriter,
    import_optional,
    remove_dead_temps,
    temp_path,
)

__all__ = [
    "AFFINE_ATTR",
    "INSTALL_HINT",
    "ZarrReader",
    "ZarrWriter",
    "create_zarr_array",
    "default_chunks",
    "fsync_box",
    "fsync_tree",
    "import_zarr",
    "is_zarr_store",
    "open_zarr_array",
    "read_array_box",
    "replace_directory",
    "zarr_attrs",
]

AFFINE_ATTR = "affine"
INSTALL_HINT = "pip install 'conv3dt[dask]' (or pip install zarr)"
# Chunks of up to 64 voxels a side: small enough for boxes to touch few bytes
# they do not need, large enough to keep the number of files reasonable.
_DEFAULT_CHUNK = 64


def read_array_box(array: Any, path: str, box: Box, dtype: np.dtype) -> np.ndarray:
    """``array[box]`` of an open Zarr array, as NumPy; read errors name ``path``."""
    shape = tuple(s.stop - s.start for s in box)
    if 0 in shape:
        return np.empty(shape, dtype=dtype)
    try:
        return np.asarray(array[box])
    except (OSError, ValueError, RuntimeError) as exc:
        raise VolumeError(f"{path}: cannot read box {box}: {exc}") from None


def import_zarr() -> ModuleType:
    """The ``zarr`` package.

    Raises
    ------
    VolumeError
        When it is not installed; the message says how to install it.
    """
    return import_optional("zarr", "Zarr", INSTALL_HINT)


def default_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of at most 64 along every axis (at least 1)."""
    return tuple(max(1, min(int(n), _DEFAULT_CHUNK)) for n in shape)


def _json_value(value: Any) -> Any:
    """``value`` as JSON-ready data, or raise TypeError."""
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    json.dumps(value)
    return value


def zarr_attrs(
    template_attrs: dict[str, Any] | None = None,
    affine: np.ndarray | None = None,
    attrs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The attributes a written array gets: the template's, ``affine``, then ``attrs``.

    Template values that JSON cannot hold are left out (they describe the input
    file's storage, not the data); an ``attrs`` value JSON cannot hold is an error.

    Raises
    ------
    ValueError
        When a value of ``attrs`` cannot be stored as JSON.
    """
    result: dict[str, Any] = {}
    for name, value in (template_attrs or {}).items():
        try:
            result[str(name)] = _json_value(value)
        except (TypeError, ValueError):
            continue
    if affine is not None:
        result[AFFINE_ATTR] = np.asarray(affine, dtype=np.float64).tolist()
    for name, value in (attrs or {}).items():
        try:
            result[str(name)] = _json_value(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"`attrs` value for {name!r} cannot be stored as Zarr (JSON) attributes. "
                f"Received {value!r}"
            ) from None
    return result


def create_zarr_array(
    path: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    *,
    chunks: tuple[int, ...] | None = None,
    attrs: dict[str, Any] | None = None,
) -> Any:
    """Create (or replace) a Zarr array in the directory ``path``.

    Parameters
    ----------
    path : str
        The array's directory.
    shape : tuple of int
    dtype : numpy.dtype
    chunks : tuple of int, optional
        Chunk shape (default :func:`default_chunks`).
    attrs : dict, optional
        JSON attributes (see :func:`zarr_attrs`).

    Returns
    -------
    zarr.Array

    Raises
    ------
    ValueError
        For chunks that do not fit the shape.
    VolumeError
        When zarr is not installed.
    """
    zarr = import_zarr()
    chunks = default_chunks(shape) if chunks is None else tuple(int(c) for c in chunks)
    if len(chunks) != len(shape) or any(c < 1 for c in chunks):
        raise ValueError(
            f"`chunks` must be {len(shape)} positive ints for shape {shape}. "
            f"Received chunks={chunks!r}"
        )
    array = zarr.create(
        shape=tuple(int(n) for n in shape),
        chunks=chunks,
        dtype=np.dtype(dtype),
        store=path,
        overwrite=True,
    )
    if attrs:
        array.attrs.update(attrs)
    return array


def open_zarr_array(path: str, mode: str = "r") -> Any:
    """Open the Zarr array in the directory ``path`` (``mode`` ``"r"`` or ``"r+"``).

    Raises
    ------
    VolumeError
        When zarr is not installed, nothing is there, or ``path`` holds a group
        (the message lists its arrays).
    """
    zarr = import_zarr()
    if not os.path.isdir(path):
        raise VolumeError(f"cannot open {path}: no such Zarr array")
    try:
        return zarr.open_array(path, mode=mode)
    except Exception as exc:  # zarr's error types differ between its major versions
        reason = exc
    try:
        group = zarr.open_group(path, mode="r")
        names = sorted(group.array_keys())
        attrs = dict(group.attrs)
    except Exception:  # not a group either: report the array error
        raise VolumeError(f"{path}: not a readable Zarr array: {reason}") from None
    ome = attrs.get("ome")
    if "multiscales" in attrs or (isinstance(ome, dict) and "multiscales" in ome):
        raise VolumeError(
            f"{path} is an OME-Zarr image, not a plain Zarr array; read it with "
            "--input-format ome-zarr (or name it .ome.zarr)"
        )
    listing = ", ".join(names) or "(none)"
    raise VolumeError(
        f"{path} is a Zarr group, not an array; open one of its arrays as {path}/NAME "
        f"with --input-format zarr; arrays: {listing}"
    )


def _chunk_key(array: Any, coords: tuple[int, ...]) -> str:
    metadata = getattr(array, "metadata", None)
    encode = getattr(metadata, "encode_chunk_key", None)
    if encode is not None:
        return encode(coords)
    return array._chunk_key(coords)  # zarr 2


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_box(array: Any, root: str, box: Box) -> None:
    """Flush to disk the chunk files (and their directories) a written box touched.

    ``root`` is the array's directory. Chunks that hold only the fill value may
    not exist as files; they are skipped.
    """
    chunks = tuple(array.chunks)
    ranges = [range(s.start // c, math.ceil(s.stop / c)) for s, c in zip(box, chunks, strict=True)]
    directories: set[str] = set()
    for coords in itertools.product(*ranges):
        path = os.path.join(root, *_chunk_key(array, tuple(coords)).split("/"))
        _fsync(path)
        directories.add(os.path.dirname(path))
    for directory in directories:
        _fsync(directory)


def _walk(root: str) -> Iterator[str]:
    for directory, _, files in os.walk(root):
        for name in files:
            yield os.path.join(directory, name)
        yield directory


def fsync_tree(root: str) -> None:
    """Flush every file and directory under ``root`` to disk."""
    for path in _walk(root):
        _fsync(path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


_STORE_MARKERS = (".zarray", ".zgroup", "zarr.json")


def is_zarr_store(path: str) -> bool:
    """Whether ``path`` is a directory holding a Zarr array or group (v2 or v3 metadata)."""
    return (
        os.path.isdir(path)
        and not os.path.islink(path)
        and any(os.path.isfile(os.path.join(path, marker)) for marker in _STORE_MARKERS)
    )


def replace_directory(source: str, target: str) -> None:
    """Rename the directory ``source`` onto ``target``, replacing whatever is there.

    A directory cannot be renamed onto a non-empty one, so an existing target is
    first renamed aside and removed once ``source`` is in place.

    Raises
    ------
    VolumeError
        When ``target`` is a directory but not a Zarr store: an ordinary
        directory is never deleted to make room for an array.
    """
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    aside = None
    if os.path.isdir(target) and not is_zarr_store(target):
        raise VolumeError(
            f"cannot replace {target}: it is a directory but not a Zarr store "
            f"(no {', '.join(_STORE_MARKERS)}); remove it yourself or choose another output"
        )
    if os.path.lexists(target):
        aside = os.path.join(parent, f".{name}.conv3dt-old-{secrets.token_hex(4)}")
        os.rename(target, aside)
    try:
        os.rename(source, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
        raise
    _fsync(parent)
    if aside is not None:
        _remove(aside)


class ZarrReader(VolumeReader):
    """Read boxes of one Zarr array.

    Attributes
    ----------
    chunks : tuple of int
        The array's chunk shape (tiles that follow it read whole chunks).
    """

    format = "zarr"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._array = open_zarr_array(path.rstrip("/") or path, "r")
        stored = np.dtype(self._array.dtype)
        if stored.kind not in "biuf" or stored.fields is not None:
            raise VolumeError(f"{path}: unsupported dtype {stored}; expected numbers")
        self.shape = tuple(int(n) for n in self._array.shape)
        self.chunks = tuple(int(n) for n in self._array.chunks)
        self.dtype = stored.newbyteorder("=")
        attrs = dict(self._array.attrs)
        affine = None
        value = attrs.get(AFFINE_ATTR)
        if value is not None:
            try:
                matrix = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                matrix = None
            if matrix is not None and matrix.shape == (4, 4) and np.all(np.isfinite(matrix)):
                affine = matrix
        self.metadata = VolumeMetadata(
            affine=affine,
            voxel_size=None if affine is None else voxel_sizes(affine),
            attrs=attrs,
        )

    def _read(self, box: Box) -> np.ndarray:
        return read_array_box(self._array, self.path, box, self.dtype)

    def _close(self) -> None:
        self._array = None


class ZarrWriter(VolumeWriter):
    """Write a Zarr array box by box into a temporary directory renamed onto the target.

    An existing target (array or file) is replaced at commit; callers decide
    about overwriting.
    """

    format = "zarr"

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
    ) -> None:
        self._attrs = zarr_attrs(template_attrs, affine, attrs)
        self._chunks = chunks
        self._array: Any = None
        self._tmp_dir: str | None = None
        super().__init__(path.rstrip("/") or path, shape, dtype)

    def _open(self) -> None:
        import_zarr()
        candidate = self._claim_temp_directory()
        self._array = create_zarr_array(
            candidate, self.shape, self.dtype, chunks=self._chunks, attrs=self._attrs
        )

    def _claim_temp_directory(self) -> str:
        """Create this writer's temporary directory beside the target and return it.

        Stale temporaries of the same target whose writer is gone are removed
        first; the new one is removed if the writer is dropped unfinished.
        """
        target = os.path.abspath(self.path)
        directory = os.path.dirname(target)
        if not os.path.isdir(directory):
            raise VolumeError(f"cannot write {self.path}: directory {directory} does not exist")
        remove_dead_temps(target)
        while True:
            candidate = temp_path(target)
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            except PermissionError:
                raise VolumeError(
                    f"cannot write {self.path}: directory {directory} is not writable"
                ) from None
            break
        self._tmp_dir = candidate
        # Leave nothing behind if the writer is dropped without commit or abort.
        self._finalizer = weakref.finalize(self, shutil.rmtree, candidate, True)
        return candidate

    def _write(self, box: Box, array: np.ndarray) -> None:
        if array.size:
            try:
                self._array[box] = np.asarray(array, dtype=self.dtype)
            except BaseException:
                _settle_zarr()
                raise

    def _finish(self) -> None:
        tmp, self._tmp_dir = self._tmp_dir, None
        self._array = None
        try:
            fsync_tree(tmp)
            if self.overwrite:
                replace_directory(tmp, self.path)
            else:
                self._place(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _discard(self) -> None:
        tmp, self._tmp_dir = self._tmp_dir, None
        self._array = None
        if tmp is not None:
            _settle_zarr()
            shutil.rmtree(tmp, ignore_errors=True)


def _settle_zarr(timeout: float = 60.0) -> None:
    """Wait for the chunk writes zarr still has in flight.

    zarr 3 writes a box's chunks as concurrent tasks on its own event loop;
    when one fails (disk full, say), the error reaches the caller while the
    others go on writing. Removing the temporary directory before they end
    would let them create it again, and interpreter exit would cut them off
    mid-write with a page of asyncio errors. zarr 2 writes synchronously and
    has nothing in flight.
    """
    try:
        from zarr.core import sync
    except ImportError:
        return
    loop = sync.loop[0]
    if loop is None or not loop.is_running():
        return

    async def others_done() -> None:
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        if pending:
            await asyncio.wait(pending)

    future = asyncio.run_coroutine_threadsafe(others_done(), loop)
    try:
        future.result(timeout)
    except Exception:  # a task's own error was already reported through the caller
        future.cancel()
