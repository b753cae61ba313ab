"""Split a transposed convolution's output into tiles that fit a memory budget.

Each tile is an output box and the input box it needs; the halo follows from
the geometry (kernel size, stride, dilation, padding), so tiles are exact and
never blended.
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
    "Plan",
    "Tile",
    "available_memory",
    "default_memory_limit",
    "parse_memory",
    "plan_tiles",
]

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# Bytes resident per tile voxel beyond the arrays themselves: read buffers, the
# engine's per-tap products, the activation's temporary and the write buffer.
_OUTPUT_COPIES = 4
_INPUT_COPIES = 2
# Reading ahead and writing behind keep a second tile in flight.
_IN_FLIGHT = 2


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

    Attributes
    ----------
    axes : three AxisGeometry
    tile_shape : three ints
        The output shape of a full tile (border tiles may be smaller).
    tile_bytes : int
        Estimated memory one tile needs while in flight.
    peak_bytes : int
        Estimated peak of the tiled run (tiles in flight).
    memory_limit : int
        The budget the plan was made for.
    """

    axes: tuple[AxisGeometry, AxisGeometry, AxisGeometry]
    tile_shape: tuple[int, int, int]
    tile_bytes: int
    peak_bytes: int
    memory_limit: int

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
        ranges = [range(0, n, t) for n, t in zip(self.output_shape, self.tile_shape, strict=True)]
        for start in itertools.product(*ranges):
            stop = tuple(
                min(s + t, n)
                for s, t, n in zip(start, self.tile_shape, self.output_shape, strict=True)
            )
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


def _tile_bytes(
    axes: Sequence[AxisGeometry],
    tile: Sequence[int],
    in_channels: int,
    filters: int,
    itemsize: int,
) -> int:
    in_voxels = 1
    for g, t in zip(axes, tile, strict=True):
        in_voxels *= min(g.input_length, math.ceil(t / g.stride) + math.ceil(g.k_eff / g.stride))
    out_voxels = math.prod(tile)
    work = max(itemsize, 4)
    return (
        in_voxels * in_channels * work * _INPUT_COPIES
        + in_voxels * filters * work
        + out_voxels * filters * work * _OUTPUT_COPIES
    )


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
) -> Plan:
    """Choose tiles for one volume of the output.

    Parameters
    ----------
    axes : three AxisGeometry
    in_channels, filters : int
    itemsize : int
        Bytes per value of the compute dtype.
    memory_limit : int, optional
        Budget in bytes for the tiles in flight (default :func:`default_memory_limit`).
    split_order : three axis indices
        Axes to split first: the slowest-varying axis of the storage first, so
        that tiles are contiguous slabs on disk (C order: 0 first; NIfTI's
        Fortran order: 2 first).
    whole_axes : axis indices
        Axes never split (an activation that couples voxels along them).
    tile_shape : three ints, optional
        Force a tile shape (tests and benchmarks); the budget is then only reported.
    """
    axes = tuple(axes)
    limit = default_memory_limit() if memory_limit is None else int(memory_limit)
    out_shape = [g.output_length for g in axes]
    if tile_shape is not None:
        tile = [max(1, min(int(t), n)) for t, n in zip(tile_shape, out_shape, strict=True)]
    else:
        tile = list(out_shape)
        budget = limit // _IN_FLIGHT
        for axis in list(split_order):
            if axis in whole_axes:
                continue
            if _tile_bytes(axes, tile, in_channels, filters, itemsize) <= budget:
                break
            stride = axes[axis].stride
            lo, hi = 1, tile[axis]
            # Largest length on this axis that fits (the cost grows with it).
            while lo < hi:
                mid = (lo + hi + 1) // 2
                trial = tile.copy()
                trial[axis] = mid
                if _tile_bytes(axes, trial, in_channels, filters, itemsize) <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            # Whole input voxels per tile avoid recomputing halos twice.
            if lo > stride:
                lo -= lo % stride
            tile[axis] = lo
    tile_bytes = _tile_bytes(axes, tile, in_channels, filters, itemsize)
    return Plan(
        axes=axes,  # type: ignore[arg-type]
        tile_shape=tuple(tile),  # type: ignore[arg-type]
        tile_bytes=tile_bytes,
        peak_bytes=tile_bytes * _IN_FLIGHT,
        memory_limit=limit,
    )
