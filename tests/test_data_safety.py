"""Data safety: a full disk, racing writers, killed writers, clobbering, tampered resume records.

The command runs in child processes (``python -m conv3dt``), as a user runs it:
a file-size limit set in the child stands for a full disk, two children race
for one output, a child killed with SIGKILL leaves its temporary file behind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from conv3dt import Conv3DTranspose

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "keras"


def _layer(filters: int = 4) -> Conv3DTranspose:
    layer = Conv3DTranspose(filters, 3, strides=2, padding="same")
    rng = np.random.default_rng(0)
    kernel = rng.uniform(-0.5, 0.5, layer.kernel_shape(1)).astype(np.float32)
    bias = rng.uniform(-0.2, 0.2, filters).astype(np.float32)
    layer.set_weights([kernel, bias])
    return layer


@pytest.fixture()
def job(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A spec, a 40^3 input (80^3 x 4 float32 out: 8 MB) and the expected output."""
    layer = _layer()
    kernel, bias = layer.get_weights()
    np.save(tmp_path / "kernel.npy", kernel)
    np.save(tmp_path / "bias.npy", bias)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "layer": json.loads(json.dumps(layer.get_config())),
                "weights": {"kernel": "kernel.npy", "bias": "bias.npy"},
            }
        )
    )
    volume = np.random.default_rng(1).standard_normal((40, 40, 40)).astype(np.float32)
    np.save(tmp_path / "in.npy", volume)
    return spec, tmp_path / "in.npy", layer(volume[None, ..., None])[0]


def _command(spec: Path, source: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "conv3dt", "upsample", str(source), "--spec", str(spec), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(command: list[str], file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=_env(),
        preexec_fn=limit,
        timeout=300,
        check=False,
    )


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".conv3dt-" in p.name)


def _assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("conv3dt: warning: ")
    ]
    assert len(lines) <= 2 and lines[0].startswith("conv3dt: error: "), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# -- 5: a full disk ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("out.h5", ()),
        ("out.h5", ("--compression", "gzip")),
        ("out.zarr", ()),
        ("out.npy", ()),
    ],
)
def test_a_full_disk_exits_1_with_one_line_and_leaves_nothing(tmp_path, job, name, extra):
    if name.endswith(".zarr"):
        pytest.importorskip("zarr")
    spec, source, _ = job
    # Runs repeat: zarr's concurrent chunk writes made the outcome vary run to run.
    for _ in range(3):
        result = _run(
            _command(spec, source, "-o", str(tmp_path / name), "-q", *extra),
            file_size_limit=300_000,
        )
        _assert_one_line_error(result, 1, f"cannot write {tmp_path / name}", "file too large")
        assert _temps(tmp_path) == []
        assert not (tmp_path / name).exists()


# -- 6: two writers of one output ---------------------------------------------


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _slow(spec: Path, source: Path, target: Path, *args: str) -> list[str]:
    # Many small tiles on one thread: seconds of writing for the other process to overlap.
    return _command(spec, source, "-o", str(target), "--tile-shape", "8", "--threads", "1", *args)


