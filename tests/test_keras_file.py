"""conv3dt.keras_file against model files saved by Keras (tests/make_keras_fixtures.py).

Keras is not needed: the fixtures hold Keras's configs, weights and outputs.
Variants of the fixtures (older layouts, broken files) are written with zipfile
and h5py into tmp_path.
"""

from __future__ import annotations

import io
import json
import pathlib
import shutil
import zipfile
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np
import pytest

from conv3dt.keras_file import (
    KerasFileError,
    is_legacy_weights_only,
    list_conv3d_transpose_layers,
    load_keras_layer,
    load_layer,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "keras"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
FILES = EXPECTED["files"]
CASES = [(name, layer) for name in sorted(FILES) for layer in FILES[name]["configs"]]
WITH_CONFIG = [(name, layer) for name, layer in CASES if not name.endswith(".weights.h5")]


def reference(layer: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{layer}.npz", allow_pickle=False) as arrays:
        return dict(arrays)


def reference_weights(layer: str) -> list[np.ndarray]:
    arrays = reference(layer)
    return [arrays["kernel"], arrays["bias"]] if "bias" in arrays else [arrays["kernel"]]


def assert_same_weights(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def rewrite_archive(
    source: pathlib.Path,
    target: pathlib.Path,
    edit_config: Callable[[dict[str, Any]], None] | None = None,
    edit_weights: Callable[[h5py.File], None] | None = None,
    compression: int = zipfile.ZIP_STORED,
) -> pathlib.Path:
    """Copy a .keras archive, changing its config.json and/or model.weights.h5."""
    with zipfile.ZipFile(source) as archive:
        config = json.loads(archive.read("config.json"))
        weights = archive.read("model.weights.h5")
    if edit_config is not None:
        edit_config(config)
    scratch = target.with_suffix(".scratch.h5")
    scratch.write_bytes(weights)
    if edit_weights is not None:
        with h5py.File(scratch, "r+") as file:
            edit_weights(file)
    with zipfile.ZipFile(target, "w", compression) as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.write(scratch, "model.weights.h5")
    return target


def strip_layer_names(file: h5py.File) -> None:
    """Remove the layer names that recent Keras records beside each layer's variables."""
    groups: list[h5py.Group] = []
    file.visititems(lambda _, node: groups.append(node) if "name" in node.attrs else None)
    for group in groups:
        del group.attrs["name"]


def layer_configs(config: Any) -> list[dict[str, Any]]:
    """Every layer entry in a serialized model, nested models included."""
    found = []
    for layer in config["config"]["layers"]:
        found.append(layer)
        if isinstance(layer.get("config"), dict) and "layers" in layer["config"]:
            found += layer_configs(layer)
    return found


# ------------------------------------------------------------- Keras-saved files
@pytest.mark.parametrize(("file", "layer"), CASES)
def test_weights_equal_keras_weights(file: str, layer: str) -> None:
    _, weights = load_keras_layer(FIXTURES / file, layer)
    assert_same_weights(weights, reference_weights(layer))


@pytest.mark.parametrize(("file", "layer"), WITH_CONFIG)
def test_config_equals_keras_get_config(file: str, layer: str) -> None:
    config, _ = load_keras_layer(str(FIXTURES / file), layer)
    assert config == FILES[file]["configs"][layer]


@pytest.mark.parametrize("file", sorted(FILES))
def test_lists_conv3d_transpose_layers_in_model_order(file: str) -> None:
    assert list_conv3d_transpose_layers(FIXTURES / file) == FILES[file]["conv3d_transpose_layers"]


@pytest.mark.parametrize(("file", "layer"), WITH_CONFIG)
def test_loaded_layer_reproduces_keras_output(file: str, layer: str) -> None:
    arrays = reference(layer)
    conv = load_layer(FIXTURES / file, layer)
    assert conv.name == layer
    assert conv.get_config()["filters"] == arrays["kernel"].shape[3]
    output = conv(arrays["input"])
    assert output.shape == arrays["output"].shape
    np.testing.assert_allclose(output, arrays["output"], rtol=0, atol=1e-5)


def test_single_conv3d_transpose_is_used_when_no_name_is_given() -> None:
    config, weights = load_keras_layer(FIXTURES / "sequential.keras")
    assert config is not None and config["name"] == "up"
    assert_same_weights(weights, reference_weights("up"))


def test_nested_layer_can_be_named_by_its_path() -> None:
    config, weights = load_keras_layer(FIXTURES / "functional.keras", "decoder/inner_up")
    assert config is not None and config["name"] == "inner_up"
    assert_same_weights(weights, reference_weights("inner_up"))


# ------------------------------------------------------------ weights-only files
def test_weights_only_file_without_config_returns_no_config() -> None:
    config, weights = load_keras_layer(FIXTURES / "sequential.weights.h5", "up")
    assert config is None
    assert_same_weights(weights, reference_weights("up"))


@pytest.mark.parametrize("as_path", [True, False])
def test_weights_only_file_with_model_config(as_path: bool) -> None:
    json_path = FIXTURES / "sequential.json"
    model_config = json_path if as_path else json.loads(json_path.read_text())
    config, weights = load_keras_layer(
        FIXTURES / "sequential.weights.h5", model_config=model_config
    )
    assert config == FILES["sequential.weights.h5"]["configs"]["up"]
    assert_same_weights(weights, reference_weights("up"))


def test_weights_only_file_layer_from_layer_config() -> None:
    arrays = reference("up")
    layer_config = FILES["sequential.weights.h5"]["configs"]["up"]
    conv = load_layer(FIXTURES / "sequential.weights.h5", "up", layer_config=layer_config)
    np.testing.assert_allclose(conv(arrays["input"]), arrays["output"], rtol=0, atol=1e-5)


def test_weights_only_file_without_any_config_cannot_make_a_layer() -> None:
    with pytest.raises(KerasFileError, match=r"weights only.*layer_config"):
        load_layer(FIXTURES / "sequential.weights.h5", "up")


def test_model_config_is_refused_for_files_with_their_own() -> None:
    with pytest.raises(ValueError, match="model_config"):
        load_keras_layer(
            FIXTURES / "sequential.keras", "up", model_config=FIXTURES / "sequential.json"
        )


def test_layer_config_is_refused_for_files_with_their_own() -> None:
    with pytest.raises(ValueError, match="layer_config"):
        load_layer(
            FIXTURES / "sequential.keras",
            "up",
            layer_config=FILES["sequential.keras"]["configs"]["up"],
        )


# --------------------------------------------------------------- wrong layers
@pytest.mark.parametrize("file", ["functional.keras", "functional.h5"])
def test_unknown_name_lists_the_conv3d_transpose_layers(file: str) -> None:
    with pytest.raises(KerasFileError) as info:
        load_keras_layer(FIXTURES / file, "upsample")
    message = str(info.value)
    assert "'upsample'" in message and file in message
    for name in FILES[file]["conv3d_transpose_layers"]:
        assert repr(name) in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("file", "layer", "class_name"),
    [
        ("functional.keras", "conv", "Conv3D"),
        ("functional.h5", "conv", "Conv3D"),
        ("functional.keras", "decoder", "Sequential"),
        ("functional.keras", "volume", "InputLayer"),
        ("sequential.keras", "conv", "Conv3D"),
    ],
)
def test_other_layer_class_is_refused(file: str, layer: str, class_name: str) -> None:
    with pytest.raises(
        KerasFileError, match=f"not a Conv3DTranspose \\(class {class_name}\\)"
    ) as info:
        load_keras_layer(FIXTURES / file, layer)
    for name in FILES[file]["conv3d_transpose_layers"]:
        assert repr(name) in str(info.value)


def test_several_conv3d_transpose_layers_need_a_name() -> None:
    with pytest.raises(KerasFileError, match="has 3 Conv3DTranspose layers; name one") as info:
        load_keras_layer(FIXTURES / "functional.keras")
    assert "'up_dil', 'up_cf', 'inner_up'" in str(info.value)


def test_weights_only_file_refuses_other_layers() -> None:
    with pytest.raises(KerasFileError, match=r"not a Conv3DTranspose.*'up'"):
        load_keras_layer(FIXTURES / "sequential.weights.h5", "conv")


def test_same_name_in_two_nested_models_must_be_qualified(tmp_path: pathlib.Path) -> None:
    # A second copy of the nested model "decoder", with its kernel doubled.
    def add_copy(config: dict[str, Any]) -> None:
        layers = config["config"]["layers"]
        decoder = next(layer for layer in layers if layer["name"] == "decoder")
        twin = json.loads(json.dumps(decoder))
        twin["name"] = twin["config"]["name"] = "decoder2"
        layers.append(twin)

    def copy_weights(file: h5py.File) -> None:
        file.copy(file["layers/sequential"], file["layers"], "sequential_1")
        kernel = file["layers/sequential_1/layers/conv3d_transpose/vars/0"]
        kernel[...] = 2 * kernel[...]

    path = rewrite_archive(
        FIXTURES / "functional.keras", tmp_path / "twins.keras", add_copy, copy_weights
    )
    names = ["up_dil", "up_cf", "decoder/inner_up", "decoder2/inner_up"]
    assert list_conv3d_transpose_layers(path) == names
    with pytest.raises(KerasFileError, match=r"'decoder/inner_up', 'decoder2/inner_up'"):
        load_keras_layer(path, "inner_up")
    kernel, bias = reference_weights("inner_up")
    assert_same_weights(load_keras_layer(path, "decoder/inner_up")[1], [kernel, bias])
    assert_same_weights(load_keras_layer(path, "decoder2/inner_up")[1], [2 * kernel, bias])


# ------------------------------------------------------------ other layouts
def test_convolution3dtranspose_alias_is_accepted(tmp_path: pathlib.Path) -> None:
    def alias(config: dict[str, Any]) -> None:
        for layer in layer_configs(config):
            if layer["class_name"] == "Conv3DTranspose":
                layer["class_name"] = "Convolution3DTranspose"

    path = rewrite_archive(FIXTURES / "functional.keras", tmp_path / "alias.keras", alias)
    assert (
        list_conv3d_transpose_layers(path) == FILES["functional.keras"]["conv3d_transpose_layers"]
    )
    assert_same_weights(load_keras_layer(path, "up_cf")[1], reference_weights("up_cf"))


def test_user_class_with_keras_name_is_not_taken(tmp_path: pathlib.Path) -> None:
    def custom(config: dict[str, Any]) -> None:
        for layer in layer_configs(config):
            if layer["config"].get("name") == "up_cf":
                layer["module"] = "mypackage.layers"

    path = rewrite_archive(FIXTURES / "functional.keras", tmp_path / "custom.keras", custom)
    assert list_conv3d_transpose_layers(path) == ["up_dil", "inner_up"]
    with pytest.raises(KerasFileError, match="not a Conv3DTranspose"):
        load_keras_layer(path, "up_cf")


def test_compressed_archive(tmp_path: pathlib.Path) -> None:
    path = rewrite_archive(
        FIXTURES / "functional.keras", tmp_path / "deflated.keras", compression=zipfile.ZIP_DEFLATED
    )
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("model.weights.h5").compress_type == zipfile.ZIP_DEFLATED
    for layer in FILES["functional.keras"]["configs"]:
        assert_same_weights(load_keras_layer(path, layer)[1], reference_weights(layer))


def test_weights_found_by_path_without_name_attributes(tmp_path: pathlib.Path) -> None:
    # Keras 3 releases before layer names were recorded beside the variables:
    # the layer's group must follow from the config alone.
    path = rewrite_archive(
        FIXTURES / "functional.keras", tmp_path / "old.keras", None, strip_layer_names
    )
    with zipfile.ZipFile(path) as archive:
        weights = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(weights) as file:
        assert not any("name" in file[f"layers/{group}/vars"].attrs for group in file["layers"])
    for layer in FILES["functional.keras"]["configs"]:
        assert_same_weights(load_keras_layer(path, layer)[1], reference_weights(layer))


def test_recorded_layer_names_win_over_a_differing_layout(tmp_path: pathlib.Path) -> None:
    # Groups in another order than the config's: the names Keras records
    # beside each layer's variables say which group is which.
    def swap(file: h5py.File) -> None:
        file.move("layers/conv3d_transpose", "layers/swap")
        file.move("layers/conv3d_transpose_1", "layers/conv3d_transpose")
        file.move("layers/swap", "layers/conv3d_transpose_1")

    path = rewrite_archive(FIXTURES / "functional.keras", tmp_path / "swap.keras", None, swap)
    for layer in ("up_cf", "up_dil"):
        assert_same_weights(load_keras_layer(path, layer)[1], reference_weights(layer))


def test_keras_2_13_archive_layout(tmp_path: pathlib.Path) -> None:
    def rename(file: h5py.File) -> None:
        file.move("layers/sequential/layers", "layers/sequential/_layer_checkpoint_dependencies")
        file.move("layers", "_layer_checkpoint_dependencies")
        strip_layer_names(file)

    path = rewrite_archive(FIXTURES / "functional.keras", tmp_path / "k213.keras", None, rename)
    for layer in FILES["functional.keras"]["configs"]:
        assert_same_weights(load_keras_layer(path, layer)[1], reference_weights(layer))


def keras2_sequential_h5(path: pathlib.Path) -> pathlib.Path:
    """A legacy HDF5 file laid out as Keras 2 (tf.keras 2.x) writes one."""
    up = FILES["sequential.keras"]["configs"]["up"]
    layer_config = {
        "name": "up",
        "trainable": True,
        "batch_input_shape": [None, 4, 5, 6, 3],
        "dtype": "float32",
        "filters": up["filters"],
        "kernel_size": up["kernel_size"],
        "strides": up["strides"],
        "padding": up["padding"],
        "data_format": "channels_last",
        "dilation_rate": [1, 1, 1],
        "groups": 1,
        "activation": up["activation"],
        "use_bias": True,
        "kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": None}},
        "bias_initializer": {"class_name": "Zeros", "config": {}},
        "kernel_regularizer": None,
        "bias_regularizer": None,
        "activity_regularizer": None,
        "kernel_constraint": None,
        "bias_constraint": None,
        "output_padding": None,
    }
    model_config = {
        "class_name": "Sequential",
        "config": {
            "name": "sequential",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "config": {"batch_input_shape": [None, 4, 5, 6, 3], "name": "input_1"},
                },
                {"class_name": "Conv3DTranspose", "config": layer_config},
            ],
        },
    }
    kernel, bias = reference_weights("up")
    with h5py.File(path, "w") as file:
        file.attrs["keras_version"] = b"2.15.0"
        file.attrs["backend"] = b"tensorflow"
        file.attrs["model_config"] = json.dumps(model_config).encode()
        weights = file.create_group("model_weights")
        weights.attrs["layer_names"] = [b"up"]
        group = weights.create_group("up")
        group.attrs["weight_names"] = [b"up/kernel:0", b"up/bias:0"]
        group["up/kernel:0"] = kernel
        group["up/bias:0"] = bias
    return path


