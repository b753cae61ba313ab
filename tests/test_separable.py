"""The separable engine: exact detection of separable kernels, and three 1D passes.

Its values against the reference and its tiles against its untiled result are
checked with every other engine in ``test_engine.py`` and
``test_properties.py`` (a third of their kernels are separable); here are
detection, the presets against PyTorch and SciPy through this engine, the
choice ``auto`` makes, and the refusals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _kernels import separable_kernel

import conv3dt
from conv3dt.engine import conv_transpose_region, engine_for_volume, resolve_engine
from conv3dt.engine.epilogue import Epilogue
from conv3dt.engine.reference import reference_conv_transpose
from conv3dt.engine.separable import separable_factors
from conv3dt.geometry import AxisGeometry
from conv3dt.presets import preset_kernel
from conv3dt.run import upsample_file
from conv3dt.spec import LayerSpec

FACTORS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, (2, 3, 1), (4, 1, 3)]


def _triple(factor):
    return factor if isinstance(factor, tuple) else (factor,) * 3


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("name", ["linear", "nearest"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_preset_is_found_separable_with_channels_on_their_own(
    name: str, factor, channels: int
) -> None:
    kernel = preset_kernel(name, factor, channels)
    factors = separable_factors(kernel, _triple(factor))
    assert factors is not None
    assert factors.is_identity
    product = np.einsum("i,j,k,fc->ijkfc", *factors.axes, factors.channels)
    np.testing.assert_array_equal(product.astype(np.float32), kernel)


def test_kernels_that_are_not_exactly_separable_are_refused() -> None:
    rng = np.random.default_rng(0)
    preset = preset_kernel("linear", 2)
    one_ulp = preset.copy()
    one_ulp[1, 2, 0, 0, 0] = np.nextafter(one_ulp[1, 2, 0, 0, 0], np.float32(1))
    rank_two = preset + preset_kernel("nearest", 4)[:4, :4, :4] * np.float32(0.5)
    nan = preset.copy()
    nan[0, 0, 0, 0, 0] = np.nan
    inf = preset.copy()
    inf[0, 0, 0, 0, 0] = np.inf
    for kernel in (
        one_ulp,
        rank_two,
        nan,
        inf,
        np.zeros_like(preset),
        rng.standard_normal((3, 3, 3, 1, 1)).astype(np.float32),
    ):
        assert separable_factors(kernel, (2, 2, 2)) is None
    # Separable in space but each channel pair with its own shape: not one outer product.
    mixed = np.concatenate([preset, preset_kernel("nearest", 4)[:4, :4, :4]], axis=4)
    assert separable_factors(mixed, (2, 2, 2)) is None


def test_a_random_exact_outer_product_is_found_with_its_channel_matrix() -> None:
    rng = np.random.default_rng(4)
    kernel = separable_kernel(rng, (3, 4, 2), 2, 3)
    factors = separable_factors(kernel, (2, 2, 2))
    assert factors is not None and not factors.is_identity
    assert factors.channels.shape == (2, 3)


def test_the_separable_engine_refuses_other_kernels_by_name() -> None:
    x = np.ones((1, 3, 3, 3, 1), np.float32)
    kernel = np.random.default_rng(1).standard_normal((3, 3, 3, 1, 1)).astype(np.float32)
    with pytest.raises(ValueError, match="not separable"):
        conv_transpose_region(
            x, kernel, (2,) * 3, (1,) * 3, (0,) * 3, (0,) * 3, (7, 7, 7), engine="separable"
        )
    with pytest.raises(ValueError, match="not separable"):
        resolve_engine("separable", kernel.shape, (2,) * 3, (1,) * 3, 27, kernel=kernel)


@pytest.mark.parametrize("factor", [2, 3, 4, (2, 3, 1)])
@pytest.mark.parametrize("name, mode", [("linear", "trilinear"), ("nearest", "nearest")])
def test_presets_through_the_separable_engine_equal_pytorchs_interpolate(
    factor, name: str, mode: str
) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.random((2, 7, 9, 6, 3), dtype=np.float32)
    kernel = preset_kernel(name, factor, 3)
    got = conv3dt.conv3d_transpose(
        x, kernel, strides=_triple(factor), padding="same", engine="separable", boundary="replicate"
    )
    extra = {"align_corners": False} if mode == "trilinear" else {}
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(np.moveaxis(x, -1, 1).copy()),
        scale_factor=_triple(factor),
        mode=mode,
        **extra,
    ).numpy()
    np.testing.assert_allclose(got, np.moveaxis(expected, 1, -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 3, 4, (2, 3, 1)])
def test_presets_through_the_separable_engine_equal_scipys_zoom(factor) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(2)
    x = rng.random((7, 9, 6), dtype=np.float32)
    for name, order in [("linear", 1), ("nearest", 0)]:
        got = conv3dt.conv3d_transpose(
            x[None, ..., None],
            preset_kernel(name, factor),
            strides=_triple(factor),
            padding="same",
            engine="separable",
            boundary="replicate",
        )[0, ..., 0]
        expected = ndimage.zoom(x, factor, order=order, grid_mode=True, mode="nearest")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("factor", [2, 3, 4, 5])
def test_a_constant_volume_stays_exactly_constant(factor: int) -> None:
    x = np.full((1, 6, 5, 7, 1), 255.0, np.float32)
    got = conv3dt.conv3d_transpose(
        x,
        preset_kernel("linear", factor),
        strides=factor,
        padding="same",
        engine="separable",
        boundary="replicate",
    )
    np.testing.assert_array_equal(got, 255.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mixed_channels_bias_and_activation_match_the_reference(dtype: type) -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 6, 5, 7, 3)).astype(dtype)
    kernel = separable_kernel(rng, (3, 2, 4), 4, 3, dtype)
    bias = np.linspace(-0.5, 0.5, 4).astype(dtype)
    strides, dilation = (2, 3, 1), (1, 1, 2)
    axes = [
        AxisGeometry(n, k, s, d, crop_left=0, output_length=(n - 1) * s + (k - 1) * d + 1)
        for n, k, s, d in zip(x.shape[1:4], kernel.shape[:3], strides, dilation, strict=True)
    ]
    shape = tuple(g.output_length for g in axes)
    want = reference_conv_transpose(x, kernel, axes) + bias
    np.maximum(want, 0, out=want)
    got = conv_transpose_region(
        x, kernel, strides, dilation, (0,) * 3, (0,) * 3, shape, dtype,
        engine="separable", bias=bias, activation="relu",
    )  # fmt: skip
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    plain = conv_transpose_region(
        x, kernel, strides, dilation, (0,) * 3, (0,) * 3, shape, dtype, engine="separable"
    )
    Epilogue(bias, "relu").apply(plain)
    np.testing.assert_array_equal(got, plain)


def test_auto_picks_the_separable_engine_for_separable_kernels_of_large_volumes() -> None:
    preset = preset_kernel("linear", 2, 1)
    big, small = 128**3, 8**3
    assert engine_for_volume(preset.shape, (2,) * 3, (1,) * 3, big, preset) == "separable"
    assert engine_for_volume(preset.shape, (2,) * 3, (1,) * 3, small, preset) == "numpy"
    # Without the weights, or with weights that are not separable: by the layer's shape.
    assert engine_for_volume(preset.shape, (2,) * 3, (1,) * 3, big) == "numba"
    noise = np.random.default_rng(0).standard_normal(preset.shape).astype(np.float32)
    assert engine_for_volume(preset.shape, (2,) * 3, (1,) * 3, big, noise) == "numba"
    # A 1x1x1 kernel or a line of taps: three passes would do no fewer taps.
    for size in [(1, 1, 1), (3, 1, 1), (1, 2, 1)]:
        line = separable_kernel(np.random.default_rng(2), size, 1, 1)
        assert engine_for_volume(line.shape, (3,) * 3, (1,) * 3, 64 * big, line) == "numba"
    # Kernel == stride (nearest): one tap per output voxel, the Numba engine's own pass.
    nearest = preset_kernel("nearest", 2)
    assert engine_for_volume(nearest.shape, (2,) * 3, (1,) * 3, 4 * big, nearest) == "numba"
    # A separable kernel with a full 8 x 8 channel matrix mixes channels best in a GEMM.
    wide = separable_kernel(np.random.default_rng(1), (4, 4, 4), 8, 8)
    assert separable_factors(wide, (2,) * 3) is not None
    assert engine_for_volume(wide.shape, (2,) * 3, (1,) * 3, big, wide) == "gemm"


def test_a_preset_spec_runs_separable_and_tiles_equal_the_whole(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.random((9, 11, 7), dtype=np.float32)
    source = tmp_path / "in.npy"
    np.save(source, x)
    layer = conv3dt.preset_layer("linear", (2, 3, 1))
    spec = LayerSpec(layer=layer, source="test", boundary="replicate")
    whole = layer(x[None, ..., None], boundary="replicate", engine="separable")[0, ..., 0]
    for name, tiles in [("untiled", None), ("tiled", (3, 5, 2))]:
        target = tmp_path / f"{name}.npy"
        upsample_file(spec, str(source), str(target), tile_shape=tiles, engine="separable")
        np.testing.assert_array_equal(np.load(target), whole, err_msg=name)


def test_inspect_reports_a_separable_kernel_and_the_engine_auto_runs(tmp_path: Path) -> None:
    from conv3dt.report import inspect_report

    big = tmp_path / "big.npy"
    np.save(big, np.zeros((160, 160, 160), np.float32))
    preset = LayerSpec(layer=conv3dt.preset_layer("linear", 2), source="test", boundary="replicate")
    report = inspect_report(preset, str(big))
    assert report["weights"]["kernel"]["separable"] is True
    assert report["plan"]["engine"] == "separable"
    layer = conv3dt.Conv3DTranspose(1, 3, strides=2, padding="same")
    layer.build((1, 4, 4, 4, 1), seed=1)
    trained = LayerSpec(layer=layer, source="test")
    report = inspect_report(trained, str(big))
    assert report["weights"]["kernel"]["separable"] is False
    assert report["plan"]["engine"] == "numba"


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_bands_and_runs_of_planes_do_not_change_a_bit(monkeypatch, n_threads: int) -> None:
    """The kernel's split of the work (bands of rows as small as four, runs of planes
    when bands are fewer than threads) leaves every value as the whole computes it."""
    from conv3dt.engine import separable
    from conv3dt.engine.threads import set_threads

    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 9, 21, 8, 2)).astype(np.float32)
    kernel = separable_kernel(rng, (3, 4, 3), 2, 2)
    args = (x, kernel, (2, 2, 3), (1, 1, 1), (0,) * 3, (1, 2, 0), (18, 41, 24))
    with set_threads(1):
        whole = conv_transpose_region(*args, engine="separable")
    monkeypatch.setattr(separable, "_RING_BYTES", 1)
    with set_threads(n_threads):
        banded = conv_transpose_region(*args, engine="separable")
        one_row = conv_transpose_region(
            x[:, :, 5:7], kernel, (2, 2, 3), (1, 1, 1), (0, 5, 0), (1, 12, 0), (18, 1, 24),
            engine="separable",
        )  # fmt: skip
    np.testing.assert_array_equal(banded, whole)
    np.testing.assert_array_equal(one_row, whole[:, :, 10:11])
