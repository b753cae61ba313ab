"""Gzip compression of .nii.gz outputs and decompression of .nii.gz inputs.

The block writer's output must be one valid gzip member whatever the thread
count and block size, read by the standard library, ``gzip -d``, nibabel and
SimpleITK, with the data of an uncompressed ``.nii`` of the same job byte for
byte; the standard-library fallback must do the same; damaged members must be
refused; and stopping must leave no file and no thread behind.
"""

from __future__ import annotations

import errno
import gzip
import importlib
import itertools
import os
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conv3dt import Conv3DTranspose
from conv3dt.engine.threads import get_threads
from conv3dt.geometry import axis_geometry
from conv3dt.plan import plan_tiles
from conv3dt.run import upsample_file
from conv3dt.spec import LayerSpec
from conv3dt.volumes import VolumeError, VolumeWriteError, gzip_codec
from conv3dt.volumes.nifti import NiftiReader, NiftiWriter

SMALL_BLOCK = 64 << 10  # the least block size: many blocks from small volumes


def _gzip_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("conv3dt-gzip")]


def _members(data: bytes) -> int:
    """How many gzip members ``data`` holds (each one's CRC and length checked by zlib)."""
    count = 0
    while data:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        d.decompress(data)
        assert d.eof, "a member is cut short"
        count += 1
        data = d.unused_data
    return count


def _compress(data: bytes, **options) -> bytes:
    class Sink:
        def __init__(self) -> None:
            self.parts: list[bytes] = []

        def write(self, part) -> int:
            self.parts.append(bytes(part))
            return len(part)

    sink = Sink()
    with gzip_codec.GzipBlockWriter(sink, **options) as writer:
        # Pieces of uneven sizes, some crossing block boundaries.
        for start, stop in zip([0, 7, 1000, 200_000], [7, 1000, 200_000, None], strict=True):
            writer.write(data[start:stop])
    return b"".join(sink.parts)


