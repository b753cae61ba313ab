"""``Conv3DTranspose``: Keras's layer, with its arguments, defaults, checks and config."""

from __future__ import annotations

import itertools
import math
import operator
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from conv3dt import activations, constraints, initializers, regularizers
from conv3dt.dtypes import DTypePolicy, autocast, get_policy, numpy_dtype
from conv3dt.geometry import AxisGeometry
from conv3dt.ops import conv3d_transpose, layer_geometry
from conv3dt.validation import (
    excerpt,
    standardize_data_format,
    standardize_padding,
    standardize_tuple,
    weight_count,
)

__all__ = ["Conv3DTranspose", "Convolution3DTranspose"]

_names = itertools.count()
_ALLOWED_KWARGS = ("name", "trainable", "dtype", "autocast")
# Keras accepts these (with a warning) for older configs; they do not change the layer.
_IGNORED_KWARGS = ("input_shape", "input_dim")


def _unique_name() -> str:
    index = next(_names)
    return "conv3d_transpose" if index == 0 else f"conv3d_transpose_{index}"


def _check_filters(filters: Any) -> int:
    try:
        value = operator.index(filters)
    except TypeError:
        raise ValueError(
            f"Invalid value for argument `filters`. Expected a strictly positive integer. "
            f"Received filters={excerpt(filters)}."
        ) from None
    if value <= 0:
        raise ValueError(
            "Invalid value for argument `filters`. Expected a strictly "
            f"positive value. Received filters={filters}."
        )
    return value


