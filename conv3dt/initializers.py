"""Keras's weight initializers, drawing NumPy arrays, by name or by serialized config.

The classes carry Keras 3's names, arguments, defaults and ``get_config()``, and
draw from the same distributions (same bounds, same fan rule, same truncation),
with NumPy's ``default_rng`` as the generator: a seed gives reproducible values
here, not the values Keras's backend would draw.

Seeds. An initializer built with ``seed=None`` picks a private seed when it is
created, so that, as in Keras, calling the same instance twice gives the same
values. The ``seed`` argument of ``__call__`` replaces that private seed (never a
seed given in the config), which makes a whole run reproducible from one number.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from conv3dt._serialization import resolve_identifier, serialize_object

__all__ = [
    "Constant",
    "GlorotNormal",
    "GlorotUniform",
    "HeNormal",
    "HeUniform",
    "Identity",
    "Initializer",
    "LecunNormal",
    "LecunUniform",
    "Ones",
    "Orthogonal",
    "RandomNormal",
    "RandomUniform",
    "TruncatedNormal",
    "VarianceScaling",
    "Zeros",
    "compute_fans",
    "get",
    "serialize",
]

# Standard deviation of a unit normal truncated to (-2, 2): Keras divides by it so
# that VarianceScaling's truncated draws have the requested variance.
TRUNCATED_STDDEV_FACTOR = 0.87962566103423978


# ----------------------------------------------------------------- shared helpers
def _check_real(value: Any, name: str, owner: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"`{name}` of {owner} must be a real number. Received: {name}={value!r}")
    return value


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(
            f"`shape` must be a sequence of integers. Received: shape={shape!r}"
        ) from None
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 0:
            raise ValueError(
                f"`shape` must be a sequence of non-negative integers. Received: shape={shape!r}"
            )
    return tuple(int(dim) for dim in dims)


def _check_dtype(dtype: Any, *, floating: bool) -> np.dtype:
    try:
        result = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"Unknown dtype. Received: dtype={dtype!r}") from None
    allowed = "f" if floating else "fiub"
    if result.kind not in allowed:
        wanted = "a floating dtype" if floating else "a numeric or boolean dtype"
        raise ValueError(f"This initializer needs {wanted}. Received: dtype={dtype!r}")
    return result


def _check_seed(seed: Any, name: str = "seed") -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(
            f"`{name}` must be an integer or None (Keras SeedGenerator objects are not "
            f"supported). Received: {name}={seed!r}"
        )
    return int(seed)


def _rng(seed: int) -> np.random.Generator:
    # default_rng wants a non-negative seed; Keras takes any int (bit-cast to uint32).
    return np.random.default_rng(seed % 2**64)


def compute_fans(
    shape: Sequence[int],
    input_axes: Sequence[int] | None = None,
    output_axes: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Keras's ``(fan_in, fan_out)`` for a weight shape.

    With both ``input_axes`` and ``output_axes``, the products of those axes.
    Otherwise: 1 and 1 for a scalar, ``n`` and ``n`` for a vector, the two
    dimensions of a matrix, and for a kernel ``(*spatial, a, b)`` the receptive
    field times ``a`` and times ``b``. For Conv3DTranspose's kernel
    ``(kd, kh, kw, filters, in_channels)`` that makes fan_in the receptive field
    times ``filters``: Keras applies the convolution rule to the transposed
    kernel unchanged, and so does this.
    """
    shape = tuple(shape)
    if input_axes is not None and output_axes is not None:
        return (
            int(math.prod(shape[axis] for axis in input_axes)),
            int(math.prod(shape[axis] for axis in output_axes)),
        )
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return int(shape[0]), int(shape[0])
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    receptive_field = math.prod(shape[:-2])
    return int(shape[-2] * receptive_field), int(shape[-1] * receptive_field)


# ---------------------------------------------------------------------- classes
class Initializer:
    """Base class: ``__call__(shape, dtype="float32", seed=None) -> numpy.ndarray``."""

    def __call__(
        self, shape: Sequence[int], dtype: Any = "float32", seed: int | None = None
    ) -> np.ndarray:
        """Return an array of ``shape`` and ``dtype`` drawn as the initializer says."""
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as Keras's ``get_config()`` gives them."""
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Initializer:
        """Create the initializer from :meth:`get_config`'s output."""
        return cls(**config)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class Zeros(Initializer):
    """All zeros."""

    def __call__(
        self, shape: Sequence[int], dtype: Any = "float32", seed: int | None = None
    ) -> np.ndarray:
        """Return zeros of ``shape`` and ``dtype`` (numeric or boolean); ``seed`` is unused."""
        return np.zeros(_check_shape(shape), _check_dtype(dtype, floating=False))