def _sample(n: int) -> bytes:
    """Float32 bytes that compress partly, as voxel data does."""
    rng = np.random.default_rng(n)
    values = np.repeat(rng.standard_normal(n // 16 + 1).astype(np.float32), 4)
    return values.tobytes()[:n]


@pytest.fixture
def stdlib_only(monkeypatch):
    """gzip_codec as imported where isal cannot be imported."""
    monkeypatch.setitem(sys.modules, "isal", None)
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)
    importlib.reload(gzip_codec)
    assert gzip_codec.COMPRESSOR == "zlib"
    yield
    monkeypatch.undo()
    importlib.reload(gzip_codec)


# -- the block writer --------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, SMALL_BLOCK - 1, SMALL_BLOCK, 3 * SMALL_BLOCK + 5])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_block_writer_writes_one_member_the_standard_library_reads(size, threads):
    data = _sample(size)
    compressed = _compress(data, threads=threads, block_size=SMALL_BLOCK, name="a.nii")
    assert gzip.decompress(compressed) == data
    assert _members(compressed) == 1
    assert compressed[3] & 0x08 and compressed[10:16] == b"a.nii\0"  # FNAME
    assert not _gzip_threads()


def test_block_writer_output_does_not_depend_on_the_thread_count():
    # Blocks are primed with the bytes before them, never with a thread's state.
    data = _sample(5 * SMALL_BLOCK + 123)
    outputs = {_compress(data, threads=n, block_size=SMALL_BLOCK) for n in (2, 3, 4)}
    assert len(outputs) == 1
    # One thread compresses one stream, without blocks: other bytes, same data.
    single = _compress(data, threads=1, block_size=SMALL_BLOCK)
    assert single not in outputs and gzip.decompress(single) == data


def test_block_writer_blocks_compress_nearly_as_well_as_one_stream():
    data = _sample(8 * SMALL_BLOCK)
    blocks = len(_compress(data, block_size=SMALL_BLOCK))
    whole = len(_compress(data, block_size=len(data)))
    assert whole < blocks < whole * 1.02


def test_gzip_command_reads_the_blocks(tmp_path):
    gzip_command = shutil.which("gzip")
    if gzip_command is None:
        pytest.skip("no gzip command here")
    data = _sample(4 * SMALL_BLOCK + 17)
    path = tmp_path / "x.gz"
    path.write_bytes(_compress(data, threads=2, block_size=SMALL_BLOCK))
    result = subprocess.run(
        [gzip_command, "-dc", str(path)], capture_output=True, check=True, timeout=60
    )
    assert result.stdout == data
    subprocess.run([gzip_command, "-t", str(path)], check=True, timeout=60)


@pytest.mark.parametrize("length2", [0, 1, 3, 4096, 1_000_003])
def test_crc32_combine_matches_the_crc_of_the_concatenation(length2):
    first, second = _sample(777), _sample(length2)
    expected = zlib.crc32(first + second)
    crc1, crc2 = zlib.crc32(first), zlib.crc32(second)
    assert gzip_codec.crc32_combine(crc1, crc2, length2) == expected
    assert gzip_codec._crc32_combine_python(crc1, crc2, length2) == expected


def test_block_writer_holds_at_most_threads_blocks_in_flight(monkeypatch):
    gate = threading.Semaphore(0)
    most = 0
    real = gzip_codec._compress_block

    def slow(block, dictionary, last):
        gate.acquire()  # blocks finish only when the test lets them
        return real(block, dictionary, last)

    monkeypatch.setattr(gzip_codec, "_compress_block", slow)

    class Sink:
        def write(self, part) -> int:
            return len(part)

    writer = gzip_codec.GzipBlockWriter(Sink(), threads=2, block_size=SMALL_BLOCK)
    releaser = threading.Thread(
        target=lambda: [gate.release() for _ in range(40)] and None, daemon=True
    )
    piece = _sample(SMALL_BLOCK // 2)
    for i in range(20):
        if i == 4:
            releaser.start()
        writer.write(piece)
        most = max(most, len(writer._pending))
    writer.close()
    releaser.join(10)
    assert most == writer.threads == 2
    assert gzip_codec.writer_memory_bytes(2, SMALL_BLOCK) >= SMALL_BLOCK * (1 + 2 * 2)


def test_a_failing_file_stops_the_threads_and_raises():
    class Full:
        calls = 0

        def write(self, part) -> int:
            Full.calls += 1
            if Full.calls > 3:
                raise OSError(28, "No space left on device")
            return len(part)

    writer = gzip_codec.GzipBlockWriter(Full(), threads=2, block_size=SMALL_BLOCK)
    with pytest.raises(OSError, match="No space"):
        for _ in range(40):
            writer.write(_sample(SMALL_BLOCK))
        writer.close()
    writer.abort()
    assert not _gzip_threads()


def test_an_interrupt_inside_the_block_writer_stops_its_threads():
    class Sink:
        def write(self, part) -> int:
            return len(part)

    with pytest.raises(KeyboardInterrupt):
        with gzip_codec.GzipBlockWriter(Sink(), threads=2, block_size=SMALL_BLOCK) as writer:
            for _ in range(5):
                writer.write(_sample(SMALL_BLOCK))
            assert _gzip_threads()
            raise KeyboardInterrupt
    assert not _gzip_threads()
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"more")


def test_the_standard_library_fallback_writes_the_same_data(stdlib_only):
    data = _sample(3 * SMALL_BLOCK + 99)
    compressed = _compress(data, threads=2, block_size=SMALL_BLOCK)
    assert gzip.decompress(compressed) == data
    assert _members(compressed) == 1
    assert gzip_codec.describe() == "zlib level 1"


# -- NIfTI files -----------------------------------------------------------------


def _spec(filters: int = 2) -> LayerSpec:
    layer = Conv3DTranspose(filters=filters, kernel_size=3, strides=2, padding="same")
    rng = np.random.default_rng(1)
    kernel = rng.uniform(-0.5, 0.5, layer.kernel_shape(1)).astype(np.float32)
    layer.set_weights([kernel, np.array([0.1, -0.2][:filters], np.float32)])
    return LayerSpec(layer=layer, source="test", seed=3)


def _input(tmp_path: Path, shape=(21, 17, 13)) -> Path:
    rng = np.random.default_rng(0)
    volume = rng.standard_normal(shape).astype(np.float32)
    path = tmp_path / "in.nii"
    nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 2.0, 1.0])), path)
    return path


