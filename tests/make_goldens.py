"""Record golden vectors of ``keras.layers.Conv3DTranspose`` for tests/test_goldens.py.

Run by hand, with Keras 3 and a backend installed, from the repository root::

    KERAS_BACKEND=torch python tests/make_goldens.py

It rewrites tests/goldens/*.npz, one file per configuration below. The tests
read them without Keras, so conv3dt stays checked against real Keras output
where Keras is not installed.

Each file holds (``allow_pickle=False``):

``config``
    The Keras layer's ``get_config()`` as a one-element JSON string array.
``kwargs``
    The constructor arguments used, also as a JSON string array.
``x``
    The input (in the layer's ``data_format``).
``kernel`` and, with a bias, ``bias``
    The weights set on the layer (Keras layout).
``conv``
    ``keras.ops.conv_transpose`` of ``x`` with ``kernel`` (no bias, no activation).
``y``
    The layer's output on ``x``.
``losses``
    ``layer.losses`` after the call (empty without regularizers).
``keras_version``
    The Keras version and backend that wrote the file, as a string array.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras

OUT = pathlib.Path(__file__).resolve().parent / "goldens"

# (name, input shape in data_format layout, layer kwargs). Small shapes keep the
# files small; together they cover the geometry cases that are easy to get wrong.
CASES: list[tuple[str, tuple[int, ...], dict]] = [
    ("basic_k2_s2_valid", (2, 3, 2, 4, 3), {"filters": 2, "kernel_size": 2, "strides": 2}),
    (
        "same_k3_s2_relu",
        (1, 3, 4, 2, 2),
        {"filters": 3, "kernel_size": 3, "strides": 2, "padding": "same", "activation": "relu"},
    ),
    ("same_even_k2_s1", (2, 3, 3, 4, 2), {"filters": 2, "kernel_size": 2, "padding": "same"}),
    (
        "same_even_k4_s3_op2",
        (1, 2, 3, 2, 2),
        {"filters": 2, "kernel_size": 4, "strides": 3, "padding": "same", "output_padding": 2},
    ),
    # "same" with output_padding reaching past the full output: zeros appended.
    (
        "same_k1_s3_op2_past_end",
        (1, 2, 2, 3, 2),
        {"filters": 2, "kernel_size": 1, "strides": 3, "padding": "same", "output_padding": 2},
    ),
    (
        "same_k2_s4_op3_past_end",
        (1, 2, 1, 2, 1),
        {"filters": 2, "kernel_size": 2, "strides": 4, "padding": "same", "output_padding": 3},
    ),
    ("valid_stride_above_kernel", (1, 2, 3, 2, 2), {"filters": 2, "kernel_size": 2, "strides": 3}),
    (
        "valid_k1_s3_op2",
        (2, 2, 2, 2, 1),
        {"filters": 1, "kernel_size": 1, "strides": 3, "output_padding": 2},
    ),
    ("dilation2_k3_valid", (1, 3, 2, 3, 2), {"filters": 2, "kernel_size": 3, "dilation_rate": 2}),
    (
        "dilation_aniso_same",
        (1, 3, 4, 3, 2),
        {"filters": 2, "kernel_size": (2, 3, 2), "padding": "same", "dilation_rate": (1, 2, 3)},
    ),
    (
        "channels_first_same_k3_s2_relu",
        (2, 3, 2, 3, 2),
        {
            "filters": 2,
            "kernel_size": 3,
            "strides": 2,
            "padding": "same",
            "data_format": "channels_first",
            "activation": "relu",
        },
    ),
    # Keras's softmax acts on the last axis (width under channels_first).
    (
        "channels_first_softmax",
        (1, 2, 2, 3, 3),
        {"filters": 3, "kernel_size": 2, "data_format": "channels_first", "activation": "softmax"},
    ),
    (
        "channels_first_log_softmax_s2_op1",
        (1, 2, 2, 2, 2),
        {
            "filters": 2,
            "kernel_size": 3,
            "strides": 2,
            "output_padding": 1,
            "padding": "same",
            "data_format": "channels_first",
            "activation": "log_softmax",
        },
    ),
    (
        "no_bias_tanh",
        (1, 3, 3, 2, 3),
        {"filters": 2, "kernel_size": (2, 1, 3), "use_bias": False, "activation": "tanh"},
    ),
    (
        "aniso_valid_op",
        (1, 2, 3, 2, 2),
        {
            "filters": 3,
            "kernel_size": (1, 2, 3),
            "strides": (3, 1, 2),
            "output_padding": (2, 0, 1),
        },
    ),
    (
        "float64_policy_sigmoid",
        (3, 2, 2, 2, 2),
        {"filters": 2, "kernel_size": 2, "strides": 2, "dtype": "float64", "activation": "sigmoid"},
    ),
    (
        "glu_even_filters",
        (1, 2, 3, 2, 2),
        {"filters": 4, "kernel_size": 3, "padding": "same", "activation": "glu"},
    ),
    (
        "gelu_k4_s2_same",
        (1, 2, 2, 3, 2),
        {"filters": 2, "kernel_size": 4, "strides": 2, "padding": "SAME", "activation": "gelu"},
    ),
    (
        "single_voxel_k3_s2_same",
        (1, 1, 1, 1, 3),
        {"filters": 2, "kernel_size": 3, "strides": 2, "padding": "same"},
    ),
    (
        "serialized_elu_s2_op1",
        (1, 2, 3, 2, 2),
        {
            "filters": 2,
            "kernel_size": 3,
            "strides": 2,
            "padding": "same",
            "output_padding": 1,
            "activation": "SERIALIZED:elu",
        },
    ),
    (
        "regularizers",
        (2, 2, 2, 3, 2),
        {
            "filters": 2,
            "kernel_size": 2,
            "strides": 2,
            "activation": "softplus",
            "kernel_regularizer": {"class_name": "L2", "config": {"l2": 0.01}},
            "bias_regularizer": "l1",
            "activity_regularizer": {"class_name": "L1L2", "config": {"l1": 0.001, "l2": 0.002}},
        },
    ),
]


def _to_numpy(tensor) -> np.ndarray:
    # Keras's torch backend converts with np.array(tensor), which NumPy 2 flags
    # with a DeprecationWarning about torch's __array__ signature; values are unaffected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return keras.ops.convert_to_numpy(tensor)


def _layer_kwargs(kwargs: dict) -> dict:
    """Constructor arguments for Keras; "SERIALIZED:<name>" becomes a serialized function."""
    out = dict(kwargs)
    act = out.get("activation")
    if isinstance(act, str) and act.startswith("SERIALIZED:"):
        fn = keras.activations.get(act.split(":", 1)[1])
        out["activation"] = keras.saving.serialize_keras_object(fn)
    return out


def _case(name: str, shape: tuple[int, ...], kwargs: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    layer_kwargs = _layer_kwargs(kwargs)
    layer = keras.layers.Conv3DTranspose(name=name, **layer_kwargs)
    layer.build(shape)
    dtype = layer.variable_dtype
    kernel_shape = tuple(layer.kernel.shape)
    fan_in = int(np.prod(kernel_shape[:3])) * kernel_shape[4]
    kernel = (rng.standard_normal(kernel_shape) / np.sqrt(fan_in)).astype(dtype)
    weights = [kernel]
    if layer.use_bias:
        weights.append((0.5 * rng.standard_normal(kernel_shape[3])).astype(dtype))
    layer.set_weights(weights)
    x = rng.standard_normal(shape).astype(layer.compute_dtype)
    y = _to_numpy(layer(x))
    conv = _to_numpy(
        keras.ops.conv_transpose(
            x,
            kernel,
            strides=layer.strides,
            padding=layer.padding,
            output_padding=layer.output_padding,
            data_format=layer.data_format,
            dilation_rate=layer.dilation_rate,
        )
    )
    arrays = {
        "config": np.array([json.dumps(layer.get_config(), sort_keys=True)]),
        "kwargs": np.array([json.dumps(layer_kwargs, sort_keys=True)]),
        "x": x,
        "kernel": kernel,
        "conv": conv,
        "y": y,
        "losses": np.array([float(_to_numpy(v)) for v in layer.losses]),
        "keras_version": np.array([f"keras {keras.__version__} ({keras.backend.backend()})"]),
    }
    if layer.use_bias:
        arrays["bias"] = weights[1]
    return arrays


def main() -> None:
    """Rewrite every golden file."""
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.npz"):
        old.unlink()
    for seed, (name, shape, kwargs) in enumerate(CASES):
        np.savez_compressed(OUT / f"{name}.npz", **_case(name, shape, kwargs, seed))
    total = sum(p.stat().st_size for p in OUT.glob("*.npz"))
    print(f"wrote {len(CASES)} golden files to {OUT} ({total / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
