"""End-to-end benchmark: whole ``conv3dt upsample`` jobs against what users would do instead.

Every run is a fresh process, so start-up (imports, Numba's cache) counts as
users feel it. Each case is timed against its baseline in the same run,
alternating, ``--repeats`` times; the table gives the median and the best wall
time, the CPU time (user + system) and peak RSS of the child, and the ratio
beside the issue's goal. Children run under ``/usr/bin/time`` for their CPU
time and peak RSS (``os.wait4`` where it is missing).

Cases
-----
mni-gz
    MNI152 T1 (197 x 233 x 189, ``.nii.gz``) upsampled 2x to a float32
    ``.nii.gz`` through the examples' trilinear layer (kernel 4, stride 2,
    same, 1 filter): ``conv3dt upsample`` against
    ``baseline_nibabel_torch.py`` (nibabel load, PyTorch
    ``conv_transpose3d``, nibabel save), outputs checked equal (data within
    1e-5 relative, shape, affine). Goal: conv3dt at least 4x faster.
mni-nii, mni-npy, mni-h5
    The same job written as ``.nii``, ``.npy`` and HDF5, against the same
    script writing the same format (no stated goal).
big-gz
    A 160**3 float32 ``.nii.gz`` (a smooth, noisy ellipsoid on a zero
    background, like a scan) through a kernel 3, stride 2, same layer with
    2 filters (weights drawn by ``conv3dt init``) into a 320**3 x 2 float32
    ``.nii.gz`` on tmpfs, against the standard library's
    ``gzip.compress(level=1)`` of that output's bytes alone (in this process:
    nothing to read, compute or write). Goal: conv3dt's whole job at most 0.5x
    as long.
big-gz-noise
    The same with normal noise for the input (as ``bench_streaming.py``'s):
    the output compresses far less, and the standard library's gzip is slower.
batch-gz, batch-nii
    A batch of ``--batch`` MNI inputs in one ``conv3dt upsample ... --output-dir``
    to ``.nii.gz`` (``.nii``) on disk (``--disk``), as it runs (each output
    made durable and renamed while the next file is read and computed) against
    the same command with every commit inline (the next file waits for it).

The MNI volume is taken from ``--mni``, else from an installed nilearn, else from
``~/.cache/conv3dt-bench``; when none has it, nilearn's wheel is fetched there
with ``pip download nilearn --no-deps`` and the file unpacked from it.

Usage::

    python benchmarks/bench_end_to_end.py [--cases mni-gz,big-gz,...] [--repeats 3]
        [--mni PATH] [--scratch /dev/shm] [--disk DIR] [--batch 8] [--threads N]

Timings are wall-clock on whatever else the machine is doing: noisy.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXAMPLES = REPO / "examples"
BASELINE = HERE / "baseline_nibabel_torch.py"
MNI_NAME = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_MEMBER = f"nilearn/datasets/data/{MNI_NAME}"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "conv3dt-bench"
ALL_CASES = (
    "mni-gz", "big-gz", "big-gz-noise", "mni-nii", "mni-npy", "mni-h5", "batch-gz", "batch-nii"
)  # fmt: skip
DEFAULT_CASES = ("mni-gz", "big-gz", "big-gz-noise", "mni-nii", "mni-npy", "mni-h5", "batch-gz")
BIG = 160

# A batch run with every commit inline, as before batches overlapped them: the
# committer conv3dt's CLI builds is replaced by one that commits on the spot.
_INLINE_COMMITS = """
import sys
import conv3dt.commit as commit


class Inline(commit.Committer):
    def commit(self, writer, key):
        self.wait()
        writer.commit()
        self._on_settled(key, None)


commit.Committer = Inline
from conv3dt_cli.main import main

main(sys.argv[1:], prog_name="conv3dt")
"""


@dataclass
class Run:
    """One child process: wall and CPU seconds, peak RSS bytes."""

    wall: float
    cpu: float
    rss: int


@dataclass
class Row:
    """A contender's runs in one case."""

    label: str
    runs: list[Run] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(r.wall for r in self.runs)

    def best(self) -> float:
        return min(r.wall for r in self.runs)

    def cpu(self) -> float:
        return statistics.median(r.cpu for r in self.runs)

    def rss(self) -> int:
        return max(r.rss for r in self.runs)


def conv3dt_command() -> list[str]:
    """The installed ``conv3dt`` beside this interpreter, else ``python -m conv3dt``."""
    beside = Path(sys.executable).with_name("conv3dt")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "conv3dt"]


