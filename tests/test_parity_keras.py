"""conv3dt's ``Conv3DTranspose`` against live ``keras.layers.Conv3DTranspose``.

Runs where Keras is installed (CI: Keras 3 with ``KERAS_BACKEND=torch``). Every
check builds both layers with the same arguments and the same weights and
compares what they report: output shapes and values, ``compute_output_shape``,
refusals, ``get_config``, regularization losses and dtype policies.
"""

from __future__ import annotations

import json
import warnings
import zlib
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from conv3dt import Conv3DTranspose, Convolution3DTranspose, conv3d_transpose  # noqa: E402

KerasLayer = keras.layers.Conv3DTranspose

# Every activation keras.activations resolves by name (its public functions,
# including the aliases swish and hard_swish).
ACTIVATIONS = sorted(
    name
    for name in dir(keras.activations)
    if not name.startswith("_") and name not in ("get", "serialize", "deserialize")
)
# Activations that need an even size on the last axis or arguments a layer
# cannot pass; they have dedicated tests below.
SPECIAL_ACTIVATIONS = ("glu", "threshold")

CHUNKS = 20
PER_CHUNK = 100


def to_numpy(tensor: Any) -> np.ndarray:
    """A Keras tensor as a NumPy array."""
    # Keras's torch backend converts with np.array(tensor), which NumPy 2 flags
    # with a DeprecationWarning about torch's __array__ signature; values are unaffected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return keras.ops.convert_to_numpy(tensor)


def keras_call(layer: Any, x: np.ndarray) -> np.ndarray:
    """Call a Keras layer and return its output as a NumPy array."""
    with warnings.catch_warnings():
        # Keras warns that softmax over an axis of size 1 always gives 1 (random
        # configurations include 1 output channel); the values are still compared.
        warnings.filterwarnings(
            "ignore", message=".*softmax over axis -1 .* has size 1", category=UserWarning
        )
        return to_numpy(layer(x))


def normalized(config: dict) -> Any:
    """A config as JSON would store it (tuples become lists)."""
    return json.loads(json.dumps(config))


def random_weights(kernel_shape: tuple[int, ...], use_bias: bool, rng: np.random.Generator):
    """Kernel scaled by 1/sqrt(fan_in) so outputs of unit-scale inputs are unit-scale."""
    fan_in = int(np.prod(kernel_shape[:3])) * kernel_shape[4]
    kernel = (rng.standard_normal(kernel_shape) / np.sqrt(fan_in)).astype(np.float32)
    if not use_bias:
        return [kernel]
    return [kernel, (0.5 * rng.standard_normal(kernel_shape[3])).astype(np.float32)]


def build_pair(kwargs: dict, input_shape: tuple[int, ...], rng: np.random.Generator):
    """A Keras layer and a conv3dt layer with the same arguments and weights."""
    ours = Conv3DTranspose(**kwargs)
    theirs = KerasLayer(**kwargs)
    theirs.build(input_shape)
    weights = random_weights(tuple(theirs.kernel.shape), theirs.use_bias, rng)
    theirs.set_weights(weights)
    ours.set_weights(weights)
    return ours, theirs


