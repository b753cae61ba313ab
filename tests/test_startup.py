"""Start-up: small jobs never import Numba, and Numba's compiled kernels live in a user cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import conv3dt
from conv3dt.engine import SMALL_JOB_SECONDS, engine_for_volume, resolve_engine

PACKAGE_DIR = Path(conv3dt.__file__).parent

# A small Numba job: the direct kernel on a 4-voxel cube, in a fresh process.
NUMBA_JOB = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(name)s: %(message)s')\n"
    "import numpy as np, conv3dt\n"
    "x = np.ones((1, 4, 4, 4, 1), np.float32); k = np.ones((3, 3, 3, 1, 1), np.float32)\n"
    "y = conv3dt.conv3d_transpose(x, k, strides=2, engine='numba')\n"
    "print('sum', float(y.sum()))\n"
)


def _compiled_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")}


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True
    )


def test_auto_picks_numpy_for_small_volumes_and_a_compiled_engine_for_large_ones() -> None:
    k3 = (3, 3, 3, 1, 1)
    assert engine_for_volume(k3, (2, 2, 2), (1, 1, 1), 16**3) == "numpy"
    assert engine_for_volume(k3, (2, 2, 2), (1, 1, 1), 256**3) == "numba"
    wide = (3, 3, 3, 64, 64)
    assert engine_for_volume(wide, (2, 2, 2), (1, 1, 1), 8**3) == "numpy"
    assert engine_for_volume(wide, (2, 2, 2), (1, 1, 1), 64**3) == "gemm"


def test_the_small_volume_bound_is_the_estimate_of_the_numpy_engines_time() -> None:
    """Just under and just over the bound, for a 1-channel k3 layer (27 taps)."""
    per_voxel = 27 * (4.0 + 2.5) * 1e-9
    below = int(SMALL_JOB_SECONDS / per_voxel) - 1
    assert engine_for_volume((3, 3, 3, 1, 1), (2, 2, 2), (1, 1, 1), below) == "numpy"
    assert engine_for_volume((3, 3, 3, 1, 1), (2, 2, 2), (1, 1, 1), below + 2) == "numba"


def test_resolve_engine_keeps_a_forced_engine_and_refuses_unknown_ones() -> None:
    assert resolve_engine("gemm", (3, 3, 3, 1, 1), (2,) * 3, (1,) * 3, 8) == "gemm"
    with pytest.raises(ValueError, match=r"`engine`.*'fast'"):
        resolve_engine("fast", (3, 3, 3, 1, 1), (2,) * 3, (1,) * 3, 8)


def test_a_small_cli_job_does_not_import_numba(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.random.default_rng(0).random((16, 16, 16), np.float32))
    (tmp_path / "up.yaml").write_text(
        "layer: {filters: 1, kernel_size: 3, strides: 2, padding: same}\nseed: 0\n"
    )
    code = (
        "import sys\n"
        "from conv3dt_cli.main import main\n"
        f"args = ['upsample', {str(tmp_path / 'v.npy')!r}, '--spec', "
        f"{str(tmp_path / 'up.yaml')!r}, '-o', {str(tmp_path / 'out.npy')!r}, '-q']\n"
        "try:\n"
        "    main(args)\n"
        "except SystemExit as stop:\n"
        "    assert not stop.code, stop.code\n"
        "print('numba' in sys.modules)\n"
    )
    assert _run_python(code).stdout.strip().splitlines()[-1] == "False"
    assert np.load(tmp_path / "out.npy").shape == (32, 32, 32)


def test_compiled_kernels_go_to_the_cache_folder_and_a_notice_to_the_compile_logger(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    before = _compiled_files(PACKAGE_DIR)
    first = _run_python(NUMBA_JOB, NUMBA_CACHE_DIR=str(cache))
    assert "conv3dt.compile: compiling kernels, first run only" in first.stdout
    assert any(p.name.startswith("numba_kernels.direct_region") for p in _compiled_files(cache))
    assert _compiled_files(PACKAGE_DIR) == before
    second = _run_python(NUMBA_JOB, NUMBA_CACHE_DIR=str(cache))
    assert "compiling kernels" not in second.stdout
    assert second.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]


def test_the_user_cache_folder_is_the_default(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    environ.update(XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    code = "from conv3dt.engine.numba_cache import cache_directory; print(cache_directory())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True
    )
    if sys.platform.startswith("linux"):
        assert out.stdout.strip() == str(tmp_path / "conv3dt" / "numba")


def test_an_unwritable_cache_folder_runs_uncached_and_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    before = _compiled_files(PACKAGE_DIR)
    result = _run_python(NUMBA_JOB, NUMBA_CACHE_DIR=str(blocker / "cache"))
    assert "cannot be written; kernels are compiled in each run" in result.stdout
    assert result.stdout.splitlines()[-1] == "sum 1728.0"
    assert _compiled_files(PACKAGE_DIR) == before