def test_keras_2_legacy_h5(tmp_path: pathlib.Path) -> None:
    path = keras2_sequential_h5(tmp_path / "keras2.h5")
    config, weights = load_keras_layer(path)
    assert config is not None and config["groups"] == 1 and config["dtype"] == "float32"
    assert_same_weights(weights, reference_weights("up"))
    arrays = reference("up")
    output = load_layer(path)(arrays["input"])
    np.testing.assert_allclose(output, arrays["output"], rtol=0, atol=1e-5)


def test_bfloat16_weights_are_widened_exactly(tmp_path: pathlib.Path) -> None:
    kernel, bias = reference_weights("up")
    # Values that bfloat16 holds exactly, stored as Keras stores bfloat16.
    kernel = (kernel.view(np.uint32) & 0xFFFF0000).view(np.float32)
    path = tmp_path / "bf16.weights.h5"
    shutil.copy(FIXTURES / "sequential.weights.h5", path)
    with h5py.File(path, "r+") as file:
        group = file["layers/conv3d_transpose/vars"]
        del group["0"]
        dataset = group.create_dataset(
            "0", data=(kernel.view(np.uint32) >> 16).astype("<u2").view("V2")
        )
        dataset.attrs["dtype"] = "bfloat16"
    _, weights = load_keras_layer(path, "up")
    assert_same_weights(weights, [kernel, bias])


