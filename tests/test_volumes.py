"""Volume I/O common to every format: round trips of random boxes, atomic commit,
failures while writing, corrupt inputs, format detection and ``describe``.
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import os
import re
import sys
import zlib

import h5py
import nibabel as nib
import numpy as np
import pytest

from conv3dt.volumes import (
    VolumeError,
    VolumeMetadata,
    VolumeWriteError,
    create_volume,
    describe,
    detect_format,
    open_volume,
)
from conv3dt.volumes import base as volumes_base

NAMES = {"npy": "vol.npy", "hdf5": "vol.h5", "nifti": "vol.nii", "nifti-gz": "vol.nii.gz"}


def random_tiling(rng: np.random.Generator, shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Boxes that cover ``shape`` exactly once, with random cut points, in random order."""
    cuts = []
    for length in shape:
        inner = rng.choice(np.arange(1, length), size=min(2, length - 1), replace=False)
        points = [0, *sorted(int(p) for p in inner), length]
        cuts.append([slice(a, b) for a, b in itertools.pairwise(points)])
    boxes = list(itertools.product(*cuts))
    rng.shuffle(boxes)
    return boxes


def random_box(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[slice, ...]:
    box = []
    for length in shape:
        start = int(rng.integers(0, length))
        box.append(slice(start, int(rng.integers(start + 1, length + 1))))
    return tuple(box)


def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("kind", list(NAMES))
@pytest.mark.parametrize("shape", [(5, 7, 6), (4, 5, 3, 2)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_of_random_boxes(tmp_path, kind, shape, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((kind, shape, dtype)).encode()))
    data = rng.standard_normal(shape).astype(dtype)
    path = str(tmp_path / NAMES[kind])
    with create_volume(path, shape, dtype) as writer:
        for box in random_tiling(rng, shape):
            writer.write(box, data[box])
    assert files_in(tmp_path) == [NAMES[kind]]
    with open_volume(path) as reader:
        assert reader.shape == shape
        assert reader.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(reader.read(), data)
        for _ in range(10):
            box = random_box(rng, shape)
            got = reader.read(box)
            assert got.flags.c_contiguous
            np.testing.assert_array_equal(got, data[box])


@pytest.mark.parametrize("kind", ["npy", "hdf5"])
def test_float16_round_trip(tmp_path, kind):
    data = np.linspace(-2, 2, 60, dtype=np.float16).reshape(3, 4, 5)
    path = str(tmp_path / NAMES[kind])
    with create_volume(path, data.shape, np.float16) as writer:
        writer.write((slice(0, 1),), data[:1])
        writer.write((slice(1, 3),), data[1:])
    with open_volume(path) as reader:
        assert reader.dtype == np.float16
        np.testing.assert_array_equal(reader.read(), data)


def test_float32_input_is_cast_to_the_output_dtype(tmp_path):
    data = np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7
    path = str(tmp_path / "out.npy")
    with create_volume(path, data.shape, "float32") as writer:
        writer.write(None, data)
    np.testing.assert_array_equal(np.load(path), data.astype(np.float32))


def test_box_arguments_are_checked(tmp_path):
    path = str(tmp_path / "a.npy")
    np.save(path, np.zeros((3, 4, 5), np.float32))
    with open_volume(path) as reader:
        with pytest.raises(ValueError, match="box"):
            reader.read((slice(0, 4),))
        with pytest.raises(ValueError, match="step"):
            reader.read((slice(0, 3, 2),))
        with pytest.raises(ValueError, match="box"):
            reader.read((slice(0, 1),) * 4)
        assert reader.read((slice(1, 1),)).shape == (0, 4, 5)
    with create_volume(str(tmp_path / "b.npy"), (3, 4, 5), "float32") as writer:
        with pytest.raises(ValueError, match="array"):
            writer.write((slice(0, 2),), np.zeros((3, 4, 5)))


# -- .npy specifics ---------------------------------------------------------


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_npy_any_order_and_endianness_reads_native(tmp_path, order, byteorder):
    rng = np.random.default_rng(7)
    data = rng.standard_normal((6, 5, 4)).astype(byteorder + "f4")
    path = str(tmp_path / "a.npy")
    np.save(path, np.asarray(data, order=order))
    with open_volume(path) as reader:
        assert reader.dtype == np.dtype("float32")
        assert reader.dtype.isnative
        for _ in range(10):
            box = random_box(rng, data.shape)
            got = reader.read(box)
            assert got.dtype.isnative
            np.testing.assert_array_equal(got, data[box])


@pytest.mark.parametrize("slack", [0, 1 << 30])
@pytest.mark.parametrize("preadv", [True, False])
def test_npy_reads_runs_or_whole_spans_alike(tmp_path, monkeypatch, slack, preadv):
    monkeypatch.setattr(volumes_base, "COALESCE_SLACK_BYTES", slack)
    if not preadv:
        monkeypatch.delattr(os, "preadv", raising=False)
    rng = np.random.default_rng(3)
    data = rng.standard_normal((9, 8, 7, 2)).astype(np.float32)
    path = str(tmp_path / "a.npy")
    np.save(path, data)
    with open_volume(path) as reader:
        for _ in range(20):
            box = random_box(rng, data.shape)
            np.testing.assert_array_equal(reader.read(box), data[box])


def test_npy_refuses_pickled_objects(tmp_path):
    path = str(tmp_path / "objects.npy")
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(VolumeError, match=r"objects.npy.*unpickl"):
        open_volume(path)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "not a valid .npy"),
        (b"PK\x03\x04 this is a zip", "not a valid .npy"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4', 'fo", "not a valid .npy"),
    ],
)
def test_npy_corrupt_header(tmp_path, content, reason):
    path = tmp_path / "bad.npy"
    path.write_bytes(content)
    with pytest.raises(VolumeError, match=f"bad.npy.*{reason}"):
        open_volume(str(path))


