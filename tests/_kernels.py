"""Kernels the engine tests share: exactly separable ones, and the engines a kernel runs on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conv3dt.engine import ENGINES
from conv3dt.engine.separable import separable_factors


def separable_kernel(
    rng: np.random.Generator,
    kernel_size: Sequence[int],
    filters: int,
    channels: int,
    dtype: type = np.float32,
) -> np.ndarray:
    """A random kernel that is exactly ``u ⊗ v ⊗ w ⊗ M``, unit-scale.

    The factors are multiples of 1/8 (their products have at most 16
    significant bits, exact in float32 and float64, so
    :func:`separable_factors` finds them).
    """

    def factor(shape: Sequence[int]) -> np.ndarray:
        values = rng.integers(-8, 9, size=tuple(shape)) / 8.0
        values.flat[int(rng.integers(values.size))] = 1.0  # never all zeros
        return values

    u, v, w = (factor((n,)) for n in kernel_size)
    channel_matrix = factor((filters, channels))
    kernel = np.einsum("i,j,k,fc->ijkfc", u, v, w, channel_matrix)
    # Scaled by a power of two near 1 / sqrt(fan-in), which keeps it exact.
    kernel *= 2.0 ** -round(0.5 * np.log2(channels * np.prod(kernel_size)))
    return kernel.astype(dtype)


def engines_for(kernel: np.ndarray, strides: Sequence[int], engines: Sequence[str] = ENGINES):
    """``engines`` without ``"separable"`` when ``kernel`` is not separable (it refuses those)."""
    if separable_factors(kernel, strides) is not None:
        return tuple(engines)
    return tuple(e for e in engines if e != "separable")
