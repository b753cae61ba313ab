"""Compute any box of a transposed convolution's output from the input box it needs.

:func:`conv_transpose_region` is the one entry point; it dispatches to an
implementation:

``"gemm"``
    Stride phases as BLAS GEMMs over cache-sized row blocks, on worker threads
    (:mod:`conv3dt.engine.gemm_engine`). For layers with many channels.
``"numba"``
    Direct summation in Numba, fused into one pass over the output
    (:mod:`conv3dt.engine.direct_engine`). For layers with few channels, where
    the work is bound by writing the output.
``"numpy"``
    One NumPy product per kernel tap (:mod:`conv3dt.engine.numpy_engine`):
    simple, slower, nothing to import or compile.
``"separable"``
    For kernels that are exactly an outer product of three 1D kernels and a
    channel matrix (every interpolation preset): three fused 1D passes in
    Numba (:mod:`conv3dt.engine.separable`). Refuses other kernels.
``"auto"``
    :func:`engine_for_volume` picks one per volume, from the layer and the
    work the volume needs: the NumPy engine for small jobs (where importing
    Numba and loading its compiled kernels would cost more than the whole
    computation), the separable engine for separable kernels (when given the
    kernel), else :func:`choose_engine`'s pick for the layer.

Every engine adds each output voxel's terms in an order that does not depend on
the box, so a tile computed from its input box equals the same box of the
untiled result bit for bit. Callers that compute a volume in boxes resolve
``"auto"`` once per volume (:func:`resolve_engine`), never per box, so the same
holds for it. Numba is imported only when a Numba path runs. The reference implementation in
:mod:`conv3dt.engine.reference` is for tests only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from conv3dt.engine.buffers import check_out
from conv3dt.engine.epilogue import FUSED_ACTIVATIONS, Epilogue
from conv3dt.engine.numpy_engine import conv_transpose_region_numpy

__all__ = [
    "ENGINES",
    "FUSED_ACTIVATIONS",
    "choose_engine",
    "conv_transpose_region",
    "engine_for_volume",
    "prefers_separable",
    "resolve_engine",
]

ENGINES = ("auto", "gemm", "numba", "numpy", "separable")

# Up to this many input channels an upsampling layer (kernel == stride) is
# bound by writing its output, and the fused Numba pass beats a GEMM.
_UPSAMPLE_DIRECT_CHANNELS = 4
# Other layers: the Numba pass does taps * channels * filters multiply-adds per
# output voxel, vectorized along rows; a GEMM does the same work faster once
# there are enough channel pairs to fill its blocks. How many depends on the
# taps each output voxel receives (kernel voxels / stride voxels). Measured on
# 64**3 and 96**3 inputs on the benchmark's machine (benchmarks/): Numba is the
# faster up to these many channels * filters, for a number of taps up to ...
_DIRECT_PAIRS = (
    (4.0, 64),  # ... 4 (k3 s2)
    (15.0, 8),  # ... 15 (k4 s2: its phases' GEMMs are efficient early)
    (float("inf"), 16),  # ... any (k3 s1)
)


def choose_engine(
    kernel_shape: Sequence[int], strides: Sequence[int], dilation: Sequence[int]
) -> str:
    """The engine ``"auto"`` runs for a layer.

    Parameters
    ----------
    kernel_shape : five ints
        ``(kd, kh, kw, filters, in_channels)``.
    strides, dilation : three ints

    Returns
    -------
    str
        ``"numba"`` for layers with few channels, else ``"gemm"``.
    """
    from conv3dt.engine.direct_engine import is_upsampling

    filters, channels = int(kernel_shape[3]), int(kernel_shape[4])
    if is_upsampling(kernel_shape[:3], strides, dilation):
        return "numba" if channels <= _UPSAMPLE_DIRECT_CHANNELS else "gemm"
    taps = float(np.prod([k / s for k, s in zip(kernel_shape[:3], strides, strict=True)]))
    most = next(pairs for most_taps, pairs in _DIRECT_PAIRS if taps <= most_taps)
    return "numba" if channels * filters <= most else "gemm"


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(
            f"The `engine` argument must be one of {', '.join(ENGINES)}. "
            f"Received: engine={engine!r}"
        )


# The NumPy engine's cost, an upper bound fitted on the benchmark's machine
# (benchmarks/): about 4 ns per input voxel and kernel tap (its per-tap slices and
# scatter-adds) plus 2.5 ns per multiply-add (elementwise, channel by channel).
_NUMPY_NS_PER_TAP_VOXEL = 4.0
_NUMPY_NS_PER_MAC = 2.5
# Importing Numba and loading conv3dt's compiled kernels costs about 0.8 s per
# process (and compiling them, on a first run, 10 s or more): a volume the NumPy
# engine finishes in less than this is computed by it.
SMALL_JOB_SECONDS = 0.25


def engine_for_volume(
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
    input_voxels: int,
    kernel: np.ndarray | None = None,
) -> str:
    """The engine ``"auto"`` runs for a whole volume.

    Parameters
    ----------
    kernel_shape : five ints
        ``(kd, kh, kw, filters, in_channels)``.
    strides, dilation : three ints
    input_voxels : int
        Spatial voxels of the whole input, times its batch size.
    kernel : ndarray, optional
        The weights, to recognize a separable kernel (:func:`prefers_separable`).

    Returns
    -------
    str
        ``"numpy"`` when the NumPy engine's estimated time for the volume is at
        most :data:`SMALL_JOB_SECONDS`, else ``"separable"`` for a separable
        ``kernel``, else :func:`choose_engine`'s pick.
    """
    taps = int(np.prod([int(k) for k in kernel_shape[:3]]))
    pairs = int(kernel_shape[3]) * int(kernel_shape[4])
    tap_voxels = float(taps) * float(input_voxels)
    seconds = tap_voxels * (_NUMPY_NS_PER_TAP_VOXEL + _NUMPY_NS_PER_MAC * pairs) * 1e-9
    if seconds <= SMALL_JOB_SECONDS:
        return "numpy"
    if kernel is not None and prefers_separable(kernel, strides, dilation):
        return "separable"
    return choose_engine(kernel_shape, strides, dilation)


# Up to this many channel pairs a separable kernel's channel matrix is applied
# by elementwise products at the input's resolution; beyond it, a GEMM engine
# spends its time better (a diagonal matrix needs no products at all).
_SEPARABLE_PAIRS = 16


def prefers_separable(kernel: np.ndarray, strides: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether ``"auto"`` computes ``kernel`` as three 1D passes.

    True for a separable kernel (exactly, see
    :func:`conv3dt.engine.separable.separable_factors`) whose channel matrix is
    the identity or has at most 16 entries, unless the kernel equals the
    stride (each output voxel then takes one tap, which the Numba engine's
    upsampling pass writes directly) or three 1D passes would do no fewer
    taps than the kernel has (``kd * kh * kw <= kd + kh + kw``: a 1x1x1 or a
    line of a kernel).
    """
    from conv3dt.engine.direct_engine import is_upsampling
    from conv3dt.engine.separable import separable_factors

    size = [int(k) for k in kernel.shape[:3]]
    if is_upsampling(size, strides, dilation) or math.prod(size) <= sum(size):
        return False
    factors = separable_factors(kernel, strides)
    if factors is None:
        return False
    return factors.is_identity or factors.channels.size <= _SEPARABLE_PAIRS