# ----------------------------------------------------------------- bad files
def test_truncated_keras_file(tmp_path: pathlib.Path) -> None:
    data = (FIXTURES / "sequential.keras").read_bytes()
    path = tmp_path / "truncated.keras"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KerasFileError, match=r"truncated\.keras.*not a readable zip archive"):
        load_keras_layer(path, "up")


def test_truncated_h5_file(tmp_path: pathlib.Path) -> None:
    data = (FIXTURES / "functional.h5").read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KerasFileError, match=r"truncated\.h5"):
        load_keras_layer(path, "up_cf")


def test_zip_without_config(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "noconfig.keras"
    with (
        zipfile.ZipFile(FIXTURES / "sequential.keras") as source,
        zipfile.ZipFile(path, "w") as target,
    ):
        target.writestr("model.weights.h5", source.read("model.weights.h5"))
    with pytest.raises(KerasFileError, match=r"noconfig\.keras.*without config\.json"):
        load_keras_layer(path, "up")


def test_zip_without_weights(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "noweights.keras"
    with (
        zipfile.ZipFile(FIXTURES / "sequential.keras") as source,
        zipfile.ZipFile(path, "w") as target,
    ):
        target.writestr("config.json", source.read("config.json"))
    with pytest.raises(KerasFileError, match=r"noweights\.keras.*no model\.weights\.h5"):
        load_keras_layer(path, "up")


def test_npz_weights_are_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "npz.keras"
    with (
        zipfile.ZipFile(FIXTURES / "sequential.keras") as source,
        zipfile.ZipFile(path, "w") as target,
    ):
        target.writestr("config.json", source.read("config.json"))
        target.writestr("model.weights.npz", b"")
    with pytest.raises(KerasFileError, match=r"model\.weights\.npz.*not supported"):
        load_keras_layer(path, "up")


def test_missing_weights_entry(tmp_path: pathlib.Path) -> None:
    path = rewrite_archive(
        FIXTURES / "functional.keras",
        tmp_path / "missing.keras",
        None,
        lambda file: file.__delitem__("layers/conv3d_transpose_1"),
    )
    with pytest.raises(KerasFileError, match=r"missing\.keras.*no weights for layer 'up_cf'"):
        load_keras_layer(path, "up_cf")
    # The other layers are still readable.
    assert_same_weights(load_keras_layer(path, "up_dil")[1], reference_weights("up_dil"))


def test_missing_bias_is_reported(tmp_path: pathlib.Path) -> None:
    path = rewrite_archive(
        FIXTURES / "sequential.keras",
        tmp_path / "nobias.keras",
        None,
        lambda file: file.__delitem__("layers/conv3d_transpose/vars/1"),
    )
    with pytest.raises(KerasFileError, match=r"use_bias=True but the file holds 1 weight"):
        load_keras_layer(path, "up")


def test_links_are_refused(tmp_path: pathlib.Path) -> None:
    def link(file: h5py.File) -> None:
        file.move("layers/conv3d_transpose/vars", "elsewhere")
        file["layers/conv3d_transpose/vars"] = h5py.SoftLink("/elsewhere")

    path = rewrite_archive(FIXTURES / "sequential.keras", tmp_path / "link.keras", None, link)
    with pytest.raises(KerasFileError, match="links are refused"):
        load_keras_layer(path, "up")


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"PK\x03\x04broken"])
def test_unreadable_files(tmp_path: pathlib.Path, content: bytes) -> None:
    path = tmp_path / "model.keras"
    path.write_bytes(content)
    with pytest.raises(KerasFileError, match=r"model\.keras"):
        load_keras_layer(path, "up")


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="layer_name"):
        load_keras_layer(FIXTURES / "sequential.keras", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_config"):
        load_keras_layer(FIXTURES / "sequential.weights.h5", model_config=["up"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_config"):
        load_keras_layer(FIXTURES / "sequential.weights.h5", model_config={"name": "seq"})


def test_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(KerasFileError, match=r"absent\.keras"):
        list_conv3d_transpose_layers(tmp_path / "absent.keras")


def test_legacy_weights_only_file_needs_model_config(tmp_path: pathlib.Path) -> None:
    full = keras2_sequential_h5(tmp_path / "full.h5")
    path = tmp_path / "weights.h5"
    with h5py.File(full) as source, h5py.File(path, "w") as target:
        for key, value in source["model_weights"].attrs.items():
            target.attrs[key] = value
        source.copy(source["model_weights/up"], target, "up")
        model_config = json.loads(source.attrs["model_config"])
    with pytest.raises(KerasFileError, match="model_config"):
        load_keras_layer(path, "up")
    assert is_legacy_weights_only(path)
    assert not is_legacy_weights_only(full)
    config, weights = load_keras_layer(path, "up", model_config=model_config)
    assert config == model_config["config"]["layers"][1]["config"]
    assert_same_weights(weights, reference_weights("up"))


def test_only_keras_2_weights_files_are_legacy_weights_only(tmp_path: pathlib.Path) -> None:
    (tmp_path / "text.h5").write_text("not HDF5")
    for path in [
        FIXTURES / "sequential.keras",
        FIXTURES / "sequential.weights.h5",
        FIXTURES / "functional.h5",
        tmp_path / "text.h5",
        tmp_path / "absent.h5",
    ]:
        assert not is_legacy_weights_only(path), path
