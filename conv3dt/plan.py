"""Split a transposed convolution's output into tiles that fit a memory budget.

Each tile is an output box and the input box it needs; the halo follows from
the geometry (kernel size, stride, dilation, padding), so tiles are exact and
never blended.

Tiles are shaped to the storage: the axis that varies slowest on disk is split
first and iterated outermost (C order: axis 0; NIfTI's Fortran order: axis 2),
so that tiles are contiguous slabs visited in file order; tile lengths are
rounded to whole input chunks where the input is chunked, and an output chunk
shape can be derived that divides every tile exactly.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from conv3dt.geometry import AxisGeometry

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ENGINE_WORKSPACE_BYTES",
    "MAX_TILE_VALUES",
    "MemoryLimitError",
    "Plan",
    "Tile",
    "available_memory",
    "default_memory_limit",
    "format_bytes",
    "parse_memory",
    "plan_tiles",
]

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# What is resident at the busiest moment of a run, counted in tile boxes (see
# conv3dt.run.upsample_file). Input boxes: the one read ahead, the one being
# computed and the engine's padded / cast copy of it. Output boxes: the engine's
# result (the bias is added in place), the previous tile still being written
# behind and the contiguous copy a writer may make of it; the activation's
# results come on top (``activation_boxes``).
_INPUT_BOXES = 3
_OUTPUT_BOXES = 3
# The NumPy engine's per-tap products: one input box with `filters` channels.
_TAP_BOXES = 1
# Fixed-size work blocks of the engines, independent of the tile (the GEMM
# engine keeps about 1 MiB per phase group and worker thread).
ENGINE_WORKSPACE_BYTES = 16 * 2**20
# Most output values in one planned tile, whatever the budget: an engine call
# cannot be interrupted, so a stop request waits for the tile being computed
# (about a second at this size on two cores). Larger tiles gain nothing: their
# halos are already a small part of them.
MAX_TILE_VALUES = 2**25
# Output chunks (HDF5) about this large: h5py's default chunk cache holds one.
DEFAULT_CHUNK_BYTES = 2**20


class MemoryLimitError(ValueError):
    """A memory budget too small for even the smallest tile the planner makes.

    Attributes
    ----------
    memory_limit : int
        The budget given, in bytes.
    minimum : int
        The smallest budget that gives a plan, in bytes: the estimated peak of
        a run with the smallest tile (see :func:`plan_tiles`).
    min_tile_shape : three ints
        That smallest tile's output shape.
    """

    def __init__(self, memory_limit: int, minimum: int, min_tile_shape: tuple[int, int, int]):
        self.memory_limit = memory_limit
        self.minimum = minimum
        self.min_tile_shape = min_tile_shape
        super().__init__(
            f"Argument `memory_limit` is too small for this layer and volume: the smallest "
            f"tile ({'x'.join(map(str, min_tile_shape))} output voxels) needs "
            f"{format_bytes(minimum)} ({minimum} bytes), engine work blocks included. "
            f"Received: memory_limit={memory_limit} ({format_bytes(memory_limit)})"
        )

    def __reduce__(self) -> tuple[type, tuple[int, int, tuple[int, int, int]]]:
        # Rebuilt from the numbers, not the message (errors cross Dask workers pickled).
        return type(self), (self.memory_limit, self.minimum, self.min_tile_shape)


@dataclass(frozen=True)
class Tile:
    """One output box and the input box it needs (both [start, stop) per spatial axis)."""

    out_start: tuple[int, int, int]
    out_stop: tuple[int, int, int]
    in_start: tuple[int, int, int]
    in_stop: tuple[int, int, int]

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """Output box shape."""
        return tuple(b - a for a, b in zip(self.out_start, self.out_stop, strict=True))  # type: ignore[return-value]

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """Input box shape (a side may be 0 where no input reaches the output box)."""
        return tuple(b - a for a, b in zip(self.in_start, self.in_stop, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True)
class Plan:
    """Tiles covering one volume's output, and what they cost.

    Iterating yields the tiles with ``order[0]`` the outermost axis, so that a
    storage whose slowest axis is ``order[0]`` is visited in file order.

    Attributes
    ----------
    axes : three AxisGeometry
    tile_shape : three ints
        The output shape of a full tile (border tiles may be smaller).
    tile_bytes : int
        Estimated size of one tile's input and output boxes in the compute dtype.
    peak_bytes : int
        Estimated peak of the tiled run: the boxes in flight while one tile is
        read ahead, one computed and one written behind, the engine's work
        blocks and the windows of streamed (``.nii.gz``) files; the Python
        interpreter and its libraries come on top.
    memory_limit : int
        The budget the plan was made for.
    order : three ints
        Axes from outermost to innermost in the iteration.
    chunks : three ints or None
        An output chunk shape (spatial) that divides every tile, when asked for.
    in_window_bytes, out_window_bytes : int
        The parts of ``peak_bytes`` a streaming reader and writer hold: whole
        planes across the non-outermost axes, for one tile's extent along the
        outermost one.
    in_chunk_cache_bytes : int
        The part of ``peak_bytes`` for the decoded input chunks one tile's
        input box meets (compressed chunks are decoded whole): a reader
        caching that much decodes every chunk once.
    out_compress_bytes : int
        The part of ``peak_bytes`` a ``.nii.gz`` writer's compression threads
        hold: the block being filled and the blocks in flight.
    """

    axes: tuple[AxisGeometry, AxisGeometry, AxisGeometry]
    tile_shape: tuple[int, int, int]
    tile_bytes: int
    peak_bytes: int
    memory_limit: int
    order: tuple[int, int, int] = (0, 1, 2)
    chunks: tuple[int, int, int] | None = None
    in_window_bytes: int = 0
    out_window_bytes: int = 0
    in_chunk_cache_bytes: int = 0
    out_compress_bytes: int = 0

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """The output's spatial shape."""
        return tuple(g.output_length for g in self.axes)  # type: ignore[return-value]

    @property
    def grid(self) -> tuple[int, int, int]:
        """Number of tiles per axis."""
        return tuple(  # type: ignore[return-value]
            math.ceil(n / t) for n, t in zip(self.output_shape, self.tile_shape, strict=True)
        )

    def __len__(self) -> int:
        return math.prod(self.grid)

    def __iter__(self) -> Iterator[Tile]:
        shape, tile = self.output_shape, self.tile_shape
        ranges = [range(0, shape[a], tile[a]) for a in self.order]
        for ordered in itertools.product(*ranges):
            start = [0, 0, 0]
            for axis, value in zip(self.order, ordered, strict=True):
                start[axis] = value
            stop = tuple(min(s + t, n) for s, t, n in zip(start, tile, shape, strict=True))
            boxes = [g.input_range(a, b) for g, a, b in zip(self.axes, start, stop, strict=True)]
            yield Tile(
                out_start=tuple(start),  # type: ignore[arg-type]
                out_stop=stop,  # type: ignore[arg-type]
                in_start=tuple(b[0] for b in boxes),  # type: ignore[arg-type]
                in_stop=tuple(b[1] for b in boxes),  # type: ignore[arg-type]
            )


