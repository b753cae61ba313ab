"""Benchmark conv3dt's engines on reference workloads, against PyTorch when installed.

Each workload is a Keras ``Conv3DTranspose`` applied to a channels-last float32
input: W1-W6 with the speed-up over PyTorch each should reach, and F1-F4,
single- and few-channel volumes. Every conv3dt engine (and ``auto``) computes
the Keras output box with :func:`conv3dt.engine.conv_transpose_region`;
PyTorch, when importable, runs ``torch.nn.functional.conv_transpose3d`` on the
same data channels-first with zero padding, and its full output is cropped to
Keras's window with the crops of :func:`conv3dt.ops.layer_geometry` (a view:
the crop costs nothing).

The table gives, per workload and engine: the median time of several runs
after a warm-up (so Numba compilation is not counted; the cases take turns in
a rotating order so that all meet the same machine state), GFLOP/s counted as
``2 * batch * input_voxels * in_channels * filters * kernel_voxels``, that
rate as a share of this machine's float32 NumPy matmul rate (measured in the
same run), the speed-up over PyTorch (its time divided by ours) and the largest
difference from PyTorch relative to PyTorch's largest magnitude. Like
PyTorch's, conv3dt's output is allocated by each call; with ``--reuse-out`` a
row ``out=`` adds ``auto`` writing into one output array kept between calls
(as the tool does with its tiles), which skips the kernel zeroing fresh pages.

Two sections on the command-line tool follow (they need conv3dt installed,
``pip install -e .``, and run it as a child process of this interpreter):

End to end
    ``conv3dt upsample`` on a random 256**3 float32 ``.npy`` volume written to a
    temporary directory, with a YAML spec and weight files beside it: C1 is a
    1-filter, kernel 2, strides 2, valid layer with a bias (output 512**3), C2
    an 8-filter, kernel 3, strides 2, same one (output 512**3 x 8, 4 GiB on
    disk). Per row: wall seconds of the child process and the seconds its
    ``--json`` line reports, output and input voxels per wall second, the
    child's peak resident set size (its own ``ru_maxrss``, taken by a small
    launcher process so that this interpreter's memory is not counted)
    and the peak the tool reports in ``--json``. The output's shape is checked,
    and voxels at the corners and at random places are checked against a direct
    sum over the kernel taps; a mismatch stops the benchmark with an error.
    Both layers first run once on a 16**3 volume so the Numba cache is warm.
Start-up
    ``conv3dt --help`` (best of 5 fresh processes; limit 0.5 s) and a fresh
    process's ``conv3dt upsample`` of a 16**3 volume through C1 with a warm
    Numba compilation cache (best of 3 after one warming run; limit 2 s), each
    through the ``conv3dt`` script beside this interpreter, when there is one,
    and through ``python -m conv3dt``. Each row says PASS or MISS.

Run from the repository root::

    python benchmarks/bench_engine.py                 # everything
    python benchmarks/bench_engine.py -w W1,W5 -e auto --repeats 11
    python benchmarks/bench_engine.py --no-cli        # the workload table only
    python benchmarks/bench_engine.py --cli-only      # the command-line sections only
    python benchmarks/bench_engine.py --presets-only  # the interpolation presets only

Interpolation presets
    P1-P3: the ``linear`` and ``nearest`` presets with ``boundary="replicate"``
    through :func:`conv3dt.conv3d_transpose` (``auto``, which runs the separable
    engine, and the general Numba engine), against PyTorch's ``interpolate``
    and SciPy's ``ndimage.zoom``, which compute the same values; the largest
    absolute difference is from PyTorch's result.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conv3dt.engine import ENGINES, choose_engine, conv_transpose_region, engine_for_volume
from conv3dt.engine.separable import separable_factors
from conv3dt.engine.threads import get_threads, set_threads
from conv3dt.ops import layer_geometry


@dataclass(frozen=True)
class Workload:
    """One Keras layer applied to one input, and the speed-up over PyTorch it should reach."""

    name: str
    batch: int
    size: int
    channels: int
    filters: int
    kernel: int
    stride: int
    padding: str
    dilation: int
    goal: float | None

    @property
    def flops(self) -> int:
        """Multiply-adds times two, over the input voxels and kernel taps (no zeros counted)."""
        return 2 * self.batch * self.size**3 * self.channels * self.filters * self.kernel**3

    def describe(self) -> str:
        """The workload in Keras terms."""
        text = (
            f"{self.batch}x{self.size}^3x{self.channels} -> {self.filters}, kernel {self.kernel}, "
            f"strides {self.stride}, {self.padding}"
        )
        return text + (f", dilation {self.dilation}" if self.dilation > 1 else "")


WORKLOADS = [
    Workload("W1", 1, 192, 1, 1, 2, 2, "valid", 1, 10.0),
    Workload("W2", 1, 64, 32, 16, 3, 2, "same", 1, 2.0),
    Workload("W3", 1, 64, 32, 32, 3, 1, "same", 1, 1.0),
    Workload("W4", 4, 32, 64, 32, 4, 2, "same", 1, 1.5),
    Workload("W5", 1, 64, 64, 32, 2, 2, "valid", 1, 5.0),
    Workload("W6", 1, 48, 16, 16, 3, 1, "same", 2, 1.0),
    # Single- and few-channel volumes, as from microscopes and scanners.
    Workload("F1", 1, 128, 1, 1, 3, 2, "same", 1, None),
    Workload("F2", 1, 128, 1, 8, 3, 2, "same", 1, None),
    Workload("F3", 1, 128, 2, 2, 4, 2, "same", 1, None),
    Workload("F4", 1, 128, 1, 4, 3, 1, "same", 1, None),
]


def interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, budget: float, pause: float = 0.01
) -> dict[str, float]:
    """Median seconds per call, timing the calls in turn (one round after another).

    Taking turns, in an order rotating from round to round, lets every call meet
    the same machine state (other processes, threads of the previous call still
    spinning, memory the kernel has to zero for fresh outputs). A call slower
    than ``budget`` seconds in its warm-up is timed once only.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    slow = set()
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        if time.perf_counter() - start > budget:
            slow.add(name)
    names = list(calls)
    for round_ in range(repeats):
        # Each round starts with the next case, so no case always follows the same one.
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            call = calls[name]
            if name in slow and round_ > 0:
                continue
            # Let the previous call's idle threads (OpenMP's spin-waiting ones) go to
            # sleep; not longer, or the cores clock down.
            time.sleep(pause)
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_rate(size: int = 2048) -> float:
    """This machine's float32 NumPy matmul rate in GFLOP/s (best of a few runs)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# The label of "auto" writing into an output array kept from call to call.
REUSED = "out="


def run_workloads(args: argparse.Namespace) -> None:
    """Time the selected workloads and engines and print the table."""
    try:
        import torch
    except ImportError:
        torch = None
    if args.no_torch:
        torch = None
    set_threads(args.threads)
    threads = get_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    rate = matmul_rate()
    print(
        f"threads {threads}; float32 NumPy matmul {rate:.0f} GFLOP/s; "
        f"PyTorch {torch.__version__ if torch is not None else 'not installed'}"
    )
    header = (
        f"{'id':<3} {'engine':<11} {'median s':>9} {'GFLOP/s':>8} {'% matmul':>9} "
        f"{'vs torch':>9} {'max rel diff':>12}"
    )
    print(header)
    print("-" * len(header))
    selected = [w for w in WORKLOADS if w.name in args.workloads]
    for w in selected:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((w.batch, w.size, w.size, w.size, w.channels), dtype=np.float32)
        kernel = rng.standard_normal((w.kernel,) * 3 + (w.filters, w.channels), dtype=np.float32)
        kernel /= np.sqrt(w.channels * w.kernel**3)
        axes = layer_geometry(
            (w.size,) * 3, (w.kernel,) * 3, (w.stride,) * 3, w.padding, None, (w.dilation,) * 3
        )
        crop = tuple(g.crop_left for g in axes)
        shape = tuple(g.output_length for g in axes)
        calls: dict[str, Callable[[], object]] = {}
        if torch is not None:
            xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
            wt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))

            window = tuple(slice(c, c + n) for c, n in zip(crop, shape, strict=True))

            def torch_call(xt=xt, wt=wt, w=w, window=window) -> object:
                with torch.no_grad():
                    full = torch.nn.functional.conv_transpose3d(
                        xt, wt, stride=w.stride, dilation=w.dilation
                    )
                return full[(slice(None), slice(None), *window)]

            calls["torch"] = torch_call
        args_ = (x, kernel, (w.stride,) * 3, (w.dilation,) * 3, (0, 0, 0), crop, shape, np.float32)
        for engine in args.engines:
            if engine == "separable" and separable_factors(kernel, (w.stride,) * 3) is None:
                continue  # it refuses kernels that are not exactly separable
            calls[engine] = functools.partial(conv_transpose_region, *args_, engine=engine)
        if args.reuse_out:
            buffer = np.empty((w.batch, *shape, w.filters), dtype=np.float32)
            calls[REUSED] = functools.partial(conv_transpose_region, *args_, out=buffer)
        diffs = {}
        if torch is not None:
            reference = np.moveaxis(calls["torch"]().numpy(), 1, -1)
            scale = float(np.abs(reference).max()) or 1.0
            for engine in calls.keys() - {"torch"}:
                diffs[engine] = float(np.abs(calls[engine]() - reference).max()) / scale
            del reference
        seconds = interleaved(calls, args.repeats, args.budget)
        for name, t in seconds.items():
            gflops = w.flops / t / 1e9
            label = name
            if name in ("auto", REUSED):
                label += ":" + choose_engine(kernel.shape, (w.stride,) * 3, (w.dilation,) * 3)
            speedup = f"{seconds['torch'] / t:.2f}x" if "torch" in seconds else ""
            diff = f"{diffs[name]:.1e}" if name in diffs else ""
            print(
                f"{w.name:<3} {label:<11} {t:>9.4f} {gflops:>8.1f} "
                f"{100 * gflops / rate:>8.0f}% {speedup:>9} {diff:>12}"
            )
        goal = f"goal: {w.goal:g}x PyTorch" if w.goal else "few channels, no stated goal"
        print(f"    {w.describe()}; {goal}")


@dataclass(frozen=True)
class PresetCase:
    """An interpolation preset on a single-channel volume, with replicated edges."""

    name: str
    preset: str
    factor: int
    size: int
    goal: float | None

    def describe(self) -> str:
        """The case in the preset's terms."""
        return f"{self.preset} x{self.factor}, 1x{self.size}^3x1, boundary replicate"


