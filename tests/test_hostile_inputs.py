"""Hostile input files are refused before they cost anything: exit 2, a short message, no output.

Each hostile file is built here: HDF5 files whose data lives in other files,
zip and npz bombs, a YAML alias bomb, corrupted gzip streams and headers whose
sizes wrap around.
"""

from __future__ import annotations

import gzip
import io
import json
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conv3dt_cli.main import main
from numpy.lib import format as npformat

from conv3dt import Conv3DTranspose
from conv3dt.keras_file import load_keras_layer
from conv3dt.spec import load_spec

KERNEL_SHAPE = (3, 3, 3, 2, 1)


def _run(*args: str) -> object:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _assert_refused(result: object, tmp_path: Path, output: Path, *needles: str) -> None:
    """Exit 2, one or two lines naming ``needles``, no traceback, nothing written."""
    text = result.output  # type: ignore[attr-defined]
    assert result.exit_code == 2, text  # type: ignore[attr-defined]
    assert "Traceback" not in text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, text
    for needle in needles:
        assert needle in text, (needle, text)
    assert not output.exists()
    assert not [p for p in tmp_path.rglob("*") if "conv3dt-tmp" in p.name]


def _layer() -> Conv3DTranspose:
    return Conv3DTranspose(2, 3, strides=2, padding="same")


def _spec(tmp_path: Path, weights: dict[str, str] | None = None) -> Path:
    document: dict[str, object] = {
        "layer": json.loads(json.dumps(_layer().get_config())),
        "seed": 0,
    }
    if weights is not None:
        document["weights"] = weights
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _volume(tmp_path: Path) -> Path:
    path = tmp_path / "v.npy"
    np.save(path, np.ones((4, 4, 4), dtype=np.float32))
    return path


# -- 1. HDF5 data outside the file -----------------------------------------------


