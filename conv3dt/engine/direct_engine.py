"""Numba engine: direct summation over the stride phases, for layers with few channels.

Where channels are few a GEMM has nothing to amortize its packing on and the
work is bound by writing the output; one fused pass over each output row does
the least memory traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from conv3dt.engine import threads
from conv3dt.engine.buffers import result_array
from conv3dt.engine.epilogue import Epilogue
from conv3dt.engine.phases import axis_phases

__all__ = ["conv_transpose_region_direct", "is_upsampling"]


def is_upsampling(
    kernel_size: Sequence[int], strides: Sequence[int], dilation: Sequence[int]
) -> bool:
    """Whether every output voxel receives exactly one tap at offset 0 (kernel == stride)."""
    return all(
        k == s and (d == 1 or k == 1)
        for k, s, d in zip(kernel_size, strides, dilation, strict=True)
    )


@lru_cache(maxsize=64)
def _tap_tables(
    kernel_size: tuple[int, int, int], strides: tuple[int, int, int], dilation: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per axis and phase: tap count, taps and input offsets (padded to a common shape)."""
    size_p = max(strides)
    size_t = max(kernel_size)
    n_taps = np.zeros((3, size_p), dtype=np.int64)
    taps = np.zeros((3, size_p, size_t), dtype=np.int64)
    offsets = np.zeros((3, size_p, size_t), dtype=np.int64)
    for a in range(3):
        for ph in axis_phases(kernel_size[a], strides[a], dilation[a]):
            n = len(ph.taps)
            n_taps[a, ph.phase] = n
            taps[a, ph.phase, :n] = ph.taps
            offsets[a, ph.phase, :n] = ph.offsets
    for array in (n_taps, taps, offsets):
        array.flags.writeable = False
    return n_taps, taps, offsets


def conv_transpose_region_direct(
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
    """Compute a box of the full (uncropped) output by direct summation with Numba.

    Same parameters and result as :func:`conv3dt.engine.conv_transpose_region`;
    ``epilogue`` is applied in the pass that writes the output.
    """
    from conv3dt.engine import numba_kernels as nk

    batch = x.shape[0]
    filters = kernel.shape[3]
    shape = (batch, *out_shape, filters)
    upsampling = is_upsampling(kernel.shape[:3], strides, dilation)
    # Upsampling writes each voxel that input reaches, all of them when it reaches the
    # whole box; the general kernel writes every voxel.
    covered = not upsampling or all(
        o0 >= i0 * s and o0 + n <= (i0 + m) * s
        for o0, n, i0, m, s in zip(
            out_start, out_shape, in_origin, x.shape[1:4], strides, strict=True
        )
    )
    out = result_array(out, shape, compute_dtype, zeroed=x.size == 0 or not covered)
    if out.size == 0 or x.size == 0:
        epilogue.apply(out)
        return out
    strides_a = np.array(strides, dtype=np.int64)
    in_origin_a = np.array(in_origin, dtype=np.int64)
    out_start_a = np.array(out_start, dtype=np.int64)
    threads.numba_threads()
    if upsampling:
        # Channels first, so that each channel's input row is contiguous; the kernel
        # as (kd, kh, C, kw * F): one contiguous run of output per input voxel.
        xt = np.ascontiguousarray(np.moveaxis(x, 4, 1), dtype=compute_dtype)
        k0, k1, k2 = kernel.shape[:3]
        w = np.ascontiguousarray(
            np.moveaxis(kernel, 4, 2).reshape(k0, k1, -1, k2 * filters), dtype=compute_dtype
        )
        width = k2 * filters
        # The kernel finishes the voxels it writes; where some voxels of the box
        # have no input, all are finished afterwards instead.
        fused = epilogue if covered else Epilogue()
        post = fused.kernel_args(np.dtype(compute_dtype), repeat=int(out_shape[2]))
        fixed = nk.UPSAMPLE_FIXED.get(width)
        if fixed is not None:
            fixed(xt, w, strides_a, in_origin_a, out_start_a, *post, out)
        else:
            nk.upsample_rows(width, xt, w, strides_a, in_origin_a, out_start_a, *post, out)
        if not covered:
            epilogue.apply(out)
        return out
    xt = np.ascontiguousarray(np.moveaxis(x, 4, 1), dtype=compute_dtype)
    n_taps, taps, offsets = _tap_tables(
        tuple(int(k) for k in kernel.shape[:3]),
        tuple(int(s) for s in strides),
        tuple(int(d) for d in dilation),
    )
    w = np.ascontiguousarray(np.moveaxis(kernel, 3, 4), dtype=compute_dtype)
    post = epilogue.kernel_args(np.dtype(compute_dtype), repeat=int(out_shape[2]))
    nk.direct_region(xt, w, strides_a, in_origin_a, out_start_a, n_taps, taps, offsets, *post, out)
    return out
