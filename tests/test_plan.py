"""The tile planner: tiles cover the output exactly once, fit the budget, and are exact."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conv3dt.geometry import axis_geometry
from conv3dt.plan import parse_memory, plan_tiles


def _axes(n, k, s, padding, op, d):
    return tuple(axis_geometry(n[a], k[a], s[a], padding, op, d) for a in range(3))


def test_parse_memory_units():
    assert parse_memory("512M") == 512 * 2**20
    assert parse_memory("2G") == 2 * 2**30
    assert parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert parse_memory("1000") == 1000
    for bad in ("", "12Q", "-1G", "G", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)


@settings(max_examples=60, deadline=None)
@given(
    n=st.tuples(*[st.integers(1, 9)] * 3),
    k=st.tuples(*[st.integers(1, 5)] * 3),
    s=st.tuples(*[st.integers(1, 4)] * 3),
    padding=st.sampled_from(["valid", "same"]),
    tile=st.tuples(*[st.integers(1, 7)] * 3),
)
def test_tiles_partition_the_output(n, k, s, padding, tile):
    axes = _axes(n, k, s, padding, None, 1)
    plan = plan_tiles(axes, 2, 3, tile_shape=tile)
    covered = np.zeros(plan.output_shape, dtype=int)
    for t in plan:
        covered[tuple(slice(a, b) for a, b in zip(t.out_start, t.out_stop, strict=True))] += 1
        for g, a, b, i0, i1 in zip(
            axes, t.out_start, t.out_stop, t.in_start, t.in_stop, strict=True
        ):
            # Every input voxel whose footprint meets the box is inside the input box.
            for i in range(g.input_length):
                lo, hi = i * g.stride - g.crop_left, i * g.stride + g.k_eff - 1 - g.crop_left
                if hi >= a and lo <= b - 1:
                    assert i0 <= i < i1
    assert (covered == 1).all()
    assert len(plan) == len(list(plan))


def test_budget_shrinks_tiles_along_the_storage_order():
    axes = _axes((64, 64, 64), (3, 3, 3), (2, 2, 2), "same", None, 1)
    big = plan_tiles(axes, 4, 8, memory_limit=2**34)
    assert big.tile_shape == (128, 128, 128)
    small = plan_tiles(axes, 4, 8, memory_limit=64 * 2**20)
    assert small.peak_bytes <= 64 * 2**20
    assert small.tile_shape[1:] == (128, 128) and small.tile_shape[0] < 128
    fortran = plan_tiles(axes, 4, 8, memory_limit=64 * 2**20, split_order=(2, 1, 0))
    assert fortran.tile_shape[:2] == (128, 128) and fortran.tile_shape[2] < 128
    whole = plan_tiles(axes, 4, 8, memory_limit=16 * 2**20, whole_axes=(2,))
    assert whole.tile_shape[2] == 128


def test_tiny_budget_still_gives_a_plan():
    axes = _axes((5, 5, 5), (2, 2, 2), (2, 2, 2), "valid", None, 1)
    plan = plan_tiles(axes, 1, 1, memory_limit=1)
    assert plan.tile_shape == (1, 1, 1)
    assert len(plan) == 1000


def test_tiled_equals_untiled_through_the_layer():
    from conv3dt import Conv3DTranspose
    from conv3dt.run import compute_tile

    rng = np.random.default_rng(5)
    cases = [
        dict(kernel_size=3, strides=2, padding="same"),
        dict(kernel_size=(2, 3, 4), strides=(3, 1, 2), padding="valid", output_padding=(2, 0, 1)),
        dict(kernel_size=3, dilation_rate=2, padding="same", activation="tanh"),
        dict(kernel_size=1, strides=3, padding="same", output_padding=2),
        dict(kernel_size=3, strides=2, data_format="channels_first", activation="softmax"),
    ]
    for case in cases:
        layer = Conv3DTranspose(3, **case)
        channels_first = layer.data_format == "channels_first"
        x = rng.standard_normal((2, 5, 4, 6, 2) if not channels_first else (2, 2, 5, 4, 6))
        x = x.astype(np.float32)
        whole = layer(x)
        if channels_first:
            whole = np.moveaxis(whole, 1, -1)
            x = np.moveaxis(x, 1, -1)
        axes = layer.geometry(x.shape[1:4])
        whole_axes = (2,) if channels_first else ()
        for tile_shape in [(1, 1, 1), (3, 2, 5), (4, 7, 3)]:
            plan = plan_tiles(axes, 2, 3, tile_shape=tile_shape, whole_axes=whole_axes)
            if channels_first:
                plan = plan_tiles(
                    axes, 2, 3, tile_shape=(*tile_shape[:2], 10**6), whole_axes=whole_axes
                )
            out = np.full(whole.shape, np.nan, dtype=whole.dtype)
            for tile in plan:
                box = tuple(
                    slice(a, b)
                    for a, b in itertools.chain(zip(tile.in_start, tile.in_stop, strict=True))
                )
                y = compute_tile(layer, axes, x[(slice(None), *box)], tile)
                obox = tuple(
                    slice(a, b) for a, b in zip(tile.out_start, tile.out_stop, strict=True)
                )
                out[(slice(None), *obox)] = y
            np.testing.assert_array_equal(out, whole, err_msg=str((case, tile_shape)))
