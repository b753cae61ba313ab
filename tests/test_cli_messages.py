"""``conv3dt``'s error and status messages: each names the input, field or option to change."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import _assert_clean_failure, _run, _spec

from conv3dt import Conv3DTranspose


@pytest.fixture()
def one_channel(tmp_path: Path) -> tuple[Path, Path]:
    """A spec with a kernel for one input channel, and a 3D .npy volume."""
    import numpy as np

    spec = _spec(tmp_path, Conv3DTranspose(1, 2, strides=2), 1)
    volume = tmp_path / "v.npy"
    np.save(volume, np.ones((4, 4, 4), np.float32))
    return spec, volume


def _spec_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ("layer: {filters: 1, kernel: 2}\n", "'kernel' (did you mean 'kernel_size'?)"),
        ("layer: {filters: 1, kernel_size: 2, stride: 2}\n", "'stride' (did you mean 'strides'?)"),
        ("layr: {filters: 1, kernel_size: 2}\n", "'layr' (did you mean 'layer'?)"),
        (
            "layer: {filters: 1, kernel_size: 2}\nweights: {kernal: kernel.npy}\n",
            "'kernal' (did you mean 'kernel'?)",
        ),
    ],
)
def test_unknown_spec_keys_get_a_suggestion(tmp_path, one_channel, text, suggestion):
    _, volume = one_channel
    spec = _spec_text(tmp_path, text)
    result = _run("upsample", str(volume), "--spec", str(spec), "-o", str(tmp_path / "o.npy"))
    _assert_clean_failure(result, 2, "typo.yaml", suggestion)
