"""conv3dt.regularizers and conv3dt.constraints against Keras: values, names, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conv3dt import constraints, regularizers

RNG = np.random.default_rng(7)
KERNEL = RNG.normal(size=(3, 3, 3, 4, 2))  # (kd, kh, kw, filters, in_channels)
MATRIX = RNG.normal(size=(6, 9))
VECTOR = RNG.normal(size=(5,))


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def keras_call(keras, obj, x: np.ndarray) -> np.ndarray:
    return to_numpy(obj(keras.ops.convert_to_tensor(x)))


# ----------------------------------------------------------------- regularizers
def regularizer_pairs(keras):
    k = keras.regularizers
    return [
        (regularizers.L1(), k.L1()),
        (regularizers.L1(0.3), k.L1(0.3)),
        (regularizers.L2(), k.L2()),
        (regularizers.L2(1.5), k.L2(1.5)),
        (regularizers.L1L2(0.2, 0.05), k.L1L2(0.2, 0.05)),
        (regularizers.L1L2(l2=0.4), k.L1L2(l2=0.4)),
        (regularizers.OrthogonalRegularizer(), k.OrthogonalRegularizer()),
        (
            regularizers.OrthogonalRegularizer(0.5, "columns"),
            k.OrthogonalRegularizer(0.5, "columns"),
        ),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_regularizer_values_match_keras(keras, dtype):
    for ours, theirs in regularizer_pairs(keras):
        inputs = [MATRIX, MATRIX.T]
        if not isinstance(ours, regularizers.OrthogonalRegularizer):
            inputs += [KERNEL, VECTOR]
        for x in inputs:
            x = x.astype(dtype)
            value = ours(x)
            assert isinstance(value, float)
            expected = float(keras_call(keras, theirs, x))
            rtol = 1e-5 if dtype == np.float32 else 1e-12
            assert value == pytest.approx(expected, rel=rtol, abs=1e-7), (ours, x.shape)


def test_orthogonal_regularizer_on_orthonormal_rows_is_zero():
    q, _ = np.linalg.qr(MATRIX.T)  # 9 x 6, orthonormal columns
    assert regularizers.OrthogonalRegularizer(mode="columns")(q) == pytest.approx(0, abs=1e-12)
    # Identical rows: the n (n - 1) ordered pairs each have cosine 1, twice the
    # n (n - 1) / 2 pairs divided by; times 0.5 the penalty equals the factor.
    same = np.tile(VECTOR, (4, 1))
    assert regularizers.OrthogonalRegularizer(factor=0.5)(same) == pytest.approx(0.5, rel=1e-6)


def test_orthogonal_regularizer_refuses_other_ranks(keras):
    with pytest.raises(ValueError, match="rank 2"):
        regularizers.OrthogonalRegularizer()(KERNEL)
    with pytest.raises(ValueError, match="rank 2"):
        keras.regularizers.OrthogonalRegularizer()(keras.ops.convert_to_tensor(KERNEL))


def test_regularizer_names_match_keras(keras):
    from keras.src.regularizers import ALL_OBJECTS_DICT

    for name in sorted(set(ALL_OBJECTS_DICT) - {"Regularizer", "regularizer"}):
        ours = regularizers.serialize(regularizers.get(name))
        assert ours == keras.regularizers.serialize(keras.regularizers.get(name)), name
    # "l1_l2", the name Keras's L1L2 docstring shows, is refused by Keras's get; so here.
    for get in (keras.regularizers.get, regularizers.get):
        with pytest.raises(ValueError, match="Could not interpret regularizer identifier: l1_l2"):
            get("l1_l2")


def test_regularizer_config_round_trip(keras):
    for _, theirs in regularizer_pairs(keras):
        expected = json.loads(json.dumps(keras.regularizers.serialize(theirs)))
        ours = regularizers.get(expected)
        assert regularizers.serialize(ours) == expected
        again = keras.regularizers.get(regularizers.serialize(ours))
        assert keras.regularizers.serialize(again) == expected
    layer = keras.layers.Conv3DTranspose(
        2,
        3,
        kernel_regularizer="l2",
        bias_regularizer=keras.regularizers.L1(0.2),
        activity_regularizer="l1l2",
    )
    config = json.loads(json.dumps(layer.get_config()))
    for key in ("kernel_regularizer", "bias_regularizer", "activity_regularizer"):
        assert regularizers.serialize(regularizers.get(config[key])) == config[key]


def test_regularizer_defaults_and_none():
    assert regularizers.get("l1").get_config() == {"l1": float(np.float32(0.01))}
    assert regularizers.get("l2").get_config() == {"l2": 0.01}
    assert regularizers.get("l1l2").get_config() == {"l1": 0.0, "l2": 0.0}
    assert regularizers.L1L2(l1=None, l2=0.5).get_config() == {"l1": 0.0, "l2": 0.5}
    assert regularizers.get(None) is None and regularizers.serialize(None) is None
    assert regularizers.L1L2()(KERNEL) == 0.0
    reg = regularizers.L2(0.3)
    assert regularizers.get(reg) is reg


@pytest.mark.parametrize(
    ("identifier", "message"),
    [
        ("l3", r"Could not interpret regularizer identifier: l3\..*l1l2"),
        ({"class_name": "L2", "config": {"l2": -1.0}}, "l2=-1.0"),
        ({"class_name": "L2", "config": {"l2": float("nan")}}, "l2=nan"),
        ({"class_name": "L1L2", "config": {"l3": 1.0}}, r"Unrecognized.*'l3'"),
        ({"class_name": "OrthogonalRegularizer", "config": {"mode": "diagonal"}}, "'diagonal'"),
        ({"module": "project.regs", "class_name": "L2", "config": {}}, "Custom"),
        (
            {
                "module": "keras.regularizers",
                "class_name": "L2",
                "config": {},
                "registered_name": "pkg>L2",
            },
            "Custom",
        ),
        ([0.01], r"regularizer=\[0.01\]"),
    ],
)
def test_bad_regularizers(identifier, message):
    with pytest.raises(ValueError, match=message):
        regularizers.get(identifier)


# ------------------------------------------------------------------ constraints
def constraint_pairs(keras):
    k = keras.constraints
    return [
        (constraints.MaxNorm(), k.MaxNorm()),
        (constraints.MaxNorm(0.7, axis=1), k.MaxNorm(0.7, axis=1)),
        (constraints.MaxNorm(1.0, axis=[0, 1, 2, 3]), k.MaxNorm(1.0, axis=[0, 1, 2, 3])),
        (constraints.MinMaxNorm(), k.MinMaxNorm()),
        (constraints.MinMaxNorm(0.5, 1.5, rate=0.3, axis=-1), k.MinMaxNorm(0.5, 1.5, 0.3, -1)),
        (constraints.MinMaxNorm(2.0, 3.0, axis=[0, 1, 2]), k.MinMaxNorm(2.0, 3.0, axis=[0, 1, 2])),
        (constraints.UnitNorm(), k.UnitNorm()),
        (constraints.UnitNorm(axis=[0, 1, 2, 3]), k.UnitNorm(axis=[0, 1, 2, 3])),
        (constraints.NonNeg(), k.NonNeg()),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constraint_values_match_keras(keras, dtype):
    for ours, theirs in constraint_pairs(keras):
        for w in (KERNEL, MATRIX):
            if np.max(np.atleast_1d(ours.get_config().get("axis", 0))) >= w.ndim:
                continue
            w = w.astype(dtype)
            out = ours(w)
            assert out.dtype == dtype and out.shape == w.shape
            expected = keras_call(keras, theirs, w)
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6, err_msg=repr(ours))


def test_constraints_keep_float16():
    assert constraints.MaxNorm(0.5)(KERNEL.astype(np.float16)).dtype == np.float16


def test_max_norm_bounds_the_norms():
    out = constraints.MaxNorm(0.5, axis=[0, 1, 2, 3])(KERNEL)
    norms = np.sqrt(np.sum(out**2, axis=(0, 1, 2, 3)))
    np.testing.assert_allclose(norms, 0.5, rtol=1e-6)


def test_satisfied():
    max_norm = constraints.MaxNorm(1.0, axis=[0, 1, 2, 3])
    assert not constraints.satisfied(max_norm, KERNEL)
    assert constraints.satisfied(max_norm, max_norm(KERNEL))
    small = KERNEL * 1e-3  # every norm well under 1: MaxNorm moves it by ~1e-7 relative
    assert constraints.satisfied(max_norm, small)
    assert not constraints.satisfied(constraints.NonNeg(), KERNEL)
    assert constraints.satisfied(constraints.NonNeg(), np.abs(KERNEL))
    unit = constraints.UnitNorm()
    assert constraints.satisfied(unit, unit(KERNEL))
    assert not constraints.satisfied(unit, unit(KERNEL) * (1 + 1e-3), atol=1e-6)
    assert constraints.satisfied(unit, unit(KERNEL) * (1 + 1e-3), atol=1e-2)
    assert constraints.satisfied(None, KERNEL)


def test_constraint_names_match_keras(keras):
    from keras.src.constraints import ALL_OBJECTS_DICT

    for name in sorted(set(ALL_OBJECTS_DICT) - {"Constraint", "constraint"}):
        ours = constraints.serialize(constraints.get(name))
        assert ours == keras.constraints.serialize(keras.constraints.get(name)), name


def test_constraint_config_round_trip(keras):
    for _, theirs in constraint_pairs(keras):
        expected = json.loads(json.dumps(keras.constraints.serialize(theirs)))
        ours = constraints.get(expected)
        assert constraints.serialize(ours) == expected
        again = keras.constraints.get(constraints.serialize(ours))
        assert keras.constraints.serialize(again) == expected
    layer = keras.layers.Conv3DTranspose(
        2, 3, kernel_constraint="max_norm", bias_constraint=keras.constraints.NonNeg()
    )
    config = json.loads(json.dumps(layer.get_config()))
    for key in ("kernel_constraint", "bias_constraint"):
        assert constraints.serialize(constraints.get(config[key])) == config[key]
    assert constraints.get(None) is None and constraints.serialize(None) is None


@pytest.mark.parametrize(
    ("identifier", "message"),
    [
        ("maxnorm", r"Could not interpret constraint identifier: maxnorm\..*max_norm"),
        ({"class_name": "MaxNorm", "config": {"max_value": "2"}}, "max_value='2'"),
        ({"class_name": "UnitNorm", "config": {"axis": 0.5}}, "axis=0.5"),
        ({"class_name": "MinMaxNorm", "config": {"low": 0}}, r"Unrecognized.*'low'"),
        ({"module": None, "class_name": "NonNeg", "config": {}}, "Custom"),
        ({"module": "mine", "class_name": "Clip", "config": {}}, "Custom"),
        ({"class_name": 3, "config": {}}, "class_name"),
    ],
)
def test_bad_constraints(identifier, message):
    with pytest.raises(ValueError, match=message):
        constraints.get(identifier)


def test_axis_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"axis`=5"):
        constraints.MaxNorm(axis=5)(KERNEL)
