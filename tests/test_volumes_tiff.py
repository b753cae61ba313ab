"""TIFF volumes: ImageJ stacks and hyperstacks, OME-TIFF, read back with tifffile.

Outputs are read with tifffile (the reference reader) and compared with the
in-memory layer; tiled runs equal untiled ones bit for bit; reads decode only
the pages a box needs; voxel sizes follow the stride.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli_helpers import run_cli, write_spec
from click.testing import CliRunner
from conv3dt_cli.main import main

from conv3dt import Conv3DTranspose
from conv3dt.plan import MemoryLimitError
from conv3dt.run import upsample_file
from conv3dt.spec import LayerSpec
from conv3dt.volumes import VolumeError, create_volume, open_volume

tifffile = pytest.importorskip("tifffile")

# (z, y, x) voxel size of the inputs, in micrometres.
VOXEL = (2.0, 0.5, 0.25)


def _imagej(path: Path, array: np.ndarray, axes: str) -> None:
    tifffile.imwrite(
        path,
        array,
        imagej=True,
        resolution=(1 / VOXEL[2], 1 / VOXEL[1]),
        metadata={"spacing": VOXEL[0], "unit": "micron", "axes": axes},
    )


def _ome(path: Path, array: np.ndarray, axes: str, **options: object) -> None:
    metadata = {"axes": axes}
    for axis, size in zip("ZYX", VOXEL, strict=True):
        metadata[f"PhysicalSize{axis}"] = size
        metadata[f"PhysicalSize{axis}Unit"] = "µm"
    tifffile.imwrite(path, array, metadata=metadata, **options)


def _spec(tmp_path: Path, layer: Conv3DTranspose, in_channels: int) -> Path:
    return write_spec(tmp_path, layer, in_channels, seed=7)


def _zcyx(volume: np.ndarray) -> np.ndarray:
    """A (z, y, x, c) volume as an ImageJ hyperstack's (z, c, y, x) pages."""
    return np.transpose(volume, (0, 3, 1, 2))


def _no_leftovers(directory: Path) -> None:
    assert [p.name for p in directory.iterdir() if "conv3dt-" in p.name] == []


# -- reading and writing through the command line ---------------------------------


