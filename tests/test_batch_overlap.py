"""Batches finish each output (fsync, rename) while the next file is read and computed.

The overlap must change nothing users can see except the time: outputs stay
atomic and appear in order, a failing commit is reported for its own file
(stopping the batch, or counted with --keep-going), an interrupt leaves no
partial or temporary file. (No job can read an earlier job's output: that is
refused before any work.)
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from _cli_helpers import run_cli, write_spec

from conv3dt import Conv3DTranspose
from conv3dt.commit import Committer
from conv3dt.volumes import open_volume
from conv3dt.volumes.base import VolumeWriter


@pytest.fixture()
def batch(tmp_path):
    """A spec and three small .npy inputs a, b, c in ``inputs/``."""
    layer = Conv3DTranspose(1, 3, strides=2, padding="same")
    spec = write_spec(tmp_path, layer, 1)
    folder = tmp_path / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in "abc":
        np.save(folder / f"{name}.npy", rng.standard_normal((6, 5, 4)).astype(np.float32))
    return spec, folder, layer


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".conv3dt-" in p.name)


def _commits_failing(monkeypatch, name: str) -> None:
    """Make the commit of the output called ``name`` fail as a full disk would."""
    real = VolumeWriter.commit

    def commit(self):
        if os.path.basename(self.path) == name:
            self.abort()
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)

    # The writer turns OSErrors into VolumeErrors inside commit; the fake does too.
    def failing(self):
        try:
            commit(self)
        except OSError as exc:
            from conv3dt.volumes.base import _write_failure

            raise _write_failure(self.path, exc) from exc

    monkeypatch.setattr(VolumeWriter, "commit", failing)


def test_the_next_file_starts_while_the_last_one_is_committed(tmp_path, batch, monkeypatch):
    spec, folder, layer = batch
    import conv3dt.run as run

    started: list[str] = []
    second_started = threading.Event()
    overlapped: list[bool] = []
    real_prepare, real_commit = run.prepare_file, VolumeWriter.commit

    def prepare_file(spec_, source, output_path, **options):
        started.append(os.path.basename(output_path))
        if len(started) == 2:
            second_started.set()
        return real_prepare(spec_, source, output_path, **options)

    def commit(self):
        if os.path.basename(self.path) == "a_up.npy":
            # The first output's commit is held until the second file has started.
            overlapped.append(second_started.wait(timeout=30))
        real_commit(self)

    monkeypatch.setattr(run, "prepare_file", prepare_file)
    monkeypatch.setattr(VolumeWriter, "commit", commit)
    out = tmp_path / "out"
    result = run_cli(
        "upsample", str(folder), "--spec", str(spec), "--output-dir", str(out), "--json"
    )
    assert result.exit_code == 0, result.output
    assert overlapped == [True]
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [os.path.basename(line["output"]) for line in lines] == [
        "a_up.npy",
        "b_up.npy",
        "c_up.npy",
    ]
    for name in "abc":
        expected = layer(np.load(folder / f"{name}.npy")[None, ..., None])[0, ..., 0]
        np.testing.assert_allclose(np.load(out / f"{name}_up.npy"), expected, atol=1e-5)
    assert _temps(tmp_path) == []


def test_a_failing_commit_stops_the_batch_naming_its_file(tmp_path, batch, monkeypatch):
    spec, folder, _ = batch
    _commits_failing(monkeypatch, "b_up.npy")
    out = tmp_path / "out"
    result = run_cli("upsample", str(folder), "--spec", str(spec), "--output-dir", str(out))
    assert result.exit_code == 1, result.output
    assert "b_up.npy" in result.output and "Traceback" not in result.output
    # As with commits inline: the earlier output stays, nothing after the failure is kept.
    assert sorted(os.listdir(out)) == ["a_up.npy"]
    assert _temps(tmp_path) == []


def test_a_failing_commit_with_keep_going_is_counted_for_its_file(tmp_path, batch, monkeypatch):
    spec, folder, _ = batch
    _commits_failing(monkeypatch, "b_up.npy")
    out = tmp_path / "out"
    result = run_cli(
        "upsample",
        str(folder),
        "--spec",
        str(spec),
        "--output-dir",
        str(out),
        "--keep-going",
        "--json",
    )
    assert result.exit_code == 1, result.output
    assert "1 of 3 input(s) failed" in result.output
    assert f"{folder / 'b.npy'}:" in result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [os.path.basename(line["output"]) for line in lines] == ["a_up.npy", "c_up.npy"]
    assert sorted(os.listdir(out)) == ["a_up.npy", "c_up.npy"]
    assert _temps(tmp_path) == []


def test_failures_are_summarized_in_the_batch_order(tmp_path, batch, monkeypatch):
    spec, folder, _ = batch
    _commits_failing(monkeypatch, "b_up.npy")
    np.save(folder / "c.npy", np.ones((3, 3), np.float32))  # fails before its commit
    np.save(folder / "d.npy", np.ones((3, 3, 3), np.float32))
    out = tmp_path / "out"
    result = run_cli(
        "upsample", str(folder), "--spec", str(spec), "--output-dir", str(out), "--keep-going"
    )
    assert result.exit_code == 1, result.output
    summary = result.output[result.output.index("2 of 4 input(s) failed") :]
    assert summary.index("b.npy") < summary.index("c.npy"), summary
    assert sorted(os.listdir(out)) == ["a_up.npy", "d_up.npy"]
    assert _temps(tmp_path) == []


def test_a_later_file_failing_keeps_the_committed_one(tmp_path, batch):
    spec, folder, _ = batch
    np.save(folder / "b.npy", np.ones((3, 3), np.float32))  # 2D: refused (exit 2)
    out = tmp_path / "out"
    result = run_cli("upsample", str(folder), "--spec", str(spec), "--output-dir", str(out))
    assert result.exit_code == 2, result.output
    assert sorted(os.listdir(out)) == ["a_up.npy"]
    with open_volume(str(out / "a_up.npy")) as reader:
        assert reader.shape == (12, 10, 8)
    assert _temps(tmp_path) == []


_WRAPPER = """
import os, signal, sys
from conv3dt.volumes.base import VolumeWriter

