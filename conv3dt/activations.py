"""Keras's activation functions on NumPy arrays, by name or by serialized config.

Every function here matches ``keras.activations.<name>`` (Keras 3) with the same
parameters and defaults. Results keep the input's floating dtype; half-precision
inputs are computed in float32 and rounded back once, and integer or boolean inputs
are computed in float32 (Keras's default float type). Overflow to ``inf`` is the
IEEE result Keras gives too and raises no warning; the formulas avoid ``inf - inf``
and ``0 * inf`` on finite inputs (stable sigmoid, softplus, log-sigmoid, softmax,
log-softmax).
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from conv3dt._serialization import shown_name

__all__ = [
    "Activation",
    "ActivationLayer",
    "celu",
    "coupled_axes",
    "elu",
    "exponential",
    "gelu",
    "get",
    "glu",
    "hard_shrink",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    "hard_tanh",
    "leaky_relu",
    "linear",
    "log_sigmoid",
    "log_softmax",
    "mish",
    "names",
    "output_dtype",
    "relu",
    "relu6",
    "selu",
    "serialize",
    "sigmoid",
    "silu",
    "soft_shrink",
    "softmax",
    "softplus",
    "softsign",
    "sparse_plus",
    "sparse_sigmoid",
    "sparsemax",
    "squareplus",
    "swish",
    "tanh",
    "tanh_shrink",
    "threshold",
]

Activation = Callable[[np.ndarray], np.ndarray]

# SELU's fixed point constants (Klambauer et al., 2017), as Keras spells them.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _compute_dtype(x: np.ndarray) -> np.dtype:
    if x.dtype in (np.float32, np.float64):
        return x.dtype
    return np.dtype(np.float32)


def _result_dtype(x: np.ndarray) -> np.dtype:
    # float16 and ml_dtypes' bfloat16 ("V" kind) keep their dtype; others become float32.
    if x.dtype.kind == "f" or x.dtype.name == "bfloat16":
        return x.dtype
    return np.dtype(np.float32)


def _elementwise(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Run ``fn`` on a float32/float64 array and give the result the input's dtype."""

    @functools.wraps(fn)
    def wrapper(x: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        x = np.asarray(x)
        out_dtype = _result_dtype(x)
        with np.errstate(over="ignore"):
            y = np.asarray(fn(x.astype(_compute_dtype(x), copy=False), *args, **kwargs))
        return y.astype(out_dtype, copy=False)

    return wrapper


def _check_axis(x: np.ndarray, axis: int, name: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"`axis` of {name} must be an integer. Received: axis={axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"`axis` of {name} is out of range for an input of rank {x.ndim}. Received: axis={axis}"
        )
    return int(axis)


@_elementwise
def relu(
    x: np.ndarray,
    negative_slope: float = 0.0,
    max_value: float | None = None,
    threshold: float = 0.0,
) -> np.ndarray:
    """Rectified linear unit, with Keras's optional slope, ceiling and threshold.

    Parameters
    ----------
    x : array
    negative_slope : float
        Slope applied below ``threshold``.
    max_value : float, optional
        Saturation value.
    threshold : float
        Values at or below it are damped (set to zero when ``negative_slope`` is 0).

    Returns
    -------
    numpy.ndarray
        Same shape and float dtype as ``x``.
    """
    zero = x.dtype.type(0)
    if negative_slope != 0.0 and max_value is None and threshold == 0:
        return np.where(x > zero, x, x * negative_slope)
    below = np.maximum(threshold - x, zero) if negative_slope != 0.0 else None
    if threshold != 0:
        y = np.where(x > x.dtype.type(threshold), x, zero)
    else:
        y = np.maximum(x, zero)
    if max_value is not None:
        y = np.clip(y, zero, x.dtype.type(max_value))
    if below is not None:
        y = y - negative_slope * below
    return y


@_elementwise
def leaky_relu(x: np.ndarray, negative_slope: float = 0.2) -> np.ndarray:
    """``x`` where positive, ``negative_slope * x`` elsewhere."""
    return np.where(x > 0, x, x * negative_slope)


@_elementwise
def relu6(x: np.ndarray) -> np.ndarray:
    """ReLU capped at 6."""
    return np.clip(x, x.dtype.type(0), x.dtype.type(6))


def _stable_sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a non-positive number never overflows; the two branches agree at 0.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _stable_softplus(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, x.dtype.type(0)) + np.log1p(np.exp(-np.abs(x)))


@_elementwise
def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function ``1 / (1 + exp(-x))``, computed without overflow."""
    return _stable_sigmoid(x)


@_elementwise
def sparse_sigmoid(x: np.ndarray) -> np.ndarray:
    """0 for ``x <= -1``, 1 for ``x >= 1``, ``(x + 1) / 2`` between."""
    return np.clip((x + 1) * 0.5, x.dtype.type(0), x.dtype.type(1))


@_elementwise
def hard_sigmoid(x: np.ndarray) -> np.ndarray:
    """Piecewise-linear sigmoid: ``clip(x / 6 + 1 / 2, 0, 1)``."""
    return np.clip(x + 3, x.dtype.type(0), x.dtype.type(6)) / 6


@_elementwise
def hard_silu(x: np.ndarray) -> np.ndarray:
    """``x * hard_sigmoid(x)`` (also named hard swish)."""
    return x * (np.clip(x + 3, x.dtype.type(0), x.dtype.type(6)) / 6)


hard_swish = hard_silu


@_elementwise
def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)`` (also named swish)."""
    return x * _stable_sigmoid(x)


swish = silu


@_elementwise
def softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + exp(x))``, computed as ``max(x, 0) + log1p(exp(-|x|))``."""
    return _stable_softplus(x)


@_elementwise
def softsign(x: np.ndarray) -> np.ndarray:
    """``x / (1 + |x|)``."""
    return x / (1 + np.abs(x))


@_elementwise
def tanh(x: np.ndarray) -> np.ndarray:
    """Hyperbolic tangent."""
    return np.tanh(x)


@_elementwise
def tanh_shrink(x: np.ndarray) -> np.ndarray:
    """``x - tanh(x)``."""
    return x - np.tanh(x)


@_elementwise
def hard_tanh(x: np.ndarray) -> np.ndarray:
    """``x`` clipped to [-1, 1]."""
    return np.clip(x, x.dtype.type(-1), x.dtype.type(1))


@_elementwise
def hard_shrink(x: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``x`` where ``|x| > threshold``, 0 elsewhere."""
    return np.where(np.abs(x) > x.dtype.type(threshold), x, x.dtype.type(0))


