"""Read one weight array from a ``.npy``, ``.npz`` or HDF5 file, sizes checked first.

Every size a file declares is checked before anything is allocated: a
``.npy`` header's shape against the file's size (Python integers, so no
product wraps), a ``.npz`` member's declared size against what it stores, an
HDF5 dataset's shape against its storage; the caller's own shape check runs on
the header too. Nothing is unpickled, and HDF5 data outside the file is refused
(see :mod:`conv3dt.hdf5_guard`).
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import h5py
import numpy as np
from numpy.lib import format as npformat

from conv3dt.hdf5_guard import Hdf5Guard, dataset_names

__all__ = ["ZIP_MAX_RATIO", "ZIP_RATIO_FLOOR", "check_zip_member", "read_weight_array"]

# Deflate shrinks weights and configs a few times at most; a large member that
# declares more than this many times its stored size is a decompression bomb.
ZIP_MAX_RATIO = 100
ZIP_RATIO_FLOOR = 64 << 20

ShapeCheck = Callable[[tuple[int, ...]], None]


def check_zip_member(
    info: zipfile.ZipInfo, where: str, error: type[ValueError], limit: int | None = None
) -> None:
    """Refuse a zip member from its declared sizes, before any of it is inflated.

    ``zipfile`` never returns more than the declared uncompressed size, so
    checking that size bounds what reading the member can cost.

    Parameters
    ----------
    info : zipfile.ZipInfo
        The member.
    where : str
        How messages name the archive.
    error : type of ValueError
        The exception to raise.
    limit : int, optional
        Most bytes the member may declare.
    """
    declared = info.file_size
    if limit is not None and declared > limit:
        raise error(f"{where}: {info.filename} is {declared} bytes; refused as too large.")
    if declared > ZIP_RATIO_FLOOR and declared > ZIP_MAX_RATIO * max(info.compress_size, 1):
        raise error(
            f"{where}: {info.filename} declares {declared} bytes inflated from "
            f"{info.compress_size} stored (a decompression bomb); refused."
        )


def _npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Parse a ``.npy`` header (a Python literal, never a pickle); leave the stream after it."""
    version = npformat.read_magic(stream)
    if version == (1, 0):
        return npformat.read_array_header_1_0(stream)
    if version in ((2, 0), (3, 0)):
        return npformat.read_array_header_2_0(stream)
    raise ValueError(f"unsupported .npy format version {version}")


def _read_npy(stream: IO[bytes], available: int, check: ShapeCheck | None) -> np.ndarray:
    """The array of a ``.npy`` stream holding at most ``available`` bytes, header included."""
    try:
        shape, fortran, dtype = _npy_header(stream)
    except Exception as exc:  # numpy's header parser raises several types on garbage
        raise ValueError(f"not a valid .npy array: {exc}") from None
    if dtype.hasobject:
        raise ValueError("the array holds Python objects, which conv3dt never unpickles")
    if check is not None:
        check(tuple(shape))
    count = math.prod(shape)
    needed = stream.tell() + count * dtype.itemsize
    if needed > available:
        raise ValueError(
            f"the header's shape {tuple(shape)} needs {needed} bytes, the file holds "
            f"{available} (truncated or corrupt)"
        )
    array = np.empty(count, dtype=dtype)
    view = memoryview(array.view(np.uint8))
    while len(view):
        got = stream.readinto(view)
        if not got:
            raise ValueError("the data ends early (truncated)")
        view = view[got:]
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def read_weight_array(
    path: Path,
    inner: str | None,
    label: str,
    error: type[ValueError],
    check: ShapeCheck | None = None,
) -> np.ndarray:
    """Read the array of a ``.npy``, a ``.npz`` member or an HDF5 dataset.

    Parameters
    ----------
    path : pathlib.Path
        The file; its suffix tells the format.
    inner : str or None
        The ``.npz`` member or HDF5 dataset; None when the file holds one array.
    label : str
        How messages begin (the spec and its field, say).
    error : type of ValueError
        The exception raised for anything invalid.
    check : callable, optional
        Called with the array's shape before its data is read; raises to refuse.

    Raises
    ------
    ValueError
        (``error``, or what ``check`` raises) naming the file and what is wrong.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            with open(path, "rb") as stream:
                return _read_npy(stream, path.stat().st_size, check)
        if suffix == ".npz":
            return _read_npz(path, inner, label, error, check)
        if suffix in (".h5", ".hdf5"):
            return _read_hdf5(path, inner, label, error, check)
    except error:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise error(f"{label}: cannot read {path}: {exc}") from None
    raise error(f"{label}: unsupported weight file {path}; expected .npy, .npz or .h5")


def _read_npz(
    path: Path, inner: str | None, label: str, error: type[ValueError], check: ShapeCheck | None
) -> np.ndarray:
    with zipfile.ZipFile(path) as archive:
        members = {n[: -len(".npy")]: n for n in archive.namelist() if n.endswith(".npy")}
        names = list(members)
        if inner is None:
            if len(names) != 1:
                raise error(f"{label}: {path} holds {names}; name one as {path.name}:NAME")
            inner = names[0]
        if inner not in members:
            raise error(f"{label}: {path} has no array {inner!r}; it holds {names}")
        info = archive.getinfo(members[inner])
        check_zip_member(info, f"{label}: {path}", error)
        with archive.open(info) as stream:
            try:
                return _read_npy(stream, info.file_size, check)
            except error:
                raise
            except ValueError as exc:
                raise error(f"{label}: cannot read {path}:{inner}: {exc}") from None


def _read_hdf5(
    path: Path, inner: str | None, label: str, error: type[ValueError], check: ShapeCheck | None
) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        datasets = dataset_names(handle)
        if inner is None:
            if len(datasets) != 1:
                raise error(
                    f"{label}: {path} holds datasets {datasets}; name one as {path.name}:/DATASET"
                )
            inner = datasets[0]
        guard = Hdf5Guard(handle, f"{label}: {path}", error)
        node = guard.node(inner)
        if not isinstance(node, h5py.Dataset):
            raise error(f"{label}: {path} has no dataset {inner!r}; it holds {datasets}")
        guard.check_dataset(node, inner)
        if check is not None:
            check(tuple(node.shape))
        guard.check_expansion(node, inner)
        return node[()]
