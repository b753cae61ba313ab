"""conv3dt against live Keras, round two: autocast under half precision, losses as
Keras collects them, activation layers, the Layer conveniences and Keras's own
``conv_transpose_test.py`` cases with its message regexes.

Runs where Keras is installed (CI: Keras 3 with ``KERAS_BACKEND=torch``).

Half precision: Keras casts the input (and, under ``mixed_*`` policies, the
kernel) to the compute dtype before convolving. JAX then sums in float32 and
rounds once; Keras's torch backend sums overlapping kernel taps in half
precision, rounding between them. So the live comparisons use designed layers
whose kernel taps do not overlap (``kernel_size == strides``), where the two
agree, and random layers are compared with the sum rounded once: Keras's
float64 layer on the pre-rounded input and kernel, its output rounded to the
compute dtype.
"""

from __future__ import annotations

import json
import warnings
import zlib
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")
ml_dtypes = pytest.importorskip("ml_dtypes")

from test_parity_keras import build_pair, normalized, random_config, random_weights, to_numpy  # noqa: E402

from conv3dt import Conv3DTranspose  # noqa: E402
from conv3dt.keras_file import load_layer  # noqa: E402
from conv3dt.run import upsample_file  # noqa: E402
from conv3dt.spec import LayerSpec, load_spec  # noqa: E402

KerasLayer = keras.layers.Conv3DTranspose

HALF_POLICIES = ["float16", "mixed_float16", "bfloat16", "mixed_bfloat16"]
POLICIES = ["float32", "float64", *HALF_POLICIES]


