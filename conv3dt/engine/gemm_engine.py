"""BLAS engine: stride phases as GEMMs over row blocks placed on the global grid.

Each row of a phase group's GEMM is one point ``q`` of the phase grid (see
:mod:`conv3dt.engine.phases`) and holds the input voxels its taps read, side by
side (zeros where a tap reaches outside the input box); the right-hand side
holds every phase's sub-kernel, so one product yields all phases of the group
at once and no inserted zeros are multiplied. Numba kernels gather the operand
and scatter the result rows into the output box; worker threads each run
single-threaded GEMMs on their own cache-sized blocks.

Why the rows are placed as they are: a BLAS may round a row's result
differently depending on the GEMM's shape, on where its matrices start in
memory and on the row's position within the matrix (OpenBLAS's Haswell sgemm
does, for some positions modulo 6), never on the other rows' values. So every
GEMM of a layer has the same shape, ``(R, k) @ (k, n)`` with ``R`` fixed by
the layer, every matrix starts on a 64-byte boundary, and the row of grid
point ``q`` always sits at position ``(c * q[0] + q[1] + q[2]) mod R`` of its
block (``c`` fixed by ``R``). The rows form one stream cut into blocks of
``R``: each line of the grid along the last axis is a run of consecutive rows
(so that a split product's shifted windows stay within the line), and the
lines are ordered so that each starts where that rule puts it with few rows
left empty between them (zeros). A voxel's row thus meets the same product
whatever box it is computed in, which makes tiles exact.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from conv3dt.engine import threads
from conv3dt.engine.buffers import result_array
from conv3dt.engine.epilogue import Epilogue
from conv3dt.engine.phases import AxisGrid, PhaseGroup, axis_grid, axis_phases, phase_groups

__all__ = ["block_rows", "conv_transpose_region_gemm"]

# Rows per GEMM, for every layer. The stream leaves few rows empty at any block
# length (see _line_layout) except in small boxes, where longer blocks waste
# more; on the benchmark's workloads longer blocks ran no faster than 64 rows
# by more than the runs varied, and shorter ones call the BLAS more often.
_ROWS = 64
# Lines per chunk of the stream's line order, in block lengths (see _line_layout):
# more lines leave fewer rows empty (about 1 % on the benchmark's boxes with
# 16), fewer keep neighbouring lines closer together in the stream.
_CHUNK_BLOCKS = 16
# Operand and result bytes one worker handles per task (several GEMMs, one
# NumPy call): about a core's L2 cache.
_TASK_BYTES = 1024 * 1024
_ALIGN = 64
# A group's GEMM is split by last-axis offset when the operand's row per offset
# is at least this many times the result's row (gathering less beats summing more).
_SPLIT_RATIO = 4
# A split product multiplies the operand once by all its parts' weights side by
# side when the result's row stays this narrow: one (R, k) @ (k, parts * n)
# GEMM instead of one per part. A narrow result (n = 16 in W6) keeps the BLAS's
# register tiles far from full: (64, 144) @ (144, 48) ran 15-20 % faster than
# three (64, 144) @ (144, 16), which outweighs the extra block each task then
# multiplies (see _Job) and the pass summing the parts; W6 gained 3-12 % in
# A/B runs. At n = 32 (W3, 96 columns) the gain was within the runs' spread.
_WIDE_COLUMNS = 64


def block_rows(k: int, n: int, itemsize: int) -> tuple[int, int]:
    """Rows of every GEMM of a ``(rows, k) @ (k, n)`` product, and GEMMs per task.

    Both depend on the layer only (never on the box), so tiles are exact; the
    rows are a multiple of 16, so that every block of a 64-byte aligned operand
    starts aligned too (for any ``k`` and ``itemsize``).

    Parameters
    ----------
    k, n : int
        The product's inner and result widths.
    itemsize : int
        Bytes per value.

    Returns
    -------
    rows, blocks : int
    """
    rows = _ROWS
    blocks = max(1, _TASK_BYTES // (rows * (k + n) * itemsize))
    return rows, blocks


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array whose data starts on a 64-byte boundary."""
    count = int(np.prod(shape))
    raw = np.empty(count * dtype.itemsize + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + count * dtype.itemsize].view(dtype).reshape(shape)