def test_npy_truncated_data(tmp_path):
    path = tmp_path / "short.npy"
    np.save(path, np.zeros((4, 4, 4), np.float32))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(VolumeError, match=r"short.npy.*truncated"):
        open_volume(str(path))


def test_npy_stream_in_and_out(monkeypatch):
    data = np.arange(60, dtype=">f8").reshape(3, 4, 5)
    stdin_bytes = io.BytesIO()
    np.save(stdin_bytes, data)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin_bytes.getvalue())))
    with open_volume("-") as reader:
        assert (reader.format, reader.shape, reader.dtype) == ("npy", (3, 4, 5), np.float64)
        np.testing.assert_array_equal(reader.read((slice(1, 3), slice(0, 2))), data[1:3, 0:2])
        reader.read()[...] = 0
        np.testing.assert_array_equal(reader.read(), data)
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    expected = io.BytesIO()
    np.save(expected, data.astype(np.float32))
    with create_volume("-", (3, 4, 5), "float32") as writer:
        writer.write((slice(0, 2),), data[:2])
        # Boxes in C order go out as they come, after the header.
        assert out.getvalue() == expected.getvalue()[: -4 * 20]
        writer.write((slice(2, 3),), data[2:])
    result = np.load(io.BytesIO(out.getvalue()))
    np.testing.assert_array_equal(result, data.astype(np.float32))


def test_npy_stream_garbage_on_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"not an array")))
    with pytest.raises(VolumeError, match="<stdin>"):
        open_volume("-")


# -- HDF5 specifics -----------------------------------------------------------


@pytest.fixture
def two_datasets(tmp_path):
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as f:
        f["/raw"] = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        f["/group/mask"] = np.ones((2, 2, 2), np.uint8)
        f.create_group("empty")
    return path


