"""Metadata outputs carry, checked with readers nobody here wrote.

NIfTI: vector images for several filters, valid qforms on NIfTI-1 and -2,
``pixdim`` exactly the input's voxel size over the stride, world coordinates
as nibabel and SimpleITK read them. HDF5: voxel-size attributes scaled by the
stride. ``conv3dt info`` and ``inspect``: the header's fields and axis labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from _cli_helpers import run_cli, write_spec

from conv3dt import Conv3DTranspose
from conv3dt.spec import LayerSpec
from conv3dt.volumes import VolumeMetadata, create_volume, open_volume

PIXDIM = (0.8, 1.3, 2.5)


def _oblique_affine() -> np.ndarray:
    """An LPS-like oblique affine (a 180° turn about k, tilted): the qform's hard case."""
    angle = 0.3
    tilt = np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    )
    flip = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = flip @ tilt @ np.diag(np.float32(PIXDIM).astype(np.float64))
    affine[:3, 3] = (12.5, -30.25, 7.0)
    return affine


def _save_nifti(path: Path, array: np.ndarray, version: int = 1) -> np.ndarray:
    klass = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    image = klass(array, _oblique_affine())
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_dim_info(freq=0, phase=1, slice=2)
    nib.save(image, path)
    return nib.load(path).affine


def _spec(tmp_path: Path, layer: Conv3DTranspose, in_channels: int) -> Path:
    return write_spec(tmp_path, layer, in_channels, seed=7)


def _world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    return index @ affine[:3, :3].T + affine[:3, 3]


# -- NIfTI: vector images, read back as channels -------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_several_filters_make_a_vector_image_read_back_as_channels(tmp_path, suffix):
    layer = Conv3DTranspose(3, 3, strides=2, padding="same")
    spec = _spec(tmp_path, layer, 1)
    volume = np.random.default_rng(0).standard_normal((6, 5, 4)).astype(np.float32)
    _save_nifti(tmp_path / "in.nii", volume)
    out = tmp_path / f"out{suffix}"
    result = run_cli("upsample", str(tmp_path / "in.nii"), "--spec", str(spec), "-o", str(out))
    assert result.exit_code == 0, result.output
    expected = np.asarray(layer(volume[None, ..., None])[0])
    image = nib.load(out)
    assert image.shape == (12, 10, 8, 1, 3)
    assert image.header["dim"][4] == 1
    assert int(image.header["intent_code"]) == 1007
    assert image.header.get_intent()[0] == "vector"
    np.testing.assert_array_equal(np.asarray(image.dataobj)[:, :, :, 0], expected)
    with open_volume(str(out)) as reader:
        assert reader.shape == (12, 10, 8, 3)
        np.testing.assert_array_equal(reader.read(), expected)
        box = (slice(3, 9), slice(0, 4), slice(5, 8), slice(1, 3))
        np.testing.assert_array_equal(reader.read(box), expected[box])


