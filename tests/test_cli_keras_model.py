"""``--keras-model`` in the CLI: model files, and weights-only files with ``--spec``.

The fixtures in tests/fixtures/keras were saved by Keras (tests/make_keras_fixtures.py);
one test saves a fresh ``.weights.h5`` with live Keras.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conv3dt_cli.main import main

from conv3dt.keras_file import load_layer

FIXTURES = Path(__file__).parent / "fixtures" / "keras"
WEIGHTS_ONLY = FIXTURES / "sequential.weights.h5"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
UP_CONFIG = EXPECTED["files"]["sequential.weights.h5"]["configs"]["up"]


def _run(*args: str) -> Any:
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def _reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "up.npz", allow_pickle=False) as arrays:
        return dict(arrays)


def _write_spec(path: Path, config: dict[str, Any], **extra: Any) -> Path:
    document = {"layer": config, **extra}
    dump = json.dumps if path.suffix == ".json" else yaml.safe_dump
    path.write_text(dump(document))
    return path


def _assert_refused(result: Any, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 2, result.output
    assert lines[0].startswith("conv3dt: error: ")
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_weights_only_file_with_spec_equals_the_library_and_keras(tmp_path: Path) -> None:
    spec = _write_spec(tmp_path / "up.yaml", UP_CONFIG)
    arrays = _reference()
    volume = arrays["input"][0]
    np.save(tmp_path / "in.npy", volume)
    out = tmp_path / "out.npy"
    result = _run(
        "upsample", tmp_path / "in.npy", "--spec", spec, "--keras-model", WEIGHTS_ONLY, "-o", out
    )
    assert result.exit_code == 0, result.output
    library = load_layer(WEIGHTS_ONLY, layer_config=UP_CONFIG)
    got = np.load(out)
    np.testing.assert_array_equal(got, library(volume[None])[0])
    np.testing.assert_allclose(got, arrays["output"][0], rtol=0, atol=1e-5)


def test_inspect_takes_the_config_from_the_spec_and_the_weights_from_the_file(
    tmp_path: Path,
) -> None:
    spec = _write_spec(tmp_path / "up.json", UP_CONFIG)
    result = _run(
        "inspect", "--spec", spec, "--keras-model", WEIGHTS_ONLY, "--layer", "up", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert str(WEIGHTS_ONLY) in report["source"] and str(spec) in report["source"]
    assert report["layer"]["filters"] == UP_CONFIG["filters"]
    assert report["layer"]["activation"] == UP_CONFIG["activation"]
    kernel = _reference()["kernel"]
    assert report["weights"]["kernel"]["shape"] == list(kernel.shape)
    assert report["weights"]["kernel"]["max"] == pytest.approx(float(kernel.max()))


def test_full_model_file_alone_still_works(tmp_path: Path) -> None:
    arrays = _reference()
    np.save(tmp_path / "in.npy", arrays["input"][0])
    out = tmp_path / "out.npy"
    result = _run(
        "upsample", tmp_path / "in.npy", "--keras-model", FIXTURES / "sequential.keras", "-o", out
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(out), arrays["output"][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("command", ["upsample", "inspect"])
def test_weights_only_file_without_spec_asks_for_one(tmp_path: Path, command: str) -> None:
    np.save(tmp_path / "in.npy", _reference()["input"][0])
    args = ["--keras-model", WEIGHTS_ONLY]
    if command == "upsample":
        args = [tmp_path / "in.npy", *args, "-o", tmp_path / "out.npy"]
    _assert_refused(_run(command, *args), "holds weights only", "--spec SPEC")
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("command", ["upsample", "inspect"])
def test_spec_with_weights_and_weights_only_file_is_refused(tmp_path: Path, command: str) -> None:
    np.save(tmp_path / "kernel.npy", _reference()["kernel"])
    spec = _write_spec(tmp_path / "up.yaml", UP_CONFIG, weights={"kernel": "kernel.npy"})
    np.save(tmp_path / "in.npy", _reference()["input"][0])
    args = ["--spec", spec, "--keras-model", WEIGHTS_ONLY]
    if command == "upsample":
        args = [tmp_path / "in.npy", *args, "-o", tmp_path / "out.npy"]
    _assert_refused(_run(command, *args), "gives weights", "remove the spec's 'weights'")
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize(
    ("model", "layer"), [("sequential.keras", None), ("functional.h5", "up_cf")]
)
def test_spec_with_a_full_model_file_is_refused(
    tmp_path: Path, model: str, layer: str | None
) -> None:
    spec = _write_spec(tmp_path / "up.yaml", UP_CONFIG)
    np.save(tmp_path / "in.npy", _reference()["input"][0])
    args = ["--spec", spec, "--keras-model", FIXTURES / model]
    if layer is not None:
        args += ["--layer", layer]
    result = _run("upsample", tmp_path / "in.npy", *args, "-o", tmp_path / "out.npy")
    _assert_refused(result, "layer's own config", "weights-only file")
    assert not (tmp_path / "out.npy").exists()


def test_spec_that_does_not_fit_the_files_weights_is_refused(tmp_path: Path) -> None:
    spec = _write_spec(tmp_path / "up.yaml", {**UP_CONFIG, "filters": 5})
    result = _run("inspect", "--spec", spec, "--keras-model", WEIGHTS_ONLY)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and str(WEIGHTS_ONLY) in result.output


def test_neither_spec_nor_model_is_a_usage_error() -> None:
    result = _run("inspect")
    assert result.exit_code == 2
    assert "give --spec, --keras-model, or both" in result.output


def test_weights_saved_by_keras_with_a_spec_match_keras(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(11)
    volume = rng.uniform(-1, 1, (2, 5, 4, 6)).astype(np.float32)
    conv = keras.layers.Conv3DTranspose(
        3,
        (2, 3, 2),
        strides=(1, 2, 2),
        padding="same",
        data_format="channels_first",
        activation="tanh",
        use_bias=False,
    )
    model = keras.Sequential([keras.Input(volume.shape), conv])
    kernel = rng.uniform(-0.5, 0.5, conv.kernel.shape).astype(np.float32)
    conv.set_weights([kernel])
    weights = tmp_path / "model.weights.h5"
    with warnings.catch_warnings():
        # Keras's torch backend converts tensors with np.array(tensor), which NumPy 2
        # flags for torch's __array__ signature; the values are unaffected.
        warnings.simplefilter("ignore", DeprecationWarning)
        model.save_weights(weights)
        expected = keras.ops.convert_to_numpy(model(volume[None]))[0]
    spec = _write_spec(tmp_path / "layer.yaml", json.loads(json.dumps(conv.get_config())))
    np.save(tmp_path / "in.npy", volume)
    out = tmp_path / "out.npy"
    result = _run(
        "upsample", tmp_path / "in.npy", "--spec", spec, "--keras-model", weights, "-o", out
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-5)


def _keras2_weights_only(tmp_path: Path) -> tuple[Path, Path]:
    """A Keras 2 ``model.save_weights("w.h5")`` file and ``model.to_json()`` beside it."""
    import h5py

    up = EXPECTED["files"]["sequential.keras"]["configs"]["up"]
    layer_config = {
        key: up[key] for key in ("filters", "kernel_size", "strides", "padding", "activation")
    }
    layer_config.update(name="up", dtype="float32", use_bias=True, groups=1)
    model_config = {
        "class_name": "Sequential",
        "config": {
            "name": "sequential",
            "layers": [
                {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 4, 5, 6, 3]}},
                {"class_name": "Conv3DTranspose", "config": layer_config},
            ],
        },
    }
    arrays = _reference()
    weights = tmp_path / "weights.h5"
    with h5py.File(weights, "w") as file:
        file.attrs["keras_version"] = b"2.15.0"
        file.attrs["layer_names"] = [b"input_1", b"up"]
        file.create_group("input_1").attrs["weight_names"] = []
        group = file.create_group("up")
        group.attrs["weight_names"] = [b"up/kernel:0", b"up/bias:0"]
        group["up/kernel:0"] = arrays["kernel"]
        group["up/bias:0"] = arrays["bias"]
    config_path = tmp_path / "model.json"
    config_path.write_text(json.dumps(model_config))
    return weights, config_path


def test_keras_2_weights_with_model_config_equals_keras(tmp_path: Path) -> None:
    weights, model_json = _keras2_weights_only(tmp_path)
    arrays = _reference()
    np.save(tmp_path / "in.npy", arrays["input"][0])
    out = tmp_path / "out.npy"
    result = _run(
        "upsample", tmp_path / "in.npy", "--keras-model", weights, "--model-config", model_json,
        "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(out), arrays["output"][0], rtol=0, atol=1e-5)
    report = _run("inspect", "--keras-model", weights, "--model-config", model_json, "--json")
    assert report.exit_code == 0, report.output
    assert str(model_json) in json.loads(report.output)["source"]


@pytest.mark.parametrize("with_spec", [False, True])
def test_keras_2_weights_without_model_config_are_refused(tmp_path: Path, with_spec: bool) -> None:
    weights, _ = _keras2_weights_only(tmp_path)
    spec = ("--spec", _write_spec(tmp_path / "up.yaml", UP_CONFIG)) if with_spec else ()
    result = _run("inspect", "--keras-model", weights, *spec)
    _assert_refused(result, str(weights), "Keras 2 weights-only", "--model-config MODEL.json")


@pytest.mark.parametrize(
    "extra",
    [
        ("--spec", "SPEC", "--keras-model", "WEIGHTS"),
        (),
    ],
)
def test_model_config_needs_a_weights_file_and_no_spec(tmp_path: Path, extra: tuple) -> None:
    weights, model_json = _keras2_weights_only(tmp_path)
    spec = _write_spec(tmp_path / "up.yaml", UP_CONFIG)
    names = {"SPEC": str(spec), "WEIGHTS": str(weights)}
    result = _run("inspect", "--model-config", model_json, *(names.get(a, a) for a in extra))
    assert result.exit_code == 2, result.output
    assert "--model-config goes with --keras-model" in result.output


def test_model_config_beside_a_full_model_is_refused(tmp_path: Path) -> None:
    _, model_json = _keras2_weights_only(tmp_path)
    result = _run(
        "inspect", "--keras-model", FIXTURES / "sequential.keras", "--model-config", model_json
    )
    assert result.exit_code == 2, result.output
    assert "only for weights-only files" in result.output
    assert "Traceback" not in result.output
