"""OME-Zarr (NGFF) images: one level of a multiscale image read by box, a multiscale image written.

Needs the optional ``zarr`` package, version 3 or newer (``pip install
'conv3dt[dask]'``). Both versions in use are read: NGFF 0.4 (Zarr v2, the
``multiscales`` attribute of the image group) and NGFF 0.5 (Zarr v3, under the
``ome`` attribute). Outputs keep an OME-Zarr input's version; other inputs get
0.5.

Axes come from the metadata: an optional ``time`` axis, an optional channel
axis (``type: channel``, or one with no or a custom type), then three ``space``
axes, as NGFF orders them. In conv3dt's layout labels they are ``b`` (time as
a batch of volumes), ``c`` and ``z``, ``y``, ``x`` (the space axes in storage
order, whatever their names). World geometry is the level's ``scale`` and
``translation`` (followed by the multiscale's own, when present), so the
volume's affine is diagonal.

An output is an image group with level 0 in the array ``0``, chunked as the
caller asks (the tiles' chunks, so tile writers never share a chunk), and
``pyramid`` further levels, each the 2x2x2 mean of the one before (a
``type: "mean"`` multiscale), computed block by block from the finished level
0 before the group is renamed onto the target.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from conv3dt.validation import excerpt
from conv3dt.volumes.affine import voxel_sizes
from conv3dt.volumes.base import (
    Box,
    VolumeError,
    VolumeMetadata,
    VolumeReader,
)
from conv3dt.volumes.zarr import (
    ZarrWriter,
    default_chunks,
    import_zarr,
    read_array_box,
    zarr_attrs,
)

__all__ = [
    "NGFF_VERSIONS",
    "NgffAxis",
    "OmeZarrMetadata",
    "OmeZarrReader",
    "OmeZarrWriter",
    "create_ome_zarr",
    "default_layout_axes",
    "pyramid_transforms",
    "write_pyramid",
]

NGFF_VERSIONS = ("0.4", "0.5")
_ZARR_FORMAT = {"0.4": 2, "0.5": 3}
# NGFF keys describing the input image itself: its channels' rendering and
# label images no longer match an output with other channels and shape.
_NGFF_KEYS = ("ome", "multiscales", "omero", "labels", "image-label", "plate", "well")
_DEFAULT_NAMES = {"b": "t", "c": "c", "z": "z", "y": "y", "x": "x"}
_DEFAULT_TYPES = {"b": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
# Length units as NIfTI headers (nibabel's names) and TIFF metadata (OME's
# symbols) give them, by their NGFF (UDUNITS-2) names.
_NGFF_UNITS = {
    "meter": "meter",
    "m": "meter",
    "cm": "centimeter",
    "mm": "millimeter",
    "micron": "micrometer",
    "µm": "micrometer",
    "um": "micrometer",
    "nm": "nanometer",
    "pm": "picometer",
    "Å": "angstrom",
}
# Pyramid levels are chunked at most this many voxels a side.
_PYRAMID_CHUNK = 64
# Source voxels one 2x mean step reads at a time: with its float64 sums about
# 32 MiB, on top of the tiles' buffers.
_PYRAMID_BLOCK_VOXELS = 2**21


@dataclass(frozen=True)
class NgffAxis:
    """One NGFF axis: its name, type (``space``, ``time``, ``channel`` or other) and unit."""

    name: str
    type: str | None = None
    unit: str | None = None

    def as_json(self) -> dict[str, str]:
        """The axis as NGFF writes it (absent type and unit left out)."""
        entry = {"name": self.name}
        if self.type is not None:
            entry["type"] = self.type
        if self.unit is not None:
            entry["unit"] = self.unit
        return entry


@dataclass
class OmeZarrMetadata(VolumeMetadata):
    """An OME-Zarr image's metadata: the common fields and what NGFF adds.

    Attributes
    ----------
    axes : tuple of NgffAxis
        One per array axis, in storage order.
    version : str
        The NGFF version, ``"0.4"`` or ``"0.5"``.
    name : str or None
        The multiscale's name.
    scale, translation : tuple of float
        The read level's full transform, one value per array axis (the
        spatial ones are also in :attr:`affine`).
    labels : str
        The axes' layout labels (``b``, ``c``, ``z``, ``y``, ``x``).
    levels, level : int
        How many levels the multiscale has and which one was read.
    """

    axes: tuple[NgffAxis, ...] = ()
    version: str = "0.5"
    name: str | None = None
    scale: tuple[float, ...] = ()
    translation: tuple[float, ...] = ()
    labels: str = ""
    levels: int = 1
    level: int = 0


def _import_zarr3() -> ModuleType:
    """The ``zarr`` package, version 3 or newer (whose API reads and writes both formats).

    Raises
    ------
    VolumeError
        When zarr is missing or older; the message says what to install.
    """
    zarr = import_zarr()
    if int(zarr.__version__.split(".")[0]) < 3:
        raise VolumeError(
            f"OME-Zarr volumes need zarr 3 or newer (zarr {zarr.__version__} is installed): "
            "pip install 'zarr>=3'"
        )
    return zarr


def default_layout_axes(ndim: int) -> str:
    """The layout labels of an OME-Zarr array of ``ndim`` axes when none are given.

    3: ``zyx``; 4: ``czyx``; 5: ``bczyx``.

    Raises
    ------
    ValueError
        For other ranks.
    """
    labels = {3: "zyx", 4: "czyx", 5: "bczyx"}.get(ndim)
    if labels is None:
        raise ValueError(f"`shape` must have 3 to 5 axes for OME-Zarr. Received {ndim} axes")
    return labels


# -- reading ---------------------------------------------------------------


def _multiscale(attrs: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """The NGFF version and the first multiscale of an image group's attributes."""
    ome = attrs.get("ome")
    if isinstance(ome, dict) and "multiscales" in ome:
        version, multiscales = str(ome.get("version", "")), ome["multiscales"]
    elif "multiscales" in attrs:
        multiscales = attrs["multiscales"]
        first = multiscales[0] if isinstance(multiscales, list) and multiscales else {}
        version = str(first.get("version", "")) if isinstance(first, dict) else ""
    else:
        container = "bioformats2raw.layout" in attrs or "plate" in attrs or bool(ome)
        hint = f"; it holds other images: open one of them (e.g. {path}/0)" if container else ""
        raise VolumeError(
            f"{path}: not an OME-Zarr image: no 'multiscales' in its attributes{hint}"
        )
    if version not in NGFF_VERSIONS:
        raise VolumeError(
            f"{path}: NGFF version {version or '(none)'} is not supported; expected "
            f"{' or '.join(NGFF_VERSIONS)}"
        )
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise VolumeError(f"{path}: 'multiscales' must be a non-empty list of objects")
    return version, multiscales[0]


