"""Apply a layer to a volume on disk: read a tile, compute it, write it, tile after tile.

The next tile's input is read while the engine computes, and each finished
tile is written behind, so a run goes at the pace of its slowest stage. Tiles
follow the storage: slabs along the slowest axis on disk, visited in file
order, sized by the memory budget (see :mod:`conv3dt.plan`), with HDF5 / Zarr
output chunks that divide the tiles. The output is written under a temporary
name beside the target and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conv3dt import __version__, activations, interrupt
from conv3dt.boundary import axis_pads
from conv3dt.commit import Committer
from conv3dt.dtypes import accumulation_dtype, numpy_dtype
from conv3dt.engine import FUSED_ACTIVATIONS, conv_transpose_region, resolve_engine
from conv3dt.geometry import AxisGeometry
from conv3dt.layer import Conv3DTranspose
from conv3dt.layout import DiskLayout, LayoutError, disk_layout
from conv3dt.plan import DEFAULT_CHUNK_BYTES, Plan, Tile, plan_tiles
from conv3dt.spec import ChannelMismatchError, LayerSpec
from conv3dt.volumes import VolumeReader, create_volume, detect_format, open_volume
from conv3dt.volumes.affine import output_affine

__all__ = [
    "NIFTI_CHANNELS",
    "OUTPUT_DTYPES",
    "SPATIAL_FIRST_FORMATS",
    "FileSetup",
    "Prepared",
    "RunResult",
    "compute_tile",
    "input_storage",
    "naming_input",
    "peak_rss_bytes",
    "prepare",
    "prepare_file",
    "read_tile",
    "read_tile_input",
    "storage_chunks",
    "upsample_file",
    "volume_engine",
    "writer_options",
]

OUTPUT_DTYPES = ("float32", "float16", "float64", "int16", "uint8")
log = logging.getLogger("conv3dt")
# Formats whose arrays are spatial axes first, channels after, whatever the
# layer's data_format: NIfTI (i, j, k, c) and TIFF (z, y, x, c; a page per plane).
SPATIAL_FIRST_FORMATS = ("nifti", "tiff")
# How a NIfTI output stores several channels: a vector image, or a 4th dimension.
NIFTI_CHANNELS = ("vector", "volumes")
_COUPLING_ACTIVATIONS = ("softmax", "log_softmax", "sparsemax", "glu")
# Plan facts a run reports beside its measurements.
_JSON_EXTRAS = ("tile_shape", "expected_peak_bytes", "memory_limit_bytes")
_CHUNKED_FORMATS = ("hdf5", "zarr", "ome-zarr")


@dataclass
class Prepared:
    """Everything decided before the first tile: layouts, geometry, plan, metadata."""

    in_layout: DiskLayout
    out_layout: DiskLayout
    plan: Plan
    affine: np.ndarray | None
    output_dtype: np.dtype

    @property
    def storage_dtype(self) -> np.dtype:
        """The dtype tiles are handed to the output's writer in.

        Integer outputs (NIfTI int16, uint8) go as float32: their writer picks
        the scaling from the whole output's range.
        """
        return np.dtype(np.float32) if self.output_dtype.kind in "iu" else self.output_dtype


@dataclass
class FileSetup:
    """What is decided about one input file and its target before the first tile.

    Attributes
    ----------
    prepared : Prepared
        Layouts, tiles, the output's affine and dtype.
    output_format : str
        The target's format: as given, else the one its extension names.
    attrs : dict of str to str
        Provenance recorded with the output (HDF5 / Zarr attributes, a NIfTI
        extension): the layer's config, the input's absolute path, conv3dt's version.
    chunks : tuple of int or None
        The target's storage chunks in its stored layout, when the tiles are
        written straight into an HDF5 or Zarr target; else None.
    """

    prepared: Prepared
    output_format: str
    attrs: dict[str, str]
    chunks: tuple[int, ...] | None


@dataclass
class RunResult:
    """What one run did, for ``--json`` and logs."""

    input: str
    output: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dtype: str
    seconds: float
    voxels_per_second: float
    peak_memory_bytes: int
    tiles: int
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "input": self.input,
            "output": self.output,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "dtype": self.dtype,
            "seconds": round(self.seconds, 6),
            "voxels_per_second": round(self.voxels_per_second, 1),
            "peak_memory_bytes": self.peak_memory_bytes,
            "tiles": self.tiles,
            **{k: v for k, v in self.extra.items() if k in _JSON_EXTRAS},
        }


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes.

    On Linux the peak of this process's own memory (``VmHWM``): ``ru_maxrss``
    also keeps the peak of the process that started this one, which carries
    over through ``exec``. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on
    other systems).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def _activation_name(layer: Conv3DTranspose) -> str:
    from conv3dt import activations

    name = activations.serialize(layer.activation)
    if isinstance(name, dict):
        config = name.get("config")
        name = config if isinstance(config, str) else name.get("class_name", "")
    return str(name or "").lower()


def _activation_boxes(name: str) -> int:
    """Output-sized arrays an activation holds at once (its temporaries and result)."""
    if name in ("", "linear", "none"):
        return 0
    if name in _COUPLING_ACTIVATIONS:
        # A contiguous copy, the shifted values, their exponentials, the result.
        return 4
    # An elementwise result, and one temporary for the compound ones (gelu, elu...).
    return 2


def prepare(
    spec: LayerSpec,
    shape: tuple[int, ...],
    *,
    spatial_first: bool,
    four_d_as_batch: bool = False,
    input_affine: np.ndarray | None = None,
    output_dtype: str = "float32",
    memory_limit: int | None = None,
    storage_order: str = "C",
    tile_shape: tuple[int, int, int] | None = None,
    output_spatial_first: bool | None = None,
    input_chunks: tuple[int, ...] | None = None,
    input_stream_itemsize: int = 0,
    input_chunk_itemsize: int = 0,
    output_format: str | None = None,
    output_compressed: bool = False,
    output_sequential: bool = False,
    axes: str | None = None,
    output_channels_first: bool = False,
) -> Prepared:
    """Decide layouts, geometry, tiles and the output affine for an input of ``shape``.

    Parameters
    ----------
    spec : LayerSpec
    shape : tuple of int
        The input's stored shape.
    spatial_first, four_d_as_batch : bool
        How the stored axes map to the layer's (see :func:`conv3dt.layout.disk_layout`).
    input_affine : numpy.ndarray, optional
        The input's voxel-to-world matrix, for the output's.
    output_dtype : str
        One of :data:`OUTPUT_DTYPES`.
    memory_limit : int, optional
        The budget for tiles in flight and stream buffers.
    storage_order : {"C", "F"}
        The input's order on disk ("F" for NIfTI): its slowest axis is split
        first and iterated outermost.
    tile_shape : three ints, optional
        Force the tile shape.
    output_spatial_first : bool, optional
        Store the output's spatial axes first (NIfTI); default as the input.
    input_chunks : tuple of int, optional
        The input's storage chunks in its stored layout (HDF5, Zarr).
    input_stream_itemsize : int
        Bytes per stored input value when the input is read as a stream
        (``.nii.gz``), else 0.
    input_chunk_itemsize : int
        Bytes per stored input value when reads decode whole ``input_chunks``
        (compressed HDF5), else 0: the chunks a tile meets count in the budget.
    output_format : str, optional
        The output's format: "hdf5", "zarr" and "ome-zarr" get a chunk shape
        dividing the tiles (:attr:`Plan.chunks`); a compressed NIfTI output is a
        stream.
    output_compressed : bool
        The output is a ``.nii.gz``.
    output_sequential : bool
        The output is written front to back in C order (an ``.npy`` stream on
        standard output): tiles are slabs along the first spatial axis, whole
        along the other two, so that tile order is file order.
    axes : str, optional
        The input's layout labels when its format records them (OME-Zarr:
        ``"czyx"``, ``"bczyx"``...), instead of deciding them from the rank.
    output_channels_first : bool
        Store the output's batch and channel axes before the spatial ones, in
        that order (OME-Zarr, whose axes NGFF orders so).

    Raises
    ------
    ValueError
        (LayoutError, SpecError) when the volume does not fit the layer.
    """
    layer = spec.layer
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(
            f"unsupported output dtype {output_dtype!r}; expected one of {', '.join(OUTPUT_DTYPES)}"
        )
    if axes is not None:
        if len(axes) != len(shape) or 0 in shape:
            raise LayoutError(f"the volume's axes {axes!r} do not fit its shape {shape}")
        in_layout = DiskLayout(axes, tuple(int(v) for v in shape))
    else:
        in_layout = disk_layout(
            shape, layer.data_format, spatial_first=spatial_first, four_d_as_batch=four_d_as_batch
        )
    # --4d-as-batch can read a 4th axis as a batch unless the format names its axes.
    four_d = axes is None and in_layout.axes in ("zyxc", "czyx")
    spec.ensure_built(in_layout.channels, four_d=four_d)
    axes = layer.geometry(in_layout.spatial)
    out_spatial = tuple(g.output_length for g in axes)
    out_first = spatial_first if output_spatial_first is None else output_spatial_first
    out_layout = in_layout.with_sizes(
        out_spatial,  # type: ignore[arg-type]
        layer.filters,
        channels_first=layer.data_format == "channels_first" and not out_first,
    )
    if out_first and out_layout.axes not in ("zyx", "zyxc", "zyxb"):
        # NIfTI output stores spatial axes first, whatever the input's layout.
        labels = (
            "zyx"
            + ("c" if "c" in out_layout.axes else "")
            + ("b" if "b" in out_layout.axes else "")
        )
        if len(labels) > 4:
            raise LayoutError(
                "a batch of multi-channel volumes cannot be written as one NIfTI file"
            )
        out_layout = DiskLayout(labels, tuple(out_layout.size(label) for label in labels))
    if output_channels_first:
        labels = "".join(label for label in "bczyx" if label in out_layout.axes)
        out_layout = DiskLayout(labels, tuple(out_layout.size(label) for label in labels))
    activation = _activation_name(layer)
    if activation == "glu":
        raise ValueError(
            "activation 'glu' halves the channel axis, so the output no longer has `filters` "
            "channels; conv3dt upsample does not support it"
        )
    whole: list[int] = []
    # Spatial axes the activation mixes values along stay whole in every tile:
    # softmax and the like act on the last axis (in channels_first the width),
    # a Softmax layer on the axes it names.
    first_spatial = 2 if layer.data_format == "channels_first" else 1
    for axis in activations.coupled_axes(layer.activation):
        if axis == 0:
            raise ValueError(
                "the activation mixes the volumes of a batch (a Softmax layer over axis 0); "
                "conv3dt upsample computes each volume on its own"
            )
        if first_spatial <= axis < first_spatial + 3:
            whole.append(axis - first_spatial)
    out_dtype = np.dtype(output_dtype)
    # A compressed NIfTI output buffers planes of the stored dtype; integer
    # outputs go to a scratch file instead (their scaling waits for the range).
    stream_out = 0
    if output_format == "nifti" and output_compressed and out_dtype.kind == "f":
        stream_out = out_layout.channels * out_dtype.itemsize
    out_order = {"nifti": "F", "npy": "C", "tiff": "C"}.get(output_format or "")
    split_order = _split_order(
        None if input_chunks is not None else storage_order,
        out_order,
        input_stream=input_stream_itemsize > 0,
        output_stream=stream_out > 0 or output_sequential,
    )
    if output_sequential:
        # Written front to back in C order: every tile spans the later axes whole.
        whole.extend((1, 2))
    compute_itemsize = max(numpy_dtype(layer.compute_dtype).itemsize, 4)
    spatial_chunks = None
    chunk_voxel_bytes = 0
    if input_chunks is not None:
        spatial_chunks = tuple(input_chunks[in_layout.axes.index(a)] for a in "zyx")
        # A tile reads all channels of one volume: whole chunks across the
        # channel axis, and every volume of a batch a chunk holds.
        chunk_voxel_bytes = input_chunk_itemsize
        for label, size, chunk in zip(in_layout.axes, in_layout.shape, input_chunks, strict=True):
            if label == "c":
                chunk_voxel_bytes *= math.ceil(size / chunk) * chunk
            elif label == "b":
                chunk_voxel_bytes *= chunk
    plan = plan_tiles(
        axes,
        in_layout.channels,
        layer.filters,
        itemsize=compute_itemsize,
        memory_limit=memory_limit,
        split_order=split_order,
        whole_axes=whole,
        tile_shape=tile_shape,
        in_chunks=spatial_chunks,
        stream_in_bytes=in_layout.channels * input_stream_itemsize,
        in_chunk_bytes=chunk_voxel_bytes,
        stream_out_bytes=stream_out,
        chunk_bytes=DEFAULT_CHUNK_BYTES if output_format in _CHUNKED_FORMATS else None,
        out_itemsize=out_dtype.itemsize,
        activation_boxes=0 if _fused_activation(layer) else _activation_boxes(activation),
    )
    affine = None
    if input_affine is not None:
        affine = output_affine(
            np.asarray(input_affine, dtype=np.float64),
            tuple(float(g.stride) for g in axes),  # type: ignore[arg-type]
            tuple(g.world_offset() for g in axes),  # type: ignore[arg-type]
        )
    return Prepared(in_layout, out_layout, plan, affine, out_dtype)


@contextmanager
def naming_input(path: str) -> Iterator[None]:
    """Put the input's path in front of errors about how its volume fits the layer.

    :func:`prepare` sees shapes only; its callers know which file they belong to.
    """
    try:
        yield
    except (LayoutError, ChannelMismatchError) as error:
        error.args = (f"{'stdin' if path == '-' else path}: {error}",)
        raise


def _split_order(
    in_order: str | None, out_order: str | None, *, input_stream: bool, output_stream: bool
) -> tuple[int, int, int]:
    """The spatial axes to split first (outermost first) for these storage orders.

    ``in_order`` and ``out_order`` are "C", "F" or None (chunked or unknown
    storage, where any tile shape reads or writes whole chunks). A stream must
    be visited in its file order, the input's first. Raw files whose orders
    disagree (a C-order ``.npy`` to a Fortran-order ``.nii``) get slabs along
    the middle axis: the other two then stay whole, so every tile reads and
    writes long contiguous runs in both files, where slabs along either file's
    slowest axis would cut the other file into runs of a few voxels.
    """
    slowest_first = {"C": (0, 1, 2), "F": (2, 1, 0)}
    if input_stream or out_order is None or out_order == in_order:
        return slowest_first[in_order or "C"]
    if output_stream or in_order is None:
        return slowest_first[out_order]
    first, _, last = slowest_first[in_order]
    return (1, first, last)


def storage_chunks(layout: DiskLayout, spatial: tuple[int, int, int]) -> tuple[int, ...]:
    """The chunk shape, in ``layout``'s stored axis order, of chunks ``spatial`` (z, y, x) in size.

    A chunk holds one volume of a batch and all its channels, as a tile does,
    so a tile's box covers whole chunks when the spatial lengths divide it.
    """
    return tuple(
        1 if label == "b" else layout.size(label) if label == "c" else spatial["zyx".index(label)]
        for label in layout.axes
    )


def prepare_file(
    spec: LayerSpec,
    source: VolumeReader,
    output_path: str,
    *,
    output_format: str | None = None,
    output_dtype: str = "float32",
    memory_limit: int | None = None,
    four_d_as_batch: bool = False,
    tile_shape: tuple[int, int, int] | None = None,
    scratch: bool = False,
) -> FileSetup:
    """Make the per-file decisions for writing ``source`` through the layer to ``output_path``.

    The one place where a file's run is set up, so that a serial run and a
    cluster's tiles agree: the axes' layout (a NIfTI input or target stores
    spatial axes first), the tiles (following the input's storage order,
    chunks and stream), the output's affine (the identity's when a NIfTI
    target has none to derive it from), dtype, storage chunks and provenance.
    Draws the spec's weights if it has none (see :meth:`LayerSpec.ensure_built`).

    Parameters
    ----------
    spec : LayerSpec
    source : VolumeReader
        The open input.
    output_path : str
        The target (``-`` for an .npy stream on standard output).
    output_format : str, optional
        The target's format; default from ``output_path``'s extension.
    output_dtype : str
        One of :data:`OUTPUT_DTYPES`.
    memory_limit : int, optional
        The budget for tiles in flight and stream buffers.
    four_d_as_batch : bool
        Treat a NIfTI 4th dimension as a batch of single-channel volumes.
    tile_shape : three ints, optional
        Force the tile shape.
    scratch : bool
        The tiles go to a scratch volume rather than straight into the target
        (as on a cluster): the target's chunks and stream buffers then shape
        neither the tiles nor :attr:`FileSetup.chunks`.

    Returns
    -------
    FileSetup

    Raises
    ------
    VolumeError
        When ``output_format`` is None and the extension names no format.
    ValueError
        (LayoutError, SpecError) when the volume does not fit the layer, naming
        ``source``'s path; or for an unsupported ``output_dtype``.
    """
    target_format = output_format or detect_format(output_path)
    spatial_first = source.format in SPATIAL_FIRST_FORMATS
    target_is_nifti = target_format == "nifti"
    target_is_ngff = target_format == "ome-zarr"
    affine = source.metadata.affine if source.metadata is not None else None
    if affine is None and (target_is_nifti or target_is_ngff):
        affine = np.eye(4)
    with naming_input(source.path):
        prepared = prepare(
            spec,
            tuple(source.shape),
            spatial_first=spatial_first,
            four_d_as_batch=four_d_as_batch,
            input_affine=affine,
            output_dtype=output_dtype,
            memory_limit=memory_limit,
            tile_shape=tile_shape,
            output_spatial_first=target_format in SPATIAL_FIRST_FORMATS
            or (spatial_first and not target_is_ngff),
            output_channels_first=target_is_ngff,
            output_format=None if scratch else target_format,
            output_compressed=output_path.lower().endswith(".gz"),
            output_sequential=output_path == "-" and not scratch,
            **input_storage(source),
        )
    chunks = None
    if prepared.plan.chunks is not None and output_path != "-":
        chunks = storage_chunks(prepared.out_layout, prepared.plan.chunks)
    attrs = {
        "conv3dt_layer": json.dumps(spec.layer.get_config()),
        "conv3dt_source": os.path.abspath(source.path) if source.path != "-" else "-",
        "conv3dt_version": __version__,
    }
    return FileSetup(prepared, target_format, attrs, chunks)


def read_tile_input(
    source: VolumeReader, layout: DiskLayout, sample: int, tile: Tile
) -> np.ndarray:
    """The input box one tile needs, read from disk, in ``(batch, z, y, x, channels)`` order.

    ``layout`` is the input's stored layout and ``sample`` the volume of a batch.
    """
    return layout.to_canonical(source.read(layout.box(sample, tile.in_start, tile.in_stop)))


def read_tile(
    source: VolumeReader,
    layout: DiskLayout,
    sample: int,
    tile: Tile,
    axes: tuple[AxisGeometry, ...],
    boundary: str = "zeros",
) -> tuple[np.ndarray, Tile]:
    """The input box one tile needs under ``boundary``, and the tile to compute it as.

    Under ``"zeros"`` this is :func:`read_tile_input` and ``tile`` itself. Under
    the other modes (:mod:`conv3dt.boundary`) a tile at the volume's edge also
    needs the padding beyond it: the voxels the mode copies there are read
    and placed, and the returned tile is in the padded volume's coordinates,
    as the whole-volume call computes it, so the tile's values equal the same
    box of the untiled result bit for bit.
    """
    pads = axis_pads(axes, boundary)
    if pads is None:
        return read_tile_input(source, layout, sample, tile), tile
    spans = [
        pad.span(g, a, b)
        for pad, g, a, b in zip(pads, axes, tile.out_start, tile.out_stop, strict=True)
    ]
    sources = [pad.source[start:stop] for pad, (start, stop) in zip(pads, spans, strict=True)]
    first = tuple(int(s.min()) if s.size else 0 for s in sources)
    last = tuple(int(s.max()) + 1 if s.size else 0 for s in sources)
    x = layout.to_canonical(source.read(layout.box(sample, first, last)))
    for axis, (indices, start) in enumerate(zip(sources, first, strict=True), start=1):
        # Away from the edges the box is read as it stands: no copy to make.
        if not np.array_equal(indices, np.arange(start, start + indices.size)):
            x = np.take(x, indices - start, axis=axis)
    padded = Tile(
        out_start=tuple(  # type: ignore[arg-type]
            o + p.left * g.stride for o, p, g in zip(tile.out_start, pads, axes, strict=True)
        ),
        out_stop=tuple(  # type: ignore[arg-type]
            o + p.left * g.stride for o, p, g in zip(tile.out_stop, pads, axes, strict=True)
        ),
        in_start=tuple(a for a, _ in spans),  # type: ignore[arg-type]
        in_stop=tuple(b for _, b in spans),  # type: ignore[arg-type]
    )
    return x, padded


def volume_engine(
    layer: Conv3DTranspose, axes: tuple[AxisGeometry, ...], batch: int, engine: str
) -> str:
    """The engine every tile of one volume is computed with (``engine`` resolved).

    ``"auto"`` is resolved here, once per volume, from the volume's size: the
    tiles of a volume must share one engine to equal the untiled result.
    """
    assert layer.kernel is not None
    voxels = batch * math.prod(g.input_length for g in axes)
    kernel = layer.operands(np.zeros(0, dtype=np.float32))[1]
    return resolve_engine(
        engine, kernel.shape, layer.strides, layer.dilation_rate, voxels, kernel=kernel
    )


def compute_tile(
    layer: Conv3DTranspose,
    axes: tuple[AxisGeometry, ...],
    x: np.ndarray,
    tile: Tile,
    engine: str = "auto",
    buffers: TileBuffers | None = None,
) -> np.ndarray:
    """One tile of ``layer``'s output, ``(batch, z, y, x, filters)``, from its input box.

    ``x`` is the input box in ``(batch, z, y, x, channels)`` order and ``axes``
    the volume's geometry. The result equals the same box of
    ``layer(whole_input)`` exactly. With ``buffers``, the engine writes into
    the next of them rather than into a new array.
    """
    assert layer.kernel is not None
    compute = numpy_dtype(layer.compute_dtype)
    work = accumulation_dtype(compute)
    bias = layer.bias if layer.use_bias and layer.bias is not None else None
    region = (
        *layer.operands(x),
        layer.strides,
        layer.dilation_rate,
        tile.in_start,
        tuple(a + g.crop_left for a, g in zip(tile.out_start, axes, strict=True)),
        tile.out_shape,
        work,
    )
    fused = _fused_activation(layer)
    out = None
    if buffers is not None:
        out = buffers.take((x.shape[0], *tile.out_shape, layer.filters), work)
    if fused is not None:
        # The engine adds the bias and applies the activation as it writes each
        # voxel: layer.finish's arithmetic without further sweeps over the tile.
        return conv_transpose_region(
            *region,
            engine=engine,
            bias=None if bias is None else bias.astype(work, copy=False),
            activation=fused,
            out=out,
        )
    conv = conv_transpose_region(*region, engine=engine, out=out).astype(compute, copy=False)
    # What layer.finish does (bias, then activation in the compute dtype), with
    # the bias added in place: the same arithmetic without a second
    # output-sized buffer to allocate and fault in for every tile.
    if bias is not None:
        np.add(conv, bias.astype(conv.dtype), out=conv)
    if layer.activation is None:
        return conv
    # An activation layer's output is in its own compute dtype, as in layer.finish.
    dtype = activations.output_dtype(layer.activation, conv.dtype)
    if layer.data_format == "channels_first":
        moved = np.moveaxis(conv, -1, 1)
        if activations.coupled_axes(layer.activation):
            # Reductions must run over the layout of the whole-volume call:
            # NumPy's summation order follows the layout.
            moved = np.ascontiguousarray(moved)
        activated = np.asarray(layer.activation(moved)).astype(dtype, copy=False)
        return np.moveaxis(activated, 1, -1)
    return np.asarray(layer.activation(conv)).astype(dtype, copy=False)


class TileBuffers:
    """Output buffers used in turn by consecutive tiles, instead of a new array each.

    A new array's pages are zeroed by the kernel on first touch, which costs as
    much as computing an upsampling layer's output. With ``count`` buffers, a
    tile may be in use (being written) until ``count - 1`` more were taken.
    Each grows to the largest tile asked of it.
    """

    def __init__(self, count: int = 2) -> None:
        self._bases: list[np.ndarray | None] = [None] * count
        self._next = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The next buffer: a C-contiguous array of ``shape`` and ``dtype``, any contents."""
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        base = self._bases[self._next]
        if base is None or base.nbytes < size:
            base = np.empty(size, dtype=np.uint8)
            self._bases[self._next] = base
        self._next = (self._next + 1) % len(self._bases)
        return base[:size].view(dtype).reshape(shape)


