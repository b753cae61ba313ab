"""``--memory-limit`` below the smallest tile: a clear refusal naming a budget that works."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conv3dt_cli.main import main

from conv3dt import Conv3DTranspose
from conv3dt.plan import MemoryLimitError, parse_memory


def _run(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture()
def case(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    result = _run(
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
        "4",
        "-o",
        tmp_path / "up.yaml",
    )
    assert result.exit_code == 0, result.output
    layer = Conv3DTranspose(2, 3, strides=2, padding="same")
    kernel = np.load(tmp_path / "up_kernel.npy")
    layer.set_weights([kernel, np.load(tmp_path / "up_bias.npy")])
    volume = np.random.default_rng(3).standard_normal((12, 10, 8)).astype(np.float32)
    np.save(tmp_path / "in.npy", volume)
    return tmp_path / "up.yaml", tmp_path / "in.npy", layer(volume[None, ..., None])[0]


def _refusal(result: Any) -> int:
    """Check a refusal of --memory-limit 1K and return the budget it suggests."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 2, result.output
    assert lines[0].startswith("conv3dt: error: --memory-limit 1.0 KiB is too small")
    assert "2x2x2 output voxels" in lines[0]
    needed = int(re.search(r"\((\d+) bytes\)", lines[0]).group(1))
    suggested = re.fullmatch(r"\s*give --memory-limit (\S+) or more", lines[1])
    assert suggested is not None, lines[1]
    limit = parse_memory(suggested.group(1))
    assert needed <= limit < needed + 2**20
    return limit


def test_upsample_refuses_a_budget_below_the_smallest_tile_and_the_suggestion_works(
    tmp_path: Path, case: tuple[Path, Path, np.ndarray]
) -> None:
    spec, volume, expected = case
    out = tmp_path / "out.npy"
    args = ("upsample", volume, "--spec", spec, "-o", out, "-q")
    limit = _refusal(_run(*args, "--memory-limit", "1K"))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "conv3dt-tmp" in p.name]
    result = _run(*args, "--memory-limit", str(limit))
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(out), expected)


def test_inspect_refuses_the_same_budget(case: tuple[Path, Path, np.ndarray]) -> None:
    spec, volume, _ = case
    args = ("inspect", "--spec", spec, "--input", volume)
    limit = _refusal(_run(*args, "--memory-limit", "1K"))
    assert _run(*args, "--memory-limit", str(limit)).exit_code == 0


def test_the_library_error_names_the_argument_and_the_numbers(
    case: tuple[Path, Path, np.ndarray],
) -> None:
    from conv3dt.run import upsample_file
    from conv3dt.spec import load_spec

    spec, volume, _ = case
    with pytest.raises(MemoryLimitError, match=r"memory_limit=1024 \(1.0 KiB\)") as refused:
        upsample_file(
            load_spec(spec), str(volume), str(volume.with_name("o.npy")), memory_limit=1024
        )
    assert refused.value.min_tile_shape == (2, 2, 2)
