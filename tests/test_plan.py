"""The tile planner: tiles cover the output exactly once, fit the budget, and are exact."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conv3dt.geometry import axis_geometry
from conv3dt.plan import MemoryLimitError, format_bytes, parse_memory, plan_tiles


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
    whole = plan_tiles(axes, 4, 8, memory_limit=20 * 2**20, whole_axes=(2,))
    assert whole.tile_shape[2] == 128 and whole.tile_shape[0] < 128
    assert whole.peak_bytes <= 20 * 2**20


def test_budget_below_the_smallest_tile_is_refused_with_the_minimum():
    axes = _axes((5, 6, 7), (3, 2, 3), (2, 3, 1), "valid", None, 1)
    with pytest.raises(MemoryLimitError) as refused:
        plan_tiles(axes, 2, 3, memory_limit=1000)
    error = refused.value
    assert isinstance(error, ValueError)
    assert error.memory_limit == 1000
    # One stride block per axis.
    assert error.min_tile_shape == (2, 3, 1)
    assert "memory_limit=1000" in str(error) and f"({error.minimum} bytes)" in str(error)
    # The minimum reported is exactly the smallest budget that gives a plan.
    smallest = plan_tiles(axes, 2, 3, memory_limit=error.minimum)
    assert smallest.tile_shape == (2, 3, 1)
    assert smallest.peak_bytes == error.minimum
    with pytest.raises(MemoryLimitError):
        plan_tiles(axes, 2, 3, memory_limit=error.minimum - 1)


def test_smallest_tile_keeps_whole_axes_and_counts_stream_windows():
    axes = _axes((40, 30, 20), (3, 3, 3), (2, 2, 2), "same", None, 1)
    with pytest.raises(MemoryLimitError) as plain:
        plan_tiles(axes, 4, 8, memory_limit=1, whole_axes=(2,))
    assert plain.value.min_tile_shape == (2, 2, 40)
    with pytest.raises(MemoryLimitError) as streamed:
        plan_tiles(axes, 4, 8, memory_limit=1, whole_axes=(2,), stream_in_bytes=16)
    # A streamed input holds whole planes for the outermost axis's extent.
    assert streamed.value.minimum > plain.value.minimum
    assert plan_tiles(
        axes, 4, 8, memory_limit=streamed.value.minimum, whole_axes=(2,), stream_in_bytes=16
    ).tile_shape == (2, 2, 40)


def test_forced_tile_shape_only_reports_the_budget():
    axes = _axes((5, 5, 5), (2, 2, 2), (2, 2, 2), "valid", None, 1)
    plan = plan_tiles(axes, 1, 1, memory_limit=1, tile_shape=(1, 1, 1))
    assert plan.tile_shape == (1, 1, 1) and len(plan) == 1000
    assert plan.peak_bytes > plan.memory_limit == 1


def test_memory_limit_error_survives_pickling():
    error = MemoryLimitError(10, 20 * 2**20, (2, 2, 2))
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is MemoryLimitError
    assert (again.memory_limit, again.minimum, again.min_tile_shape) == (10, 20 * 2**20, (2, 2, 2))
    assert str(again) == str(error)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(16 * 2**20 + 2**19) == "16.5 MiB"
    assert format_bytes(3 * 2**40) == "3.0 TiB"


@settings(max_examples=40, deadline=None)
@given(
    n=st.tuples(*[st.integers(1, 40)] * 3),
    k=st.tuples(*[st.integers(1, 5)] * 3),
    s=st.tuples(*[st.integers(1, 4)] * 3),
    padding=st.sampled_from(["valid", "same"]),
    order=st.permutations([0, 1, 2]),
    extra=st.integers(0, 2**16),
)
def test_any_budget_from_the_minimum_up_fits_with_stride_block_tiles(
    n, k, s, padding, order, extra
):
    axes = _axes(n, k, s, padding, None, 1)
    with pytest.raises(MemoryLimitError) as refused:
        plan_tiles(axes, 3, 5, memory_limit=1, split_order=order)
    limit = refused.value.minimum + extra
    plan = plan_tiles(axes, 3, 5, memory_limit=limit, split_order=order)
    assert plan.peak_bytes <= limit
    for tile, g in zip(plan.tile_shape, axes, strict=True):
        assert tile >= min(g.stride, g.output_length)


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
        # Bias and activation fused into the engines' writing pass ...
        dict(
            kernel_size=2,
            strides=2,
            padding="valid",
            activation="relu",
            bias_initializer="random_normal",
        ),
        dict(
            kernel_size=3,
            strides=2,
            padding="same",
            activation="relu6",
            dtype="float64",
            bias_initializer="random_normal",
        ),
        dict(
            kernel_size=2,
            strides=2,
            activation="relu",
            data_format="channels_first",
            bias_initializer="random_normal",
        ),
        # ... and not, for a float16 layer (its sum is in float32, its finish in float16).
        dict(
            kernel_size=3,
            strides=2,
            padding="same",
            activation="relu",
            dtype="float16",
            bias_initializer="random_normal",
        ),
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
