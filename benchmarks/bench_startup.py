"""Start-up benchmark: a small job in a fresh process, against the bare imports.

Times, in one run, each as the median of ``--repeats`` fresh processes:

bare
    ``python -c "import numpy, nibabel, h5py, click, yaml, tqdm"``: what any
    Python tool reading volumes pays before doing anything.
help
    ``conv3dt --help`` (the installed command).
warm
    ``conv3dt upsample`` of a 16**3 float32 ``.npy`` volume through a 1-filter,
    kernel 3, stride 2, ``same`` layer, with the caches a previous run left.
cold
    The same job as on a fresh install: conv3dt's own modules compiled from
    source (a copy of the package without ``__pycache__``, bytecode writing
    off) and an empty Numba cache folder (``NUMBA_CACHE_DIR``). Third-party
    packages keep the bytecode their installation compiled.

Prints a table with each time and its ratio to ``bare``; the goals are a warm
ratio of at most 2 and a cold ratio of at most 3.

Usage::

    python benchmarks/bench_startup.py [--repeats 7] [--size 16]

Wall-clock times on whatever else the machine is doing: noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import conv3dt_cli
import numpy as np

import conv3dt

BARE = "import numpy, nibabel, h5py, click, yaml, tqdm"
SPEC = "layer: {filters: 1, kernel_size: 3, strides: 2, padding: same}\nseed: 0\n"
GOALS = {"warm": 2.0, "cold": 3.0}


def _seconds(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _fresh_package_copy(root: Path) -> Path:
    """conv3dt and its CLI copied without bytecode; returns the folder to put on the path."""
    target = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
    shutil.copytree(Path(conv3dt.__file__).parent, target / "conv3dt", ignore=ignore)
    shutil.copytree(Path(conv3dt_cli.__file__).parent, target / "conv3dt_cli", ignore=ignore)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        volume = scratch / "v.npy"
        rng = np.random.default_rng(0)
        np.save(volume, rng.random((args.size,) * 3, dtype=np.float32))
        (scratch / "up.yaml").write_text(SPEC)
        job = [
            sys.executable,
            "-m",
            "conv3dt",
            "upsample",
            str(volume),
            "--spec",
            str(scratch / "up.yaml"),
            "-o",
            str(scratch / "out.npy"),
            "--overwrite",
            "-q",
        ]
        # The installed command where there is one (it imports the CLI alone,
        # not the conv3dt package that ``python -m conv3dt`` loads first).
        script = Path(sys.executable).with_name("conv3dt")
        console = [str(script)] if script.exists() else [sys.executable, "-m", "conv3dt"]
        runs: dict[str, list[float]] = {"bare": [], "help": [], "warm": [], "cold": []}
        subprocess.run(job, check=True)  # warms the caches the warm runs use
        for repeat in range(args.repeats):
            runs["bare"].append(_seconds([sys.executable, "-c", BARE]))
            runs["help"].append(_seconds([*console, "--help"]))
            runs["warm"].append(_seconds(job))
            fresh = scratch / f"fresh{repeat}"
            env = dict(
                os.environ,
                PYTHONPATH=str(_fresh_package_copy(fresh)),
                PYTHONDONTWRITEBYTECODE="1",
                NUMBA_CACHE_DIR=str(fresh / "numba-cache"),
            )
            runs["cold"].append(_seconds(job, env))

    bare = statistics.median(runs["bare"])
    print(f"{args.size}^3 k3 s2 same, 1 filter; median of {args.repeats} fresh processes")
    print("| case | seconds | ratio to bare | goal |")
    print("|---|---|---|---|")
    for case, times in runs.items():
        median = statistics.median(times)
        goal = f"≤ {GOALS[case]:g}×" if case in GOALS else ""
        print(f"| {case} | {median:.3f} | {median / bare:.2f}× | {goal} |")


if __name__ == "__main__":
    main()