def _parse_axes(entries: Any, path: str) -> tuple[tuple[NgffAxis, ...], str]:
    """The NGFF axes and their layout labels (``b``, ``c``, ``z``, ``y``, ``x``)."""
    if not isinstance(entries, list) or not entries:
        raise VolumeError(f"{path}: multiscales 'axes' must be a non-empty list")
    axes = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise VolumeError(
                f"{path}: every multiscales axis needs a 'name'; got {excerpt(entry)}"
            )
        kind, unit = entry.get("type"), entry.get("unit")
        axes.append(
            NgffAxis(
                entry["name"],
                None if kind is None else str(kind),
                None if unit is None else str(unit),
            )
        )
    names = [axis.name for axis in axes]
    kinds = [axis.type or "custom" for axis in axes]
    space = [i for i, kind in enumerate(kinds) if kind == "space"]
    other = [i for i, kind in enumerate(kinds) if kind not in ("space", "time")]
    time = [i for i, kind in enumerate(kinds) if kind == "time"]
    expected = "axes ordered [time], [channel], then 3 space axes"
    if len(space) != 3 or len(time) > 1 or len(other) > 1:
        raise VolumeError(
            f"{path}: axes {names} ({kinds}) cannot be processed: expected {expected}"
        )
    labels = "".join(
        "zyx"[space.index(i)] if i in space else "b" if i in time else "c" for i in range(len(axes))
    )
    if labels not in ("zyx", "czyx", "bzyx", "bczyx"):
        raise VolumeError(f"{path}: axes {names} ({kinds}) are out of order: expected {expected}")
    return tuple(axes), labels