def test_hdf5_dataset_selection(two_datasets):
    with open_volume(f"{two_datasets}:/group/mask") as reader:
        assert (reader.shape, reader.dtype) == ((2, 2, 2), np.uint8)
        assert reader.metadata.dataset == "/group/mask"
    with open_volume(f"{two_datasets}:raw") as reader:
        assert reader.shape == (2, 3, 4)
        np.testing.assert_array_equal(
            reader.read((slice(1, 2),)), np.arange(12, 24).reshape(1, 3, 4)
        )


def test_hdf5_several_datasets_and_none_named_lists_them(two_datasets):
    with pytest.raises(VolumeError, match=r"2 datasets.*/group/mask.*/raw|/raw.*/group/mask"):
        open_volume(str(two_datasets))
    with pytest.raises(VolumeError, match=r"no dataset /nope.*/raw"):
        open_volume(f"{two_datasets}:/nope")
    with pytest.raises(VolumeError, match="no dataset /empty"):
        open_volume(f"{two_datasets}:/empty")


def test_hdf5_only_dataset_is_taken(tmp_path):
    path = tmp_path / "one.hdf5"
    data = np.arange(8, dtype=">f4").reshape(2, 2, 2)
    with h5py.File(path, "w") as f:
        f.create_dataset("deep/inside/x", data=data)
        f["deep/inside/x"].attrs["affine"] = np.diag([0.5, 0.5, 2.0, 1.0])
    with open_volume(str(path)) as reader:
        assert reader.metadata.dataset == "/deep/inside/x"
        assert reader.metadata.voxel_size == (0.5, 0.5, 2.0)
        got = reader.read()
        assert got.dtype == np.dtype("=f4")
        np.testing.assert_array_equal(got, data)


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
def test_hdf5_writer_attrs_chunks_compression(tmp_path, compression):
    source = VolumeMetadata(attrs={"units": "HU", "affine": np.eye(4)})
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    target = str(tmp_path / "out.h5")
    config = {"filters": 1, "strides": [2, 2, 2]}
    data = np.random.default_rng(0).standard_normal((8, 6, 4)).astype(np.float32)
    with create_volume(
        f"{target}:/result/up",
        data.shape,
        "float32",
        template=source,
        affine=affine,
        attrs={"conv3dt_layer": json.dumps(config), "nested": config, "source": "in.h5"},
        compression=compression,
        chunks=(4, 3, 4),
    ) as writer:
        writer.write(None, data)
    with h5py.File(target, "r") as f:
        ds = f["/result/up"]
        assert ds.chunks == (4, 3, 4)
        assert ds.compression == compression
        assert ds.attrs["units"] == "HU"
        assert json.loads(ds.attrs["conv3dt_layer"]) == config
        assert json.loads(ds.attrs["nested"]) == config
        np.testing.assert_array_equal(ds.attrs["affine"], affine)
        np.testing.assert_array_equal(ds[...], data)
    with open_volume(target) as reader:
        np.testing.assert_array_equal(reader.metadata.affine, affine)


def test_hdf5_bad_chunks_and_compression(tmp_path):
    with pytest.raises(ValueError, match="compression='zstd'"):
        create_volume(str(tmp_path / "a.h5"), (4, 4, 4), "float32", compression="zstd")
    with pytest.raises(ValueError, match="chunks=\\(8, 8, 8, 8\\)"):
        create_volume(str(tmp_path / "a.h5"), (4, 4, 4), "float32", chunks=(8, 8, 8, 8))
    assert files_in(tmp_path) == []


# -- atomic commit ------------------------------------------------------------


@pytest.mark.parametrize("kind", list(NAMES))
def test_target_appears_only_at_commit(tmp_path, kind):
    target = tmp_path / NAMES[kind]
    writer = create_volume(str(target), (3, 4, 5), "float32")
    (tmp_name,) = files_in(tmp_path)
    assert tmp_name.startswith(f".{target.name}.conv3dt-tmp-")
    writer.write((slice(0, 3),), np.ones((3, 4, 5)))
    assert not target.exists()
    writer.commit()
    assert files_in(tmp_path) == [target.name]
    with pytest.raises(VolumeError, match="already committed"):
        writer.write(None, np.ones((3, 4, 5)))


