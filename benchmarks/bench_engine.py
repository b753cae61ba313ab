"""Benchmark conv3dt's engines on six reference workloads, against PyTorch when installed.

Each workload is a Keras ``Conv3DTranspose`` applied to a channels-last float32
input. Every conv3dt engine (and ``auto``) computes the Keras output box with
:func:`conv3dt.engine.conv_transpose_region`; PyTorch, when importable, runs
``torch.nn.functional.conv_transpose3d`` on the same data channels-first with
zero padding, and its full output is cropped to Keras's window with the crops of
:func:`conv3dt.ops.layer_geometry` (a view, not timed beyond the convolution).

The table gives, per workload and engine: the median time of several runs
after a warm-up (so Numba compilation is not counted), GFLOP/s counted as
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


def timed(call: Callable[[], object], repeats: int, budget: float) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after one warm-up call, and the last result.

    A call slower than ``budget`` seconds is timed once only.
    """
    start = time.perf_counter()
    result = call()
    if time.perf_counter() - start > budget:
        repeats = 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def matmul_rate(size: int = 2048) -> float:
    """This machine's float32 NumPy matmul rate in GFLOP/s (best of a few runs)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    best = min(timed(lambda: a @ b, 1, 10.0)[0] for _ in range(5))
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
        torch_time = None
        reference = None
        if torch is not None:
            xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
            wt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))

            def torch_call(xt=xt, wt=wt, w=w) -> object:
                with torch.no_grad():
                    return torch.nn.functional.conv_transpose3d(
                        xt, wt, stride=w.stride, dilation=w.dilation
                    )

            torch_time, full = timed(torch_call, args.repeats, args.budget)
            window = tuple(slice(c, c + n) for c, n in zip(crop, shape, strict=True))
            reference = np.moveaxis(full.numpy()[(slice(None), slice(None), *window)], 1, -1)
            print(
                f"{w.name:<3} {'torch':<10} {torch_time:>9.4f} {w.flops / torch_time / 1e9:>8.1f} "
                f"{100 * w.flops / torch_time / 1e9 / rate:>8.0f}% {1.0:>8.2f}x {'':>12}"
            )
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

            seconds, out = timed(call, args.repeats, args.budget)
            gflops = w.flops / seconds / 1e9
            label = engine
            if engine == "auto":
                label = "auto:" + choose_engine(kernel.shape, (w.stride,) * 3, (w.dilation,) * 3)
            speedup = diff = ""
            if reference is not None and torch_time is not None:
                speedup = f"{torch_time / seconds:.2f}x"
                scale = float(np.abs(reference).max()) or 1.0
                diff = f"{float(np.abs(out - reference).max()) / scale:.1e}"
            print(
                f"{w.name:<3} {label:<10} {seconds:>9.4f} {gflops:>8.1f} "
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