@pytest.mark.parametrize("name", ["out.npy", "out.zarr"])
def test_of_two_writers_of_one_output_the_later_fails_with_exit_2(tmp_path, job, name):
    if name.endswith(".zarr"):
        pytest.importorskip("zarr")
    spec, source, expected = job
    target = tmp_path / name
    first = subprocess.Popen(
        _slow(spec, source, target, "--json", "-q"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    # The second starts once the first is writing, so both find the target free.
    _wait_for(lambda: _temps(tmp_path), first)
    second = subprocess.Popen(
        _slow(spec, source, target, "--json", "-q"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    outcomes = [process.communicate(timeout=300) for process in (first, second)]
    codes = sorted(process.returncode for process in (first, second))
    assert codes == [0, 2], outcomes
    claims = [line for out, _ in outcomes for line in out.splitlines() if line.strip()]
    assert len(claims) == 1 and json.loads(claims[0])["output"] == str(target)
    loser = next(
        err for (_, err), p in zip(outcomes, (first, second), strict=True) if p.returncode == 2
    )
    assert "exists" in loser and "Traceback" not in loser
    from conv3dt.volumes import open_volume

    with open_volume(str(target)) as reader:
        np.testing.assert_array_equal(reader.read(), expected)
    assert _temps(tmp_path) == []


# -- 7: temporary files of killed writers -------------------------------------


def test_a_rerun_removes_the_temporary_file_of_a_killed_writer_only(tmp_path, job):
    spec, source, expected = job
    target = tmp_path / "out.npy"
    # Temporaries that are not a dead writer's of this host: kept.
    host = socket.gethostname()
    live = tmp_path / f".out.npy.conv3dt-tmp-{host}-{os.getpid()}-0badc0de"
    elsewhere = tmp_path / ".out.npy.conv3dt-tmp-another-host-1-0badc0de"
    for path in (live, elsewhere):
        path.write_bytes(b"x")
    process = subprocess.Popen(
        _slow(spec, source, target, "-q"), stderr=subprocess.PIPE, text=True, env=_env()
    )
    _wait_for(lambda: len(_temps(tmp_path)) == 3, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    (orphan,) = set(_temps(tmp_path)) - {live.name, elsewhere.name}
    assert f"-{host}-{process.pid}-" in orphan

    result = _run(_command(spec, source, "-o", str(target), "-q"))
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(target), expected)
    assert _temps(tmp_path) == sorted([live.name, elsewhere.name])


def test_cluster_cleanup_spares_the_temporary_file_of_a_live_writer(tmp_path):
    pytest.importorskip("distributed")
    from conv3dt.distributed import remove_stale_temps

    host = socket.gethostname()
    live = tmp_path / f".out.npy.conv3dt-tmp-{host}-{os.getpid()}-0badc0de"
    dead = tmp_path / ".out.npy.conv3dt-tmp-worker-node-7-0badc0de"
    for path in (live, dead):
        path.write_bytes(b"x")
    assert remove_stale_temps(str(tmp_path / "out.npy")) == [str(dead)]
    assert _temps(tmp_path) == [live.name]


# -- 8: clobbering --------------------------------------------------------------


@pytest.mark.parametrize("victim", ["spec.yaml", "kernel.npy", "bias.npy"])
def test_the_spec_and_its_weight_files_are_never_outputs(tmp_path, job, victim):
    spec, source, _ = job
    before = (tmp_path / victim).read_bytes()
    args = ["-o", str(tmp_path / victim), "--overwrite", "--output-format", "npy"]
    result = _run(_command(spec, source, *args))
    _assert_one_line_error(result, 2, victim, "layer is read from")
    assert (tmp_path / victim).read_bytes() == before
    assert _temps(tmp_path) == []


def test_the_keras_model_file_is_never_an_output(tmp_path):
    model = tmp_path / "model.keras"
    shutil.copy(FIXTURES / "sequential.keras", model)
    with np.load(FIXTURES / "up.npz", allow_pickle=False) as arrays:
        np.save(tmp_path / "in.npy", arrays["input"][0])
    before = model.read_bytes()
    command = [sys.executable, "-m", "conv3dt", "upsample", str(tmp_path / "in.npy")]
    command += ["--keras-model", str(model), "-o", str(model), "--overwrite"]
    result = _run([*command, "--output-format", "npy"])
    _assert_one_line_error(result, 2, "model.keras", "layer is read from")
    assert model.read_bytes() == before


def test_zarr_overwrite_replaces_a_zarr_store_but_not_an_ordinary_directory(tmp_path, job):
    pytest.importorskip("zarr")
    spec, source, expected = job
    ordinary = tmp_path / "photos.zarr"
    ordinary.mkdir()
    (ordinary / "holiday.jpg").write_bytes(b"precious")
    result = _run(_command(spec, source, "-o", str(ordinary), "--overwrite"))
    _assert_one_line_error(result, 2, "not a Zarr store")
    assert (ordinary / "holiday.jpg").read_bytes() == b"precious"

    store = tmp_path / "old.zarr"
    assert _run(_command(spec, source, "-o", str(store))).returncode == 0
    assert _run(_command(spec, source, "-o", str(store), "--overwrite")).returncode == 0
    from conv3dt.volumes import open_volume

    with open_volume(str(store)) as reader:
        np.testing.assert_array_equal(reader.read(), expected)
    assert _temps(tmp_path) == []


def test_a_dangling_symbolic_link_counts_as_an_existing_output(tmp_path, job):
    spec, source, _ = job
    link = tmp_path / "out.npy"
    link.symlink_to(tmp_path / "nowhere.npy")
    result = _run(_command(spec, source, "-o", str(link)))
    _assert_one_line_error(result, 2, "exists", "--overwrite")
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "nowhere.npy")


def test_an_existing_target_at_commit_is_left_alone_without_overwrite(tmp_path):
    from conv3dt.volumes import OutputExistsError, create_volume

    target = tmp_path / "out.h5"
    writer = create_volume(str(target), (4, 4), "float32", overwrite=False)
    writer.write(None, np.ones((4, 4), np.float32))
    with h5py.File(target, "w") as handle:  # another writer got there first
        handle["mine"] = np.zeros(2)
    with pytest.raises(OutputExistsError, match="exists"):
        writer.commit()
    with h5py.File(target, "r") as handle:
        assert list(handle) == ["mine"]
    assert _temps(tmp_path) == []


# -- 9: resume records ----------------------------------------------------------


def test_tampered_resume_records_and_scratch_are_recomputed(tmp_path):
    pytest.importorskip("distributed")
    from conv3dt.batch import Job
    from conv3dt.distributed import TiledOutput, _Options, _tile_task
    from conv3dt.spec import LayerSpec

    layer = _layer()
    spec = LayerSpec(layer=layer, source="test")
    volume = np.random.default_rng(2).standard_normal((16, 8, 8)).astype(np.float32)
    np.save(tmp_path / "in.npy", volume)
    job = Job(str(tmp_path / "in.npy"), str(tmp_path / "out.npy"))
    options = _Options(
        input_format=None,
        output_format=None,
        output_dtype="float32",
        memory_limit=None,
        four_d_as_batch=False,
        compression=None,
        engine="auto",
        threads=1,
        tile_shape=(4, 16, 16),
    )

    def started(resume: bool) -> TiledOutput:
        tiled = TiledOutput(spec, job, options)
        tiled.start(resume)
        return tiled

    tiled = started(False)
    assert len(tiled) == 8
    for task in tiled.tasks[:3]:
        tile_id, _peak, checksum = _tile_task(spec, tiled.context, task)
        tiled.record_done(tile_id, checksum)
    tiled.close()
    record = Path(tiled.record)
    with record.open("a") as handle:
        for entry in ({"tile": 7, "crc32": 0}, {"tile": True, "crc32": 0}, {"tile": 6}):
            handle.write(json.dumps(entry) + "\n")
        handle.write("[5]\n")
    assert started(True).finished == {0, 1, 2}

    # A line torn by a crash in mid-append does not swallow the next entry.
    with record.open("a") as handle:
        handle.write('{"tile": 3, "crc')
    torn = started(True)
    tile_id, _peak, checksum = _tile_task(spec, torn.context, torn.tasks[3])
    torn.record_done(tile_id, checksum)
    torn.close()
    assert started(True).finished == {0, 1, 2, 3}

    # A scratch zeroed behind the record's back: its tiles are computed again.
    scratch = Path(tiled.scratch)
    header = len(scratch.read_bytes()) - volume.size * 8 * 4 * 4
    with scratch.open("r+b") as handle:
        handle.seek(header)
        handle.write(bytes(volume.size * 8 * 4 * 4))
    resumed = started(True)
    assert resumed.finished == set()
    for task in resumed.pending():
        tile_id, _peak, checksum = _tile_task(spec, resumed.context, task)
        resumed.record_done(tile_id, checksum)
    assert resumed.complete
    resumed.finish_in_place()
    np.testing.assert_array_equal(np.load(job.output), layer(volume[None, ..., None])[0])
