"""Gzip benchmark: the compression libraries a ``.nii.gz`` output can go through.

Compresses and decompresses the same bytes with the standard library's zlib,
python-isal (ISA-L) and python-zlib-ng at their fastest levels, each on one
thread (one stream) and on two (conv3dt's
:class:`~conv3dt.volumes.gzip_codec.GzipBlockWriter` with that library: 4 MiB
blocks compressed on a thread pool, each primed with the 32 KiB before it,
joined into one gzip member; the libraries' own threaded writers for
reference), and prints MB/s of uncompressed data (per second of wall time and
per second of CPU time, all threads), the compressed size as a percentage of
the input, and decompression MB/s through ``decompressobj`` in 256 KiB pieces
(as the NIfTI reader decompresses).

Data
----
mni2x
    The MNI152 2009a template (197x233x189 uint8, from nilearn's wheel: pass
    ``--mni`` or have nilearn installed) upsampled 2x per axis as a trained
    layer would (linear interpolation, then a scale and bias that are not
    powers of two, so every float32 mantissa is used): 394x466x378 float32,
    277 MB, in NIfTI's (Fortran) order.
smooth
    A smooth float32 field of 320^3 x 2 channels (262 MB, the issue's
    160^3 -> 320^3 x 2 job's output size) with a little noise.

With ``--jobs``, whole ``conv3dt`` jobs are timed as well (library calls,
best of ``--repeat``), each to ``.nii`` and to ``.nii.gz`` with the library in
use and with the standard library's zlib in its place, next to the time
zlib's level 1 alone takes to compress the job's output bytes (one thread):

mni
    The MNI152 template (uint8) through a 1-filter, kernel 4, stride 2, same
    layer with positive random weights: a 394x466x378 float32 output.
smooth160x2
    A smooth 160^3 float32 volume through a 2-filter layer of the same shape:
    320^3 x 2 float32 (the issue's job).

Usage::

    python benchmarks/bench_gzip.py [--mni PATH] [--data mni2x,smooth] [--repeat 3]
        [--jobs] [--scratch DIR]

Each timing is the best of ``--repeat`` runs; the machine may be shared, so
compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import importlib
import io
import os
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

MB = 1e6
BLOCK = 4 << 20  # as conv3dt.volumes.gzip_codec.BLOCK_SIZE
MNI_MEMBER = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _mni_path(given: str | None) -> Path | None:
    if given:
        return Path(given)
    try:
        nilearn = importlib.import_module("nilearn")
    except ImportError:
        return None
    path = Path(nilearn.__file__).parent / "datasets/data" / Path(MNI_MEMBER).name
    return path if path.exists() else None


def _upsample2x(volume: np.ndarray) -> np.ndarray:
    """Linear 2x upsampling per axis (even outputs copy, odd ones average neighbours)."""
    out = volume.astype(np.float32)
    for axis in range(3):
        n = out.shape[axis]
        shape = list(out.shape)
        shape[axis] = 2 * n
        up = np.empty(shape, dtype=np.float32)
        even = [slice(None)] * 3
        odd = [slice(None)] * 3
        even[axis] = slice(0, None, 2)
        odd[axis] = slice(1, None, 2)
        up[tuple(even)] = out
        nxt = np.concatenate([out.take(range(1, n), axis), out.take([n - 1], axis)], axis)
        up[tuple(odd)] = (out + nxt) * np.float32(0.5)
        out = up
    return out


def data_mni2x(path: Path) -> bytes:
    import nibabel as nib

    volume = np.asarray(nib.load(str(path)).dataobj)
    up = _upsample2x(volume) * np.float32(0.0123457) + np.float32(0.0314159)
    return np.asfortranarray(up).tobytes(order="F")


def data_smooth() -> bytes:
    n = 320
    rng = np.random.default_rng(0)
    i = np.arange(n, dtype=np.float32)
    a = np.sin(i / 7.3)[:, None, None] * np.cos(i / 11.9)[None, :, None]
    channels = []
    for c in range(2):
        field = a * np.sin(i / (5.1 + c))[None, None, :]
        field += rng.normal(0, 0.01, field.shape).astype(np.float32)
        channels.append(field)
    return np.stack(channels, axis=-1).astype(np.float32).tobytes(order="F")


# -- compressors ---------------------------------------------------------------


def _member(deflate: bytes, crc: int, size: int) -> bytes:
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + deflate + struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)


def one_thread(module: object, level: int) -> Callable[[bytes], bytes]:
    """One deflate stream on this thread, fed 4 MiB at a time.

    Pieces rather than one call: a library growing one output buffer for
    hundreds of MB of barely compressible data spends its time copying it.
    """

    def run(data: bytes) -> bytes:
        c = module.compressobj(level, module.DEFLATED, -15)
        view = memoryview(data)
        crc = 0
        parts = []
        for start in range(0, len(view), BLOCK):
            piece = view[start : start + BLOCK]
            parts.append(c.compress(piece))
            crc = module.crc32(piece, crc)
        parts.append(c.flush())
        return _member(b"".join(parts), crc, len(data))

    return run


@contextlib.contextmanager
def _compressing_with(module: object, level: int) -> Iterator[None]:
    """conv3dt's gzip_codec with another library (and level) in place of its own."""
    from conv3dt.volumes import gzip_codec

    saved = gzip_codec.COMPRESSOR, gzip_codec._compress_module, gzip_codec.LEVEL
    gzip_codec.COMPRESSOR, gzip_codec._compress_module, gzip_codec.LEVEL = (
        module.__name__,
        module,
        level,
    )
    try:
        yield
    finally:
        gzip_codec.COMPRESSOR, gzip_codec._compress_module, gzip_codec.LEVEL = saved