PRESET_CASES = [
    PresetCase("P1", "linear", 2, 192, 5.0),
    PresetCase("P2", "nearest", 2, 192, None),
    PresetCase("P3", "linear", 3, 128, None),
]


def run_presets(args: argparse.Namespace) -> None:
    """Time the presets against PyTorch's ``interpolate`` and SciPy's ``zoom``; print the table.

    conv3dt runs :func:`conv3dt.conv3d_transpose` with the preset's kernel and
    ``boundary="replicate"``, once with ``auto`` (the separable engine) and once
    with the general Numba engine; PyTorch runs ``interpolate`` (``trilinear``
    with ``align_corners=False``, or ``nearest``) and SciPy ``ndimage.zoom``
    (``order`` 1 or 0, ``grid_mode=True``, ``mode="nearest"``), which give the
    same values. SciPy runs on one thread (it has no others).
    """
    import conv3dt
    from conv3dt.presets import preset_kernel

    try:
        import torch
    except ImportError:
        torch = None
    try:
        from scipy import ndimage
    except ImportError:
        ndimage = None
    if args.no_torch:
        torch = None
    set_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(get_threads())
    print()
    print(
        f"interpolation presets, threads {get_threads()}; PyTorch "
        f"{torch.__version__ if torch is not None else 'not installed'}, SciPy "
        f"{'installed' if ndimage is not None else 'not installed'}"
    )
    header = (
        f"{'id':<3} {'implementation':<26} {'median s':>9} {'vs torch':>9} {'vs scipy':>9} "
        f"{'max abs diff':>12}"
    )
    print(header)
    print("-" * len(header))
    for case in PRESET_CASES:
        x = np.random.default_rng(0).random((1, case.size, case.size, case.size, 1), np.float32)
        kernel = preset_kernel(case.preset, case.factor)
        calls: dict[str, Callable[[], np.ndarray]] = {}
        for engine in ("auto", "numba"):
            calls[f"conv3dt {engine}"] = functools.partial(
                conv3dt.conv3d_transpose,
                x,
                kernel,
                strides=case.factor,
                padding="same",
                engine=engine,
                boundary="replicate",
            )
        if torch is not None:
            xt = torch.from_numpy(x[..., 0][:, None].copy())
            mode = {"linear": "trilinear", "nearest": "nearest"}[case.preset]
            extra = {"align_corners": False} if case.preset == "linear" else {}

            def torch_call(xt=xt, mode=mode, extra=extra, factor=case.factor) -> np.ndarray:
                with torch.no_grad():
                    y = torch.nn.functional.interpolate(xt, scale_factor=factor, mode=mode, **extra)
                return y.numpy()[0, 0]

            calls["torch interpolate"] = torch_call
        if ndimage is not None:
            order = {"linear": 1, "nearest": 0}[case.preset]
            calls["scipy zoom"] = functools.partial(
                ndimage.zoom, x[0, ..., 0], case.factor, order=order, grid_mode=True, mode="nearest"
            )
        reference = next(
            (calls[k]() for k in ("torch interpolate", "scipy zoom") if k in calls), None
        )
        diffs = {}
        for name, call in calls.items():
            if reference is not None:
                diffs[name] = float(
                    np.abs(np.asarray(call()).reshape(reference.shape) - reference).max()
                )
        seconds = interleaved(calls, args.repeats, args.budget)
        picked = engine_for_volume(kernel.shape, (case.factor,) * 3, (1,) * 3, x.size, kernel)
        for name, t in seconds.items():
            label = name + (f":{picked}" if name == "conv3dt auto" else "")
            vs_torch = (
                f"{seconds['torch interpolate'] / t:.2f}x" if "torch interpolate" in seconds else ""
            )
            vs_scipy = f"{seconds['scipy zoom'] / t:.2f}x" if "scipy zoom" in seconds else ""
            diff = f"{diffs[name]:.1e}" if name in diffs else ""
            print(f"{case.name:<3} {label:<26} {t:>9.4f} {vs_torch:>9} {vs_scipy:>9} {diff:>12}")
        goal = f"goal: auto {case.goal:g}x PyTorch" if case.goal else "no stated goal"
        print(f"    {case.describe()}; {goal}")


