"""``--dask``: files and tiles as tasks on a local cluster, Zarr volumes, kills, SIGTERM, resume.

One LocalCluster of two single-threaded worker processes serves the module.
Every result is compared with a serial run of the same input.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conv3dt_cli.main import main

pytest.importorskip("distributed")
pytest.importorskip("zarr")

from conv3dt import Conv3DTranspose
from conv3dt.batch import Job
from conv3dt.distributed import (
    ClusterError,
    DaskUnavailableError,
    connect,
    import_distributed,
    local_workers,
    remove_stale_temps,
    upsample_batch,
)
from conv3dt.run import upsample_file
from conv3dt.spec import LayerSpec
from conv3dt.volumes import VolumeError, create_volume, open_volume

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def session():
    with connect("local:2") as started:
        yield started


@pytest.fixture
def client(session):
    yield session.client
    # A test that killed a worker leaves the cluster whole again for the next.
    session.client.wait_for_workers(2, timeout=60)


def _layer(in_channels: int = 2, filters: int = 3, seed: int = 0) -> Conv3DTranspose:
    layer = Conv3DTranspose(filters, 3, strides=2, padding="same", activation="relu")
    rng = np.random.default_rng(seed)
    kernel = rng.uniform(-0.5, 0.5, layer.kernel_shape(in_channels)).astype(np.float32)
    bias = rng.uniform(-0.2, 0.2, filters).astype(np.float32)
    layer.set_weights([kernel, bias])
    return layer


def _spec(layer: Conv3DTranspose) -> LayerSpec:
    return LayerSpec(layer=layer, source="test")


def _spec_file(tmp_path: Path, layer: Conv3DTranspose) -> Path:
    kernel, bias = layer.get_weights()
    np.save(tmp_path / "kernel.npy", kernel)
    np.save(tmp_path / "bias.npy", bias)
    path = tmp_path / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "layer": json.loads(json.dumps(layer.get_config())),
                "weights": {"kernel": "kernel.npy", "bias": "bias.npy"},
            }
        )
    )
    return path


def _volume(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _affine() -> np.ndarray:
    affine = np.diag([0.8, 1.3, 2.5, 1.0])
    affine[:3, 3] = (10.0, -4.0, 7.5)
    return affine


def _read(path: Path) -> np.ndarray:
    with open_volume(str(path)) as reader:
        return reader.read()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".conv3dt-" in p.name)


def _serial(spec: LayerSpec, source: Path, target: Path, **options: object) -> np.ndarray:
    upsample_file(spec, str(source), str(target), **options)
    return _read(target)


# -- Zarr volumes --------------------------------------------------------------


def test_zarr_round_trip_with_boxes_attrs_and_affine(tmp_path):
    data = _volume((7, 9, 5, 2))
    target = tmp_path / "v.zarr"
    with create_volume(
        str(target),
        data.shape,
        np.float32,
        affine=_affine(),
        attrs={"conv3dt_source": "x", "nested": {"a": [1, 2]}},
        chunks=(4, 4, 5, 2),
    ) as writer:
        writer.write((slice(0, 4),), data[:4])
        writer.write((slice(4, 7),), data[4:])
        assert not target.exists()  # still under its temporary name
    with open_volume(str(target)) as reader:
        assert reader.format == "zarr"
        np.testing.assert_array_equal(reader.read(), data)
        np.testing.assert_array_equal(reader.read((slice(2, 5), slice(1, 8))), data[2:5, 1:8])
        np.testing.assert_array_equal(reader.metadata.affine, _affine())
        assert reader.metadata.voxel_size == pytest.approx((0.8, 1.3, 2.5))
        assert reader.metadata.attrs["nested"] == {"a": [1, 2]}
    assert _leftovers(tmp_path) == []


def test_zarr_commit_replaces_and_abort_leaves_nothing(tmp_path):
    target = tmp_path / "v.zarr"
    for value in (1.0, 2.0):
        with create_volume(str(target), (3, 4, 5), np.float32) as writer:
            writer.write(None, np.full((3, 4, 5), value, np.float32))
        assert _read(target).min() == value
    writer = create_volume(str(target), (3, 4, 5), np.float32)
    writer.write(None, np.zeros((3, 4, 5), np.float32))
    writer.abort()
    assert _read(target).min() == 2.0
    assert _leftovers(tmp_path) == []


def test_zarr_group_and_missing_array_errors(tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.zeros(name="ct", shape=(2, 2, 2), dtype="f4")
    with pytest.raises(VolumeError, match=r"is a Zarr group.*arrays: ct"):
        open_volume(str(tmp_path / "g.zarr"))
    with open_volume(str(tmp_path / "g.zarr" / "ct"), "zarr") as reader:
        assert reader.shape == (2, 2, 2)
    with pytest.raises(VolumeError, match="no such Zarr array"):
        open_volume(str(tmp_path / "none.zarr"))


def test_cli_converts_nifti_to_zarr_and_zarr_to_npy(tmp_path):
    layer, second = _layer(1, 2), _layer(2, 1, seed=5)
    data = _volume((6, 5, 4))
    nib.save(nib.Nifti1Image(data, _affine()), tmp_path / "in.nii")
    for source, target, used in (("in.nii", "up.zarr", layer), ("up.zarr", "up2.npy", second)):
        spec = _spec_file(tmp_path, used)
        result = CliRunner().invoke(
            main, ["upsample", str(tmp_path / source), "--spec", str(spec), "-o",
                   str(tmp_path / target), "-q"], catch_exceptions=False,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    up = _read(tmp_path / "up.zarr")
    np.testing.assert_array_equal(up, layer(data[None, ..., None])[0])
    with open_volume(str(tmp_path / "up.zarr")) as reader:
        assert reader.metadata.voxel_size == pytest.approx((0.4, 0.65, 1.25))
        assert "conv3dt_layer" in reader.metadata.attrs
    np.testing.assert_array_equal(_read(tmp_path / "up2.npy"), second(up[None])[0])


def test_missing_zarr_says_what_to_install(tmp_path, monkeypatch):
    np.save(tmp_path / "in.npy", _volume((3, 3, 3)))
    spec = _spec_file(tmp_path, _layer(1, 1))
    monkeypatch.setitem(sys.modules, "zarr", None)  # import zarr now raises ImportError
    with pytest.raises(VolumeError, match=r"pip install 'conv3dt\[dask\]'"):
        open_volume(str(tmp_path / "x.zarr"))
    result = CliRunner().invoke(
        main, ["upsample", str(tmp_path / "in.npy"), "--spec", str(spec), "-o",
               str(tmp_path / "o.zarr")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "pip install 'conv3dt[dask]'" in result.output
    assert _leftovers(tmp_path) == []


def test_missing_dask_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_distributed(name, *args, **kwargs):
        if name == "distributed" or name.startswith("distributed."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_distributed)
    with pytest.raises(DaskUnavailableError, match=r"pip install 'conv3dt\[dask\]'"):
        import_distributed()
    np.save(tmp_path / "in.npy", _volume((3, 3, 3)))
    spec = _spec_file(tmp_path, _layer(1, 1))
    result = CliRunner().invoke(
        main, ["upsample", str(tmp_path / "in.npy"), "--spec", str(spec), "-o",
               str(tmp_path / "o.npy"), "--dask", "local:2"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--dask" in result.output and "pip install 'conv3dt[dask]'" in result.output
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dask", "local:0"], "positive number of workers"),
        (["--dask", "local:x"], "positive number of workers"),
        (["--dask", "local:2", "--dask-scheduler-file", "s.json"], "exclude each other"),
        (["--dask", "local:2", "-o", "-"], "stdin, stdout"),
        (["--tile-shape", "0,4,4"], "three positive integers"),
        (["--tile-shape", "4,4"], "three positive integers"),
    ],
)
def test_cli_refuses_bad_cluster_options(tmp_path, args, message):
    np.save(tmp_path / "in.npy", _volume((3, 3, 3)))
    spec = _spec_file(tmp_path, _layer(1, 1))
    if "-o" not in args:
        args = [*args, "-o", str(tmp_path / "o.npy")]
    result = CliRunner().invoke(
        main, ["upsample", str(tmp_path / "in.npy"), "--spec", str(spec), *args]
    )
    assert result.exit_code == 2
    assert message in result.output


def test_local_workers_parses_addresses():
    assert local_workers("local:3") == 3
    assert local_workers("tcp://127.0.0.1:8786") is None
    assert local_workers("local") >= 1
    with pytest.raises(ValueError, match="`address`"):
        local_workers("")


def test_unreachable_schedulers_are_cluster_errors(tmp_path):
    with pytest.raises(ClusterError, match=r"did not appear within 0\.3 s"):
        connect(scheduler_file=str(tmp_path / "none.json"), timeout=0.3)
    with pytest.raises(ValueError, match="exactly one of"):
        connect("local:1", scheduler_file=str(tmp_path / "none.json"))


def test_remove_stale_temps_touches_only_the_targets_temporaries(tmp_path):
    for name in (
        ".o.npy.conv3dt-tmp-1a2b3c4d",
        ".o.npy.conv3dt-tmp-99",
        "o.npy",
        ".p.npy.conv3dt-tmp-1",
    ):
        (tmp_path / name).write_text("x")
    (tmp_path / ".o.npy.conv3dt-tmp-dir").mkdir()
    removed = remove_stale_temps(str(tmp_path / "o.npy"))
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".p.npy.conv3dt-tmp-1", "o.npy"]


# -- the cluster ---------------------------------------------------------------


def test_batch_of_files_equals_serial(tmp_path, client):
    layer = _layer()
    spec = _spec(layer)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "a.npy", _volume((9, 8, 7, 2), 1))
    nib.save(nib.Nifti1Image(_volume((6, 7, 8, 2), 2), _affine()), tmp_path / "in" / "b.nii.gz")
    with create_volume(str(tmp_path / "in" / "c.zarr"), (5, 6, 7, 2), np.float32) as writer:
        writer.write(None, _volume((5, 6, 7, 2), 3))
    jobs = [
        Job(str(tmp_path / "in" / "a.npy"), str(tmp_path / "a.nii.gz")),
        Job(str(tmp_path / "in" / "b.nii.gz"), str(tmp_path / "b.zarr")),
        Job(str(tmp_path / "in" / "c.zarr"), str(tmp_path / "c.h5")),
    ]
    seen = []
    results = upsample_batch(client, spec, jobs, threads=1, on_result=seen.append)
    assert sorted(r.output for r in results) == sorted(j.output for j in jobs)
    assert seen == results
    assert all(r.extra["mode"] == "files" for r in results)
    for job in jobs:
        reference = tmp_path / ("serial_" + Path(job.output).name)
        np.testing.assert_array_equal(
            _read(Path(job.output)), _serial(spec, Path(job.input), reference)
        )
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("source", "target", "dtype"),
    [
        ("in.npy", "out.npy", "float32"),
        ("in.npy", "out.zarr", "float32"),
        ("in.nii.gz", "out.nii.gz", "float32"),
        ("in.nii", "out.nii", "int16"),
        ("in.nii", "out.h5", "float64"),
    ],
)
def test_tiled_volume_equals_serial(tmp_path, client, source, target, dtype):
    layer = _layer()
    spec = _spec(layer)
    data = _volume((11, 9, 8, 2))
    if source.endswith(".npy"):
        np.save(tmp_path / source, data)
    else:
        nib.save(nib.Nifti1Image(data, _affine()), tmp_path / source)
    progress: list[tuple[int, int]] = []
    (result,) = upsample_batch(
        client,
        spec,
        [Job(str(tmp_path / source), str(tmp_path / target))],
        output_dtype=dtype,
        threads=1,
        tile_shape=(6, 5, 7),  # not aligned with anything, many tiles
        progress=lambda job, done, total: progress.append((done, total)),
    )
    assert result.extra == {"mode": "tiles", "resumed_tiles": 0}
    assert result.tiles == 4 * 4 * 3
    assert progress[-1][0] == progress[-1][1] == 22 * 18 * 16
    expected = _serial(spec, tmp_path / source, tmp_path / ("serial_" + target), output_dtype=dtype)
    got = _read(tmp_path / target)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    if target.endswith(".npy"):
        assert (tmp_path / target).read_bytes() == (tmp_path / ("serial_" + target)).read_bytes()
    if target.startswith("out.nii"):
        mine, theirs = nib.load(tmp_path / target), nib.load(tmp_path / ("serial_" + target))
        np.testing.assert_array_equal(mine.affine, theirs.affine)
        assert mine.header.get_slope_inter() == theirs.header.get_slope_inter()
    assert _leftovers(tmp_path) == []


def test_one_file_on_two_workers_is_split_into_tiles(tmp_path, client):
    spec = _spec(_layer())
    np.save(tmp_path / "in.npy", _volume((10, 6, 5, 2)))
    (result,) = upsample_batch(
        client, spec, [Job(str(tmp_path / "in.npy"), str(tmp_path / "o.npy"))], threads=1
    )
    assert result.extra["mode"] == "tiles"
    assert result.tiles >= 4  # two per worker slot
    np.testing.assert_array_equal(
        _read(tmp_path / "o.npy"), _serial(spec, tmp_path / "in.npy", tmp_path / "s.npy")
    )


def _kill_a_busy_worker(client, pids: dict[str, int]) -> bool:
    for address, keys in client.processing().items():
        if keys and address in pids:
            os.kill(pids[address], signal.SIGKILL)
            return True
    return False


@pytest.mark.parametrize("split", ["tiles", "files"])
def test_a_killed_worker_does_not_change_the_output(tmp_path, client, split):
    spec = _spec(_layer(2, 8))
    jobs = []
    for k in range(4 if split == "files" else 1):
        np.save(tmp_path / f"in{k}.npy", _volume((32, 24, 20, 2), k))
        jobs.append(Job(str(tmp_path / f"in{k}.npy"), str(tmp_path / f"out{k}.npy")))
    pids = client.run(os.getpid)
    killed = []

    def kill_once(*_: object) -> None:
        # At the first completion that finds a worker busy: a task is lost mid-run.
        if not killed and _kill_a_busy_worker(client, pids):
            killed.append(True)

    upsample_batch(
        client,
        spec,
        jobs,
        threads=1,
        split=split,
        tile_shape=(4, 48, 40) if split == "tiles" else None,
        progress=kill_once,
        on_result=kill_once,
    )
    assert killed == [True]
    for k, job in enumerate(jobs):
        reference = _serial(spec, Path(job.input), tmp_path / f"serial{k}.npy")
        np.testing.assert_array_equal(_read(Path(job.output)), reference)
    assert _leftovers(tmp_path) == []


def test_an_interrupted_tiled_run_resumes_where_it_stopped(tmp_path, client):
    spec = _spec(_layer())
    np.save(tmp_path / "in.npy", _volume((16, 8, 6, 2)))
    job = Job(str(tmp_path / "in.npy"), str(tmp_path / "out.nii"))
    options = {"threads": 1, "tile_shape": (2, 16, 12), "split": "tiles"}

    def interrupt_after(count: int):
        done: list[int] = []

        def progress(job: Job, voxels: int, total: int) -> None:
            done.append(voxels)
            if len(done) > count:
                raise KeyboardInterrupt

        return progress

    with pytest.raises(KeyboardInterrupt):
        upsample_batch(client, spec, [job], progress=interrupt_after(3), **options)
    assert not (tmp_path / "out.nii").exists()
    record = tmp_path / ".out.nii.conv3dt-partial.jsonl"
    finished = len(record.read_text().splitlines()) - 1
    assert finished >= 3
    assert (tmp_path / ".out.nii.conv3dt-partial.npy").exists()

    (result,) = upsample_batch(client, spec, [job], resume=True, **options)
    assert finished <= result.extra["resumed_tiles"] < result.tiles == 16
    expected = _serial(spec, tmp_path / "in.npy", tmp_path / "serial.nii")
    np.testing.assert_array_equal(_read(tmp_path / "out.nii"), expected)
    assert _leftovers(tmp_path) == []

    # Leftovers of other settings (here: another tile shape) are not taken up.
    (tmp_path / "out.nii").unlink()
    with pytest.raises(KeyboardInterrupt):
        upsample_batch(client, spec, [job], progress=interrupt_after(2), **options)
    other = {**options, "tile_shape": (4, 16, 12)}
    (result,) = upsample_batch(client, spec, [job], resume=True, **other)
    assert result.extra["resumed_tiles"] == 0
    np.testing.assert_array_equal(_read(tmp_path / "out.nii"), expected)
    assert _leftovers(tmp_path) == []


def test_cli_on_a_running_cluster_with_json_and_keep_going(tmp_path, session):
    layer = _layer()
    spec = _spec_file(tmp_path, layer)
    (tmp_path / "in").mkdir()
    for k in range(3):
        np.save(tmp_path / "in" / f"v{k}.npy", _volume((5, 6, 4, 2), k))
    np.save(tmp_path / "in" / "bad.npy", _volume((5, 6, 4, 3)))  # three channels, kernel wants 2
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": session.cluster.scheduler_address}))
    result = CliRunner().invoke(
        main, ["upsample", str(tmp_path / "in"), "--spec", str(spec), "--output-dir",
               str(tmp_path / "out"), "--dask-scheduler-file", str(scheduler_file), "--json",
               "--keep-going", "--threads", "1"],
    )  # fmt: skip
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(Path(line["output"]).name for line in lines) == [f"v{k}_up.npy" for k in range(3)]
    assert "1 of 4 input(s) failed" in result.output and "bad.npy" in result.output
    for k in range(3):
        np.testing.assert_array_equal(
            np.load(tmp_path / "out" / f"v{k}_up.npy"),
            layer(_volume((5, 6, 4, 2), k)[None])[0],
        )
    assert not (tmp_path / "out" / "bad_up.npy").exists()


def _cli(*args: str) -> subprocess.Popen:
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.Popen(
        [sys.executable, "-m", "conv3dt", "upsample", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.01)


def test_sigterm_mid_volume_then_resume_serial(tmp_path):
    layer = _layer(1, 8)
    spec = _spec_file(tmp_path, layer)
    data = _volume((40, 40, 40))
    np.save(tmp_path / "big.npy", data)
    target = tmp_path / "out.npy"
    args = [str(tmp_path / "big.npy"), "--spec", str(spec), "-o", str(target), "--threads", "1"]
    # Thin tiles keep the first run busy long enough to be stopped in the middle.
    process = _cli(*args, "--tile-shape", "1,8,80")
    _wait_for(lambda: any("conv3dt-tmp" in p.name for p in tmp_path.iterdir()), process)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not target.exists()
    assert _leftovers(tmp_path) == []
    process = _cli(*args, "--skip-existing")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    np.testing.assert_array_equal(np.load(target), layer(data[None, ..., None])[0])
    assert _leftovers(tmp_path) == []


def test_sigterm_mid_tiled_cluster_run_then_resume(tmp_path, session):
    layer = _layer(1, 8)
    spec = _spec_file(tmp_path, layer)
    data = _volume((30, 30, 30))
    np.save(tmp_path / "big.npy", data)
    target = tmp_path / "out.nii"
    record = tmp_path / ".out.nii.conv3dt-partial.jsonl"
    args = [
        str(tmp_path / "big.npy"), "--spec", str(spec), "-o", str(target), "--threads", "1",
        "--dask", session.cluster.scheduler_address, "--tile-shape", "1,30,60",
    ]  # fmt: skip
    process = _cli(*args)
    _wait_for(lambda: record.exists() and len(record.read_text().splitlines()) > 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert not target.exists()
    assert (tmp_path / ".out.nii.conv3dt-partial.npy").exists()
    result = CliRunner().invoke(main, ["upsample", *args, "--skip-existing", "--json"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(_read(target), layer(data[None, ..., None])[0])
    assert _leftovers(tmp_path) == []
