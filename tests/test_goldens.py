"""conv3dt against golden vectors recorded from real Keras (tests/make_goldens.py).

These tests never import Keras: they read tests/goldens/*.npz, which hold
Keras's config, inputs, weights and outputs for a set of small layers.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from conv3dt import Conv3DTranspose, conv3d_transpose

GOLDENS = sorted((pathlib.Path(__file__).resolve().parent / "goldens").glob("*.npz"))


def _load(path: pathlib.Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["config"] = json.loads(str(arrays["config"][0]))
    arrays["kwargs"] = json.loads(str(arrays["kwargs"][0]))
    return arrays


def _tolerance(dtype: np.dtype) -> float:
    return 1e-10 if dtype == np.float64 else 1e-5


def test_goldens_present() -> None:
    assert len(GOLDENS) >= 20


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: p.stem)
def test_functional_op_matches_keras(path: pathlib.Path) -> None:
    g = _load(path)
    cfg = g["config"]
    got = conv3d_transpose(
        g["x"],
        g["kernel"],
        strides=cfg["strides"],
        padding=cfg["padding"],
        output_padding=cfg["output_padding"],
        data_format=cfg["data_format"],
        dilation_rate=cfg["dilation_rate"],
    )
    assert got.shape == g["conv"].shape
    assert got.dtype == g["conv"].dtype
    tol = _tolerance(got.dtype)
    np.testing.assert_allclose(got, g["conv"], rtol=tol, atol=tol)


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: p.stem)
def test_layer_from_keras_config_matches_keras(path: pathlib.Path) -> None:
    g = _load(path)
    layer = Conv3DTranspose.from_config(g["config"])
    assert json.loads(json.dumps(layer.get_config())) == g["config"]
    # Keras's compute_output_shape is the convolution's shape, even where an
    # activation (glu) changes the output's.
    assert layer.compute_output_shape(g["x"].shape) == g["conv"].shape
    weights = [g["kernel"], g["bias"]] if "bias" in g else [g["kernel"]]
    layer.set_weights(weights)
    got = layer(g["x"])
    assert got.shape == g["y"].shape
    assert got.dtype == g["y"].dtype
    tol = _tolerance(got.dtype)
    np.testing.assert_allclose(got, g["y"], rtol=tol, atol=tol)
    np.testing.assert_allclose(layer.losses, g["losses"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: p.stem)
def test_layer_from_constructor_arguments_matches_keras(path: pathlib.Path) -> None:
    """The same layer built from the arguments given to Keras (not its config)."""
    g = _load(path)
    layer = Conv3DTranspose(**g["kwargs"])
    layer.set_weights([g["kernel"], g["bias"]] if "bias" in g else [g["kernel"]])
    got = layer(g["x"])
    tol = _tolerance(got.dtype)
    np.testing.assert_allclose(got, g["y"], rtol=tol, atol=tol)


def test_documentation_example_shape() -> None:
    """Keras's docstring example: Conv3DTranspose(32, 2, 2, activation='relu')."""
    x = np.random.default_rng(0).random((4, 10, 8, 12, 128))
    layer = Conv3DTranspose(32, 2, 2, activation="relu")
    y = layer(x)
    assert y.shape == (4, 20, 16, 24, 32)
    assert layer.compute_output_shape(x.shape) == (4, 20, 16, 24, 32)
    assert y.dtype == np.float32
    assert float(y.min()) >= 0.0