HELP_LIMIT = 0.5  # seconds for ``conv3dt --help``
FIRST_RUN_LIMIT = 2.0  # seconds for a fresh process's small run, Numba cache warm
SMALL_SIZE = 16


@dataclass(frozen=True)
class CliCase:
    """One single-channel layer, with a bias, for the end-to-end runs of ``conv3dt upsample``."""

    name: str
    filters: int
    kernel: int
    stride: int
    padding: str

    def describe(self) -> str:
        """The layer in Keras terms."""
        return (
            f"1 -> {self.filters}, kernel {self.kernel}, strides {self.stride}, "
            f"{self.padding}, bias"
        )


CLI_CASES = [CliCase("C1", 1, 2, 2, "valid"), CliCase("C2", 8, 3, 2, "same")]


@dataclass(frozen=True)
class ChildRun:
    """What one finished child process took and printed."""

    seconds: float
    peak_rss: int
    stdout: str


# Runs the measured command as its own child and writes that child's peak RSS (KiB)
# to the file named first. A process started straight from this one would inherit,
# through exec, the peak of this one's memory at the time it was started.
_LAUNCHER = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def time_child(command: list[str], workdir: Path) -> float:
    """Wall seconds of ``command`` run in ``workdir``; raise with its stderr if it fails."""
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, cwd=workdir, check=False)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {process.returncode}:\n{process.stderr.decode()}"
        )
    return seconds