def _data(nifti: bytes) -> bytes:
    """The voxel bytes of a NIfTI-1 file's bytes (from its ``vox_offset``)."""
    offset = int(np.frombuffer(nifti[108:112], dtype="<f4")[0])
    assert 352 <= offset < len(nifti)
    return nifti[offset:]


_SPEC = _spec()  # one layer (one name in the headers' extension) for every job


def _job(tmp_path: Path, source: Path, name: str, **options) -> bytes:
    """Run the job to ``name`` and return the output's bytes, decompressed."""
    out = tmp_path / name
    upsample_file(_SPEC, str(source), str(out), **options)
    raw = out.read_bytes()
    return gzip.decompress(raw) if name.endswith(".gz") else raw


@pytest.mark.parametrize("block_size", [SMALL_BLOCK, 3 * SMALL_BLOCK + 4, None])
def test_a_nii_gz_job_holds_the_bytes_of_the_nii_job(tmp_path, monkeypatch, block_size):
    if block_size is not None:
        # Blocks on threads even for this small output.
        monkeypatch.setattr(gzip_codec, "BLOCK_SIZE", block_size)
        monkeypatch.setattr(gzip_codec, "MIN_PARALLEL_BYTES", 0)
    source = _input(tmp_path)
    plain = _job(tmp_path, source, "out.nii")
    # Tiles of a few planes: the compressed stream is built as tiles arrive.
    packed = _job(tmp_path, source, "out.nii.gz", tile_shape=(42, 34, 6))
    assert len(plain) > 4 * SMALL_BLOCK
    assert packed == plain
    raw = (tmp_path / "out.nii.gz").read_bytes()
    assert _members(raw) == 1
    assert raw[10:17] == b"out.nii" and raw[17] == 0
    expected = np.asarray(nib.load(tmp_path / "out.nii").dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out.nii.gz").dataobj), expected)
    with NiftiReader(str(tmp_path / "out.nii.gz")) as reader:
        # Two channels stored as a 5D vector image, read back as (i, j, k, c).
        np.testing.assert_array_equal(reader.read(None), expected[:, :, :, 0, :])
        reader.verify()
    assert not _gzip_threads()


def test_simpleitk_reads_the_compressed_output(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    source = _input(tmp_path)
    _job(tmp_path, source, "out.nii")
    _job(tmp_path, source, "out.nii.gz")
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii")))
    packed = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz")))
    assert packed.size > 2 * SMALL_BLOCK // 4
    np.testing.assert_array_equal(packed, plain)


def test_the_standard_library_fallback_writes_the_same_nifti(tmp_path, stdlib_only, monkeypatch):
    monkeypatch.setattr(gzip_codec, "BLOCK_SIZE", SMALL_BLOCK)
    monkeypatch.setattr(gzip_codec, "MIN_PARALLEL_BYTES", 0)
    source = _input(tmp_path)
    plain = _job(tmp_path, source, "out.nii")
    assert _job(tmp_path, source, "out.nii.gz") == plain
    assert _members((tmp_path / "out.nii.gz").read_bytes()) == 1


def _multi_member(data: bytes, cuts: list[int]) -> bytes:
    """``data`` as concatenated gzip members cut at ``cuts``, at different levels."""
    bounds = [0, *cuts, len(data)]
    return b"".join(
        gzip.compress(data[a:b], compresslevel=1 + i % 9, mtime=0)
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    )


def test_members_of_different_sizes_are_read_as_one_stream(tmp_path):
    source = _input(tmp_path)
    data = source.read_bytes()
    # Cuts inside the header, inside a plane and at uneven lengths.
    packed = tmp_path / "members.nii.gz"
    packed.write_bytes(_multi_member(data, [1, 100, 353, 5000, 70_001, len(data) - 3]))
    assert _members(packed.read_bytes()) == 7
    expected = np.asarray(nib.load(source).dataobj)
    with NiftiReader(str(packed)) as reader:
        np.testing.assert_array_equal(reader.read(None), expected)
        reader.verify()
    np.testing.assert_array_equal(np.asarray(nib.load(packed).dataobj), expected)
    # The inputs' names differ (the header extension records the input's), the data not.
    assert _data(_job(tmp_path, packed, "b.nii.gz")) == _data(_job(tmp_path, source, "a.nii"))


@pytest.mark.parametrize("damage", ["crc", "length", "truncated", "garbage"])
def test_a_damaged_member_is_refused(tmp_path, damage):
    source = _input(tmp_path)
    data = source.read_bytes()
    first = gzip.compress(data[:5000], mtime=0)
    second = bytearray(gzip.compress(data[5000:], mtime=0))
    if damage == "crc":
        second[-8] ^= 0x01
    elif damage == "length":
        second[-1] ^= 0x01
    elif damage == "truncated":
        del second[-5:]
    else:
        second += b"not gzip"
    packed = tmp_path / "damaged.nii.gz"
    packed.write_bytes(first + bytes(second))
    with pytest.raises(VolumeError, match=r"damaged\.nii\.gz"):
        with NiftiReader(str(packed)) as reader:
            reader.read(None)
            reader.verify()


def test_a_damaged_trailer_of_our_own_output_is_refused(tmp_path):
    source = _input(tmp_path)
    _job(tmp_path, source, "out.nii.gz")
    path = tmp_path / "out.nii.gz"
    raw = bytearray(path.read_bytes())
    raw[-6] ^= 0x40  # the CRC32
    path.write_bytes(bytes(raw))
    # The whole-volume read reaches the trailer, so the read itself refuses.
    with pytest.raises(VolumeError, match=r"out\.nii\.gz: .*incorrect data check"):
        with NiftiReader(str(path)) as reader:
            reader.read(None)
            reader.verify()


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 1), (1, 1, 5, 2), (3, 0, 2)])
@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_tiny_and_empty_volumes_round_trip(tmp_path, shape, dtype):
    values = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) - 2
    path = tmp_path / "tiny.nii.gz"
    writer = NiftiWriter(str(path), shape, np.dtype(dtype))
    with writer:
        if values.size:
            writer.write(None, values)
    raw = path.read_bytes()
    assert _members(raw) == 1
    header_size = len(gzip.decompress(raw)) - values.size * np.dtype(dtype).itemsize
    assert header_size >= 348
    image = nib.load(path)
    assert image.shape == shape
    if values.size:
        np.testing.assert_allclose(image.get_fdata(), values, atol=1e-3)
    assert not _gzip_threads()


