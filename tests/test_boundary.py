"""Boundary modes and interpolation presets.

A boundary mode's meaning, tested as defined: padding the input with
``numpy.pad``, applying the layer and cropping back to the same grid. Presets
equal PyTorch's and SciPy's interpolation with the edges replicated.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conv3dt_cli.main import main

import conv3dt
from conv3dt.boundary import BOUNDARIES, axis_pads
from conv3dt.ops import layer_geometry
from conv3dt.presets import preset_kernel, preset_layer
from conv3dt.run import upsample_file
from conv3dt.spec import LayerSpec, load_spec

_NUMPY_MODES = {"replicate": "edge", "reflect": "reflect", "symmetric": "symmetric"}
# More padding than any of the layers below can reach with.
_PAD = 9


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _by_definition(x, kernel, mode, strides, padding, output_padding, dilation, data_format):
    """Pad with numpy.pad, apply the layer with Keras's zeros, crop back to the same grid."""
    spatial = (1, 2, 3) if data_format == "channels_last" else (2, 3, 4)
    width = [(_PAD, _PAD) if a in spatial else (0, 0) for a in range(5)]
    padded = np.pad(x, width, mode=_NUMPY_MODES[mode])
    out = conv3dt.conv3d_transpose(
        padded, kernel, None, strides, padding, output_padding, data_format, dilation
    )
    plain = conv3dt.conv3d_transpose(
        x, kernel, None, strides, padding, output_padding, data_format, dilation
    )
    crop = []
    for a in range(5):
        if a in spatial:
            s = strides[spatial.index(a)]
            crop.append(slice(_PAD * s, _PAD * s + plain.shape[a]))
        else:
            crop.append(slice(None))
    return out[tuple(crop)]


def _random_layer(rng: np.random.Generator):
    strides = tuple(int(v) for v in rng.integers(1, 4, 3))
    dilation = (1, 1, 1) if rng.random() < 0.5 else tuple(int(v) for v in rng.integers(1, 3, 3))
    if max(dilation) > 1:
        strides = (1, 1, 1)
    ksize = tuple(int(v) for v in rng.integers(1, 5, 3))
    padding = str(rng.choice(["valid", "same"]))
    output_padding = None
    if padding == "valid" and max(dilation) == 1 and rng.random() < 0.3:
        output_padding = tuple(int(rng.integers(0, s)) for s in strides)
    channels, filters = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    kernel = rng.standard_normal((*ksize, filters, channels)).astype(np.float32)
    return kernel, strides, padding, output_padding, dilation


@pytest.mark.parametrize("mode", ["replicate", "reflect", "symmetric"])
@pytest.mark.parametrize("seed", range(12))
def test_a_mode_equals_padding_applying_and_cropping(mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    kernel, strides, padding, output_padding, dilation = _random_layer(rng)
    data_format = "channels_last" if seed % 2 else "channels_first"
    spatial = tuple(int(v) for v in rng.integers(2, 7, 3))
    channels = kernel.shape[-1]
    shape = (2, *spatial, channels) if data_format == "channels_last" else (2, channels, *spatial)
    x = rng.standard_normal(shape).astype(np.float32)
    got = conv3dt.conv3d_transpose(
        x, kernel, None, strides, padding, output_padding, data_format, dilation, boundary=mode
    )
    expected = _by_definition(
        x, kernel, mode, strides, padding, output_padding, dilation, data_format
    )
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_zeros_is_kerass_result_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 5, 6, 4, 2)).astype(np.float32)
    layer = conv3dt.Conv3DTranspose(3, 3, strides=2, padding="same")
    default = layer(x)
    np.testing.assert_array_equal(layer(x, boundary="zeros"), default)
    assert "boundary" not in layer.get_config()


def test_a_valid_layer_whose_footprints_stay_inside_pads_nothing() -> None:
    axes = layer_geometry((5, 5, 5), (2, 2, 2), (2, 2, 2), "valid", None, (1, 1, 1))
    assert axis_pads(axes, "replicate") is None
    axes = layer_geometry((5, 5, 5), (3, 3, 3), (2, 2, 2), "valid", None, (1, 1, 1))
    pads = axis_pads(axes, "replicate")
    assert pads is not None and pads[0].left == 1 and pads[0].right == 1


