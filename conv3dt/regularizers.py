"""Keras's weight and activity regularizers on NumPy arrays, by name or serialized config.

A regularizer maps an array to a penalty (a Python float) equal to the value
``keras.regularizers.<Class>`` computes. As in Keras, every step is in the
array's dtype: the factor is cast to it, squares, sums and products are rounded
to it (a float16 kernel's penalty is a float16 number). Sums are accumulated in
float64 and rounded once, as the backends' wider accumulators do.

Keras quirks kept on purpose: ``L1`` and ``OrthogonalRegularizer`` keep their
factor as a float32 tensor, so their configs report the float32-rounded value
(``L1(0.01).get_config() == {"l1": 0.009999999776482582}``); the name
``"l1l2"`` gives ``L1L2()``, whose factors default to 0; ``"l1_l2"``, the name
Keras's docstring shows, is refused as Keras's ``get`` refuses it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from conv3dt._serialization import resolve_identifier, serialize_object

__all__ = [
    "L1",
    "L1L2",
    "L2",
    "OrthogonalRegularizer",
    "Regularizer",
    "get",
    "serialize",
]

# Keras's backend epsilon, the floor of OrthogonalRegularizer's row norms.
_EPSILON = 1e-7


def _penalty_factor(value: Any, name: str, default: float) -> float:
    """Keras's check: a finite non-negative number (``None`` means the default)."""
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"Invalid value for argument {name}: expected a non-negative float. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def _float_array(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
        raise ValueError(f"Regularizers take floating arrays. Received an array of dtype {x.dtype}")
    return x


def _in_dtype(factor: float, x: np.ndarray) -> float:
    # Keras casts the factor to the weight's dtype before multiplying.
    return float(np.asarray(factor, dtype=x.dtype))


def _scaled_sum(factor: float, terms: np.ndarray) -> np.ndarray:
    """``factor * sum(terms)`` as Keras's ops compute it: a 0-d array of ``terms``' dtype."""
    dtype = terms.dtype
    total = np.asarray(np.sum(terms, dtype=np.float64), dtype=dtype)
    return np.multiply(np.asarray(factor, dtype=dtype), total, dtype=dtype)


class Regularizer:
    """Base class: ``__call__(x) -> float``, ``get_config() -> dict``."""

    def __call__(self, x: np.ndarray) -> float:
        """The penalty for ``x``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as Keras's ``get_config()`` gives them."""
        raise NotImplementedError(f"{type(self).__name__} does not implement get_config")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Regularizer:
        """Create the regularizer from :meth:`get_config`'s output."""
        return cls(**config)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class L1L2(Regularizer):
    """``l1 * sum(|x|) + l2 * sum(x**2)``; both factors default to 0."""

    def __init__(self, l1: float | None = 0.0, l2: float | None = 0.0) -> None:
        self.l1 = _penalty_factor(l1, "l1", 0.0)
        self.l2 = _penalty_factor(l2, "l2", 0.0)

    def __call__(self, x: np.ndarray) -> float:
        """``l1 * sum(|x|) + l2 * sum(x**2)``, skipping a zero factor as Keras does."""
        x = _float_array(x)
        total = np.zeros((), dtype=x.dtype)
        if self.l1 != 0.0:
            total = np.add(total, _scaled_sum(self.l1, np.abs(x)), dtype=x.dtype)
        if self.l2 != 0.0:
            total = np.add(total, _scaled_sum(self.l2, np.square(x)), dtype=x.dtype)
        return float(total)

    def get_config(self) -> dict[str, Any]:
        """``{"l1": l1, "l2": l2}``."""
        return {"l1": self.l1, "l2": self.l2}


class L1(Regularizer):
    """``l1 * sum(|x|)``; ``l1`` defaults to 0.01 and is kept in float32 as by Keras."""

    def __init__(self, l1: float | None = 0.01) -> None:
        self.l1 = float(np.float32(_penalty_factor(l1, "l1", 0.01)))

    def __call__(self, x: np.ndarray) -> float:
        """``l1 * sum(|x|)``."""
        x = _float_array(x)
        return float(_scaled_sum(self.l1, np.abs(x)))

    def get_config(self) -> dict[str, Any]:
        """``{"l1": l1}`` (float32-rounded)."""
        return {"l1": self.l1}


