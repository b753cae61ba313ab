"""``conv3dt`` end to end: every format pair, metadata, batches and every documented error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import yaml
from _cli_helpers import run_cli, write_spec

from conv3dt import Conv3DTranspose

FORMATS = {"npy": ".npy", "nii": ".nii", "niigz": ".nii.gz", "h5": ".h5"}


def _affine() -> np.ndarray:
    angle = np.deg2rad(30)
    rotation = np.array(
        [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.3, 2.5])
    affine[:3, 3] = (10.0, -4.0, 7.5)
    return affine


def _write(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    name = path.name
    if name.endswith(".npy"):
        np.save(path, array)
    elif name.endswith(".h5"):
        with h5py.File(path, "w") as handle:
            handle.create_dataset("volume", data=array)
            handle["volume"].attrs["modality"] = "CT"
    else:
        image = nib.Nifti1Image(array, _affine() if affine is None else affine)
        nib.save(image, path)


def _read(path: Path) -> np.ndarray:
    name = path.name
    if name.endswith(".npy"):
        return np.load(path)
    if name.endswith(".h5"):
        with h5py.File(path, "r") as handle:
            datasets = []
            handle.visititems(
                lambda n, o: datasets.append(n) if isinstance(o, h5py.Dataset) else None
            )
            assert len(datasets) == 1
            return handle[datasets[0]][()]
    image = nib.load(path)
    if image.header.get_intent()[0] == "vector":
        # Several filters are stored as vector components in the 5th dimension.
        return np.asarray(image.dataobj)[:, :, :, 0]
    return np.asarray(image.dataobj)


@pytest.mark.parametrize("src", FORMATS)
@pytest.mark.parametrize("dst", FORMATS)
def test_every_format_pair_equals_the_library(tmp_path, src, dst):
    layer = Conv3DTranspose(3, 3, strides=2, padding="same", activation="relu")
    spec = write_spec(tmp_path, layer, 2)
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((6, 5, 4, 2)).astype(np.float32)
    source = tmp_path / f"in{FORMATS[src]}"
    target = tmp_path / f"out{FORMATS[dst]}"
    _write(source, volume)
    result = run_cli("upsample", str(source), "--spec", str(spec), "-o", str(target), "-q")
    assert result.exit_code == 0, result.output
    expected = layer(volume[None])[0]
    got = _read(target)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    leftovers = [p.name for p in tmp_path.iterdir() if "conv3dt-tmp" in p.name]
    assert leftovers == []


def test_channels_first_npy_and_3d_inputs(tmp_path):
    layer = Conv3DTranspose(2, 2, strides=2, data_format="channels_first")
    spec = write_spec(tmp_path, layer, 3)
    volume = np.random.default_rng(1).standard_normal((3, 4, 5, 6)).astype(np.float32)
    np.save(tmp_path / "cf.npy", volume)
    assert (
        run_cli(
            "upsample", str(tmp_path / "cf.npy"), "--spec", str(spec), "-o", str(tmp_path / "o.npy")
        ).exit_code
        == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), layer(volume[None])[0])

    single = Conv3DTranspose(1, 3, strides=1, padding="same")
    spec1 = write_spec(tmp_path, single, 1)
    vol3 = np.random.default_rng(2).standard_normal((5, 6, 7)).astype(np.float32)
    np.save(tmp_path / "v3.npy", vol3)
    assert (
        run_cli(
            "upsample",
            str(tmp_path / "v3.npy"),
            "--spec",
            str(spec1),
            "-o",
            str(tmp_path / "o3.npy"),
        ).exit_code
        == 0
    )
    out = np.load(tmp_path / "o3.npy")
    assert out.shape == (5, 6, 7)
    np.testing.assert_array_equal(out, single(vol3[None, ..., None])[0, ..., 0])


def test_batch_npy_5d(tmp_path):
    layer = Conv3DTranspose(2, 3, strides=(1, 2, 3), padding="valid")
    spec = write_spec(tmp_path, layer, 1)
    batch = np.random.default_rng(4).standard_normal((3, 4, 3, 2, 1)).astype(np.float32)
    np.save(tmp_path / "b.npy", batch)
    assert (
        run_cli(
            "upsample", str(tmp_path / "b.npy"), "--spec", str(spec), "-o", str(tmp_path / "o.npy")
        ).exit_code
        == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), layer(batch))


def _centroid_world(image: nib.Nifti1Image) -> np.ndarray:
    data = np.asarray(image.dataobj, dtype=np.float64)
    index = np.indices(data.shape).reshape(3, -1).T
    weights = data.reshape(-1)
    centre = (index * weights[:, None]).sum(0) / weights.sum()
    return image.affine @ np.append(centre, 1.0)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("output_padding", [None, "max"])
@pytest.mark.parametrize("kernel", [3, 4])
def test_world_alignment_of_a_bright_voxel(tmp_path, padding, stride, output_padding, kernel):
    op = None if output_padding is None else stride - 1
    layer = Conv3DTranspose(
        1, kernel, strides=stride, padding=padding, output_padding=op, use_bias=False
    )
    # A symmetric, positive kernel: its footprint's centroid is its centre.
    taps = np.hanning(kernel + 2)[1:-1]
    k = taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
    layer.set_weights([k[..., None, None].astype(np.float32)])
    kernel_path = tmp_path / "k.npy"
    np.save(kernel_path, layer.kernel)
    config = json.loads(json.dumps(layer.get_config()))
    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump({"layer": config, "weights": {"kernel": "k.npy"}})
    )
    volume = np.zeros((9, 8, 7), dtype=np.float32)
    volume[4, 3, 3] = 1.0
    nib.save(nib.Nifti1Image(volume, _affine()), tmp_path / "dot.nii")
    result = run_cli(
        "upsample",
        str(tmp_path / "dot.nii"),
        "--spec",
        str(tmp_path / "s.yaml"),
        "-o",
        str(tmp_path / "up.nii"),
    )
    assert result.exit_code == 0, result.output
    out = nib.load(tmp_path / "up.nii")
    expected = _affine() @ np.array([4.0, 3.0, 3.0, 1.0])
    np.testing.assert_allclose(_centroid_world(out), expected, atol=1e-6)
    np.testing.assert_allclose(
        out.header.get_zooms()[:3], np.array([0.8, 1.3, 2.5]) / stride, rtol=1e-6
    )
    np.testing.assert_allclose(out.get_qform(), out.get_sform(), atol=1e-5)


def test_json_and_skip_existing_and_overwrite(tmp_path):
    layer = Conv3DTranspose(1, 2, strides=2)
    spec = write_spec(tmp_path, layer, 1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        np.save(inputs / f"v{i}.npy", np.full((3, 3, 3), i, dtype=np.float32))
    out = tmp_path / "out"
    result = run_cli(
        "upsample", str(inputs), "--spec", str(spec), "--output-dir", str(out), "--json"
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [Path(line["output"]).name for line in lines] == ["v0_up.npy", "v1_up.npy", "v2_up.npy"]
    assert all(line["output_shape"] == [6, 6, 6] for line in lines)
    again = run_cli("upsample", str(inputs), "--spec", str(spec), "--output-dir", str(out))
    assert again.exit_code == 2 and "exists" in again.output
    skipped = run_cli(
        "upsample",
        str(inputs / "*.npy"),
        "--spec",
        str(spec),
        "--output-dir",
        str(out),
        "--skip-existing",
        "--json",
    )
    assert skipped.exit_code == 0 and skipped.output.strip() == ""
    assert (
        run_cli(
            "upsample", str(inputs), "--spec", str(spec), "--output-dir", str(out), "--overwrite"
        ).exit_code
        == 0
    )
    named = run_cli(
        "upsample",
        str(inputs / "v1.npy"),
        "--spec",
        str(spec),
        "--output-dir",
        str(out),
        "--name",
        "{stem}.x{ext}",
        "--output-format",
        "hdf5",
    )
    assert named.exit_code == 0 and (out / "v1.x.h5").exists()


def test_inspect_info_init(tmp_path):
    spec = tmp_path / "made.yaml"
    result = run_cli(
        "init",
        "--filters",
        "4",
        "--kernel-size",
        "3",
        "--strides",
        "2",
        "--padding",
        "same",
        "--activation",
        "relu",
        "--in-channels",
        "2",
        "--seed",
        "7",
        "-o",
        str(spec),
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "made_kernel.npy").exists()
    kernel = np.load(tmp_path / "made_kernel.npy")
    assert kernel.shape == (3, 3, 3, 4, 2)
    limit = np.sqrt(6 / ((4 + 2) * 27))
    assert np.abs(kernel).max() <= limit and kernel.std() > limit / 4
    again = run_cli(
        "init",
        "--filters",
        "4",
        "--kernel-size",
        "3",
        "--in-channels",
        "2",
        "--seed",
        "7",
        "-o",
        str(spec),
    )
    assert again.exit_code == 2
    np.save(tmp_path / "vol.npy", np.zeros((5, 6, 7, 2), dtype=np.float32))
    report = run_cli("inspect", "--spec", str(spec), "--input", str(tmp_path / "vol.npy"), "--json")
    assert report.exit_code == 0, report.output
    data = json.loads(report.output)
    assert data["plan"]["output_shape"] == [10, 12, 14, 4]
    assert data["plan"]["flops"] == 2 * 5 * 6 * 7 * 2 * 4 * 27
    assert data["weights"]["kernel"]["shape"] == [3, 3, 3, 4, 2]
    assert data["layer"]["activation"] == "relu"
    text = run_cli("inspect", "--spec", str(spec))
    assert text.exit_code == 0 and "kernel_size" in text.output
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), _affine()), tmp_path / "a.nii.gz")
    info = run_cli("info", str(tmp_path / "a.nii.gz"), "--json")
    assert info.exit_code == 0, info.output
    described = json.loads(info.output)
    assert described["shape"] == [4, 4, 4]


def _bad_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.fixture()
def good(tmp_path):
    layer = Conv3DTranspose(2, 3, strides=2, padding="same")
    spec = write_spec(tmp_path, layer, 1)
    np.save(tmp_path / "v.npy", np.ones((4, 4, 4), dtype=np.float32))
    return spec, tmp_path / "v.npy"


def _assert_clean_failure(result, code, *needles, tmp_path=None):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    if tmp_path is not None:
        assert not [p for p in tmp_path.rglob("*") if "conv3dt-tmp" in p.name]


def test_bad_inputs(tmp_path, good):
    spec, _volume = good
    out = str(tmp_path / "o.npy")
    _assert_clean_failure(
        run_cli("upsample", str(tmp_path / "missing.npy"), "--spec", str(spec), "-o", out),
        2,
        "missing.npy",
    )
    (tmp_path / "x.tif").write_bytes(b"II*\x00")
    _assert_clean_failure(
        run_cli("upsample", str(tmp_path / "x.tif"), "--spec", str(spec), "-o", out), 2, "x.tif"
    )
    np.save(tmp_path / "full.npy", np.ones((8, 8, 8), np.float32))
    data = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(data[: len(data) // 2])
    _assert_clean_failure(
        run_cli("upsample", str(tmp_path / "trunc.npy"), "--spec", str(spec), "-o", out),
        2,
        "trunc.npy",
        tmp_path=tmp_path,
    )
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "full.nii.gz")
    gz = (tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(gz[: len(gz) // 2])
    _assert_clean_failure(
        run_cli("upsample", str(tmp_path / "trunc.nii.gz"), "--spec", str(spec), "-o", out),
        2,
        "trunc.nii.gz",
        tmp_path=tmp_path,
    )
    (tmp_path / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    _assert_clean_failure(
        run_cli("upsample", str(tmp_path / "corrupt.h5"), "--spec", str(spec), "-o", out),
        2,
        "corrupt.h5",
    )
    np.save(tmp_path / "flat.npy", np.ones((4, 4), np.float32))
    _assert_clean_failure(
        run_cli("upsample", str(tmp_path / "flat.npy"), "--spec", str(spec), "-o", out), 2, "2D"
    )
    np.save(tmp_path / "six.npy", np.ones((1, 2, 2, 2, 2, 1), np.float32))
    _assert_clean_failure(
        run_cli("upsample", str(tmp_path / "six.npy"), "--spec", str(spec), "-o", out), 2, "6D"
    )
    np.save(tmp_path / "chan.npy", np.ones((4, 4, 4, 3), np.float32))
    _assert_clean_failure(
        run_cli("upsample", str(tmp_path / "chan.npy"), "--spec", str(spec), "-o", out),
        2,
        "input channel",
    )
    assert not Path(out).exists()


def test_bad_specs(tmp_path, good):
    _, volume = good
    out = str(tmp_path / "o.npy")
    np.save(tmp_path / "wrong.npy", np.zeros((2, 2, 2, 2, 1), np.float32))
    cases = [
        ("layer: {filters: 2, kernel_size: 3\n", "malformed YAML"),
        ("layer: {filters: 2, kernel_size: 3, activation: swoosh}\n", "swoosh"),
        ("layer: {filters: 2, kernel_size: 3, strides: 2, dilation_rate: 2}\n", "dilation_rate"),
        ("layer: {filters: 2, kernel_size: 3}\nweights: {kernel: wrong.npy}\n", "(3, 3, 3, 2"),
        ("layer: {filters: 0, kernel_size: 3}\n", "filters"),
        ("lyr: {}\n", "lyr"),
    ]
    for text, needle in cases:
        spec = _bad_spec(tmp_path, text)
        _assert_clean_failure(
            run_cli("upsample", str(volume), "--spec", str(spec), "-o", out), 2, "bad.yaml", needle
        )


def test_existing_output_and_unwritable_directory(tmp_path, good):
    spec, volume = good
    target = tmp_path / "exists.npy"
    target.write_bytes(b"keep me")
    _assert_clean_failure(
        run_cli("upsample", str(volume), "--spec", str(spec), "-o", str(target)), 2, "exists"
    )
    assert target.read_bytes() == b"keep me"
    # /proc refuses new files even to root, so this holds whoever runs the tests.
    _assert_clean_failure(
        run_cli("upsample", str(volume), "--spec", str(spec), "-o", "/proc/conv3dt-out.npy"),
        2,
        "/proc",
    )
    _assert_clean_failure(
        run_cli("upsample", str(volume), "--spec", str(spec), "-o", str(tmp_path / "no" / "o.npy")),
        2,
        "no",
    )
    same = run_cli("upsample", str(volume), "--spec", str(spec), "-o", str(volume), "--overwrite")
    _assert_clean_failure(same, 2, "input")


def test_disk_full_leaves_nothing(tmp_path, good, monkeypatch):
    import errno

    import conv3dt.volumes.npy as npy_module

    spec, volume = good
    real = os.pwrite

    def full(fd, data, offset):
        if offset + len(data) > 1024:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(npy_module.os, "pwrite", full)
    result = run_cli("upsample", str(volume), "--spec", str(spec), "-o", str(tmp_path / "o.npy"))
    _assert_clean_failure(result, 1, "space", tmp_path=tmp_path)
    assert not (tmp_path / "o.npy").exists()


def test_stdin_stdout_pipeline_and_module_entry(tmp_path, good):
    spec, volume = good
    data = volume.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "conv3dt", "upsample", "-", "--spec", str(spec), "-o", "-"],
        input=data,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    import io

    got = np.load(io.BytesIO(proc.stdout), allow_pickle=False)
    layer = Conv3DTranspose.from_config(yaml.safe_load(spec.read_text())["layer"])
    layer.set_weights([np.load(spec.parent / "kernel.npy"), np.load(spec.parent / "bias.npy")])
    np.testing.assert_array_equal(got, layer(np.load(volume)[None, ..., None])[0])
    version = subprocess.run(
        [sys.executable, "-m", "conv3dt", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("conv3dt ")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "conv3dt",
            "upsample",
            str(tmp_path / "nope.npy"),
            "--spec",
            str(spec),
            "-o",
            str(tmp_path / "o.npy"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nope.npy" in bad.stderr
    debug = subprocess.run(
        [
            sys.executable,
            "-m",
            "conv3dt",
            "upsample",
            str(tmp_path / "nope.npy"),
            "--spec",
            str(spec),
            "-o",
            str(tmp_path / "o.npy"),
            "--debug",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_keep_going_reports_failures(tmp_path, good):
    spec, _volume = good
    folder = tmp_path / "mixed"
    folder.mkdir()
    np.save(folder / "a.npy", np.ones((3, 3, 3), np.float32))
    np.save(folder / "b.npy", np.ones((3, 3), np.float32))
    np.save(folder / "c.npy", np.ones((3, 3, 3), np.float32))
    out = tmp_path / "out"
    stop = run_cli("upsample", str(folder), "--spec", str(spec), "--output-dir", str(out))
    assert stop.exit_code == 2
    assert (out / "a_up.npy").exists() and not (out / "c_up.npy").exists()
    going = run_cli(
        "upsample",
        str(folder),
        "--spec",
        str(spec),
        "--output-dir",
        str(out),
        "--keep-going",
        "--skip-existing",
    )
    assert going.exit_code == 1
    assert "1 of 2 input(s) failed" in going.output and "b.npy" in going.output
    assert (out / "c_up.npy").exists()
