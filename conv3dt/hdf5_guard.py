"""Reach HDF5 objects without leaving the file the user named.

HDF5 lets a file point elsewhere: an external link (or a soft link through one)
names an object in another file, a dataset's raw data may be stored in
external files (any file the process can read, ``/etc/passwd`` included) and a
virtual dataset maps other files' datasets, reading fill values where they are
missing. Every reader of user-supplied HDF5 (volumes, spec weight files, Keras
model files) walks paths through :class:`Hdf5Guard`, which follows hard links
(and, when allowed, soft links that resolve inside the file) and refuses the
rest, naming what the object points at.
"""

from __future__ import annotations

import math
from typing import Any

import h5py

__all__ = ["BOMB_FLOOR_BYTES", "BOMB_MAX_EXPANSION", "Hdf5Guard", "dataset_names"]

# Datasets declaring far more bytes than they store are shape bombs: weights
# compress a few times at most, and gzip cannot expand data 1000 times.
BOMB_FLOOR_BYTES = 64 << 20
BOMB_MAX_EXPANSION = 100
# HDF5's own default bound on the links one lookup may follow.
_MAX_SOFT_LINKS = 16


def dataset_names(group: h5py.Group) -> list[str]:
    """Absolute paths of the datasets reachable from ``group`` through hard links.

    ``visititems`` follows hard links only, so datasets behind soft or external
    links are not listed.
    """
    names: list[str] = []

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            names.append(f"{group.name.rstrip('/')}/{name}")

    group.visititems(visit)
    return names


class Hdf5Guard:
    """Path lookups in one open HDF5 file that never reach another file.

    Parameters
    ----------
    file : h5py.File
        The open file.
    where : str
        How messages name the file (already quoted when the caller wants quotes).
    error : type of ValueError
        The exception raised for anything refused or unreadable.
    soft_links : bool
        Follow soft links whose target resolves inside the file through hard
        links; when False every soft link is refused.
    """

    def __init__(
        self,
        file: h5py.File,
        where: str,
        error: type[ValueError] = ValueError,
        *,
        soft_links: bool = True,
    ) -> None:
        self.file = file
        self.where = where
        self.error = error
        self.soft_links = soft_links

    def node(self, path: str, parent: h5py.Group | None = None, *, _depth: int = 0) -> Any:
        """The group or dataset at ``path`` (relative to ``parent``), or None when absent.

        Raises
        ------
        ValueError
            (``error``) when the path passes through a link that leaves the file.
        """
        node = self.file if parent is None or path.startswith("/") else parent
        for part in (p for p in path.split("/") if p):
            if not isinstance(node, h5py.Group):
                return None
            node = self.child(node, part, path, _depth=_depth)
            if node is None:
                return None
        return node

    def group(self, path: str, parent: h5py.Group | None = None) -> h5py.Group | None:
        """The group at ``path`` (relative to ``parent``), or None when absent."""
        node = self.file if parent is None else parent
        for part in (p for p in path.split("/") if p):
            node = self.child(node, part, path)
            if node is None:
                return None
            if not isinstance(node, h5py.Group):
                raise self.error(f"{self.where}: {path!r} is a dataset, expected a group.")
        return node

    def child(self, parent: h5py.Group, name: str, path: str, *, _depth: int = 0) -> Any:
        """``parent[name]`` through a hard (or allowed soft) link, None when absent.

        ``path`` names the object in messages.
        """
        try:
            link = parent.get(name, getlink=True)
        except (OSError, RuntimeError, KeyError) as error:
            raise self.error(f"{self.where}: cannot read {path!r}: {error}") from None
        if link is None:
            return None
        if isinstance(link, h5py.ExternalLink):
            raise self.error(
                f"{self.where}: {path!r} is an external link to "
                f"{link.filename}:{link.path}; links to other files are refused."
            )
        if isinstance(link, h5py.SoftLink):
            return self._soft(parent, link.path, path, _depth)
        if not isinstance(link, h5py.HardLink):
            raise self.error(
                f"{self.where}: {path!r} is a {type(link).__name__}; links are refused."
            )
        try:
            return parent[name]
        except (OSError, RuntimeError, KeyError) as error:
            raise self.error(f"{self.where}: cannot read {path!r}: {error}") from None

    def _soft(self, parent: h5py.Group, target: str, path: str, depth: int) -> Any:
        if not self.soft_links:
            raise self.error(f"{self.where}: {path!r} is a SoftLink; links are refused.")
        if depth >= _MAX_SOFT_LINKS:
            raise self.error(
                f"{self.where}: {path!r} is a soft link to {target!r} through more than "
                f"{_MAX_SOFT_LINKS} soft links; refused."
            )
        try:
            return self.node(target, parent, _depth=depth + 1)
        except self.error as error:
            # Name the link the user asked for, then what it led to.
            inner = str(error).removeprefix(f"{self.where}: ")
            raise self.error(
                f"{self.where}: {path!r} is a soft link to {target!r}, and {inner}"
            ) from None

    def dataset(self, path: str, parent: h5py.Group | None = None) -> h5py.Dataset | None:
        """The dataset at ``path``, checked with :meth:`check_dataset`; None when absent.

        Raises
        ------
        ValueError
            (``error``) when ``path`` is a group, or the dataset's data is outside the file.
        """
        node = self.node(path, parent)
        if node is None:
            return None
        if not isinstance(node, h5py.Dataset):
            raise self.error(f"{self.where}: {path!r} is a group, expected a dataset.")
        self.check_dataset(node, path)
        return node

    def check_dataset(self, dataset: h5py.Dataset, path: str) -> None:
        """Refuse a dataset whose raw data is stored outside the file.

        Raises
        ------
        ValueError
            (``error``) for external raw storage or a virtual dataset, naming the
            files it reads.
        """
        external = dataset.external
        if external:
            files = ", ".join(sorted({str(entry[0]) for entry in external}))
            raise self.error(
                f"{self.where}: dataset {path!r} stores its data in external file(s) "
                f"{files}; data outside the file is refused."
            )
        if dataset.is_virtual:
            try:
                mapping = dataset.virtual_sources()
                sources = sorted({f"{s.file_name}:{s.dset_name}" for s in mapping})
            except (OSError, RuntimeError):
                sources = ["(unreadable mapping)"]
            raise self.error(
                f"{self.where}: dataset {path!r} is a virtual dataset reading "
                f"{', '.join(sources)}; data outside the file is refused."
            )

    def check_expansion(self, dataset: h5py.Dataset, path: str) -> None:
        """Refuse a dataset declaring far more bytes than it stores (a shape bomb)."""
        declared = math.prod(dataset.shape or ()) * dataset.dtype.itemsize
        if (
            declared > BOMB_FLOOR_BYTES
            and declared > BOMB_MAX_EXPANSION * dataset.id.get_storage_size()
        ):
            raise self.error(
                f"{self.where}: dataset {path!r} declares {declared} bytes but stores far "
                "fewer; refused."
            )
