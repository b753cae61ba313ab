"""TIFF volumes (``.tif``, ``.tiff``, ``.ome.tif``): 3D stacks, ImageJ hyperstacks, OME-TIFF.

Needs the optional ``tifffile`` package (``pip install 'conv3dt[tiff]'``),
imported only when a TIFF is opened.

A volume is the file's first image series, read as ``(z, y, x)`` or, with
channels, ``(z, y, x, c)``: each page is one ``(y, x)`` plane. Reads touch
only what a box needs: where the series' data is one contiguous uncompressed
block (what ImageJ, Fiji and tifffile write), the box's byte runs are read
with positional reads as for ``.npy``; otherwise (compressed or scattered
pages) the pages of the box's planes and channels are decoded one at a time.

Writes lay out the whole file first with tifffile (header, every page's
directory, the metadata) around an uninitialized contiguous data block, then
each box goes straight to its pages' bytes with positional writes, in any
order: every tile's part of each page is on disk when the tile is written, and
nothing waits in memory. A ``.tif`` is an ImageJ hyperstack (float32), an
``.ome.tif`` an OME-TIFF (float32 or float64); BigTIFF when the data passes
4 GiB. The voxel size is read from ImageJ metadata (``spacing``, the X/Y
resolution tags and ``unit``) or OME-XML (``PhysicalSizeX/Y/Z`` and their
units), and written the same way, divided by the stride.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import xml.etree.ElementTree as ElementTree
from types import ModuleType
from typing import Any

import numpy as np

from conv3dt import __version__
from conv3dt.volumes.base import (
    Box,
    VolumeError,
    VolumeMetadata,
    VolumeReader,
    VolumeWriter,
    box_shape,
    close_quietly,
    fsync_and_close,
    import_optional,
    read_raw_box,
    write_raw_box,
)

__all__ = [
    "INSTALL_HINT",
    "TIFF_EXTENSIONS",
    "TiffReader",
    "TiffWriter",
    "import_tifffile",
    "is_ome_path",
    "tiff_dtypes",
]

INSTALL_HINT = "pip install 'conv3dt[tiff]'"
TIFF_EXTENSIONS = (".ome.tiff", ".ome.tif", ".tiff", ".tif")
# Classic TIFF addresses bytes with 32-bit offsets; past this much data (the
# page directories and metadata need the rest) a file must be BigTIFF.
_BIGTIFF_BYTES = 2**32 - 2**25
_CHANNEL_AXES = "CS"
# OME's units of length, and what ImageJ writes for them.
_TO_MICRONS = {"nm": 1e-3, "µm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
_UNIT_NAMES = {
    "micron": "µm",
    "microns": "µm",
    "um": "µm",
    "µm": "µm",
    "\\u00b5m": "µm",
    "\u03bcm": "µm",
    "nm": "nm",
    "mm": "mm",
    "cm": "cm",
    "m": "m",
    "meter": "m",
}
_IMAGEJ_UNITS = {"µm": "micron", "nm": "nm", "mm": "mm", "cm": "cm", "m": "m"}


def import_tifffile() -> ModuleType:
    """The ``tifffile`` package.

    Raises
    ------
    VolumeError
        When it is not installed; the message says how to install it.
    """
    return import_optional("tifffile", "TIFF", INSTALL_HINT)


def is_ome_path(path: str) -> bool:
    """Whether ``path`` names an OME-TIFF (``.ome.tif`` / ``.ome.tiff``)."""
    return path.lower().endswith((".ome.tif", ".ome.tiff"))


def tiff_dtypes(path: str) -> tuple[np.dtype, ...]:
    """The dtypes a TIFF output at ``path`` can store: ImageJ float32, OME also float64."""
    names = ("float32", "float64") if is_ome_path(path) else ("float32",)
    return tuple(np.dtype(n) for n in names)


def _unit_name(unit: Any) -> str | None:
    """A length unit as OME names it (``µm``), or None when unknown."""
    if not isinstance(unit, str):
        return None
    return _UNIT_NAMES.get(unit.strip().lower())


def _resolution_size(tags: Any, name: str) -> float | None:
    """The pixel size an X/YResolution tag gives (pixels per unit, inverted)."""
    tag = tags.get(name)
    if tag is None:
        return None
    numerator, denominator = tag.value
    if numerator <= 0 or denominator <= 0:
        return None
    return float(denominator) / float(numerator)


def _imagej_voxel_size(
    metadata: dict[str, Any], tags: Any
) -> tuple[tuple[float, float, float] | None, str | None]:
    x = _resolution_size(tags, "XResolution")
    y = _resolution_size(tags, "YResolution")
    unit = metadata.get("unit")
    spacing = metadata.get("spacing")
    if x is None or y is None or (unit is None and spacing is None):
        return None, None  # not calibrated: ImageJ's pixel units
    z = float(spacing) if isinstance(spacing, int | float) and spacing > 0 else 1.0
    return (z, y, x), unit if isinstance(unit, str) else None


def _ome_voxel_size(text: str) -> tuple[tuple[float, float, float] | None, str | None]:
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return None, None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, None
    sizes, units = [], []
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        try:
            size = float(value) if value is not None else None
        except ValueError:
            size = None
        if size is None or not size > 0:
            if axis == "Z":
                size = 1.0  # a single plane, or sections of unknown thickness
            else:
                return None, None
        sizes.append(size)
        # OME's default unit is the micrometre.
        units.append(_unit_name(pixels.get(f"PhysicalSize{axis}Unit", "µm")))
    if None in units:
        return None, None
    if len(set(units)) > 1:
        # Mixed units: all in micrometres.
        sizes = [s * _TO_MICRONS[u] for s, u in zip(sizes, units, strict=True)]
        units = ["µm"]
    return tuple(sizes), units[0]  # type: ignore[return-value]


class TiffReader(VolumeReader):
    """Read boxes of a TIFF's first image series as ``(z, y, x)`` or ``(z, y, x, c)``.

    Axes of length 1 (time, a single channel) are dropped. Besides the page
    axes Y and X, one axis may be the channels (``C``, or ``S`` samples per
    pixel) and one the depth (``Z``, or any other: ``Q``, ``I``, ``T``); a
    series with two axes longer than 1 that could be the depth is refused.

    Attributes
    ----------
    axes : str
        The series' axes as tifffile names them (``"ZCYX"`` for an ImageJ
        hyperstack with channels).
    kind : str
        ``"imagej"``, ``"ome"`` or ``"tiff"``.
    unit : str or None
        The voxel size's unit (``"µm"``, ``"mm"``...), when the file says.
    """

    format = "tiff"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        tifffile = import_tifffile()
        if not os.path.exists(path):
            raise VolumeError(f"cannot open {path}: no such file")
        try:
            self._tiff = tifffile.TiffFile(path)
            series = self._tiff.series
        except Exception as exc:  # tifffile raises many types (struct.error...) on garbage
            raise VolumeError(f"{path}: not a readable TIFF file: {exc}") from None
        self._fd: int | None = None
        try:
            self._parse(series)
        except VolumeError:
            self._close()
            raise
        except Exception as exc:  # metadata of a corrupt file, as on opening
            self._close()
            raise VolumeError(f"{path}: not a readable TIFF file: {exc}") from None
        except BaseException:
            self._close()
            raise

    def _parse(self, all_series: list[Any]) -> None:
        tiff = self._tiff
        if not all_series:
            raise VolumeError(f"{self.path}: the TIFF file holds no image")
        series = all_series[0]
        stored = np.dtype(series.dtype)
        if stored.kind not in "biuf":
            raise VolumeError(f"{self.path}: unsupported TIFF data type {stored}; expected numbers")
        self.axes = str(series.axes)
        self._series = series
        self._file_shape = tuple(int(n) for n in series.shape)
        depth = [
            a
            for a, (name, n) in enumerate(zip(self.axes, self._file_shape, strict=True))
            if name not in "YX" + _CHANNEL_AXES and n > 1
        ]
        channels = [
            a
            for a, (name, n) in enumerate(zip(self.axes, self._file_shape, strict=True))
            if name in _CHANNEL_AXES and n > 1
        ]
        if len(depth) > 1 or len(channels) > 1 or "Y" not in self.axes or "X" not in self.axes:
            raise VolumeError(
                f"{self.path}: TIFF series with axes {self.axes} and shape {self._file_shape} is "
                "not one volume; expected Y, X, at most one depth axis (Z) and one channel "
                "axis (C) longer than 1"
            )
        # Where each of (z, y, x[, c]) sits among the file's axes (z may be absent).
        self._positions = (
            depth[0] if depth else None,
            self.axes.index("Y"),
            self.axes.index("X"),
            *channels,
        )
        lengths = [self._file_shape[a] if a is not None else 1 for a in self._positions]
        self.shape = tuple(lengths)
        self.dtype = stored.newbyteorder("=")
        self._file_dtype = stored.newbyteorder(tiff.byteorder)
        self._offset = series.dataoffset
        if self._offset is not None and 0 not in self._file_shape:
            needed = int(self._offset) + math.prod(self._file_shape) * stored.itemsize
            size = os.path.getsize(self.path)
            if size < needed:
                raise VolumeError(
                    f"{self.path}: truncated TIFF file: its data needs {needed} bytes but "
                    f"the file has {size}"
                )
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.kind, voxel_size, unit = "tiff", None, None
        if tiff.is_imagej and tiff.imagej_metadata is not None:
            self.kind = "imagej"
            voxel_size, unit = _imagej_voxel_size(tiff.imagej_metadata, series.keyframe.tags)
        elif tiff.is_ome and tiff.ome_metadata:
            self.kind = "ome"
            voxel_size, unit = _ome_voxel_size(tiff.ome_metadata)
        self.unit = _unit_name(unit) or unit
        affine = None
        if voxel_size is not None:
            affine = np.diag([*voxel_size, 1.0])
        self.metadata = VolumeMetadata(
            affine=affine,
            voxel_size=voxel_size,
            attrs={"unit": self.unit} if self.unit else {},
        )

    def _file_box(self, box: Box) -> tuple[slice, ...]:
        """The box in the file's axes (singleton axes whole)."""
        parts = [slice(0, 1)] * len(self._file_shape)
        for part, position in zip(box, self._positions, strict=False):
            if position is not None:
                parts[position] = part
        return tuple(parts)

    def _to_volume(self, array: np.ndarray, box: Box) -> np.ndarray:
        """A box read in the file's axes, reordered as ``(z, y, x[, c])``."""
        order = [p for p in self._positions if p is not None]
        rest = [a for a in range(array.ndim) if a not in order]
        # The other axes have length 1 (and so has z when the file has no depth).
        return np.transpose(array, order + rest).reshape(box_shape(box))

    def _read(self, box: Box) -> np.ndarray:
        if 0 in box_shape(box):
            return np.empty(box_shape(box), dtype=self.dtype)
        file_box = self._file_box(box)
        try:
            if self._fd is not None:
                raw = read_raw_box(
                    self._fd, int(self._offset), self._file_shape, self._file_dtype, file_box
                )
            else:
                raw = self._read_pages(file_box)
        except Exception as exc:  # as on opening: corrupt pages raise many types
            raise VolumeError(f"{self.path}: cannot read box {box}: {exc}") from None
        return self._to_volume(raw, box)

    def _read_pages(self, file_box: tuple[slice, ...]) -> np.ndarray:
        """Decode only the pages (planes) the box covers, one at a time."""
        series = self._series
        page_ndim = len(series.keyframe.shape)
        outer_shape = self._file_shape[: len(self._file_shape) - page_ndim]
        outer, inner = file_box[: len(outer_shape)], file_box[len(outer_shape) :]
        out = np.empty(box_shape(file_box), dtype=self._file_dtype)
        pages = series.pages
        for local in np.ndindex(*box_shape(outer)):
            index = tuple(s.start + i for s, i in zip(outer, local, strict=True))
            number = int(np.ravel_multi_index(index, outer_shape)) if outer_shape else 0
            plane = pages[number].asarray()
            out[local] = np.reshape(plane, self._file_shape[len(outer_shape) :])[inner]
        return out

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._tiff.close()