def test_an_aborted_compressed_write_leaves_no_file_and_no_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(gzip_codec, "BLOCK_SIZE", SMALL_BLOCK)
    monkeypatch.setattr(gzip_codec, "MIN_PARALLEL_BYTES", 0)
    path = tmp_path / "out.nii.gz"
    shape = (64, 64, 32)
    with pytest.raises(KeyboardInterrupt):
        with NiftiWriter(str(path), shape, np.float32) as writer:
            writer.write((slice(0, 64), slice(0, 64), slice(0, 16)), np.ones((64, 64, 16)))
            assert _gzip_threads()  # blocks were handed out
            raise KeyboardInterrupt
    assert not _gzip_threads()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("parallel", [False, True])
def test_a_full_disk_during_a_compressed_write_leaves_nothing(tmp_path, monkeypatch, parallel):
    from conv3dt.volumes import nifti

    if parallel:
        monkeypatch.setattr(gzip_codec, "BLOCK_SIZE", SMALL_BLOCK)
        monkeypatch.setattr(gzip_codec, "MIN_PARALLEL_BYTES", 0)

    class FillingFile:
        """The output file, which runs out of space after 100 KB."""

        def __init__(self, fd: int, mode: str) -> None:
            self._file = open(fd, mode)  # closed through close() (__getattr__)
            self._written = 0

        def write(self, data) -> int:
            self._written += len(data)
            if self._written > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

    monkeypatch.setattr(nifti, "open", FillingFile, raising=False)
    shape = (64, 64, 48)  # 768 KiB of noise: compresses to more than 100 KB
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with pytest.raises(VolumeWriteError, match=r"out\.nii\.gz.*no space left on device"):
        with NiftiWriter(str(tmp_path / "out.nii.gz"), shape, np.float32) as writer:
            for k in range(0, 48, 8):
                writer.write((slice(None), slice(None), slice(k, k + 8)), values[..., k : k + 8])
    assert os.listdir(tmp_path) == []
    assert not _gzip_threads()


