"""Responsiveness and limits: NIfTI writes in long runs, prompt stops, bounded tiles.

Speed is measured in ``benchmarks/bench_streaming.py``; these tests check the
structure that makes it: how many writes a box takes, which tiles are planned,
and that a stop request ends a write where it stands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conv3dt import Conv3DTranspose
from conv3dt.geometry import axis_geometry
from conv3dt.plan import MAX_TILE_VALUES, plan_tiles
from conv3dt.run import prepare_file, upsample_file
from conv3dt.spec import LayerSpec
from conv3dt.volumes import create_volume, open_volume
from conv3dt.volumes.nifti import int_scaling

# -- helpers -----------------------------------------------------------------


def _layer(in_channels: int, filters: int, seed: int = 0, **config) -> Conv3DTranspose:
    rng = np.random.default_rng(seed)
    layer = Conv3DTranspose(filters=filters, **config)
    layer.build((1, 1, 1, 1, in_channels), seed=0)
    kernel = rng.standard_normal(layer.kernel.shape).astype(np.float32)
    layer.set_weights([kernel, rng.standard_normal(filters).astype(np.float32)])
    return layer


def _spec_file(tmp_path: Path, layer: Conv3DTranspose) -> Path:
    kernel, bias = layer.get_weights()
    np.save(tmp_path / "kernel.npy", kernel)
    np.save(tmp_path / "bias.npy", bias)
    spec = {"layer": layer.get_config(), "weights": {"kernel": "kernel.npy", "bias": "bias.npy"}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def _expected_int16(values: np.ndarray, image: nib.Nifti1Image) -> np.ndarray:
    """The stored integers of ``values`` under the image's scaling, computed here."""
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    info = np.iinfo(np.int16)
    stored = np.rint((values.astype(np.float64) - inter) / slope)
    return np.clip(stored, info.min, info.max).astype(np.int16)