def blocks(module: object, level: int, threads: int) -> Callable[[bytes], bytes]:
    """conv3dt's GzipBlockWriter with this library: 4 MiB blocks on ``threads`` threads."""

    def run(data: bytes) -> bytes:
        from conv3dt.volumes import gzip_codec

        buffer = io.BytesIO()
        with _compressing_with(module, level):
            with gzip_codec.GzipBlockWriter(buffer, threads=threads, block_size=BLOCK) as writer:
                writer.write(data)
        return buffer.getvalue()

    return run


def library_writer(open_: Callable[..., object], level: int, threads: int) -> Callable:
    def run(data: bytes) -> bytes:
        buffer = io.BytesIO()
        with open_(buffer, "wb", level, threads=threads, block_size=BLOCK) as f:
            f.write(data)
        return buffer.getvalue()

    return run


def inflate(module: object) -> Callable[[bytes], int]:
    """Decompress in 64 KiB of input and at most 256 KiB of output a call, as NiftiReader."""

    def run(compressed: bytes) -> int:
        d = module.decompressobj(16 + 15)
        view = memoryview(compressed)
        produced = 0
        offset = 0
        tail: bytes | memoryview = b""
        while not d.eof:
            if not tail:
                tail = view[offset : offset + (64 << 10)]
                offset += len(tail)
                if not tail:
                    raise EOFError
            produced += len(d.decompress(tail, 256 << 10))
            tail = d.unconsumed_tail
        return produced

    return run


def best(function: Callable, argument: object, repeat: int) -> tuple[float, object]:
    """The least wall time of ``repeat`` calls, and the last call's result."""
    return best_cpu(function, argument, repeat)[0::2]  # type: ignore[return-value]


def best_cpu(function: Callable, argument: object, repeat: int) -> tuple[float, float, object]:
    """The least wall time and the least CPU time (all threads) of ``repeat`` calls.

    On a shared machine the CPU time says what a candidate costs; the wall time
    what it gains from a second core when one is free.
    """
    walls, cpus = [], []
    result = None
    for _ in range(repeat):
        start, cpu = time.perf_counter(), time.process_time()
        result = function(argument)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def candidates() -> list[tuple[str, Callable, Callable | None]]:
    rows: list[tuple[str, Callable, Callable | None]] = [
        ("zlib 1 (stdlib), 1 thread", one_thread(zlib, 1), inflate(zlib)),
        ("zlib 1 (stdlib), 2 threads, conv3dt blocks", blocks(zlib, 1, 2), None),
    ]
    try:
        from isal import igzip_threaded, isal_zlib

        rows += [
            ("isal 0, 1 thread", one_thread(isal_zlib, 0), inflate(isal_zlib)),
            ("isal 1, 1 thread", one_thread(isal_zlib, 1), None),
            ("isal 0, 2 threads, conv3dt blocks", blocks(isal_zlib, 0, 2), None),
            ("isal 1, 2 threads, conv3dt blocks", blocks(isal_zlib, 1, 2), None),
            ("isal 1, igzip_threaded 2", library_writer(igzip_threaded.open, 1, 2), None),
        ]
    except ImportError:
        print("python-isal not installed: its rows are skipped", file=sys.stderr)
    try:
        from zlib_ng import gzip_ng_threaded, zlib_ng

        rows += [
            ("zlib-ng 1, 1 thread", one_thread(zlib_ng, 1), inflate(zlib_ng)),
            ("zlib-ng 1, 2 threads, conv3dt blocks", blocks(zlib_ng, 1, 2), None),
            ("zlib-ng 1, gzip_ng_threaded 2", library_writer(gzip_ng_threaded.open, 1, 2), None),
        ]
    except ImportError:
        print("python-zlib-ng not installed: its rows are skipped", file=sys.stderr)
    return rows