def _secret(tmp_path: Path, nbytes: int) -> Path:
    """Another file, as an attacker's dataset would point at (``/etc/passwd``, say)."""
    path = tmp_path / "secret.bin"
    path.write_bytes(np.arange(nbytes // 4, dtype=np.float32).tobytes())
    return path


def _outside(tmp_path: Path, kind: str, name: str, shape: tuple[int, ...]) -> tuple[Path, str]:
    """An HDF5 file whose dataset ``name`` reads another file; returns it and that file."""
    nbytes = 4 * int(np.prod(shape))
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle["data"] = np.arange(nbytes // 4, dtype=np.float32).reshape(shape)
    path = tmp_path / "hostile.h5"
    with h5py.File(path, "w") as handle:
        if kind == "external":
            secret = _secret(tmp_path, nbytes)
            handle.create_dataset(
                name, shape=shape, dtype="<f4", external=[(str(secret), 0, h5py.h5f.UNLIMITED)]
            )
            return path, str(secret)
        if kind == "external_link":
            handle[name] = h5py.ExternalLink(str(other), "/data")
        elif kind == "soft_link":
            handle["through"] = h5py.ExternalLink(str(other), "/data")
            handle[name] = h5py.SoftLink("/through")
        else:
            layout = h5py.VirtualLayout(shape=shape, dtype="<f4")
            layout[...] = h5py.VirtualSource(str(other), "/data", shape=shape)
            handle.create_virtual_dataset(name, layout, fillvalue=0)
    return path, str(other)


OUTSIDE = ["external", "external_link", "soft_link", "virtual"]


@pytest.mark.parametrize("kind", OUTSIDE)
def test_hdf5_volume_reading_another_file_is_refused(tmp_path: Path, kind: str) -> None:
    path, target = _outside(tmp_path, kind, "volume", (4, 4, 4))
    out = tmp_path / "o.npy"
    result = _run("upsample", f"{path}:/volume", "--spec", str(_spec(tmp_path)), "-o", str(out))
    _assert_refused(result, tmp_path, out, "hostile.h5", "/volume", target)


@pytest.mark.parametrize("kind", OUTSIDE)
def test_hdf5_weights_reading_another_file_are_refused(tmp_path: Path, kind: str) -> None:
    path, target = _outside(tmp_path, kind, "kernel", KERNEL_SHAPE)
    spec = _spec(tmp_path, {"kernel": f"{path.name}:/kernel"})
    out = tmp_path / "o.npy"
    result = _run("upsample", str(_volume(tmp_path)), "--spec", str(spec), "-o", str(out))
    _assert_refused(result, tmp_path, out, "weights.kernel", "/kernel", target)


def test_soft_link_inside_the_file_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "linked.h5"
    volume = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    with h5py.File(path, "w") as handle:
        handle["group/volume"] = volume
        handle["alias"] = h5py.SoftLink("/group/volume")
    out = tmp_path / "o.npy"
    result = _run("upsample", f"{path}:/alias", "--spec", str(_spec(tmp_path)), "-o", str(out))
    assert result.exit_code == 0, result.output
    direct = tmp_path / "direct.npy"
    spec = str(tmp_path / "spec.yaml")
    assert (
        _run("upsample", f"{path}:/group/volume", "--spec", spec, "-o", str(direct)).exit_code == 0
    )
    np.testing.assert_array_equal(np.load(out), np.load(direct))


# -- 2. Bombs: sizes are checked from headers before anything is read ------------

FIXTURES = Path(__file__).parent / "fixtures" / "keras"
BOMB_BYTES = 100 << 20  # inflates to 100 MiB; about 100 KiB on disk


def _write_zeros(archive: zipfile.ZipFile, name: str, head: bytes, nbytes: int) -> None:
    """A deflated member of ``head`` then zeros up to ``nbytes``, written in pieces."""
    piece = bytes(1 << 20)
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w", force_zip64=True) as member:
        member.write(head)
        left = nbytes - len(head)
        while left > 0:
            member.write(piece[: min(left, len(piece))])
            left -= len(piece)


def _keras_bomb(tmp_path: Path) -> Path:
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(FIXTURES / "sequential.keras") as source:
        config = source.read("config.json")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", config)
        _write_zeros(archive, "model.weights.h5", b"\x89HDF\r\n\x1a\n", BOMB_BYTES)
    return path


def _peak_traced(function: Callable[[], object]) -> int:
    """Most bytes Python and NumPy held at once while ``function`` ran (it must raise)."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_keras_weights_member_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    bomb = _keras_bomb(tmp_path)
    assert bomb.stat().st_size < BOMB_BYTES // 100
    assert _peak_traced(lambda: load_keras_layer(bomb)) < BOMB_BYTES // 10
    out = tmp_path / "o.npy"
    result = _run("upsample", str(_volume(tmp_path)), "--keras-model", str(bomb), "-o", str(out))
    _assert_refused(result, tmp_path, out, "bomb.keras", "model.weights.h5", str(BOMB_BYTES))


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    npformat.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def test_npz_member_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    # A kernel of the layer's shape for 2**20 input channels, all zeros.
    shape = (*KERNEL_SHAPE[:4], BOMB_BYTES // (4 * 54))
    path = tmp_path / "weights.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        head = _npy_header(shape)
        _write_zeros(archive, "kernel.npy", head, len(head) + 4 * int(np.prod(shape)))
    spec = _spec(tmp_path, {"kernel": "weights.npz:kernel"})
    assert _peak_traced(lambda: load_spec(spec)) < BOMB_BYTES // 10
    out = tmp_path / "o.npy"
    result = _run("upsample", str(_volume(tmp_path)), "--spec", str(spec), "-o", str(out))
    _assert_refused(result, tmp_path, out, "weights.kernel", "weights.npz", "kernel.npy")


def test_hdf5_weights_declaring_far_more_than_they_store_are_refused(tmp_path: Path) -> None:
    # Chunks never written read as the fill value: 100 MiB from a file of a few KiB.
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as handle:
        shape = (*KERNEL_SHAPE[:4], BOMB_BYTES // (4 * 54))
        handle.create_dataset("kernel", shape=shape, dtype="<f4", chunks=True, compression="gzip")
    spec = _spec(tmp_path, {"kernel": "weights.h5:/kernel"})
    assert _peak_traced(lambda: load_spec(spec)) < BOMB_BYTES // 10
    out = tmp_path / "o.npy"
    result = _run("upsample", str(_volume(tmp_path)), "--spec", str(spec), "-o", str(out))
    _assert_refused(result, tmp_path, out, "weights.kernel", "/kernel", "stores far fewer")


def test_npz_header_larger_than_its_member_is_refused(tmp_path: Path) -> None:
    shape = (*KERNEL_SHAPE[:4], 1 << 24)  # 217 MB declared in a member of a few bytes
    path = tmp_path / "weights.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("kernel.npy", _npy_header(shape) + bytes(64))
    spec = _spec(tmp_path, {"kernel": "weights.npz:kernel"})
    out = tmp_path / "o.npy"
    result = _run("upsample", str(_volume(tmp_path)), "--spec", str(spec), "-o", str(out))
    _assert_refused(result, tmp_path, out, "weights.kernel", "weights.npz", str(shape))


def _alias_bomb(levels: int) -> str:
    """``kernel_size`` as nested aliases: 9**levels strings from a few hundred bytes."""
    anchors = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    for level in range(1, levels):
        anchors.append(f"&a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "layer:\n  filters: 2\n  kernel_size: [" + ", ".join(anchors) + "]\n"


def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "bomb.yaml"
    spec.write_text(_alias_bomb(6))  # 531441 strings; echoed whole, 4 MB of message
    assert len(spec.read_bytes()) < 500
    out = tmp_path / "o.npy"
    result = _run("upsample", str(_volume(tmp_path)), "--spec", str(spec), "-o", str(out))
    _assert_refused(result, tmp_path, out, "bomb.yaml", "aliases")
    assert len(result.output) < 300


def test_yaml_aliases_within_the_budget_still_load(tmp_path: Path) -> None:
    spec = tmp_path / "aliases.yaml"
    spec.write_text("layer:\n  filters: 2\n  kernel_size: &k 3\n  strides: *k\n")
    layer = load_spec(spec).layer
    assert layer.kernel_size == (3, 3, 3) and layer.strides == (3, 3, 3)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("padding", "s" * 100_000, "padding"),
        ("kernel_size", [[1] * 1000] * 1000, "kernel_size"),
        ("filters", "9" * 100_000, "filters"),
        ("trainable", "t" * 100_000, "trainable"),
        ("dtype", "d" * 100_000, "dtype"),
        ("bias_initializer", {"class_name": "b" * 100_000, "config": {}}, "initializer"),
    ],
)
def test_long_values_are_echoed_as_short_excerpts(
    tmp_path: Path, field: str, value: object, needle: str
) -> None:
    config = json.loads(json.dumps(_layer().get_config()))
    config[field] = value
    spec = tmp_path / "long.json"
    spec.write_text(json.dumps({"layer": config}))
    out = tmp_path / "o.npy"
    result = _run("upsample", str(_volume(tmp_path)), "--spec", str(spec), "-o", str(out))
    _assert_refused(result, tmp_path, out, "long.json", needle)
    # The value is 100,000 characters; the message stays near its fixed text.
    assert len(result.output) < 1000


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{index:>100000}", "255"),
        ("{index:.100000f}", "255"),
        ("{stem.__class__}", "unknown field"),
        ("{stem[0]}", "unknown field"),
        ("{stem:{index}}", "{stem}"),
        ("x" * 300 + "{ext}", "255 bytes"),
    ],
)
def test_name_templates_are_checked_before_formatting(
    tmp_path: Path, template: str, needle: str
) -> None:
    out_dir = tmp_path / "out"
    result = _run(
        "upsample",
        str(_volume(tmp_path)),
        "--spec",
        str(_spec(tmp_path)),
        "--output-dir",
        str(out_dir),
        "--name",
        template,
    )
    assert result.exit_code == 2, result.output
    assert "--name" in result.output and needle in result.output, result.output
    assert len(result.output) < 300
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_long_layer_names_of_a_model_are_listed_as_excerpts(tmp_path: Path) -> None:
    path = tmp_path / "long_names.keras"
    with zipfile.ZipFile(FIXTURES / "sequential.keras") as source:
        members = {name: source.read(name) for name in source.namelist()}
    config = json.loads(members["config.json"])
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "Conv3DTranspose":
            layer["config"]["name"] = "n" * 100_000
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    out = tmp_path / "o.npy"
    args = ["upsample", str(_volume(tmp_path)), "--keras-model", str(path), "-o", str(out)]
    result = _run(*args, "--layer", "m" * 100_000)
    _assert_refused(result, tmp_path, out, "long_names.keras", "no layer named")
    assert len(result.output) < 1000


# -- 3. Damaged .nii.gz streams ---------------------------------------------------


def _nifti_bytes(volume: np.ndarray) -> bytes:
    image = nib.Nifti1Image(volume, np.eye(4))
    return image.to_bytes()


def _random_volume() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((24, 24, 24)).astype(np.float32)


def _zeroed_middle() -> bytes:
    data = bytearray(gzip.compress(_nifti_bytes(_random_volume())))
    middle = len(data) // 2
    data[middle : middle + 50] = bytes(50)
    return bytes(data)


def _flipped_trailer(offset: int) -> bytes:
    # The stream goes on past the image's data, where reads of the data never reach.
    data = bytearray(gzip.compress(_nifti_bytes(_random_volume()) + bytes(1 << 16)))
    data[offset] ^= 0xFF
    return bytes(data)


def _damaged_second_member() -> bytes:
    second = bytearray(gzip.compress(b"more bytes after the image"))
    second[-8] ^= 0xFF  # its CRC32
    return gzip.compress(_nifti_bytes(_random_volume())) + bytes(second)


@pytest.mark.parametrize(
    "damaged",
    [
        pytest.param(_zeroed_middle, id="zeroed-middle"),
        pytest.param(lambda: _flipped_trailer(-8), id="crc32"),
        pytest.param(lambda: _flipped_trailer(-4), id="isize"),
        pytest.param(_damaged_second_member, id="second-member-crc32"),
    ],
)
@pytest.mark.parametrize("tiles", [None, "8,8,8"])
def test_damaged_gzip_stream_is_refused(
    tmp_path: Path, damaged: Callable[[], bytes], tiles: str | None
) -> None:
    path = tmp_path / "damaged.nii.gz"
    path.write_bytes(damaged())
    out = tmp_path / "o.nii"
    args = ["upsample", str(path), "--spec", str(_spec(tmp_path)), "-o", str(out)]
    result = _run(*args, *(["--tile-shape", tiles] if tiles else []))
    _assert_refused(result, tmp_path, out, "damaged.nii.gz", "gzip")


def test_intact_gzip_with_trailing_zeros_and_members_is_read(tmp_path: Path) -> None:
    volume = _random_volume()
    plain = tmp_path / "plain.nii"
    plain.write_bytes(_nifti_bytes(volume))
    path = tmp_path / "members.nii.gz"
    raw = _nifti_bytes(volume)
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + bytes(16))
    spec = str(_spec(tmp_path))
    for source, out in ((plain, "a.npy"), (path, "b.npy")):
        result = _run("upsample", str(source), "--spec", spec, "-o", str(tmp_path / out))
        assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


# -- 4. Header arithmetic ---------------------------------------------------------

WRAPPING = (1 << 21, 1 << 21, 1 << 22)  # 2**64 voxels: an int64 product wraps to 0


def test_npy_header_whose_size_wraps_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.npy"
    path.write_bytes(_npy_header(WRAPPING) + bytes(64))
    out = tmp_path / "o.npy"
    result = _run("upsample", str(path), "--spec", str(_spec(tmp_path)), "-o", str(out))
    _assert_refused(result, tmp_path, out, "wrapped.npy", "shape", str(WRAPPING))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti2_dims_whose_size_wraps_are_refused(tmp_path: Path, suffix: str) -> None:
    header = nib.Nifti2Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(WRAPPING)
    header.set_data_offset(0)
    buffer = io.BytesIO()
    header.write_to(buffer)
    data = buffer.getvalue()
    data += bytes(int(header.get_data_offset()) - len(data)) + bytes(64)
    path = tmp_path / f"wrapped{suffix}"
    path.write_bytes(gzip.compress(data) if suffix == ".nii.gz" else data)
    out = tmp_path / "o.npy"
    result = _run("upsample", str(path), "--spec", str(_spec(tmp_path)), "-o", str(out))
    _assert_refused(result, tmp_path, out, path.name, "dim", str(WRAPPING))


@pytest.mark.parametrize(
    ("layer", "field"),
    [
        ("{filters: 2, kernel_size: 100000}", "kernel_size"),
        ("{filters: 100000000000000000000000000, kernel_size: 3}", "filters"),
    ],
)
def test_kernels_that_cannot_exist_name_the_field(tmp_path: Path, layer: str, field: str) -> None:
    spec = tmp_path / "huge.yaml"
    spec.write_text(f"layer: {layer}\n")
    out = tmp_path / "o.npy"
    result = _run("upsample", str(_volume(tmp_path)), "--spec", str(spec), "-o", str(out))
    _assert_refused(result, tmp_path, out, "huge.yaml", field)
    assert "memory-limit" not in result.output