def _without_input(
    shape: tuple[int, ...], dtype: np.dtype, epilogue: Epilogue, out: np.ndarray | None
) -> np.ndarray:
    """The box where no input reaches: zeros, finished."""
    out = result_array(out, shape, dtype, zeroed=True)
    epilogue.apply(out)
    return out


@lru_cache(maxsize=64)
def _groups(
    kernel_size: tuple[int, int, int], strides: tuple[int, int, int], dilation: tuple[int, int, int]
) -> tuple[PhaseGroup, ...]:
    return phase_groups(kernel_size, strides, dilation)


def _group_weights(kernel: np.ndarray, group: PhaseGroup) -> np.ndarray:
    """The ``(taps * C, phases * F)`` right-hand side of a group's GEMM."""
    columns = []
    for triple in group.phases:
        sub = kernel[np.ix_(triple[0].taps, triple[1].taps, triple[2].taps)]
        # (n0, n1, n2, F, C) -> rows ordered (tap, channel) as the gathered operand.
        columns.append(np.moveaxis(sub, 3, 4).reshape(-1, kernel.shape[3]))
    return np.concatenate(columns, axis=1)


@dataclass
class _Job:
    """One phase group's GEMMs, ready to run on row blocks.

    The gathered operand holds the taps ``offsets``, ``k`` values per row
    stored ``width`` apart; its rows are the points of the grid extended by
    ``extra`` points before each line along the last axis. Part ``j``
    multiplies the operand's rows shifted by ``windows[j]`` with
    ``weights[j]``; the parts are summed in order.

    A ``wide`` job multiplies the operand's rows unshifted, once, by all parts'
    weights side by side (``weights[0]``, part ``j`` in columns ``j * n`` to
    ``(j + 1) * n``), and shifts the result's rows instead: output row ``s`` is
    the sum over ``j`` of part ``j`` of result row ``s + windows[j] - extra``.
    Each result row is still the product of one operand row at its own position
    in a block of ``rows`` (``extra <= rows``), and a task computes, besides
    its own blocks, the block before them, which its first rows' earlier parts
    come from.
    """

    weights: np.ndarray
    offsets: np.ndarray
    windows: tuple[int, ...]
    extra: int
    width: int
    phase_table: np.ndarray
    rows: int
    blocks: int
    wide: bool = False