stop = getattr(signal, sys.argv[1])
real = VolumeWriter.commit

def commit(self):
    if os.path.basename(self.path).startswith("a_up"):
        os.kill(os.getpid(), stop)  # while the next file is being read and computed
    real(self)

VolumeWriter.commit = commit
from conv3dt_cli.main import main

main(sys.argv[2:], prog_name="conv3dt")
"""


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("ext", [".npy", ".nii.gz"])
def test_a_signal_during_a_background_commit_leaves_nothing_partial(tmp_path, batch, stop, ext):
    spec, folder, layer = batch
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_WRAPPER)
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(wrapper),
            stop,
            "upsample",
            str(folder),
            "--spec",
            str(spec),
            "--output-dir",
            str(out),
            "--name",
            "{stem}_up" + ext,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert _temps(tmp_path) == []
    # The first output is whole or absent; none after it was kept.
    names = sorted(os.listdir(out))
    assert names in ([], [f"a_up{ext}"]), names
    if names:
        with open_volume(str(out / names[0])) as reader:
            expected = layer(np.load(folder / "a.npy")[None, ..., None])[0, ..., 0]
            np.testing.assert_allclose(reader.read(None), expected, atol=1e-4)


class _Writer:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    def commit(self) -> None:
        if self.fail:
            raise OSError(f"{self.name} failed")
        self.log.append(self.name)

    def abort(self) -> None:
        self.log.append(f"abort {self.name}")


def test_committer_settles_in_order_with_one_pending():
    log: list[str] = []
    settled: list[tuple[str, str | None]] = []
    with Committer(lambda key, error: settled.append((key, error and str(error)))) as committer:
        for name in "abc":
            committer.commit(_Writer(name, log, fail=name == "b"), name)
            # Handing one over settled the one before it: never more than one pending.
            assert len(settled) == "abc".index(name)
    assert log == ["a", "c"]
    assert settled == [("a", None), ("b", "b failed"), ("c", None)]


def test_committer_raises_a_settled_error_before_taking_the_next_writer():
    log: list[str] = []

    def on_settled(key, error):
        if error is not None:
            raise error

    committer = Committer(on_settled)
    committer.commit(_Writer("a", log, fail=True), "a")
    second = _Writer("b", log)
    with pytest.raises(OSError, match="a failed"):
        committer.commit(second, "b")
    assert not committer.owns(second)  # still the caller's, to abort
    committer.close()
    assert log == []