class Ones(Initializer):
    """All ones."""

    def __call__(
        self, shape: Sequence[int], dtype: Any = "float32", seed: int | None = None
    ) -> np.ndarray:
        """Return ones of ``shape`` and ``dtype`` (numeric or boolean); ``seed`` is unused."""
        return np.ones(_check_shape(shape), _check_dtype(dtype, floating=False))


class Constant(Initializer):
    """Every element equal to the scalar ``value``.

    Parameters
    ----------
    value : real number
        Keras's serialized form of a 0-d NumPy value (``{"class_name": "__numpy__",
        ...}``) is accepted too.
    """

    def __init__(self, value: float = 0.0) -> None:
        if isinstance(value, dict) and value.get("class_name") == "__numpy__":
            inner = value.get("config") or {}
            value = np.asarray(inner.get("value"), dtype=inner.get("dtype")).item()
        if isinstance(value, np.generic):
            value = value.item()
        self.value = _check_real(value, "value", "Constant")

    def __call__(
        self, shape: Sequence[int], dtype: Any = "float32", seed: int | None = None
    ) -> np.ndarray:
        """Return ``value`` in every element; ``seed`` is unused."""
        return np.full(_check_shape(shape), self.value, _check_dtype(dtype, floating=False))

    def get_config(self) -> dict[str, Any]:
        """``{"value": value}``."""
        return {"value": self.value}


class Identity(Initializer):
    """``gain`` times the identity matrix; 2D shapes only, as in Keras.

    Keras's ``get_config()`` for Identity is empty whatever the gain; so is this
    one's for the default gain, and it writes ``gain`` otherwise so that it is not
    lost (Keras reads it back).
    """

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = _check_real(gain, "gain", "Identity")

    def __call__(
        self, shape: Sequence[int], dtype: Any = "float32", seed: int | None = None
    ) -> np.ndarray:
        """Return the ``gain``-scaled identity; ``seed`` is unused.

        Raises
        ------
        ValueError
            For a shape whose rank is not 2 (a Conv3DTranspose kernel has rank 5).
        """
        dims = _check_shape(shape)
        if len(dims) != 2:
            raise ValueError(
                "Identity matrix initializer can only be used for 2D matrices. "
                f"Received: shape={tuple(shape)} of rank {len(dims)}."
            )
        return (self.gain * np.eye(*dims)).astype(_check_dtype(dtype, floating=False))

    def get_config(self) -> dict[str, Any]:
        """``{}`` for the default gain (as Keras), ``{"gain": gain}`` otherwise."""
        return {} if self.gain == 1.0 else {"gain": self.gain}


class _RandomInitializer(Initializer):
    def __init__(self, seed: int | None = None) -> None:
        self.seed = _check_seed(seed)
        # Same draw on every call of an unseeded instance, as in Keras.
        self._default_seed = int(np.random.SeedSequence().entropy)

    def _generator(self, seed: int | None) -> np.random.Generator:
        if self.seed is not None:
            return _rng(self.seed)
        seed = _check_seed(seed)
        return _rng(self._default_seed if seed is None else seed)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


def _truncated_standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Redraw every value outside (-2, 2); each pass keeps ~95% of what it draws.
    values = rng.standard_normal(shape)
    outside = np.abs(values) >= 2
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) >= 2
    return values


