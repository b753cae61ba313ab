"""NIfTI specifics: byte order, NIfTI-2, scaling on read and on write, templates."""

from __future__ import annotations

import gzip
import io
import json

import nibabel as nib
import numpy as np
import pytest

from conv3dt.volumes import VolumeError, create_volume, open_volume
from conv3dt.volumes.nifti import int_scaling

ROTATED = np.array(
    [
        [0.0, 0.0, -2.5, 30.0],
        [1.2, 0.0, 0.0, -12.0],
        [0.0, 0.8, 0.0, 7.5],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def raw_nifti(path, raw: np.ndarray, header) -> None:
    """Write header and voxels by hand (first index fastest), independently of conv3dt."""
    header.set_data_shape(raw.shape)
    header.set_data_dtype(raw.dtype)
    buffer = io.BytesIO()
    header.write_to(buffer)
    content = buffer.getvalue() + raw.tobytes(order="F")
    if str(path).endswith(".gz"):
        content = gzip.compress(content)
    path.write_bytes(content)


def stored_voxels(path) -> tuple[np.ndarray, object]:
    """The raw stored array and header, read by hand from an uncompressed .nii."""
    content = path.read_bytes()
    sizes = (int.from_bytes(content[:4], "little"), int.from_bytes(content[:4], "big"))
    klass = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
    header = klass.from_fileobj(io.BytesIO(content))
    offset = int(header.get_data_offset())
    dtype = header.get_data_dtype()
    shape = header.get_data_shape()
    flat = np.frombuffer(content, dtype=dtype, offset=offset, count=int(np.prod(shape)))
    return flat.reshape(shape, order="F"), header


def random_boxes(rng, shape, count=8):
    for _ in range(count):
        box = []
        for length in shape:
            start = int(rng.integers(0, length))
            box.append(slice(start, int(rng.integers(start + 1, length + 1))))
        yield tuple(box)


@pytest.mark.parametrize("name", ["big.nii", "big.nii.gz"])
def test_big_endian_nifti(tmp_path, name):
    rng = np.random.default_rng(11)
    data = rng.standard_normal((6, 5, 4)).astype(">f4")
    header = nib.Nifti1Header(endianness=">")
    header.set_sform(ROTATED, code=1)
    raw_nifti(tmp_path / name, data, header)
    if not name.endswith(".gz"):
        assert (tmp_path / name).read_bytes()[:4] == (348).to_bytes(4, "big")
    with open_volume(str(tmp_path / name)) as reader:
        assert reader.dtype == np.float32
        np.testing.assert_allclose(reader.metadata.affine, ROTATED)
        for box in random_boxes(rng, data.shape):
            got = reader.read(box)
            assert got.dtype.isnative
            np.testing.assert_array_equal(got, data[box])


def test_big_endian_template_gives_a_native_output(tmp_path):
    data = np.arange(60, dtype=">i2").reshape(3, 4, 5)
    header = nib.Nifti1Header(endianness=">")
    header.set_qform(ROTATED, code=1)
    raw_nifti(tmp_path / "in.nii", data, header)
    with open_volume(str(tmp_path / "in.nii")) as reader:
        template = reader.metadata
        values = reader.read()
    with create_volume(str(tmp_path / "out.nii"), (3, 4, 5), "float32", template=template) as w:
        w.write(None, values)
    stored, out_header = stored_voxels(tmp_path / "out.nii")
    assert out_header.endianness == "<"
    np.testing.assert_array_equal(stored, data.astype(np.float32))


@pytest.mark.parametrize("name", ["two.nii", "two.nii.gz"])
def test_nifti2_read(tmp_path, name):
    rng = np.random.default_rng(5)
    data = rng.standard_normal((4, 6, 5, 2)).astype(np.float64)
    header = nib.Nifti2Header()
    header.set_sform(ROTATED, code=2)
    raw_nifti(tmp_path / name, data, header)
    with open_volume(str(tmp_path / name)) as reader:
        assert reader.shape == (4, 6, 5, 2)
        assert reader.dtype == np.float64
        assert isinstance(reader.metadata.nifti_header, nib.Nifti2Header)
        for box in random_boxes(rng, data.shape):
            np.testing.assert_array_equal(reader.read(box), data[box])


def test_nifti2_kept_from_template_and_chosen_for_long_axes(tmp_path):
    header = nib.Nifti2Header()
    header.set_sform(ROTATED, code=1)
    raw_nifti(tmp_path / "in.nii", np.zeros((2, 2, 2), np.float32), header)
    with open_volume(str(tmp_path / "in.nii")) as reader:
        template = reader.metadata
    with create_volume(str(tmp_path / "a.nii"), (3, 2, 2), "float32", template=template) as w:
        w.write(None, np.ones((3, 2, 2)))
    assert stored_voxels(tmp_path / "a.nii")[1]["sizeof_hdr"] == 540
    long_axis = np.linspace(0, 1, 40000, dtype=np.float32).reshape(40000, 1, 1)
    with create_volume(str(tmp_path / "b.nii"), long_axis.shape, "float32") as w:
        w.write((slice(0, 20000),), long_axis[:20000])
        w.write((slice(20000, 40000),), long_axis[20000:])
    stored, out_header = stored_voxels(tmp_path / "b.nii")
    assert out_header["sizeof_hdr"] == 540
    np.testing.assert_array_equal(stored, long_axis)


@pytest.mark.parametrize(
    "stored_dtype, slope, inter",
    [(np.int16, 0.25, -100.0), (np.uint8, 3.0, 0.5), (np.float64, 2.0, 1.0)],
)
def test_scaling_is_applied_on_read(tmp_path, stored_dtype, slope, inter):
    rng = np.random.default_rng(2)
    info = np.iinfo(stored_dtype) if np.dtype(stored_dtype).kind in "iu" else None
    if info is None:
        raw = rng.standard_normal((5, 4, 3))
    else:
        raw = rng.integers(info.min, info.max, size=(5, 4, 3), endpoint=True).astype(stored_dtype)
    header = nib.Nifti1Header()
    header.set_slope_inter(slope, inter)
    raw_nifti(tmp_path / "scaled.nii", raw, header)
    expected = raw.astype(np.float64) * slope + inter
    with open_volume(str(tmp_path / "scaled.nii")) as reader:
        assert reader.dtype == (np.float64 if stored_dtype is np.float64 else np.float32)
        assert reader.scaling == (slope, inter)
        for box in random_boxes(rng, raw.shape):
            np.testing.assert_allclose(reader.read(box), expected[box], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["int16", "uint8"])
@pytest.mark.parametrize("mode", ["value_range", "buffered", "gz-value_range", "gz-buffered"])
@pytest.mark.parametrize("lo, hi", [(-3.0, 5.0), (10.0, 11.5)])
def test_integer_output_round_trip_within_quantization(tmp_path, dtype, mode, lo, hi):
    rng = np.random.default_rng(4)
    data = rng.uniform(lo, hi, size=(6, 5, 4)).astype(np.float32)
    data[0, 0, 0], data[-1, -1, -1] = lo, hi
    name = "q.nii.gz" if mode.startswith("gz") else "q.nii"
    value_range = (lo, hi) if mode.endswith("value_range") else None
    path = str(tmp_path / name)
    with create_volume(path, data.shape, dtype, value_range=value_range) as writer:
        writer.write((slice(0, 2),), data[:2])
        writer.write((slice(2, 6), slice(0, 3)), data[2:, :3])
        writer.write((slice(2, 6), slice(3, 5)), data[2:, 3:])
    image = nib.load(path)
    assert image.get_data_dtype() == np.dtype(dtype)
    slope = float(image.dataobj.slope)
    info = np.iinfo(dtype)
    # The stored range is used well: at least half of it spans [lo, hi].
    assert (hi - lo) / slope >= (float(info.max) - float(info.min)) / 2 - 1
    with open_volume(path) as reader:
        assert reader.dtype == np.float32
        got = reader.read()
    np.testing.assert_allclose(got, data, rtol=0, atol=slope / 2 + 1e-6 * max(abs(lo), abs(hi)))


def test_int16_keeps_zero_exact_when_the_range_holds_it(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[1:3, 1:3, 1:3] = np.linspace(-7.3, 2.1, 8).reshape(2, 2, 2)
    path = tmp_path / "z.nii"
    with create_volume(str(path), data.shape, "int16") as writer:
        writer.write(None, data)
    with open_volume(str(path)) as reader:
        assert np.all(reader.read()[data == 0] == 0)


def test_int_scaling_maps_the_range_onto_the_type():
    for dtype, lo, hi in [
        ("int16", -5.0, 3.0),
        ("int16", 2.0, 9.0),
        ("uint8", 0.0, 1.0),
        ("uint8", -1.0, 4.0),
        ("uint8", 6.0, 6.0),
    ]:
        slope, inter = int_scaling(np.dtype(dtype), lo, hi)
        info = np.iinfo(dtype)
        stored = np.rint((np.array([lo, hi]) - inter) / slope)
        assert info.min <= stored.min() and stored.max() <= info.max
        np.testing.assert_allclose(stored * slope + inter, [lo, hi], atol=slope / 2)


def test_integer_output_refusals(tmp_path):
    path = str(tmp_path / "q.nii")
    writer = create_volume(path, (2, 2, 2), "int16", value_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="value_range"):
        writer.write(None, np.full((2, 2, 2), 2.0))
    with pytest.raises(ValueError, match="NaN"):
        writer.write(None, np.full((2, 2, 2), np.nan))
    writer.abort()
    with pytest.raises(ValueError, match="NaN"):
        with create_volume(path, (2, 2, 2), "uint8") as writer:
            writer.write(None, np.full((2, 2, 2), np.nan))
    with pytest.raises(ValueError, match="value_range"):
        create_volume(path, (2, 2, 2), "int16", value_range=(3.0, 1.0))
    assert list(tmp_path.iterdir()) == []


def test_template_header_fields_codes_and_affine(tmp_path):
    header = nib.Nifti1Header()
    header.set_qform(np.diag([3.0, 3.0, 3.0, 1.0]), code=2)
    header.set_sform(np.diag([3.0, 3.0, 3.0, 1.0]), code=4)
    header.set_xyzt_units("mm", "sec")
    header["descrip"] = b"source scan"
    header.set_slope_inter(2.0, 5.0)
    raw_nifti(tmp_path / "in.nii", np.arange(8, dtype=np.int16).reshape(2, 2, 2), header)
    with open_volume(str(tmp_path / "in.nii")) as reader:
        template = reader.metadata
    data = np.random.default_rng(0).standard_normal((4, 4, 4)).astype(np.float32)
    out = tmp_path / "out.nii"
    with create_volume(
        str(out), data.shape, "float32", template=template, affine=ROTATED, attrs={"k": [1, 2]}
    ) as writer:
        writer.write(None, data)
    stored, out_header = stored_voxels(out)
    np.testing.assert_array_equal(stored, data)
    assert (int(out_header["qform_code"]), int(out_header["sform_code"])) == (2, 4)
    assert out_header.get_xyzt_units() == ("mm", "sec")
    assert out_header["descrip"] == b"source scan"
    assert out_header.get_data_dtype() == np.float32
    np.testing.assert_allclose(out_header.get_sform(), ROTATED)
    np.testing.assert_allclose(out_header.get_qform(), ROTATED, atol=1e-6)
    image = nib.load(out)
    assert (float(image.dataobj.slope), float(image.dataobj.inter)) == (1.0, 0.0)
    (extension,) = image.header.extensions
    assert json.loads(extension.get_content()) == {"k": [1, 2]}


def test_affine_without_template_uses_scanner_codes(tmp_path):
    out = tmp_path / "out.nii.gz"
    with create_volume(str(out), (2, 3, 4), "float64", affine=ROTATED) as writer:
        writer.write(None, np.ones((2, 3, 4)))
    image = nib.load(out)
    assert (int(image.header["qform_code"]), int(image.header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(image.affine, ROTATED)
    assert image.get_data_dtype() == np.float64


def test_uncompressed_layout_on_disk(tmp_path):
    data = np.random.default_rng(9).standard_normal((3, 4, 5, 2)).astype(np.float32)
    path = tmp_path / "layout.nii"
    with create_volume(str(path), data.shape, "float32") as writer:
        writer.write((slice(0, 3), slice(0, 2)), data[:, :2])
        writer.write((slice(0, 3), slice(2, 4)), data[:, 2:])
    stored, header = stored_voxels(path)
    assert header.get_data_offset() % 16 == 0
    np.testing.assert_array_equal(stored, data)


def test_truncated_nifti_files(tmp_path):
    header = nib.Nifti1Header()
    raw_nifti(tmp_path / "whole.nii", np.ones((16, 16, 16), np.float32), header)
    content = (tmp_path / "whole.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(content[:-100])
    with pytest.raises(VolumeError, match=r"cut\.nii.*truncated"):
        open_volume(str(tmp_path / "cut.nii"))
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(content)[:-200])
    with pytest.raises(VolumeError, match=r"cut\.nii\.gz"):
        with open_volume(str(tmp_path / "cut.nii.gz")) as reader:
            reader.read()


@pytest.mark.parametrize("numba_loaded", [False, True])
@pytest.mark.parametrize("shape", [(7, 5, 9), (33, 2, 17), (4, 6, 3, 2), (70, 3, 5)])
def test_fortran_order_copies_values_in_file_order(monkeypatch, numba_loaded, shape) -> None:
    import sys

    from conv3dt.volumes.nifti import fortran_order

    if numba_loaded:
        import conv3dt.engine.numba_kernels  # noqa: F401
    else:
        monkeypatch.delitem(sys.modules, "conv3dt.engine.numba_kernels", raising=False)
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for view in (array, array[::-1, :, 1:]):
        got = fortran_order(view)
        assert got.flags.f_contiguous
        np.testing.assert_array_equal(got, view)
