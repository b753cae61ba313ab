"""Hostile input files are refused before they cost anything: exit 2, a short message, no output.

Each hostile file is built here: HDF5 files whose data lives in other files,
zip and npz bombs, a YAML alias bomb, corrupted gzip streams and headers whose
sizes wrap around.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conv3dt_cli.main import main

from conv3dt import Conv3DTranspose

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