def run_child(command: list[str], workdir: Path) -> ChildRun:
    """Run ``command`` in ``workdir`` to its end; raise with its stderr if it fails.

    The peak resident set size is the command's own, from ``os.wait4`` in a
    small launcher process: ``RUSAGE_CHILDREN`` would give the largest over
    every child waited for so far, and a child of this (large) process starts
    with this process's peak.
    """
    out_path = workdir / "child.out"
    err_path = workdir / "child.err"
    rss_path = workdir / "child.rss"
    launched = [sys.executable, "-c", _LAUNCHER, str(rss_path), *command]
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        process = subprocess.run(launched, stdout=out, stderr=err, cwd=workdir, check=False)
        seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {process.returncode}:\n{err_path.read_text()}"
        )
    # ru_maxrss is in KiB on Linux.
    return ChildRun(seconds, int(rss_path.read_text()) * 1024, out_path.read_text())


def write_case(case: CliCase, workdir: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write the case's weights and YAML spec; return the spec's path, kernel and bias."""
    rng = np.random.default_rng(1)
    shape = (case.kernel,) * 3 + (case.filters, 1)
    kernel = rng.standard_normal(shape, dtype=np.float32) / np.float32(case.kernel**1.5)
    bias = rng.standard_normal(case.filters, dtype=np.float32)
    np.save(workdir / f"{case.name}_kernel.npy", kernel)
    np.save(workdir / f"{case.name}_bias.npy", bias)
    spec = workdir / f"{case.name}.yaml"
    spec.write_text(
        "layer:\n"
        f"  filters: {case.filters}\n"
        f"  kernel_size: {case.kernel}\n"
        f"  strides: {case.stride}\n"
        f"  padding: {case.padding}\n"
        "weights:\n"
        f"  kernel: {case.name}_kernel.npy\n"
        f"  bias: {case.name}_bias.npy\n"
        "  layout: keras\n"
    )
    return spec, kernel, bias


def check_output(
    path: Path, x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, case: CliCase
) -> None:
    """Check the output's shape, and its corners and random voxels against a direct sum.

    Output voxel ``o`` is voxel ``o + crop_left`` of the uncropped transposed
    convolution, which input voxel ``i`` reaches through kernel tap ``t`` when
    ``i * stride + t`` equals it.
    """
    axes = layer_geometry(
        x.shape, (case.kernel,) * 3, (case.stride,) * 3, case.padding, None, (1, 1, 1)
    )
    expected_shape = tuple(g.output_length for g in axes)
    if case.filters > 1:
        expected_shape += (case.filters,)
    y = np.load(path, mmap_mode="r")
    if y.shape != expected_shape or y.dtype != np.float32:
        raise RuntimeError(
            f"{case.name}: output {y.shape} {y.dtype}, expected {expected_shape} float32"
        )
    lengths = [g.output_length for g in axes]
    corners = list(itertools.product(*[(0, n - 1) for n in lengths]))
    rng = np.random.default_rng(2)
    picks = [tuple(int(rng.integers(n)) for n in lengths) for _ in range(64)]
    for voxel in corners + picks:
        expected = bias.astype(np.float64)
        for taps in itertools.product(range(case.kernel), repeat=3):
            source = []
            for o, t, g in zip(voxel, taps, axes, strict=True):
                i, rest = divmod(o + g.crop_left - t, case.stride)
                if rest or not 0 <= i < x.shape[len(source)]:
                    break
                source.append(i)
            else:
                expected = expected + float(x[tuple(source)]) * kernel[taps][:, 0]
        got = np.asarray(y[voxel], dtype=np.float64).reshape(case.filters)
        if not np.allclose(got, expected, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"{case.name}: output at {voxel} is {got}, expected {expected}")


def upsample_args(source: str, spec: Path, output: str = "small_out.npy", *extra: str) -> list[str]:
    """Arguments of a quiet ``conv3dt upsample`` of one file, replacing its output."""
    return ["upsample", source, "--spec", str(spec), "-o", output, "-q", "--overwrite", *extra]


def cli_commands() -> dict[str, list[str]]:
    """The ways to start the tool: the script beside this interpreter if any, and ``-m``."""
    commands = {}
    script = Path(sys.executable).with_name("conv3dt")
    if script.exists():
        commands["conv3dt"] = [str(script)]
    commands["python -m conv3dt"] = [sys.executable, "-m", "conv3dt"]
    return commands


def run_end_to_end(
    args: argparse.Namespace, workdir: Path, specs: dict[str, tuple[Path, np.ndarray, np.ndarray]]
) -> None:
    """Time ``conv3dt upsample`` on a large ``.npy`` volume per case and print the table."""
    n = args.cli_size
    x = np.random.default_rng(0).standard_normal((n,) * 3, dtype=np.float32)
    np.save(workdir / "volume.npy", x)
    command = [sys.executable, "-m", "conv3dt"]
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    print()
    print(f"conv3dt upsample end to end: {n}^3 float32 .npy in, float32 .npy out ({workdir})")
    header = (
        f"{'id':<3} {'wall s':>7} {'tool s':>7} {'out Mvox/s':>10} {'in Mvox/s':>9} "
        f"{'peak RSS MiB':>12} {'--json peak MiB':>15}"
    )
    print(header)
    print("-" * len(header))
    for case in CLI_CASES:
        spec, kernel, bias = specs[case.name]
        # Both float32 arrays, the input and the output, have to fit on the disk.
        needed = 4 * n**3 * (1 + case.filters * case.stride**3)
        if shutil.disk_usage(workdir).free < needed + 2**30:
            print(f"{case.name:<3} skipped: needs {needed / 2**30:.1f} GiB free in {workdir}")
            continue
        # Compile or load the layer's kernels into the Numba cache before timing.
        run_child([*command, *upsample_args("small.npy", spec)], workdir)
        output = workdir / "out.npy"
        child = run_child(
            [*command, *upsample_args("volume.npy", spec, "out.npy", "--json", *threads)], workdir
        )
        report = json.loads(child.stdout.strip().splitlines()[-1])
        check_output(output, x, kernel, bias, case)
        output.unlink()
        out_voxels = int(np.prod(report["output_shape"][:3]))
        print(
            f"{case.name:<3} {child.seconds:>7.2f} {report['seconds']:>7.2f} "
            f"{out_voxels / child.seconds / 1e6:>10.1f} {n**3 / child.seconds / 1e6:>9.2f} "
            f"{child.peak_rss / 2**20:>12.0f} {report['peak_memory_bytes'] / 2**20:>15.0f}"
        )
        print(f"    {case.describe()}; output {tuple(report['output_shape'])}, checked")


def run_startup(workdir: Path, spec: Path) -> None:
    """Time fresh processes of the tool: ``--help``, and a small run with a warm cache."""
    print()
    print(f"start-up: fresh processes, {SMALL_SIZE}^3 .npy through {CLI_CASES[0].describe()}")
    for label, command in cli_commands().items():
        help_best = min(time_child([*command, "--help"], workdir) for _ in range(5))
        small = [*command, *upsample_args("small.npy", spec)]
        time_child(small, workdir)
        first_best = min(time_child(small, workdir) for _ in range(3))
        for what, best, limit in (
            (f"{label} --help (best of 5)", help_best, HELP_LIMIT),
            (f"{label} upsample, warm cache (best of 3)", first_best, FIRST_RUN_LIMIT),
        ):
            verdict = "PASS" if best < limit else "MISS"
            print(f"  {what:<52} {best:>6.3f} s  limit {limit:>3g} s  {verdict}")


def run_cli(args: argparse.Namespace) -> None:
    """Run the command-line sections in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="conv3dt-bench-", dir=args.scratch) as name:
        workdir = Path(name)
        small = np.random.default_rng(3).standard_normal((SMALL_SIZE,) * 3, dtype=np.float32)
        np.save(workdir / "small.npy", small)
        specs = {case.name: write_case(case, workdir) for case in CLI_CASES}
        run_end_to_end(args, workdir, specs)
        run_startup(workdir, specs[CLI_CASES[0].name][0])