def parse_memory(text: str) -> int:
    """Parse a size such as ``512M``, ``2G``, ``1.5GiB`` or ``1000000`` into bytes.

    Raises
    ------
    ValueError
        For anything else.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(
            f"invalid memory size {text!r}; expected a number with an optional unit K, M, G or T "
            "(for example 512M or 2G)"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1:
        raise ValueError(f"invalid memory size {text!r}; it must be positive")
    return int(value)


def format_bytes(count: int) -> str:
    """A byte count in the largest binary unit that leaves at least 1 (``16.5 MiB``)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def available_memory() -> int:
    """Memory available to this process: MemAvailable, capped by a cgroup limit if set."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 4 * 2**30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit():
            available = min(available, int(text))
    return available


def default_memory_limit() -> int:
    """A quarter of the available memory, at least 256 MiB."""
    return max(available_memory() // 4, 256 * 2**20)


def _input_extent(g: AxisGeometry, length: int) -> int:
    """Most input voxels an output run of ``length`` on this axis can need."""
    return min(g.input_length, math.ceil(length / g.stride) + math.ceil(g.k_eff / g.stride))


@dataclass(frozen=True)
class _Costs:
    """Bytes per voxel of what a run holds, for the estimate."""

    in_channels: int
    filters: int
    work: int
    stream_in: int
    stream_out: int
    outer: int
    activation_boxes: int
    in_chunks: tuple[int, ...] | None = None
    chunk_in: int = 0
    compress_out: int = 0  # bytes, not per voxel: the compressor's blocks in flight

    def chunk_cache(self, axes: Sequence[AxisGeometry], tile: Sequence[int]) -> int:
        """Bytes of the whole decoded input chunks one tile's input box can meet."""
        if self.in_chunks is None or not self.chunk_in:
            return 0
        count = 1
        for g, t, c in zip(axes, tile, self.in_chunks, strict=True):
            # An extent meets one chunk more than it spans when it is not aligned.
            extent = _input_extent(g, t)
            count *= min(math.ceil(g.input_length / c), math.ceil(max(extent - 1, 0) / c) + 1)
        return count * math.prod(self.in_chunks) * self.chunk_in

    def boxes(self, axes: Sequence[AxisGeometry], tile: Sequence[int]) -> tuple[int, int]:
        in_voxels = math.prod(_input_extent(g, t) for g, t in zip(axes, tile, strict=True))
        return in_voxels, math.prod(tile)

    def tile_bytes(self, axes: Sequence[AxisGeometry], tile: Sequence[int]) -> int:
        in_voxels, out_voxels = self.boxes(axes, tile)
        return (in_voxels * self.in_channels + out_voxels * self.filters) * self.work

    def windows(self, axes: Sequence[AxisGeometry], tile: Sequence[int]) -> tuple[int, int]:
        # A streamed file is decompressed / compressed in whole planes across
        # every axis but the outermost one.
        across_in = math.prod(g.input_length for a, g in enumerate(axes) if a != self.outer)
        across_out = math.prod(g.output_length for a, g in enumerate(axes) if a != self.outer)
        planes_in = _input_extent(axes[self.outer], tile[self.outer])
        return (
            self.stream_in * planes_in * across_in,
            self.stream_out * tile[self.outer] * across_out,
        )

    def peak_bytes(self, axes: Sequence[AxisGeometry], tile: Sequence[int]) -> int:
        in_voxels, out_voxels = self.boxes(axes, tile)
        return (
            in_voxels * self.in_channels * self.work * _INPUT_BOXES
            + in_voxels * self.filters * self.work * _TAP_BOXES
            + out_voxels * self.filters * self.work * (_OUTPUT_BOXES + self.activation_boxes)
            + sum(self.windows(axes, tile))
            + self.chunk_cache(axes, tile)
            + self.compress_out
            + ENGINE_WORKSPACE_BYTES
        )