def test_simpleitk_reads_the_vector_image_as_three_components(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    layer = Conv3DTranspose(3, 2, strides=2)
    spec = _spec(tmp_path, layer, 1)
    volume = np.random.default_rng(1).standard_normal((4, 3, 5)).astype(np.float32)
    _save_nifti(tmp_path / "in.nii.gz", volume)
    out = tmp_path / "out.nii.gz"
    assert (
        run_cli(
            "upsample", str(tmp_path / "in.nii.gz"), "--spec", str(spec), "-o", str(out)
        ).exit_code
        == 0
    )
    image = sitk.ReadImage(str(out))
    assert image.GetSize() == (8, 6, 10)
    assert image.GetNumberOfComponentsPerPixel() == 3
    # SimpleITK arrays are (k, j, i, components).
    got = sitk.GetArrayFromImage(image).transpose(2, 1, 0, 3)
    np.testing.assert_array_equal(got, np.asarray(layer(volume[None, ..., None])[0]))


def test_nifti_channels_volumes_keeps_the_4d_form(tmp_path):
    layer = Conv3DTranspose(2, 2, strides=2)
    spec = _spec(tmp_path, layer, 1)
    volume = np.random.default_rng(2).standard_normal((3, 4, 5)).astype(np.float32)
    _save_nifti(tmp_path / "in.nii", volume)
    out = tmp_path / "out.nii"
    result = run_cli(
        "upsample", str(tmp_path / "in.nii"), "--spec", str(spec), "-o", str(out),
        "--nifti-channels", "volumes",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    image = nib.load(out)
    assert image.shape == (6, 8, 10, 2)
    assert image.header.get_intent()[0] == "none"
    np.testing.assert_array_equal(
        np.asarray(image.dataobj), np.asarray(layer(volume[None, ..., None])[0])
    )


def test_one_filter_stays_3d_and_a_vector_input_reads_as_channels(tmp_path):
    # A 2-component vector image in, one filter out: the channel axis stays (one
    # channel), and is no vector any more.
    layer = Conv3DTranspose(1, 2, strides=2)
    spec = _spec(tmp_path, layer, 2)
    volume = np.random.default_rng(3).standard_normal((4, 3, 2, 1, 2)).astype(np.float32)
    image = nib.Nifti1Image(volume, _oblique_affine())
    image.header.set_intent("vector")
    nib.save(image, tmp_path / "in.nii.gz")
    out = tmp_path / "out.nii.gz"
    result = run_cli("upsample", str(tmp_path / "in.nii.gz"), "--spec", str(spec), "-o", str(out))
    assert result.exit_code == 0, result.output
    written = nib.load(out)
    assert written.shape == (8, 6, 4, 1)
    assert written.header.get_intent()[0] == "none"
    np.testing.assert_array_equal(
        np.asarray(written.dataobj), np.asarray(layer(volume[None, :, :, :, 0])[0])
    )


def test_vector_tiles_equal_the_untiled_output_bit_for_bit(tmp_path):
    from conv3dt.run import upsample_file

    layer = Conv3DTranspose(3, 3, strides=2, padding="same", activation="relu")
    _spec(tmp_path, layer, 2)
    volume = np.random.default_rng(4).standard_normal((9, 7, 6, 2)).astype(np.float32)
    _save_nifti(tmp_path / "in.nii.gz", volume)
    spec = LayerSpec(layer, "test")
    whole, tiled = tmp_path / "whole.nii.gz", tmp_path / "tiled.nii.gz"
    upsample_file(spec, str(tmp_path / "in.nii.gz"), str(whole))
    result = upsample_file(spec, str(tmp_path / "in.nii.gz"), str(tiled), tile_shape=(3, 5, 2))
    assert result.tiles > 1
    a, b = nib.load(whole), nib.load(tiled)
    assert a.shape == b.shape == (18, 14, 12, 1, 3)
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


# -- NIfTI: qform, pixdim, world coordinates ------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("stride", [2, 3])
def test_qform_is_valid_and_pixdim_is_the_input_voxel_size_over_the_stride(
    tmp_path, version, stride
):
    layer = Conv3DTranspose(1, stride, strides=stride)
    spec = _spec(tmp_path, layer, 1)
    volume = np.random.default_rng(5).standard_normal((5, 4, 3)).astype(np.float32)
    in_affine = _save_nifti(tmp_path / "in.nii.gz", volume, version)
    out = tmp_path / "out.nii.gz"
    result = run_cli("upsample", str(tmp_path / "in.nii.gz"), "--spec", str(spec), "-o", str(out))
    assert result.exit_code == 0, result.output
    header = nib.load(out).header
    stored = header["pixdim"].dtype.type
    assert isinstance(header, nib.Nifti2Header if version == 2 else nib.Nifti1Header)
    wanted = (nib.load(tmp_path / "in.nii.gz").header["pixdim"][1:4] / stored(stride)).astype(
        stored
    )
    np.testing.assert_array_equal(header["pixdim"][1:4], wanted)
    bcd = np.array([header["quatern_b"], header["quatern_c"], header["quatern_d"]], float)
    assert 1.0 - bcd @ bcd >= 0.0
    qform, sform = header.get_qform(), header.get_sform()  # raises for a bad quaternion
    np.testing.assert_allclose(qform, sform, atol=1e-5)
    # The output affine follows the world-alignment rule: output index o sits at
    # input index (o + crop_left - (k_eff - 1) / 2) / s, here (o - (s - 1) / 2) / s.
    index = np.array([[0, 0, 0], [3, 5, 2], [9, 7, 8]], dtype=float)
    np.testing.assert_allclose(
        _world(sform, index), _world(in_affine, (index - (stride - 1) / 2) / stride), atol=1e-4
    )


def test_rotations_whose_plain_quaternion_is_refused_get_a_valid_qform(tmp_path):
    # Half turns (quaternion a near 0) in NIfTI-2's float64: nibabel's own
    # set_qform leaves b² + c² + d² a hair above 1 for some of them.
    rng = np.random.default_rng(9)
    hard = []
    for _ in range(3000):
        quaternion = rng.standard_normal(4)
        quaternion[0] = 0.0
        quaternion /= np.linalg.norm(quaternion)
        affine = np.eye(4)
        affine[:3, :3] = nib.quaternions.quat2mat(quaternion) @ np.diag(rng.uniform(0.1, 3, 3))
        header = nib.Nifti2Header()
        header.set_qform(affine, code=1)
        try:
            header.get_qform()
        except ValueError:
            hard.append(affine)
    assert hard, "no rotation that nibabel's set_qform gets wrong: the test tests nothing"
    template = nib.Nifti2Header()
    for number, affine in enumerate(hard[:10]):
        path = tmp_path / f"out{number}.nii"
        with create_volume(
            str(path), (2, 2, 2), np.float32, template=VolumeMetadata(nifti_header=template),
            affine=affine,
        ) as writer:  # fmt: skip
            writer.write(None, np.zeros((2, 2, 2), np.float32))
        header = nib.load(path).header
        np.testing.assert_allclose(header.get_qform(), affine, atol=1e-9)


def test_nibabel_qform_of_the_nifti2_example_with_a_batch(tmp_path):
    """The header that used to give "w2 should be positive" after a 2x run."""
    source = Path(nib.__file__).parent / "tests" / "data" / "example_nifti2.nii.gz"
    if not source.exists():
        pytest.skip("nibabel's test data is not installed")
    layer = Conv3DTranspose(1, 3, strides=2, padding="same")
    spec = _spec(tmp_path, layer, 1)
    out = tmp_path / "out.nii.gz"
    result = run_cli("upsample", str(source), "--spec", str(spec), "-o", str(out), "--4d-as-batch")
    assert result.exit_code == 0, result.output
    header = nib.load(out).header
    np.testing.assert_allclose(header.get_qform(), header.get_sform(), atol=1e-5)
    np.testing.assert_array_equal(header["pixdim"][1:4], nib.load(source).header["pixdim"][1:4] / 2)


def test_world_coordinates_agree_between_nibabel_and_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    layer = Conv3DTranspose(1, 3, strides=2, padding="same")
    spec = _spec(tmp_path, layer, 1)
    volume = np.random.default_rng(6).standard_normal((6, 5, 4)).astype(np.float32)
    _save_nifti(tmp_path / "in.nii.gz", volume)
    out = tmp_path / "out.nii.gz"
    assert (
        run_cli(
            "upsample", str(tmp_path / "in.nii.gz"), "--spec", str(spec), "-o", str(out)
        ).exit_code
        == 0
    )
    affine = nib.load(out).affine
    image = sitk.ReadImage(str(out))
    np.testing.assert_allclose(image.GetSpacing(), np.float32(PIXDIM) / 2, rtol=1e-6)
    for index in [(0, 0, 0), (11, 9, 7), (4, 2, 6)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = _world(affine, np.array(index, dtype=float))
        # ITK's world is LPS, NIfTI's RAS: x and y change sign.
        np.testing.assert_allclose(lps * (-1, -1, 1), ras, atol=1e-4)


# -- HDF5 voxel-size attributes -------------------------------------------------


def test_hdf5_voxel_size_attributes_are_divided_by_the_stride(tmp_path):
    layer = Conv3DTranspose(1, 2, strides=(2, 1, 2))
    spec = _spec(tmp_path, layer, 1)
    volume = np.random.default_rng(8).standard_normal((4, 5, 6)).astype(np.float32)
    with h5py.File(tmp_path / "in.h5", "w") as handle:
        dataset = handle.create_dataset("raw", data=volume)
        dataset.attrs["element_size_um"] = np.array([1.5, 0.25, 0.25], dtype=np.float32)
        dataset.attrs["resolution"] = [3.0, 1.0, 0.5]
        dataset.attrs["spacing"] = 7.0  # not a 3-vector: left as it is
    out = tmp_path / "out.h5"
    result = run_cli("upsample", str(tmp_path / "in.h5"), "--spec", str(spec), "-o", str(out))
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as handle:
        attrs = handle["data"].attrs
        assert attrs["element_size_um"].dtype == np.float32
        np.testing.assert_array_equal(attrs["element_size_um"], np.float32([0.75, 0.25, 0.125]))
        np.testing.assert_array_equal(attrs["resolution"], [1.5, 1.0, 0.25])
        assert attrs["spacing"] == 7.0
        np.testing.assert_array_equal(
            handle["data"][()], np.asarray(layer(volume[None, ..., None])[0, ..., 0])
        )
    with open_volume(str(out)) as reader:
        assert reader.metadata.voxel_size == (0.75, 0.25, 0.125)
    result = run_cli("info", "--json", str(tmp_path / "in.h5"))
    info = json.loads(result.output)
    assert info["voxel_size"] == [1.5, 0.25, 0.25]
    assert info["voxel_size_attrs"]["element_size_um"] == [1.5, 0.25, 0.25]
    assert info["axis_labels"] == ["z", "y", "x"]


# -- info and inspect --------------------------------------------------------------


def test_info_reports_the_nifti_header(tmp_path):
    volume = np.zeros((4, 3, 2, 5), dtype=np.float32)
    image = nib.Nifti2Image(volume, _oblique_affine())
    image.header.set_xyzt_units("mm", "msec")
    image.header["pixdim"][4] = 1500.0
    image.header.set_dim_info(freq=1, phase=0, slice=2)
    image.header.set_intent("t test", (12.0,))
    image.set_qform(_oblique_affine(), code=1)
    image.set_sform(_oblique_affine(), code=4)
    nib.save(image, tmp_path / "in.nii.gz")
    result = run_cli("info", "--json", str(tmp_path / "in.nii.gz"))
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["axis_labels"] == ["i", "j", "k", "c"]
    assert info["channels"] == 5
    # As the header stores them (NIfTI-2: float64), not the affine's column norms.
    assert info["voxel_size"] == np.float32(PIXDIM).astype(float).tolist()
    nifti = info["nifti"]
    assert nifti["version"] == 2
    assert nifti["stored_shape"] == [4, 3, 2, 5]
    assert (nifti["qform_code"], nifti["sform_code"]) == ("scanner", "mni")
    np.testing.assert_allclose(nifti["sform"], _oblique_affine(), atol=1e-6)
    np.testing.assert_allclose(nifti["qform"], _oblique_affine(), atol=1e-5)
    assert nifti["units"] == {"space": "mm", "time": "msec"}
    assert nifti["tr"] == pytest.approx(1.5)
    assert nifti["intent"]["name"] == "t test"
    assert nifti["intent"]["params"] == [12.0]
    assert nifti["dim_info"] == {"freq": 1, "phase": 0, "slice": 2}
    text = run_cli("info", str(tmp_path / "in.nii.gz")).output
    assert "qform_code: scanner" in text and "axis_labels: [i, j, k, c]" in text


def test_inspect_labels_nifti_axes_ijk_and_arrays_zyx(tmp_path):
    layer = Conv3DTranspose(2, 2, strides=2)
    spec = _spec(tmp_path, layer, 1)
    _save_nifti(tmp_path / "in.nii", np.zeros((4, 3, 2), dtype=np.float32))
    np.save(tmp_path / "in.npy", np.zeros((4, 3, 2), dtype=np.float32))
    report = json.loads(
        run_cli(
            "inspect", "--spec", str(spec), "--input", str(tmp_path / "in.nii"), "--json"
        ).output
    )["plan"]
    assert (report["input_axes"], report["output_axes"]) == ("i j k", "i j k c")
    assert report["voxel_size"] == list(PIXDIM)
    assert report["output_voxel_size"] == [v / 2 for v in PIXDIM]
    report = json.loads(
        run_cli(
            "inspect", "--spec", str(spec), "--input", str(tmp_path / "in.npy"), "--json"
        ).output
    )["plan"]
    assert (report["input_axes"], report["output_axes"]) == ("z y x", "z y x c")
