"""Streaming benchmark: volumes larger than the memory budget, disk to engine to disk.

Runs ``conv3dt upsample`` as a subprocess under ``/usr/bin/time -v`` (or, when
that is missing, under a small Python wrapper reading ``RUSAGE_CHILDREN``) and
reports each run's peak resident set size against ``--memory-limit`` plus a
fixed allowance for the interpreter and its libraries, its wall time, and a
check of the output against an independent computation, read back tile by tile.

Cases
-----
a512, a512h5, a768
    A float32 ``.npy`` volume of n**3 through a 1-filter, kernel 2, stride 2,
    valid layer (output (2n)**3), written as ``.npy`` (and chunked HDF5 for
    512). Checked at every voxel against the closed form
    ``out[2i+a, 2j+b, 2k+c] = x[i, j, k] * K[a, b, c] + bias`` (bit for bit).
    The 768 case (a 13.5 GiB output) runs only with 40 GB free on the disk.
numpy-write
    The time NumPy takes to write (``np.save`` and ``fsync``) an array of the
    512 case's output size to the same disk, for the time bound: the 512 case
    must take at most 1.5 times as long. Both are timed ``--repeat`` times,
    alternating, and their medians compared, since the machine is shared.
b256
    A 256**3 volume with 4 channels through an 8-filter, kernel 3, stride 2,
    same layer (a 4 GiB output); random voxels checked against a direct sum.
b256nii
    The b256 job (with b256) written as int16 ``.nii`` and ``.nii.gz``
    (2 GiB); random voxels checked against the ``.npy`` output, quantized with
    the file's scaling (exactly). To compare with the b256 row: its output is
    channels last, NIfTI's channels slowest, so every tile is transposed.
d256gz
    ``.nii.gz`` in and out: 256**3 through the kernel 2 stride 2 layer, every
    voxel checked against the closed form.
e384ome
    OME-Zarr in and out (NGFF 0.5, Zarr v3, input chunks of 64**3): 384**3
    through the kernel 2 stride 2 layer with ``--pyramid 1``; every voxel of
    level 0 checked against the closed form, and level 1 against the 2x2x2
    mean of level 0 (needs zarr).
f384tif
    ImageJ TIFF in and out: a 384**3 stack through the kernel 2 stride 2
    layer into a 768**3 hyperstack (1.7 GiB); every voxel checked against the
    closed form (needs tifffile).

Usage::

    python benchmarks/bench_streaming.py [--scratch DIR] [--memory-limit 512M]
        [--cases a512,a512h5,numpy-write,b256,b256nii,d256gz,e384ome,f384tif,a768] [--keep]

Timings are wall-clock on whatever else the machine is doing: noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ALL_CASES = (
    "a512",
    "a512h5",
    "numpy-write",
    "b256",
    "b256nii",
    "d256gz",
    "e384ome",
    "f384tif",
    "a768",
)
ALLOWANCE = 200 * 2**20  # the interpreter, NumPy, h5py, nibabel, Numba and their code
TIME_FACTOR = 1.5
SLAB = 16  # input planes per verification read


def conv3dt_command() -> list[str]:
    """The installed ``conv3dt`` beside this interpreter, else ``python -m conv3dt``."""
    beside = Path(sys.executable).with_name("conv3dt")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "conv3dt"]


_WRAPPER = (
    "import resource, subprocess, sys; "
    "code = subprocess.call(sys.argv[1:]); "
    "print('Maximum resident set size (kbytes): %d' % "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


def measured(command: list[str]) -> tuple[float, int, dict, str]:
    """Run a command; return wall seconds, peak RSS bytes, its JSON line and stderr."""
    if os.path.exists("/usr/bin/time"):
        wrapped = ["/usr/bin/time", "-v", *command]
    else:
        wrapped = [sys.executable, "-c", _WRAPPER, *command]
    started = time.perf_counter()
    done = subprocess.run(wrapped, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    assert match, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return seconds, int(match.group(1)) * 1024, json.loads(lines[-1]) if lines else {}, done.stderr


# -- inputs and layers ------------------------------------------------------------


def write_npy(path: Path, shape: tuple[int, ...], seed: int) -> None:
    """A float32 .npy of normal values, written slab by slab (never whole in memory)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for start in range(0, shape[0], SLAB):
            rng = np.random.default_rng((seed, start))
            stop = min(start + SLAB, shape[0])
            handle.write(rng.standard_normal((stop - start, *shape[1:]), dtype=np.float32))