def test_unknown_modes_are_refused_naming_the_argument() -> None:
    x = np.ones((1, 2, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match=r"`boundary`.*'wrap'"):
        conv3dt.conv3d_transpose(x, np.ones((2, 2, 2, 1, 1), np.float32), boundary="wrap")


@pytest.mark.parametrize("mode", BOUNDARIES)
@pytest.mark.parametrize("suffix", [".npy", ".nii"])
def test_tiles_equal_the_untiled_result_in_every_mode(
    tmp_path: Path, mode: str, suffix: str
) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 11, 7)).astype(np.float32)
    source = tmp_path / f"in{suffix}"
    if suffix == ".npy":
        np.save(source, x)
    else:
        nib.save(nib.Nifti1Image(x, np.eye(4)), source)
    layer = conv3dt.Conv3DTranspose(2, (4, 3, 3), strides=(2, 3, 1), padding="same")
    layer.build((1, 9, 11, 7, 1), seed=2)
    spec = LayerSpec(layer=layer, source="test", boundary=mode)
    whole = layer(x[None, ..., None], boundary=mode)[0]
    for name, tiles in [("untiled", None), ("tiled", (3, 5, 2))]:
        target = tmp_path / f"{name}{suffix}"
        upsample_file(spec, str(source), str(target), tile_shape=tiles)
        if suffix == ".npy":
            got = np.load(target)
        else:
            # Channels last in both NIfTI forms (4D volumes, 5D vectors).
            got = np.asarray(nib.load(target).dataobj).reshape(whole.shape)
        np.testing.assert_array_equal(got, whole, err_msg=name)


@pytest.mark.parametrize("factor", [2, 3, 4, (2, 3, 1)])
@pytest.mark.parametrize("name, mode", [("linear", "trilinear"), ("nearest", "nearest")])
def test_presets_equal_pytorchs_interpolate(factor, name: str, mode: str) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.random((2, 7, 9, 6, 3), dtype=np.float32)
    got = preset_layer(name, factor, channels=3)(x, boundary="replicate")
    factors = factor if isinstance(factor, tuple) else (factor,) * 3
    extra = {"align_corners": False} if mode == "trilinear" else {}
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(np.moveaxis(x, -1, 1).copy()), scale_factor=factors, mode=mode, **extra
    ).numpy()
    np.testing.assert_allclose(got, np.moveaxis(expected, 1, -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 3, 4, (2, 3, 1)])
def test_presets_equal_scipys_zoom(factor) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(2)
    x = rng.random((7, 9, 6), dtype=np.float32)
    for name, order in [("linear", 1), ("nearest", 0)]:
        got = preset_layer(name, factor)(x[None, ..., None], boundary="replicate")[0, ..., 0]
        expected = ndimage.zoom(x, factor, order=order, grid_mode=True, mode="nearest")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)


def test_a_constant_volume_stays_constant_with_replicated_edges() -> None:
    x = np.full((1, 5, 6, 7, 1), 255.0, np.float32)
    layer = preset_layer("linear", 2)
    np.testing.assert_array_equal(layer(x, boundary="replicate"), 255.0)
    assert layer(x).min() < 255.0  # Keras's zero padding darkens the edges


def test_preset_kernels_are_diagonal_in_channels_and_factor_one_leaves_an_axis() -> None:
    kernel = preset_kernel("linear", (2, 3, 1), channels=2)
    assert kernel.shape == (4, 5, 1, 2, 2)
    assert np.all(kernel[..., 0, 1] == 0) and np.all(kernel[..., 1, 0] == 0)
    np.testing.assert_allclose(kernel[:, 2, 0, 0, 0], [0.25, 0.75, 0.75, 0.25])
    with pytest.raises(ValueError, match="`factor`"):
        preset_kernel("linear", 0)
    with pytest.raises(ValueError, match="`name`"):
        preset_kernel("cubic", 2)