@_elementwise
def soft_shrink(x: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``x`` moved towards 0 by ``threshold``, and 0 within ``[-threshold, threshold]``."""
    t = x.dtype.type(threshold)
    return np.where(x > t, x - t, np.where(x < -t, x + t, x.dtype.type(0)))


@_elementwise
def threshold(x: np.ndarray, threshold: float, default_value: float) -> np.ndarray:
    """``x`` where ``x > threshold``, ``default_value`` elsewhere.

    Both parameters are required, as in Keras, so :func:`get` refuses this name:
    a layer calls its activation with the input alone.
    """
    return np.where(x > x.dtype.type(threshold), x, x.dtype.type(default_value))


@_elementwise
def exponential(x: np.ndarray) -> np.ndarray:
    """``exp(x)``."""
    return np.exp(x)


def linear(x: np.ndarray) -> np.ndarray:
    """Identity: returns the input unmodified (as Keras does, without a dtype change)."""
    return np.asarray(x)


@_elementwise
def elu(x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``x`` for ``x > 0``, ``alpha * (exp(x) - 1)`` elsewhere."""
    zero = x.dtype.type(0)
    return np.where(x > zero, x, alpha * np.expm1(np.minimum(x, zero)))


@_elementwise
def selu(x: np.ndarray) -> np.ndarray:
    """Scaled ELU with Keras's fixed ``alpha`` and ``scale``."""
    zero = x.dtype.type(0)
    negative = _SELU_ALPHA * np.expm1(np.minimum(x, zero))
    return _SELU_SCALE * np.where(x > zero, x, negative)


@_elementwise
def celu(x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``max(x, 0) + alpha * (exp(min(x, 0) / alpha) - 1)``."""
    zero = x.dtype.type(0)
    return np.maximum(x, zero) + alpha * np.expm1(np.minimum(x, zero) / alpha)


@functools.cache
def _erf_ufunc() -> np.ufunc:
    # NumPy has no erf and SciPy is no dependency; numba compiles the C library's
    # erf/erff into a ufunc, once, on the first exact GELU.
    import numba

    @numba.vectorize(["float32(float32)", "float64(float64)"])
    def erf(value):  # pragma: no cover - compiled, not traced
        return math.erf(value)

    return erf


@_elementwise
def gelu(x: np.ndarray, approximate: bool = False) -> np.ndarray:
    """Gaussian error linear unit ``x * Phi(x)``; ``approximate`` uses the tanh form."""
    if approximate:
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1 + np.tanh(inner))
    return 0.5 * x * (1 + _erf_ufunc()(x / math.sqrt(2)))


@_elementwise
def mish(x: np.ndarray) -> np.ndarray:
    """``x * tanh(softplus(x))``."""
    return x * np.tanh(_stable_softplus(x))


@_elementwise
def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """``log(sigmoid(x))``, computed as ``min(x, 0) - log1p(exp(-|x|))``."""
    return np.minimum(x, x.dtype.type(0)) - np.log1p(np.exp(-np.abs(x)))


@_elementwise
def squareplus(x: np.ndarray, b: float = 4) -> np.ndarray:
    """``(x + sqrt(x**2 + b)) / 2``.

    For negative ``x`` the sum cancels; the equal form ``b / (sqrt(x**2 + b) - x)``
    keeps its precision there.
    """
    root = np.sqrt(x * x + x.dtype.type(b))
    # With b == 0 the unused branch divides 0 by 0 where x >= 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        negative = b / (root - x)
    return np.where(x >= 0, x + root, negative) / 2


@_elementwise
def sparse_plus(x: np.ndarray) -> np.ndarray:
    """0 for ``x <= -1``, ``(x + 1)**2 / 4`` for ``-1 < x < 1``, ``x`` for ``x >= 1``."""
    middle = 0.25 * np.square(np.clip(x, x.dtype.type(-1), x.dtype.type(1)) + 1)
    return np.where(x <= -1, x.dtype.type(0), np.where(x < 1, middle, x))


@_elementwise
def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``exp(x) / sum(exp(x))`` along ``axis`` (the last by default, whatever the layout)."""
    axis = _check_axis(x, axis, "softmax")
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


@_elementwise
def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x - logsumexp(x)`` along ``axis``, shifted by the maximum for stability."""
    axis = _check_axis(x, axis, "log_softmax")
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


@_elementwise
def sparsemax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Euclidean projection of ``x`` onto the probability simplex along ``axis``.

    Martins & Astudillo (2016): ``max(x - tau, 0)`` where ``tau`` makes the
    result sum to 1.
    """
    axis = _check_axis(x, axis, "sparsemax")
    z = np.moveaxis(x, axis, -1)
    ordered = -np.sort(-z, axis=-1)
    cumulative = np.cumsum(ordered, axis=-1)
    ranks = np.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    support = ordered - (cumulative - 1) / ranks > 0
    # The largest entry is always in the support (its test reads 1 > 0); rounding
    # can lose that for huge values, and an empty support would divide by zero.
    support[..., 0] = True
    count = np.sum(support, axis=-1, keepdims=True)
    tau = (np.sum(np.where(support, cumulative, 0), axis=-1, keepdims=True) - 1) / count
    return np.moveaxis(np.maximum(z - tau, z.dtype.type(0)), -1, axis)


@_elementwise
def glu(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Gated linear unit: ``a * sigmoid(b)`` for the two halves ``a, b`` of ``axis``.

    The result has half the size of ``x`` along ``axis``.
    """
    axis = _check_axis(x, axis, "glu")
    if x.shape[axis] % 2 != 0:
        raise ValueError(
            f"glu needs an even size along its axis. Received: x.shape={x.shape} with axis={axis}"
        )
    a, b = np.split(x, 2, axis=axis)
    return a * _stable_sigmoid(b)


# Name -> function, as keras.activations.get resolves names (with Keras's two aliases).
_BY_NAME: dict[str, Activation] = {
    fn.__name__: fn
    for fn in (
        celu,
        elu,
        exponential,
        gelu,
        glu,
        hard_shrink,
        hard_sigmoid,
        hard_silu,
        hard_tanh,
        leaky_relu,
        linear,
        log_sigmoid,
        log_softmax,
        mish,
        relu,
        relu6,
        selu,
        sigmoid,
        silu,
        soft_shrink,
        softmax,
        softplus,
        softsign,
        sparse_plus,
        sparse_sigmoid,
        sparsemax,
        squareplus,
        tanh,
        tanh_shrink,
        threshold,
    )
}
_BY_NAME["swish"] = silu
_BY_NAME["hard_swish"] = hard_silu

# Function -> the name Keras writes in a layer config (the canonical one for aliases).
_NAME_OF: dict[int, str] = {id(fn): fn.__name__ for fn in _BY_NAME.values()}

# Keras writes built-in functions with one of these modules (serialize_keras_object
# gives "builtins"; older files name the activations module).
_FUNCTION_MODULES = ("builtins", "keras.activations", "keras.src.activations.activations")


# Keras's activation layers that hold no weights (keras.layers.ReLU...): their
# arguments and defaults. PReLU learns its slopes, so it is not among them.
_LAYER_ARGUMENTS: dict[str, dict[str, Any]] = {
    "ReLU": {"max_value": None, "negative_slope": 0.0, "threshold": 0.0},
    "LeakyReLU": {"negative_slope": 0.3},
    "ELU": {"alpha": 1.0},
    "Softmax": {"axis": -1},
    "Activation": {"activation": None},
}
# Keys every Keras layer config carries besides its own arguments.
_LAYER_BASE_KEYS = ("name", "trainable", "dtype")
# Functions that mix values along their axis (the last) instead of acting per value.
_COUPLING = ("softmax", "log_softmax", "sparsemax", "glu")


def _negative(value: Any) -> bool:
    return value is None or value < 0


@_elementwise
def _softmax_over(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    # Keras's Softmax layer over several axes: exp(x - logsumexp(x, axes)).
    peak = np.max(x, axis=axes, keepdims=True)
    total = peak + np.log(np.sum(np.exp(x - peak), axis=axes, keepdims=True))
    return np.exp(x - total)


class ActivationLayer:
    """One of Keras's activation layers given as a layer's ``activation``.

    ``keras.layers.ReLU``, ``LeakyReLU``, ``ELU``, ``Softmax`` and ``Activation``
    (weightless; ``PReLU`` learns its slopes and is refused). Keras applies such a
    layer as a sublayer with its own dtype policy: the values are cast to its
    compute dtype (float32 unless its config says otherwise) and come out in it.

    Parameters
    ----------
    class_name : str
        The Keras class name.
    config : dict
        The layer's ``get_config()``: its arguments, and optionally ``name``,
        ``trainable`` and ``dtype``; kept as given for :meth:`get_config`.

    Raises
    ------
    ValueError
        For another class, unknown config keys, and the arguments Keras refuses
        (negative ``max_value``, ``negative_slope`` or ``threshold``).
    """

    def __init__(self, class_name: str, config: dict[str, Any]) -> None:
        from conv3dt.dtypes import get_policy

        if class_name not in _LAYER_ARGUMENTS:
            refusal = (
                "it has weights (its slopes are learned)"
                if class_name == "PReLU"
                else f"the weightless ones are {', '.join(sorted(_LAYER_ARGUMENTS))}"
            )
            raise ValueError(
                f"The Keras layer {class_name!r} is not supported as an activation: {refusal}."
            )
        config = dict(config)
        if class_name == "LeakyReLU" and "alpha" in config:
            # Keras's older argument name, which it still accepts.
            config["negative_slope"] = config.pop("alpha")
        defaults = _LAYER_ARGUMENTS[class_name]
        unknown = sorted(set(config) - set(defaults) - set(_LAYER_BASE_KEYS))
        if unknown:
            raise ValueError(
                f"Unrecognized arguments {unknown} in the config of the activation layer "
                f"{class_name}; it accepts {sorted(defaults)}. Received: config={config!r}"
            )
        arguments = {key: config.get(key, default) for key, default in defaults.items()}
        if class_name == "ReLU":
            if arguments["max_value"] is not None and arguments["max_value"] < 0:
                raise ValueError(
                    "max_value of a ReLU layer cannot be a negative value. "
                    f"Received: max_value={arguments['max_value']}"
                )
            for key in ("negative_slope", "threshold"):
                if _negative(arguments[key]):
                    raise ValueError(
                        f"{key} of a ReLU layer cannot be None or a negative value. "
                        f"Received: {key}={arguments[key]}"
                    )
        elif class_name == "LeakyReLU" and _negative(arguments["negative_slope"]):
            raise ValueError(
                "The negative_slope value of a Leaky ReLU layer cannot be None or negative "
                f"value. Expected a float. Received: negative_slope={arguments['negative_slope']}"
            )
        elif class_name == "Activation":
            if arguments["activation"] is None:
                raise ValueError("The Keras layer 'Activation' needs its `activation` argument.")
            function = get(arguments["activation"])
            if isinstance(function, ActivationLayer):
                raise ValueError("An Activation layer wrapping another layer is not supported.")
            arguments["activation"] = function
        elif class_name == "Softmax":
            axis = arguments["axis"]
            axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
            if not axes or any(isinstance(a, bool) or not isinstance(a, int) for a in axes):
                raise ValueError(
                    f"`axis` of a Softmax layer must be an integer or a list of integers. "
                    f"Received: axis={axis!r}"
                )
        self.class_name = class_name
        self.config = config
        self.arguments = arguments
        self.compute_dtype: str = get_policy(config.get("dtype", "float32")).compute_dtype

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The layer's output, in its own compute dtype."""
        from conv3dt.dtypes import numpy_dtype

        x = np.asarray(x).astype(numpy_dtype(self.compute_dtype), copy=False)
        arguments = self.arguments
        if self.class_name == "ReLU":
            return relu(x, **arguments)
        if self.class_name == "LeakyReLU":
            return leaky_relu(x, arguments["negative_slope"])
        if self.class_name == "ELU":
            return elu(x, arguments["alpha"])
        if self.class_name == "Activation":
            function = arguments["activation"]
            return x if function is None else np.asarray(function(x)).astype(x.dtype, copy=False)
        axis = arguments["axis"]
        if isinstance(axis, (list, tuple)) and len(axis) > 1:
            return _softmax_over(x, tuple(_check_axis(x, a, "Softmax") for a in axis))
        return softmax(x, axis[0] if isinstance(axis, (list, tuple)) else axis)

    def axes(self, ndim: int) -> tuple[int, ...]:
        """The axes (from 0) of an ``ndim``-D input along which the layer mixes values."""
        if self.class_name == "Softmax":
            axis = self.arguments["axis"]
            listed = axis if isinstance(axis, (list, tuple)) else [axis]
            return tuple(sorted({a % ndim for a in listed}))
        if self.class_name == "Activation":
            return coupled_axes(self.arguments["activation"], ndim)
        return ()

    def get_config(self) -> dict[str, Any]:
        """The layer's config, as given."""
        return dict(self.config)

    def __repr__(self) -> str:
        return f"ActivationLayer({self.class_name!r}, {self.config!r})"


def coupled_axes(activation: Activation | None, ndim: int = 5) -> tuple[int, ...]:
    """The axes (from 0) of an ``ndim``-D output along which ``activation`` mixes values.

    Empty for elementwise activations; the last axis for softmax, log_softmax,
    sparsemax and glu; a Softmax layer's own axes. A computation split into
    pieces must keep these axes whole.
    """
    if isinstance(activation, ActivationLayer):
        return activation.axes(ndim)
    if activation is not None and _NAME_OF.get(id(activation)) in _COUPLING:
        return (ndim - 1,)
    return ()


def output_dtype(activation: Activation | None, dtype: np.dtype) -> np.dtype:
    """The dtype ``activation`` leaves values of ``dtype`` in: an activation layer's
    compute dtype (Keras's sublayers apply their own policy), else ``dtype``."""
    if isinstance(activation, ActivationLayer):
        from conv3dt.dtypes import numpy_dtype

        return numpy_dtype(activation.compute_dtype)
    return np.dtype(dtype)


def _layer_from_dict(config: dict[str, Any]) -> ActivationLayer:
    inner = config.get("config")
    if inner is None:
        inner = {}
    if not isinstance(inner, dict):
        raise ValueError(
            "The 'config' of a serialized activation layer must be a dict. "
            f"Received: activation={config!r}"
        )
    return ActivationLayer(config["class_name"], inner)


def names() -> list[str]:
    """Every activation name :func:`get` accepts, sorted."""
    return sorted(name for name in _BY_NAME if name != "threshold")


def _from_name(name: str) -> Activation:
    if name == "threshold":
        raise ValueError(
            "The activation 'threshold' needs the arguments `threshold` and "
            "`default_value`, which a layer cannot pass to its activation. "
            "Received: activation='threshold'"
        )
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"Could not interpret activation function identifier: {shown_name(name)}. "
            f"Valid names are: {', '.join(names())}"
        ) from None


def _from_dict(config: dict[str, Any]) -> Activation:
    if "class_name" not in config:
        raise ValueError(
            f"A serialized activation must have a 'class_name' key. Received: activation={config!r}"
        )
    module = config.get("module")
    registered = config.get("registered_name")
    layer_module = module in ("keras.layers", "keras.src.layers")
    if layer_module and registered in (None, config["class_name"]):
        return _layer_from_dict(config)
    name = config.get("config")
    if (
        config["class_name"] != "function"
        or not (module is None or module in _FUNCTION_MODULES)
        or registered not in (None, "function", name)
        or not isinstance(name, str)
    ):
        raise ValueError(
            "Only Keras's built-in activation functions are supported; custom objects "
            f"(custom functions, classes or lambdas) are not. Received: activation={config!r}"
        )
    return _from_name(name)


def get(identifier: str | dict[str, Any] | Activation | None) -> Activation | None:
    """Resolve an activation as ``keras.activations.get`` does.

    Parameters
    ----------
    identifier : str, dict, callable or None
        A name (``"relu"``, ``"swish"``...), the dict that Keras's serialization
        writes for a built-in function (``{"module": "builtins", "class_name":
        "function", "config": "relu", "registered_name": "function"}``), one of
        Keras's weightless activation layers or the dict it is saved as
        (``{"module": "keras.layers", "class_name": "LeakyReLU", "config": {...}}``),
        given as an :class:`ActivationLayer`, or a callable, returned unchanged.

    Returns
    -------
    callable or None
        ``None`` for ``None``: the layer applies no activation, which equals
        Keras's ``linear``.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones), a malformed dict, a
        custom object's dict, the name ``"threshold"`` (it needs arguments), an
        activation layer with weights (``PReLU``) or refused arguments, or a value
        of another type.
    """
    if identifier is None:
        return None
    if isinstance(identifier, str):
        return _from_name(identifier)
    if isinstance(identifier, dict):
        return _from_dict(identifier)
    if isinstance(identifier, ActivationLayer):
        return identifier
    if _is_keras_layer(identifier):
        return ActivationLayer(type(identifier).__name__, identifier.get_config())
    if callable(identifier):
        return identifier
    raise ValueError(
        "Could not interpret activation function identifier: expected a name, a Keras "
        f"serialized dict or a callable. Received: activation={identifier!r}"
    )


def _is_keras_layer(value: Any) -> bool:
    # A keras.layers object, recognised without importing Keras.
    module = type(value).__module__
    return (module == "keras" or module.startswith("keras.")) and callable(
        getattr(value, "get_config", None)
    )


def serialize(activation: Activation | None) -> str | dict[str, Any]:
    """What Keras's ``layer.get_config()`` writes under ``"activation"``.

    Parameters
    ----------
    activation : callable or None

    Returns
    -------
    str or dict
        The canonical name of a built-in (``"silu"`` for swish, ``"linear"`` for
        ``None``); for another Python function, the dict Keras writes for an
        unregistered function (which :func:`get` will refuse to load).

    Raises
    ------
    ValueError
        For a callable that is not a function (Keras would need its ``get_config``).
    """
    if activation is None:
        return "linear"
    if isinstance(activation, ActivationLayer):
        return {
            "module": "keras.layers",
            "class_name": activation.class_name,
            "config": activation.get_config(),
            "registered_name": None,
        }
    name = _NAME_OF.get(id(activation))
    if name is not None:
        return name
    if isinstance(activation, types.FunctionType):
        return {
            "module": activation.__module__,
            "class_name": "function",
            "config": activation.__name__,
            "registered_name": activation.__name__,
        }
    raise ValueError(
        f"Cannot serialize the activation {activation!r}: only functions can be "
        "written to a Keras config."
    )