def write_nii_gz(path: Path, n: int, seed: int) -> None:
    """A float32 .nii.gz of n**3 (first index fastest), written slab by slab along k."""
    import gzip
    import io

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((n, n, n))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    buffer = io.BytesIO()
    header.write_to(buffer)
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(buffer.getvalue())
        for start in range(0, n, SLAB):
            rng = np.random.default_rng((seed, start))
            # Smooth data with noise, so the file compresses like an image.
            k = np.arange(start, min(start + SLAB, n), dtype=np.float32)
            i = np.arange(n, dtype=np.float32)
            slab = np.sin(i[:, None, None] / 9) * np.cos(i[None, :, None] / 13) + k / n
            slab = slab + 0.01 * rng.standard_normal(slab.shape, dtype=np.float32)
            handle.write(np.asfortranarray(slab.astype(np.float32)).tobytes(order="F"))


def write_ome_zarr(path: Path, n: int, seed: int) -> None:
    """A float32 NGFF 0.5 image of n**3 in chunks of 64**3, written slab by slab."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    array = group.create_array("0", shape=(n, n, n), chunks=(64, 64, 64), dtype="float32")
    for start in range(0, n, 64):
        rng = np.random.default_rng((seed, start))
        array[start : start + 64] = rng.standard_normal((min(64, n - start), n, n), np.float32)
    axes = [{"name": name, "type": "space", "unit": "micrometer"} for name in "zyx"]
    dataset = {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * 3}]}
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": axes, "datasets": [dataset]}],
    }


def write_tiff(path: Path, n: int, seed: int) -> None:
    """A float32 ImageJ stack of n**3, its pages generated one at a time."""
    import tifffile

    def pages():
        for start in range(n):
            yield np.random.default_rng((seed, start)).standard_normal((n, n), np.float32)

    tifffile.imwrite(
        path, pages(), shape=(n, n, n), dtype=np.float32, imagej=True, metadata={"axes": "ZYX"}
    )


def write_spec(directory: Path, name: str, layer: dict, kernel: np.ndarray, bias: np.ndarray):
    np.save(directory / f"{name}_kernel.npy", kernel)
    np.save(directory / f"{name}_bias.npy", bias)
    spec = {
        "layer": layer,
        "weights": {"kernel": f"{name}_kernel.npy", "bias": f"{name}_bias.npy"},
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


# -- independent checks ----------------------------------------------------------------


def closed_form_k2s2(x: np.ndarray, kernel: np.ndarray, bias: float) -> np.ndarray:
    """out[2i+a, 2j+b, 2k+c] = x[i, j, k] * K[a, b, c] + bias, for a slab of x."""
    k = kernel[:, :, :, 0, 0]
    blocks = x[:, None, :, None, :, None] * k[None, :, None, :, None, :]
    out = blocks + np.float32(bias)
    n0, n1, n2 = x.shape
    return out.reshape(2 * n0, 2 * n1, 2 * n2)


def check_k2s2_c_order(
    input_path: Path, read_output, kernel, bias, source=None
) -> tuple[int, float]:
    """Compare every voxel, slab by slab; returns (mismatches, max abs difference).

    The input is the .npy at ``input_path``, or ``source`` (any array-like) when given.
    """
    x_all = np.load(input_path, mmap_mode="r") if source is None else source
    mismatches, worst = 0, 0.0
    for start in range(0, x_all.shape[0], SLAB):
        x = np.array(x_all[start : start + SLAB])
        expected = closed_form_k2s2(x, kernel, bias)
        got = read_output(2 * start, 2 * start + expected.shape[0])
        diff = got != expected
        mismatches += int(diff.sum())
        if diff.any():
            worst = max(worst, float(np.abs(got.astype(np.float64) - expected).max()))
    return mismatches, worst


def check_k2s2_nifti(input_path: Path, output_path: Path, kernel, bias) -> tuple[int, float]:
    """Every voxel of a .nii.gz output, k slab by k slab (forward reads of both files)."""
    import nibabel as nib

    source = nib.load(input_path).dataobj
    result = nib.load(output_path).dataobj
    n = source.shape[2]
    mismatches, worst = 0, 0.0
    for start in range(0, n, SLAB):
        x = np.asarray(source[:, :, start : start + SLAB], dtype=np.float32)
        expected = closed_form_k2s2(x, kernel, bias)
        got = np.asarray(result[:, :, 2 * start : 2 * start + expected.shape[2]])
        diff = got != expected
        mismatches += int(diff.sum())
        if diff.any():
            worst = max(worst, float(np.abs(got.astype(np.float64) - expected).max()))
    return mismatches, worst


def check_ome_zarr(input_path: Path, output_path: Path, kernel, bias) -> tuple[int, float]:
    """Every voxel of level 0 against the closed form, and level 1 against level 0's 2x mean."""
    import zarr

    source = zarr.open_array(str(input_path / "0"), mode="r")
    level0 = zarr.open_array(str(output_path / "0"), mode="r")
    level1 = zarr.open_array(str(output_path / "1"), mode="r")
    mismatches, worst = check_k2s2_c_order(
        input_path, lambda a, b: np.asarray(level0[a:b]), kernel, bias, source=source
    )
    for start in range(0, level1.shape[0], SLAB):
        fine = np.asarray(level0[2 * start : 2 * start + 2 * SLAB], dtype=np.float64)
        z, y, x = (n // 2 for n in fine.shape)
        expected = fine.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5)).astype(np.float32)
        got = np.asarray(level1[start : start + SLAB])
        diff = np.abs(got.astype(np.float64) - expected)
        # The mean is summed in float64 in a different order: equal to a float32 ulp.
        bad = diff > 1e-6 * np.maximum(1.0, np.abs(expected))
        mismatches += int(bad.sum())
        worst = max(worst, float(diff.max()))
    return mismatches, worst


