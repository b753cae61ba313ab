"""BLAS engine: stride phases as GEMMs over fixed-size row blocks.

Each row of a phase group's GEMM is one point ``q`` of the phase grid (see
:mod:`conv3dt.engine.phases`) and holds the input voxels its taps read, side by
side (zeros where a tap reaches outside the input box); the right-hand side
holds every phase's sub-kernel, so one product yields all phases of the group
at once and no inserted zeros are multiplied. Numba kernels gather the operand
and scatter the result rows into the output box; worker threads each run
single-threaded GEMMs on their own cache-sized blocks.

Why fixed-size blocks: a BLAS may pick a different kernel (and summation
order) for a different number of rows, so every GEMM of a layer has the same
shape whatever box is computed. Row results then depend only on the row's
data, which makes tiles exact.
"""

from __future__ import annotations

import itertools
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

# OpenBLAS multiplies matrices with rows * k * n up to about this without
# packing them first, which is much faster for the narrow products of phase
# groups; larger products use big blocks to amortize the packing.
_SMALL_PRODUCT = 1_000_000
_ROW_STEP = 16
_MAX_SMALL_ROWS = 192
_MIN_SMALL_ROWS = 32
_LARGE_ROWS = 256
# Operand and result bytes one worker handles per task (several GEMMs, one
# NumPy call): about a core's L2 cache.
_TASK_BYTES = 1024 * 1024
_ALIGN = 64
# A group's GEMM is split by last-axis offset when the operand's row per offset
# is at least this many times the result's row (gathering less beats summing more).
_SPLIT_RATIO = 4


def block_rows(k: int, n: int, itemsize: int) -> tuple[int, int]:
    """Rows of every GEMM of a ``(rows, k) @ (k, n)`` product, and GEMMs per task.

    Both depend on the layer only (never on the box), so tiles are exact.

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
    rows = min(_SMALL_PRODUCT // (k * n) // _ROW_STEP * _ROW_STEP, _MAX_SMALL_ROWS)
    if rows < _MIN_SMALL_ROWS:
        rows = _LARGE_ROWS
    blocks = max(1, _TASK_BYTES // (rows * (k + n) * itemsize))
    return rows, blocks


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array whose data starts on a cache line (BLAS results then never hinge on alignment)."""
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
    return np.ascontiguousarray(np.concatenate(columns, axis=1))


@dataclass
class _Job:
    """One phase group's GEMMs, ready to run on row blocks.

    The gathered operand holds the taps ``offsets``; its rows are the points of
    the grid extended by ``extra`` points before each line along the last
    axis. Part ``j`` multiplies the operand's rows shifted by ``windows[j]``
    with ``weights[j]``; the parts are summed in order.
    """

    weights: np.ndarray
    offsets: np.ndarray
    windows: tuple[int, ...]
    extra: int
    phase_table: np.ndarray
    rows: int
    blocks: int


def _job(kernel: np.ndarray, group: PhaseGroup, table: np.ndarray, itemsize: int) -> _Job:
    """Plan a group's GEMMs.

    The taps of a group differ in their last-axis offset by whole rows of the
    grid, so when gathering all of them costs more than summing separate
    products, the operand gathers the taps of one last-axis offset only and
    each offset multiplies it shifted by its own number of rows.
    """
    weights = _group_weights(kernel, group)
    n0, n1, n2 = (len(o) for o in group.offsets)
    k, n = weights.shape[0] // n2, weights.shape[1]
    if n2 > 1 and k >= _SPLIT_RATIO * n:
        extra = -min(group.offsets[2])
        per_offset = weights.reshape(n0, n1, n2, -1, n).transpose(2, 0, 1, 3, 4).reshape(n2, k, n)
        taps = itertools.product(group.offsets[0], group.offsets[1], [0])
        windows = tuple(extra + r2 for r2 in group.offsets[2])
        weights = np.ascontiguousarray(per_offset)
    else:
        extra = 0
        taps = itertools.product(*group.offsets)
        windows = (0,)
        weights = weights[np.newaxis]
    rows, blocks = block_rows(weights.shape[1], n, itemsize)
    offsets = np.array(list(taps), dtype=np.int64)
    return _Job(weights, offsets, windows, extra, table, rows, blocks)


def _phase_table(group: PhaseGroup, grids: Sequence[AxisGrid]) -> np.ndarray | None:
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
    grid = [g.q_stop - g.q_start for g in grids]
    # Grid point u is voxel q_start + u - in_origin of the input box.
    shift = [g.q_start - int(o) for g, o in zip(grids, in_origin, strict=True)]
    q_start = [g.q_start for g in grids]
    # Per job: its grid, shift and q_start with the extra points before each line.
    layouts = []
    for job in jobs:
        e = job.extra
        layouts.append(
            (
                batch * grid[0] * grid[1] * (grid[2] + e),
                np.array([grid[0], grid[1], grid[2] + e], dtype=np.int64),
                np.array([shift[0], shift[1], shift[2] - e], dtype=np.int64),
                np.array([q_start[0], q_start[1], q_start[2] - e], dtype=np.int64),
            )
        )
    tasks = [
        (index, start)
        for index, job in enumerate(jobs)
        for start in range(0, layouts[index][0], job.rows * job.blocks)
    ]
    strides_a = np.array(strides, dtype=np.int64)
    out_start_a = np.array([int(o) for o in out_start], dtype=np.int64)

    def multiply(counter: Iterator[int]) -> None:
        buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for t in counter:
            index, start = tasks[t]
            job = jobs[index]
            total, job_grid, job_shift, job_q_start = layouts[index]
            parts, k, n = job.weights.shape
            size = job.blocks * job.rows
            if index not in buffers:
                buffers[index] = (
                    _aligned_empty((size + job.extra, k), compute_dtype),
                    _aligned_empty((parts, job.blocks, job.rows, n), compute_dtype),
                )
            a, g = buffers[index]
            nk.gather_rows(src, start - job.extra, total, job_grid, job_shift, job.offsets, a)
            for j, window in enumerate(job.windows):
                operand = a[window : window + size].reshape(job.blocks, job.rows, k)
                np.matmul(operand, job.weights[j], out=g[j])
            nk.scatter_rows(
                g.reshape(parts, size, n),
                start,
                total,
                job_grid,
                job_q_start,
                strides_a,
                out_start_a,
                job.phase_table,
                *post,
                out,
            )

    with threads.single_threaded_blas():
        _on_workers(len(tasks), multiply)
    if not covered:
        epilogue.apply(out)
    return out