class _WriteSpy:
    """Counts ``os.pwrite`` calls (every positional write of the volumes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = os.pwrite

        def spy(fd: int, data, offset: int) -> int:
            self.calls += 1
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", spy)


# -- 10. NIfTI writes in long runs -------------------------------------------


def _boxes(shape: tuple[int, ...], pattern: str) -> list[tuple[slice, ...]]:
    """Boxes covering ``shape`` once: slabs along one axis, or blocks."""
    rest = tuple(slice(0, n) for n in shape[3:])
    if pattern == "blocks":
        steps = (3, 4, 2)
    else:
        steps = tuple(2 if f"slab{a}" == pattern else n for a, n in enumerate(shape[:3]))
    boxes = []
    for i in range(0, shape[0], steps[0]):
        for j in range(0, shape[1], steps[1]):
            for k in range(0, shape[2], steps[2]):
                box = (slice(i, i + steps[0]), slice(j, j + steps[1]), slice(k, k + steps[2]))
                boxes.append(
                    tuple(slice(s.start, min(s.stop, n)) for s, n in zip(box, shape, strict=False))
                )
    return [(*box, *rest) for box in boxes]


@pytest.mark.parametrize("extension", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", ["float32", "int16"])
@pytest.mark.parametrize("shape", [(7, 6, 5), (7, 6, 5, 3)])
@pytest.mark.parametrize("pattern", ["slab0", "slab1", "slab2", "blocks"])
def test_nifti_boxes_of_any_shape_read_back_as_written(tmp_path, extension, dtype, shape, pattern):
    rng = np.random.default_rng(10)
    data = (rng.standard_normal(shape) * 50).astype(np.float32)
    path = tmp_path / f"out{extension}"
    with create_volume(str(path), shape, dtype) as writer:
        for box in _boxes(shape, pattern):
            writer.write(box, data[box])
    image = nib.load(path)
    assert image.shape == shape
    if dtype == "float32":
        np.testing.assert_array_equal(np.asarray(image.dataobj), data)
        return
    slope, inter = int_scaling(np.dtype(np.int16), float(data.min()), float(data.max()))
    assert image.dataobj.slope == np.float32(slope)
    assert image.dataobj.inter == np.float32(inter)
    stored = np.asarray(image.dataobj.get_unscaled())
    np.testing.assert_array_equal(stored, _expected_int16(data, image))


def test_a_box_of_whole_planes_is_one_write_per_channel(tmp_path, monkeypatch):
    shape = (16, 12, 10, 3)
    data = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
    with create_volume(str(tmp_path / "out.nii"), shape, "float32") as writer:
        spy = _WriteSpy(monkeypatch)
        writer.write((slice(0, 16), slice(0, 12), slice(2, 9)), data[:, :, 2:9])
        assert spy.calls == 3  # one run of 7 planes per channel
        writer.write((slice(0, 16), slice(4, 8), slice(0, 10)), data[:, 4:8])
        assert spy.calls == 3 + 3 * 10  # whole rows: one run per plane
        rest = [
            (slice(0, 16), slice(a, b), slice(c, d))
            for a, b in ((0, 4), (8, 12))
            for c, d in ((0, 2), (9, 10))
        ]
        for box in rest:
            writer.write(box, data[box])
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out.nii").dataobj), data)


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_npy_to_nifti_tiles_span_both_files_fastest_axes(tmp_path, monkeypatch, dtype):
    # A C-order .npy is fastest along its last axis, a NIfTI along its first:
    # slabs along the middle axis keep both whole, so every write is a long run.
    layer = _layer(2, 3, kernel_size=3, strides=2, padding="same")
    x = np.random.default_rng(12).standard_normal((8, 10, 12, 2)).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    spec = LayerSpec(layer, "test")
    # A budget for slabs one stride block thin along the middle axis.
    with open_volume(str(tmp_path / "in.npy")) as source:
        slab = prepare_file(spec, source, str(tmp_path / "o.nii"), tile_shape=(16, 2, 24))
    spy = _WriteSpy(monkeypatch)
    result = upsample_file(
        spec,
        str(tmp_path / "in.npy"),
        str(tmp_path / "out.nii"),
        output_dtype=dtype,
        memory_limit=slab.prepared.plan.peak_bytes,
    )
    out_shape = (16, 20, 24)
    tile = result.extra["tile_shape"]
    assert result.tiles > 1 and (tile[0], tile[2]) == (16, 24)
    # One run per (k, channel) plane and tile, where z slabs would write a run per row.
    assert spy.calls <= result.tiles * 24 * 3 + 10
    expected = layer(x[None])[0]
    image = nib.load(tmp_path / "out.nii")
    # The filters along a 4th dimension, or as vector components along the 5th.
    assert image.shape in ((*out_shape, 3), (*out_shape, 1, 3))
    shape = (*out_shape, 3)
    if dtype == "float32":
        np.testing.assert_array_equal(np.asarray(image.dataobj).reshape(shape), expected)
    else:
        stored = np.asarray(image.dataobj.get_unscaled()).reshape(shape)
        np.testing.assert_array_equal(stored, _expected_int16(expected, image))


def test_planned_tiles_are_bounded_whatever_the_budget():
    axes = tuple(axis_geometry(256, 3, 2, "same") for _ in range(3))
    plan = plan_tiles(axes, 4, 8, memory_limit=2**40)
    assert len(plan) > 1
    assert np.prod(plan.tile_shape) * 8 <= MAX_TILE_VALUES
    slabs = plan_tiles(axes, 4, 8, memory_limit=2**40, whole_axes=(1, 2))
    assert slabs.tile_shape == (16, 512, 512)
    # A smallest tile above the bound is still planned.
    wide = plan_tiles(axes, 4, 256, memory_limit=2**40, whole_axes=(1, 2))
    assert wide.tile_shape == (2, 512, 512)


# -- 10. stopping: within a write, and at the very end --------------------------

_WRAPPER = """
import atexit, os, signal, sys, time
from pathlib import Path

mode, number, report = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
stop = getattr(signal, sys.argv[4])
state = {"calls": 0, "after": None}

if mode == "write":
    # Signal from inside the writer's n-th positional write; count the rest.
    real = os.pwrite

    def pwrite(fd, data, offset):
        state["calls"] += 1
        if state["calls"] == number:
            state["after"] = 0
            os.kill(os.getpid(), stop)
        elif state["after"] is not None:
            state["after"] += 1
        return real(fd, data, offset)

    os.pwrite = pwrite
