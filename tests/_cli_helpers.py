"""Helpers the CLI tests share: a spec with saved weights, and one CLI call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner, Result
from conv3dt_cli.main import main

from conv3dt import Conv3DTranspose


def write_spec(tmp_path: Path, layer: Conv3DTranspose, in_channels: int, seed: int = 3) -> Path:
    """Draw weights for ``layer`` (set on it too), save them and a spec naming them."""
    rng = np.random.default_rng(seed)
    kernel = rng.uniform(-0.5, 0.5, layer.kernel_shape(in_channels)).astype(np.float32)
    bias = rng.uniform(-0.2, 0.2, layer.filters).astype(np.float32)
    np.save(tmp_path / "kernel.npy", kernel)
    np.save(tmp_path / "bias.npy", bias)
    layer.set_weights([kernel, bias])
    spec = {
        "layer": json.loads(json.dumps(layer.get_config())),
        "weights": {"kernel": "kernel.npy", "bias": "bias.npy"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_cli(*args: str) -> Result:
    """``conv3dt ARGS`` in this process; exceptions other than exits propagate."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)