def test_init_preset_writes_a_readable_spec_that_loads_the_exact_kernel(tmp_path: Path) -> None:
    target = tmp_path / "lin.yaml"
    result = _cli(
        "init", "--preset", "linear", "--factor", "2,3,1", "--in-channels", "2", "-o", str(target)
    )
    assert result.exit_code == 0, result.output
    document = yaml.safe_load(target.read_text())
    assert document == {
        "preset": {"name": "linear", "factor": [2, 3, 1], "channels": 2},
        "boundary": "replicate",
    }
    spec = load_spec(target)
    assert spec.boundary == "replicate"
    np.testing.assert_array_equal(spec.layer.kernel, preset_kernel("linear", (2, 3, 1), 2))
    assert list(tmp_path.iterdir()) == [target]


def test_a_preset_spec_defaults_to_replicate_and_the_command_line_overrides(
    tmp_path: Path,
) -> None:
    (tmp_path / "near.yaml").write_text("preset: {name: nearest, factor: 2}\n")
    assert load_spec(tmp_path / "near.yaml").boundary == "replicate"
    (tmp_path / "edge.yaml").write_text("preset: {name: nearest, factor: 2}\nboundary: zeros\n")
    assert load_spec(tmp_path / "edge.yaml").boundary == "zeros"
    x = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    spec = str(tmp_path / "near.yaml")
    result = _cli("upsample", str(tmp_path / "x.npy"), "--spec", spec, "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(out), x.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    result = _cli("inspect", "--spec", spec, "--boundary", "reflect", "--json")
    assert result.exit_code == 0, result.output
    assert '"boundary": "reflect"' in result.output


@pytest.mark.parametrize(
    "text, field",
    [
        ("preset: {name: cubic, factor: 2}\n", "name"),
        ("preset: {name: linear, factor: 0}\n", "factor"),
        ("preset: {name: linear, factr: 2}\n", "factr"),
        ("preset: {name: linear}\nlayer: {filters: 1, kernel_size: 2}\n", "layer"),
        ("layer: {filters: 1, kernel_size: 2}\nboundary: wrap\n", "boundary"),
    ],
)
def test_bad_preset_and_boundary_fields_exit_2_naming_the_file_and_field(
    tmp_path: Path, text: str, field: str
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    np.save(tmp_path / "x.npy", np.ones((3, 3, 3), np.float32))
    result = _cli(
        "upsample", str(tmp_path / "x.npy"), "--spec", str(spec), "-o", str(tmp_path / "y.npy")
    )
    assert result.exit_code == 2
    assert str(spec) in result.output and field in result.output
    assert not (tmp_path / "y.npy").exists()


def test_init_refuses_layer_options_beside_a_preset(tmp_path: Path) -> None:
    result = _cli("init", "--preset", "linear", "--strides", "2", "-o", str(tmp_path / "s.yaml"))
    assert result.exit_code == 2 and "--strides" in result.output
    result = _cli(
        "init",
        "--factor",
        "2",
        "--filters",
        "1",
        "--kernel-size",
        "2",
        "-o",
        str(tmp_path / "s.yaml"),
    )
    assert result.exit_code == 2 and "--factor goes with --preset" in result.output
    assert not (tmp_path / "s.yaml").exists()


@pytest.mark.parametrize("mode", ["edge", "reflect", "symmetric"])
def test_pad_volume_equals_numpy_pad_for_narrow_and_wide_margins(mode: str) -> None:
    from conv3dt.boundary import AxisPad, pad_volume

    rng = np.random.default_rng(8)
    for _ in range(40):
        shape = (2, *(int(n) for n in rng.integers(1, 7, 3)), 2)
        pads, widths = [], []
        for n in shape[1:4]:
            # Margins up to 8 voxels: wider than the axis in many draws.
            left, right = (int(v) for v in rng.integers(0, 9, 2))
            if mode == "reflect" and n < 2:
                left = right = 0
            pads.append(AxisPad(left, right, np.pad(np.arange(n), (left, right), mode)))
            widths.append((left, right))
        x = rng.standard_normal(shape)
        expected = np.pad(x, [(0, 0), *widths, (0, 0)], mode)
        np.testing.assert_array_equal(pad_volume(x, pads), expected)
