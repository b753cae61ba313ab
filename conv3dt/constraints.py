"""Keras's weight constraints on NumPy arrays, by name or serialized config.

A constraint projects a weight array (``__call__(w) -> array``, same shape and
dtype) exactly as ``keras.constraints.<Class>`` does, including Keras's 1e-7 added
to the norms. Norms are taken over ``axis`` (an int or a list of ints), by default
axis 0. For a Conv3DTranspose kernel ``(kd, kh, kw, filters, in_channels)`` Keras's
documented choice is ``axis=[0, 1, 2, 3]``: one norm per input channel.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from conv3dt._serialization import resolve_identifier, serialize_object

__all__ = [
    "Constraint",
    "MaxNorm",
    "MinMaxNorm",
    "NonNeg",
    "UnitNorm",
    "get",
    "satisfied",
    "serialize",
]

# Keras's backend epsilon, added to the norms before dividing by them.
_EPSILON = 1e-7


def _check_real(value: Any, name: str, owner: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or np.isnan(value):
        raise ValueError(f"`{name}` of {owner} must be a real number. Received: {name}={value!r}")
    return value


def _check_axis(axis: Any, owner: str) -> int | list[int]:
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        return int(axis)
    if (
        isinstance(axis, Sequence)
        and not isinstance(axis, (str, bytes))
        and all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axis)
    ):
        return [int(a) for a in axis]
    raise ValueError(
        f"`axis` of {owner} must be an integer or a list of integers. Received: axis={axis!r}"
    )


def _float_array(w: Any) -> np.ndarray:
    w = np.asarray(w)
    if w.dtype.kind != "f" and w.dtype.name != "bfloat16":
        raise ValueError(f"Constraints take floating arrays. Received an array of dtype {w.dtype}")
    return w


class Constraint:
    """Base class: ``__call__(w) -> array``, ``get_config() -> dict``."""

    def __call__(self, w: np.ndarray) -> np.ndarray:
        """The projection of ``w``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as Keras's ``get_config()`` gives them."""
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Constraint:
        """Create the constraint from :meth:`get_config`'s output."""
        return cls(**config)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class _NormConstraint(Constraint):
    # Rescale w so that each norm over `axis` becomes desired(norms).
    axis: int | list[int]

    def _desired(self, norms: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, w: np.ndarray) -> np.ndarray:
        """Rescale ``w`` along ``axis``; same shape and dtype.

        Raises
        ------
        ValueError
            When ``axis`` does not fit ``w``'s rank.
        """
        w = _float_array(w)
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        if any(not -w.ndim <= a < w.ndim for a in axes):
            raise ValueError(
                f"`axis`={self.axis} of {type(self).__name__} is out of range for a weight "
                f"of shape {w.shape}."
            )
        compute = np.float64 if w.dtype == np.float64 else np.float32
        values = w.astype(compute, copy=False)
        norms = np.sqrt(np.sum(np.square(values), axis=axes, keepdims=True))
        scale = self._desired(norms) / (compute(_EPSILON) + norms)
        return (values * scale).astype(w.dtype, copy=False)


class MaxNorm(_NormConstraint):
    """Scale down the slices whose norm over ``axis`` exceeds ``max_value``.

    Parameters
    ----------
    max_value : float
        Defaults to 2, as in Keras.
    axis : int or list of int
        Defaults to 0.
    """

    def __init__(self, max_value: float = 2, axis: int | Sequence[int] = 0) -> None:
        self.max_value = _check_real(max_value, "max_value", "MaxNorm")
        self.axis = _check_axis(axis, "MaxNorm")

    def _desired(self, norms: np.ndarray) -> np.ndarray:
        return np.clip(norms, 0, self.max_value)

    def get_config(self) -> dict[str, Any]:
        """``{"max_value": max_value, "axis": axis}``."""
        return {"max_value": self.max_value, "axis": self.axis}


