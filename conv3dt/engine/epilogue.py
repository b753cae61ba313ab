"""What follows the convolution sum: a bias and an elementwise activation.

The engines apply them in the same pass that writes each output voxel, while
the values are still in cache, instead of in further sweeps over the output.
The arithmetic is the layer's: the bias is added to the finished sum, then the
activation is applied, both in the compute dtype, with NumPy's semantics for
NaN and signed zeros (``relu`` as ``np.maximum(x, 0)``, ``relu6`` as
``np.clip(x, 0, 6)``). :meth:`Epilogue.apply` is the same in NumPy, for the
voxels and engines that have no fused pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FUSED_ACTIVATIONS", "Epilogue"]

# Codes the Numba kernels branch on.
LINEAR, RELU, RELU6 = 0, 1, 2
FUSED_ACTIVATIONS = {"linear": LINEAR, "relu": RELU, "relu6": RELU6}


@dataclass(frozen=True)
class Epilogue:
    """A bias (or none) and a fusable activation, ready for the kernels.

    Parameters
    ----------
    bias : ndarray, shape (filters,), or None
    activation : str
        A key of :data:`FUSED_ACTIVATIONS`.
    """

    bias: np.ndarray | None = None
    activation: str = "linear"

    def __post_init__(self) -> None:
        if self.activation not in FUSED_ACTIVATIONS:
            raise ValueError(
                f"The `activation` argument must be one of {', '.join(FUSED_ACTIVATIONS)} "
                f"(the activations the engines fuse). Received: activation={self.activation!r}"
            )

    @property
    def is_identity(self) -> bool:
        """Whether there is nothing to do."""
        return self.bias is None and self.activation == "linear"

    @property
    def code(self) -> int:
        """The activation's code for the Numba kernels."""
        return FUSED_ACTIVATIONS[self.activation]

    def kernel_args(self, dtype: np.dtype, repeat: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
        """``(bias, limits, code)`` for a Numba kernel.

        ``bias`` is tiled ``repeat`` times, and empty for a layer without one
        (the kernels' argument types then do not depend on it); ``limits`` holds
        0 and 6 in ``dtype`` for the activations to clamp with.
        """
        if self.bias is None:
            bias = np.zeros(0, dtype=dtype)
        else:
            bias = np.tile(self.bias.astype(dtype, copy=False), repeat)
        return bias, np.array([0, 6], dtype=dtype), self.code

    def apply(self, out: np.ndarray) -> None:
        """Add the bias and apply the activation to ``out`` (channels last) in place."""
        if self.bias is not None:
            np.add(out, self.bias.astype(out.dtype, copy=False), out=out)
        zero = out.dtype.type(0)
        if self.activation == "relu":
            np.maximum(out, zero, out=out)
        elif self.activation == "relu6":
            np.clip(out, zero, out.dtype.type(6), out=out)