def _job(kernel: np.ndarray, group: PhaseGroup, table: np.ndarray, itemsize: int) -> _Job:
    """Plan a group's GEMMs.

    The taps of a group differ in their last-axis offset by whole rows of the
    grid, so when gathering all of them costs more than summing separate
    products, the operand gathers the taps of one last-axis offset only and
    each offset multiplies it shifted by its own number of rows. The operand's
    rows are then padded to whole 64-byte lines, so that the shifted windows
    start aligned as well.
    """
    weights = _group_weights(kernel, group)
    n0, n1, n2 = (len(o) for o in group.offsets)
    k, n = weights.shape[0] // n2, weights.shape[1]
    if n2 > 1 and k >= _SPLIT_RATIO * n:
        extra = -min(group.offsets[2])
        weights = weights.reshape(n0, n1, n2, -1, n).transpose(2, 0, 1, 3, 4).reshape(n2, k, n)
        taps = itertools.product(group.offsets[0], group.offsets[1], [0])
        windows = tuple(extra + r2 for r2 in group.offsets[2])
        step = _ALIGN // itemsize
        width = -(-k // step) * step
    else:
        extra = 0
        k = weights.shape[0]
        weights = weights[np.newaxis]
        taps = itertools.product(*group.offsets)
        windows = (0,)
        width = k
    rows, blocks = block_rows(k, n, itemsize)
    parts = len(windows)
    # The wide product's parts are read back through one strided view (see
    # multiply in conv_transpose_region_gemm): their windows must step evenly.
    wide = (
        parts > 1
        and parts * n <= _WIDE_COLUMNS
        and extra <= rows
        and len(set(np.diff(windows).tolist())) == 1
    )
    if wide:
        weights = np.concatenate(list(weights), axis=1)[np.newaxis]
        rows, blocks = block_rows(k, parts * n, itemsize)
    aligned = _aligned_empty(weights.shape, weights.dtype)
    aligned[...] = weights
    offsets = np.array(list(taps), dtype=np.int64)
    return _Job(aligned, offsets, windows, extra, width, table, rows, blocks, wide)


def _phase_table(group: PhaseGroup, grids: Sequence[AxisGrid]) -> np.ndarray | None:
    """Per phase of the group and axis ``(phase, q_lo, q_hi)``; None if none reaches the box."""
    table = np.zeros((len(group.phases), 3, 3), dtype=np.int64)
    useful = False
    for m, triple in enumerate(group.phases):
        present = True
        for a, ph in enumerate(triple):
            lo, hi = grids[a].phase_ranges.get(ph.phase, (0, 0))
            table[m, a] = (ph.phase, lo, hi)
            present = present and hi > lo
        useful = useful or present
    return table if useful else None


def _spread(rows: int) -> int:
    """``c`` of the rows' positions ``(c * q[0] + q[1] + q[2]) mod rows``: odd, near 0.618 * rows.

    Lines leave no empty rows between them when every residue modulo ``rows``
    starts about as many lines; with ``c`` near the golden ratio's fraction of
    ``rows``, the starts ``c * q[0] + q[1]`` of a box's lines spread evenly over
    the residues even when the box has fewer than ``rows`` lines along an axis.
    """
    c = int(0.618034 * rows)
    return c if c % 2 else c - 1


def _line_layout(
    lines: tuple[int, int, int], width: int, residue: int, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """The order of the lines in the stream and the stream row each starts at.

    ``lines`` is the grid of lines ``(batch, g0, g1)``, each ``width`` rows
    long; line ``(b, u0, u1)`` must start at a stream row congruent to its
    residue ``residue + _spread(rows) * u0 + u1`` modulo ``rows``. A line of
    residue ``r`` ends where a line of residue ``r + width`` can start with no
    empty row between them: the residues form cycles under that step. The
    stream takes the lines chunk by chunk (``_CHUNK_BLOCKS * rows`` lines in C
    order) and, within a chunk, runs round each cycle, taking one line of each
    residue per round (lines of a residue in C order), so that rows are left
    empty only where a residue has run out of lines, and between chunks.

    Returns
    -------
    order, start : ndarray of int64
        Line numbers (C order over ``lines``) by ascending stream start, and those starts.
    """
    batch, g0, g1 = lines
    u0, u1 = np.meshgrid(np.arange(g0), np.arange(g1), indexing="ij")
    res = np.tile((residue + _spread(rows) * u0 + u1).ravel() % rows, batch)
    # Lines are ordered within chunks of consecutive lines (C order), so that
    # the stream walks the box nearly in order and the input a line shares with
    # its neighbours is read again while it is in cache.
    chunk = _CHUNK_BLOCKS * rows
    n_chunks = -(-res.size // chunk)
    key = np.arange(res.size) // chunk * rows + res
    by_key = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=n_chunks * rows)
    firsts = (np.cumsum(counts) - counts).reshape(n_chunks, rows)
    counts = counts.reshape(n_chunks, rows)
    n_cycles = math.gcd(width, rows)
    length = rows // n_cycles
    # cycle[c, j]: the j-th residue of cycle c; round[k]: a residue's k-th line in a chunk.
    cycle = (np.arange(n_cycles)[:, None] + np.arange(length) * width) % rows
    rounds = np.arange(int(counts.max()))[:, None]
    taken = rounds < counts[:, cycle][:, :, None, :]
    order = by_key[(firsts[:, cycle][:, :, None, :] + rounds)[taken]]
    first = res[order]
    # Each line starts at the first row past the previous one congruent to its residue.
    gaps = (np.diff(first) - width) % rows + width
    start = np.concatenate(([first[0]], first[0] + np.cumsum(gaps)))
    return order, start


@dataclass
class _Stream:
    """Where a job's grid points sit in its stream of GEMM rows (see :func:`_stream`)."""

    grid: np.ndarray
    q_start: np.ndarray
    shift: np.ndarray
    line_order: np.ndarray
    line_start: np.ndarray
    n_blocks: int


def _stream(
    job: _Job,
    batch: int,
    in_origin: Sequence[int],
    layouts: dict[tuple, tuple[np.ndarray, np.ndarray]],
) -> _Stream:
    """Lay out a job's grid: the points ``q`` its phases compute, as stream rows.

    The grid spans, on each axis, the ``q`` of the phases that reach the box,
    the last axis extended by ``job.extra`` points before. Each line of it
    along the last axis is a run of consecutive stream rows, placed so that
    point ``q`` falls at a stream row congruent to ``c * q[0] + q[1] + q[2]``
    modulo the block rows ``R`` (``c`` is :func:`_spread`'s): the same position
    within a block of ``R`` rows, in every box. ``layouts`` keeps the line
    layouts already made for other jobs of the box, which often share them.
    """
    present = [np.all(t[:, 2] > t[:, 1]) for t in job.phase_table]
    spans = job.phase_table[present]
    q_start = spans[:, :, 1].min(axis=0)
    q_stop = spans[:, :, 2].max(axis=0)
    q_start[2] -= job.extra
    grid = q_stop - q_start
    rows = job.rows
    residue = (_spread(rows) * int(q_start[0]) + int(q_start[1]) + int(q_start[2])) % rows
    key = ((batch, int(grid[0]), int(grid[1])), int(grid[2]), residue, rows)
    if key not in layouts:
        layouts[key] = _line_layout(*key)
    order, start = layouts[key]
    shift = q_start - np.array([int(o) for o in in_origin], dtype=np.int64)
    end = int(start[-1]) + int(grid[2])
    return _Stream(grid, q_start, shift, order, start, -(-end // rows))


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="conv3dt-gemm")
            _pool_size = workers
        return _pool


def _on_workers(n_tasks: int, worker: Callable[[Iterator[int]], None]) -> None:
    """Run ``worker`` on the calling thread and up to ``threads - 1`` pool threads, all
    drawing task numbers ``0 .. n_tasks - 1`` from one shared counter."""
    counter = iter(range(n_tasks))
    workers = min(threads.get_threads(), n_tasks)
    if workers <= 1:
        worker(counter)
        return
    pool = _executor(workers - 1)
    futures = [pool.submit(worker, counter) for _ in range(workers - 1)]
    try:
        worker(counter)
    finally:
        for future in futures:
            future.result()


def conv_transpose_region_gemm(
    x: np.ndarray,
    kernel: np.ndarray,
    strides: Sequence[int],
    dilation: Sequence[int],
    in_origin: Sequence[int],
    out_start: Sequence[int],
    out_shape: Sequence[int],
    compute_dtype: np.dtype,
    epilogue: Epilogue,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Compute a box of the full (uncropped) output with BLAS GEMMs per phase group.

    Same parameters and result as :func:`conv3dt.engine.conv_transpose_region`;
    ``epilogue`` is applied as the results are scattered into the output.
    """
    from conv3dt.engine import numba_kernels as nk

    batch = x.shape[0]
    filters = kernel.shape[3]
    strides = tuple(int(s) for s in strides)
    dilation = tuple(int(d) for d in dilation)
    ksize = tuple(int(k) for k in kernel.shape[:3])
    if x.size == 0:
        return _without_input((batch, *out_shape, filters), compute_dtype, epilogue, out)
    grids = []
    for a in range(3):
        grid = axis_grid(
            axis_phases(ksize[a], strides[a], dilation[a]),
            strides[a],
            int(in_origin[a]),
            x.shape[1 + a],
            int(out_start[a]),
            int(out_shape[a]),
        )
        if grid is None:
            return _without_input((batch, *out_shape, filters), compute_dtype, epilogue, out)
        grids.append(grid)
    groups = [
        (group, table)
        for group in _groups(ksize, strides, dilation)
        if (table := _phase_table(group, grids)) is not None
    ]
    # Where the phase ranges cover the box, the scatter writes (and finishes)
    # every output voxel; otherwise the epilogue is a pass of its own.
    covered = all(g.covers_box for g in grids)
    out = result_array(out, (batch, *out_shape, filters), compute_dtype, zeroed=not covered)
    if out.size == 0:
        return out
    post = (epilogue if covered else Epilogue()).kernel_args(compute_dtype)
    src = np.ascontiguousarray(x, dtype=compute_dtype)
    kc = kernel.astype(compute_dtype, copy=False)
    jobs = [_job(kc, group, table, compute_dtype.itemsize) for group, table in groups]
    layouts: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    streams = [_stream(job, batch, in_origin, layouts) for job in jobs]
    tasks = [
        (index, first, min(job.blocks, streams[index].n_blocks - first))
        for index, job in enumerate(jobs)
        for first in range(0, streams[index].n_blocks, job.blocks)
    ]
    strides_a = np.array(strides, dtype=np.int64)
    out_start_a = np.array([int(o) for o in out_start], dtype=np.int64)

    def multiply(counter: Iterator[int]) -> None:
        buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for t in counter:
            index, first, count = tasks[t]
            job, stream = jobs[index], streams[index]
            if job.wide:
                if index not in buffers:
                    columns = job.weights.shape[2]
                    buffers[index] = (
                        _aligned_empty(((job.blocks + 1) * job.rows, job.width), compute_dtype),
                        _aligned_empty(((job.blocks + 1) * job.rows, columns), compute_dtype),
                        _aligned_empty(
                            (job.blocks * job.rows, columns // len(job.windows)), compute_dtype
                        ),
                    )
                multiply_wide(job, stream, first, count, *buffers[index])
                continue
            parts, k, n = job.weights.shape
            rows = job.rows
            if index not in buffers:
                buffers[index] = (
                    _aligned_empty((job.blocks * rows + job.extra, job.width), compute_dtype),
                    _aligned_empty((parts, job.blocks * rows, n), compute_dtype),
                )
            a, g = buffers[index]
            start, size = first * rows, count * rows
            # Operand row i is stream row start - extra + i, so part j's window of
            # size rows starts at windows[j] and its block b at row b * rows of it.
            nk.gather_rows(
                src,
                start - job.extra,
                stream.grid,
                stream.shift,
                stream.line_order,
                stream.line_start,
                job.offsets,
                a[: size + job.extra],
            )
            for j, window in enumerate(job.windows):
                operand = a[window : window + size].reshape(count, rows, job.width)[:, :, :k]
                np.matmul(operand, job.weights[j], out=g[j, :size].reshape(count, rows, n))
            # Rows of g past size are past the stream's end: the scatter stops before them.
            nk.scatter_rows(
                g,
                start,
                stream.grid,
                stream.q_start,
                stream.line_order,
                stream.line_start,
                strides_a,
                out_start_a,
                job.phase_table,
                *post,
                out,
            )

    def multiply_wide(
        job: _Job,
        stream: _Stream,
        first: int,
        count: int,
        a: np.ndarray,
        g: np.ndarray,
        total: np.ndarray,
    ) -> None:
        """A wide job's task (see :class:`_Job`): blocks ``first - 1 .. first + count - 1``."""
        _, k, columns = job.weights.shape
        parts, rows = len(job.windows), job.rows
        n = columns // parts
        start, size = first * rows, count * rows
        # Operand and result row i are stream row start - rows + i: whole blocks,
        # the one before the task's own first (zeros before the stream's start).
        nk.gather_rows(
            src, start - rows, stream.grid, stream.shift, stream.line_order,
            stream.line_start, job.offsets, a[: size + rows],
        )  # fmt: skip
        operand = a[: size + rows].reshape(count + 1, rows, job.width)[:, :, :k]
        np.matmul(operand, job.weights[0], out=g[: size + rows].reshape(count + 1, rows, columns))
        # Part j of output row start + i is result row rows + i + windows[j] - extra,
        # columns j * n ..; the parts are summed in order, as the scatter sums
        # separate products, into contiguous rows the scatter copies as they are.
        base = rows - job.extra
        summed = total[:size]
        for j, window in enumerate(job.windows):
            part = g[base + window : base + window + size, j * n : (j + 1) * n]
            if j == 0:
                summed[...] = part
            else:
                np.add(summed, part, out=summed)
        nk.scatter_rows(
            summed[np.newaxis], start, stream.grid, stream.q_start, stream.line_order,
            stream.line_start, strides_a, out_start_a, job.phase_table, *post, out,
        )  # fmt: skip

    with threads.single_threaded_blas():
        _on_workers(len(tasks), multiply)
    if not covered:
        epilogue.apply(out)
    return out