def run(args: argparse.Namespace) -> None:
    """Run the sections the options select."""
    if not args.cli_only and not args.presets_only:
        run_workloads(args)
    if not args.cli_only and not args.no_presets:
        run_presets(args)
    if not args.no_cli and not args.presets_only:
        run_cli(args)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "-w",
        "--workloads",
        type=lambda s: s.split(","),
        default=[w.name for w in WORKLOADS],
        help="comma-separated workload ids (default: all)",
    )
    parser.add_argument(
        "-e",
        "--engines",
        type=lambda s: s.split(","),
        default=list(ENGINES),
        help=f"comma-separated engines among {', '.join(ENGINES)} (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case")
    parser.add_argument(
        "--budget", type=float, default=3.0, help="time a case once if its warm-up exceeds this"
    )
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument(
        "--reuse-out",
        action="store_true",
        help=f"also time auto writing into an output array kept between calls ({REUSED!r})",
    )
    parser.add_argument("--no-presets", action="store_true", help="skip the presets section")
    sections = parser.add_mutually_exclusive_group()
    sections.add_argument(
        "--presets-only", action="store_true", help="run only the interpolation presets section"
    )
    sections.add_argument(
        "--no-cli", action="store_true", help="skip the end-to-end and start-up sections"
    )
    sections.add_argument(
        "--cli-only", action="store_true", help="run only the end-to-end and start-up sections"
    )
    parser.add_argument(
        "--cli-size", type=int, default=256, help="edge of the end-to-end input volume"
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=None,
        help="directory for the end-to-end files (default: the system's temporary one)",
    )
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
