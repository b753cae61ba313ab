"""OME-Zarr (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3) as input and output.

Inputs are built here with zarr directly; outputs are read back and their
NGFF metadata validated with ngff-zarr, a reader that shares no code with
conv3dt. Every output is compared with the in-memory layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from conv3dt_cli.main import main

pytest.importorskip("zarr")
pytest.importorskip("ngff_zarr")

import ngff_zarr as nz
import zarr

# The Dask test shares test_distributed's cluster (two single-threaded worker processes).
from test_distributed import client, session  # noqa: F401

from conv3dt import Conv3DTranspose
from conv3dt.run import upsample_file
from conv3dt.spec import LayerSpec, load_spec
from conv3dt.volumes import VolumeError, VolumeMetadata, create_volume, open_volume
from conv3dt.volumes.ome_zarr import OmeZarrReader

UNIT = "micrometer"


def _layer(in_channels: int, filters: int, *, kernel: int = 3, padding: str = "same"):
    layer = Conv3DTranspose(filters, kernel, strides=2, padding=padding, activation="relu")
    rng = np.random.default_rng(7)
    layer.set_weights(
        [
            rng.uniform(-0.5, 0.5, layer.kernel_shape(in_channels)).astype(np.float32),
            rng.uniform(-0.2, 0.2, filters).astype(np.float32),
        ]
    )
    return layer


def _spec(layer: Conv3DTranspose) -> LayerSpec:
    return LayerSpec(layer=layer, source="test")


def _volume(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _axes(names: str) -> list[dict[str, str]]:
    kinds = {"t": "time", "c": "channel"}
    return [
        {"name": n, "type": kinds.get(n, "space"), **({"unit": UNIT} if n in "zyx" else {})}
        for n in names
    ]


def _write_ngff(
    path: Path,
    levels: list[np.ndarray],
    names: str,
    version: str,
    *,
    scale: list[float],
    translation: list[float],
    chunks: tuple[int, ...] | None = None,
    outer: list[dict] | None = None,
) -> None:
    """An OME-Zarr image written with zarr alone; level k's space axes are 2**k coarser."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    extra = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if version == "0.4" else {}
    datasets = []
    for k, data in enumerate(levels):
        array = group.create_array(
            str(k), shape=data.shape, chunks=chunks or data.shape, dtype=data.dtype, **extra
        )
        array[...] = data
        factor = [2.0**k if n in "zyx" else 1.0 for n in names]
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [s * f for s, f in zip(scale, factor, strict=True)]},
                    {"type": "translation", "translation": translation},
                ],
            }
        )
    multiscale: dict = {"name": "cells", "axes": _axes(names), "datasets": datasets}
    if outer:
        multiscale["coordinateTransformations"] = outer
    if version == "0.4":
        group.attrs["multiscales"] = [{"version": "0.4", **multiscale}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}


def _reference(path: Path):
    """The image as ngff-zarr reads it, its NGFF metadata validated against the schema."""
    return nz.from_ngff_zarr(str(path), validate=True)


def _values(image) -> np.ndarray:
    """An ngff-zarr image's voxels, computed here (not on a cluster a test may have open)."""
    return np.asarray(image.data.compute(scheduler="synchronous"))


def _expected(layer: Conv3DTranspose, x_czyx: np.ndarray) -> np.ndarray:
    """The layer on a (c, z, y, x) volume, returned as (filters, z, y, x)."""
    y = np.asarray(layer(np.moveaxis(x_czyx, 0, -1)[None]))[0]
    return np.moveaxis(y, -1, 0)


# The README's world-alignment rule, output index 0 at input index
# (crop_left - (k_eff - 1) / 2) / s: kernel 3, stride 2, "same" crops the
# full output's one extra voxel on the right (crop_left 0), so -0.5.
K3_SAME_OFFSET = -0.5


