"""conv3dt.activations against keras.activations, plus lookups, dtypes and stability."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conv3dt import activations

RNG = np.random.default_rng(20240611)
# A channels-last batch of volumes with an even channel count (glu halves it).
X = RNG.uniform(-5.0, 5.0, size=(2, 3, 4, 5, 6))

# float16 keeps ~3 decimal digits: its spacing at 5 is 2**-8; Keras computes some
# functions in float16 steps, so allow a few spacings.
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-10, np.float16: 2e-2}


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def to_numpy(value) -> np.ndarray:
    # torch tensors through np.asarray warn on NumPy 2 (no copy keyword).
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def keras_apply(keras, fn, x: np.ndarray, **kwargs) -> np.ndarray:
    return to_numpy(fn(keras.ops.convert_to_tensor(x), **kwargs))


def test_names_are_keras_names(keras):
    from keras.src.activations import ALL_OBJECTS_DICT

    # threshold needs two arguments a layer cannot pass: refused by get, on purpose.
    assert set(activations.names()) == set(ALL_OBJECTS_DICT) - {"threshold"}


@pytest.mark.parametrize("name", activations.names())
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_matches_keras(keras, name, dtype):
    x = X.astype(dtype)
    ours = activations.get(name)(x)
    theirs = keras_apply(keras, keras.activations.get(name), x)
    assert ours.dtype == theirs.dtype == dtype
    assert ours.shape == theirs.shape
    atol = TOLERANCE[dtype] * max(1.0, np.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("relu", {"negative_slope": 0.1}),
        ("relu", {"max_value": 2.5}),
        ("relu", {"max_value": 6.0}),
        ("relu", {"threshold": 1.0}),
        ("relu", {"negative_slope": 0.3, "max_value": 3.0, "threshold": -0.5}),
        ("leaky_relu", {"negative_slope": 0.05}),
        ("elu", {"alpha": 0.5}),
        ("celu", {"alpha": 2.0}),
        ("gelu", {"approximate": True}),
        ("squareplus", {"b": 1.0}),
        ("soft_shrink", {"threshold": 1.5}),
        ("hard_shrink", {"threshold": 1.5}),
        ("threshold", {"threshold": 0.5, "default_value": -2.0}),
        ("softmax", {"axis": 1}),
        ("log_softmax", {"axis": 2}),
        ("sparsemax", {"axis": 3}),
        ("glu", {"axis": 0}),
    ],
)
def test_parameters_match_keras(keras, name, kwargs):
    x = X.astype(np.float32)
    ours = getattr(activations, name)(x, **kwargs)
    theirs = keras_apply(keras, getattr(keras.activations, name), x, **kwargs)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * max(1.0, np.abs(theirs).max()))


def test_extreme_inputs_stay_finite_and_exact():
    x = np.array([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        sig = activations.sigmoid(x)
        plus = activations.softplus(x)
        logsig = activations.log_sigmoid(x)
        silu = activations.silu(x)
        mish = activations.mish(x)
    # Limits: sigmoid -> 0 / 1, softplus(x) -> x for large x and exp(x) for very negative x.
    np.testing.assert_array_equal(sig[[0, -2, -1]], [0.0, 1.0, 1.0])
    np.testing.assert_allclose(sig[2], np.exp(-30.0), rtol=1e-6)
    assert sig[3] == 0.5
    np.testing.assert_allclose(plus[4:], x[4:], rtol=1e-7)
    np.testing.assert_allclose(plus[2], np.exp(-30.0), rtol=1e-6)
    np.testing.assert_allclose(logsig[:3], x[:3], rtol=1e-7)
    np.testing.assert_allclose(silu[-2:], x[-2:], rtol=1e-7)
    np.testing.assert_allclose(mish[-2:], x[-2:], rtol=1e-7)
    for out in (sig, plus, logsig, silu, mish):
        assert np.isfinite(out).all()


def test_softmax_family_is_stable_on_the_last_axis():
    # Huge logits that a naive exp would overflow, on a channels_first-shaped array.
    x = np.stack([np.full((2, 3, 4), 1000.0), np.full((2, 3, 4), 999.0)], axis=-1)
    x = x.astype(np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        soft = activations.softmax(x)
        log_soft = activations.log_softmax(x)
        sparse = activations.sparsemax(x)
    expected = 1.0 / (1.0 + np.exp(-1.0))
    np.testing.assert_allclose(soft[..., 0], expected, rtol=1e-6)
    np.testing.assert_allclose(log_soft[..., 0], np.log(expected), rtol=1e-6)
    np.testing.assert_allclose(np.sum(soft, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.sum(sparse, axis=-1), 1.0, rtol=1e-6)


def test_squareplus_keeps_precision_for_negative_inputs():
    x = np.array([-1e3, -1e6], dtype=np.float64)
    # (x + sqrt(x^2 + b)) / 2 == b / (2 (sqrt(x^2 + b) - x)), close to b / (4 |x|).
    expected = 4.0 / (2.0 * (np.sqrt(x * x + 4.0) - x))
    np.testing.assert_allclose(activations.squareplus(x), expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtype_is_kept(dtype):
    for name in activations.names():
        assert activations.get(name)(X.astype(dtype)).dtype == dtype, name


def test_integer_input_is_computed_in_float32():
    assert activations.sigmoid(np.arange(-3, 4)).dtype == np.float32
    np.testing.assert_array_equal(activations.relu(np.arange(-3, 4)), [0, 0, 0, 0, 1, 2, 3])


def test_glu_halves_the_axis_and_refuses_odd_sizes():
    assert activations.glu(X).shape == (*X.shape[:-1], 3)
    with pytest.raises(ValueError, match="even size"):
        activations.glu(X[..., :5])


def test_axis_is_checked():
    with pytest.raises(ValueError, match="axis=7"):
        activations.softmax(X, axis=7)


def test_get_none_name_callable():
    assert activations.get(None) is None
    assert activations.get("relu") is activations.relu
    assert activations.get("swish") is activations.silu
    assert activations.get("hard_swish") is activations.hard_silu

    def custom(x):
        return x * 2

    assert activations.get(custom) is custom


@pytest.mark.parametrize(
    "module", ["builtins", "keras.activations", "keras.src.activations.activations"]
)
def test_get_serialized_dict(module):
    config = {
        "module": module,
        "class_name": "function",
        "config": "gelu",
        "registered_name": "function",
    }
    assert activations.get(config) is activations.gelu


def test_get_keras_serialized_dict(keras):
    for name in ("relu", "swish", "softmax"):
        config = json.loads(
            json.dumps(keras.saving.serialize_keras_object(keras.activations.get(name)))
        )
        assert activations.get(config) is activations.get(name)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"identifier: rleu\..*relu.*softmax"):
        activations.get("rleu")


@pytest.mark.parametrize(
    "config",
    [
        {
            "module": "my_project.acts",
            "class_name": "function",
            "config": "relu",
            "registered_name": "function",
        },
        {
            "module": "builtins",
            "class_name": "function",
            "config": "relu",
            "registered_name": "MyPackage>relu",
        },
        # A layer registered by user code under a built-in's class name.
        {
            "module": "keras.layers",
            "class_name": "ReLU",
            "config": {},
            "registered_name": "My>ReLU",
        },
        {"class_name": "__lambda__", "config": {"value": "..."}},
    ],
)
def test_custom_objects_are_refused(config):
    with pytest.raises(ValueError, match="custom objects"):
        activations.get(config)


def test_activation_layers_with_weights_are_refused():
    config = {
        "module": "keras.layers",
        "class_name": "PReLU",
        "config": {},
        "registered_name": None,
    }
    with pytest.raises(ValueError, match=r"PReLU.*weights"):
        activations.get(config)


def test_malformed_values_are_refused():
    with pytest.raises(ValueError, match="class_name"):
        activations.get({"config": "relu"})
    with pytest.raises(ValueError, match="activation=42"):
        activations.get(42)
    with pytest.raises(ValueError, match=r"'threshold'.*default_value"):
        activations.get("threshold")


@pytest.mark.parametrize("name", sorted(set(activations.names()) | {"swish", "hard_swish"}))
def test_serialize_matches_keras(keras, name):
    expected = keras.activations.serialize(keras.activations.get(name))
    assert activations.serialize(activations.get(name)) == expected


def test_serialize_none_matches_a_keras_layer_without_activation(keras):
    layer = keras.layers.Conv3DTranspose(2, 3, activation=None)
    assert activations.serialize(None) == layer.get_config()["activation"] == "linear"
    assert activations.get(activations.serialize(None)) is activations.linear


def test_serialize_custom_function_as_keras_writes_it():
    def doubled(x):
        return 2 * x

    config = activations.serialize(doubled)
    assert config == {
        "module": __name__,
        "class_name": "function",
        "config": "doubled",
        "registered_name": "doubled",
    }
    with pytest.raises(ValueError, match="custom objects"):
        activations.get(config)
    with pytest.raises(ValueError, match="only functions"):
        activations.serialize(np.negative)
