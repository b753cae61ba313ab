"""``--shard I/N`` and SLURM job arrays: every input exactly once, the same split everywhere."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conv3dt_cli.main import main

from conv3dt import Conv3DTranspose
from conv3dt.shard import ShardError, parse_shard, select_shard, shard_from_environment

_SLURM = (
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
)


@pytest.fixture(autouse=True)
def _outside_slurm(monkeypatch):
    # The suite may itself run inside a job array; each test sets what it needs.
    for name in _SLURM:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0/1", (0, 1)), ("2/3", (2, 3)), (" 1 / 4 ", (1, 4)), ("9/10", (9, 10))],
)
def test_parse_shard_accepts(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("3/3", "0..2"),
        ("-1/2", "0..1"),
        ("0/0", "at least 1"),
        ("1/-2", "at least 1"),
        ("a/b", "expected I/N"),
        ("1", "expected I/N"),
        ("1/2/3", "expected I/N"),
        ("", "expected I/N"),
    ],
)
def test_parse_shard_refuses(text, reason):
    with pytest.raises(ShardError, match=reason) as info:
        parse_shard(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shards_cover_every_item_once_whatever_the_listing_order(count):
    items = [f"scans/s{n:02d}.nii.gz" for n in (7, 1, 12, 3, 9, 4, 10)] + ["other/./a.npy"]
    shards = [select_shard(items, index, count) for index in range(count)]
    flat = [item for shard in shards for item in shard]
    assert sorted(flat) == sorted(items)
    assert len(set(flat)) == len(items)
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    for seed in range(5):
        shuffled = items.copy()
        random.Random(seed).shuffle(shuffled)
        for index in range(count):
            assert set(select_shard(shuffled, index, count)) == set(shards[index])


def test_shard_keeps_the_callers_order_and_uses_the_key():
    items = ["c", "a", "b", "d"]
    assert select_shard(items, 0, 2) == ["c", "a"]  # ranks: a0 b1 c2 d3
    assert select_shard(items, 1, 2) == ["b", "d"]
    ranks = {"a": 0, "c": 1, "d": 2, "b": 3}
    assert select_shard(items, 0, 2, key=ranks.__getitem__) == ["a", "d"]


@pytest.mark.parametrize(
    ("index", "count", "name"), [(0, 0, "count"), (2, 2, "index"), (-1, 3, "index")]
)
def test_select_shard_refuses_out_of_range(index, count, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        select_shard(["a"], index, count)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        (
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "3",
            },
            (2, 4),
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "0",
                "SLURM_ARRAY_TASK_COUNT": "1",
                "SLURM_ARRAY_TASK_MIN": "0",
            },
            (0, 1),
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "7",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "3",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            (2, 3),
        ),
    ],
)
def test_slurm_array_variables(env, expected):
    assert shard_from_environment(env) == expected


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        (
            {
                "SLURM_ARRAY_TASK_ID": "9",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "1",
            },
            "evenly spaced",
        ),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0"}, "SLURM_ARRAY_TASK_COUNT"),
        (
            {
                "SLURM_ARRAY_TASK_ID": "x",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "0",
            },
            "not an integer",
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "1",
                "SLURM_ARRAY_TASK_COUNT": "0",
                "SLURM_ARRAY_TASK_MIN": "0",
            },
            "positive",
        ),
    ],
)
def test_slurm_array_variables_refused(env, reason):
    with pytest.raises(ShardError, match=reason) as info:
        shard_from_environment(env)
    assert "--shard I/N" in str(info.value)


# -- the command line ----------------------------------------------------------


def _batch(tmp_path: Path, n: int = 5) -> tuple[Path, Conv3DTranspose, dict[str, np.ndarray]]:
    layer = Conv3DTranspose(2, 2, strides=2)
    rng = np.random.default_rng(0)
    kernel = rng.uniform(-1, 1, layer.kernel_shape(1)).astype(np.float32)
    bias = rng.uniform(-1, 1, 2).astype(np.float32)
    layer.set_weights([kernel, bias])
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
    (tmp_path / "in").mkdir()
    volumes = {}
    for k in range(n):
        volume = rng.standard_normal((3, 4, 2)).astype(np.float32)
        np.save(tmp_path / "in" / f"v{k}.npy", volume)
        volumes[f"v{k}_up.npy"] = volume
    return spec, layer, volumes


def _upsample(*args: str) -> object:
    return CliRunner().invoke(main, ["upsample", *args], catch_exceptions=False)


def _outputs(result: object) -> list[str]:
    return [Path(json.loads(line)["output"]).name for line in result.stdout.splitlines()]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_cli_shards_cover_the_batch_once(tmp_path, count):
    spec, layer, volumes = _batch(tmp_path)
    inputs = sorted(str(p) for p in (tmp_path / "in").iterdir())
    written: list[str] = []
    for index in range(count):
        # Each task lists the inputs in its own order.
        order = inputs if index % 2 else inputs[::-1]
        result = _upsample(
            *order, "--spec", str(spec), "--output-dir", str(tmp_path / "out"),
            "--shard", f"{index}/{count}", "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        written += _outputs(result)
    assert sorted(written) == sorted(volumes)
    for name, volume in volumes.items():
        expected = layer(volume[None, ..., None])[0]
        np.testing.assert_array_equal(np.load(tmp_path / "out" / name), expected)


def test_cli_takes_the_shard_from_a_slurm_array(tmp_path, monkeypatch):
    spec, _, volumes = _batch(tmp_path)
    pattern = str(tmp_path / "in" / "*.npy")
    expected = select_shard(sorted(str(p) for p in (tmp_path / "in").iterdir()), 1, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "11")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    result = _upsample(pattern, "--spec", str(spec), "--output-dir", str(tmp_path / "a"), "--json")
    assert result.exit_code == 0, result.output
    assert sorted(_outputs(result)) == sorted(Path(p).stem + "_up.npy" for p in expected)
    # --shard overrides the array's shard.
    result = _upsample(
        pattern, "--spec", str(spec), "--output-dir", str(tmp_path / "b"), "--json",
        "--shard", "0/1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(_outputs(result)) == sorted(volumes)
    # A single -o output in an array task is that task's own file.
    single = tmp_path / "single.npy"
    result = _upsample(expected[0], "--spec", str(spec), "-o", str(single))
    assert result.exit_code == 0, result.output
    assert single.exists()


@pytest.mark.parametrize("shard", ["3/3", "-1/2", "0/0", "half", "1/2/3"])
def test_cli_refuses_bad_shards(tmp_path, shard):
    spec, _, _ = _batch(tmp_path, 1)
    result = _upsample(
        str(tmp_path / "in"), "--spec", str(spec), "--output-dir", str(tmp_path / "o"),
        "--shard", shard,
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--shard" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_gappy_slurm_array(tmp_path, monkeypatch):
    spec, _, _ = _batch(tmp_path, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    result = _upsample(str(tmp_path / "in"), "--spec", str(spec), "--output-dir", str(tmp_path))
    assert result.exit_code == 2
    assert "--shard I/N" in result.output


def test_cli_shard_is_fixed_before_skipping_finished_outputs(tmp_path):
    spec, _, _ = _batch(tmp_path, 6)
    args = [str(tmp_path / "in"), "--spec", str(spec), "--output-dir", str(tmp_path / "o")]
    first = _upsample(*args, "--shard", "1/2", "--json")
    mine = sorted(_outputs(first))
    assert len(mine) == 3
    (tmp_path / "o" / mine[0]).unlink()
    again = _upsample(*args, "--shard", "1/2", "--json", "--skip-existing")
    assert again.exit_code == 0, again.output
    assert _outputs(again) == [mine[0]]