@pytest.mark.parametrize("kind", list(NAMES))
def test_abort_and_exception_leave_the_old_target(tmp_path, kind):
    target = tmp_path / NAMES[kind]
    target.write_bytes(b"previous")
    writer = create_volume(str(target), (2, 2, 2), "float32")
    writer.write(None, np.ones((2, 2, 2)))
    writer.abort()
    assert files_in(tmp_path) == [target.name]
    with pytest.raises(RuntimeError, match="boom"):
        with create_volume(str(target), (2, 2, 2), "float32") as writer:
            writer.write((slice(0, 1),), np.ones((1, 2, 2)))
            raise RuntimeError("boom")
    assert files_in(tmp_path) == [target.name]
    assert target.read_bytes() == b"previous"


def test_dropped_writer_removes_its_temporary_file(tmp_path):
    writer = create_volume(str(tmp_path / "x.npy"), (2, 2, 2), "float32")
    assert len(files_in(tmp_path)) == 1
    del writer
    assert files_in(tmp_path) == []


def test_committed_file_permissions_follow_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with create_volume(str(tmp_path / "x.npy"), (2, 2, 2), "float32") as writer:
            writer.write(None, np.zeros((2, 2, 2)))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "x.npy").st_mode & 0o777 == 0o640


def _enospc_after(calls: int):
    state = {"left": calls}
    real = os.pwrite

    def pwrite(fd, data, offset):
        if state["left"] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        state["left"] -= 1
        return real(fd, data, offset)

    return pwrite


@pytest.mark.parametrize("name", ["full.npy", "full.nii"])
def test_disk_full_mid_write_removes_everything(tmp_path, monkeypatch, name):
    target = tmp_path / name
    writer = create_volume(str(target), (4, 4, 4), "float32")
    writer.write((slice(0, 1),), np.ones((1, 4, 4)))
    monkeypatch.setattr(os, "pwrite", _enospc_after(1))
    with pytest.raises(VolumeWriteError, match=f"{name}.*no space left on device"):
        writer.write((slice(1, 4), slice(0, 2)), np.ones((3, 2, 4)))
    assert files_in(tmp_path) == []
    assert writer.closed


def test_disk_full_in_hdf5_write_removes_everything(tmp_path, monkeypatch):
    def full(self, key, value):
        raise OSError(errno.ENOSPC, "Can't write data (No space left on device)")

    writer = create_volume(str(tmp_path / "full.h5"), (4, 4, 4), "float32")
    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(VolumeWriteError, match=r"full.h5.*no space left on device"):
        writer.write(None, np.ones((4, 4, 4)))
    assert files_in(tmp_path) == []


def test_disk_full_while_compressing_nifti(tmp_path, monkeypatch):
    from conv3dt.volumes import gzip_codec

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    writer = create_volume(str(tmp_path / "full.nii.gz"), (4, 4, 4), "float32")
    monkeypatch.setattr(gzip_codec.GzipBlockWriter, "write", full)
    # .nii.gz is compressed plane by plane as tiles arrive: the failure may come
    # from the write or, for what is still buffered, from the commit.
    with pytest.raises(VolumeWriteError, match=r"full.nii.gz.*no space left on device"):
        writer.write(None, np.ones((4, 4, 4)))
        writer.commit()
    writer.abort()
    assert files_in(tmp_path) == []


def test_missing_and_unwritable_directories(tmp_path, monkeypatch):
    with pytest.raises(VolumeError, match=r"directory .*nowhere does not exist"):
        create_volume(str(tmp_path / "nowhere" / "x.npy"), (2, 2, 2), "float32")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if os.path.dirname(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(VolumeError, match=re.escape(f"directory {locked} is not writable")):
        create_volume(str(locked / "x.nii"), (2, 2, 2), "float32")


# -- formats, errors, describe ------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        ("a.npy", "npy"),
        ("dir.v2/A.NII", "nifti"),
        ("a.nii.gz", "nifti"),
        ("a.h5", "hdf5"),
        ("a.hdf5:/g/d", "hdf5"),
        ("-", "npy"),
    ],
)
def test_detect_format(path, expected):
    assert detect_format(path) == expected