def test_imagej_stack_to_imagej_hyperstack(tmp_path):
    layer = Conv3DTranspose(3, 3, strides=2, padding="same", activation="relu")
    spec = _spec(tmp_path, layer, 1)
    volume = np.random.default_rng(0).standard_normal((7, 6, 5)).astype(np.float32)
    _imagej(tmp_path / "in.tif", volume, "ZYX")
    out = tmp_path / "out.tif"
    result = run_cli("upsample", str(tmp_path / "in.tif"), "--spec", str(spec), "-o", str(out))
    assert result.exit_code == 0, result.output
    expected = np.asarray(layer(volume[None, ..., None])[0])
    with tifffile.TiffFile(out) as tiff:
        assert tiff.is_imagej
        assert tiff.series[0].axes == "ZCYX"
        np.testing.assert_array_equal(tiff.asarray(), _zcyx(expected))
        metadata = tiff.imagej_metadata
        assert metadata["hyperstack"] and (metadata["slices"], metadata["channels"]) == (14, 3)
        assert metadata["spacing"] == VOXEL[0] / 2
        assert metadata["unit"] == "micron"
        x_res = tiff.pages[0].tags["XResolution"].value
        y_res = tiff.pages[0].tags["YResolution"].value
        assert x_res[1] / x_res[0] == pytest.approx(VOXEL[2] / 2, rel=1e-6)
        assert y_res[1] / y_res[0] == pytest.approx(VOXEL[1] / 2, rel=1e-6)
        assert json.loads(metadata["Info"])["conv3dt_source"] == str(tmp_path / "in.tif")
    with open_volume(str(out)) as reader:
        assert reader.shape == (14, 12, 10, 3)
        assert reader.metadata.voxel_size == pytest.approx(tuple(v / 2 for v in VOXEL))
        np.testing.assert_array_equal(reader.read(), expected)
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_ome_tiff_with_channels_to_ome_tiff_float64(tmp_path, compression):
    layer = Conv3DTranspose(2, 2, strides=(1, 2, 2))
    spec = _spec(tmp_path, layer, 2)
    volume = np.random.default_rng(1).standard_normal((5, 6, 7, 2)).astype(np.float32)
    _ome(tmp_path / "in.ome.tif", _zcyx(volume), "ZCYX", compression=compression)
    out = tmp_path / "out.ome.tif"
    result = run_cli(
        "upsample", str(tmp_path / "in.ome.tif"), "--spec", str(spec), "-o", str(out),
        "--output-dtype", "float64",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = np.asarray(layer(volume[None])[0]).astype(np.float64)
    with tifffile.TiffFile(out) as tiff:
        assert tiff.is_ome
        assert tiff.series[0].dtype == np.float64
        np.testing.assert_array_equal(tiff.asarray(), _zcyx(expected))
        pixels = tifffile.xml2dict(tiff.ome_metadata)["OME"]["Image"]["Pixels"]
    assert (pixels["SizeZ"], pixels["SizeC"], pixels["SizeY"], pixels["SizeX"]) == (6, 2, 12, 14)
    assert pixels["PhysicalSizeZ"] == VOXEL[0]
    assert pixels["PhysicalSizeY"] == VOXEL[1] / 2
    assert pixels["PhysicalSizeX"] == VOXEL[2] / 2
    assert pixels["PhysicalSizeXUnit"] == "µm"


def test_a_stack_with_a_singleton_time_axis_and_no_calibration(tmp_path):
    volume = np.arange(4 * 3 * 5, dtype=np.uint16).reshape(1, 4, 1, 3, 5)
    tifffile.imwrite(tmp_path / "plain.tif", volume, imagej=True, metadata={"axes": "TZCYX"})
    with open_volume(str(tmp_path / "plain.tif")) as reader:
        assert reader.shape == (4, 3, 5)
        assert reader.metadata.voxel_size is None
        assert reader.dtype == np.uint16
        np.testing.assert_array_equal(reader.read((slice(1, 3),)), volume[0, 1:3, 0])


def test_info_describes_a_tiff(tmp_path):
    volume = np.zeros((3, 4, 5, 2), dtype=np.float32)
    _imagej(tmp_path / "in.tif", _zcyx(volume), "ZCYX")
    result = run_cli("info", "--json", str(tmp_path / "in.tif"))
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "tiff"
    assert info["shape"] == [3, 4, 5, 2]
    assert info["axis_labels"] == ["z", "y", "x", "c"]
    assert info["channels"] == 2
    assert info["voxel_size"] == list(VOXEL)
    assert info["tiff"] == {"kind": "imagej", "series_axes": "ZCYX", "unit": "µm"}


# -- exact tiles, pages read as needed, BigTIFF -----------------------------------


def test_tiles_equal_the_untiled_output_bit_for_bit(tmp_path):
    layer = Conv3DTranspose(2, 3, strides=2, padding="same", activation="tanh")
    _spec(tmp_path, layer, 2)
    spec = LayerSpec(layer, "test")
    volume = np.random.default_rng(2).standard_normal((9, 8, 7, 2)).astype(np.float32)
    source = tmp_path / "in.ome.tif"
    _ome(source, _zcyx(volume), "ZCYX", compression="zlib")
    whole = tmp_path / "whole.tif"
    upsample_file(spec, str(source), str(whole))
    with pytest.raises(MemoryLimitError) as refused:
        upsample_file(spec, str(source), str(tmp_path / "x.tif"), memory_limit=1)
    outputs = {"tiles": (3, 5, 2), "budget": None}
    for name, tile in outputs.items():
        path = tmp_path / f"{name}.tif"
        limit = None if tile else refused.value.minimum
        result = upsample_file(spec, str(source), str(path), tile_shape=tile, memory_limit=limit)
        assert result.tiles > 1
        np.testing.assert_array_equal(tifffile.imread(path), tifffile.imread(whole))
    np.testing.assert_array_equal(tifffile.imread(whole), _zcyx(np.asarray(layer(volume[None])[0])))
    _no_leftovers(tmp_path)


def test_a_box_decodes_only_its_pages(tmp_path, monkeypatch):
    volume = np.random.default_rng(3).standard_normal((6, 3, 8, 9)).astype(np.float32)
    _ome(tmp_path / "in.ome.tif", volume, "ZCYX", compression="zlib")
    decoded = []
    for klass in (tifffile.TiffPage, tifffile.TiffFrame):
        original = klass.asarray

        def counting(self, *args, original=original, **kwargs):
            decoded.append(self.index)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(klass, "asarray", counting)
    with open_volume(str(tmp_path / "in.ome.tif")) as reader:
        box = (slice(2, 4), slice(1, 5), slice(0, 9), slice(1, 3))
        got = reader.read(box)
    np.testing.assert_array_equal(got, np.transpose(volume, (0, 2, 3, 1))[box])
    # Planes 2 and 3, channels 1 and 2: pages z * 3 + c (a frame decodes through
    # its key page's method, so a page may be counted twice).
    assert sorted(set(decoded)) == [7, 8, 10, 11]


def test_a_contiguous_stack_is_read_without_decoding_pages(tmp_path, monkeypatch):
    volume = np.random.default_rng(4).standard_normal((5, 6, 7)).astype(np.float32)
    _imagej(tmp_path / "in.tif", volume, "ZYX")

    def refuse(*args, **kwargs):
        raise AssertionError("a page was decoded as a whole")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse)
    monkeypatch.setattr(tifffile.TiffFrame, "asarray", refuse)
    with open_volume(str(tmp_path / "in.tif")) as reader:
        box = (slice(1, 4), slice(2, 3), slice(3, 7))
        np.testing.assert_array_equal(reader.read(box), volume[box])