else:
    from conv3dt.volumes.base import VolumeWriter

    real_commit = VolumeWriter.commit

    class Dropped:
        def __del__(self):
            os.kill(os.getpid(), stop)
            time.sleep(5)  # the handler runs here, inside __del__

    def commit(self):
        if mode == "commit":
            os.kill(os.getpid(), stop)  # a signal as the output is being finished
        real_commit(self)
        if mode == "del":
            Dropped()  # one that lands in a __del__, after the output is complete

    VolumeWriter.commit = commit

atexit.register(lambda: report.write_text(str(state["after"])))
from conv3dt_cli.main import main

main(sys.argv[5:], prog_name="conv3dt")
"""


def _stopped_run(tmp_path: Path, mode: str, number: int, stop: str, *args: str):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_WRAPPER)
    report = tmp_path / "report.txt"
    done = subprocess.run(
        [sys.executable, str(wrapper), mode, str(number), str(report), stop, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    return done, report.read_text() if report.exists() else None


def _stop_job(tmp_path: Path) -> tuple[Path, Path]:
    layer = _layer(1, 4, kernel_size=2, strides=2, padding="valid")
    np.save(tmp_path / "in.npy", np.ones((8, 64, 64), np.float32))
    return _spec_file(tmp_path, layer), tmp_path / "in.npy"


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_nifti_write_where_it_stands(tmp_path, stop):
    spec, source = _stop_job(tmp_path)
    target = tmp_path / "out.nii"
    # Slabs two voxels thin along the NIfTI's fastest axis: 128 x 128 x 4 runs
    # of 8 bytes per tile, far more than one stop check's worth.
    done, after = _stopped_run(
        tmp_path, "write", 100, stop,
        "upsample", str(source), "--spec", str(spec), "-o", str(target),
        "--tile-shape", "2,128,128",
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert "interrupted" in done.stderr and "Traceback" not in done.stderr
    assert int(after) < 2 * 4096
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["bias.npy", "in.npy", "kernel.npy", "report.txt", "spec.json", "wrapper.py"]
    )


@pytest.mark.parametrize("mode", ["commit", "del"])
def test_a_signal_at_the_very_end_exits_130(tmp_path, mode):
    spec, source = _stop_job(tmp_path)
    target = tmp_path / "out.nii.gz"
    done, _ = _stopped_run(
        tmp_path, mode, 0, "SIGTERM",
        "upsample", str(source), "--spec", str(spec), "-o", str(target), "--output-dtype", "int16",
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    leftovers = [name for name in os.listdir(tmp_path) if "conv3dt" in name]
    assert leftovers == []
    if mode == "commit":
        assert not target.exists()
    else:
        # The signal came after the output was complete: it is whole, not partial.
        with open_volume(str(target)) as reader:
            assert reader.shape == (16, 128, 128, 4)


# -- 12. local clusters the machine can hold -----------------------------------


def test_local_workers_are_capped_to_the_machine_with_one_warning(monkeypatch, caplog):
    import conv3dt.distributed as cluster

    monkeypatch.setattr(cluster, "available_cores", lambda: 2)
    monkeypatch.setattr(cluster, "available_memory", lambda: 8 * 2**30)
    started = []

    class FakeDistributed:
        class LocalCluster:
            def __init__(self, n_workers, **options):
                started.append(n_workers)

            def close(self):
                pass

        @staticmethod
        def Client(cluster):
            return object()

    monkeypatch.setattr(cluster, "import_distributed", lambda: FakeDistributed)
    with caplog.at_level("WARNING", logger="conv3dt"):
        assert cluster.capped_workers(2, task_memory=2**30) == 2
        assert caplog.records == []
        cluster.connect("local:99999", task_memory=2**30)
    assert started == [2]
    [record] = caplog.records
    assert "local:99999" in record.getMessage() and "2 cores" in record.getMessage()
    # Memory caps too: 8 GiB holds three workers of 256 MiB plus a 2 GiB task each.
    monkeypatch.setattr(cluster, "available_cores", lambda: 64)
    assert cluster.capped_workers(16, task_memory=2 * 2**30) == 3


# -- 12. an .npy stream on standard output ----------------------------------------


class _Stream:
    """A stand-in for ``sys.stdout.buffer``: notes the tiles computed at each write."""

    def __init__(self, computed: list[int]) -> None:
        self.computed = computed
        self.writes: list[tuple[int, int]] = []
        self.data = bytearray()

    def write(self, data) -> int:
        self.writes.append((len(data), len(self.computed)))
        self.data += bytes(data)
        return len(data)

    def flush(self) -> None:
        pass


def _streamed(tmp_path, monkeypatch, layer, x, **options):
    import conv3dt.run as run

    computed: list[int] = []
    real = run.compute_tile

    def compute_tile(*args, **kwargs):
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "compute_tile", compute_tile)
    stream = _Stream(computed)
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(buffer=stream))
    np.save(tmp_path / "in.npy", x)
    result = upsample_file(LayerSpec(layer, "t"), str(tmp_path / "in.npy"), "-", **options)
    return result, stream


def test_stdout_gets_the_npy_tile_by_tile_in_bounded_memory(tmp_path, monkeypatch):
    import io

    layer = _layer(2, 3, kernel_size=3, strides=2, padding="same")
    x = np.random.default_rng(20).standard_normal((8, 10, 12, 2)).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    spec = LayerSpec(layer, "t")
    with open_volume(str(tmp_path / "in.npy")) as source:
        slab = prepare_file(spec, source, "-", tile_shape=(2, 20, 24))
        planned = prepare_file(spec, source, "-", memory_limit=slab.prepared.plan.peak_bytes)
    plan = planned.prepared.plan
    # Slabs whole along the later axes: tile order is the file's C order.
    assert plan.tile_shape[1:] == (20, 24) and len(plan) > 1
    result, stream = _streamed(
        tmp_path, monkeypatch, layer, x, memory_limit=slab.prepared.plan.peak_bytes
    )
    expected = io.BytesIO()
    np.save(expected, layer(x[None])[0])
    assert bytes(stream.data) == expected.getvalue()
    _, *tiles = stream.writes
    assert len(tiles) == result.tiles > 1
    # Each tile went out while the next one was computed, at the latest.
    assert all(computed <= number + 1 for number, (_, computed) in enumerate(tiles, 1))
    assert max(size for size, _ in tiles) <= np.prod(plan.tile_shape) * 3 * 4


def test_stdout_gets_out_of_order_boxes_through_a_scratch_file(tmp_path, monkeypatch):
    import io

    layer = Conv3DTranspose(filters=2, kernel_size=2, strides=2, data_format="channels_first")
    layer.build((1, 3, 1, 1, 1), seed=1)
    x = np.random.default_rng(21).standard_normal((3, 4, 5, 6)).astype(np.float32)
    # Channels first: a tile holds every channel of its slab, which is not one run.
    result, stream = _streamed(tmp_path, monkeypatch, layer, x, tile_shape=(2, 10, 12))
    assert result.tiles == 4
    expected = io.BytesIO()
    np.save(expected, layer(x[None])[0])
    assert bytes(stream.data) == expected.getvalue()


def _cli(*args: str, prefix: tuple[str, ...] = ()) -> list[str]:
    return [*prefix, sys.executable, "-m", "conv3dt", *args]


def test_a_reader_closing_the_pipe_is_named(tmp_path):
    spec, source = _stop_job(tmp_path)
    process = subprocess.Popen(
        _cli("upsample", str(source), "--spec", str(spec), "-o", "-", "-q"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout.read(100)[:6] == b"\x93NUMPY"
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(timeout=600) == 1, stderr
    assert "the output pipe was closed by the reader" in stderr
    assert "Traceback" not in stderr and "partial output was removed" not in stderr


def test_a_closed_stdout_is_named(tmp_path):
    spec, source = _stop_job(tmp_path)
    done = subprocess.run(
        _cli(
            "upsample",
            str(source),
            "--spec",
            str(spec),
            "-o",
            "-",
            prefix=("sh", "-c", 'exec "$@" >&-', "sh"),
        ),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr
    assert "stdout, which is closed" in done.stderr and "Traceback" not in done.stderr


# -- 12. float16 overflow ----------------------------------------------------------


def test_float16_overflow_is_reported_once_in_plain_words(tmp_path, caplog):
    layer = Conv3DTranspose(filters=1, kernel_size=2, strides=2, use_bias=False)
    layer.build((1, 1, 1, 1, 1), seed=0)
    layer.set_weights([np.ones((2, 2, 2, 1, 1), np.float32)])
    x = np.full((4, 4, 4), 1000.0, np.float32)
    x[0] = 1e5  # beyond float16's largest value, 65504, in every tile
    np.save(tmp_path / "in.npy", x)
    with caplog.at_level("WARNING", logger="conv3dt"):
        result = upsample_file(
            LayerSpec(layer, "t"),
            str(tmp_path / "in.npy"),
            str(tmp_path / "out.npy"),
            output_dtype="float16",
            tile_shape=(8, 2, 2),
        )
    assert result.tiles == 16
    out = np.load(tmp_path / "out.npy")
    assert int(np.isinf(out).sum()) == 2 * 8 * 8
    [record] = caplog.records
    assert record.getMessage().endswith(
        "128 voxels exceeded float16's range (±65504) and were stored as inf"
    )


# -- 11. compressed HDF5 chunks larger than a tile ----------------------------------


def _one_chunk_h5(path: Path, n: int) -> np.ndarray:
    import h5py

    x = np.sin(np.arange(n**3, dtype=np.float32).reshape(n, n, n) / 77).astype(np.float32)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("v", data=x, chunks=(n, n, n), compression="gzip")
    return x


def test_a_compressed_chunk_counts_in_the_budget_and_is_decoded_once(tmp_path, monkeypatch):
    from conv3dt.volumes.hdf5 import Hdf5Reader

    x = _one_chunk_h5(tmp_path / "in.h5", 48)
    chunk_bytes = 48**3 * 4
    layer = _layer(1, 2, kernel_size=2, strides=2, padding="valid")
    spec = LayerSpec(layer, "t")
    with open_volume(str(tmp_path / "in.h5")) as source:
        assert source.chunk_itemsize == 4
        slab = prepare_file(spec, source, str(tmp_path / "o.npy"), tile_shape=(8, 96, 96))
    plan = slab.prepared.plan
    # The one chunk is decoded whole for any tile: the budget holds it.
    assert plan.in_chunk_cache_bytes == chunk_bytes
    assert plan.peak_bytes > chunk_bytes
    cached = []
    real = Hdf5Reader.chunk_cache_bytes

    def record(reader, value):
        cached.append(value)
        real.fset(reader, value)

    monkeypatch.setattr(Hdf5Reader, "chunk_cache_bytes", property(real.fget, record))
    result = upsample_file(
        spec, str(tmp_path / "in.h5"), str(tmp_path / "out.npy"), memory_limit=plan.peak_bytes
    )
    assert result.tiles > 1
    # Every tile reads from the one decoded chunk, kept between tiles.
    assert cached == [chunk_bytes]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), layer(x[None, ..., None])[0])


def test_a_budget_below_a_compressed_chunk_is_refused_naming_the_limit(tmp_path):
    _one_chunk_h5(tmp_path / "in.h5", 128)  # one 8 MiB chunk
    spec = _spec_file(tmp_path, _layer(1, 1, kernel_size=2, strides=2, padding="valid"))
    done = subprocess.run(
        _cli(
            "upsample",
            str(tmp_path / "in.h5"),
            "--spec",
            str(spec),
            "-o",
            str(tmp_path / "out.npy"),
            "--memory-limit",
            "20M",
        ),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr
    assert "--memory-limit" in done.stderr and "Traceback" not in done.stderr
    suggested = int(done.stderr.split("give --memory-limit ")[1].split("M")[0])
    assert suggested * 2**20 >= 16 * 2**20 + 8 * 2**20
    assert not (tmp_path / "out.npy").exists()