def test_unknown_extension_and_format():
    with pytest.raises(VolumeError, match=r"scan\.mgz.*\.npy, \.nii, \.nii\.gz, \.h5, \.hdf5"):
        open_volume("scan.mgz")
    with pytest.raises(ValueError, match="format='mgz'"):
        open_volume("a.npy", format="mgz")


def test_explicit_format_overrides_the_extension(tmp_path):
    path = tmp_path / "volume.bin"
    np.save(path, np.ones((2, 3, 4), np.float32))
    (tmp_path / "volume.bin.npy").rename(path)
    with open_volume(str(path), format="npy") as reader:
        assert reader.shape == (2, 3, 4)


@pytest.mark.parametrize("name", ["gone.npy", "gone.h5", "gone.nii", "gone.nii.gz"])
def test_missing_file(tmp_path, name):
    with pytest.raises(VolumeError, match=f"{name}.*no such file|No such file"):
        open_volume(str(tmp_path / name))


@pytest.mark.parametrize("name", ["junk.h5", "junk.nii", "junk.nii.gz"])
def test_corrupt_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(VolumeError, match=name):
        open_volume(str(path))


def test_truncated_hdf5(tmp_path):
    path = tmp_path / "cut.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.ones((32, 32, 32), np.float32))
    path.write_bytes(path.read_bytes()[:2048])
    with pytest.raises(VolumeError, match=r"cut.h5"):
        with open_volume(str(path)) as reader:
            reader.read()


def test_writer_dtype_checks(tmp_path):
    for name in ("a.npy", "a.h5"):
        with pytest.raises(VolumeError, match="dtype=int16"):
            create_volume(str(tmp_path / name), (2, 2, 2), "int16")
    with pytest.raises(VolumeError, match="dtype=float16"):
        create_volume(str(tmp_path / "a.nii"), (2, 2, 2), "float16")
    with pytest.raises(ValueError, match="compression"):
        create_volume(str(tmp_path / "a.npy"), (2, 2, 2), "float32", compression="gzip")
    with pytest.raises(ValueError, match="shape"):
        create_volume(str(tmp_path / "a.npy"), (2, -1, 2), "float32")
    assert files_in(tmp_path) == []


def test_describe(tmp_path, two_datasets):
    with open_volume(f"{two_datasets}:/raw") as reader:
        info = describe(reader)
    assert info["datasets"] == ["/group/mask", "/raw"]
    assert (info["dataset"], info["shape"], info["dtype"]) == ("/raw", [2, 3, 4], "float32")
    affine = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -3], [0, 1.0, 0, 4], [0, 0, 0, 1]])
    header = nib.Nifti1Header()
    header.set_data_shape((2, 3, 4))
    header.set_data_dtype(np.int16)
    header.set_sform(affine, code=1)
    header.set_slope_inter(0.5, -1.0)
    buffer = io.BytesIO()
    header.write_to(buffer)
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    (tmp_path / "scaled.nii").write_bytes(buffer.getvalue() + raw.tobytes(order="F"))
    with open_volume(str(tmp_path / "scaled.nii")) as reader:
        info = describe(reader)
    json.dumps(info)
    assert info["axis_codes"] == ["A", "S", "L"]
    assert info["scaling"] == {"slope": 0.5, "inter": -1.0}
    assert info["stored_dtype"] == "int16"
    assert info["dtype"] == "float32"
    assert info["voxel_size"] == pytest.approx([1.5, 1.0, 2.0])
    np.testing.assert_allclose(info["affine"], affine)
