"""conv3dt.initializers: Keras's distributions, fans, seeds, names and configs.

The statistical checks draw N = 32768 values (a Conv3DTranspose kernel of shape
(4, 4, 4, 32, 16)) with fixed seeds, so every test is deterministic; the bounds
are wide enough that a correct sampler would fail them with negligible
probability (about 1e-6 or less for each check, as derived next to each bound).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conv3dt import initializers

SHAPE = (4, 4, 4, 32, 16)  # (kd, kh, kw, filters, in_channels)
N = math.prod(SHAPE)
RECEPTIVE = 4 * 4 * 4
# Keras's rule reads the transposed kernel like a convolution kernel: the
# second-to-last axis (filters) is "input depth", the last one "output depth".
FAN_IN, FAN_OUT = RECEPTIVE * 32, RECEPTIVE * 16
# Standard deviation of a unit normal truncated to (-2, 2).
TRUNCATED_STD = 0.87962566103423978

# Two-sided Kolmogorov-Smirnov critical value at alpha = 1e-6: sqrt(ln(2 / alpha) / 2).
KS_C = math.sqrt(math.log(2 / 1e-6) / 2)

_erf = np.vectorize(math.erf)


def normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


# class name, config, distribution, parameter (uniform: limit; normals: stddev of
# the underlying normal before truncation).
CASES = [
    ("GlorotUniform", {}, "uniform", math.sqrt(6.0 / (FAN_IN + FAN_OUT))),
    ("HeUniform", {}, "uniform", math.sqrt(6.0 / FAN_IN)),
    ("LecunUniform", {}, "uniform", math.sqrt(3.0 / FAN_IN)),
    ("GlorotNormal", {}, "truncated", math.sqrt(2.0 / (FAN_IN + FAN_OUT)) / TRUNCATED_STD),
    ("HeNormal", {}, "truncated", math.sqrt(2.0 / FAN_IN) / TRUNCATED_STD),
    ("LecunNormal", {}, "truncated", math.sqrt(1.0 / FAN_IN) / TRUNCATED_STD),
    (
        "VarianceScaling",
        {"scale": 3.0, "mode": "fan_out", "distribution": "untruncated_normal"},
        "normal",
        math.sqrt(3.0 / FAN_OUT),
    ),
    (
        "VarianceScaling",
        {"scale": 0.5, "mode": "fan_avg", "distribution": "uniform"},
        "uniform",
        math.sqrt(3.0 * 0.5 / ((FAN_IN + FAN_OUT) / 2)),
    ),
    ("RandomUniform", {"minval": -0.3, "maxval": 0.3}, "uniform", 0.3),
    ("RandomNormal", {"mean": 0.0, "stddev": 0.2}, "normal", 0.2),
    ("TruncatedNormal", {"mean": 0.0, "stddev": 0.2}, "truncated", 0.2),
    # Fans from explicit axes: fan_in = in_channels, fan_out = filters.
    (
        "GlorotUniform",
        {"input_axes": [4], "output_axes": [3]},
        "uniform",
        math.sqrt(6.0 / (16 + 32)),
    ),
]
CASE_IDS = [f"{name}-{i}" for i, (name, *_rest) in enumerate(CASES)]


def analytic(distribution: str, parameter: float) -> tuple[float, float, float]:
    """(standard deviation, kurtosis, bound or inf) of the named distribution."""
    if distribution == "uniform":
        return parameter / math.sqrt(3.0), 1.8, parameter
    if distribution == "normal":
        return parameter, 3.0, math.inf
    # Unit normal truncated to (-2, 2): its kurtosis is 3 - 2 * 2**3 phi(2) / (...)
    # ~= 2.36; 3 is a safe upper value for the error bound below.
    return parameter * TRUNCATED_STD, 3.0, 2.0 * parameter


def cdf(distribution: str, parameter: float, x: np.ndarray) -> np.ndarray:
    if distribution == "uniform":
        return np.clip((x + parameter) / (2 * parameter), 0.0, 1.0)
    if distribution == "normal":
        return normal_cdf(x / parameter)
    low, high = normal_cdf(np.array(-2.0)), normal_cdf(np.array(2.0))
    return np.clip((normal_cdf(x / parameter) - low) / (high - low), 0.0, 1.0)


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a.ravel()), np.sort(b.ravel())
    grid = np.concatenate([a, b])
    return float(
        np.max(
            np.abs(
                np.searchsorted(a, grid, "right") / a.size
                - np.searchsorted(b, grid, "right") / b.size
            )
        )
    )


def ks_one_sample(sample: np.ndarray, distribution: str, parameter: float) -> float:
    x = np.sort(sample.ravel().astype(np.float64))
    f = cdf(distribution, parameter, x)
    n = x.size
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def draw(class_name: str, config: dict, seed: int = 7) -> np.ndarray:
    init = initializers.get({"class_name": class_name, "config": config})
    return init(SHAPE, seed=seed)


@pytest.mark.parametrize(("class_name", "config", "distribution", "parameter"), CASES, ids=CASE_IDS)
def test_distribution_statistics(class_name, config, distribution, parameter):
    values = draw(class_name, config)
    assert values.shape == SHAPE and values.dtype == np.float32
    std, kurtosis, bound = analytic(distribution, parameter)
    # Sample mean: standard error std / sqrt(N); 5 standard errors ~ p 6e-7.
    assert abs(values.mean()) < 5 * std / math.sqrt(N)
    # Sample std: relative standard error sqrt((kurtosis - 1) / (4 N)); 5 of them.
    assert abs(values.std() / std - 1) < 5 * math.sqrt((kurtosis - 1) / (4 * N))
    if math.isfinite(bound):
        assert np.abs(values).max() <= np.float32(bound)
        # The density of |x| at the bound is 1 / bound (uniform) or 0.226 / bound
        # (normal cut at 2 stddev), so no |x| within bound * 100 / N of it has
        # p < exp(-0.226 * 100) ~ 1.5e-10.
        assert np.abs(values).max() > bound * (1 - 100 / N)
    else:
        # Some |value| beyond 3 std: missed with p = (1 - 0.0027)^N ~ e^-88.
        assert np.abs(values).max() > 3 * std
    assert ks_one_sample(values, distribution, parameter) < KS_C / math.sqrt(N)


@pytest.mark.parametrize(("class_name", "config", "distribution", "parameter"), CASES, ids=CASE_IDS)
def test_same_distribution_as_keras_samples(keras, class_name, config, distribution, parameter):
    ours = draw(class_name, config)
    theirs = to_numpy(
        keras.initializers.get({"class_name": class_name, "config": {**config, "seed": 11}})(SHAPE)
    )
    assert theirs.shape == ours.shape
    std, _, _ = analytic(distribution, parameter)
    assert abs(ours.mean() - theirs.mean()) < 5 * std * math.sqrt(2.0 / N)
    # Two-sample KS: critical value KS_C * sqrt(2 / N) at alpha = 1e-6.
    assert ks_two_sample(ours, theirs) < KS_C * math.sqrt(2.0 / N)


@pytest.mark.parametrize("shape", [SHAPE, (3, 3, 3, 4, 2), (2, 16), (6, 6)])
def test_orthogonal(keras, shape):
    gain = 1.5
    ours = initializers.Orthogonal(gain=gain)(shape, seed=3)
    theirs = to_numpy(keras.initializers.Orthogonal(gain=gain, seed=3)(shape))
    for values in (ours, theirs):
        assert values.shape == tuple(shape)
        flat = values.reshape(-1, shape[-1]).astype(np.float64) / gain
        # Orthonormal columns when the flat matrix is tall, orthonormal rows when wide.
        gram = flat.T @ flat if flat.shape[0] >= flat.shape[1] else flat @ flat.T
        np.testing.assert_allclose(gram, np.eye(gram.shape[0]), atol=1e-5)
    if math.prod(shape) >= 1000:
        assert ks_two_sample(ours, theirs) < KS_C * math.sqrt(2.0 / ours.size)


def test_orthogonal_needs_rank_two():
    with pytest.raises(ValueError, match="at least two-dimensional"):
        initializers.Orthogonal()((5,))


def test_truncated_normal_stays_within_two_stddev():
    values = initializers.TruncatedNormal(mean=1.0, stddev=0.5, seed=0)((200_000,), "float64")
    assert values.min() > 0.0 and values.max() < 2.0


def test_identity(keras):
    np.testing.assert_array_equal(initializers.Identity(gain=2.0)((3, 4)), 2.0 * np.eye(3, 4))
    with pytest.raises(ValueError, match="2D matrices"):
        initializers.get("identity")(SHAPE)
    # Keras refuses the same shape.
    with pytest.raises(ValueError, match="2D matrices"):
        keras.initializers.get("identity")(SHAPE)


@pytest.mark.parametrize("name", ["zeros", "ones"])
def test_constant_kinds(name):
    expected = 0.0 if name == "zeros" else 1.0
    out = initializers.get(name)((2, 3), dtype="int32")
    assert out.dtype == np.int32 and (out == expected).all()
    out = initializers.Constant(0.25)(SHAPE, dtype="float64")
    assert out.dtype == np.float64 and (out == 0.25).all()


def test_compute_fans_matches_keras(keras):
    from keras.src.initializers.random_initializers import compute_fans

    for shape in [(), (5,), (3, 4), (3, 3, 3, 16, 8), (2, 3, 4, 5, 6)]:
        assert initializers.compute_fans(shape) == compute_fans(shape)
    assert initializers.compute_fans(SHAPE, [0, 4], [3]) == compute_fans(SHAPE, [0, 4], [3])
    assert initializers.compute_fans(SHAPE) == (FAN_IN, FAN_OUT)


# ------------------------------------------------------------------------ seeds
def test_unseeded_instance_repeats_its_draw_like_keras(keras):
    ours = initializers.get("he_normal")
    np.testing.assert_array_equal(ours(SHAPE), ours(SHAPE))
    theirs = keras.initializers.get("he_normal")
    np.testing.assert_array_equal(to_numpy(theirs(SHAPE)), to_numpy(theirs(SHAPE)))
    # ...while two unseeded instances draw differently.
    assert not np.array_equal(ours(SHAPE), initializers.get("he_normal")(SHAPE))


def test_call_seed_reproduces_and_config_seed_wins():
    a = initializers.get("glorot_uniform")(SHAPE, seed=5)
    b = initializers.get("glorot_uniform")(SHAPE, seed=5)
    c = initializers.get("glorot_uniform")(SHAPE, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    seeded = initializers.GlorotUniform(seed=1)
    np.testing.assert_array_equal(seeded(SHAPE, seed=5), seeded(SHAPE, seed=6))
    np.testing.assert_array_equal(seeded(SHAPE), initializers.GlorotUniform(seed=1)(SHAPE))
    assert not np.array_equal(seeded(SHAPE), a)


def test_negative_seed_is_accepted_like_keras():
    init = initializers.RandomNormal(seed=-3)
    np.testing.assert_array_equal(init((4,)), initializers.RandomNormal(seed=-3)((4,)))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", np.float64])
def test_dtype(dtype):
    for name in ("glorot_uniform", "he_normal", "orthogonal", "random_normal"):
        assert initializers.get(name)((3, 3, 3, 2, 4), dtype=dtype, seed=0).dtype == np.dtype(dtype)


# ---------------------------------------------------------------- names, configs
KERAS_NAMES_NOT_SUPPORTED = {"STFT", "stft", "STFTInitializer", "Initializer", "initializer"}


def test_every_keras_name_resolves_to_the_same_config(keras):
    from keras.src.initializers import ALL_OBJECTS_DICT

    for name in sorted(set(ALL_OBJECTS_DICT) - KERAS_NAMES_NOT_SUPPORTED):
        ours = initializers.serialize(initializers.get(name))
        if name in ("Constant", "constant"):
            # Keras 3.15's get("constant") fails (Constant.from_config wants "value").
            expected = keras.initializers.serialize(keras.initializers.Constant())
        else:
            expected = keras.initializers.serialize(keras.initializers.get(name))
        assert ours == expected, name


@pytest.mark.parametrize("name", ["STFT", "stft", "STFTInitializer"])
def test_stft_is_refused(name):
    with pytest.raises(ValueError, match="STFTSpectrogram"):
        initializers.get(name)
    with pytest.raises(ValueError, match="STFTSpectrogram"):
        initializers.get({"module": "keras.initializers", "class_name": name, "config": {}})


def keras_configured(keras):
    k = keras.initializers
    return [
        k.VarianceScaling(scale=2.0, mode="fan_out", distribution="uniform", seed=3),
        k.VarianceScaling(distribution="normal"),
        k.GlorotUniform(seed=4, input_axes=[0, 1, 2, 3], output_axes=[4]),
        k.HeNormal(seed=0),
        k.LecunUniform(),
        k.RandomNormal(mean=1.0, stddev=0.2, seed=0),
        k.RandomUniform(minval=-1.0, maxval=2.0),
        k.TruncatedNormal(mean=-0.5, stddev=0.01, seed=123),
        k.Orthogonal(gain=2.0, seed=9),
        k.Constant(0.25),
        k.Constant(3),
        k.Identity(),
        k.Ones(),
        k.Zeros(),
    ]


def test_config_round_trip_with_keras(keras):
    for keras_init in keras_configured(keras):
        expected = json.loads(json.dumps(keras.initializers.serialize(keras_init)))
        ours = initializers.get(expected)
        assert initializers.serialize(ours) == expected
        assert type(ours).__name__ == type(keras_init).__name__
        # And Keras reads ours back to the same object.
        again = keras.initializers.get(initializers.serialize(ours))
        assert keras.initializers.serialize(again) == expected


def test_layer_config_round_trip(keras):
    layer = keras.layers.Conv3DTranspose(
        4,
        3,
        kernel_initializer=keras.initializers.HeUniform(seed=2),
        bias_initializer=keras.initializers.Constant(0.1),
    )
    config = json.loads(json.dumps(layer.get_config()))
    for key in ("kernel_initializer", "bias_initializer"):
        assert initializers.serialize(initializers.get(config[key])) == config[key]
    defaults = keras.layers.Conv3DTranspose(4, 3).get_config()
    assert (
        initializers.serialize(initializers.get("glorot_uniform")) == defaults["kernel_initializer"]
    )
    assert initializers.serialize(initializers.get("zeros")) == defaults["bias_initializer"]


def test_identity_gain_is_kept_where_keras_drops_it(keras):
    config = initializers.serialize(initializers.Identity(gain=3.0))
    assert config["config"] == {"gain": 3.0}
    assert keras.initializers.get(config).gain == 3.0
    assert initializers.serialize(initializers.Identity())["config"] == {}


def test_legacy_dict_without_module():
    init = initializers.get(
        {
            "class_name": "VarianceScaling",
            "config": {"scale": 1.0, "mode": "fan_avg", "distribution": "normal", "seed": None},
        }
    )
    assert isinstance(init, initializers.VarianceScaling)
    assert init.distribution == "truncated_normal"


def test_instances_and_classes():
    init = initializers.HeNormal(seed=3)
    assert initializers.get(init) is init
    assert isinstance(initializers.get(initializers.Orthogonal), initializers.Orthogonal)
    assert initializers.get(None) is None
    assert initializers.serialize(None) is None


# ----------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("identifier", "message"),
    [
        (
            "glorot_uniformm",
            r"Could not interpret initializer identifier: glorot_uniformm\..*glorot_uniform",
        ),
        (42, "initializer=42"),
        ({"config": {}}, "class_name"),
        (
            {"class_name": "Glorot", "config": {}},
            "Could not interpret initializer identifier: .*unknown class_name 'Glorot'",
        ),
        ({"class_name": "HeNormal", "config": [1]}, "must be a dict"),
        ({"class_name": "HeNormal", "config": {"dtype": "float32"}}, r"Unrecognized.*'dtype'"),
        ({"module": "my_lib.inits", "class_name": "HeNormal", "config": {}}, "Custom"),
        (
            {
                "module": "keras.initializers",
                "class_name": "MyInit",
                "config": {},
                "registered_name": "my_pkg>MyInit",
            },
            "Custom",
        ),
        (
            {"class_name": "HeNormal", "config": {"seed": {"class_name": "SeedGenerator"}}},
            "SeedGenerator",
        ),
        ({"class_name": "VarianceScaling", "config": {"scale": 0.0}}, "scale=0.0"),
        ({"class_name": "VarianceScaling", "config": {"mode": "fan"}}, "'fan'"),
        ({"class_name": "VarianceScaling", "config": {"distribution": "poisson"}}, "'poisson'"),
        ({"class_name": "GlorotUniform", "config": {"input_axes": "0"}}, "input_axes='0'"),
        ({"class_name": "RandomNormal", "config": {"stddev": "big"}}, "stddev='big'"),
    ],
)
def test_bad_identifiers(identifier, message):
    with pytest.raises(ValueError, match=message):
        initializers.get(identifier)


def test_bad_call_arguments():
    with pytest.raises(ValueError, match="floating dtype"):
        initializers.get("he_normal")((3, 3), dtype="int32")
    with pytest.raises(ValueError, match="dtype='nonsense'"):
        initializers.get("zeros")((3, 3), dtype="nonsense")
    with pytest.raises(ValueError, match="shape"):
        initializers.get("zeros")((3, -1))
    with pytest.raises(ValueError, match="seed='1'"):
        initializers.get("he_normal")((3, 3), seed="1")
    init = initializers.GlorotUniform(input_axes=[7], output_axes=[0])
    with pytest.raises(ValueError, match=r"\[7\]"):
        init(SHAPE)