def run_child(command: list[str], cwd: Path | None = None) -> Run:
    """Run ``command`` to completion; its wall time, CPU time and peak RSS.

    The child runs under ``/usr/bin/time``, whose own small process forks it:
    a child forked from this one would count this process's memory in its peak
    (Linux carries the high-water mark across ``exec``). Without
    ``/usr/bin/time`` the child's ``os.wait4`` usage is taken, peak included.
    A failing command raises with its stderr.
    """
    with tempfile.NamedTemporaryFile("r") as report, tempfile.TemporaryFile() as err:
        timer = ["/usr/bin/time", "-o", report.name, "-f", "%U %S %M"]
        wrapped = [*timer, *command] if os.path.exists(timer[0]) else command
        started = time.perf_counter()
        child = subprocess.Popen(wrapped, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            err.seek(0)
            text = err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{text}")
        if wrapped is command:
            return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)
        user, system, peak_kib = report.read().split()[-3:]
    return Run(wall, float(user) + float(system), int(peak_kib) * 1024)


def timed_in_process(call: Callable[[], object]) -> Run:
    """A call in this process: wall and CPU time (no RSS of its own)."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return Run(time.perf_counter() - wall, time.process_time() - cpu, 0)


# -- inputs --------------------------------------------------------------------


def locate_mni(given: str | None) -> Path:
    """The MNI152 T1 ``.nii.gz``: ``--mni``, nilearn's copy, the cache, or fetched."""
    if given:
        path = Path(given)
        if not path.is_file():
            sys.exit(f"--mni {given}: no such file")
        return path
    try:
        import nilearn

        installed = Path(nilearn.__file__).parent / "datasets" / "data" / MNI_NAME
        if installed.is_file():
            return installed
    except ImportError:
        pass
    cached = CACHE / MNI_NAME
    if cached.is_file():
        return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"fetching the MNI152 template: pip download nilearn --no-deps -d {CACHE}", flush=True)
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "nilearn", "--no-deps", "-d", str(CACHE)],
        capture_output=True,
        text=True,
        check=False,
    )
    wheels = sorted(CACHE.glob("nilearn-*.whl"))
    if fetched.returncode != 0 or not wheels:
        sys.exit(
            "cannot find the MNI152 template: give --mni PATH to "
            f"{MNI_NAME} (inside nilearn's wheel, {MNI_MEMBER}), or install nilearn\n"
            + fetched.stderr[-1000:]
        )
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(MNI_MEMBER) as source:
        with open(cached, "wb") as target:
            shutil.copyfileobj(source, target)
    return cached


def write_big_input(path: Path, n: int, noise: bool = False) -> None:
    """A float32 n**3 ``.nii.gz`` like a scan: a smooth, noisy ellipsoid on a zero background.

    With ``noise``, normal noise everywhere instead (as the streaming benchmark's
    inputs). Compression depends on the data: noise compresses far less well
    than a scan, whose background is empty, and the standard library's gzip
    runs several times slower on it.
    """
    import nibabel as nib

    rng = np.random.default_rng(0)
    if noise:
        volume = rng.standard_normal((n, n, n), dtype=np.float32)
    else:
        axis = np.linspace(-1, 1, n, dtype=np.float32)
        i, j, k = np.meshgrid(axis, axis, axis, indexing="ij", sparse=True)
        radius = i**2 / 0.8 + j**2 / 0.9 + k**2 / 0.7
        volume = 100 * np.exp(-2 * radius) + 20 * np.cos(6 * i + 3 * k)
        volume = volume + rng.normal(0, 2, (n, n, n)).astype(np.float32)
        volume = np.where(radius < 1, volume, 0).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)