def _template_unit(template: VolumeMetadata) -> str | None:
    """The unit of the template's voxel size, where its format records one."""
    unit = _unit_name(template.attrs.get("unit"))
    if unit is not None:
        return unit
    header = template.nifti_header
    if header is not None:
        return _unit_name(header.get_xyzt_units()[0])
    if "element_size_um" in template.attrs:
        return "µm"
    return None


class TiffWriter(VolumeWriter):
    """Write a TIFF box by box: an ImageJ hyperstack (``.tif``) or an OME-TIFF (``.ome.tif``).

    The shape is ``(z, y, x)`` or ``(z, y, x, c)``; pages are ``(y, x)`` planes
    ordered z-major then channel (axes ``ZYX`` or ``ZCYX``). tifffile writes
    the file's structure at creation and boxes are written into the data
    block with positional writes, in any order; voxels never written are 0.

    With a ``template``, its voxel size (divided by ``strides`` when given) and
    unit are recorded: ImageJ ``spacing``, X/YResolution and ``unit``, or OME
    ``PhysicalSize*``. ``attrs`` (provenance) go to ImageJ's ``Info`` or the
    OME image's ``Description`` as JSON.
    """

    format = "tiff"

    def __init__(
        self,
        path: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        *,
        template: VolumeMetadata | None = None,
        attrs: dict[str, Any] | None = None,
        strides: tuple[float, ...] | None = None,
    ) -> None:
        if len(shape) not in (3, 4):
            raise ValueError(
                "`shape` of a TIFF volume must be (z, y, x) or (z, y, x, c). "
                f"Received shape={shape}"
            )
        dtype = np.dtype(dtype)
        if dtype not in tiff_dtypes(path):
            raise VolumeError(
                f"cannot write {path}: a {'OME-TIFF' if is_ome_path(path) else 'ImageJ TIFF'} "
                f"stores {' or '.join(str(d) for d in tiff_dtypes(path))}, not {dtype}"
                + ("" if is_ome_path(path) else "; name it .ome.tif for float64")
            )
        self._tifffile = import_tifffile()
        self._ome = is_ome_path(path)
        self._template = template or VolumeMetadata()
        self._attrs = attrs or {}
        self._strides = strides
        self._fd: int | None = None
        # Pages in file order: z-major, then channel.
        self._file_shape = (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape
        self._file_dtype = dtype.newbyteorder("<")
        super().__init__(path, shape, dtype)

    def _voxel_size(self) -> tuple[float, float, float] | None:
        size = self._template.voxel_size
        if size is None or len(size) < 3:
            return None
        values = np.asarray(size[:3], dtype=np.float64)
        if self._strides is not None:
            values = values / np.asarray(self._strides, dtype=np.float64)
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            return None
        return tuple(float(v) for v in values)  # type: ignore[return-value]

    def _layout_options(self) -> dict[str, Any]:
        """tifffile's ``write`` arguments for the metadata."""
        axes = "ZCYX" if len(self.shape) == 4 else "ZYX"
        size = self._voxel_size()
        unit = _template_unit(self._template)
        provenance = json.dumps(self._attrs, default=str)
        if self._ome:
            metadata: dict[str, Any] = {"axes": axes, "Description": provenance}
            if size is not None:
                for axis, value in zip("ZYX", size, strict=True):
                    metadata[f"PhysicalSize{axis}"] = value
                    # Without a known unit, OME's default (µm) is what the input meant too.
                    metadata[f"PhysicalSize{axis}Unit"] = unit or "µm"
            return {"metadata": metadata}
        metadata = {"axes": axes, "Info": provenance}
        options: dict[str, Any] = {"metadata": metadata}
        if size is not None:
            metadata["spacing"] = size[0]
            if unit is not None:
                metadata["unit"] = _IMAGEJ_UNITS.get(unit, unit)
            options["resolution"] = (1.0 / size[2], 1.0 / size[1])
        return options

    def _open(self) -> None:
        self._fd = self._create_temp()
        data_bytes = math.prod(self._file_shape) * self.dtype.itemsize
        bigtiff = data_bytes > _BIGTIFF_BYTES
        with open(self.tmp_path, "r+b") as handle, warnings.catch_warnings():
            # ImageJ's own reader cannot open BigTIFF, but its metadata in one is
            # what tifffile, Bio-Formats and Fiji's Bio-Formats importer read.
            warnings.filterwarnings("ignore", message=".*nonconformant BigTIFF ImageJ")
            with self._tifffile.TiffWriter(
                handle, bigtiff=bigtiff, imagej=not self._ome, ome=self._ome, byteorder="<"
            ) as tiff:
                located = tiff.write(
                    None,
                    shape=self._file_shape,
                    dtype=self._file_dtype,
                    returnoffset=True,
                    # Planes of one value per pixel, also when x is 3 or 4 long
                    # (which tifffile would otherwise take for RGB samples).
                    photometric="minisblack",
                    software=f"conv3dt {__version__}",
                    **self._layout_options(),
                )
        if located is None:
            raise VolumeError(
                f"cannot write {self.path}: tifffile did not lay the data out in one block"
            )
        self._offset = int(located[0])

    def _write(self, box: Box, array: np.ndarray) -> None:
        if array.size == 0:
            return
        if len(self.shape) == 4:
            box = (box[0], box[3], box[1], box[2])
            array = np.transpose(array, (0, 3, 1, 2))
        write_raw_box(self._fd, self._offset, self._file_shape, self._file_dtype, box, array)

    def _finish(self) -> None:
        fd, self._fd = self._fd, None
        fsync_and_close(fd)

    def _discard(self) -> None:
        fd, self._fd = self._fd, None
        close_quietly(fd)