class RandomNormal(_RandomInitializer):
    """Normal draws with ``mean`` and ``stddev``."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None) -> None:
        self.mean = _check_real(mean, "mean", "RandomNormal")
        self.stddev = _check_real(stddev, "stddev", "RandomNormal")
        super().__init__(seed)

    def __call__(
        self, shape: Sequence[int], dtype: Any = "float32", seed: int | None = None
    ) -> np.ndarray:
        """Return normal draws of ``shape`` and floating ``dtype``."""
        dims, out = _check_shape(shape), _check_dtype(dtype, floating=True)
        values = self._generator(seed).standard_normal(dims)
        return (values * self.stddev + self.mean).astype(out)

    def get_config(self) -> dict[str, Any]:
        """``seed``, ``mean``, ``stddev`` (Keras's order)."""
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


class TruncatedNormal(_RandomInitializer):
    """Normal draws with ``mean`` and ``stddev``, redrawn beyond two ``stddev``."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None) -> None:
        self.mean = _check_real(mean, "mean", "TruncatedNormal")
        self.stddev = _check_real(stddev, "stddev", "TruncatedNormal")
        super().__init__(seed)

    def __call__(
        self, shape: Sequence[int], dtype: Any = "float32", seed: int | None = None
    ) -> np.ndarray:
        """Return truncated normal draws of ``shape`` and floating ``dtype``."""
        dims, out = _check_shape(shape), _check_dtype(dtype, floating=True)
        values = _truncated_standard_normal(self._generator(seed), dims)
        return (values * self.stddev + self.mean).astype(out)

    def get_config(self) -> dict[str, Any]:
        """``seed``, ``mean``, ``stddev`` (Keras's order)."""
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


class RandomUniform(_RandomInitializer):
    """Uniform draws in ``[minval, maxval)``."""

    def __init__(
        self, minval: float = -0.05, maxval: float = 0.05, seed: int | None = None
    ) -> None:
        self.minval = _check_real(minval, "minval", "RandomUniform")
        self.maxval = _check_real(maxval, "maxval", "RandomUniform")
        super().__init__(seed)

    def __call__(
        self, shape: Sequence[int], dtype: Any = "float32", seed: int | None = None
    ) -> np.ndarray:
        """Return uniform draws of ``shape`` and floating ``dtype``."""
        dims, out = _check_shape(shape), _check_dtype(dtype, floating=True)
        return self._generator(seed).uniform(self.minval, self.maxval, dims).astype(out)

    def get_config(self) -> dict[str, Any]:
        """``seed``, ``minval``, ``maxval`` (Keras's order)."""
        return {**super().get_config(), "minval": self.minval, "maxval": self.maxval}


def _check_axes(axes: Any, name: str) -> list[int] | None:
    if axes is None:
        return None
    if isinstance(axes, (str, bytes)) or not isinstance(axes, Sequence):
        raise ValueError(f"`{name}` must be a list of integers or None. Received: {name}={axes!r}")
    for axis in axes:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise ValueError(
                f"`{name}` must be a list of integers or None. Received: {name}={axes!r}"
            )
    return [int(axis) for axis in axes]


class VarianceScaling(_RandomInitializer):
    """Draws whose variance is ``scale / n``, ``n`` a fan of the shape (see :func:`compute_fans`).

    Parameters
    ----------
    scale : float > 0
    mode : {"fan_in", "fan_out", "fan_avg"}
    distribution : {"truncated_normal", "untruncated_normal", "uniform"}
        ``"normal"`` (Keras 2's name) means ``"truncated_normal"``; case-insensitive.
        Truncated draws are cut at two standard deviations and rescaled by
        ``1 / 0.8796...`` so that their variance is ``scale / n``; uniform draws
        lie in ``[-sqrt(3 scale / n), sqrt(3 scale / n))``.
    seed : int, optional
    input_axes, output_axes : list of int, optional
        When both are given, the fans are the products of these axes' sizes.
    """

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "fan_in",
        distribution: str = "truncated_normal",
        seed: int | None = None,
        input_axes: Sequence[int] | None = None,
        output_axes: Sequence[int] | None = None,
    ) -> None:
        scale = _check_real(scale, "scale", type(self).__name__)
        if scale <= 0.0:
            raise ValueError(f"Argument `scale` must be positive float. Received: scale={scale}")
        modes = ("fan_in", "fan_out", "fan_avg")
        if mode not in modes:
            raise ValueError(f"Invalid `mode` argument: {mode!r}. Please use one of {modes}")
        if not isinstance(distribution, str):
            raise ValueError(
                f"Invalid `distribution` argument: {distribution!r}. "
                "Please use one of 'truncated_normal', 'untruncated_normal', 'uniform'"
            )
        distribution = distribution.lower()
        if distribution == "normal":
            distribution = "truncated_normal"
        distributions = ("truncated_normal", "untruncated_normal", "uniform")
        if distribution not in distributions:
            raise ValueError(
                f"Invalid `distribution` argument: {distribution!r}. "
                f"Please use one of {distributions}"
            )
        self.scale = scale
        self.mode = mode
        self.distribution = distribution
        self.input_axes = _check_axes(input_axes, "input_axes")
        self.output_axes = _check_axes(output_axes, "output_axes")
        super().__init__(seed)

    def _fan(self, dims: tuple[int, ...]) -> float:
        if self.input_axes is not None and self.output_axes is not None:
            bad = [
                axis
                for axis in self.input_axes + self.output_axes
                if not -len(dims) <= axis < len(dims)
            ]
            if bad:
                raise ValueError(
                    f"`input_axes`/`output_axes` hold axes {bad}, out of range for shape={dims}."
                )
        fan_in, fan_out = compute_fans(dims, self.input_axes, self.output_axes)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}
        return max(1.0, fan[self.mode])

    def __call__(
        self, shape: Sequence[int], dtype: Any = "float32", seed: int | None = None
    ) -> np.ndarray:
        """Return draws of ``shape`` and floating ``dtype`` with variance ``scale / fan``."""
        dims, out = _check_shape(shape), _check_dtype(dtype, floating=True)
        variance = self.scale / self._fan(dims)
        rng = self._generator(seed)
        if self.distribution == "truncated_normal":
            stddev = math.sqrt(variance) / TRUNCATED_STDDEV_FACTOR
            values = _truncated_standard_normal(rng, dims) * stddev
        elif self.distribution == "untruncated_normal":
            values = rng.standard_normal(dims) * math.sqrt(variance)
        else:
            limit = math.sqrt(3.0 * variance)
            values = rng.uniform(-limit, limit, dims)
        return values.astype(out)

    def get_config(self) -> dict[str, Any]:
        """``seed``, ``scale``, ``mode``, ``distribution``, ``input_axes``, ``output_axes``."""
        return {
            **super().get_config(),
            "scale": self.scale,
            "mode": self.mode,
            "distribution": self.distribution,
            "input_axes": self.input_axes,
            "output_axes": self.output_axes,
        }