def resolve_engine(
    engine: str,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
    input_voxels: int,
    kernel: np.ndarray | None = None,
) -> str:
    """``engine`` itself, or for ``"auto"`` the engine :func:`engine_for_volume` picks.

    Resolve once per volume and pass the result to every box of it: a volume's
    boxes must all be computed by one engine for tiles to equal the untiled
    result bit for bit.

    Raises
    ------
    ValueError
        On an unknown ``engine``, or ``"separable"`` with a ``kernel`` that is not.
    """
    _check_engine(engine)
    if engine == "separable" and kernel is not None:
        from conv3dt.engine.separable import check_separable

        check_separable(kernel, strides)
    if engine != "auto":
        return engine
    return engine_for_volume(kernel_shape, strides, dilation, input_voxels, kernel)


def conv_transpose_region(
    x: np.ndarray,
    kernel: np.ndarray,
    strides: Sequence[int],
    dilation: Sequence[int],
    in_origin: Sequence[int],
    out_start: Sequence[int],
    out_shape: Sequence[int],
    compute_dtype: np.dtype | type = np.float32,
    engine: str = "auto",
    bias: np.ndarray | None = None,
    activation: str = "linear",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Compute a box of the full (uncropped) output of a transposed convolution.

    Parameters
    ----------
    x : ndarray, shape (batch, d, h, w, in_channels)
        Channels-last input box; ``x[:, 0, 0, 0]`` is absolute input voxel ``in_origin``.
        Input outside the box is treated as absent (it must not contribute to the
        requested output box for the result to be exact, see
        :meth:`conv3dt.geometry.AxisGeometry.input_range`).
    kernel : ndarray, shape (kd, kh, kw, filters, in_channels)
    strides, dilation : three ints
    in_origin : three ints
    out_start, out_shape : three ints
        The box in full-output coordinates: Keras's output index ``o`` is full
        index ``o + crop_left``. Indices outside the full output give zeros.
    compute_dtype : dtype
        Accumulation and result dtype.
    engine : {"auto", "gemm", "numba", "numpy", "separable"}
        The implementation; "auto" picks the separable engine for a separable
        kernel (:func:`prefers_separable`), else one per layer (:func:`choose_engine`).
        Callers computing a volume box by box pass :func:`resolve_engine`'s
        pick for the whole volume instead.
    bias : ndarray, shape (filters,), optional
        Added to the finished sum, in ``compute_dtype``.
    activation : str
        One of :data:`FUSED_ACTIVATIONS`, applied after the bias. The ``gemm``
        and ``numba`` engines do both in the pass that writes the output.
    out : ndarray, optional
        A C-contiguous array of the result's shape and dtype to write into
        (and return) instead of a new one: a caller computing many boxes saves
        faulting in fresh memory for each.

    Returns
    -------
    ndarray, shape (batch, *out_shape, filters), ``compute_dtype``

    Raises
    ------
    ValueError
        On an unknown ``engine`` or ``activation``, or an ``out`` that does not fit.
    """
    _check_engine(engine)
    if engine == "auto":
        engine = (
            "separable"
            if prefers_separable(kernel, strides, dilation)
            else choose_engine(kernel.shape, strides, dilation)
        )
    dtype = np.dtype(compute_dtype)
    epilogue = Epilogue(None if bias is None else np.asarray(bias), activation)
    if out is not None:
        check_out(out, (x.shape[0], *out_shape, kernel.shape[3]), dtype)
    if engine == "gemm":
        from conv3dt.engine.gemm_engine import conv_transpose_region_gemm

        run = conv_transpose_region_gemm
    elif engine == "numba":
        from conv3dt.engine.direct_engine import conv_transpose_region_direct

        run = conv_transpose_region_direct
    elif engine == "separable":
        from conv3dt.engine.separable import conv_transpose_region_separable

        run = conv_transpose_region_separable
    else:
        run = conv_transpose_region_numpy
    return run(x, kernel, strides, dilation, in_origin, out_start, out_shape, dtype, epilogue, out)