def _job_spec(filters: int) -> object:
    from conv3dt import Conv3DTranspose
    from conv3dt.spec import LayerSpec

    layer = Conv3DTranspose(filters=filters, kernel_size=4, strides=2, padding="same")
    rng = np.random.default_rng(0)
    kernel = rng.uniform(0, 0.3, layer.kernel_shape(1)).astype(np.float32)
    layer.set_weights([kernel, np.full(filters, 0.01, np.float32)])
    return LayerSpec(layer=layer, source="bench", seed=3)


def jobs(mni: Path | None, scratch: Path, repeat: int) -> None:
    import nibabel as nib

    from conv3dt.run import upsample_file
    from conv3dt.volumes import gzip_codec

    smooth = scratch / "smooth160.nii.gz"
    i = np.arange(160, dtype=np.float32)
    volume = np.sin(i / 7.3)[:, None, None] * np.cos(i / 11.9)[None, :, None]
    volume = volume * np.sin(i / 5.1)[None, None, :]
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), smooth)
    cases = [("smooth160x2", smooth, _job_spec(2))]
    if mni is not None:
        cases.insert(0, ("mni", mni, _job_spec(1)))
    fast = gzip_codec.COMPRESSOR, gzip_codec._compress_module, gzip_codec.LEVEL
    print(f"\njobs: best of {repeat}; {gzip_codec.describe()} vs zlib level 1 in its place")
    for name, source, spec in cases:
        # Once untimed: compiles the engine and reads the input into the page cache.
        upsample_file(spec, str(source), str(scratch / f"{name}.nii"))
        row = []
        for mode in ("nii", "fast", "zlib"):
            if mode == "zlib":  # as where isal cannot be imported
                gzip_codec.COMPRESSOR, gzip_codec._compress_module, gzip_codec.LEVEL = (
                    "zlib",
                    zlib,
                    1,
                )
            out = scratch / (f"{name}.nii" if mode == "nii" else f"{name}_{mode}.nii.gz")
            run = functools.partial(upsample_file, spec, str(source))
            try:
                seconds, _ = best(lambda path, run=run: run(str(path)), out, repeat)
            finally:
                gzip_codec.COMPRESSOR, gzip_codec._compress_module, gzip_codec.LEVEL = fast
            row.append(f"{mode} {seconds:.2f} s ({out.stat().st_size / MB:.0f} MB)")
        raw = (scratch / f"{name}.nii").read_bytes()
        seconds, _ = best(one_thread(zlib, 1), raw, max(1, repeat - 1))
        row.append(f"zlib level 1 alone on the output bytes {seconds:.2f} s")
        print(f"{name}: " + ", ".join(row), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mni", help="path of mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    parser.add_argument("--data", default="mni2x,smooth")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", action="store_true", help="also time whole conv3dt jobs")
    parser.add_argument("--scratch", help="directory for the jobs' files (default: temporary)")
    args = parser.parse_args()
    sets = []
    for name in args.data.split(","):
        if name == "mni2x":
            path = _mni_path(args.mni)
            if path is None:
                print("mni2x skipped: pass --mni or install nilearn", file=sys.stderr)
                continue
            sets.append((name, data_mni2x(path)))
        elif name == "smooth":
            sets.append((name, data_smooth()))
        else:
            parser.error(f"unknown data set {name!r}")
    print(f"cores: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}")
    for name, data in sets:
        print(f"\n{name}: {len(data) / MB:.0f} MB, best of {args.repeat}")
        print(
            f"{'candidate':48s} {'compress MB/s':>13s} {'MB/cpu-s':>8s} {'size %':>7s}"
            f" {'inflate MB/s':>12s}"
        )
        for label, compress, decompress in candidates():
            seconds, cpu, compressed = best_cpu(compress, data, args.repeat)
            # Every output must be a gzip file the standard library reads back.
            assert gzip.decompress(compressed) == data, label
            inflate_text = ""
            if decompress is not None:
                inflate_seconds, produced = best(decompress, compressed, args.repeat)
                assert produced == len(data), label
                inflate_text = f"{len(data) / MB / inflate_seconds:12.0f}"
            ratio = 100 * len(compressed) / len(data)
            print(
                f"{label:48s} {len(data) / MB / seconds:13.0f} {len(data) / MB / cpu:8.0f}"
                f" {ratio:7.1f} {inflate_text}",
                flush=True,
            )
    if args.jobs:
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            jobs(_mni_path(args.mni), Path(scratch), args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