def _transform(entries: Any, ndim: int, path: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale and translation of a ``coordinateTransformations`` list (identity when absent)."""
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for entry in entries or []:
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind == "identity":
            continue
        if kind not in ("scale", "translation") or kind not in entry:
            raise VolumeError(
                f"{path}: {where} coordinateTransformations: expected 'scale' and 'translation' "
                f"given inline; got {excerpt(entry)}"
            )
        try:
            values = np.asarray(entry[kind], dtype=np.float64)
        except (TypeError, ValueError):
            values = np.empty(0)
        if values.shape != (ndim,) or not np.all(np.isfinite(values)):
            raise VolumeError(
                f"{path}: {where} {kind} must be {ndim} finite numbers; got {excerpt(entry[kind])}"
            )
        if kind == "scale":
            scale, translation = scale * values, translation * values
        else:
            translation = translation + values
    return scale, translation


class OmeZarrReader(VolumeReader):
    """Read boxes of one level of an OME-Zarr image.

    Parameters
    ----------
    path : str
        The image group's directory (``scan.ome.zarr``).
    level : int, optional
        The multiscale level (default 0, the full resolution).

    Attributes
    ----------
    chunks : tuple of int
        The level's chunk shape (tiles that follow it read whole chunks).
    layout_axes : str
        The array axes' layout labels, e.g. ``"czyx"``.
    metadata : OmeZarrMetadata
    """

    format = "ome-zarr"

    def __init__(self, path: str, level: int | None = None) -> None:
        super().__init__(path)
        zarr = _import_zarr3()
        root = path.rstrip("/") or path
        if not os.path.isdir(root):
            raise VolumeError(f"cannot open {path}: no such OME-Zarr image")
        try:
            group = zarr.open_group(root, mode="r")
        except Exception as exc:  # zarr's error types differ between its major versions
            raise VolumeError(
                f"{path}: not a readable OME-Zarr image (a Zarr group): {exc}"
            ) from None
        attrs = dict(group.attrs)
        version, multiscale = _multiscale(attrs, path)
        axes, labels = _parse_axes(multiscale.get("axes"), path)
        datasets = multiscale.get("datasets")
        if not isinstance(datasets, list) or not datasets:
            raise VolumeError(f"{path}: multiscales 'datasets' must be a non-empty list")
        index = 0 if level is None else level
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(datasets):
            raise ValueError(
                f"`level` must be an int from 0 to {len(datasets) - 1} ({path} has "
                f"{len(datasets)} level{'s' if len(datasets) > 1 else ''}). "
                f"Received level={excerpt(level)}"
            )
        dataset = datasets[index]
        where = dataset.get("path") if isinstance(dataset, dict) else None
        # A level is an array inside the image: a path leading out of it is refused.
        parts = where.split("/") if isinstance(where, str) else []
        if not parts or where.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise VolumeError(
                f"{path}: multiscales dataset {index} needs a 'path' to an array inside the "
                f'image (e.g. "0"); got {excerpt(dataset)}'
            )
        try:
            self._array = zarr.open_array(os.path.join(root, *parts), mode="r")
        except Exception as exc:
            raise VolumeError(
                f"{path}: level {index} (array {excerpt(where)}) cannot be opened: {exc}"
            ) from None
        stored = np.dtype(self._array.dtype)
        if stored.kind not in "biuf" or stored.fields is not None:
            raise VolumeError(f"{path}: unsupported dtype {stored}; expected numbers")
        self.shape = tuple(int(n) for n in self._array.shape)
        if len(self.shape) != len(axes):
            raise VolumeError(
                f"{path}: level {index} has {len(self.shape)} axes but multiscales 'axes' "
                f"names {len(axes)}"
            )
        self.chunks = tuple(int(n) for n in self._array.chunks)
        self.dtype = stored.newbyteorder("=")
        self.layout_axes = labels
        ndim = len(axes)
        scale, translation = _transform(
            dataset.get("coordinateTransformations"), ndim, path, f"dataset {index}"
        )
        outer_scale, outer_translation = _transform(
            multiscale.get("coordinateTransformations"), ndim, path, "multiscale"
        )
        scale, translation = scale * outer_scale, translation * outer_scale + outer_translation
        spatial = [labels.index(a) for a in "zyx"]
        affine = np.eye(4)
        affine[[0, 1, 2], [0, 1, 2]] = scale[spatial]
        affine[:3, 3] = translation[spatial]
        name = multiscale.get("name")
        self.metadata = OmeZarrMetadata(
            affine=affine,
            voxel_size=voxel_sizes(affine),
            attrs={k: v for k, v in attrs.items() if k not in _NGFF_KEYS},
            axes=axes,
            version=version,
            name=name if isinstance(name, str) else None,
            scale=tuple(float(v) for v in scale),
            translation=tuple(float(v) for v in translation),
            labels=labels,
            levels=len(datasets),
            level=index,
        )

    def _read(self, box: Box) -> np.ndarray:
        return read_array_box(self._array, self.path, box, self.dtype)

    def _close(self) -> None:
        self._array = None


# -- writing ---------------------------------------------------------------


def pyramid_transforms(
    scale: tuple[float, ...], translation: tuple[float, ...], labels: str, levels: int
) -> list[tuple[list[float], list[float]]]:
    """Scale and translation of level 0 and of ``levels`` 2x mean levels after it.

    A level-k voxel averages 2**k level-0 voxels along each space axis, so its
    centre is (2**k - 1) / 2 level-0 voxels past its first one's.
    """
    result = []
    for k in range(levels + 1):
        factor = [2.0**k if label in "zyx" else 1.0 for label in labels]
        result.append(
            (
                [s * f for s, f in zip(scale, factor, strict=True)],
                [t + s * (f - 1) / 2 for t, s, f in zip(translation, scale, factor, strict=True)],
            )
        )
    return result


def _level_shape(shape: tuple[int, ...], labels: str, level: int) -> tuple[int, ...]:
    """A pyramid level's shape: each space axis halved ``level`` times, rounding up."""
    result = list(shape)
    for _ in range(level):
        result = [
            math.ceil(n / 2) if label in "zyx" else n
            for n, label in zip(result, labels, strict=True)
        ]
    return tuple(result)


def _mean2(block: np.ndarray, labels: str) -> np.ndarray:
    """The 2x mean along the space axes; an odd axis's last voxel is averaged with itself."""
    pad = [
        (0, n % 2) if label in "zyx" else (0, 0)
        for n, label in zip(block.shape, labels, strict=True)
    ]
    if any(after for _, after in pad):
        block = np.pad(block, pad, mode="edge")
    # Pairs are added axis by axis, each pass halving the array: NumPy's
    # reductions over several strided axes at once are several times slower.
    summed: np.ndarray = block
    for axis, label in enumerate(labels):
        if label in "zyx":
            even = [slice(None)] * block.ndim
            odd = [slice(None)] * block.ndim
            even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
            summed = np.add(summed[tuple(even)], summed[tuple(odd)], dtype=np.float64)
    return summed / 8.0


def _spatial_transform(
    affine: np.ndarray | None, group_attrs: dict[str, Any]
) -> tuple[list[float], list[float]]:
    """Scale and translation of the space axes from a voxel-to-world matrix.

    NGFF 0.4 and 0.5 transforms are a scale and a translation per axis: a
    matrix with rotations or flips keeps its column norms as the scale, and
    itself in ``group_attrs["conv3dt_affine"]``.
    """
    if affine is None:
        return [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
    matrix = np.asarray(affine, dtype=np.float64)
    diagonal = np.diag(matrix[:3, :3])
    if np.count_nonzero(matrix[:3, :3] - np.diag(diagonal)) == 0 and np.all(diagonal > 0):
        return [float(v) for v in diagonal], [float(v) for v in matrix[:3, 3]]
    group_attrs["conv3dt_affine"] = matrix.tolist()
    return [float(v) for v in voxel_sizes(matrix)], [0.0, 0.0, 0.0]


def _space_unit(template: VolumeMetadata) -> str | None:
    """The NGFF unit of the space axes of a NIfTI or TIFF input (None when unknown)."""
    if template.nifti_header is not None:
        unit = template.nifti_header.get_xyzt_units()[0]
    else:
        unit = template.attrs.get("unit")
    return _NGFF_UNITS.get(unit) if isinstance(unit, str) else None


def _multiscale_metadata(
    labels: str,
    template: VolumeMetadata,
    affine: np.ndarray | None,
    pyramid: int,
    group_attrs: dict[str, Any],
) -> tuple[str, dict[str, Any]]:
    """The NGFF version and multiscale entry of an output image."""
    known = template if isinstance(template, OmeZarrMetadata) else None
    version = known.version if known is not None else "0.5"
    # The input's axes by layout label, to keep their names, units and time steps.
    by_label: dict[str, tuple[NgffAxis, float, float]] = {}
    if known is not None:
        for label, axis, step, shift in zip(
            known.labels, known.axes, known.scale, known.translation, strict=True
        ):
            by_label[label] = (axis, step, shift)
    spatial_scale, spatial_translation = _spatial_transform(affine, group_attrs)
    unit = None if known is not None else _space_unit(template)
    axes, scale, translation = [], [], []
    for label in labels:
        default = NgffAxis(
            _DEFAULT_NAMES[label], _DEFAULT_TYPES[label], unit if label in "zyx" else None
        )
        axis, step, shift = by_label.get(label, (default, 1.0, 0.0))
        if label in "zyx":
            step = spatial_scale["zyx".index(label)]
            shift = spatial_translation["zyx".index(label)]
        elif label == "c":
            step, shift = 1.0, 0.0  # the filters, not the input's channels
        axes.append(axis)
        scale.append(step)
        translation.append(shift)
    datasets = [
        {
            "path": str(k),
            "coordinateTransformations": [
                {"type": "scale", "scale": level_scale},
                {"type": "translation", "translation": level_translation},
            ],
        }
        for k, (level_scale, level_translation) in enumerate(
            pyramid_transforms(tuple(scale), tuple(translation), labels, pyramid)
        )
    ]
    multiscale: dict[str, Any] = {"axes": [axis.as_json() for axis in axes], "datasets": datasets}
    if pyramid:
        multiscale["type"] = "mean"
        multiscale["metadata"] = {
            "description": "each level the 2x2x2 mean of the one before "
            "(an odd axis's last voxel averaged with itself)",
            "method": "conv3dt 2x mean",
        }
    if known is not None and known.name is not None:
        multiscale["name"] = known.name
    if version == "0.4":
        multiscale["version"] = "0.4"
    return version, multiscale


def create_ome_zarr(
    path: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    *,
    labels: str | None = None,
    template: VolumeMetadata | None = None,
    affine: np.ndarray | None = None,
    attrs: dict[str, Any] | None = None,
    chunks: tuple[int, ...] | None = None,
    pyramid: int = 0,
) -> list[Any]:
    """Create (or replace) an OME-Zarr image in the directory ``path``, its levels empty.

    The metadata is complete from the start; level 0 is then written by box
    and the further levels by :func:`write_pyramid`. Parameters as for
    :class:`OmeZarrWriter`.

    Returns
    -------
    list of zarr.Array
        The levels, 0 first.

    Raises
    ------
    ValueError
        For bad ``labels``, ``pyramid`` or ``chunks``.
    VolumeError
        When zarr is not installed.
    """
    zarr = _import_zarr3()
    labels = default_layout_axes(len(shape)) if labels is None else labels
    if len(labels) != len(shape) or labels not in ("zyx", "czyx", "bzyx", "bczyx"):
        raise ValueError(
            f"`labels` must name the {len(shape)} axes in NGFF order (b, c, then z, y, x). "
            f"Received labels={labels!r}"
        )
    if isinstance(pyramid, bool) or not isinstance(pyramid, int) or pyramid < 0:
        raise ValueError(f"`pyramid` must be an int >= 0. Received pyramid={pyramid!r}")
    level0_chunks = default_chunks(shape) if chunks is None else tuple(int(c) for c in chunks)
    if len(level0_chunks) != len(shape) or any(c < 1 for c in level0_chunks):
        raise ValueError(
            f"`chunks` must be {len(shape)} positive ints for shape {shape}. "
            f"Received chunks={chunks!r}"
        )
    template = template if template is not None else VolumeMetadata()
    group_attrs = zarr_attrs(template.attrs, None, attrs)
    version, multiscale = _multiscale_metadata(labels, template, affine, pyramid, group_attrs)
    zarr_format = _ZARR_FORMAT[version]
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    extra: dict[str, Any] = {}
    if zarr_format == 2:
        # NGFF 0.4 stores chunks in nested directories.
        extra["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    levels = []
    for k in range(pyramid + 1):
        level_shape = _level_shape(tuple(shape), labels, k)
        # Levels after 0 get one volume and one channel a chunk, so that a
        # block of the level below them stays small.
        level_chunks = (
            level0_chunks
            if k == 0
            else tuple(
                max(1, min(n, _PYRAMID_CHUNK)) if label in "zyx" else 1
                for n, label in zip(level_shape, labels, strict=True)
            )
        )
        levels.append(
            group.create_array(
                str(k), shape=level_shape, chunks=level_chunks, dtype=np.dtype(dtype), **extra
            )
        )
    if version == "0.5":
        ngff = {"ome": {"version": "0.5", "multiscales": [multiscale]}}
    else:
        ngff = {"multiscales": [multiscale]}
    group.attrs.update({**group_attrs, **ngff})
    return levels


def write_pyramid(path: str) -> None:
    """Fill the levels after 0 of an image made by :func:`create_ome_zarr`, from level 0.

    Level k is the 2x2x2 mean of level k - 1, computed a block of its chunks
    at a time (see :func:`_pyramid_block`), so memory stays near 32 MiB
    whatever the image's size.
    """
    reader = OmeZarrReader(path)
    labels, count = reader.layout_axes, reader.metadata.levels
    reader.close()
    zarr = _import_zarr3()
    group = zarr.open_group(path, mode="r+")
    for k in range(1, count):
        _downsample(group[str(k - 1)], group[str(k)], labels)


def _pyramid_block(source: Any, target: Any, labels: str) -> tuple[int, ...]:
    """The shape of the ``target`` blocks one 2x mean step computes at a time.

    Whole chunks of ``target``, as many as make each block's source box cover
    whole source chunks (all channels of a voxel included), so every source
    chunk is decoded once; within :data:`_PYRAMID_BLOCK_VOXELS` source voxels,
    giving up channels first, then halving space axes.
    """
    block = []
    for n, target_chunk, source_chunk, label in zip(
        target.shape, target.chunks, source.chunks, labels, strict=True
    ):
        wanted = math.ceil(source_chunk / 2) if label in "zyx" else source_chunk
        block.append(min(n, target_chunk * math.ceil(wanted / target_chunk)))

    def source_voxels() -> int:
        return math.prod(
            2 * b if label in "zyx" else b for b, label in zip(block, labels, strict=True)
        )

    order = [a for a, label in enumerate(labels) if label not in "zyx"]
    order += [a for a, label in enumerate(labels) if label in "zyx"]
    for axis in order:
        while source_voxels() > _PYRAMID_BLOCK_VOXELS and block[axis] > target.chunks[axis]:
            block[axis] = max(
                target.chunks[axis], block[axis] // 2 // target.chunks[axis] * target.chunks[axis]
            )
    return tuple(block)


def _downsample(source: Any, target: Any, labels: str) -> None:
    """Write ``target`` as the 2x mean of ``source``, a block at a time (:func:`_pyramid_block`)."""
    block = _pyramid_block(source, target, labels)
    grid = [range(0, n, b) for n, b in zip(target.shape, block, strict=True)]
    for starts in itertools.product(*grid):
        out_box = tuple(
            slice(s, min(s + b, n)) for s, b, n in zip(starts, block, target.shape, strict=True)
        )
        in_box = tuple(
            slice(2 * b.start, min(2 * b.stop, n)) if label in "zyx" else b
            for b, n, label in zip(out_box, source.shape, labels, strict=True)
        )
        target[out_box] = _mean2(np.asarray(source[in_box]), labels).astype(target.dtype)


class OmeZarrWriter(ZarrWriter):
    """Write an OME-Zarr image: level 0 box by box, then its pyramid, renamed onto the target.

    Parameters
    ----------
    path : str
        The target directory (``out.ome.zarr``).
    shape : tuple of int
        Level 0's shape.
    dtype : numpy.dtype
    labels : str, optional
        The axes' layout labels (``b``, ``c``, ``z``, ``y``, ``x`` in NGFF order);
        default from the rank (see :func:`default_layout_axes`).
    template : VolumeMetadata, optional
        The input's metadata: an OME-Zarr input's axis names and units, time
        scale and NGFF version are kept, and its other attributes.
    affine : numpy.ndarray, optional
        Level 0's voxel-to-world matrix of the space axes. A diagonal one
        with positive entries becomes ``scale`` and ``translation``; any other
        (a rotated NIfTI, say) cannot be expressed in NGFF: its column norms
        become ``scale`` and the matrix is kept in the ``conv3dt_affine``
        attribute.
    attrs : dict, optional
        Provenance, added to the image group's attributes.
    chunks : tuple of int, optional
        Level 0's chunk shape (default at most 64 per axis).
    pyramid : int
        Further levels, each the 2x2x2 mean of the one before.

    Raises
    ------
    ValueError
        For bad ``labels``, ``pyramid`` or ``chunks``.
    VolumeError
        When zarr is missing or the target's directory cannot be written.
    """

    format = "ome-zarr"

    def __init__(
        self,
        path: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        *,
        labels: str | None = None,
        template: VolumeMetadata | None = None,
        affine: np.ndarray | None = None,
        attrs: dict[str, Any] | None = None,
        chunks: tuple[int, ...] | None = None,
        pyramid: int = 0,
    ) -> None:
        self._image = {
            "labels": labels,
            "template": template,
            "affine": affine,
            "attrs": attrs,
            "chunks": chunks,
            "pyramid": pyramid,
        }
        super().__init__(path, shape, dtype, chunks=chunks)

    def _open(self) -> None:
        _import_zarr3()
        target = os.path.abspath(self.path)
        if os.path.exists(target) and not os.path.isdir(target):
            raise VolumeError(f"cannot write {self.path}: it is a file, not an OME-Zarr directory")
        candidate = self._claim_temp_directory()
        self._array = create_ome_zarr(candidate, self.shape, self.dtype, **self._image)[0]

    def _finish(self) -> None:
        if self._image["pyramid"]:
            write_pyramid(self._tmp_dir)
        super()._finish()