def _fused_activation(layer: Conv3DTranspose) -> str | None:
    """The name the engines fuse ``layer``'s activation under, or None if they cannot.

    They cannot for a compute dtype narrower than float32 (the sum is then in
    float32, and bias and activation in the compute dtype).
    """
    from conv3dt import activations

    if numpy_dtype(layer.compute_dtype).itemsize < 4:
        return None
    if layer.activation is None:
        return "linear"
    for name in FUSED_ACTIVATIONS:
        if layer.activation is getattr(activations, name):
            return name
    return None


def writer_options(prepared: Prepared, nifti_channels: str = "vector") -> dict[str, Any]:
    """How the output's metadata follows the layer, as keyword arguments of ``create_volume``.

    ``strides`` (the voxel sizes a format records divide by them) and
    ``nifti_vector``: a NIfTI output's several channels are stored as a vector
    image unless ``nifti_channels`` is "volumes" (a 4th dimension, as a series).

    Raises
    ------
    ValueError
        When ``nifti_channels`` is neither "vector" nor "volumes".
    """
    if nifti_channels not in NIFTI_CHANNELS:
        raise ValueError(
            f"`nifti_channels` must be one of {NIFTI_CHANNELS}. "
            f"Received nifti_channels={nifti_channels!r}"
        )
    layout = prepared.out_layout
    return {
        "strides": tuple(float(g.stride) for g in prepared.plan.axes),
        "nifti_vector": nifti_channels == "vector" and "c" in layout.axes and layout.channels > 1,
    }