@pytest.mark.parametrize("name", ["big.tif", "big.ome.tif"])
def test_bigtiff_when_the_data_passes_4_gib(tmp_path, monkeypatch, name):
    # The threshold lowered to nothing: a small file shows the large file's layout.
    monkeypatch.setattr("conv3dt.volumes.tiff._BIGTIFF_BYTES", 0)
    data = np.random.default_rng(5).standard_normal((4, 5, 6, 2)).astype(np.float32)
    path = tmp_path / name
    with create_volume(str(path), data.shape, np.float32) as writer:
        writer.write((slice(2, 4),), data[2:4])  # out of order: positional writes
        writer.write((slice(0, 2),), data[:2])
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_bigtiff
        assert tiff.series[0].axes == "ZCYX"
        np.testing.assert_array_equal(tiff.asarray(), _zcyx(data))


# -- refusals -------------------------------------------------------------------


def test_float64_to_an_imagej_tiff_is_refused_naming_ome(tmp_path):
    layer = Conv3DTranspose(1, 2, strides=2)
    spec = _spec(tmp_path, layer, 1)
    _imagej(tmp_path / "in.tif", np.zeros((2, 3, 4), dtype=np.float32), "ZYX")
    result = CliRunner().invoke(
        main,
        ["upsample", str(tmp_path / "in.tif"), "--spec", str(spec), "-o", str(tmp_path / "o.tif"),
         "--output-dtype", "float64"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "float32" in result.output and ".ome.tif" in result.output
    assert not (tmp_path / "o.tif").exists()
    _no_leftovers(tmp_path)


def test_a_series_of_several_volumes_is_refused(tmp_path):
    tifffile.imwrite(
        tmp_path / "movie.tif", np.zeros((3, 4, 5, 6), np.float32), imagej=True,
        metadata={"axes": "TZYX"},
    )  # fmt: skip
    with pytest.raises(VolumeError, match=r"movie\.tif.*TZYX.*not one volume"):
        open_volume(str(tmp_path / "movie.tif"))


def test_without_tifffile_the_message_names_the_extra(tmp_path, monkeypatch):
    layer = Conv3DTranspose(1, 2, strides=2)
    spec = _spec(tmp_path, layer, 1)
    _imagej(tmp_path / "in.tif", np.zeros((2, 3, 4), dtype=np.float32), "ZYX")
    monkeypatch.setitem(sys.modules, "tifffile", None)
    result = CliRunner().invoke(
        main,
        ["upsample", str(tmp_path / "in.tif"), "--spec", str(spec), "-o", str(tmp_path / "o.npy")],
    )
    assert result.exit_code == 2
    assert "pip install 'conv3dt[tiff]'" in result.output
    assert sorted(os.listdir(tmp_path)) == ["bias.npy", "in.tif", "kernel.npy", "spec.yaml"]


def test_an_aborted_write_leaves_nothing_and_a_commit_replaces_atomically(tmp_path):
    target = tmp_path / "out.ome.tif"
    writer = create_volume(str(target), (3, 4, 5), np.float64)
    writer.write((slice(0, 1),), np.ones((1, 4, 5)))
    writer.abort()
    assert os.listdir(tmp_path) == []
    with create_volume(str(target), (3, 4, 5), np.float64) as writer:
        writer.write(None, np.full((3, 4, 5), 2.0))
    np.testing.assert_array_equal(tifffile.imread(target), np.full((3, 4, 5), 2.0))
    assert os.listdir(tmp_path) == ["out.ome.tif"]


def test_a_nifti_input_gives_its_voxel_size_and_unit_to_a_tiff(tmp_path):
    nib = pytest.importorskip("nibabel")
    layer = Conv3DTranspose(1, 2, strides=2)
    spec = _spec(tmp_path, layer, 1)
    image = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), np.diag([0.5, 0.75, 1.5, 1.0]))
    image.header.set_xyzt_units("mm")
    nib.save(image, tmp_path / "in.nii")
    out = tmp_path / "out.tif"
    assert (
        run_cli("upsample", str(tmp_path / "in.nii"), "--spec", str(spec), "-o", str(out)).exit_code
        == 0
    )
    with tifffile.TiffFile(out) as tiff:
        assert tiff.series[0].shape == (6, 8, 10)  # NIfTI's i, j, k as z, y, x
        assert tiff.imagej_metadata["spacing"] == 0.25
        assert tiff.imagej_metadata["unit"] == "mm"
        x_res = tiff.pages[0].tags["XResolution"].value
        assert x_res[1] / x_res[0] == pytest.approx(0.75, rel=1e-6)