def test_small_outputs_are_compressed_on_the_calling_thread(tmp_path):
    started = []
    real = gzip_codec.GzipBlockWriter.__init__

    def spy(self, raw, **options):
        real(self, raw, **options)
        started.append(self.threads)

    path = tmp_path / "small.nii.gz"
    shape = (64, 64, 16)  # 256 KiB, far below MIN_PARALLEL_BYTES
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gzip_codec.GzipBlockWriter, "__init__", spy)
        with NiftiWriter(str(path), shape, np.float32) as writer:
            writer.write(None, np.ones(shape, np.float32))
            assert not _gzip_threads()
    assert started == [1]
    np.testing.assert_array_equal(nib.load(path).get_fdata(), 1.0)
    assert gzip_codec.threads_for(gzip_codec.MIN_PARALLEL_BYTES) == min(
        gzip_codec.MAX_THREADS, get_threads()
    )
    assert gzip_codec.writer_memory_bytes(1) < gzip_codec.writer_memory_bytes(2)


@pytest.mark.parametrize("length", [32, 128])
def test_plan_counts_the_compressor_of_a_streamed_output(length):
    axes = tuple(axis_geometry(length, 3, 2, "same") for _ in range(3))
    streamed = plan_tiles(axes, 1, 2, tile_shape=(64, 64, 8), stream_out_bytes=8)
    direct = plan_tiles(axes, 1, 2, tile_shape=(64, 64, 8))
    output_bytes = (2 * length) ** 3 * 8  # 2 MiB: on the calling thread; 128 MiB: blocks
    threads = gzip_codec.threads_for(output_bytes)
    assert threads == (1 if length == 32 else min(gzip_codec.MAX_THREADS, get_threads()))
    assert streamed.out_compress_bytes == gzip_codec.writer_memory_bytes(threads) > 0
    assert direct.out_compress_bytes == 0
    extra = streamed.peak_bytes - direct.peak_bytes
    assert extra == streamed.out_window_bytes + streamed.out_compress_bytes


_SIGINT_SCRIPT = """
import os, signal, sys, threading
import numpy as np, nibabel as nib
from conv3dt import Conv3DTranspose
from conv3dt.run import upsample_file
from conv3dt.spec import LayerSpec
from conv3dt.volumes import gzip_codec

gzip_codec.BLOCK_SIZE = 64 << 10
gzip_codec.MIN_PARALLEL_BYTES = 0  # blocks on threads for this small output
directory = sys.argv[1]
nib.save(nib.Nifti1Image(np.ones((32, 32, 64), np.float32), np.eye(4)), directory + "/in.nii")
layer = Conv3DTranspose(filters=2, kernel_size=2, strides=2, padding="valid")
layer.set_weights([np.ones(layer.kernel_shape(1), np.float32), np.zeros(2, np.float32)])

calls = []

def progress(done, total):
    calls.append(done)
    if len(calls) == 3:  # tiles are being compressed and written behind
        os.kill(os.getpid(), signal.SIGINT)

try:
    upsample_file(LayerSpec(layer, "t"), directory + "/in.nii", directory + "/out.nii.gz",
                  tile_shape=(64, 64, 4), progress=progress)
except KeyboardInterrupt:
    left = [t.name for t in threading.enumerate() if t.name.startswith("conv3dt-gzip")]
    print("interrupted", left, sorted(os.listdir(directory)))
    sys.exit(130)
print("not interrupted")
"""


def test_sigint_during_a_threaded_compressed_write_stops_cleanly(tmp_path):
    # In a process of its own: the signal, the threads and the exit are real.
    done = subprocess.run(
        [sys.executable, "-c", _SIGINT_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,  # a hang fails here
        check=False,
    )
    assert done.returncode == 130, done.stdout + done.stderr
    assert done.stdout.strip() == "interrupted [] ['in.nii']"
    assert "Exception ignored" not in done.stderr