class _FixedVarianceScaling(VarianceScaling):
    # Keras's named presets: only the seed and the fan axes are arguments.
    _preset: tuple[float, str, str]

    def __init__(
        self,
        seed: int | None = None,
        input_axes: Sequence[int] | None = None,
        output_axes: Sequence[int] | None = None,
    ) -> None:
        scale, mode, distribution = self._preset
        super().__init__(scale, mode, distribution, seed, input_axes, output_axes)

    def get_config(self) -> dict[str, Any]:
        """``seed``, ``input_axes``, ``output_axes``."""
        return {"seed": self.seed, "input_axes": self.input_axes, "output_axes": self.output_axes}


class GlorotUniform(_FixedVarianceScaling):
    """Uniform in ``±sqrt(6 / (fan_in + fan_out))``."""

    _preset = (1.0, "fan_avg", "uniform")


class GlorotNormal(_FixedVarianceScaling):
    """Truncated normal with ``stddev = sqrt(2 / (fan_in + fan_out))``."""

    _preset = (1.0, "fan_avg", "truncated_normal")


class HeNormal(_FixedVarianceScaling):
    """Truncated normal with ``stddev = sqrt(2 / fan_in)``."""

    _preset = (2.0, "fan_in", "truncated_normal")


class HeUniform(_FixedVarianceScaling):
    """Uniform in ``±sqrt(6 / fan_in)``."""

    _preset = (2.0, "fan_in", "uniform")


class LecunNormal(_FixedVarianceScaling):
    """Truncated normal with ``stddev = sqrt(1 / fan_in)``."""

    _preset = (1.0, "fan_in", "truncated_normal")


class LecunUniform(_FixedVarianceScaling):
    """Uniform in ``±sqrt(3 / fan_in)``."""

    _preset = (1.0, "fan_in", "uniform")