def assert_same_outputs(
    kwargs: dict,
    input_shape: tuple[int, ...],
    rng: np.random.Generator,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """Build both layers, call them on the same random input and compare everything."""
    ours, theirs = build_pair(kwargs, input_shape, rng)
    x = rng.standard_normal(input_shape).astype(np.float32)
    assert ours.compute_output_shape(input_shape) == tuple(theirs.compute_output_shape(input_shape))
    expected = keras_call(theirs, x)
    got = ours(x)
    assert got.shape == expected.shape, kwargs
    assert got.dtype == expected.dtype, kwargs
    np.testing.assert_allclose(
        got.astype(np.float64),
        expected.astype(np.float64),
        rtol=rtol,
        atol=atol,
        err_msg=str(kwargs),
    )
    return got, expected


def _axis_value(rng: np.random.Generator, values: list[int], form: str):
    """A value per axis, given as an int, a tuple or a list."""
    if form == "int":
        return int(rng.choice(values))
    triple = [int(v) for v in rng.choice(values, size=3)]
    return tuple(triple) if form == "tuple" else triple


def random_config(rng: np.random.Generator) -> tuple[dict, tuple[int, ...]]:
    """Random valid layer arguments and a matching input shape."""
    forms = ["int", "tuple", "list"]
    kwargs: dict[str, Any] = {
        "filters": int(rng.integers(1, 5)),
        "kernel_size": _axis_value(rng, [1, 2, 3, 4], rng.choice(forms)),
        "padding": str(rng.choice(["valid", "same", "VALID", "Same"])),
        "data_format": str(rng.choice(["channels_last", "channels_first"])),
        "use_bias": bool(rng.integers(2)),
    }
    if rng.random() < 0.3:
        kwargs["dilation_rate"] = _axis_value(rng, [1, 2, 3], rng.choice(forms))
    else:
        strides = _axis_value(rng, [1, 2, 3, 4], rng.choice(forms))
        kwargs["strides"] = strides
        if rng.random() < 0.5:
            s = (strides,) * 3 if isinstance(strides, int) else tuple(strides)
            kwargs["output_padding"] = tuple(int(rng.integers(0, v)) for v in s)
    activation = rng.choice([None, *[a for a in ACTIVATIONS if a not in SPECIAL_ACTIVATIONS]])
    if activation is not None:
        kwargs["activation"] = str(activation)
    batch = int(rng.integers(1, 4))
    channels = int(rng.integers(1, 5))
    spatial = tuple(int(v) for v in rng.integers(1, 6, size=3))
    if kwargs["data_format"] == "channels_last":
        return kwargs, (batch, *spatial, channels)
    return kwargs, (batch, channels, *spatial)


# ---------------------------------------------------------------------------
# Values and shapes over random configurations


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_configurations(chunk: int) -> None:
    rng = np.random.default_rng(1000 + chunk)
    for _ in range(PER_CHUNK):
        kwargs, input_shape = random_config(rng)
        assert_same_outputs(kwargs, input_shape, rng)


# (kernel_size, strides, padding, output_padding): the geometry corners.
EDGE_CASES = [
    # "same" with output_padding whose output reaches past the full output.
    (1, 2, "same", 1),
    (1, 3, "same", 2),
    (1, 4, "same", 3),
    (2, 4, "same", 3),
    (2, 3, "same", 2),
    (3, 4, "same", 3),
    # "valid" with stride larger than the kernel (gaps of zeros), with and without padding.
    (1, 2, "valid", None),
    (2, 3, "valid", None),
    (1, 4, "valid", 3),
    (2, 4, "valid", 1),
    (3, 4, "valid", 0),
    # even kernels with "same".
    (2, 1, "same", None),
    (4, 1, "same", None),
    (2, 2, "same", None),
    (4, 2, "same", 1),
    (4, 3, "same", None),
    (2, 2, "same", 0),
    (4, 4, "same", 2),
    # anisotropic mixtures.
    ((1, 2, 4), (4, 2, 1), "same", (3, 1, 0)),
    ((2, 3, 1), (3, 1, 4), "valid", (0, 0, 2)),
]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("kernel_size, strides, padding, output_padding", EDGE_CASES)
def test_geometry_edge_cases(kernel_size, strides, padding, output_padding, data_format) -> None:
    rng = np.random.default_rng(7)
    kwargs = {
        "filters": 2,
        "kernel_size": kernel_size,
        "strides": strides,
        "padding": padding,
        "output_padding": output_padding,
        "data_format": data_format,
    }
    for spatial in [(1, 1, 1), (2, 3, 4), (5, 1, 3)]:
        shape = (2, *spatial, 3) if data_format == "channels_last" else (2, 3, *spatial)
        assert_same_outputs(kwargs, shape, rng)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("dilation_rate", [2, 3, (1, 2, 3), (3, 1, 2)])
def test_dilation(dilation_rate, padding, data_format) -> None:
    rng = np.random.default_rng(11)
    for kernel_size in [2, 3, (1, 4, 2)]:
        kwargs = {
            "filters": 3,
            "kernel_size": kernel_size,
            "padding": padding,
            "data_format": data_format,
            "dilation_rate": dilation_rate,
        }
        shape = (2, 3, 4, 2, 2) if data_format == "channels_last" else (2, 2, 3, 4, 2)
        assert_same_outputs(kwargs, shape, rng)


def test_padding_is_case_insensitive() -> None:
    rng = np.random.default_rng(3)
    for padding in ["SAME", "Valid", "sAmE", "VALID"]:
        kwargs = {"filters": 2, "kernel_size": 3, "strides": 2, "padding": padding}
        assert_same_outputs(kwargs, (1, 3, 2, 4, 2), rng)
        assert Conv3DTranspose(**kwargs).padding == KerasLayer(**kwargs).padding


def test_compute_output_shape_with_unknown_sizes() -> None:
    for kwargs in [
        {"filters": 4, "kernel_size": 3, "strides": 2, "padding": "same"},
        {"filters": 2, "kernel_size": (2, 3, 1), "strides": (3, 1, 2), "output_padding": (1, 0, 1)},
        {"filters": 3, "kernel_size": 2, "data_format": "channels_first", "dilation_rate": 2},
    ]:
        ours, theirs = Conv3DTranspose(**kwargs), KerasLayer(**kwargs)
        for shape in [(None, 4, None, 5, 3), (2, None, None, None, 3), (None, 3, 5, 4, None)]:
            assert ours.compute_output_shape(shape) == tuple(theirs.compute_output_shape(shape))


def test_documentation_example() -> None:
    """Keras's docstring example, against live Keras."""
    rng = np.random.default_rng(0)
    got, _ = assert_same_outputs(
        {"filters": 32, "kernel_size": 2, "strides": 2, "activation": "relu"},
        (4, 10, 8, 12, 128),
        rng,
    )
    assert got.shape == (4, 20, 16, 24, 32)


def test_functional_op_matches_keras_ops() -> None:
    """conv3d_transpose against keras.ops.conv_transpose, strides and dilation together."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        strides = tuple(int(v) for v in rng.integers(1, 4, size=3))
        dilation = tuple(int(v) for v in rng.integers(1, 3, size=3))
        kernel_size = tuple(int(v) for v in rng.integers(1, 4, size=3))
        padding = str(rng.choice(["valid", "same"]))
        data_format = str(rng.choice(["channels_last", "channels_first"]))
        output_padding = (
            None if rng.random() < 0.5 else tuple(int(rng.integers(0, s)) for s in strides)
        )
        spatial = tuple(int(v) for v in rng.integers(1, 5, size=3))
        shape = (2, *spatial, 2) if data_format == "channels_last" else (2, 2, *spatial)
        x = rng.standard_normal(shape).astype(np.float32)
        kernel = random_weights((*kernel_size, 3, 2), False, rng)[0]
        args = (strides, padding, output_padding, data_format, dilation)
        expected = to_numpy(keras.ops.conv_transpose(x, kernel, *args))
        got = conv3d_transpose(x, kernel, None, *args)
        assert got.shape == expected.shape, args
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=str(args))


# ---------------------------------------------------------------------------
# Activations


def _activation_input_shape(data_format: str) -> tuple[int, ...]:
    # glu halves the last axis, so it must be even: filters (channels_last) or
    # the output width (channels_first; "same" with stride 2 gives width 2 * 3).
    return (2, 2, 3, 3, 2) if data_format == "channels_last" else (2, 2, 2, 3, 3)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("by", ["name", "serialized"])
@pytest.mark.parametrize("name", [a for a in ACTIVATIONS if a != "threshold"])
def test_every_activation(name: str, by: str, data_format: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{name}/{by}/{data_format}".encode()))
    activation: Any = name
    if by == "serialized":
        activation = keras.saving.serialize_keras_object(keras.activations.get(name))
    kwargs = {
        "filters": 4,
        "kernel_size": 2,
        "strides": 2,
        "padding": "same",
        "data_format": data_format,
        "activation": activation,
    }
    assert_same_outputs(kwargs, _activation_input_shape(data_format), rng)
    ours = Conv3DTranspose(**kwargs)
    assert ours.get_config()["activation"] == KerasLayer(**kwargs).get_config()["activation"]


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "sparsemax"])
def test_softmax_family_uses_last_axis_with_channels_first(name: str) -> None:
    """Under channels_first Keras normalizes over the last axis (width), not the channels."""
    rng = np.random.default_rng(17)
    shape = (2, 2, 3, 2, 4)
    kwargs = {"filters": 3, "kernel_size": 2, "data_format": "channels_first", "activation": name}
    ours, theirs = build_pair(kwargs, shape, rng)
    x = rng.standard_normal(shape).astype(np.float32)
    got = ours(x)
    np.testing.assert_allclose(got, to_numpy(theirs(x)), rtol=1e-5, atol=1e-5)
    plain = Conv3DTranspose(**{**kwargs, "activation": None})
    plain.set_weights(ours.get_weights())
    pre = plain(x)
    activation = getattr(keras.activations, name)
    np.testing.assert_allclose(got, to_numpy(activation(pre, axis=-1)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, to_numpy(activation(pre, axis=1)), rtol=1e-2, atol=1e-2)
    if name != "sparsemax":
        # (Keras's sparsemax does not sum to 1: its threshold sums the cumulative
        # sums over the support; conv3dt reproduces Keras's values.)
        probs = np.exp(got) if name == "log_softmax" else got
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)


def test_threshold_activation_is_refused() -> None:
    """Keras accepts "threshold" and fails with TypeError at call (its two arguments
    are required); conv3dt refuses it up front with a ValueError."""
    x = np.zeros((1, 2, 2, 2, 1), np.float32)
    with pytest.raises(TypeError):
        KerasLayer(1, 2, activation="threshold")(x)
    with pytest.raises(ValueError, match="threshold"):
        Conv3DTranspose(1, 2, activation="threshold")


def test_glu_with_odd_last_axis_is_refused() -> None:
    """Keras fails at call (torch raises RuntimeError); conv3dt raises ValueError."""
    x = np.zeros((1, 2, 2, 2, 1), np.float32)
    with pytest.raises(RuntimeError):
        KerasLayer(3, 2, activation="glu")(x)
    with pytest.raises(ValueError):
        Conv3DTranspose(3, 2, activation="glu")(x)


# ---------------------------------------------------------------------------
# Refusals


def _corrupt(rng: np.random.Generator) -> tuple[dict, str]:
    """Valid arguments with one made invalid; returns them and the argument to blame."""
    kwargs: dict[str, Any] = {"filters": 2, "kernel_size": 3, "strides": 2, "padding": "same"}
    kind = rng.choice(
        [
            "filters",
            "kernel_size",
            "strides",
            "dilation_rate",
            "output_padding",
            "output_padding_vs_strides",
            "strides_with_dilation",
            "padding",
            "length",
            "data_format",
        ]
    )
    bad_values = [0, -1, -3]
    if kind == "filters":
        kwargs["filters"] = int(rng.choice(bad_values))
        return kwargs, "filters"
    if kind in ("kernel_size", "strides", "dilation_rate"):
        value = [int(v) for v in rng.integers(1, 4, size=3)]
        value[int(rng.integers(3))] = int(rng.choice(bad_values))
        kwargs[kind] = int(rng.choice(bad_values)) if rng.random() < 0.3 else tuple(value)
        if kind == "dilation_rate":
            kwargs["strides"] = 1
        return kwargs, str(kind)
    if kind == "output_padding":
        kwargs["output_padding"] = (0, int(rng.integers(-3, 0)), 1)
        return kwargs, "output_padding"
    if kind == "output_padding_vs_strides":
        strides = [int(v) for v in rng.integers(1, 4, size=3)]
        pad = [int(rng.integers(0, s)) for s in strides]
        axis = int(rng.integers(3))
        pad[axis] = strides[axis] + int(rng.integers(0, 2))
        kwargs.update(strides=tuple(strides), output_padding=tuple(pad))
        return kwargs, "output_padding"
    if kind == "strides_with_dilation":
        strides, dilation = [1, 1, 1], [1, 1, 1]
        strides[int(rng.integers(3))] = int(rng.integers(2, 5))
        dilation[int(rng.integers(3))] = int(rng.integers(2, 4))
        kwargs.update(strides=tuple(strides), dilation_rate=tuple(dilation))
        return kwargs, "dilation_rate"
    if kind == "padding":
        kwargs["padding"] = str(rng.choice(["full", "causal", "", "same ", "valid_", "SAMEE"]))
        return kwargs, "padding"
    if kind == "data_format":
        kwargs["data_format"] = str(rng.choice(["channels_middle", "NCDHW", "", "last"]))
        return kwargs, "data_format"
    name = str(rng.choice(["kernel_size", "strides", "dilation_rate", "output_padding"]))
    length = int(rng.choice([1, 2, 4]))
    kwargs[name] = tuple([1] * length)
    return kwargs, name


@pytest.mark.parametrize("chunk", range(2))
def test_random_invalid_arguments_are_refused(chunk: int) -> None:
    rng = np.random.default_rng(500 + chunk)
    for _ in range(60):
        kwargs, argument = _corrupt(rng)
        with pytest.raises(ValueError):
            KerasLayer(**kwargs)
        with pytest.raises(ValueError, match=argument) as info:
            Conv3DTranspose(**kwargs)
        assert argument in str(info.value), (kwargs, str(info.value))


@pytest.mark.parametrize("padding", [None, 1])
def test_non_string_padding(padding) -> None:
    """Keras fails with AttributeError (it calls .lower()); conv3dt raises ValueError."""
    with pytest.raises(AttributeError):
        KerasLayer(2, 3, padding=padding)
    with pytest.raises(ValueError, match="padding"):
        Conv3DTranspose(2, 3, padding=padding)


def test_keras_suite_bad_init_args() -> None:
    """Keras's own test: output_padding=1 with strides=1 is refused."""
    message = "`output_padding` must be strictly less than `strides`"
    with pytest.raises(ValueError, match=message):
        KerasLayer(filters=8, kernel_size=3, strides=1, output_padding=1)
    with pytest.raises(ValueError, match=message):
        Conv3DTranspose(filters=8, kernel_size=3, strides=1, output_padding=1)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("shape", [(2, 3, 3), (1, 2, 3, 3), (1, 2, 2, 2, 2, 3), (3,)])
def test_input_rank_other_than_5_is_refused(shape, data_format) -> None:
    x = np.zeros(shape, np.float32)
    with pytest.raises(ValueError):
        KerasLayer(2, 2, data_format=data_format)(x)
    with pytest.raises(ValueError):
        Conv3DTranspose(2, 2, data_format=data_format)(x)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_channel_mismatch_is_refused(data_format) -> None:
    def shape(channels: int) -> tuple[int, ...]:
        return (1, 2, 2, 2, channels) if data_format == "channels_last" else (1, channels, 2, 2, 2)

    rng = np.random.default_rng(2)
    ours, theirs = build_pair(
        {"filters": 2, "kernel_size": 2, "data_format": data_format}, shape(3), rng
    )
    x = np.zeros(shape(2), np.float32)
    with pytest.raises(ValueError):
        theirs(x)
    with pytest.raises(ValueError):
        ours(x)


# ---------------------------------------------------------------------------
# Keras's own Conv3DTranspose test cases (keras/src/layers/convolutional/conv_transpose_test.py)

KERAS_SUITE = [
    {
        "filters": 5,
        "kernel_size": 2,
        "strides": 2,
        "padding": "valid",
        "output_padding": None,
        "data_format": "channels_last",
        "dilation_rate": 1,
    },
    {
        "filters": 6,
        "kernel_size": 2,
        "strides": 3,
        "padding": "same",
        "output_padding": 2,
        "data_format": "channels_last",
        "dilation_rate": (1, 1, 1),
    },
    {
        "filters": 6,
        "kernel_size": (2, 2, 3),
        "strides": (2, 1, 2),
        "padding": "valid",
        "output_padding": None,
        "data_format": "channels_last",
        "dilation_rate": (1, 1, 1),
    },
]
# test_conv3d_transpose_basic's expected output shapes for input (2, 8, 8, 8, 4).
KERAS_SUITE_SHAPES = [(2, 16, 16, 16, 5), (2, 23, 23, 23, 6), (2, 16, 9, 17, 6)]


@pytest.mark.parametrize("case", range(len(KERAS_SUITE)))
def test_keras_suite_cases(case: int) -> None:
    rng = np.random.default_rng(case)
    kwargs = KERAS_SUITE[case]
    got, _ = assert_same_outputs(kwargs, (2, 8, 8, 8, 4), rng)
    assert got.shape == KERAS_SUITE_SHAPES[case]
    ours = Conv3DTranspose(**kwargs)
    ours.build((2, 8, 8, 8, 4))
    assert len(ours.get_weights()) == 2
    assert ours.losses == []


def test_keras_suite_output_padding_serialization() -> None:
    theirs = KerasLayer(2, 3, strides=2, output_padding=1)
    ours = Conv3DTranspose.from_config(theirs.get_config())
    revived = Conv3DTranspose.from_config(ours.get_config())
    assert ours.output_padding == revived.output_padding == (1, 1, 1)
    shape = (1, 5, 5, 5, 3)
    expected = tuple(theirs.compute_output_shape(shape))
    assert ours.compute_output_shape(shape) == revived.compute_output_shape(shape) == expected


# ---------------------------------------------------------------------------
# Config


CONFIG_CASES: list[dict[str, Any]] = [
    {},
    {"kernel_initializer": None, "bias_initializer": None},
    {"use_bias": None},
    {"activation": "relu", "kernel_initializer": "he_normal", "bias_initializer": "ones"},
    {"activation": "swish", "kernel_initializer": "lecun_uniform", "use_bias": False},
    {"activation": "hard_swish", "kernel_initializer": "orthogonal", "bias_initializer": "zeros"},
    {
        "activation": "softmax",
        "kernel_initializer": "random_normal",
        "bias_initializer": "random_uniform",
    },
    {
        "kernel_initializer": "truncated_normal",
        "bias_initializer": {"class_name": "Constant", "config": {"value": 0.25}},
    },
    {
        "kernel_initializer": "glorot_normal",
        "kernel_regularizer": "l2",
        "bias_regularizer": "l1",
        "activity_regularizer": "l1l2",
    },
    {
        "kernel_initializer": "he_uniform",
        "kernel_regularizer": "l1l2",
        "activity_regularizer": "l2",
        "kernel_constraint": "max_norm",
        "bias_constraint": "non_neg",
    },
    {
        "kernel_initializer": "lecun_normal",
        "kernel_constraint": "unit_norm",
        "bias_constraint": "min_max_norm",
        "activity_regularizer": "l1",
    },
    {
        "kernel_initializer": "variance_scaling",
        "kernel_constraint": "non_neg",
        "activation": "gelu",
    },
    {"kernel_initializer": "uniform", "bias_initializer": "normal", "activation": "mish"},
    {"kernel_initializer": "one", "bias_initializer": "zero", "activation": "selu"},
    {
        "strides": (2, 1, 3),
        "output_padding": (1, 0, 2),
        "padding": "SAME",
        "data_format": "channels_first",
        "activation": "elu",
        "use_bias": False,
    },
    {
        "dilation_rate": (2, 1, 3),
        "kernel_size": (3, 1, 2),
        "padding": "Valid",
        "activation": "sigmoid",
        "trainable": False,
    },
    {"dtype": "float64", "activation": "tanh"},
    {"dtype": "mixed_float16", "activation": "softplus"},
]


@pytest.mark.parametrize("case", range(len(CONFIG_CASES)))
def test_get_config_parity(case: int) -> None:
    kwargs = {"filters": 3, "kernel_size": 2, "name": f"parity_{case}", **CONFIG_CASES[case]}
    theirs = KerasLayer(**kwargs)
    expected = normalized(theirs.get_config())
    revived = Conv3DTranspose.from_config(theirs.get_config())
    assert normalized(revived.get_config()) == expected
    revived_from_json = Conv3DTranspose.from_config(json.loads(json.dumps(theirs.get_config())))
    assert normalized(revived_from_json.get_config()) == expected
    assert normalized(Conv3DTranspose(**kwargs).get_config()) == expected


# ---------------------------------------------------------------------------
# Regularization losses


REGULARIZER_CASES: list[dict[str, Any]] = [
    {"kernel_regularizer": "l2"},
    {"bias_regularizer": "l1"},
    {"activity_regularizer": "l2"},
    {"kernel_regularizer": "l1l2", "bias_regularizer": "l2", "activity_regularizer": "l1"},
    {
        "kernel_regularizer": {"class_name": "L1L2", "config": {"l1": 0.003, "l2": 0.02}},
        "bias_regularizer": {"class_name": "L2", "config": {"l2": 0.5}},
        "activity_regularizer": {"class_name": "L1", "config": {"l1": 0.1}},
    },
    {
        "kernel_regularizer": "l1",
        "activity_regularizer": "l1l2",
        "use_bias": False,
        "data_format": "channels_first",
        "activation": "relu",
    },
]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", range(len(REGULARIZER_CASES)))
def test_regularization_losses(case: int, batch: int) -> None:
    rng = np.random.default_rng(case)
    kwargs = {"filters": 3, "kernel_size": 2, "strides": 2, **REGULARIZER_CASES[case]}
    shape = (batch, 2, 3, 2, 2)
    ours, theirs = build_pair(kwargs, shape, rng)
    x = rng.standard_normal(shape).astype(np.float32)
    # Keras keeps the activity penalty of the latest call only.
    for scale in (1.0, 3.0):
        theirs(scale * x)
        ours(scale * x)
        expected = [float(to_numpy(v)) for v in theirs.losses]
        assert len(ours.losses) == len(expected)
        np.testing.assert_allclose(ours.losses, expected, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------
# dtype policies


POLICY_TOLERANCE = {
    "float64": 1e-10,
    "float16": 1e-2,
    "mixed_float16": 1e-2,
    "bfloat16": 5e-2,
    "mixed_bfloat16": 5e-2,
}


@pytest.mark.parametrize("policy", sorted(POLICY_TOLERANCE))
def test_dtype_policies(policy: str) -> None:
    rng = np.random.default_rng(23)
    tol = POLICY_TOLERANCE[policy]
    for extra in [
        {"kernel_size": 3, "strides": 2, "padding": "same"},
        {"kernel_size": (2, 1, 3), "strides": (1, 3, 2), "output_padding": (0, 2, 1)},
        {
            "kernel_size": 2,
            "dilation_rate": 2,
            "data_format": "channels_first",
            "activation": "sigmoid",
        },
    ]:
        kwargs = {"filters": 3, "dtype": policy, **extra}
        ours, theirs = build_pair(kwargs, (2, 3, 3, 3, 3), rng)
        assert (ours.dtype, ours.compute_dtype) == (theirs.dtype, theirs.compute_dtype)
        assert [w.dtype.name for w in ours.get_weights()] == [
            w.dtype.name for w in (to_numpy(v) for v in theirs.weights)
        ]
        x = rng.standard_normal((2, 3, 3, 3, 3))
        x = x.astype(np.float64 if policy == "float64" else np.float32)
        expected = to_numpy(theirs(x))
        got = ours(x)
        assert got.dtype == expected.dtype
        np.testing.assert_allclose(
            got.astype(np.float64), expected.astype(np.float64), rtol=tol, atol=tol
        )


# ---------------------------------------------------------------------------
# Constraints


# (kernel_constraint, bias_constraint); axis lists only fit the 5D kernel.
CONSTRAINTS: list[tuple[Any, Any]] = [
    ("max_norm", "max_norm"),
    ("non_neg", "non_neg"),
    ("unit_norm", "unit_norm"),
    ("min_max_norm", "min_max_norm"),
    ({"class_name": "MaxNorm", "config": {"max_value": 0.3, "axis": [0, 1, 2]}}, "non_neg"),
    (
        {"class_name": "MinMaxNorm", "config": {"min_value": 0.2, "max_value": 0.4, "rate": 0.5}},
        {"class_name": "MaxNorm", "config": {"max_value": 0.5, "axis": 0}},
    ),
    ({"class_name": "UnitNorm", "config": {"axis": [0, 1, 2, 3]}}, None),
]


@pytest.mark.parametrize("case", range(len(CONSTRAINTS)))
def test_constraint_projection(case: int) -> None:
    """apply_constraints projects the weights as Keras's constraint objects do."""
    rng = np.random.default_rng(case)
    kernel_constraint, bias_constraint = CONSTRAINTS[case]
    kwargs = {
        "filters": 3,
        "kernel_size": 2,
        "kernel_constraint": kernel_constraint,
        "bias_constraint": bias_constraint,
    }
    ours, theirs = build_pair(kwargs, (1, 2, 2, 2, 4), rng)
    # Scale up so norm constraints are violated before projection.
    weights = [4.0 * w for w in ours.get_weights()]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    expected = {"kernel": to_numpy(theirs.kernel_constraint(theirs.kernel))}
    if bias_constraint is not None:
        expected["bias"] = to_numpy(theirs.bias_constraint(theirs.bias))
    originals = dict(zip(["kernel", "bias"], weights, strict=True))
    constraint_of = {"kernel": theirs.kernel_constraint, "bias": theirs.bias_constraint}

    def keras_satisfied(weights: dict[str, np.ndarray]) -> dict[str, bool]:
        # Satisfied: Keras's projection leaves the weight unchanged.
        return {
            name: bool(
                np.allclose(
                    to_numpy(constraint_of[name](keras.ops.convert_to_tensor(weights[name]))),
                    weights[name],
                    rtol=0,
                    atol=1e-6,
                )
            )
            for name in expected
        }

    assert ours.check_constraints() == keras_satisfied(originals)
    ours.apply_constraints()
    got = dict(zip(["kernel", "bias"], ours.get_weights(), strict=True))
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    if bias_constraint is None:
        np.testing.assert_array_equal(got["bias"], originals["bias"])
    # Not always True: MinMaxNorm with rate < 1 moves only part of the way.
    assert ours.check_constraints() == keras_satisfied(got)


def test_alias() -> None:
    assert keras.layers.Convolution3DTranspose is KerasLayer
    assert Convolution3DTranspose is Conv3DTranspose