def _largest_divisor_at_most(n: int, bound: int) -> int:
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for candidate in (d, n // d):
                if best < candidate <= bound:
                    best = candidate
    return best


def _output_chunks(
    out_shape: Sequence[int], tile: Sequence[int], voxel_bytes: int, target: int
) -> tuple[int, int, int]:
    """A chunk shape of at most ``target`` bytes whose lengths divide split tile lengths."""
    chunk = list(tile)
    while math.prod(chunk) * voxel_bytes > target and max(chunk) > 1:
        axis = max(range(3), key=lambda a: (chunk[a], a))
        if tile[axis] >= out_shape[axis]:
            # Not split: any length works, the last chunk ends at the volume's edge.
            chunk[axis] = math.ceil(chunk[axis] / 2)
        else:
            chunk[axis] = _largest_divisor_at_most(tile[axis], chunk[axis] // 2)
    return tuple(chunk)  # type: ignore[return-value]


def _compressor_bytes(output_bytes: int) -> int:
    """What a streamed (``.nii.gz``) output's compressor holds besides its window of planes."""
    from conv3dt.volumes.gzip_codec import threads_for, writer_memory_bytes

    return writer_memory_bytes(threads_for(output_bytes))


def plan_tiles(
    axes: Sequence[AxisGeometry],
    in_channels: int,
    filters: int,
    *,
    itemsize: int = 4,
    memory_limit: int | None = None,
    split_order: Sequence[int] = (0, 1, 2),
    whole_axes: Sequence[int] = (),
    tile_shape: Sequence[int] | None = None,
    in_chunks: Sequence[int] | None = None,
    stream_in_bytes: int = 0,
    in_chunk_bytes: int = 0,
    stream_out_bytes: int = 0,
    chunk_bytes: int | None = None,
    out_itemsize: int | None = None,
    activation_boxes: int = 1,
) -> Plan:
    """Choose tiles for one volume of the output.

    Parameters
    ----------
    axes : three AxisGeometry
    in_channels, filters : int
    itemsize : int
        Bytes per value of the compute dtype.
    memory_limit : int, optional
        Budget in bytes for everything the run holds besides the interpreter
        (default :func:`default_memory_limit`). Split tiles are never shorter
        than one stride block (``stride`` output voxels, the output of one input
        voxel) on any axis, so the budget must hold at least such a tile. Nor
        do they hold more than :data:`MAX_TILE_VALUES` output values where a
        shorter tile is allowed, so that a stop request is honoured promptly.
    split_order : three axis indices
        Axes to split first: the slowest-varying axis of the storage first, so
        that tiles are contiguous slabs on disk (C order: 0 first; NIfTI's
        Fortran order: 2 first). Tiles are iterated in the same order, the first
        axis outermost.
    whole_axes : axis indices
        Axes never split (an activation that couples voxels along them).
    tile_shape : three ints, optional
        Force a tile shape (tests and benchmarks; whole axes stay whole); the
        budget is then only reported.
    in_chunks : three ints, optional
        The input's storage chunks (spatial): split tiles are rounded down to
        whole chunks when they span at least one, so chunks are read once.
    stream_in_bytes, stream_out_bytes : int
        Bytes per voxel (all channels) that a streaming reader or writer keeps
        in whole planes across the non-outermost axes (a ``.nii.gz``); 0 for
        formats with random access. A streaming writer's compressor adds its
        blocks in flight (:attr:`Plan.out_compress_bytes`).
    in_chunk_bytes : int
        Bytes per spatial voxel of a decoded ``in_chunks`` chunk (all the
        channels and volumes it holds) when reads decode whole chunks
        (compressed HDF5); 0 otherwise. The chunks one tile's input box meets
        are counted in the estimate, so a reader that caches them decodes every
        chunk once; a budget that cannot hold them is refused.
    chunk_bytes : int, optional
        When given, :attr:`Plan.chunks` is an output chunk shape of at most this
        many bytes (``filters * out_itemsize`` per voxel) dividing every tile.
    out_itemsize : int, optional
        Bytes per stored output value (default ``itemsize``).
    activation_boxes : int
        Output-sized arrays the activation holds at once (0 for none or
        linear, 1 for elementwise ones, more for softmax and the like).

    Raises
    ------
    MemoryLimitError
        When the budget cannot hold the smallest tile (one stride block per
        split axis); the error carries the smallest budget that can. Not raised
        for a forced ``tile_shape``.
    ValueError
        When ``split_order`` is not a permutation of the three axes.
    """
    axes = tuple(axes)
    if sorted(split_order) != [0, 1, 2]:
        raise ValueError(
            "`split_order` must be a permutation of (0, 1, 2). "
            f"Received split_order={split_order!r}"
        )
    order = tuple(int(a) for a in split_order)
    limit = default_memory_limit() if memory_limit is None else int(memory_limit)
    # When the storage's slowest axis must stay whole, no window of planes can
    # follow the tiles: streams then pass through or spill to a scratch file.
    streamed = order[0] not in whole_axes
    costs = _Costs(
        in_channels=in_channels,
        filters=filters,
        work=max(itemsize, 4),
        stream_in=stream_in_bytes if streamed else 0,
        stream_out=stream_out_bytes if streamed else 0,
        outer=order[0],
        activation_boxes=activation_boxes,
        in_chunks=None if in_chunks is None else tuple(int(c) for c in in_chunks),
        chunk_in=in_chunk_bytes,
        compress_out=(
            _compressor_bytes(math.prod(g.output_length for g in axes) * stream_out_bytes)
            if stream_out_bytes
            else 0
        ),
    )
    out_shape = [g.output_length for g in axes]
    if tile_shape is not None:
        tile = [
            n if a in whole_axes else max(1, min(int(t), n))
            for a, (t, n) in enumerate(zip(tile_shape, out_shape, strict=True))
        ]
    else:
        # No tile is shorter than one stride block on a split axis: the block is
        # the output of one input voxel, and shorter tiles would read every input
        # row several times for a saving that the engine's fixed work blocks dwarf.
        smallest = [
            n if a in whole_axes else min(axes[a].stride, n) for a, n in enumerate(out_shape)
        ]
        minimum = costs.peak_bytes(axes, smallest)
        if minimum > limit:
            raise MemoryLimitError(limit, minimum, tuple(smallest))  # type: ignore[arg-type]

        def fits(trial: list[int]) -> bool:
            return (
                costs.peak_bytes(axes, trial) <= limit
                and math.prod(trial) * filters <= MAX_TILE_VALUES
            )

        tile = list(out_shape)
        for axis in order:
            if axis in whole_axes:
                continue
            if fits(tile):
                break
            lo, hi = smallest[axis], tile[axis]
            # Largest length on this axis that fits (the cost grows with it).
            while lo < hi:
                mid = (lo + hi + 1) // 2
                trial = tile.copy()
                trial[axis] = mid
                if fits(trial):
                    lo = mid
                else:
                    hi = mid - 1
            stride = axes[axis].stride
            unit = stride
            if in_chunks is not None and lo >= in_chunks[axis] * stride:
                # Whole input chunks per tile: each chunk is read by one tile
                # (and its neighbours' halos) only.
                unit = in_chunks[axis] * stride
            # Otherwise whole input voxels per tile, so no input row is read twice.
            if lo > unit:
                lo -= lo % unit
            tile[axis] = lo
    in_window, out_window = costs.windows(axes, tile)
    chunks = None
    if chunk_bytes is not None:
        voxel_bytes = filters * (out_itemsize or itemsize)
        chunks = _output_chunks(out_shape, tile, voxel_bytes, chunk_bytes)
    return Plan(
        axes=axes,  # type: ignore[arg-type]
        tile_shape=tuple(tile),  # type: ignore[arg-type]
        tile_bytes=costs.tile_bytes(axes, tile),
        peak_bytes=costs.peak_bytes(axes, tile),
        memory_limit=limit,
        order=order,  # type: ignore[arg-type]
        chunks=chunks,
        in_window_bytes=in_window,
        out_window_bytes=out_window,
        in_chunk_cache_bytes=costs.chunk_cache(axes, tile),
        out_compress_bytes=costs.compress_out,
    )