class Conv3DTranspose:
    """3D transposed convolution layer, with the arguments and behaviour of Keras's.

    Parameters
    ----------
    filters : int
        Number of output channels.
    kernel_size : int or 3 ints
    strides : int or 3 ints, default 1
        ``strides > 1`` cannot be combined with ``dilation_rate > 1``.
    padding : {"valid", "same"}, default "valid"
        Case-insensitive.
    output_padding : int or 3 ints, optional
        Each value must be less than the stride on its axis.
    data_format : {"channels_last", "channels_first"}, optional
        Default: ``image_data_format`` from Keras's ``keras.json``, else "channels_last".
    dilation_rate : int or 3 ints, default 1
    activation : name, Keras serialized config or callable, optional
        Also one of Keras's weightless activation layers (``ReLU``, ``LeakyReLU``,
        ``ELU``, ``Softmax``, ``Activation``), as an object or its serialized dict.
    use_bias : bool, default True
    kernel_initializer, bias_initializer : name, config or initializer
        Used when :meth:`build` draws weights.
    kernel_regularizer, bias_regularizer, activity_regularizer : optional
        Their penalties are reported by :attr:`losses`.
    kernel_constraint, bias_constraint : optional
        Checked by :meth:`check_constraints`, applied by :meth:`apply_constraints`.
    **kwargs
        ``name``, ``trainable``, ``dtype`` (a name such as "float32" or
        "mixed_float16", or a serialized DTypePolicy) and ``autocast``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.rand(4, 10, 8, 12, 128)
    >>> Conv3DTranspose(32, 2, 2, activation="relu")(x).shape
    (4, 20, 16, 24, 32)
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        padding: str = "valid",
        output_padding: int | Sequence[int] | None = None,
        data_format: str | None = None,
        dilation_rate: int | Sequence[int] = 1,
        activation: Any = None,
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        kernel_constraint: Any = None,
        bias_constraint: Any = None,
        **kwargs: Any,
    ) -> None:
        unknown = {k: v for k, v in kwargs.items() if k not in _ALLOWED_KWARGS + _IGNORED_KWARGS}
        if unknown:
            raise ValueError(
                f"Unrecognized keyword arguments passed to {type(self).__name__}: {unknown}"
            )
        self.name: str = kwargs.get("name") or _unique_name()
        ignored = [k for k in _IGNORED_KWARGS if kwargs.get(k) is not None]
        if ignored:
            warnings.warn(
                f"{type(self).__name__} ignores {', '.join(ignored)}: the input shape comes "
                "from the data",
                UserWarning,
                stacklevel=2,
            )
        trainable = kwargs.get("trainable", True)
        if not isinstance(trainable, bool):
            raise ValueError(
                f"Expected `trainable` to be a boolean. Received: trainable={excerpt(trainable)}"
            )
        self.trainable = trainable
        self.autocast = bool(kwargs.get("autocast", True))
        self.dtype_policy: DTypePolicy = get_policy(kwargs.get("dtype"))
        self.activity_regularizer = regularizers.get(activity_regularizer)
        self.rank = 3
        self.filters = _check_filters(filters)
        self.kernel_size = standardize_tuple(kernel_size, 3, "kernel_size")
        self.strides = standardize_tuple(strides, 3, "strides")
        self.dilation_rate = standardize_tuple(dilation_rate, 3, "dilation_rate")
        self.padding = standardize_padding(padding)
        self.output_padding = (
            None
            if output_padding is None
            else standardize_tuple(output_padding, 3, "output_padding", allow_zero=True)
        )
        self.data_format = standardize_data_format(data_format)
        self.activation = activations.get(activation)
        # Kept as given (Keras keeps use_bias=None and initializer None in the config);
        # a missing initializer means Keras's default when weights are drawn.
        self.use_bias = use_bias
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        if self.output_padding is not None:
            for axis, (pad, stride) in enumerate(
                zip(self.output_padding, self.strides, strict=True)
            ):
                if pad >= stride:
                    raise ValueError(
                        "`output_padding` must be strictly less than `strides` for all "
                        f"dimensions. At dimension {axis}, `output_padding` is {pad} but "
                        f"`strides` is {stride}. Received: output_padding={self.output_padding}, "
                        f"strides={self.strides}"
                    )
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "`strides > 1` not supported in conjunction with `dilation_rate > 1`. "
                f"Received: strides={self.strides} and dilation_rate={self.dilation_rate}"
            )
        self.kernel: np.ndarray | None = None
        self.bias: np.ndarray | None = None
        self.built = False
        self._build_input_shape: list | tuple | None = None
        self._activity_losses: list[float] = []

    # ----------------------------------------------------------------- dtypes
    @property
    def dtype(self) -> str:
        """The variable dtype's name, as Keras's ``layer.dtype``."""
        return self.dtype_policy.variable_dtype

    @property
    def compute_dtype(self) -> str:
        """The dtype inputs are cast to and outputs are computed in."""
        return self.dtype_policy.compute_dtype

    # ----------------------------------------------------------------- shapes
    def _channel_axis(self) -> int:
        return -1 if self.data_format == "channels_last" else 1

    def _check_rank(self, shape: Sequence[int | None]) -> None:
        if len(shape) != 5:
            raise ValueError(
                f"Input 0 of layer '{self.name}' is incompatible with the layer: "
                f"expected ndim=5, found ndim={len(shape)}. Full shape received: {tuple(shape)}"
            )

    def _spatial(self, shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(shape[1:4] if self.data_format == "channels_last" else shape[2:5])

    def geometry(self, spatial_shape: Sequence[int]) -> tuple[AxisGeometry, ...]:
        """Per-axis geometry for an input of this spatial shape (depth, height, width)."""
        return layer_geometry(
            spatial_shape,
            self.kernel_size,
            self.strides,
            self.padding,
            self.output_padding,
            self.dilation_rate,
        )

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        """The output shape for a 5D input shape; unknown (None) sizes stay None."""
        input_shape = tuple(input_shape)
        self._check_rank(input_shape)
        spatial = []
        for axis, size in enumerate(self._spatial(input_shape)):
            if size is None:
                spatial.append(None)
                continue
            spatial.append(
                layer_geometry(
                    (size,) * 3,
                    self.kernel_size,
                    self.strides,
                    self.padding,
                    self.output_padding,
                    self.dilation_rate,
                )[axis].output_length
            )
        if self.data_format == "channels_last":
            return (input_shape[0], *spatial, self.filters)
        return (input_shape[0], self.filters, *spatial)

    # ---------------------------------------------------------------- weights
    def kernel_shape(self, in_channels: int) -> tuple[int, ...]:
        """Keras's kernel layout: ``(kd, kh, kw, filters, in_channels)``."""
        return (*self.kernel_size, self.filters, in_channels)

    def build(self, input_shape: Sequence[int | None], *, seed: int | None = None) -> None:
        """Draw the weights from the initializers for inputs of this shape.

        Parameters
        ----------
        input_shape : 5 ints (None allowed except for the channels)
        seed : int, optional
            Seed for initializers whose own config has no seed.
        """
        # Recorded as given (a list stays a list), as Keras's get_build_config reports it.
        recorded = list(input_shape) if isinstance(input_shape, list) else tuple(input_shape)
        input_shape = tuple(input_shape)
        self._check_rank(input_shape)
        channels = input_shape[self._channel_axis()]
        if channels is None:
            raise ValueError(
                "The channel dimension of the inputs should be defined. "
                f"Received input shape {input_shape} with data_format='{self.data_format}'."
            )
        dtype = numpy_dtype(self.dtype)
        kernel_shape = self.kernel_shape(int(channels))
        # Python ints: the product of absurd sizes must not wrap before it is compared.
        count = math.prod(kernel_shape)
        if count * max(dtype.itemsize, 4) > sys.maxsize:
            raise ValueError(
                f"Conv3DTranspose '{self.name}': kernel_size={self.kernel_size} and "
                f"filters={excerpt(self.filters)} with {channels} input channel(s) make a kernel "
                f"of {weight_count(count)} weights, more than any array can hold."
            )
        kernel_initializer = self.kernel_initializer or initializers.get("glorot_uniform")
        kernel = kernel_initializer(kernel_shape, dtype="float32", seed=seed)
        self.kernel = np.asarray(kernel).astype(dtype)
        if self.use_bias:
            bias_seed = None if seed is None else seed + 1
            bias_initializer = self.bias_initializer or initializers.get("zeros")
            bias = bias_initializer((self.filters,), dtype="float32", seed=bias_seed)
            self.bias = np.asarray(bias).astype(dtype)
        else:
            self.bias = None
        self.built = True
        self._build_input_shape = recorded

    def get_build_config(self) -> dict[str, Any] | None:
        """``{"input_shape": shape}`` for the shape :meth:`build` (or the first call) had.

        None when the layer was not built from an input shape (unbuilt, or built
        by :meth:`set_weights`), as Keras returns None for a layer never built.
        """
        if self._build_input_shape is None:
            return None
        return {"input_shape": self._build_input_shape}

    def build_from_config(self, config: dict[str, Any] | None) -> None:
        """Build from :meth:`get_build_config`'s dict, as Keras does; nothing for an empty one."""
        if not config:
            return
        if "input_shape" in config:
            self.build(config["input_shape"])
        elif "shapes_dict" in config:
            self.build(**config["shapes_dict"])

    @property
    def weights(self) -> list[np.ndarray]:
        """The layer's weights in Keras's order: ``[kernel, bias]``, ``[]`` before building."""
        return self.get_weights()

    @property
    def trainable_weights(self) -> list[np.ndarray]:
        """:attr:`weights` when ``trainable``, else ``[]``."""
        return self.get_weights() if self.trainable else []

    @property
    def non_trainable_weights(self) -> list[np.ndarray]:
        """:attr:`weights` when not ``trainable`` (Keras freezes them all), else ``[]``."""
        return [] if self.trainable else self.get_weights()

    def count_params(self) -> int:
        """The number of scalars in the weights.

        Raises
        ------
        ValueError
            When the layer is not built, in Keras's words.
        """
        if not self.built:
            raise ValueError(
                f"You tried to call `count_params` on layer '{self.name}', but the layer "
                "isn't built. You can build it manually via: `layer.build(input_shape)`."
            )
        return sum(int(w.size) for w in self.get_weights())

    def get_weights(self) -> list[np.ndarray]:
        """``[kernel, bias]`` (``[kernel]`` without a bias), as Keras orders them."""
        if not self.built or self.kernel is None:
            return []
        return [self.kernel] if self.bias is None else [self.kernel, self.bias]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        """Set ``[kernel, bias]`` (``[kernel]`` when ``use_bias=False``).

        The layer is built from the kernel's shape if it was not built yet.

        Raises
        ------
        ValueError
            When the number of arrays or a shape differs from what the layer expects.
        """
        weights = list(weights)
        expected = 2 if self.use_bias else 1
        if len(weights) != expected:
            raise ValueError(
                f"Layer '{self.name}' expects {expected} weight array(s) "
                f"({'kernel, bias' if self.use_bias else 'kernel'}), received {len(weights)}."
            )
        kernel = np.asarray(weights[0])
        if self.built and self.kernel is not None:
            in_channels: int | None = self.kernel.shape[-1]
        else:
            in_channels = kernel.shape[-1] if kernel.ndim == 5 else None
        expected_kernel = self.kernel_shape(in_channels) if in_channels is not None else None
        if expected_kernel is None or kernel.shape != expected_kernel:
            shown = expected_kernel or (*self.kernel_size, self.filters, "in_channels")
            raise ValueError(
                f"Kernel shape mismatch for layer '{self.name}': expected {tuple(shown)} "
                f"(kd, kh, kw, filters, in_channels), received {kernel.shape}."
            )
        dtype = numpy_dtype(self.dtype)
        bias = None
        if self.use_bias:
            bias = np.asarray(weights[1])
            if bias.shape != (self.filters,):
                raise ValueError(
                    f"Bias shape mismatch for layer '{self.name}': expected ({self.filters},), "
                    f"received {bias.shape}."
                )
            bias = bias.astype(dtype)
        self.kernel = kernel.astype(dtype)
        self.bias = bias
        self.built = True

    # ---------------------------------------------------------------- compute
    def __call__(
        self, inputs: np.ndarray, *, engine: str = "auto", boundary: str = "zeros"
    ) -> np.ndarray:
        """Apply the layer: ``activation(conv_transpose(inputs, kernel) + bias)``.

        The layer is built (weights drawn) on first call when no weights were set.
        ``boundary`` (an extension beyond Keras, see :mod:`conv3dt.boundary`) says
        what lies beyond the input's edges; the default ``"zeros"`` is Keras's.
        """
        x = np.asarray(inputs)
        self._check_rank(x.shape)
        if not self.built:
            self.build(x.shape)
        assert self.kernel is not None
        channels = x.shape[self._channel_axis()]
        if channels != self.kernel.shape[-1]:
            raise ValueError(
                f"Input 0 of layer '{self.name}' is incompatible with the layer: expected axis "
                f"{self._channel_axis()} of input shape to have value {self.kernel.shape[-1]}, "
                f"but received input with shape {x.shape}"
            )
        out = conv3d_transpose(
            *self.operands(x),
            None,
            self.strides,
            self.padding,
            self.output_padding,
            self.data_format,
            self.dilation_rate,
            engine=engine,
            boundary=boundary,
        ).astype(numpy_dtype(self.compute_dtype), copy=False)
        out = self.finish(out)
        self._activity_losses = []
        if self.activity_regularizer is not None:
            # Keras divides by the batch size in the output's dtype (divide_no_nan).
            penalty = np.asarray(self.activity_regularizer(out), dtype=out.dtype)
            batch = np.asarray(out.shape[0], dtype=out.dtype)
            per_sample = np.divide(penalty, batch, dtype=out.dtype) if out.shape[0] else 0.0
            self._activity_losses.append(float(per_sample))
        return out

    def operands(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The input and the kernel as the transposed convolution sums them.

        Keras casts the input and, under a ``mixed_*`` policy, the kernel to the
        compute dtype before convolving; half-precision operands are then summed
        in float32 (:func:`conv3dt.dtypes.accumulation_dtype`) and the sum
        rounded once. The layer's call and the streamed tiles
        (:func:`conv3dt.run.compute_tile`) both take their operands from here,
        so they round alike.

        Parameters
        ----------
        inputs : array_like
            The whole input or one tile's input box, in any layout.

        Returns
        -------
        (ndarray, ndarray)
            The input and the kernel, in the accumulation dtype.
        """
        if self.kernel is None:
            raise ValueError(f"Layer '{self.name}' has no weights yet: build it or set them.")
        return autocast(inputs, self.compute_dtype), autocast(self.kernel, self.compute_dtype)

    def finish(self, conv_output: np.ndarray) -> np.ndarray:
        """Add the bias and apply the activation to a transposed-convolution output.

        ``conv_output`` is in the compute dtype and in ``data_format`` layout
        (5D). Softmax-like activations act on the last axis, as in Keras. The
        result is in the compute dtype, or in an activation layer's own (Keras
        applies ``keras.layers.ReLU`` and the like with their own dtype policy).
        """
        out = conv_output
        if self.use_bias and self.bias is not None:
            shape = (
                (self.filters,) if self.data_format == "channels_last" else (self.filters, 1, 1, 1)
            )
            out = out + self.bias.astype(out.dtype).reshape(shape)
        if self.activation is not None:
            dtype = activations.output_dtype(self.activation, out.dtype)
            out = np.asarray(self.activation(out)).astype(dtype, copy=False)
        return out

    # ------------------------------------------------------ losses, constraints
    @property
    def losses(self) -> list[float]:
        """Penalties Keras adds to its losses: activity (from the last call), kernel, bias.

        Weight penalties are those of trainable weights only, as in Keras: a layer
        with ``trainable=False`` reports its activity penalty alone. Each is
        computed in its array's dtype (the compute dtype for the activity, the
        variable dtype for the weights), as Keras's ops compute it.
        """
        values = list(self._activity_losses)
        if not self.trainable:
            return values
        if self.kernel_regularizer is not None and self.kernel is not None:
            values.append(float(self.kernel_regularizer(self.kernel)))
        if self.bias_regularizer is not None and self.bias is not None:
            values.append(float(self.bias_regularizer(self.bias)))
        return values

    def check_constraints(self) -> dict[str, bool]:
        """Whether each constrained weight already satisfies its constraint."""
        result = {}
        if self.kernel_constraint is not None and self.kernel is not None:
            result["kernel"] = constraints.satisfied(self.kernel_constraint, self.kernel)
        if self.bias_constraint is not None and self.bias is not None:
            result["bias"] = constraints.satisfied(self.bias_constraint, self.bias)
        return result

    def apply_constraints(self) -> None:
        """Project the weights with their constraints, as an optimizer step would."""
        if self.kernel_constraint is not None and self.kernel is not None:
            self.kernel = np.asarray(self.kernel_constraint(self.kernel)).astype(self.kernel.dtype)
        if self.bias_constraint is not None and self.bias is not None:
            self.bias = np.asarray(self.bias_constraint(self.bias)).astype(self.bias.dtype)

    # ----------------------------------------------------------------- config
    def get_config(self) -> dict[str, Any]:
        """The layer's config, in the form of Keras's ``layer.get_config()``."""
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self.dtype_policy.serialize(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "output_padding": self.output_padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "activation": activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "activity_regularizer": regularizers.serialize(self.activity_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Conv3DTranspose:
        """Create a layer from a config, including what Keras's ``get_config()`` returns."""
        if not isinstance(config, dict):
            raise ValueError(f"Expected a layer config dict. Received: {config!r}")
        return cls(**config)

    def __repr__(self) -> str:
        return (
            f"Conv3DTranspose(name={self.name!r}, filters={self.filters}, "
            f"kernel_size={self.kernel_size}, strides={self.strides}, padding={self.padding!r})"
        )


Convolution3DTranspose = Conv3DTranspose