class MinMaxNorm(_NormConstraint):
    """Move the norms over ``axis`` into ``[min_value, max_value]`` at ``rate``.

    The new norm is ``rate * clip(norm, min_value, max_value) + (1 - rate) * norm``.
    """

    def __init__(
        self,
        min_value: float = 0.0,
        max_value: float = 1.0,
        rate: float = 1.0,
        axis: int | Sequence[int] = 0,
    ) -> None:
        self.min_value = _check_real(min_value, "min_value", "MinMaxNorm")
        self.max_value = _check_real(max_value, "max_value", "MinMaxNorm")
        self.rate = _check_real(rate, "rate", "MinMaxNorm")
        self.axis = _check_axis(axis, "MinMaxNorm")

    def _desired(self, norms: np.ndarray) -> np.ndarray:
        clipped = np.clip(norms, self.min_value, self.max_value)
        return self.rate * clipped + (1 - self.rate) * norms

    def get_config(self) -> dict[str, Any]:
        """``{"min_value", "max_value", "rate", "axis"}``."""
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "rate": self.rate,
            "axis": self.axis,
        }


class UnitNorm(_NormConstraint):
    """Scale every slice over ``axis`` to norm 1 (``w / (1e-7 + norm)``)."""

    def __init__(self, axis: int | Sequence[int] = 0) -> None:
        self.axis = _check_axis(axis, "UnitNorm")

    def _desired(self, norms: np.ndarray) -> np.ndarray:
        return np.ones_like(norms)

    def get_config(self) -> dict[str, Any]:
        """``{"axis": axis}``."""
        return {"axis": self.axis}


class NonNeg(Constraint):
    """Clip negative weights to 0."""

    def __call__(self, w: np.ndarray) -> np.ndarray:
        """``max(w, 0)``; same shape and dtype."""
        w = _float_array(w)
        return np.maximum(w, w.dtype.type(0))


_REGISTRY: dict[str, type[Constraint]] = {
    "MaxNorm": MaxNorm,
    "max_norm": MaxNorm,
    "MinMaxNorm": MinMaxNorm,
    "min_max_norm": MinMaxNorm,
    "NonNeg": NonNeg,
    "non_neg": NonNeg,
    "UnitNorm": UnitNorm,
    "unit_norm": UnitNorm,
}


def get(identifier: str | dict[str, Any] | Constraint | None) -> Constraint | None:
    """Resolve a constraint as ``keras.constraints.get`` does.

    Parameters
    ----------
    identifier : str, dict, Constraint, Constraint subclass or None
        A name (``"max_norm"``, ``"min_max_norm"``, ``"non_neg"``, ``"unit_norm"`` or
        a class name) for the class with its defaults, Keras's serialized dict
        (``{"module": "keras.constraints", "class_name": "MaxNorm", "config":
        {"max_value": 2, "axis": 0}, "registered_name": None}``), or an instance.

    Returns
    -------
    Constraint or None

    Raises
    ------
    ValueError
        Unknown names (the message lists the valid ones), malformed dicts, custom
        objects, unknown config keys, bad argument values.
    """
    return resolve_identifier(identifier, kind="constraint", base=Constraint, registry=_REGISTRY)


def serialize(constraint: Constraint | None) -> dict[str, Any] | None:
    """Keras's serialized dict of a constraint (``None`` for ``None``)."""
    return serialize_object(constraint, kind="constraint", module="keras.constraints")


def satisfied(constraint: Constraint | None, w: np.ndarray, atol: float = 1e-6) -> bool:
    """Whether applying ``constraint`` leaves ``w`` unchanged within ``atol``.

    ``None`` (no constraint) is always satisfied.
    """
    if constraint is None:
        return True
    w = np.asarray(w)
    projected = np.asarray(constraint(w))
    return bool(
        np.allclose(projected.astype(np.float64), w.astype(np.float64), rtol=0.0, atol=atol)
    )