def test_a_directory_of_tiffs_with_shards(tmp_path):
    layer = Conv3DTranspose(1, 2, strides=2)
    spec = _spec(tmp_path, layer, 1)
    (tmp_path / "in").mkdir()
    volumes = {}
    for index, name in enumerate(["a.tif", "b.ome.tif", "c.tiff"]):
        volumes[name] = np.full((2, 3, 4), index + 1.0, dtype=np.float32)
        if name.endswith(".ome.tif"):
            _ome(tmp_path / "in" / name, volumes[name], "ZYX", photometric="minisblack")
        else:
            _imagej(tmp_path / "in" / name, volumes[name], "ZYX")
    for shard in ("0/2", "1/2"):
        result = run_cli(
            "upsample", str(tmp_path / "in"), "--spec", str(spec), "--output-dir",
            str(tmp_path / "out"), "--shard", shard, "-q",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "out")) == ["a_up.tif", "b_up.ome.tif", "c_up.tiff"]
    for name, volume in volumes.items():
        stem, _, extension = name.partition(".")
        got = tifffile.imread(tmp_path / "out" / f"{stem}_up.{extension}")
        np.testing.assert_array_equal(got, np.asarray(layer(volume[None, ..., None])[0, ..., 0]))


@pytest.mark.parametrize("name", ["x3.tif", "x3.ome.tif"])
def test_an_x_axis_of_3_is_not_taken_for_rgb(tmp_path, name):
    data = np.random.default_rng(6).standard_normal((5, 4, 3)).astype(np.float32)
    with create_volume(str(tmp_path / name), data.shape, np.float32) as writer:
        writer.write(None, data)
    with tifffile.TiffFile(tmp_path / name) as tiff:
        assert tiff.series[0].axes == "ZYX"
        np.testing.assert_array_equal(tiff.asarray(), data)
    with open_volume(str(tmp_path / name)) as reader:
        np.testing.assert_array_equal(reader.read(), data)