def big_spec(scratch: Path) -> Path:
    """A kernel 3, stride 2, same, 2-filter spec drawn by ``conv3dt init``."""
    spec = scratch / "big" / "spec.yaml"
    spec.parent.mkdir(exist_ok=True)
    subprocess.run(
        [*conv3dt_command(), "init", "-o", str(spec), "--filters", "2", "--kernel-size", "3",
         "--strides", "2", "--padding", "same", "--overwrite"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return spec


# -- checks ---------------------------------------------------------------------


def _read_any(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """An output's values (float32) and affine, whichever format."""
    name = str(path)
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        image = nib.load(name)
        return np.asarray(image.dataobj, dtype=np.float32), image.affine
    if name.endswith(".npy"):
        return np.load(name).astype(np.float32, copy=False), None
    import h5py

    with h5py.File(name, "r") as handle:
        dataset = handle["data"]
        affine = dataset.attrs.get("affine")
        return dataset[...].astype(np.float32, copy=False), affine


def check_equal(ours: Path, theirs: Path) -> str:
    """Outputs equal in shape, affine and values within 1e-5 relative; raise otherwise."""
    a, affine_a = _read_any(ours)
    b, affine_b = _read_any(theirs)
    if a.shape != b.shape:
        raise AssertionError(f"{ours}: shape {a.shape}, the baseline's {b.shape}")
    if affine_a is not None and affine_b is not None and not np.allclose(affine_a, affine_b):
        raise AssertionError(f"{ours}: affine\n{affine_a}\nthe baseline's\n{affine_b}")
    scale = float(np.abs(b).max()) or 1.0
    diff = float(np.abs(a - b).max()) / scale
    if diff > 1e-5:
        raise AssertionError(f"{ours}: max relative difference {diff:.2e} > 1e-5")
    return f"outputs equal (shape {a.shape}, affine, max rel diff {diff:.1e})"


# -- cases ----------------------------------------------------------------------


def alternate(contenders: dict[str, Callable[[], Run]], repeats: int) -> list[Row]:
    """Run each contender ``repeats`` times, taking turns (the order rotating)."""
    rows = {name: Row(name) for name in contenders}
    names = list(contenders)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            rows[name].runs.append(contenders[name]())
    return list(rows.values())


def print_table(title: str, rows: list[Row], goal: str, ratio: float, note: str) -> None:
    """One case: its rows, the ratio and the goal beside it."""
    print(f"\n{title}")
    header = f"  {'run':<26} {'median s':>9} {'best s':>8} {'CPU s':>7} {'peak RSS MiB':>13}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for row in rows:
        rss = f"{row.rss() / 2**20:13.0f}" if row.rss() else f"{'-':>13}"
        print(f"  {row.label:<26} {row.median():9.2f} {row.best():8.2f} {row.cpu():7.2f} {rss}")
    print(f"  ratio {ratio:.2f}x (medians); goal {goal}")
    if note:
        print(f"  {note}")


def mni_case(
    fmt: str, mni: Path, scratch: Path, repeats: int, threads: int | None
) -> tuple[float, bool]:
    """The MNI job to ``fmt`` by conv3dt and by the nibabel + PyTorch script."""
    folder = scratch / f"mni-{fmt}"
    folder.mkdir(exist_ok=True)
    ours, theirs = folder / f"conv3dt.{fmt}", folder / f"baseline.{fmt}"
    spec = EXAMPLES / "upsample2x.yaml"
    kernel, bias = (
        EXAMPLES / "data" / "upsample2x_kernel.npy",
        EXAMPLES / "data" / "upsample2x_bias.npy",
    )
    cli = [*conv3dt_command(), "upsample", str(mni), "-o", str(ours), "--spec", str(spec),
           "--overwrite"]  # fmt: skip
    script = [sys.executable, str(BASELINE), str(mni), str(theirs), "--kernel", str(kernel),
              "--bias", str(bias), "--strides", "2", "--padding", "same"]  # fmt: skip
    if threads:
        cli += ["--threads", str(threads)]
        script += ["--threads", str(threads)]
    rows = alternate(
        {
            "conv3dt upsample": lambda: run_child(cli),
            "nibabel + torch script": lambda: run_child(script),
        },
        repeats,
    )
    note = check_equal(ours, theirs)
    ratio = rows[1].median() / rows[0].median()
    goal = ">= 4x faster" if fmt == "nii.gz" else "none stated"
    title = (
        f"mni-{fmt.removeprefix('nii.')}: MNI152 T1 197x233x189 uint8 .nii.gz -> 394x466x378 "
        f"float32 .{fmt}, kernel 4 stride 2 same (trilinear), 1 filter"
    )
    print_table(title, rows, goal, ratio, note)
    for path in (ours, theirs):
        path.unlink(missing_ok=True)
    return ratio, ratio >= 4.0 if fmt == "nii.gz" else True


def big_case(
    scratch: Path, repeats: int, threads: int | None, noise: bool = False
) -> tuple[float, bool]:
    """160**3 .nii.gz -> 320**3 x 2 .nii.gz against gzip level 1 of the output's bytes."""
    folder = scratch / "big"
    folder.mkdir(exist_ok=True)
    source, ours = folder / f"in{'-noise' if noise else ''}.nii.gz", folder / "out.nii.gz"
    if not source.exists():
        write_big_input(source, BIG, noise)
    spec = big_spec(scratch)
    cli = [*conv3dt_command(), "upsample", str(source), "-o", str(ours), "--spec", str(spec),
           "--overwrite"]  # fmt: skip
    if threads:
        cli += ["--threads", str(threads)]
    run_child(cli)  # the output whose bytes the baseline compresses
    with gzip.open(ours, "rb") as handle:
        raw = handle.read()
    compressed: list[int] = []

    def stdlib_gzip() -> Run:
        return timed_in_process(lambda: compressed.append(len(gzip.compress(raw, 1))))

    rows = alternate(
        {"conv3dt upsample": lambda: run_child(cli), "gzip.compress(level=1)": stdlib_gzip},
        repeats,
    )
    ratio = rows[0].median() / rows[1].median()
    note = (
        f"output {len(raw) / 2**20:.0f} MiB raw; conv3dt's .nii.gz "
        f"{ours.stat().st_size / 2**20:.1f} MiB, the standard library's level 1 "
        f"{compressed[-1] / 2**20:.1f} MiB"
    )
    title = (
        f"big-gz{'-noise' if noise else ''}: {BIG}^3 float32 .nii.gz "
        f"({'normal noise' if noise else 'scan-like'}) -> {2 * BIG}^3 x 2 float32 .nii.gz on "
        f"{scratch}, kernel 3 stride 2 same, 2 filters, against gzip level 1 of the output alone"
    )
    print_table(title, rows, "<= 0.5x (conv3dt / gzip)", ratio, note)
    ours.unlink(missing_ok=True)
    return ratio, ratio <= 0.5


def batch_case(
    fmt: str, mni: Path, disk: Path, count: int, repeats: int, threads: int | None
) -> tuple[float, bool]:
    """A batch of MNI inputs, commits overlapped (as shipped) against commits inline."""
    folder = Path(tempfile.mkdtemp(prefix="conv3dt-bench-batch-", dir=disk))
    try:
        inputs = folder / "inputs"
        inputs.mkdir()
        for index in range(count):
            shutil.copyfile(mni, inputs / f"scan{index:02d}.nii.gz")
        out = folder / "out"
        wrapper = folder / "inline_commits.py"
        wrapper.write_text(_INLINE_COMMITS)
        options = ["upsample", str(inputs), "--output-dir", str(out), "--name",
                   "{stem}_up." + fmt, "--spec", str(EXAMPLES / "upsample2x.yaml"),
                   "--overwrite"]  # fmt: skip
        if threads:
            options += ["--threads", str(threads)]
        rows = alternate(
            {
                "conv3dt (commits behind)": lambda: run_child([*conv3dt_command(), *options]),
                "commits inline": lambda: run_child([sys.executable, str(wrapper), *options]),
            },
            repeats,
        )
        ratio = rows[1].median() / rows[0].median()
        written = sum(p.stat().st_size for p in out.iterdir()) / 2**20
        title = (
            f"batch-{fmt.removeprefix('nii.')}: {count} MNI152 inputs -> .{fmt} on {disk} "
            f"({written:.0f} MiB written per batch), one conv3dt upsample --output-dir"
        )
        note = (
            f"per file: {rows[0].median() / count:.2f} s overlapped, "
            f"{rows[1].median() / count:.2f} s inline"
        )
        print_table(title, rows, "none stated (the gain of overlapping)", ratio, note)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return ratio, True


def main() -> None:
    """Parse the options, run the chosen cases, print their tables and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated, from {', '.join(ALL_CASES)}")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender (median, best)")
    parser.add_argument("--mni", help=f"path to {MNI_NAME}")
    parser.add_argument("--scratch", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where outputs go (default /dev/shm: tmpfs)")  # fmt: skip
    parser.add_argument("--disk", default=tempfile.gettempdir(),
                        help="a folder on a real disk, for the batch cases")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8, help="inputs per batch case")
    parser.add_argument("--threads", type=int, help="threads for conv3dt and PyTorch (default all)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(ALL_CASES)}")
    mni = locate_mni(args.mni) if any(c.startswith(("mni", "batch")) for c in cases) else None
    scratch = Path(tempfile.mkdtemp(prefix="conv3dt-bench-e2e-", dir=args.scratch))
    import torch

    print(
        f"conv3dt end to end; {os.cpu_count()} CPUs, threads {args.threads or 'all'}; "
        f"PyTorch {torch.__version__}; outputs in {scratch}; {args.repeats} runs each, alternating"
    )
    results = {}
    try:
        for case in cases:
            if case.startswith("mni-"):
                fmt = {"mni-gz": "nii.gz", "mni-nii": "nii", "mni-npy": "npy", "mni-h5": "h5"}[case]
                assert mni is not None
                results[case] = mni_case(fmt, mni, scratch, args.repeats, args.threads)
            elif case.startswith("big-gz"):
                noise = case == "big-gz-noise"
                results[case] = big_case(scratch, args.repeats, args.threads, noise)
            else:
                fmt = "nii.gz" if case == "batch-gz" else "nii"
                assert mni is not None
                results[case] = batch_case(
                    fmt, mni, Path(args.disk), args.batch, args.repeats, args.threads
                )
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\nsummary (ratios of medians)")
    for case, (ratio, met) in results.items():
        goal = {"mni-gz": "goal >= 4x", "big-gz": "goal <= 0.5x", "big-gz-noise": "goal <= 0.5x"}
        goal = goal.get(case, "")
        mark = ("met" if met else "NOT met") if goal else ""
        print(f"  {case:<9} {ratio:6.2f}x  {goal} {mark}")


if __name__ == "__main__":
    main()