class L2(Regularizer):
    """``l2 * sum(x**2)``; ``l2`` defaults to 0.01."""

    def __init__(self, l2: float | None = 0.01) -> None:
        self.l2 = _penalty_factor(l2, "l2", 0.01)

    def __call__(self, x: np.ndarray) -> float:
        """``l2 * sum(x**2)``."""
        x = _float_array(x)
        return float(_scaled_sum(self.l2, np.square(x)))

    def get_config(self) -> dict[str, Any]:
        """``{"l2": l2}``."""
        return {"l2": self.l2}


class OrthogonalRegularizer(Regularizer):
    """Penalty on the cosines between the rows (or columns) of a matrix.

    ``factor * 0.5 * sum(|cos(v_i, v_j)|, i != j) / (n (n - 1) / 2)`` over the ``n``
    rows (``mode="rows"``) or columns (``mode="columns"``) of a rank-2 input; norms
    are floored at 1e-7 as in Keras. With a single row/column Keras divides 0 by 0
    and returns NaN; so does this.
    """

    def __init__(self, factor: float = 0.01, mode: str = "rows") -> None:
        self.factor = float(np.float32(_penalty_factor(factor, "factor", 0.01)))
        if mode not in ("rows", "columns"):
            raise ValueError(
                "Invalid value for argument `mode`. Expected one of "
                f'{{"rows", "columns"}}. Received: mode={mode!r}'
            )
        self.mode = mode

    def __call__(self, x: np.ndarray) -> float:
        """The penalty for a rank-2 ``x``.

        Raises
        ------
        ValueError
            For an input whose rank is not 2.
        """
        x = _float_array(x)
        if x.ndim != 2:
            raise ValueError(
                "Inputs to OrthogonalRegularizer must have rank 2. "
                f"Received: inputs.shape={x.shape}"
            )
        vectors = x.astype(np.float64) if self.mode == "rows" else x.T.astype(np.float64)
        # min(1 / norm, 1 / eps) as Keras's normalize, without dividing by a zero norm.
        norms = np.sqrt(np.maximum(np.sum(np.square(vectors), axis=1, keepdims=True), _EPSILON**2))
        unit = vectors / norms
        product = np.abs(unit @ unit.T)
        size = product.shape[0]
        pairs = size * (size - 1) / 2.0
        off_diagonal = float(np.sum(product) - np.trace(product))
        if pairs == 0:
            return math.nan
        return _in_dtype(self.factor, x) * 0.5 * off_diagonal / pairs

    def get_config(self) -> dict[str, Any]:
        """``{"factor": factor, "mode": mode}`` (factor float32-rounded)."""
        return {"factor": self.factor, "mode": self.mode}


_REGISTRY: dict[str, type[Regularizer]] = {
    "L1": L1,
    "l1": L1,
    "L2": L2,
    "l2": L2,
    "L1L2": L1L2,
    "l1l2": L1L2,
    "OrthogonalRegularizer": OrthogonalRegularizer,
    "orthogonal_regularizer": OrthogonalRegularizer,
}


def get(identifier: str | dict[str, Any] | Regularizer | None) -> Regularizer | None:
    """Resolve a regularizer as ``keras.regularizers.get`` does.

    Parameters
    ----------
    identifier : str, dict, Regularizer, Regularizer subclass or None
        A name (``"l1"``, ``"l2"``, ``"l1l2"``, ``"orthogonal_regularizer"`` or a
        class name) for the class with its defaults, Keras's serialized dict
        (``{"module": "keras.regularizers", "class_name": "L2", "config": {"l2": 0.01},
        "registered_name": None}``), or an instance (returned as is).

    Returns
    -------
    Regularizer or None

    Raises
    ------
    ValueError
        Unknown names (the message lists the valid ones), malformed dicts, custom
        objects, unknown config keys, bad factors.
    """
    return resolve_identifier(identifier, kind="regularizer", base=Regularizer, registry=_REGISTRY)


def serialize(regularizer: Regularizer | None) -> dict[str, Any] | None:
    """Keras's serialized dict of a regularizer (``None`` for ``None``)."""
    return serialize_object(regularizer, kind="regularizer", module="keras.regularizers")