class Orthogonal(_RandomInitializer):
    """``gain`` times an orthogonal matrix, reshaped.

    As in Keras: the shape is flattened to ``(prod(shape[:-1]), shape[-1])``, a
    normal matrix of the taller orientation is QR-factored, Q's columns take the
    signs of R's diagonal, and Q is transposed back when the flat shape is wide.
    """

    def __init__(self, gain: float = 1.0, seed: int | None = None) -> None:
        self.gain = _check_real(gain, "gain", "Orthogonal")
        super().__init__(seed)

    def __call__(
        self, shape: Sequence[int], dtype: Any = "float32", seed: int | None = None
    ) -> np.ndarray:
        """Return a (semi-)orthogonal array of ``shape`` (rank >= 2) and floating ``dtype``."""
        dims, out = _check_shape(shape), _check_dtype(dtype, floating=True)
        if len(dims) < 2:
            raise ValueError(
                "The tensor to initialize must be at least two-dimensional. "
                f"Received: shape={tuple(shape)} of rank {len(dims)}."
            )
        rows, cols = math.prod(dims[:-1]), dims[-1]
        matrix = self._generator(seed).standard_normal((max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(matrix)
        q = q * np.sign(np.diag(r))
        if rows < cols:
            q = q.T
        return (self.gain * q.reshape(dims)).astype(out)

    def get_config(self) -> dict[str, Any]:
        """``seed``, ``gain`` (Keras's order)."""
        return {**super().get_config(), "gain": self.gain}


_CLASSES: tuple[type[Initializer], ...] = (
    Constant,
    GlorotNormal,
    GlorotUniform,
    HeNormal,
    HeUniform,
    Identity,
    LecunNormal,
    LecunUniform,
    Ones,
    Orthogonal,
    RandomNormal,
    RandomUniform,
    TruncatedNormal,
    VarianceScaling,
    Zeros,
)


# Class names, their snake_case forms and Keras's aliases, as keras.initializers.get.
_REGISTRY: dict[str, type[Initializer]] = {cls.__name__: cls for cls in _CLASSES}
_REGISTRY.update(
    {
        "constant": Constant,
        "glorot_normal": GlorotNormal,
        "glorot_uniform": GlorotUniform,
        "he_normal": HeNormal,
        "he_uniform": HeUniform,
        "identity": Identity,
        "lecun_normal": LecunNormal,
        "lecun_uniform": LecunUniform,
        "ones": Ones,
        "orthogonal": Orthogonal,
        "random_normal": RandomNormal,
        "random_uniform": RandomUniform,
        "truncated_normal": TruncatedNormal,
        "variance_scaling": VarianceScaling,
        "zeros": Zeros,
        "IdentityInitializer": Identity,
        "OrthogonalInitializer": Orthogonal,
        "normal": RandomNormal,
        "uniform": RandomUniform,
        "one": Ones,
        "zero": Zeros,
    }
)

_STFT_REASON = (
    "it builds (frame_length, 1, fft_bins) kernels for Keras's STFTSpectrogram layer "
    "and has no meaning for a Conv3DTranspose kernel."
)
_REFUSED = dict.fromkeys(("STFT", "stft", "STFTInitializer"), _STFT_REASON)


def get(
    identifier: str | dict[str, Any] | Initializer | type[Initializer] | None,
) -> Initializer | None:
    """Resolve an initializer as ``keras.initializers.get`` does.

    Parameters
    ----------
    identifier : str, dict, Initializer, Initializer subclass or None
        A name (``"glorot_uniform"``, ``"GlorotUniform"``, ``"he_normal"``,
        ``"normal"``...), Keras's serialized dict (``{"module": "keras.initializers",
        "class_name": "GlorotUniform", "config": {"seed": None, ...},
        "registered_name": None}``; Keras 2's dicts without ``module`` also work), an
        instance (returned as is) or a class (instantiated with its defaults).

    Returns
    -------
    Initializer or None

    Raises
    ------
    ValueError
        Unknown names (the message lists the valid ones), STFT, malformed dicts,
        custom objects, unknown config keys, bad argument values.
    """
    return resolve_identifier(
        identifier, kind="initializer", base=Initializer, registry=_REGISTRY, refused=_REFUSED
    )


def serialize(initializer: Initializer | None) -> dict[str, Any] | None:
    """Keras's serialized dict of an initializer (``None`` for ``None``).

    ``{"module": "keras.initializers", "class_name": ..., "config": get_config(),
    "registered_name": None}``, as Keras writes it in a layer config.
    """
    return serialize_object(initializer, kind="initializer", module="keras.initializers")