def _newly_infinite(values: np.ndarray, cast: np.ndarray) -> int:
    """How many finite ``values`` became infinite in ``cast`` (a narrower float)."""
    return int(np.count_nonzero(np.isinf(cast))) - int(np.count_nonzero(np.isinf(values)))


def input_storage(reader: VolumeReader) -> dict[str, Any]:
    """How an open input is stored, as keyword arguments of :func:`prepare`.

    ``storage_order`` ("F" for NIfTI, else "C"), ``input_chunks`` (HDF5 / Zarr
    chunk shape, or None), ``input_stream_itemsize`` (``.nii.gz``: bytes per
    stored value, read as a stream; else 0), ``input_chunk_itemsize``
    (compressed HDF5: bytes per stored value of chunks decoded whole; else 0)
    and ``axes`` (the layout labels an
    OME-Zarr image's metadata gives, else None).
    """
    chunks = getattr(reader, "chunks", None)
    return {
        "storage_order": "F" if reader.format == "nifti" else "C",
        "input_chunks": tuple(int(c) for c in chunks) if chunks else None,
        "input_stream_itemsize": int(getattr(reader, "stream_itemsize", 0)),
        "input_chunk_itemsize": int(getattr(reader, "chunk_itemsize", 0)),
        "axes": getattr(reader, "layout_axes", None),
    }


