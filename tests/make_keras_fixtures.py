"""Write the Keras model files and reference arrays that tests/test_keras_file.py reads.

Run by hand, with Keras 3 and a backend installed, from the repository root::

    KERAS_BACKEND=torch python tests/make_keras_fixtures.py

It rewrites tests/fixtures/keras/. The tests themselves never import Keras: they
compare conv3dt's reader against what this script recorded from Keras.

Files written
-------------
sequential.keras, sequential.weights.h5, sequential.json (``model.to_json()``)
    Input -> Conv3DTranspose "up" -> Conv3D "conv".
functional.keras, functional.h5 (legacy HDF5 format)
    Input "volume" feeding three Conv3DTranspose layers: "up_cf"
    (channels_first), "up_dil" (dilation 2, no bias) and "inner_up" inside a
    nested Sequential model "decoder" (followed there by a Conv3D "inner_conv"),
    plus a Conv3D "conv".
<layer>.npz
    For each Conv3DTranspose layer: ``input``, ``output`` (Keras's output of
    that layer on ``input``), ``kernel`` and, with a bias, ``bias``.
expected.json
    Per model file: its Conv3DTranspose layer names in model order (Keras's
    ``model.layers``, nested models expanded) and each layer's ``get_config()``;
    plus the Keras version that wrote the files.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "keras"
SPATIAL = (4, 5, 6)
CHANNELS = 3


def _randomize(model: keras.Model, rng: np.random.Generator) -> None:
    # Keras initializes biases to zero; random biases make the checks meaningful.
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _randomize(layer, rng)
        elif layer.weights:
            layer.set_weights(
                [rng.uniform(-0.5, 0.5, w.shape).astype("float32") for w in layer.get_weights()]
            )


def _transpose_names(model: keras.Model) -> list[str]:
    names = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            names += _transpose_names(layer)
        elif isinstance(layer, keras.layers.Conv3DTranspose):
            names.append(layer.name)
    return names


def _record(layer: keras.layers.Layer, x: np.ndarray) -> dict:
    output = keras.ops.convert_to_numpy(layer(x))
    weights = layer.get_weights()
    arrays = {"input": x, "output": output, "kernel": weights[0]}
    if len(weights) > 1:
        arrays["bias"] = weights[1]
    np.savez(OUT / f"{layer.name}.npz", **arrays)
    return layer.get_config()


def sequential_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((*SPATIAL, CHANNELS)),
            keras.layers.Conv3DTranspose(
                2, 3, strides=2, padding="same", activation="relu", name="up"
            ),
            keras.layers.Conv3D(1, 3, name="conv"),
        ],
        name="seq",
    )


def functional_model() -> keras.Model:
    inputs = keras.Input((*SPATIAL, CHANNELS), name="volume")
    # channels_first reads the (4, 5, 6, 3) input as 4 channels of a 5x6x3 volume.
    up_cf = keras.layers.Conv3DTranspose(
        2, (2, 3, 3), strides=(1, 2, 2), data_format="channels_first", name="up_cf"
    )(inputs)
    up_dil = keras.layers.Conv3DTranspose(
        3, 3, dilation_rate=2, use_bias=False, padding="same", activation="tanh", name="up_dil"
    )(inputs)
    decoder = keras.Sequential(
        [
            keras.Input((*SPATIAL, CHANNELS)),
            keras.layers.Conv3DTranspose(2, 2, strides=2, name="inner_up"),
            keras.layers.Conv3D(1, 1, name="inner_conv"),
        ],
        name="decoder",
    )
    conv = keras.layers.Conv3D(2, 1, name="conv")(up_dil)
    return keras.Model(inputs, [up_cf, conv, decoder(inputs)], name="func")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    keras.utils.set_random_seed(1234)
    rng = np.random.default_rng(1234)
    x = rng.uniform(-1.0, 1.0, (1, *SPATIAL, CHANNELS)).astype("float32")
    expected: dict = {"keras_version": keras.__version__, "files": {}}

    seq = sequential_model()
    _randomize(seq, rng)
    seq.save(OUT / "sequential.keras")
    seq.save_weights(OUT / "sequential.weights.h5")
    (OUT / "sequential.json").write_text(seq.to_json())
    seq_layers = {"up": _record(seq.get_layer("up"), x)}
    for name in ("sequential.keras", "sequential.weights.h5"):
        expected["files"][name] = {
            "conv3d_transpose_layers": _transpose_names(seq),
            "configs": seq_layers,
        }

    func = functional_model()
    _randomize(func, rng)
    func.save(OUT / "functional.keras")
    with warnings.catch_warnings():
        # Keras warns that HDF5 is a legacy format; writing one is the point here.
        warnings.simplefilter("ignore")
        func.save(OUT / "functional.h5")
    func_layers = {
        "up_cf": _record(func.get_layer("up_cf"), x),
        "up_dil": _record(func.get_layer("up_dil"), x),
        "inner_up": _record(func.get_layer("decoder").get_layer("inner_up"), x),
    }
    for name in ("functional.keras", "functional.h5"):
        expected["files"][name] = {
            "conv3d_transpose_layers": _transpose_names(func),
            "configs": func_layers,
        }

    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total / 1024:.1f} KiB, to {OUT}")


if __name__ == "__main__":
    main()
