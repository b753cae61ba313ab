"""Keras dtype policies: the dtype weights are stored in and the dtype outputs are computed in."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from conv3dt.validation import excerpt

__all__ = ["DTypePolicy", "accumulation_dtype", "autocast", "get_policy", "numpy_dtype"]

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_MIXED = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a Keras float dtype name (bfloat16 needs ``ml_dtypes``)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError(
                "dtype 'bfloat16' needs the ml_dtypes package: pip install ml_dtypes"
            ) from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def accumulation_dtype(compute: np.dtype | str) -> np.dtype:
    """The dtype a convolution computed in ``compute`` sums in.

    float16 and bfloat16 sum in float32 and round the sum once, as JAX's
    half-precision convolutions do; other dtypes sum in themselves.
    """
    compute = numpy_dtype(compute) if isinstance(compute, str) else np.dtype(compute)
    return np.dtype(np.float32) if compute.itemsize < 4 else compute


def autocast(array: np.ndarray, compute_dtype: str) -> np.ndarray:
    """``array`` rounded to ``compute_dtype``, held in its accumulation dtype.

    Keras casts a layer's inputs (and, under ``mixed_*`` policies, its float32
    weights) to the compute dtype before the convolution: a float32 value
    between two float16 ones is rounded there, not carried into the sum.
    Integer arrays are converted the same way.
    """
    compute = numpy_dtype(compute_dtype)
    rounded = np.asarray(array).astype(compute, copy=False)
    return rounded.astype(accumulation_dtype(compute), copy=False)


def _default_floatx() -> str:
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return "float32"
    value = config.get("floatx") if isinstance(config, dict) else None
    return value if value in ("float16", "float32", "float64") else "float32"


@dataclass(frozen=True)
class DTypePolicy:
    """A Keras dtype policy by name: ``float32``, ``mixed_float16`` and so on."""

    name: str

    @property
    def variable_dtype(self) -> str:
        """Name of the dtype the weights are stored in."""
        return "float32" if self.name in _MIXED else self.name

    @property
    def compute_dtype(self) -> str:
        """Name of the dtype inputs are cast to and outputs come out in."""
        return _MIXED.get(self.name, self.name)

    def serialize(self) -> dict[str, Any]:
        """The dict Keras's ``layer.get_config()`` puts under ``dtype``."""
        return {
            "module": "keras",
            "class_name": "DTypePolicy",
            "config": {"name": self.name},
            "registered_name": None,
        }


def get_policy(identifier: str | dict | DTypePolicy | None) -> DTypePolicy:
    """Resolve a ``dtype`` argument as Keras does: None, a name, a serialized policy.

    Raises
    ------
    ValueError
        For an unknown name or a malformed dict, naming what was received.
        ``bfloat16`` policies need the ``ml_dtypes`` package.
    """
    if identifier is None:
        name = _default_floatx()
    elif isinstance(identifier, DTypePolicy):
        return identifier
    elif isinstance(identifier, dict):
        config = identifier.get("config")
        if identifier.get("class_name") not in ("DTypePolicy", "FloatDTypePolicy") or not (
            isinstance(config, dict) and isinstance(config.get("name"), str)
        ):
            raise ValueError(
                "Expected `dtype` as a name or a serialized DTypePolicy "
                "({'class_name': 'DTypePolicy', 'config': {'name': ...}}). "
                f"Received: dtype={excerpt(identifier)}"
            )
        name = config["name"]
    elif isinstance(identifier, str):
        name = identifier
    else:
        raise ValueError(
            f"Expected `dtype` as a string or a dict. Received: dtype={excerpt(identifier)}"
        )
    if name not in _FLOAT_NAMES and name not in _MIXED:
        raise ValueError(
            "Unsupported `dtype` for Conv3DTranspose: expected one of "
            f"{', '.join(_FLOAT_NAMES + tuple(_MIXED))}. Received: dtype={excerpt(name)}"
        )
    policy = DTypePolicy(name)
    numpy_dtype(policy.compute_dtype)
    return policy