@contextmanager
def _finished_by(writer: Any, committer: Committer | None) -> Iterator[None]:
    """The writer's block: on an error it is aborted, unless ``committer`` took it over.

    A writer handed to the committer is committed (or aborted by its own
    failing commit) on the committer's thread; aborting it here as well would
    race that commit.
    """
    try:
        yield
    except BaseException:
        if committer is None or not committer.owns(writer):
            writer.abort()
        raise


def upsample_file(
    spec: LayerSpec,
    input_path: str,
    output_path: str,
    *,
    input_format: str | None = None,
    output_format: str | None = None,
    output_dtype: str = "float32",
    memory_limit: int | None = None,
    four_d_as_batch: bool = False,
    compression: str | None = None,
    engine: str = "auto",
    tile_shape: tuple[int, int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = True,
    nifti_channels: str = "vector",
    level: int | None = None,
    pyramid: int = 0,
    committer: Committer | None = None,
    commit_key: Any = None,
) -> RunResult:
    """Apply the spec's layer to one volume file and write the result atomically.

    Tiles are read, computed and written one after another, the next tile's
    read and the previous tile's write overlapping the computation; memory
    stays near the plan's ``peak_bytes`` whatever the volume's size.

    Parameters
    ----------
    spec : LayerSpec
    input_path, output_path : str
        Paths (``-`` for an .npy stream on stdin / stdout, which is held whole
        in memory); HDF5 paths may end in ``:/group/dataset``.
    input_format, output_format : str, optional
        One of :data:`conv3dt.volumes.FORMATS`; default from the extension.
    output_dtype : str
        One of :data:`OUTPUT_DTYPES`.
    memory_limit : int, optional
        Bytes the tiles in flight and stream buffers may use (default
        :func:`conv3dt.plan.default_memory_limit`).
    four_d_as_batch : bool
        Treat a NIfTI 4th dimension as a batch of single-channel volumes.
    compression : {None, "gzip", "lzf"}
        HDF5 output compression.
    engine : str
        Force an engine (see :data:`conv3dt.engine.ENGINES`).
    tile_shape : three ints, optional
        Force the output tile shape (tests, benchmarks).
    progress : callable, optional
        Called as ``progress(done_voxels, total_voxels)`` after each tile.
    overwrite : bool
        Whether the finished output may replace an existing file. When False,
        a target that exists when the output is complete (another process
        wrote it meanwhile) is left as it is and
        :class:`conv3dt.volumes.OutputExistsError` is raised.
    nifti_channels : {"vector", "volumes"}
        How a NIfTI output stores several channels (see :func:`writer_options`).
    level : int, optional
        The level of an OME-Zarr input to read (default 0).
    pyramid : int
        Downsampled levels an OME-Zarr output gets after level 0.
    committer : Committer, optional
        Finish the output (``fsync``, rename) on the committer's background
        thread, so that the caller can start its next file meanwhile (batches).
        The output is then complete only once the committer reports it settled,
        under ``commit_key``; until then ``overwrite=False`` conflicts and
        write errors of the finish are the committer's to report. Without it
        (and always for ``-``) the output is complete when this returns.
    commit_key : object, optional
        What the committer reports the commit's outcome with.

    Returns
    -------
    RunResult
        ``seconds`` counts until the output was handed to ``committer`` when
        one is given.
    """
    started = time.perf_counter()
    layer = spec.layer
    with open_volume(input_path, input_format, level=level) as source:
        setup = prepare_file(
            spec,
            source,
            output_path,
            output_format=output_format,
            output_dtype=output_dtype,
            memory_limit=memory_limit,
            four_d_as_batch=four_d_as_batch,
            tile_shape=tile_shape,
        )
        prepared = setup.prepared
        plan = prepared.plan
        in_layout, out_layout = prepared.in_layout, prepared.out_layout
        writer = create_volume(
            output_path,
            out_layout.shape,
            prepared.output_dtype,
            output_format,
            template=source.metadata,
            affine=prepared.affine,
            attrs=setup.attrs,
            compression=compression,
            chunks=setup.chunks,
            overwrite=overwrite,
            axes=out_layout.axes,
            pyramid=pyramid,
            **writer_options(prepared, nifti_channels),
        )
        # Stream buffers as large as the plan counted them, so they hold exactly
        # the planes neighbouring tiles share and nothing more.
        if hasattr(source, "window_limit"):
            source.window_limit = plan.in_window_bytes // max(1, in_layout.channels)
        if plan.in_chunk_cache_bytes:
            # The decoded chunks a tile meets stay for the next tile that needs them.
            source.chunk_cache_bytes = plan.in_chunk_cache_bytes
        if hasattr(writer, "buffer_limit"):
            writer.buffer_limit = plan.out_window_bytes
        total = in_layout.batch * int(np.prod(plan.output_shape))
        done = 0
        engine = volume_engine(layer, plan.axes, in_layout.batch, engine)
        # A tile is computed while the one before it is written.
        buffers = TileBuffers(2)
        overflowed = 0  # finite values too large for a float16 output
        with _finished_by(writer, committer), ThreadPoolExecutor(max_workers=2) as pool:
            # The batch outermost: a NIfTI 4th axis is the slowest on disk.
            jobs = [(b, tile) for b in range(in_layout.batch) for tile in plan]

            def read(job: tuple[int, Tile]) -> tuple[np.ndarray, Tile]:
                sample, tile = job
                return read_tile(source, in_layout, sample, tile, plan.axes, spec.boundary)

            pending_read: Future | None = pool.submit(read, jobs[0]) if jobs else None
            pending_write: Future | None = None
            for index, (sample, tile) in enumerate(jobs):
                interrupt.check()
                assert pending_read is not None
                x, compute_as = pending_read.result()
                pending_read = pool.submit(read, jobs[index + 1]) if index + 1 < len(jobs) else None
                y = compute_tile(layer, plan.axes, x, compute_as, engine=engine, buffers=buffers)
                del x
                # NumPy's own overflow warning would say "cast"; it is counted and
                # reported once, in plain words, at the end.
                with np.errstate(over="ignore"):
                    cast = y.astype(prepared.storage_dtype, copy=False)
                if cast.dtype == np.float16:
                    overflowed += _newly_infinite(y, cast)
                stored = out_layout.from_canonical(cast)
                del y, cast
                if pending_write is not None:
                    pending_write.result()
                box = out_layout.box(sample, tile.out_start, tile.out_stop)
                pending_write = pool.submit(writer.write, box, stored)
                del stored
                done += int(np.prod(tile.out_shape))
                if progress is not None:
                    progress(done, total)
            if pending_write is not None:
                pending_write.result()
            # A stop requested during the last tile (and swallowed where it was
            # raised) leaves nothing behind rather than a finished output.
            interrupt.check()
            # A damaged .nii.gz shows only at its end: nothing is kept from it.
            source.verify()
            if committer is None or output_path == "-":
                writer.commit()
            else:
                committer.commit(writer, commit_key)
        if overflowed:
            log.warning(
                "%s: %d voxels exceeded float16's range (±65504) and were stored as inf",
                output_path,
                overflowed,
            )
        input_shape = tuple(source.shape)
    seconds = time.perf_counter() - started
    return RunResult(
        input=input_path,
        output=output_path,
        input_shape=input_shape,
        output_shape=out_layout.shape,
        dtype=str(prepared.output_dtype),
        seconds=seconds,
        voxels_per_second=total / seconds if seconds > 0 else float("inf"),
        peak_memory_bytes=peak_rss_bytes(),
        tiles=len(plan) * in_layout.batch,
        extra={
            "tile_shape": list(plan.tile_shape),
            "expected_peak_bytes": plan.peak_bytes,
            "memory_limit_bytes": plan.memory_limit,
        },
    )
