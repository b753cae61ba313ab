"""Separable kernels: three 1D passes instead of a full 3D kernel.

A kernel is *separable* when its weights are, bit for bit, the float32 (or
the kernel's own dtype) rounding of an outer product ``u ⊗ v ⊗ w ⊗ M``: three
1D axis factors and a ``(filters, in_channels)`` channel matrix. Every
interpolation preset is (:mod:`conv3dt.presets`), and trained kernels
sometimes are. :func:`separable_factors` finds the factors from the weights
alone and checks them exactly: no tolerance, no low-rank approximation, so a
kernel that is not separable is never treated as one.

The engine then mixes channels once at the input's resolution (skipped when
``M`` is the identity) and upsamples each filter with a 1D transposed
convolution along width, then height, then depth, fused into one pass over
the output (:func:`conv3dt.engine.numba_kernels.separable_region`). Each
output voxel's terms are added in an order fixed by the layer, never by the
box, so tiles equal the untiled result bit for bit. The result differs from
the other engines' only by float rounding (the order of the sums and the
rounding of the factors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np

from conv3dt.engine import threads
from conv3dt.engine.buffers import result_array
from conv3dt.engine.epilogue import Epilogue
from conv3dt.engine.numpy_engine import channel_products
from conv3dt.engine.phases import axis_phases

__all__ = [
    "SeparableKernel",
    "check_separable",
    "conv_transpose_region_separable",
    "separable_factors",
]


@dataclass(frozen=True)
class SeparableKernel:
    """A kernel's exact factorization ``axes[0] ⊗ axes[1] ⊗ axes[2] ⊗ channels``.

    Attributes
    ----------
    axes : three 1D float64 arrays
        The depth, height and width factors (lengths ``kd, kh, kw``).
    channels : float64 array, shape (filters, in_channels)
        The channel matrix.
    """

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    channels: np.ndarray

    @property
    def is_identity(self) -> bool:
        """Whether the channel matrix is the identity (each channel on its own)."""
        m = self.channels
        return m.shape[0] == m.shape[1] and bool(np.array_equal(m, np.eye(m.shape[0])))


def _scaled_to_stride(line: np.ndarray, at: int, stride: int) -> np.ndarray:
    """``line`` scaled to sum to ``stride``, an interpolation kernel's own scale.

    A triangle or box kernel of stride ``s`` sums to ``s``; so scaled, its
    values are the fractions the preset was built from (0.25, 0.75, 1/3, ...).
    A line that sums to zero is scaled to 1 at the pivot instead.
    """
    total = float(np.sum(line))
    if total != 0.0 and np.isfinite(total):
        return line * (stride / total)
    return line / line[at]


# Denominators of the fractions interpolation kernels are made of (a factor's
# 1D weights are multiples of 1 / (2 * factor) for factors up to 64).
_MAX_DENOMINATOR = 128


def _snapped(line: np.ndarray) -> np.ndarray:
    """``line`` with each value that is a float rounding of a simple fraction set to it.

    Weights stored in float32 carry the fractions ``p / q`` of interpolation
    kernels (1/3, 2/3, 1/12, ...) only to 24 bits; factors recovered from
    them are closer to the kernel's construction when taken back to the
    fraction, so that their products round to the stored weights bit for bit.
    Values that are no such fraction are kept.
    """
    snapped = line.copy()
    for n, value in enumerate(line):
        fraction = Fraction(float(value)).limit_denominator(_MAX_DENOMINATOR)
        exact = fraction.numerator / fraction.denominator
        if abs(exact - value) <= abs(value) * 2.0**-22:
            snapped[n] = exact
    return snapped


def _candidates(
    cube: np.ndarray, pivot: tuple[int, int, int], strides: Sequence[int]
) -> list[tuple[Any, ...]]:
    """Axis factors to try: the pivot's lines at two scales, each snapped to fractions, then not.

    Each candidate is ``(u, v, w, snap)``, ``snap`` telling whether the
    channel matrix is to be snapped too.
    """
    a0, b0, c0 = pivot
    lines = (cube[:, b0, c0], cube[a0, :, c0], cube[a0, b0, :])
    to_stride = tuple(
        _scaled_to_stride(line, p, int(s)) for line, p, s in zip(lines, pivot, strides, strict=True)
    )
    to_pivot = tuple(line / line[p] for line, p in zip(lines, pivot, strict=True))
    found: list[tuple[Any, ...]] = []
    for axes in (to_stride, to_pivot):
        found.append((*(_snapped(line) for line in axes), True))
        found.append((*axes, False))
    return found


def separable_factors(kernel: np.ndarray, strides: Sequence[int]) -> SeparableKernel | None:
    """The exact separable factorization of ``kernel``, or None when it has none.

    Parameters
    ----------
    kernel : ndarray, shape (kd, kh, kw, filters, in_channels)
    strides : three ints
        Used only to choose the factors' scale.

    Returns
    -------
    SeparableKernel or None
        None unless every weight equals the product of its factors (computed
        in float64) rounded to the kernel's dtype, bit for bit. All-zero and
        non-finite kernels are never separable.
    """
    k = np.asarray(kernel)
    if k.ndim != 5 or k.size == 0 or not np.issubdtype(k.dtype, np.floating):
        return None
    # A volume's every tile asks again about the same weights.
    return _factors_of(k.tobytes(), k.dtype.str, k.shape, tuple(int(s) for s in strides))


@lru_cache(maxsize=16)
def _factors_of(
    data: bytes, dtype: str, shape: tuple[int, ...], strides: tuple[int, ...]
) -> SeparableKernel | None:
    """:func:`separable_factors` of the kernel with these bytes, dtype and shape."""
    k = np.frombuffer(data, dtype=dtype).reshape(shape)
    k64 = k.astype(np.float64)
    if not np.all(np.isfinite(k64)):
        return None
    pivot = np.unravel_index(int(np.argmax(np.abs(k64))), k64.shape)
    peak = k64[pivot]
    if peak == 0.0:
        return None
    a0, b0, c0, f0, i0 = pivot
    cube = k64[..., f0, i0]
    for u, v, w, snap in _candidates(cube, (a0, b0, c0), strides):
        # Whatever scale the axis factors leave goes into the channel matrix.
        channels = k64[a0, b0, c0] / (u[a0] * v[b0] * w[c0])
        if not np.all(np.isfinite(channels)):
            continue
        if snap:
            channels = _snapped(channels.ravel()).reshape(channels.shape)
        product = np.einsum("i,j,k,fc->ijkfc", u, v, w, channels)
        if np.array_equal(product.astype(k.dtype), k):
            # Shared by every caller through the cache: read-only.
            for array in (u, v, w, channels):
                array.flags.writeable = False
            return SeparableKernel((u, v, w), channels)
    return None


def check_separable(kernel: np.ndarray, strides: Sequence[int]) -> SeparableKernel:
    """:func:`separable_factors` of ``kernel``, which must have them.

    Raises
    ------
    ValueError
        If ``kernel`` is not separable.
    """
    factors = separable_factors(kernel, strides)
    if factors is None:
        raise ValueError(
            "The kernel is not separable: engine='separable' needs weights that are exactly "
            "an outer product of three 1D kernels and a channel matrix (as the presets' are)."
        )
    return factors


def _axis_tables(
    factor: np.ndarray,
    stride: int,
    dilation: int,
    in_origin: int,
    in_length: int,
    out_start: int,
    out_length: int,
    dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis's 1D transposed convolution as tables, per output index of the box.

    Full-output index ``o`` receives input ``i`` through tap ``t`` when
    ``o == i * stride + t * dilation``. For each ``o`` of the box: how many
    taps reach it from inputs inside the box (``counts``), those inputs'
    indices relative to the box (``index``) and the taps' weights
    (``weight``), by ascending tap.
    """
    size = factor.shape[0]
    counts = np.zeros(out_length, dtype=np.int64)
    index = np.zeros((out_length, max(size, 1)), dtype=np.int64)
    weight = np.zeros((out_length, max(size, 1)), dtype=dtype)
    outputs = np.arange(out_start, out_start + out_length)
    for t in range(size):
        reach = outputs - t * dilation
        i = reach // stride - in_origin
        ok = (reach % stride == 0) & (i >= 0) & (i < in_length)
        rows = np.nonzero(ok)[0]
        slots = counts[rows]
        index[rows, slots] = i[rows]
        weight[rows, slots] = factor[t]
        counts[rows] += 1
    return counts, index, weight