def _mean2(a: np.ndarray) -> np.ndarray:
    """2x2x2 mean over the last three axes, an odd axis's last voxel paired with itself."""
    pad = [(0, 0)] * (a.ndim - 3) + [(0, n % 2) for n in a.shape[-3:]]
    a = np.pad(a.astype(np.float64), pad, mode="edge")
    lead = a.shape[:-3]
    z, y, x = (n // 2 for n in a.shape[-3:])
    return a.reshape(*lead, z, 2, y, 2, x, 2).mean(axis=(-5, -3, -1))


# -- reading -------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_reads_level_axes_and_world_geometry(tmp_path, version):
    x = _volume((2, 6, 7, 8))
    coarse = _volume((2, 3, 4, 4), seed=2)
    path = tmp_path / "in.ome.zarr"
    _write_ngff(
        path,
        [x, coarse],
        "czyx",
        version,
        scale=[1.0, 2.0, 0.5, 0.25],
        translation=[0.0, 10.0, 20.0, 30.0],
        chunks=(1, 3, 4, 5),
        outer=[{"type": "scale", "scale": [1.0, 2.0, 2.0, 2.0]}],
    )
    with open_volume(str(path)) as reader:
        assert isinstance(reader, OmeZarrReader)
        assert reader.format == "ome-zarr"
        assert reader.shape == x.shape and reader.layout_axes == "czyx"
        assert reader.chunks == (1, 3, 4, 5)
        np.testing.assert_array_equal(reader.read(), x)
        np.testing.assert_array_equal(reader.read((slice(1, 2), slice(2, 5))), x[1:2, 2:5])
        meta = reader.metadata
        assert meta.version == version and meta.levels == 2 and meta.name == "cells"
        assert [a.unit for a in meta.axes] == [None, UNIT, UNIT, UNIT]
        # The multiscale's own scale follows the dataset's transforms.
        np.testing.assert_allclose(np.diag(meta.affine)[:3], [4.0, 1.0, 0.5])
        np.testing.assert_allclose(meta.affine[:3, 3], [20.0, 40.0, 60.0])
    with open_volume(str(path), level=1) as reader:
        np.testing.assert_array_equal(reader.read(), coarse)
        np.testing.assert_allclose(np.diag(reader.metadata.affine)[:3], [8.0, 2.0, 1.0])


def test_info_reports_ngff_axes_and_levels(tmp_path):
    path = tmp_path / "in.ome.zarr"
    levels = [_volume((2, 4, 6, 8)), _volume((2, 2, 3, 4))]
    _write_ngff(path, levels, "czyx", "0.5", scale=[1, 2, 2, 2], translation=[0] * 4)
    result = CliRunner().invoke(main, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "ome-zarr" and info["ngff_version"] == "0.5"
    assert info["axis_labels"] == ["c", "z", "y", "x"] and info["channels"] == 2
    assert info["axes"][1] == {"name": "z", "type": "space", "unit": UNIT}
    assert (info["level"], info["levels"]) == (0, 2)
    assert info["voxel_size"] == [2.0, 2.0, 2.0]


def test_time_and_channel_axes_map_to_batch_and_channels(tmp_path):
    x = _volume((2, 3, 5, 6, 7))
    path = tmp_path / "tc.ome.zarr"
    _write_ngff(path, [x], "tczyx", "0.5", scale=[1.5, 1, 1, 1, 1], translation=[0.0] * 5)
    layer = _layer(3, 2)
    out = tmp_path / "out.ome.zarr"
    upsample_file(_spec(layer), str(path), str(out))
    image = _reference(out).images[0]
    assert image.dims == ("t", "c", "z", "y", "x")
    assert image.scale["t"] == 1.5  # the time step is kept
    result = _values(image)
    for t in range(2):
        np.testing.assert_allclose(result[t], _expected(layer, x[t]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({}, "no 'multiscales'"),
        ({"multiscales": [{"version": "0.3", "axes": [], "datasets": []}]}, "version 0.3"),
        (
            {
                "multiscales": [
                    {"version": "0.4", "axes": _axes("cyx"), "datasets": [{"path": "0"}]}
                ]
            },
            r"expected axes ordered \[time\], \[channel\], then 3 space axes",
        ),
        (
            {
                "multiscales": [
                    {"version": "0.4", "axes": _axes("zyxc"), "datasets": [{"path": "0"}]}
                ]
            },
            "out of order",
        ),
    ],
)
def test_metadata_errors_name_file_and_field(tmp_path, attrs, message):
    path = tmp_path / "bad.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=(2, 3, 4, 5), dtype="float32")
    group.attrs.update(attrs)
    with pytest.raises(VolumeError, match=message) as raised:
        open_volume(str(path))
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("where", ["../outside", "/abs", "", "0/../../x"])
def test_a_level_path_leading_out_of_the_image_is_refused(tmp_path, where):
    outside = zarr.open_array(str(tmp_path / "outside"), mode="w", shape=(4, 4, 4), dtype="f4")
    outside[...] = 1
    path = tmp_path / "in.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [
        {"version": "0.4", "axes": _axes("zyx"), "datasets": [{"path": where}]}
    ]
    with pytest.raises(VolumeError, match="needs a 'path' to an array inside the image"):
        open_volume(str(path))


def test_an_image_opened_as_plain_zarr_points_to_ome_zarr(tmp_path):
    path = tmp_path / "scan.zarr"
    _write_ngff(path, [_volume((4, 4, 4))], "zyx", "0.5", scale=[1] * 3, translation=[0] * 3)
    with pytest.raises(VolumeError, match=r"is an OME-Zarr image.*--input-format ome-zarr"):
        open_volume(str(path))
    with open_volume(str(path), "ome-zarr") as reader:
        assert reader.shape == (4, 4, 4)


def test_level_out_of_range_is_refused(tmp_path):
    path = tmp_path / "in.ome.zarr"
    _write_ngff(path, [_volume((4, 4, 4))], "zyx", "0.4", scale=[1] * 3, translation=[0] * 3)
    with pytest.raises(ValueError, match=r"`level` must be an int from 0 to 0"):
        open_volume(str(path), level=1)
    with pytest.raises(ValueError, match="OME-Zarr images only"):
        open_volume(str(tmp_path / "x.npy"), level=0)


def test_zarr_older_than_3_is_refused_naming_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(zarr, "__version__", "2.18.3")
    with pytest.raises(VolumeError, match=r"need zarr 3 or newer .*pip install 'zarr>=3'"):
        open_volume(str(tmp_path / "in.ome.zarr"))
    with pytest.raises(VolumeError, match="need zarr 3 or newer"):
        create_volume(str(tmp_path / "out.ome.zarr"), (4, 4, 4), np.float32)
    assert os.listdir(tmp_path) == []


# -- writing -------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_output_values_and_transforms_read_back_by_ngff_zarr(tmp_path, version):
    x = _volume((2, 9, 10, 11))
    source = tmp_path / "in.ome.zarr"
    scale, translation = [1.0, 2.0, 0.5, 0.25], [0.0, 10.0, 20.0, 30.0]
    _write_ngff(source, [x], "czyx", version, scale=scale, translation=translation)
    layer = _layer(2, 3)
    out = tmp_path / "out.ome.zarr"
    upsample_file(_spec(layer), str(source), str(out))
    multiscales = _reference(out)
    assert len(multiscales.images) == 1
    image = multiscales.images[0]
    assert image.dims == ("c", "z", "y", "x")
    assert image.axes_units == {"c": None, "z": UNIT, "y": UNIT, "x": UNIT}
    np.testing.assert_allclose(_values(image), _expected(layer, x), rtol=1e-5, atol=1e-5)
    for name, s, t in zip("zyx", scale[1:], translation[1:], strict=True):
        assert image.scale[name] == pytest.approx(s / 2)
        # Output voxel 0 sits at input index offset: world t + s * offset.
        assert image.translation[name] == pytest.approx(t + s * K3_SAME_OFFSET)
    # The input's version is kept, on its Zarr format.
    with open_volume(str(out)) as reader:
        assert reader.metadata.version == version
    marker = ".zattrs" if version == "0.4" else "zarr.json"
    assert (out / marker).is_file()
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    assert json.loads(attrs["conv3dt_layer"])["filters"] == 3
    assert attrs["conv3dt_source"] == os.path.abspath(source)
    assert "conv3dt_version" in attrs


def test_tiles_equal_the_untiled_output_and_chunks_follow_tiles(tmp_path):
    x = _volume((2, 12, 10, 9))
    source = tmp_path / "in.ome.zarr"
    _write_ngff(source, [x], "czyx", "0.5", scale=[1] * 4, translation=[0] * 4, chunks=(2, 4, 5, 9))
    spec = _spec(_layer(2, 3))
    whole, tiled = tmp_path / "whole.ome.zarr", tmp_path / "tiled.ome.zarr"
    upsample_file(spec, str(source), str(whole))
    result = upsample_file(spec, str(source), str(tiled), tile_shape=(8, 10, 6))
    assert result.tiles > 1
    with open_volume(str(whole)) as a, open_volume(str(tiled)) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        # Chunks divide the tiles, so no tile shares a chunk with another.
        assert all(t % c == 0 for t, c in zip((8, 10, 6), b.chunks[1:], strict=True))
        assert b.chunks[0] == 3


def test_pyramid_levels_are_2x_means_with_transforms(tmp_path):
    x = _volume((7, 9, 10))  # odd lengths: edge voxels are paired with themselves
    source = tmp_path / "in.npy"
    np.save(source, x)
    layer = _layer(1, 1, kernel=2, padding="valid")
    out = tmp_path / "out.ome.zarr"
    upsample_file(_spec(layer), str(source), str(out), pyramid=2, tile_shape=(6, 8, 8))
    images = _reference(out).images
    assert [im.data.shape for im in images] == [(14, 18, 20), (7, 9, 10), (4, 5, 5)]
    level0 = _values(images[0])
    np.testing.assert_allclose(
        level0, np.asarray(layer(x[None, ..., None]))[0, ..., 0], rtol=1e-5, atol=1e-5
    )
    level1 = _mean2(level0)
    np.testing.assert_allclose(_values(images[1]), level1, rtol=1e-6)
    np.testing.assert_allclose(_values(images[2]), _mean2(level1.astype(np.float32)), rtol=1e-6)
    # Without an input geometry a voxel is 1 unit: level 0 at 1/2, then 1, 2.
    for k, image in enumerate(images):
        step = 0.5 * 2**k
        assert image.scale == {"z": step, "y": step, "x": step}
        expected = -0.25 + 0.5 * (2**k - 1) / 2
        assert image.translation == pytest.approx({"z": expected, "y": expected, "x": expected})


def test_pyramid_of_times_and_channels_in_small_blocks(tmp_path, monkeypatch):
    from conv3dt.volumes import ome_zarr

    # Blocks far smaller than the level: many of them, cut across every axis.
    monkeypatch.setattr(ome_zarr, "_PYRAMID_BLOCK_VOXELS", 2**9)
    x = _volume((2, 3, 9, 10, 7))
    out = tmp_path / "o.ome.zarr"
    with create_volume(
        str(out), x.shape, np.float32, axes="bczyx", chunks=(1, 3, 4, 6, 7), pyramid=2
    ) as writer:
        writer.write(None, x)
    images = _reference(out).images
    assert images[0].dims == ("t", "c", "z", "y", "x")
    level1 = _mean2(x)
    np.testing.assert_allclose(_values(images[1]), level1, rtol=1e-6)
    np.testing.assert_allclose(_values(images[2]), _mean2(level1.astype(np.float32)), rtol=1e-6)


def test_level_option_reads_a_coarser_level(tmp_path):
    fine, coarse = _volume((8, 8, 8)), _volume((4, 4, 4), seed=3)
    source = tmp_path / "in.ome.zarr"
    _write_ngff(source, [fine, coarse], "zyx", "0.4", scale=[1] * 3, translation=[0] * 3)
    layer = _layer(1, 1)
    out = tmp_path / "up.npy"
    upsample_file(_spec(layer), str(source), str(out), level=1)
    np.testing.assert_allclose(
        np.load(out), np.asarray(layer(coarse[None, ..., None]))[0, ..., 0], atol=1e-5
    )


def test_nifti_to_ome_zarr_keeps_geometry(tmp_path):
    x = _volume((6, 7, 8, 2))
    affine = np.diag([0.8, 1.3, 2.5, 1.0])
    affine[:3, 3] = (10.0, -4.0, 7.5)
    image = nib.Nifti1Image(x, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, tmp_path / "in.nii")
    layer = _layer(2, 3)
    out = tmp_path / "out.ome.zarr"
    upsample_file(_spec(layer), str(tmp_path / "in.nii"), str(out))
    image = _reference(out).images[0]
    # NIfTI's (i, j, k) become the three space axes in order; channels go first.
    assert image.dims == ("c", "z", "y", "x")
    assert image.axes_units == {"c": None, "z": "millimeter", "y": "millimeter", "x": "millimeter"}
    expected = _expected(layer, np.moveaxis(x, -1, 0))
    np.testing.assert_allclose(_values(image), expected, rtol=1e-5, atol=1e-5)
    for name, s, t in zip("zyx", (0.8, 1.3, 2.5), (10.0, -4.0, 7.5), strict=True):
        assert image.scale[name] == pytest.approx(s / 2)
        assert image.translation[name] == pytest.approx(t + s * K3_SAME_OFFSET)


def test_an_oblique_affine_keeps_voxel_sizes_and_the_matrix_in_attributes(tmp_path):
    affine = np.array([[0, -2.0, 0, 5], [1.0, 0, 0, 6], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    out = tmp_path / "o.ome.zarr"
    with create_volume(str(out), (4, 5, 6), np.float32, affine=affine) as writer:
        writer.write(None, np.ones((4, 5, 6), np.float32))
    image = _reference(out).images[0]
    assert image.scale == {"z": 1.0, "y": 2.0, "x": 3.0}
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    np.testing.assert_array_equal(attrs["conv3dt_affine"], affine)


def test_a_tiff_style_unit_attribute_names_the_space_axes_unit(tmp_path):
    out = tmp_path / "o.ome.zarr"
    template = VolumeMetadata(attrs={"unit": "µm"})
    with create_volume(str(out), (4, 5, 6), np.float32, template=template) as writer:
        writer.write(None, np.ones((4, 5, 6), np.float32))
    assert set(_reference(out).images[0].axes_units.values()) == {"micrometer"}


def test_ome_zarr_to_nifti_puts_channels_last(tmp_path):
    x = _volume((2, 5, 6, 7))
    source = tmp_path / "in.ome.zarr"
    _write_ngff(source, [x], "czyx", "0.4", scale=[1, 2, 3, 4], translation=[0, 1, 2, 3])
    layer = _layer(2, 3)
    upsample_file(_spec(layer), str(source), str(tmp_path / "out.nii"))
    image = nib.load(tmp_path / "out.nii")
    data = np.asarray(image.dataobj)
    data = data.reshape(*data.shape[:3], -1)  # a vector image stores components in dim 5
    np.testing.assert_allclose(np.moveaxis(data, -1, 0), _expected(layer, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.diag(image.affine)[:3], [1.0, 1.5, 2.0])


def test_abort_and_a_failing_run_leave_nothing(tmp_path):
    out = tmp_path / "o.ome.zarr"
    writer = create_volume(str(out), (4, 4, 4), np.float32, pyramid=1)
    writer.write((slice(0, 2),), np.ones((2, 4, 4), np.float32))
    writer.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        with create_volume(str(out), (4, 4, 4), np.float32) as writer:
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []


def test_create_volume_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="`pyramid` applies to OME-Zarr output only"):
        create_volume(str(tmp_path / "o.npy"), (4, 4, 4), np.float32, pyramid=1)
    with pytest.raises(ValueError, match="`pyramid` must be an int >= 0"):
        create_volume(str(tmp_path / "o.ome.zarr"), (4, 4, 4), np.float32, pyramid=-1)
    with pytest.raises(ValueError, match="`labels` must name the 4 axes"):
        create_volume(str(tmp_path / "o.ome.zarr"), (4, 4, 4, 2), np.float32, axes="zyxc")
    assert os.listdir(tmp_path) == []


# -- the command line ----------------------------------------------------------


def _spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "up.yaml"
    result = CliRunner().invoke(
        main,
        [
            "init",
            "--filters",
            "2",
            "--kernel-size",
            "3",
            "--strides",
            "2",
            "--padding",
            "same",
            "--seed",
            "0",
            "-o",
            str(path),
        ],
    )
    assert result.exit_code == 0, result.output
    return path


def test_cli_directory_of_images_shards_and_pyramid(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        _write_ngff(
            inputs / f"s{i}.ome.zarr",
            [_volume((5, 6, 7), seed=i)],
            "zyx",
            "0.5",
            scale=[1] * 3,
            translation=[0] * 3,
        )
    spec = _spec_file(tmp_path)
    for shard in ("0/2", "1/2"):
        result = CliRunner().invoke(
            main,
            [
                "upsample",
                str(inputs),
                "--spec",
                str(spec),
                "--output-dir",
                str(tmp_path / "out"),
                "--shard",
                shard,
                "--pyramid",
                "1",
                "-q",
            ],
        )
        assert result.exit_code == 0, result.output
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["s0_up.ome.zarr", "s1_up.ome.zarr", "s2_up.ome.zarr"]
    for name in names:
        images = _reference(tmp_path / "out" / name).images
        assert [im.data.shape for im in images] == [(2, 10, 12, 14), (2, 5, 6, 7)]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--level", "1", "-o", "OUT/o.npy"], "--level picks a level of an OME-Zarr input"),
        (["--pyramid", "1", "-o", "OUT/o.npy"], "--pyramid adds levels to an OME-Zarr output"),
    ],
)
def test_cli_refuses_ngff_options_for_other_formats(tmp_path, arguments, message):
    np.save(tmp_path / "in.npy", _volume((4, 4, 4)))
    spec = _spec_file(tmp_path)
    arguments = [a.replace("OUT", str(tmp_path)) for a in arguments]
    source = str(tmp_path / "in.npy")
    result = CliRunner().invoke(main, ["upsample", source, "--spec", str(spec), *arguments])
    assert result.exit_code == 2
    assert message in result.output


def test_cli_level_out_of_range_is_a_usage_error(tmp_path):
    source = tmp_path / "in.ome.zarr"
    _write_ngff(source, [_volume((4, 4, 4))], "zyx", "0.4", scale=[1] * 3, translation=[0] * 3)
    spec = _spec_file(tmp_path)
    result = CliRunner().invoke(
        main,
        [
            "upsample",
            str(source),
            "--spec",
            str(spec),
            "-o",
            str(tmp_path / "o.npy"),
            "--level",
            "3",
        ],
    )
    assert result.exit_code == 2
    assert "level" in result.output and "0 to 0" in result.output
    assert not (tmp_path / "o.npy").exists()


# -- Dask ----------------------------------------------------------------------


def test_dask_tiles_of_ome_zarr_images_equal_serial_runs(tmp_path, client):  # noqa: F811
    from conv3dt.batch import Job
    from conv3dt.distributed import upsample_batch

    layer = _layer(2, 3)
    jobs = []
    for i in range(2):
        source = tmp_path / f"s{i}.ome.zarr"
        _write_ngff(
            source,
            [_volume((2, 10, 7, 6), seed=i)],
            "czyx",
            "0.4" if i else "0.5",
            scale=[1.0, 2.0, 1.0, 1.0],
            translation=[0.0] * 4,
            chunks=(1, 5, 7, 6),
        )
        jobs.append(Job(str(source), str(tmp_path / f"s{i}_up.ome.zarr")))
        upsample_file(_spec(layer), str(source), str(tmp_path / f"serial{i}.ome.zarr"), pyramid=1)
    results = upsample_batch(
        client, _spec(layer), jobs, split="tiles", tile_shape=(4, 14, 12), pyramid=1
    )
    assert sorted(r.extra["mode"] for r in results) == ["tiles", "tiles"]
    assert all(r.tiles > 1 for r in results)
    for i, job in enumerate(jobs):
        got = _reference(Path(job.output))
        want = _reference(tmp_path / f"serial{i}.ome.zarr")
        assert len(got.images) == 2
        for a, b in zip(got.images, want.images, strict=True):
            np.testing.assert_array_equal(_values(a), _values(b))
            assert a.scale == b.scale and a.translation == b.translation
        # The workers wrote level 0 in place: one chunk a tile, all filters in it.
        with open_volume(job.output) as reader:
            assert reader.chunks == (3, 4, 14, 12)
            assert reader.metadata.version == ("0.4" if i else "0.5")
    assert not [p for p in os.listdir(tmp_path) if ".conv3dt-" in p]


def test_cli_channel_mismatch_does_not_suggest_4d_as_batch(tmp_path):
    source = tmp_path / "in.ome.zarr"
    _write_ngff(source, [_volume((3, 4, 4, 4))], "czyx", "0.5", scale=[1] * 4, translation=[0] * 4)
    spec = _spec_file(tmp_path)  # one input channel
    result = CliRunner().invoke(
        main, ["upsample", str(source), "--spec", str(spec), "-o", str(tmp_path / "o.npy")]
    )
    assert result.exit_code == 2
    assert "has 3 channel(s)" in result.output and "--in-channels 3" in result.output
    assert "--4d-as-batch" not in result.output  # an OME-Zarr image names its axes


def test_dask_interrupted_ome_zarr_run_resumes_and_builds_its_pyramid(tmp_path, client):  # noqa: F811
    from conv3dt.batch import Job
    from conv3dt.distributed import upsample_batch

    spec = _spec(_layer(2, 3))
    source = tmp_path / "in.ome.zarr"
    _write_ngff(source, [_volume((2, 16, 8, 6))], "czyx", "0.5", scale=[1] * 4, translation=[0] * 4)
    job = Job(str(source), str(tmp_path / "out.ome.zarr"))
    options = {"threads": 1, "tile_shape": (4, 16, 12), "split": "tiles", "pyramid": 1}
    done: list[int] = []

    def stop_after_two(job: Job, voxels: int, total: int) -> None:
        done.append(voxels)
        if len(done) > 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upsample_batch(client, spec, [job], progress=stop_after_two, **options)
    assert not (tmp_path / "out.ome.zarr").exists()
    assert (tmp_path / ".out.ome.zarr.conv3dt-partial.ome.zarr").is_dir()
    (result,) = upsample_batch(client, spec, [job], resume=True, **options)
    assert 2 <= result.extra["resumed_tiles"] < result.tiles == 8
    upsample_file(spec, str(source), str(tmp_path / "serial.ome.zarr"), pyramid=1)
    got, want = _reference(tmp_path / "out.ome.zarr"), _reference(tmp_path / "serial.ome.zarr")
    for a, b in zip(got.images, want.images, strict=True):
        np.testing.assert_array_equal(_values(a), _values(b))
    assert not [p for p in os.listdir(tmp_path) if ".conv3dt-" in p]


def test_cli_dask_over_a_directory_of_images_with_level_and_pyramid(tmp_path, session):  # noqa: F811
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        _write_ngff(
            inputs / f"s{i}.ome.zarr",
            [_volume((8, 6, 10), seed=i), _volume((4, 3, 5), seed=10 + i)],
            "zyx",
            "0.4",
            scale=[1] * 3,
            translation=[0] * 3,
        )
    spec = _spec_file(tmp_path)
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": session.cluster.scheduler_address}))
    result = CliRunner().invoke(
        main,
        ["upsample", str(inputs), "--spec", str(spec), "--output-dir", str(tmp_path / "out"),
         "--dask-scheduler-file", str(scheduler_file), "--threads", "1", "--level", "1",
         "--pyramid", "1", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 3
    for i in range(3):
        out = tmp_path / "out" / f"s{i}_up.ome.zarr"
        upsample_file(
            load_spec(spec), str(inputs / f"s{i}.ome.zarr"), str(tmp_path / "serial.ome.zarr"),
            level=1, pyramid=1, overwrite=True,
        )  # fmt: skip
        got, want = _reference(out), _reference(tmp_path / "serial.ome.zarr")
        assert [im.data.shape for im in got.images] == [(2, 8, 6, 10), (2, 4, 3, 5)]
        for a, b in zip(got.images, want.images, strict=True):
            np.testing.assert_array_equal(_values(a), _values(b))