def check_same_layer_samples(
    input_path: Path, output_path: Path, kernel: np.ndarray, bias: np.ndarray, count: int = 3000
) -> tuple[int, float]:
    """Random voxels of a k3 s2 'same' layer by direct summation (Keras's padding rule)."""
    x = np.load(input_path, mmap_mode="r")
    y = np.load(output_path, mmap_mode="r")
    ksize, stride = kernel.shape[0], 2
    # Keras 'same': total padding stride + k - 2, left part min(ceil(total / 2), k - 1);
    # output index o is full-output index o + (k - 1 - left).
    total = stride + ksize - 2
    left = min(total // 2 + total % 2, ksize - 1)
    crop = ksize - 1 - left
    rng = np.random.default_rng(0)
    bad, worst = 0, 0.0
    for _ in range(count):
        o = rng.integers(0, y.shape[:3])
        value = bias.astype(np.float64).copy()
        for taps in np.ndindex(ksize, ksize, ksize):
            full = o + crop - np.array(taps)
            if np.any(full % stride) or np.any(full < 0):
                continue
            i = full // stride
            if np.any(i >= x.shape[:3]):
                continue
            value += kernel[taps].astype(np.float64) @ x[tuple(i)].astype(np.float64)
        got = np.asarray(y[tuple(o)], dtype=np.float64)
        error = float(np.abs(got - value).max())
        worst = max(worst, error)
        bad += int(not np.allclose(got, value, rtol=1e-5, atol=1e-5))
    return bad, worst


def check_int16_nifti_samples(
    reference: Path, output: Path, count: int = 3000
) -> tuple[int, float]:
    """Random voxels of an int16 NIfTI output against the float32 .npy output of the same run.

    The stored integers must be the reference quantized with the file's scaling,
    exactly. The file is read forward once (a .nii.gz cannot be read otherwise).
    """
    import gzip

    import nibabel as nib

    y = np.load(reference, mmap_mode="r")
    image = nib.load(output)
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    shape = image.shape  # (i, j, k, 1, c): filters are vector components
    rng = np.random.default_rng(0)
    voxels = rng.integers(0, y.shape, size=(count, 4))
    offsets = np.ravel_multi_index(
        (voxels[:, 0], voxels[:, 1], voxels[:, 2], np.zeros(count, int), voxels[:, 3]),
        shape,
        order="F",
    )
    order = np.argsort(offsets)
    got = np.empty(count, dtype=np.int16)
    opener = gzip.open if output.name.endswith(".gz") else open
    with opener(output, "rb") as handle:
        handle.seek(int(image.dataobj.offset))
        position, block = 0, 64 << 20
        data = np.empty(0, dtype="<i2")
        for index in order:
            while offsets[index] >= position + data.size:
                position += data.size
                data = np.frombuffer(handle.read(block), dtype="<i2")
            got[index] = data[offsets[index] - position]
    expected = y[voxels[:, 0], voxels[:, 1], voxels[:, 2], voxels[:, 3]].astype(np.float64)
    want = np.clip(np.rint((expected - inter) / slope), -32768, 32767).astype(np.int16)
    diff = np.abs(got.astype(np.int64) - want)
    return int((diff != 0).sum()), float(diff.max())


# -- the cases ------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scratch", default="/work/tmp_bench/streaming")
    parser.add_argument("--memory-limit", default="512M")
    parser.add_argument("--cases", default=",".join(ALL_CASES))
    parser.add_argument("--keep", action="store_true", help="keep the scratch files")
    parser.add_argument("--repeat", type=int, default=3, help="timings of a512 and numpy-write")
    args = parser.parse_args()
    cases = args.cases.split(",")
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    from conv3dt.plan import parse_memory

    limit = parse_memory(args.memory_limit)
    bound = limit + ALLOWANCE
    base = [*conv3dt_command(), "upsample", "--json", "-q", "--overwrite"]
    base += ["--memory-limit", args.memory_limit]
    free = shutil.disk_usage(scratch).free
    print(f"scratch {scratch}: {free / 2**30:.1f} GiB free; RSS bound {bound / 2**20:.0f} MiB")
    print(f"timer: {'/usr/bin/time -v' if os.path.exists('/usr/bin/time') else 'getrusage'}")
    rows: list[dict] = []

    def record(case, out_bytes, seconds, rss, info, check, time_ok=None):
        rows.append(
            dict(
                case=case,
                out_gib=out_bytes / 2**30,
                seconds=seconds,
                rss_mib=rss / 2**20 if rss is not None else None,
                plan_mib=info.get("expected_peak_bytes", 0) / 2**20 if info else None,
                tile=info.get("tile_shape") if info else None,
                rss_ok=None if rss is None else rss <= bound,
                check=check,
                time_ok=time_ok,
            )
        )
        print(rows[-1], flush=True)

    rng = np.random.default_rng(1)
    k2 = rng.standard_normal((2, 2, 2, 1, 1)).astype(np.float32)
    b2 = rng.standard_normal(1).astype(np.float32)
    layer_k2 = {"filters": 1, "kernel_size": 2, "strides": 2, "padding": "valid"}
    spec_k2 = write_spec(scratch, "k2s2", layer_k2, k2, b2)

    def numpy_write() -> float:
        array = np.ones((1024, 1024, 1024), dtype=np.float32)
        target = scratch / "numpy_write.npy"
        started = time.perf_counter()
        np.save(target, array)
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        seconds = time.perf_counter() - started
        target.unlink()
        return seconds

    def run_a(n: int, fmt: str, repeat: int = 1) -> list[float]:
        src = scratch / f"a{n}.npy"
        if not src.exists():
            write_npy(src, (n, n, n), seed=n)
        dst = scratch / (f"a{n}_up.npy" if fmt == "npy" else f"a{n}_up.h5")
        command = [*base, "--spec", str(spec_k2), str(src), "-o", str(dst)]
        times, rsses, writes = [], [], []
        for _ in range(repeat):
            seconds, rss, info, _ = measured(command)
            times.append(seconds)
            rsses.append(rss)
            if "numpy-write" in cases:
                writes.append(numpy_write())
        if fmt == "npy":
            out = np.load(dst, mmap_mode="r")
            check = check_k2s2_c_order(src, lambda a, b: np.array(out[a:b]), k2, float(b2[0]))
            del out
        else:
            import h5py

            with h5py.File(dst, "r") as handle:
                data = handle["data"]
                print(f"  HDF5 chunks {data.chunks}, tile {info.get('tile_shape')}")
                check = check_k2s2_c_order(src, lambda a, b: data[a:b], k2, float(b2[0]))
        seconds = float(np.median(times))
        record(f"a{n} npy->{fmt}", 8 * n**3 * 4, seconds, max(rsses), info, check)
        print(f"  times {[round(t, 1) for t in times]}")
        dst.unlink()
        return writes and [seconds, float(np.median(writes)), *writes]

    if "a512" in cases:
        timed = run_a(512, "npy", args.repeat)
        if timed:
            seconds, write = timed[0], timed[1]
            ok = seconds <= TIME_FACTOR * write
            record("numpy-write 4 GiB", 2**32, write, None, {}, None, ok)
            print(f"  numpy-write times {[round(t, 1) for t in timed[2:]]}")
            print(f"  a512 / numpy-write = {seconds / write:.2f} (bound {TIME_FACTOR})")
    if "a512h5" in cases:
        run_a(512, "h5")
    if "b256" in cases:
        src = scratch / "b256.npy"
        if not src.exists():
            write_npy(src, (256, 256, 256, 4), seed=256)
        k3 = (rng.standard_normal((3, 3, 3, 8, 4)) / 10).astype(np.float32)
        b8 = rng.standard_normal(8).astype(np.float32)
        layer = {"filters": 8, "kernel_size": 3, "strides": 2, "padding": "same"}
        spec = write_spec(scratch, "k3s2", layer, k3, b8)
        dst = scratch / "b256_up.npy"
        seconds, rss, info, _ = measured([*base, "--spec", str(spec), str(src), "-o", str(dst)])
        check = check_same_layer_samples(src, dst, k3, b8)
        record("b256x4 k3s2 same 8f", 512**3 * 8 * 4, seconds, rss, info, check)
        if "b256nii" in cases:
            for extension in (".nii", ".nii.gz"):
                target = scratch / f"b256_up{extension}"
                command = [*base, "--spec", str(spec), str(src), "-o", str(target)]
                seconds, rss, info, _ = measured([*command, "--output-dtype", "int16"])
                check = check_int16_nifti_samples(dst, target)
                record(f"b256x4 8f -> int16 {extension}", 512**3 * 8 * 2, seconds, rss, info, check)
                target.unlink()
        dst.unlink()
        src.unlink()
    if "d256gz" in cases:
        src = scratch / "d256.nii.gz"
        if not src.exists():
            write_nii_gz(src, 256, seed=7)
        dst = scratch / "d256_up.nii.gz"
        seconds, rss, info, _ = measured([*base, "--spec", str(spec_k2), str(src), "-o", str(dst)])
        check = check_k2s2_nifti(src, dst, k2, float(b2[0]))
        record("d256 nii.gz->nii.gz", 512**3 * 4, seconds, rss, info, check)
        dst.unlink()
        src.unlink()
    if "e384ome" in cases:
        src = scratch / "e384.ome.zarr"
        if not src.exists():
            write_ome_zarr(src, 384, seed=384)
        dst = scratch / "e384_up.ome.zarr"
        command = [*base, "--spec", str(spec_k2), str(src), "-o", str(dst), "--pyramid", "1"]
        seconds, rss, info, _ = measured(command)
        check = check_ome_zarr(src, dst, k2, float(b2[0]))
        record("e384 ome.zarr->ome.zarr", 768**3 * 4 * 9 / 8, seconds, rss, info, check)
        shutil.rmtree(dst)
        shutil.rmtree(src)
    if "f384tif" in cases:
        import tifffile

        src = scratch / "f384.tif"
        if not src.exists():
            write_tiff(src, 384, seed=384)
        dst = scratch / "f384_up.tif"
        seconds, rss, info, _ = measured([*base, "--spec", str(spec_k2), str(src), "-o", str(dst)])
        source, result = tifffile.memmap(src, mode="r"), tifffile.memmap(dst, mode="r")
        check = check_k2s2_c_order(
            src, lambda a, b: np.array(result[a:b]), k2, float(b2[0]), source=source
        )
        del source, result
        record("f384 tif->tif", 768**3 * 4, seconds, rss, info, check)
        dst.unlink()
        src.unlink()
    if "a768" in cases:
        if shutil.disk_usage(scratch).free < 40 * 10**9:
            print("a768 skipped: less than 40 GB free on the scratch disk")
        else:
            run_a(768, "npy")
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)

    print()
    print(f"memory limit {args.memory_limit}; RSS bound = limit + {ALLOWANCE // 2**20} MiB")
    header = f"{'case':24} {'out GiB':>8} {'seconds':>8} {'peak RSS MiB':>13} {'plan MiB':>9}"
    print(header + f" {'tile':>16} {'RSS ok':>7} {'check (bad, max diff)':>22} {'time ok':>8}")
    for row in rows:
        rss = "-" if row["rss_mib"] is None else f"{row['rss_mib']:.0f}"
        plan = "-" if row["plan_mib"] is None else f"{row['plan_mib']:.0f}"
        tile = "-" if not row["tile"] else "x".join(str(t) for t in row["tile"])
        print(
            f"{row['case']:24} {row['out_gib']:8.2f} {row['seconds']:8.1f} {rss:>13} {plan:>9} "
            f"{tile:>16} {row['rss_ok']!s:>7} {row['check']!s:>22} {row['time_ok']!s:>8}"
        )
    failed = [r for r in rows if r["rss_ok"] is False or r["time_ok"] is False]
    failed += [r for r in rows if r["check"] is not None and r["check"][0] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