def _width_phases(
    factor: np.ndarray,
    stride: int,
    dilation: int,
    in_origin: int,
    in_length: int,
    out_start: int,
    out_length: int,
    dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The width axis's output columns whose taps all lie in the box, phase by phase.

    Returns ``(phases, phase_weight, joint, edges)`` as
    :func:`conv3dt.engine.numba_kernels.separable_region` takes them: per
    phase its tap count, first and last (exclusive) ``q``, first output
    column, and from index 4 the taps' input shifts (input ``q + shift``);
    the taps' weights; and the output columns left to the tables. Taps are in
    ascending order, as in :func:`_axis_tables`.
    """
    found = axis_phases(factor.shape[0], stride, dilation)
    most = max((len(ph.taps) for ph in found), default=1)
    phases = np.zeros((len(found), 4 + most), dtype=np.int64)
    phase_weight = np.zeros((len(found), most), dtype=dtype)
    covered = np.zeros(out_length, dtype=bool)
    for n, ph in enumerate(found):
        shifts = [r - in_origin for r in ph.offsets]
        # q * stride + phase is full-output index o: the box's q, then those
        # whose every tap reads inside the box.
        q_first = -((ph.phase - out_start) // stride)
        q_stop = (out_start + out_length - 1 - ph.phase) // stride + 1
        q_first = max(q_first, -min(shifts))
        q_stop = max(q_first, min(q_stop, in_length - max(shifts)))
        phases[n, :4] = (len(ph.taps), q_first, q_stop, q_first * stride + ph.phase - out_start)
        phases[n, 4 : 4 + len(shifts)] = shifts
        phase_weight[n, : len(ph.taps)] = factor[list(ph.taps)]
        if q_stop > q_first:
            covered[phases[n, 3] : phases[n, 3] + (q_stop - q_first - 1) * stride + 1 : stride] = (
                True
            )
    # Where every phase has a column for the same q, one loop interleaves them.
    joint = np.zeros(2, dtype=np.int64)
    if len(found) == stride:
        joint[:] = phases[:, 1].max(), max(phases[:, 1].max(), phases[:, 2].min())
    return phases, phase_weight, joint, np.nonzero(~covered)[0]


# What one task's ring of band planes may take: about a core's L2 cache.
_RING_BYTES = 512 * 2**10


def _work_split(
    h_counts: np.ndarray,
    h_index: np.ndarray,
    span: int,
    row: int,
    dtype: np.dtype,
    batch: int,
    depth: int,
    n_threads: int,
) -> tuple[np.ndarray, int]:
    """Bands of output rows and runs of output planes for the kernel's tasks.

    Bands are as tall as lets a task's ring of ``span`` band planes fit in
    :data:`_RING_BYTES`, and as many as a multiple of the threads, so that the
    tasks share the threads evenly; the depth is split into runs only when
    bands alone are fewer than the threads. Returns ``band_rows`` (per band:
    first and stop output row, first and stop input row it reads) and the
    number of runs.
    """
    height = h_counts.shape[0]
    tall = max(4, _RING_BYTES // max(1, span * row * dtype.itemsize))
    bands = -(-height // tall)
    bands = max(1, min(height, -(-bands // n_threads) * n_threads))
    band_rows = np.zeros((bands, 4), dtype=np.int64)
    for k in range(bands):
        oh0, oh1 = k * height // bands, (k + 1) * height // bands
        used = [h_index[o, : h_counts[o]] for o in range(oh0, oh1) if h_counts[o]]
        r0 = min((int(u.min()) for u in used), default=0)
        r1 = max((int(u.max()) + 1 for u in used), default=0)
        band_rows[k] = (oh0, oh1, r0, r1)
    parts = max(1, min(depth, -(-n_threads // (batch * bands))))
    return band_rows, parts


def conv_transpose_region_separable(
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
    """Compute a box of the full (uncropped) output of a separable kernel in three 1D passes.

    Same parameters and result as :func:`conv3dt.engine.conv_transpose_region`;
    ``epilogue`` is applied in the pass that writes the output.

    Raises
    ------
    ValueError
        If ``kernel`` is not separable (:func:`separable_factors`).
    """
    factors = check_separable(kernel, strides)
    dtype = np.dtype(compute_dtype)
    batch, filters = x.shape[0], kernel.shape[3]
    shape = (batch, *(int(n) for n in out_shape), filters)
    out = result_array(out, shape, dtype, zeroed=x.size == 0)
    if out.size == 0 or x.size == 0:
        epilogue.apply(out)
        return out
    if factors.is_identity:
        z = np.ascontiguousarray(x, dtype=dtype)
    else:
        # Channels mixed once, at the input's resolution.
        flat = x.reshape(-1, x.shape[4]).astype(dtype, copy=False)
        mixed = channel_products(flat, factors.channels.T.astype(dtype))
        z = mixed.reshape(*x.shape[:4], filters)
    tables = []
    for a in range(3):
        tables.extend(
            _axis_tables(
                factors.axes[a],
                int(strides[a]),
                int(dilation[a]),
                int(in_origin[a]),
                int(x.shape[1 + a]),
                int(out_start[a]),
                int(out_shape[a]),
                dtype,
            )
        )
    phases = _width_phases(
        factors.axes[2],
        int(strides[2]),
        int(dilation[2]),
        int(in_origin[2]),
        int(x.shape[3]),
        int(out_start[2]),
        int(out_shape[2]),
        dtype,
    )
    d_counts, d_index = tables[0], tables[1]
    # The most consecutive input planes one output plane reads.
    span = 1
    for o in range(d_counts.shape[0]):
        n = int(d_counts[o])
        if n:
            span = max(span, int(d_index[o, :n].max() - d_index[o, :n].min()) + 1)
    n_threads = threads.get_threads()
    bands, parts = _work_split(
        tables[3], tables[4], span, shape[3] * filters, dtype, batch, int(shape[1]), n_threads
    )
    from conv3dt.engine import numba_kernels as nk

    threads.numba_threads()
    post = epilogue.kernel_args(dtype, repeat=int(out_shape[2]))
    rows = out.reshape(batch, shape[1], shape[2], shape[3] * filters)
    z = z.reshape(*z.shape[:3], z.shape[3] * z.shape[4])
    w_phases, w_phase_weight, w_joint, w_edges = phases
    nk.separable_region(
        z,
        *tables,
        w_phases,
        w_phase_weight,
        int(strides[2]),
        w_joint,
        w_edges,
        span,
        parts,
        bands,
        *post,
        rows,
    )
    return out