def _half(policy: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if "bfloat16" in policy else np.dtype(np.float16)


def _ulp_fraction(policy: str) -> float:
    # Spacing of float16 (10 fraction bits) or bfloat16 (7) relative to a power of two.
    return 2.0**-7 if "bfloat16" in policy else 2.0**-10


def _designed(shape: tuple[int, ...], scale: float, policy: str, rng: np.random.Generator):
    """float32 values 0.4 ulp (of the compute dtype) above multiples of scale/64.

    The multiples are exact in float16 and bfloat16 and their products and sums
    exact in float32, so rounding to the compute dtype first gives one exact
    answer whatever the order of summation, and skipping that rounding moves
    many outputs by whole ulps.
    """
    grid = rng.integers(-64, 65, size=shape) / 64 * scale
    return (grid + 0.4 * np.abs(grid) * _ulp_fraction(policy)).astype(np.float32)


def _pair(kwargs: dict, weights: list[np.ndarray], input_shape: tuple[int, ...]):
    ours = Conv3DTranspose(**kwargs)
    ours.set_weights(weights)
    theirs = KerasLayer(**kwargs)
    theirs.build(input_shape)
    theirs.set_weights(weights)
    return ours, theirs


# ---------------------------------------------------------------------------
# 1. Half-precision autocast


@pytest.mark.parametrize("policy", HALF_POLICIES)
def test_autocast_example_from_the_issue(policy: str) -> None:
    """kernel_size 1, no bias: x a fraction of an ulp above 1, w = 1.5 -> exactly 1.5."""
    x = np.full((1, 1, 1, 1, 1), 1.0039 if "bfloat16" in policy else 1.00048, np.float32)
    kwargs = {"filters": 1, "kernel_size": 1, "use_bias": False, "dtype": policy}
    ours, theirs = _pair(kwargs, [np.full((1, 1, 1, 1, 1), 1.5, np.float32)], x.shape)
    expected = to_numpy(theirs(x))
    got = ours(x)
    assert got.dtype == expected.dtype == _half(policy)
    assert float(got.ravel()[0]) == float(expected.ravel()[0]) == 1.5


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("policy", HALF_POLICIES)
def test_autocast_designed_inputs_equal_keras(policy: str, data_format: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{policy}/{data_format}".encode()))
    for kernel_size, in_channels in [(1, 3), (2, 1), (2, 4), ((1, 2, 3), 2)]:
        kwargs = {
            "filters": 3,
            "kernel_size": kernel_size,
            "strides": kernel_size,
            "dtype": policy,
            "data_format": data_format,
            "activation": "relu",
        }
        spatial = (3, 2, 4)
        shape = (2, *spatial, in_channels)
        if data_format == "channels_first":
            shape = (2, in_channels, *spatial)
        ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        weights = [
            _designed((*ks, 3, in_channels), 1.0, policy, rng),
            _designed((3,), 1.0, policy, rng),
        ]
        ours, theirs = _pair(kwargs, weights, shape)
        x = _designed(shape, 2.0, policy, rng)
        expected = to_numpy(theirs(x))
        got = ours(x)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(
            got.astype(np.float64), expected.astype(np.float64), err_msg=str(kwargs)
        )


def _rounded_once(kwargs: dict, kernel: np.ndarray, x: np.ndarray, policy: str) -> np.ndarray:
    """Keras's float64 layer on the input and kernel rounded to the compute dtype,
    its output rounded once to the compute dtype: what JAX's half convolution gives."""
    half = _half(policy)
    reference = KerasLayer(**{**kwargs, "dtype": "float64"})
    reference.build(x.shape)
    reference.set_weights([kernel.astype(half).astype(np.float64)])
    out = to_numpy(reference(x.astype(half).astype(np.float64)))
    return out.astype(half).astype(np.float64)


@pytest.mark.parametrize("policy", HALF_POLICIES)
def test_autocast_random_layers_round_once(policy: str) -> None:
    """Random geometry, unit-scale data: the sum of the rounded operands, rounded once.

    Summing in float32 rather than float64 may land a sum on the other side of a
    rounding midpoint; that moves an output by one ulp, in a few elements per
    hundred thousand. Without the cast about a fifth of the elements move.
    """
    rng = np.random.default_rng(
        {"float16": 1, "mixed_float16": 2, "bfloat16": 3, "mixed_bfloat16": 4}[policy]
    )
    total = mismatched = 0
    for _ in range(40):
        kwargs, shape = random_config(rng)
        kwargs.update(use_bias=False, dtype=policy)
        kwargs.pop("activation", None)
        ours = Conv3DTranspose(**kwargs)
        ours.build(shape)
        kernel = random_weights(ours.kernel.shape, False, rng)[0]
        ours.set_weights([kernel])
        x = rng.standard_normal(shape).astype(np.float32)
        got = ours(x).astype(np.float64)
        expected = _rounded_once(kwargs, kernel, x, policy)
        assert got.shape == expected.shape
        # One ulp of the compute dtype at the output's magnitude.
        ulp = np.maximum(np.abs(expected), 2.0**-14) * 2 * _ulp_fraction(policy)
        assert np.all(np.abs(got - expected) <= ulp), kwargs
        total += got.size
        mismatched += int(np.count_nonzero(got != expected))
    assert mismatched <= total * 1e-3, (mismatched, total)


@pytest.mark.parametrize("policy", ["mixed_float16", "bfloat16"])
def test_autocast_in_the_streamed_tiles(tmp_path, policy: str) -> None:
    """The CLI's path (tiles read from a file) rounds as the layer does."""
    rng = np.random.default_rng(9)
    kwargs = {"filters": 2, "kernel_size": 2, "strides": 2, "dtype": policy}
    shape = (2, 5, 3, 4, 3)
    weights = [_designed((2, 2, 2, 2, 3), 1.0, policy, rng), _designed((2,), 1.0, policy, rng)]
    ours, theirs = _pair(kwargs, weights, shape)
    x = _designed(shape, 2.0, policy, rng)
    np.save(tmp_path / "in.npy", x)
    upsample_file(
        LayerSpec(ours, "test"),
        str(tmp_path / "in.npy"),
        str(tmp_path / "out.npy"),
        tile_shape=(2, 2, 4),
    )
    got = np.load(tmp_path / "out.npy")
    expected = to_numpy(theirs(x)).astype(np.float64)
    np.testing.assert_array_equal(got.astype(np.float64), expected)
    # Random geometry through the tiles: the same as the layer's call.
    kwargs = {"filters": 3, "kernel_size": 3, "strides": 2, "padding": "same", "dtype": policy}
    layer = Conv3DTranspose(**kwargs)
    layer.build(shape)
    layer.set_weights(random_weights(layer.kernel.shape, True, rng))
    x = rng.standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    upsample_file(
        LayerSpec(layer, "test"),
        str(tmp_path / "in.npy"),
        str(tmp_path / "out.npy"),
        tile_shape=(3, 2, 5),
    )
    whole = layer(x).astype(np.float64)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy").astype(np.float64), whole)


# ---------------------------------------------------------------------------
# 2, 3. Losses: trainable weights only, each in its array's dtype

LOSS_CASES: list[dict[str, Any]] = [
    {"kernel_regularizer": "l2", "bias_regularizer": "l1", "activity_regularizer": "l1l2"},
    {
        "kernel_regularizer": {"class_name": "L1L2", "config": {"l1": 0.003, "l2": 0.02}},
        "bias_regularizer": {"class_name": "L2", "config": {"l2": 0.5}},
        "activity_regularizer": {"class_name": "L2", "config": {"l2": 0.3}},
    },
    {"kernel_regularizer": "l1", "activity_regularizer": "l1", "use_bias": False},
]


def _keras_losses(layer: Any) -> list[float]:
    return [float(to_numpy(v)) for v in layer.losses]


def _loss_pair(kwargs: dict, shape: tuple[int, ...], rng: np.random.Generator):
    ours = Conv3DTranspose(**kwargs)
    ours.build(shape)
    weights = random_weights(ours.kernel.shape, ours.use_bias is not False, rng)
    return _pair(kwargs, [3.0 * w for w in weights], shape)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_trainable_false_keeps_only_the_activity_penalty(case: int, policy: str) -> None:
    rng = np.random.default_rng(case)
    shape = (3, 2, 3, 2, 4)
    kwargs = {"filters": 3, "kernel_size": 2, "strides": 2, "dtype": policy, **LOSS_CASES[case]}
    weight_penalties = sum(
        kwargs.get(name) is not None
        and (name == "kernel_regularizer" or kwargs.get("use_bias", True))
        for name in ("kernel_regularizer", "bias_regularizer")
    )
    for trainable in (False, True):
        ours, theirs = _loss_pair({**kwargs, "trainable": trainable}, shape, rng)
        before = _keras_losses(theirs)
        assert len(ours.losses) == len(before) == (weight_penalties if trainable else 0)
        x = rng.standard_normal(shape).astype(np.float32)
        theirs(x)
        ours(x)
        expected = _keras_losses(theirs)
        assert len(expected) == 1 + (weight_penalties if trainable else 0)
        np.testing.assert_allclose(ours.losses, expected, rtol=1e-6, atol=0)
    # Switched off after construction, as Keras's attribute allows.
    ours.trainable = theirs.trainable = False
    np.testing.assert_allclose(ours.losses, _keras_losses(theirs), rtol=1e-6, atol=0)
    assert len(ours.losses) == 1


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_penalties_in_the_policy_dtypes(case: int, policy: str) -> None:
    """Half-precision penalties are half-precision numbers, equal to Keras's.

    float32 sums may differ from Keras's in the last bit (summation order);
    Keras's torch backend returns float64 activity penalties rounded to float32
    (its divide_no_nan), where JAX keeps float64.
    """
    rng = np.random.default_rng(10 + case)
    shape = (3, 2, 3, 2, 4)
    kwargs = {"filters": 3, "kernel_size": 2, "strides": 2, "dtype": policy, **LOSS_CASES[case]}
    ours, theirs = _loss_pair(kwargs, shape, rng)
    for scale in (1.0, 5.0):
        x = (scale * rng.standard_normal(shape)).astype(np.float32)
        theirs(x)
        ours(x)
        expected = _keras_losses(theirs)
        np.testing.assert_allclose(ours.losses, expected, rtol=1e-6, atol=0)
        if policy in HALF_POLICIES:
            # The activity penalty (first) is computed on the half-precision output,
            # the weights' on half-precision weights unless the policy is mixed.
            half = _half(policy)
            exact = ours.losses if policy in ("float16", "bfloat16") else ours.losses[:1]
            assert exact == expected[: len(exact)]
            assert all(float(np.asarray(v, dtype=half)) == v for v in exact)


# ---------------------------------------------------------------------------
# 5. Layer conveniences


def _names(weights: list) -> list[str]:
    return [w.path.split("/")[-1] for w in weights]


@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
def test_weights_lists_and_count_params(use_bias: bool, trainable: bool) -> None:
    kwargs = {"filters": 3, "kernel_size": (2, 1, 3), "use_bias": use_bias, "trainable": trainable}
    ours, theirs = Conv3DTranspose(**kwargs), KerasLayer(**kwargs)
    assert ours.weights == ours.trainable_weights == ours.non_trainable_weights == []
    assert theirs.weights == theirs.trainable_weights == theirs.non_trainable_weights == []
    for layer in (ours, theirs):
        with pytest.raises(
            ValueError, match=r"You tried to call `count_params` on layer '.*', but"
        ):
            layer.count_params()
    shape = (1, 2, 3, 2, 4)
    ours.build(shape)
    theirs.build(shape)
    ours.set_weights([to_numpy(w) for w in theirs.weights])
    assert ours.count_params() == theirs.count_params()
    assert isinstance(ours.count_params(), int)
    for name in ("weights", "trainable_weights", "non_trainable_weights"):
        expected = [to_numpy(w) for w in getattr(theirs, name)]
        got = getattr(ours, name)
        assert len(got) == len(expected), name
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    assert _names(theirs.weights) == ["kernel", "bias"][: len(ours.weights)]
    assert ours.weights[0] is ours.kernel
    # Freezing after construction moves every weight, as in Keras.
    ours.trainable = theirs.trainable = not trainable
    assert len(ours.trainable_weights) == len(theirs.trainable_weights)
    assert len(ours.non_trainable_weights) == len(theirs.non_trainable_weights)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_build_config_round_trip(data_format: str) -> None:
    kwargs = {"filters": 2, "kernel_size": 3, "strides": 2, "data_format": data_format}
    shape = (2, 4, 3, 5, 3) if data_format == "channels_last" else (2, 3, 4, 3, 5)
    ours, theirs = Conv3DTranspose(**kwargs), KerasLayer(**kwargs)
    assert ours.get_build_config() is None and theirs.get_build_config() is None
    # A shape given as a list is reported as a list, one from a call as a tuple.
    for given in ([None, *shape[1:]], shape):
        ours, theirs = Conv3DTranspose(**kwargs), KerasLayer(**kwargs)
        ours.build(given)
        theirs.build(given)
        assert ours.get_build_config() == theirs.get_build_config()
    ours, theirs = Conv3DTranspose(**kwargs), KerasLayer(**kwargs)
    x = np.ones(shape, np.float32)
    ours(x)
    theirs(x)
    assert ours.get_build_config() == theirs.get_build_config()
    config = normalized(theirs.get_build_config())
    revived_ours = Conv3DTranspose.from_config(ours.get_config())
    revived_theirs = KerasLayer.from_config(theirs.get_config())
    revived_ours.build_from_config(config)
    revived_theirs.build_from_config(config)
    assert revived_ours.built and revived_theirs.built
    assert revived_ours.kernel.shape == tuple(revived_theirs.kernel.shape)
    assert revived_ours.count_params() == revived_theirs.count_params()
    for empty in (None, {}):
        layer = Conv3DTranspose(**kwargs)
        layer.build_from_config(empty)
        assert not layer.built


# ---------------------------------------------------------------------------
# 6. Keras's own test_bad_init_args (conv_transpose_test.py), in 3D, with its regexes

BAD_INIT_ARGS: list[tuple[dict[str, Any], str]] = [
    (
        {"filters": 0, "kernel_size": 1},
        "Invalid value for argument `filters`. Expected a "
        "strictly positive value. Received filters=0.",
    ),
    (
        {"filters": 2, "kernel_size": (1, 1, 0)},
        r"The `kernel_size` argument must be a tuple of "
        r"\d+ integers. Received kernel_size=\(1, 1, 0\), including values"
        r" \{0\} that do not satisfy `value > 0`",
    ),
    (
        {"filters": 2, "kernel_size": (2, 2, 2), "strides": (1, 1, 0)},
        r"The `strides` argument must be a tuple of \d+ "
        r"integers. Received strides=\(1, 1, 0\), including values \{0\} "
        r"that do not satisfy `value > 0`",
    ),
    (
        {"filters": 2, "kernel_size": 3, "strides": 2, "output_padding": 2},
        r"`output_padding` must be strictly less than `strides`",
    ),
    (
        {"filters": 2, "kernel_size": 3, "strides": 2, "output_padding": 3},
        r"`output_padding` must be strictly less than `strides`",
    ),
    (
        {"filters": 2, "kernel_size": 3, "strides": (2, 3, 2), "output_padding": (1, 3, 1)},
        r"`output_padding` must be strictly less than `strides`",
    ),
    (
        {"filters": 2, "kernel_size": (2, 2, 2), "strides": 2, "dilation_rate": (2, 1, 1)},
        r"`strides > 1` not supported in conjunction with "
        r"`dilation_rate > 1`. Received: strides=\(2, 2, 2\) and "
        r"dilation_rate=\(2, 1, 1\)",
    ),
]


@pytest.mark.parametrize("case", range(len(BAD_INIT_ARGS)))
def test_keras_suite_bad_init_args_3d(case: int) -> None:
    kwargs, regex = BAD_INIT_ARGS[case]
    with pytest.raises(ValueError, match=regex):
        KerasLayer(**kwargs)
    with pytest.raises(ValueError, match=regex):
        Conv3DTranspose(**kwargs)


def test_keras_prints_the_refused_values_as_a_set() -> None:
    kwargs = {"filters": 2, "kernel_size": (0, -1, 0)}
    with pytest.raises(ValueError) as theirs:
        KerasLayer(**kwargs)
    with pytest.raises(ValueError) as ours:
        Conv3DTranspose(**kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    ("argument", "identifier", "message"),
    [
        ("kernel_regularizer", "l1_l2", "Could not interpret regularizer identifier: l1_l2"),
        ("bias_regularizer", "l3", "Could not interpret regularizer identifier: l3"),
        ("kernel_initializer", "glorot", "Could not interpret initializer identifier: glorot"),
        ("kernel_constraint", "maxnorm", "Could not interpret constraint identifier: maxnorm"),
        ("activation", "relu7", "Could not interpret activation function identifier: relu7"),
        ("activation", 3, "Could not interpret activation function identifier"),
    ],
)
def test_unknown_identifiers_are_refused_in_keras_words(argument, identifier, message) -> None:
    kwargs = {"filters": 2, "kernel_size": 2, argument: identifier}
    with pytest.raises(ValueError, match=message):
        KerasLayer(**kwargs)
    with pytest.raises(ValueError, match=message):
        Conv3DTranspose(**kwargs)


@pytest.mark.parametrize("case", range(3))
def test_keras_suite_layer_facts(case: int) -> None:
    """test_conv3d_transpose_basic's counts: 2 trainable weights, 0 non-trainable, 0 losses."""
    from test_parity_keras import KERAS_SUITE, KERAS_SUITE_SHAPES

    ours = Conv3DTranspose(**KERAS_SUITE[case])
    x = np.random.default_rng(case).normal(size=(2, 8, 8, 8, 4))
    assert ours(x).shape == KERAS_SUITE_SHAPES[case]
    assert (len(ours.trainable_weights), len(ours.non_trainable_weights)) == (2, 0)
    assert ours.losses == []


# ---------------------------------------------------------------------------
# 4. Keras's activation layers as a layer's activation


def _activation_layers() -> list[tuple[str, Any]]:
    layers = keras.layers
    return [
        ("leaky_relu", layers.LeakyReLU(negative_slope=0.37)),
        ("relu_all_args", layers.ReLU(max_value=0.8, negative_slope=0.1, threshold=0.2)),
        ("relu_max", layers.ReLU(max_value=1.0)),
        ("elu", layers.ELU(alpha=0.4)),
        ("softmax_axis_1", layers.Softmax(axis=1)),
        ("softmax_two_axes", layers.Softmax(axis=[2, 3])),
        ("activation_tanh", layers.Activation("tanh")),
        ("activation_softmax", layers.Activation("softmax")),
        ("leaky_relu_float64", layers.LeakyReLU(0.2, dtype="float64")),
    ]


ACTIVATION_LAYER_IDS = [name for name, _ in _activation_layers()]


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("index", range(len(ACTIVATION_LAYER_IDS)), ids=ACTIVATION_LAYER_IDS)
def test_activation_layers(index: int, data_format: str, policy: str) -> None:
    """The Keras object, its serialized dict and Keras's saved config give Keras's numbers.

    The activation layer applies its own dtype policy, as Keras's sublayers do:
    under mixed_float16 a float32 LeakyReLU gives float32 outputs.
    """
    rng = np.random.default_rng(100 + index)
    activation = _activation_layers()[index][1]
    kwargs = {
        "filters": 3,
        "kernel_size": 2,
        "strides": 2,
        "data_format": data_format,
        "activation": activation,
        "dtype": policy,
    }
    shape = (2, 3, 2, 4, 3) if data_format == "channels_last" else (2, 3, 3, 2, 4)
    theirs = KerasLayer(**kwargs)
    theirs.build(shape)
    weights = random_weights(tuple(theirs.kernel.shape), True, rng)
    theirs.set_weights(weights)
    config = normalized(theirs.get_config())
    serialized = keras.saving.serialize_keras_object(activation)
    x = rng.standard_normal(shape).astype(np.float32)
    expected = to_numpy(theirs(x))
    for ours in (
        Conv3DTranspose.from_config(config),
        Conv3DTranspose(**kwargs),
        Conv3DTranspose(**{**kwargs, "activation": serialized}),
    ):
        ours.set_weights(weights)
        got = ours(x)
        assert got.dtype == expected.dtype
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert {**normalized(ours.get_config()), "name": config["name"]} == config


def test_activation_layers_in_streamed_tiles_spec_and_model_file(tmp_path) -> None:
    """A Softmax over the depth (channels_last axis 1) keeps the depth whole in every
    tile; a spec and a .keras file carrying activation layers give Keras's numbers."""
    rng = np.random.default_rng(7)
    shape = (1, 4, 3, 5, 2)
    x = rng.standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    for activation in (keras.layers.Softmax(axis=1), keras.layers.LeakyReLU(0.25)):
        theirs = KerasLayer(2, 3, strides=2, padding="same", activation=activation)
        theirs.build(shape)
        weights = random_weights(tuple(theirs.kernel.shape), True, rng)
        theirs.set_weights(weights)
        expected = to_numpy(theirs(x))
        ours = Conv3DTranspose.from_config(normalized(theirs.get_config()))
        ours.set_weights(weights)
        upsample_file(
            LayerSpec(ours, "test"),
            str(tmp_path / "in.npy"),
            str(tmp_path / "out.npy"),
            tile_shape=(2, 2, 3),
        )
        np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-5)
        # A spec whose layer: is Keras's config.
        np.save(tmp_path / "kernel.npy", weights[0])
        np.save(tmp_path / "bias.npy", weights[1])
        spec = {
            "layer": normalized(theirs.get_config()),
            "weights": {"kernel": "kernel.npy", "bias": "bias.npy"},
        }
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        np.testing.assert_allclose(
            load_spec(tmp_path / "spec.json").layer(x), expected, rtol=1e-5, atol=1e-5
        )
        # A model file saved by Keras.
        model = keras.Sequential([keras.Input(shape[1:]), theirs])
        with warnings.catch_warnings():
            # Keras's torch backend converts weights with np.array(tensor), which
            # NumPy 2 flags; the saved values are unaffected.
            warnings.simplefilter("ignore", DeprecationWarning)
            model.save(tmp_path / "model.keras")
        loaded = load_layer(tmp_path / "model.keras")
        np.testing.assert_allclose(loaded(x), expected, rtol=1e-5, atol=1e-5)


def test_activation_layer_refusals() -> None:
    """Keras's own refusals of the arguments, and PReLU, which has weights."""
    for arguments, regex in [
        ({"max_value": -1.0}, "max_value of a ReLU layer cannot be a negative value"),
        ({"negative_slope": -0.5}, "negative_slope of a ReLU layer cannot be None or a negative"),
        ({"threshold": -0.5}, "threshold of a ReLU layer cannot be None or a negative"),
    ]:
        with pytest.raises(ValueError, match=regex):
            keras.layers.ReLU(**arguments)
        serialized = {"module": "keras.layers", "class_name": "ReLU", "config": arguments}
        with pytest.raises(ValueError, match=regex):
            Conv3DTranspose(2, 2, activation=serialized)
    regex = "The negative_slope value of a Leaky ReLU layer cannot be None or negative"
    with pytest.raises(ValueError, match=regex):
        keras.layers.LeakyReLU(negative_slope=-1.0)
    serialized = {"module": "keras.layers", "class_name": "LeakyReLU", "config": {"alpha": -1.0}}
    with pytest.raises(ValueError, match=regex):
        Conv3DTranspose(2, 2, activation=serialized)
    with pytest.raises(ValueError, match=r"PReLU.*weights"):
        Conv3DTranspose(2, 2, activation=keras.layers.PReLU())


# ---------------------------------------------------------------------------
# 7. Deliberately stricter or more useful than Keras (README, "Differences from Keras")


def test_integer_dtype_policy_is_refused_when_the_layer_is_made() -> None:
    theirs = KerasLayer(2, 2, dtype="int32")  # accepted...
    with pytest.raises(NotImplementedError):
        theirs.build((1, 2, 2, 2, 1))  # ...and fails drawing its weights
    with pytest.raises(ValueError, match=r"Unsupported `dtype`.*dtype='int32'"):
        Conv3DTranspose(2, 2, dtype="int32")


@pytest.mark.parametrize("policy", ["float32", "float64", "mixed_float16"])
def test_integer_inputs_are_converted_to_the_compute_dtype(policy: str) -> None:
    rng = np.random.default_rng(4)
    kwargs = {"filters": 2, "kernel_size": 3, "strides": 2, "dtype": policy}
    shape = (1, 3, 2, 4, 2)
    ours, theirs = build_pair(kwargs, shape, rng)
    x = rng.integers(-100, 100, size=shape).astype(np.int32)
    with pytest.raises(NotImplementedError):
        to_numpy(theirs(x))
    expected = ours(x.astype(np.float32))
    got = ours(x)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
