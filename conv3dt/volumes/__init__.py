"""Volumes on disk: open one to read boxes, create one to write boxes.

Formats are chosen from the file name unless given: ``.npy`` (``"npy"``),
``.nii`` / ``.nii.gz`` (``"nifti"``), ``.h5`` / ``.hdf5`` (``"hdf5"``, with
``file.h5:/group/dataset`` naming a dataset), ``.zarr`` (``"zarr"``, a directory;
needs the optional zarr package), ``.ome.zarr`` (``"ome-zarr"``, an OME-Zarr
image; zarr too), ``.tif`` / ``.tiff`` / ``.ome.tif`` (``"tiff"``; needs the
optional tifffile package). The path ``"-"`` is a ``.npy``
stream on standard input (reading) or standard output (writing).
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from conv3dt.volumes.base import (
    Box,
    OutputExistsError,
    VolumeError,
    VolumeMetadata,
    VolumeReader,
    VolumeWriteError,
    VolumeWriter,
)
from conv3dt.volumes.hdf5 import VOXEL_SIZE_ATTRS, Hdf5Reader, Hdf5Writer, split_hdf5_path
from conv3dt.volumes.nifti import NIFTI_DTYPES, NiftiReader, NiftiWriter, header_summary
from conv3dt.volumes.npy import NpyReader, NpyStreamReader, NpyStreamWriter, NpyWriter
from conv3dt.volumes.ome_zarr import OmeZarrReader, OmeZarrWriter
from conv3dt.volumes.tiff import TIFF_EXTENSIONS, TiffReader, TiffWriter, tiff_dtypes
from conv3dt.volumes.zarr import ZarrReader, ZarrWriter

__all__ = [
    "FORMATS",
    "Box",
    "OutputExistsError",
    "VolumeError",
    "VolumeMetadata",
    "VolumeReader",
    "VolumeWriteError",
    "VolumeWriter",
    "axis_labels",
    "create_volume",
    "describe",
    "detect_format",
    "open_volume",
]

FORMATS = ("npy", "hdf5", "nifti", "zarr", "ome-zarr", "tiff")
_EXTENSIONS = {
    ".npy": "npy",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".zarr": "zarr",
    ".ome.zarr": "ome-zarr",
    **dict.fromkeys(TIFF_EXTENSIONS, "tiff"),
}
_FLOAT_DTYPES = tuple(np.dtype(t) for t in ("float32", "float16", "float64"))


def detect_format(path: str) -> str:
    """The format a path's extension names (HDF5 paths may carry ``:/dataset``).

    Raises
    ------
    VolumeError
        When the extension is none of ``.npy``, ``.nii``, ``.nii.gz``, ``.h5``, ``.hdf5``.
    """
    if path == "-":
        return "npy"
    lowered = path.lower().rstrip("/")
    for extension in sorted(_EXTENSIONS, key=len, reverse=True):
        if lowered.endswith(extension):
            return _EXTENSIONS[extension]
    file_path, dataset = split_hdf5_path(path)
    if dataset is not None and file_path.lower().endswith((".h5", ".hdf5")):
        return "hdf5"
    raise VolumeError(
        f"{path}: unknown volume format; supported extensions are {', '.join(_EXTENSIONS)} "
        "(or give the format explicitly)"
    )


def _check_format(format: str | None, path: str) -> str:
    if format is None:
        return detect_format(path)
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}. Received format={format!r}")
    if path == "-" and format != "npy":
        raise ValueError(f"`format` must be 'npy' for the path '-'. Received format={format!r}")
    return format


def open_volume(path: str, format: str | None = None, *, level: int | None = None) -> VolumeReader:
    """Open a volume for reading boxes.

    Parameters
    ----------
    path : str
        A file path; ``file.h5:/group/dataset`` for an HDF5 dataset; ``"-"`` for a
        ``.npy`` stream on standard input (read fully into memory).
    format : {"npy", "hdf5", "nifti", "zarr", "ome-zarr"}, optional
        Overrides the format the extension names.
    level : int, optional
        The level of an OME-Zarr multiscale image to read (default 0, the
        full resolution); refused for other formats.

    Returns
    -------
    VolumeReader
        Use as a context manager, or call ``close()``.

    Raises
    ------
    VolumeError
        When the format is unknown or the file is missing, truncated or corrupt;
        for an HDF5 file with several datasets and none named, the message lists them.
    """
    format = _check_format(format, path)
    if format == "ome-zarr":
        return OmeZarrReader(path, level)
    if level is not None:
        raise ValueError(
            f"`level` applies to OME-Zarr images only. Received level={level!r} for {format} input"
        )
    if path == "-":
        return NpyStreamReader()
    if format == "npy":
        return NpyReader(path)
    if format == "hdf5":
        return Hdf5Reader(path)
    if format == "zarr":
        return ZarrReader(path)
    if format == "tiff":
        return TiffReader(path)
    return NiftiReader(path)


def _check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    message = f"`shape` must be a tuple of ints >= 0. Received shape={shape!r}"
    try:
        values = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if any(v < 0 for v in values) or values != tuple(shape):
        raise ValueError(message)
    return values


def create_volume(
    path: str,
    shape: tuple[int, ...],
    dtype: Any,
    format: str | None = None,
    *,
    template: VolumeMetadata | None = None,
    affine: np.ndarray | None = None,
    attrs: dict[str, Any] | None = None,
    compression: str | None = None,
    chunks: tuple[int, ...] | None = None,
    value_range: tuple[float, float] | None = None,
    overwrite: bool = True,
    strides: tuple[float, float, float] | None = None,
    nifti_vector: bool = False,
    axes: str | None = None,
    pyramid: int = 0,
) -> VolumeWriter:
    """Create a volume to be written box by box, under a temporary name until commit.

    The temporary file ``.{name}.conv3dt-tmp-HOST-PID-RANDOM`` sits beside the
    target (those of writers on this host that died are removed first);
    ``commit()`` renames it onto the target, ``abort()`` removes it. As a
    context manager the writer commits at the end of the block and aborts if
    the block raises.

    Parameters
    ----------
    path : str
        The target; ``file.h5:/group/dataset`` names the HDF5 dataset (default
        ``/data``); ``"-"`` writes a ``.npy`` stream to standard output at commit.
    shape : tuple of int
        The array shape on disk (NIfTI: ``(i, j, k)`` or ``(i, j, k, c)``).
    dtype : dtype-like
        float32, float16 or float64; NIfTI also int16 and uint8 (stored with
        ``scl_slope`` / ``scl_inter``), and no float16.
    format : {"npy", "hdf5", "nifti", "zarr", "ome-zarr"}, optional
        Overrides the format the extension names.
    template : VolumeMetadata, optional
        The input's metadata: NIfTI copies its header, HDF5 its attributes,
        OME-Zarr an OME-Zarr input's axes (names, units, time step), NGFF
        version and other attributes.
    affine : numpy.ndarray, optional
        The output's 4x4 voxel-to-world matrix (NIfTI qform and sform, HDF5
        ``affine`` attribute, OME-Zarr ``scale`` and ``translation``). Without
        it a template's affine is kept as is.
    attrs : dict, optional
        Provenance to record: HDF5 dataset attributes, a JSON comment extension
        in NIfTI; ``.npy`` has no place for metadata and drops it (and the affine).
    compression : {None, "gzip", "lzf"}
        HDF5 only.
    chunks : tuple of int, optional
        HDF5 and Zarr only; None lets h5py choose (Zarr: at most 64 per axis).
    value_range : (float, float), optional
        Integer NIfTI only (ignored otherwise): the data range, to choose the
        scaling before any box arrives; without it the data is buffered in
        memory until commit.
    overwrite : bool
        Whether ``commit()`` may replace an existing target. When False, the
        existence check and the rename are one atomic step: a target that
        exists at commit (made meanwhile by another process, say) is left as
        it is and ``commit()`` raises :class:`OutputExistsError`.
    axes : str, optional
        OME-Zarr only: the stored axes' layout labels (``b`` written as the
        time axis, ``c``, then ``z``, ``y``, ``x``), e.g. ``"czyx"``; default
        from the rank (3: ``zyx``, 4: ``czyx``, 5: ``bczyx``).
    pyramid : int
        OME-Zarr only: downsampled levels to add after level 0, each the 2x2x2
        mean of the one before.
    strides : three floats, optional
        Output voxels per input voxel along the spatial axes (stored order):
        the voxel sizes the template records (NIfTI ``pixdim``, HDF5
        ``element_size_um`` / ``resolution`` / ``spacing``) are divided by them.
    nifti_vector : bool
        NIfTI only: the 4th axis is channels, stored as the components of a
        vector image (5D, ``dim[4] = 1``, intent ``NIFTI_INTENT_VECTOR``)
        rather than as a 4th dimension that tools read as time.

    Returns
    -------
    VolumeWriter

    Raises
    ------
    ValueError
        For a bad argument (the message names it).
    VolumeError
        When the format cannot store the dtype, or the target's directory is
        missing or not writable.
    """
    format = _check_format(format, path)
    shape = _check_shape(shape)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"`dtype` is not a NumPy dtype. Received dtype={dtype!r}") from None
    allowed = {"nifti": NIFTI_DTYPES, "tiff": tiff_dtypes(path)}.get(format, _FLOAT_DTYPES)
    # TIFF's own message says which kind of TIFF stores the dtype.
    if dtype not in allowed and format != "tiff":
        raise VolumeError(
            f"{path}: {format} output cannot be written as dtype={dtype}; "
            f"expected one of {', '.join(str(d) for d in allowed)}"
        )
    if (compression is not None and format != "hdf5") or (
        chunks is not None and format not in ("hdf5", "zarr", "ome-zarr")
    ):
        raise ValueError(
            f"`compression` applies to HDF5 only and `chunks` to HDF5 and Zarr. Received "
            f"compression={compression!r}, chunks={chunks!r} for {format} output"
        )
    if pyramid and format != "ome-zarr":
        raise ValueError(
            f"`pyramid` applies to OME-Zarr output only. Received pyramid={pyramid!r} "
            f"for {format} output"
        )
    if template is None:
        template = VolumeMetadata()
    if path == "-":
        return NpyStreamWriter(shape, dtype)
    if format == "ome-zarr":
        writer: VolumeWriter = OmeZarrWriter(
            path,
            shape,
            dtype,
            labels=axes,
            template=template,
            affine=affine,
            attrs=attrs,
            chunks=chunks,
            pyramid=pyramid,
        )
        writer.overwrite = overwrite
        return writer
    writer = _create_writer(
        path,
        shape,
        dtype,
        format,
        template,
        affine,
        attrs,
        compression,
        chunks,
        value_range,
        strides=strides,
        nifti_vector=nifti_vector,
    )
    writer.overwrite = overwrite
    return writer


def _create_writer(
    path: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    format: str,
    template: VolumeMetadata,
    affine: np.ndarray | None,
    attrs: dict[str, Any] | None,
    compression: str | None,
    chunks: tuple[int, ...] | None,
    value_range: tuple[float, float] | None,
    *,
    strides: tuple[float, float, float] | None = None,
    nifti_vector: bool = False,
) -> VolumeWriter:
    if format == "npy":
        return NpyWriter(path, shape, dtype)
    if format == "tiff":
        return TiffWriter(path, shape, dtype, template=template, attrs=attrs, strides=strides)
    if format == "hdf5":
        return Hdf5Writer(
            path,
            shape,
            dtype,
            template_attrs=template.attrs,
            affine=affine,
            attrs=attrs,
            chunks=chunks,
            compression=compression,
            strides=strides,
        )
    if format == "zarr":
        return ZarrWriter(
            path,
            shape,
            dtype,
            template_attrs=template.attrs,
            affine=affine,
            attrs=attrs,
            chunks=chunks,
        )
    return NiftiWriter(
        path,
        shape,
        dtype,
        template_header=template.nifti_header,
        affine=affine,
        attrs=attrs,
        value_range=value_range,
        strides=strides,
        vector=nifti_vector,
    )


def describe(reader: VolumeReader) -> dict[str, Any]:
    """A JSON-ready summary of an open volume, for ``conv3dt info``.

    Returns
    -------
    dict
        ``path``, ``format``, ``shape`` (list), ``dtype`` (what reads return),
        ``voxel_size`` (list or None), ``affine`` (nested lists or None) and, by
        format: ``stored_dtype``, ``scaling`` (``{"slope", "inter"}`` or None
        when unscaled) and ``axis_codes`` (e.g. ``["R", "A", "S"]``) for NIfTI;
        ``dataset`` and ``datasets`` (every dataset in the file) for HDF5.
        Every format: ``axis_labels`` (one per array axis, see
        :func:`axis_labels`) and ``channels``; NIfTI adds ``nifti`` (see
        :func:`conv3dt.volumes.nifti.header_summary`), HDF5 ``voxel_size_attrs``
        (the voxel-size attributes present), TIFF ``tiff`` (``kind``: imagej, ome
        or tiff; the series' axes as tifffile names them; the voxel size's unit),
        OME-Zarr ``ngff_version``, ``axes`` (NGFF name, type, unit), ``level``
        (the one read) and ``levels``.
    """
    metadata = reader.metadata
    info: dict[str, Any] = {
        "path": reader.path,
        "format": reader.format,
        "shape": list(reader.shape),
        "dtype": str(reader.dtype),
        "voxel_size": None if metadata.voxel_size is None else list(metadata.voxel_size),
        "affine": None if metadata.affine is None else metadata.affine.tolist(),
    }
    if isinstance(reader, NiftiReader):
        slope, inter = reader.scaling
        info["stored_dtype"] = str(reader.stored_dtype)
        identity = (slope, inter) == (1.0, 0.0)
        info["scaling"] = None if identity else {"slope": slope, "inter": inter}
        info["axis_codes"] = list(nib.aff2axcodes(metadata.affine))
        info["nifti"] = header_summary(metadata.nifti_header)
    if isinstance(reader, Hdf5Reader):
        info["dataset"] = metadata.dataset
        info["datasets"] = list(reader.datasets)
        info["voxel_size_attrs"] = {
            name: np.asarray(metadata.attrs[name]).tolist()
            for name in VOXEL_SIZE_ATTRS
            if name in metadata.attrs
        }
    if isinstance(reader, OmeZarrReader):
        info["ngff_version"] = reader.metadata.version
        info["axes"] = [axis.as_json() for axis in reader.metadata.axes]
        info["level"] = reader.metadata.level
        info["levels"] = reader.metadata.levels
    if isinstance(reader, TiffReader):
        info["tiff"] = {"kind": reader.kind, "series_axes": reader.axes, "unit": reader.unit}
    info["axis_labels"] = axis_labels(reader)
    info["channels"] = _channels(tuple(reader.shape), info["axis_labels"])
    return info


def axis_labels(reader: VolumeReader) -> list[str]:
    """Which array axis is which, one label per axis of ``reader.shape``.

    NIfTI: ``i``, ``j``, ``k`` (the header's first three dimensions, first index
    fastest on disk), then ``c`` (channels, or a series read with
    ``--4d-as-batch``). OME-Zarr: the NGFF axis names. Other formats are C
    ordered: ``z``, ``y``, ``x`` (the last axis fastest on disk), a 4D array's
    channels last (``c``; a ``channels_first`` layer reads them first) and a 5D
    array's batch first (``b``).
    """
    ndim = len(reader.shape)
    if reader.format == "nifti":
        return ["i", "j", "k", "c", "u", "v", "w"][:ndim]
    names = [getattr(axis, "name", None) for axis in getattr(reader.metadata, "axes", ())]
    if names and len(names) == ndim and all(isinstance(n, str) for n in names):
        return names
    return {3: ["z", "y", "x"], 4: ["z", "y", "x", "c"], 5: ["b", "z", "y", "x", "c"]}.get(
        ndim, [f"axis{a}" for a in range(ndim)]
    )


def _channels(shape: tuple[int, ...], labels: list[str]) -> int:
    """Channels per voxel as the labels read the array (1 without a channel axis)."""
    return int(shape[labels.index("c")]) if "c" in labels else 1
