"""Benchmark conv3dt's engines on six reference workloads, against PyTorch when installed.

Each workload is a Keras ``Conv3DTranspose`` applied to a channels-last float32
input. Every conv3dt engine (and ``auto``) computes the Keras output box with
:func:`conv3dt.engine.conv_transpose_region`; PyTorch, when importable, runs
``torch.nn.functional.conv_transpose3d`` on the same data channels-first with
zero padding, and its full output is cropped to Keras's window with the crops of
:func:`conv3dt.ops.layer_geometry` (a view: the crop costs nothing).

The table gives, per workload and engine: the median time of several runs
after a warm-up (so Numba compilation is not counted; the cases take turns in
a rotating order so that all meet the same machine state), GFLOP/s counted as
``2 * batch * input_voxels * in_channels * filters * kernel_voxels``, that
rate as a share of this machine's float32 NumPy matmul rate (measured in the
same run), the speed-up over PyTorch (its time divided by ours) and the largest
difference from PyTorch relative to PyTorch's largest magnitude.

Run from the repository root::

    python benchmarks/bench_engine.py                 # everything
    python benchmarks/bench_engine.py -w W1,W5 -e auto --repeats 11
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conv3dt.engine import ENGINES, choose_engine, conv_transpose_region
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
    goal: float

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


def run(args: argparse.Namespace) -> None:
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
        f"{'id':<3} {'engine':<10} {'median s':>9} {'GFLOP/s':>8} {'% matmul':>9} "
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
        for engine in args.engines:

            def call(engine=engine, x=x, kernel=kernel, w=w, crop=crop, shape=shape) -> np.ndarray:
                return conv_transpose_region(
                    x,
                    kernel,
                    (w.stride,) * 3,
                    (w.dilation,) * 3,
                    (0, 0, 0),
                    crop,
                    shape,
                    np.float32,
                    engine=engine,
                )

            calls[engine] = call
        diffs = {}
        if torch is not None:
            reference = np.moveaxis(calls["torch"]().numpy(), 1, -1)
            scale = float(np.abs(reference).max()) or 1.0
            for engine in args.engines:
                diffs[engine] = float(np.abs(calls[engine]() - reference).max()) / scale
            del reference
        seconds = interleaved(calls, args.repeats, args.budget)
        for name, t in seconds.items():
            gflops = w.flops / t / 1e9
            label = name
            if name == "auto":
                label = "auto:" + choose_engine(kernel.shape, (w.stride,) * 3, (w.dilation,) * 3)
            speedup = f"{seconds['torch'] / t:.2f}x" if "torch" in seconds else ""
            diff = f"{diffs[name]:.1e}" if name in diffs else ""
            print(
                f"{w.name:<3} {label:<10} {t:>9.4f} {gflops:>8.1f} "
                f"{100 * gflops / rate:>8.0f}% {speedup:>9} {diff:>12}"
            )
        print(f"    {w.describe()}; goal: {w.goal:g}x PyTorch")


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
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
