"""Tests of the engines behind :func:`conv3dt.engine.conv_transpose_region`.

Every engine ("auto" and each forced one) is checked against the slow float64
reference over random geometries and output boxes (boxes may start before the
full output and end past it), and every engine's tiles are checked to equal
the same boxes of its untiled result exactly, over random tilings.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from _kernels import engines_for, separable_kernel
from hypothesis import given, settings
from hypothesis import strategies as st

from conv3dt.engine import ENGINES, FUSED_ACTIVATIONS, choose_engine, conv_transpose_region
from conv3dt.engine.epilogue import Epilogue
from conv3dt.engine.numpy_engine import channel_products
from conv3dt.engine.phases import axis_phases, phase_groups
from conv3dt.engine.reference import reference_conv_transpose
from conv3dt.engine.threads import get_threads, set_threads
from conv3dt.geometry import AxisGeometry, input_range_for_output
from conv3dt.ops import layer_geometry

ALL_ENGINES = ENGINES
FORCED = tuple(e for e in ENGINES if e != "auto")
triples = st.tuples


@st.composite
def layers(draw: st.DrawFn, max_channels: int = 3) -> dict:
    """A layer (kernel, strides, dilation, channels) and an input volume for it."""
    return {
        "kernel_size": draw(triples(*[st.integers(1, 4)] * 3)),
        "strides": draw(triples(*[st.integers(1, 4)] * 3)),
        "dilation": draw(triples(*[st.integers(1, 3)] * 3)),
        "spatial": draw(triples(*[st.integers(1, 5)] * 3)),
        "channels": draw(st.integers(1, max_channels)),
        "filters": draw(st.integers(1, max_channels)),
        "batch": draw(st.integers(1, 2)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _arrays(layer: dict, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """An input and a kernel; the kernel is exactly separable for a third of the seeds
    (or as ``layer["separable"]`` says), so the separable engine runs too."""
    rng = np.random.default_rng(layer["seed"])
    x = rng.standard_normal((layer["batch"], *layer["spatial"], layer["channels"]))
    if layer.get("separable", layer["seed"] % 3 == 0):
        kernel = separable_kernel(
            rng, layer["kernel_size"], layer["filters"], layer["channels"], np.float64
        )
    else:
        kernel = rng.standard_normal((*layer["kernel_size"], layer["filters"], layer["channels"]))
        kernel /= np.sqrt(layer["channels"] * np.prod(layer["kernel_size"]))
    return x.astype(dtype), kernel.astype(dtype)


def _box_geometry(layer: dict, start: tuple, shape: tuple) -> list[AxisGeometry]:
    """Geometry whose Keras window is the full-output box [start, start + shape)."""
    return [
        AxisGeometry(n, k, s, d, crop_left=a, output_length=m)
        for n, k, s, d, a, m in zip(
            layer["spatial"],
            layer["kernel_size"],
            layer["strides"],
            layer["dilation"],
            start,
            shape,
            strict=True,
        )
    ]


def _full_length(layer: dict, a: int) -> int:
    k_eff = (layer["kernel_size"][a] - 1) * layer["dilation"][a] + 1
    return (layer["spatial"][a] - 1) * layer["strides"][a] + k_eff


def _run(layer: dict, x: np.ndarray, kernel: np.ndarray, origin, start, shape, engine, dtype):
    return conv_transpose_region(
        x,
        kernel,
        layer["strides"],
        layer["dilation"],
        origin,
        start,
        shape,
        dtype,
        engine=engine,
    )


def _assert_close(got: np.ndarray, want: np.ndarray, dtype: type) -> None:
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@st.composite
def boxes(draw: st.DrawFn, layer: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A full-output box that may start before 0 and end past the full output."""
    start, shape = [], []
    for a in range(3):
        full = _full_length(layer, a)
        lo = draw(st.integers(-3, full + 1))
        start.append(lo)
        shape.append(draw(st.integers(1, full + 4)))
    return tuple(start), tuple(shape)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]))
def test_every_engine_matches_the_reference_on_any_box(data: st.DataObject, dtype: type) -> None:
    layer = data.draw(layers())
    start, shape = data.draw(boxes(layer))
    x, kernel = _arrays(layer, dtype)
    want = reference_conv_transpose(x, kernel, _box_geometry(layer, start, shape))
    for engine in engines_for(kernel, layer["strides"]):
        got = _run(layer, x, kernel, (0, 0, 0), start, shape, engine, dtype)
        assert got.shape == want.shape
        assert got.dtype == np.dtype(dtype)
        _assert_close(got, want, dtype)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_sub_boxes_from_their_input_boxes_are_exact(data: st.DataObject) -> None:
    """An output box computed from the input box it needs (in_origin != 0) equals the
    same box of the whole-volume result bit for bit, and the reference within tolerance."""
    layer = data.draw(layers())
    start, shape = data.draw(boxes(layer))
    x, kernel = _arrays(layer)
    ranges = []
    for a in range(3):
        k_eff = (layer["kernel_size"][a] - 1) * layer["dilation"][a] + 1
        ranges.append(
            input_range_for_output(
                start[a], start[a] + shape[a], k_eff, layer["strides"][a], layer["spatial"][a]
            )
        )
    sub = x[
        :, ranges[0][0] : ranges[0][1], ranges[1][0] : ranges[1][1], ranges[2][0] : ranges[2][1]
    ]
    origin = tuple(r[0] for r in ranges)
    want = reference_conv_transpose(x, kernel, _box_geometry(layer, start, shape))
    for engine in engines_for(kernel, layer["strides"]):
        whole = _run(layer, x, kernel, (0, 0, 0), start, shape, engine, np.float32)
        tile = _run(layer, sub, kernel, origin, start, shape, engine, np.float32)
        np.testing.assert_array_equal(tile, whole, err_msg=f"engine={engine}")
        _assert_close(tile, want, np.float32)


@st.composite
def cuts(draw: st.DrawFn, length: int) -> list[int]:
    """Tile boundaries splitting [0, length): 0, some interior points, length."""
    if length <= 1:
        return [0, length]
    inner = draw(st.sets(st.integers(1, length - 1), max_size=min(length - 1, 4)))
    return [0, *sorted(inner), length]


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    padding=st.sampled_from(["valid", "same"]),
    use_output_padding=st.booleans(),
)
def test_tiled_equals_untiled_for_every_engine(
    data: st.DataObject, padding: str, use_output_padding: bool
) -> None:
    """Random tilings of a Keras output (one-voxel tiles, tiles on the borders, zeros
    past the full output with output_padding) assemble to the untiled result exactly."""
    layer = data.draw(layers())
    output_padding = (
        tuple(
            data.draw(st.integers(0, max(s, d) - 1))
            for s, d in zip(layer["strides"], layer["dilation"], strict=True)
        )
        if use_output_padding
        else None
    )
    axes = layer_geometry(
        layer["spatial"],
        layer["kernel_size"],
        layer["strides"],
        padding,
        output_padding,
        layer["dilation"],
    )
    x, kernel = _arrays(layer)
    crop = tuple(g.crop_left for g in axes)
    out_shape = tuple(g.output_length for g in axes)
    bounds = [data.draw(cuts(n)) for n in out_shape]
    for engine in engines_for(kernel, layer["strides"]):
        whole = _run(layer, x, kernel, (0, 0, 0), crop, out_shape, engine, np.float32)
        tiled = np.full_like(whole, np.nan)
        spans = [list(itertools.pairwise(b)) for b in bounds]
        for box in itertools.product(*spans):
            rng = [g.input_range(lo, hi) for g, (lo, hi) in zip(axes, box, strict=True)]
            sub = x[:, slice(*rng[0]), slice(*rng[1]), slice(*rng[2])]
            target = (slice(None), *(slice(lo, hi) for lo, hi in box))
            tiled[target] = _run(
                layer,
                sub,
                kernel,
                tuple(r[0] for r in rng),
                tuple(lo + c for (lo, _), c in zip(box, crop, strict=True)),
                tuple(hi - lo for lo, hi in box),
                engine,
                np.float32,
            )
        np.testing.assert_array_equal(tiled, whole, err_msg=f"engine={engine}")


# Shapes where the fast engines take their special paths: kernel == stride with
# one to eight values per input voxel and row (compiled for that width), blocks
# of many GEMM rows, several worker tasks.
SPECIAL = [
    # kernel, strides, dilation, channels, filters, spatial
    ((2, 2, 2), (2, 2, 2), (1, 1, 1), 1, 1, (9, 7, 13)),
    ((2, 2, 2), (2, 2, 2), (1, 1, 1), 2, 2, (5, 6, 11)),
    ((2, 2, 2), (2, 2, 2), (1, 1, 1), 1, 4, (4, 5, 9)),
    ((3, 3, 3), (3, 3, 3), (1, 1, 1), 2, 3, (4, 5, 6)),
    ((2, 2, 2), (2, 2, 2), (1, 1, 1), 12, 8, (6, 7, 9)),
    ((3, 3, 3), (2, 2, 2), (1, 1, 1), 8, 4, (7, 9, 8)),
    ((3, 3, 3), (1, 1, 1), (2, 2, 2), 5, 6, (9, 8, 10)),
    ((4, 4, 4), (2, 2, 2), (1, 1, 1), 6, 5, (6, 5, 7)),
    ((1, 1, 1), (1, 1, 1), (1, 1, 1), 7, 3, (5, 6, 4)),
    ((2, 3, 1), (3, 1, 2), (2, 1, 3), 2, 2, (6, 7, 8)),
]


def _special_case(
    kernel_size: tuple,
    strides: tuple,
    dilation: tuple,
    channels: int,
    filters: int,
    spatial: tuple,
    batch: int,
    seed: int,
    separable: bool = False,
) -> tuple[dict, np.ndarray, np.ndarray, tuple[AxisGeometry, ...]]:
    """A SPECIAL row as a layer dict, its input and kernel (``separable`` or not), and
    its "same" geometry."""
    layer = {
        "kernel_size": kernel_size,
        "strides": strides,
        "dilation": dilation,
        "spatial": spatial,
        "channels": channels,
        "filters": filters,
        "batch": batch,
        "seed": seed,
        "separable": separable,
    }
    x, kernel = _arrays(layer)
    axes = layer_geometry(spatial, kernel_size, strides, "same", None, dilation)
    return layer, x, kernel, axes


@pytest.mark.parametrize("engine", ALL_ENGINES)
@pytest.mark.parametrize("case", SPECIAL)
def test_special_paths(engine: str, case: tuple) -> None:
    """Larger volumes than the property tests draw: values, and tiles cut at odd places
    (inside a phase, on one voxel, past the end) that equal the untiled result."""
    layer, x, kernel, axes = _special_case(*case, batch=2, seed=7, separable=engine == "separable")
    crop = tuple(g.crop_left for g in axes)
    out_shape = tuple(g.output_length for g in axes)
    whole = _run(layer, x, kernel, (0, 0, 0), crop, out_shape, engine, np.float32)
    _assert_close(whole, reference_conv_transpose(x, kernel, axes), np.float32)
    for lo, hi in [((1, 2, 3), (6, 9, 8)), ((3, 0, 5), (4, 1, 6)), ((0, 3, 1), (5, 40, 3))]:
        hi = tuple(min(h, n) for h, n in zip(hi, out_shape, strict=True))
        lo = tuple(min(v, h - 1) for v, h in zip(lo, hi, strict=True))
        rng = [g.input_range(a, b) for g, a, b in zip(axes, lo, hi, strict=True)]
        sub = x[:, slice(*rng[0]), slice(*rng[1]), slice(*rng[2])]
        tile = _run(
            layer,
            sub,
            kernel,
            tuple(r[0] for r in rng),
            tuple(a + c for a, c in zip(lo, crop, strict=True)),
            tuple(b - a for a, b in zip(lo, hi, strict=True)),
            engine,
            np.float32,
        )
        np.testing.assert_array_equal(
            tile, whole[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], err_msg=f"{lo}-{hi}"
        )


@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_empty_input_box_gives_zeros(engine: str) -> None:
    x = np.ones((1, 3, 0, 2, 2), dtype=np.float32)
    kernel = np.ones((2, 2, 2, 3, 2), dtype=np.float32)
    out = conv_transpose_region(
        x, kernel, (2, 2, 2), (1, 1, 1), (0, 0, 0), (0, 0, 0), (4, 4, 4), engine=engine
    )
    assert out.shape == (1, 4, 4, 4, 3)
    assert not out.any()


@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_integer_and_non_contiguous_input(engine: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, size=(2, 6, 5, 4, 3))[:, ::2, :, ::-1]
    if engine == "separable":
        kernel = separable_kernel(rng, (3, 2, 2), 5, 3)
    else:
        kernel = rng.standard_normal((3, 2, 2, 5, 3)).astype(np.float32)
    layer = {
        "spatial": x.shape[1:4],
        "kernel_size": (3, 2, 2),
        "strides": (2, 1, 2),
        "dilation": (1, 2, 1),
    }
    shape = tuple(_full_length(layer, a) for a in range(3))
    got = conv_transpose_region(
        x, kernel, (2, 1, 2), (1, 2, 1), (0, 0, 0), (0, 0, 0), shape, engine=engine
    )
    want = reference_conv_transpose(x, kernel, _box_geometry(layer, (0, 0, 0), shape))
    assert got.dtype == np.float32
    _assert_close(got, want, np.float32)


def test_unknown_engine_is_refused() -> None:
    x = np.zeros((1, 2, 2, 2, 1), dtype=np.float32)
    kernel = np.zeros((1, 1, 1, 1, 1), dtype=np.float32)
    with pytest.raises(ValueError, match=r"engine.*'fast'"):
        conv_transpose_region(
            x, kernel, (1, 1, 1), (1, 1, 1), (0, 0, 0), (0, 0, 0), (2, 2, 2), engine="fast"
        )


def test_auto_picks_by_layer() -> None:
    # Upsampling with few input channels: bound by writing the output.
    assert choose_engine((2, 2, 2, 1, 1), (2, 2, 2), (1, 1, 1)) == "numba"
    assert choose_engine((2, 2, 2, 64, 3), (2, 2, 2), (1, 1, 1)) == "numba"
    assert choose_engine((2, 2, 2, 32, 64), (2, 2, 2), (1, 1, 1)) == "gemm"
    # Other layers: direct sums for few channel pairs, the fewer the more taps
    # each output voxel receives.
    assert choose_engine((3, 3, 3, 8, 8), (2, 2, 2), (1, 1, 1)) == "numba"  # 3.4 taps
    assert choose_engine((3, 3, 3, 16, 8), (2, 2, 2), (1, 1, 1)) == "gemm"
    assert choose_engine((3, 3, 3, 4, 4), (1, 1, 1), (2, 2, 2)) == "numba"  # 27 taps
    assert choose_engine((3, 3, 3, 8, 4), (1, 1, 1), (1, 1, 1)) == "gemm"
    assert choose_engine((4, 4, 4, 1, 8), (2, 2, 2), (1, 1, 1)) == "numba"  # 8 taps
    assert choose_engine((4, 4, 4, 4, 4), (2, 2, 2), (1, 1, 1)) == "gemm"
    assert choose_engine((3, 3, 3, 32, 32), (1, 1, 1), (1, 1, 1)) == "gemm"
    # Dilation breaks kernel == stride's one tap per voxel.
    assert choose_engine((2, 2, 2, 32, 4), (2, 2, 2), (1, 1, 1)) == "numba"
    assert choose_engine((2, 2, 2, 32, 4), (2, 2, 2), (3, 3, 3)) == "gemm"


def test_auto_runs_the_engine_it_chooses() -> None:
    rng = np.random.default_rng(5)
    for kernel_shape, channels in [((2, 2, 2, 1), 1), ((3, 3, 3, 6), 5)]:
        x = rng.standard_normal((1, 5, 6, 7, channels)).astype(np.float32)
        kernel = rng.standard_normal((*kernel_shape, channels)).astype(np.float32)
        chosen = choose_engine(kernel.shape, (2, 2, 2), (1, 1, 1))
        args = (x, kernel, (2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 0, 2), (9, 10, 11))
        np.testing.assert_array_equal(
            conv_transpose_region(*args, engine="auto"), conv_transpose_region(*args, engine=chosen)
        )


@pytest.mark.parametrize("engine", FORCED)
def test_results_do_not_depend_on_the_thread_count(engine: str) -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 9, 10, 11, 6)).astype(np.float32)
    if engine == "separable":
        kernel = separable_kernel(rng, (3, 3, 3), 5, 6)
    else:
        kernel = rng.standard_normal((3, 3, 3, 5, 6)).astype(np.float32)
    args = (x, kernel, (2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1), (18, 20, 22))
    with set_threads(1):
        one = conv_transpose_region(*args, engine=engine)
    with set_threads(2):
        two = conv_transpose_region(*args, engine=engine)
    np.testing.assert_array_equal(one, two)


def test_set_threads_as_call_and_context() -> None:
    from threadpoolctl import threadpool_info

    try:
        set_threads(1)
        assert get_threads() == 1
        assert all(
            lib["num_threads"] == 1 for lib in threadpool_info() if lib["user_api"] == "blas"
        )
        with set_threads(3):
            assert get_threads() == 3
        assert get_threads() == 1
    finally:
        set_threads(None)
    assert get_threads() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_set_threads_refuses_bad_counts(bad: object) -> None:
    with pytest.raises(ValueError, match=r"`n`.*" + repr(bad).replace(".", r"\.")):
        set_threads(bad)  # type: ignore[arg-type]


def test_numba_is_imported_only_when_a_numba_path_runs() -> None:
    code = (
        "import sys, numpy as np, conv3dt\n"
        "from conv3dt.engine import conv_transpose_region\n"
        "x = np.ones((1, 2, 2, 2, 1), np.float32); k = np.ones((2, 2, 2, 1, 1), np.float32)\n"
        "conv_transpose_region(x, k, (2,) * 3, (1,) * 3, (0,) * 3, (0,) * 3, (4,) * 3,"
        " engine='numpy')\n"
        "print('numba' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "False"


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 6),
    s=st.integers(1, 5),
    d=st.integers(1, 4),
)
def test_axis_phases_partition_the_taps(k: int, s: int, d: int) -> None:
    phases = axis_phases(k, s, d)
    taps = sorted(t for ph in phases for t in ph.taps)
    assert taps == list(range(k))
    for ph in phases:
        for t, r in zip(ph.taps, ph.offsets, strict=True):
            # Input q + r through tap t lands on q * s + phase.
            assert (0 + r) * s + t * d == ph.phase
    groups = phase_groups((k, 1, 1), (s, 1, 1), (d, 1, 1))
    assert sorted(tr[0].phase for g in groups for tr in g.phases) == [ph.phase for ph in phases]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k, n", [(45, 19), (8, 96), (216, 96), (1, 7)])
def test_channel_products_rows_do_not_depend_on_their_position(dtype: type, k: int, n: int) -> None:
    """Each row's bits are the same wherever it sits: OpenBLAS GEMMs round some row
    positions differently (k >= 8 with (8, 96) and (216, 96) on Haswell kernels)."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((700, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    full = channel_products(a, b)
    np.testing.assert_allclose(full, a @ b, rtol=1e-4, atol=1e-4)
    for lo, hi in [(0, 1), (3, 4), (5, 300), (299, 700), (1, 2), *((s, s + 97) for s in range(13))]:
        np.testing.assert_array_equal(channel_products(a[lo:hi], b), full[lo:hi])


def test_special_paths_cover_split_and_whole_gemms() -> None:
    """The GEMM engine splits a product by last-axis offset only where the operand is
    much wider than the result; SPECIAL exercises both plans."""
    from conv3dt.engine.gemm_engine import _groups, _job

    def plans(kernel_size, strides, dilation, channels, filters):
        kernel = np.zeros((*kernel_size, filters, channels), dtype=np.float32)
        return {
            len(_job(kernel, group, np.zeros((1, 3, 3), np.int64), 4).windows)
            for group in _groups(kernel_size, strides, dilation)
        }

    assert plans((3, 3, 3), (1, 1, 1), (2, 2, 2), 5, 6) == {3}
    assert plans((4, 4, 4), (2, 2, 2), (1, 1, 1), 6, 5) == {1}


@pytest.mark.parametrize("engine", ["auto", "gemm"])
def test_wide_layer_tiles_are_exact(engine: str) -> None:
    """Many channels (long GEMM reductions, where a BLAS is most likely to sum
    differently for different shapes): tiles of every size equal the untiled result."""
    layer = {
        "kernel_size": (3, 3, 3),
        "strides": (2, 2, 2),
        "dilation": (1, 1, 1),
        "spatial": (7, 6, 9),
        "channels": 40,
        "filters": 24,
        "batch": 1,
        "seed": 3,
    }
    x, kernel = _arrays(layer)
    axes = layer_geometry(layer["spatial"], (3, 3, 3), (2, 2, 2), "same", None, (1, 1, 1))
    crop = tuple(g.crop_left for g in axes)
    out_shape = tuple(g.output_length for g in axes)
    whole = _run(layer, x, kernel, (0, 0, 0), crop, out_shape, engine, np.float32)
    rng = np.random.default_rng(0)
    for _ in range(12):
        lo = [int(rng.integers(0, n)) for n in out_shape]
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, out_shape, strict=True)]
        ranges = [g.input_range(a, b) for g, a, b in zip(axes, lo, hi, strict=True)]
        tile = _run(
            layer,
            x[:, slice(*ranges[0]), slice(*ranges[1]), slice(*ranges[2])],
            kernel,
            tuple(r[0] for r in ranges),
            tuple(a + c for a, c in zip(lo, crop, strict=True)),
            tuple(b - a for a, b in zip(lo, hi, strict=True)),
            engine,
            np.float32,
        )
        np.testing.assert_array_equal(
            tile, whole[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], err_msg=f"{lo}-{hi}"
        )


def _assert_identical(got: np.ndarray, want: np.ndarray, message: str) -> None:
    """Equal bit for bit, NaN where NaN, the sign of zeros included."""
    np.testing.assert_array_equal(got, want, err_msg=message)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want), err_msg=message)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    activation=st.sampled_from(sorted(FUSED_ACTIVATIONS)),
    use_bias=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_fused_epilogue_equals_the_separate_pass(
    data: st.DataObject, activation: str, use_bias: bool, dtype: type
) -> None:
    """Bias and activation applied in the engines' writing pass give exactly the sum
    followed by NumPy's bias and activation, on any box (voxels without input too),
    with NaN and signed zeros in the input."""
    layer = data.draw(layers())
    start, shape = data.draw(boxes(layer))
    x, kernel = _arrays(layer, dtype)
    x.flat[data.draw(st.integers(0, x.size - 1))] = np.nan
    kernel.flat[0] = -0.0
    bias = (
        np.random.default_rng(layer["seed"]).standard_normal(layer["filters"]).astype(dtype) * 3
        if use_bias
        else None
    )
    for engine in engines_for(kernel, layer["strides"]):
        want = _run(layer, x, kernel, (0, 0, 0), start, shape, engine, dtype)
        Epilogue(bias, activation).apply(want)
        got = conv_transpose_region(
            x,
            kernel,
            layer["strides"],
            layer["dilation"],
            (0, 0, 0),
            start,
            shape,
            dtype,
            engine=engine,
            bias=bias,
            activation=activation,
        )
        _assert_identical(got, want, f"engine={engine}")


@pytest.mark.parametrize("engine", ALL_ENGINES)
@pytest.mark.parametrize("case", SPECIAL)
def test_special_paths_fuse_bias_and_activation(engine: str, case: tuple) -> None:
    """The fast paths' fused epilogue (the upsampling widths, the GEMM scatter) on the
    whole output and on tiles, against the sum finished by NumPy."""
    layer, x, kernel, axes = _special_case(*case, batch=1, seed=11, separable=engine == "separable")
    bias = np.linspace(-1.5, 7.5, layer["filters"], dtype=np.float32)
    crop = tuple(g.crop_left for g in axes)
    out_shape = tuple(g.output_length for g in axes)
    for activation in ("relu", "relu6"):
        want = _run(layer, x, kernel, (0, 0, 0), crop, out_shape, engine, np.float32)
        Epilogue(bias, activation).apply(want)
        boxes_ = [((0, 0, 0), out_shape), ((1, 2, 3), (5, 7, 5)), ((3, 0, 5), (1, 1, 1))]
        for lo, size in boxes_:
            lo = tuple(min(a, n - 1) for a, n in zip(lo, out_shape, strict=True))
            size = tuple(min(s, n - a) for s, n, a in zip(size, out_shape, lo, strict=True))
            rng = [g.input_range(a, a + s) for g, a, s in zip(axes, lo, size, strict=True)]
            got = conv_transpose_region(
                x[:, slice(*rng[0]), slice(*rng[1]), slice(*rng[2])],
                kernel,
                layer["strides"],
                layer["dilation"],
                tuple(r[0] for r in rng),
                tuple(a + c for a, c in zip(lo, crop, strict=True)),
                size,
                np.float32,
                engine=engine,
                bias=bias,
                activation=activation,
            )
            region = tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))
            _assert_identical(got, want[(slice(None), *region)], f"{activation} {lo} {size}")


def test_epilogue_refuses_activations_it_cannot_fuse() -> None:
    with pytest.raises(ValueError, match="activation='softmax'"):
        conv_transpose_region(
            np.ones((1, 2, 2, 2, 1), np.float32),
            np.ones((2, 2, 2, 1, 1), np.float32),
            (2, 2, 2),
            (1, 1, 1),
            (0, 0, 0),
            (0, 0, 0),
            (4, 4, 4),
            activation="softmax",
        )


def test_relu_and_relu6_follow_numpy_on_nan_and_signed_zeros() -> None:
    """The kernels' clamps are written out by hand; they must agree with np.maximum and
    np.clip, which differ on -0 (maximum gives +0, clip keeps -0)."""
    values = np.array([-0.0, 0.0, np.nan, -np.inf, np.inf, -2.5, 3.0, 6.0, 6.5], np.float32)
    x = values.reshape(1, 1, 1, -1, 1)
    kernel = np.ones((1, 1, 1, 1, 1), np.float32)
    for activation, numpy_op in [
        ("relu", lambda v: np.maximum(v, np.float32(0))),
        ("relu6", lambda v: np.clip(v, np.float32(0), np.float32(6))),
    ]:
        for engine in FORCED:
            args = (x, kernel, (1, 1, 1), (1, 1, 1), (0, 0, 0), (0, 0, 0), (1, 1, values.size))
            # A BLAS sum of -0 alone may come out +0: compare with the engine's own sum.
            total = conv_transpose_region(*args, engine=engine).ravel()
            got = conv_transpose_region(*args, engine=engine, activation=activation).ravel()
            _assert_identical(got, numpy_op(total), f"{activation} {engine}")


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    activation=st.sampled_from(sorted(FUSED_ACTIVATIONS)),
    use_bias=st.booleans(),
)
def test_out_buffer_holding_garbage_gives_the_same_result(
    data: st.DataObject, activation: str, use_bias: bool
) -> None:
    """Writing into a reused array (full of NaN from before) gives exactly a new array's
    result, on any box, with or without input reaching all of it."""
    layer = data.draw(layers())
    start, shape = data.draw(boxes(layer))
    x, kernel = _arrays(layer)
    bias = np.linspace(-1, 1, layer["filters"], dtype=np.float32) if use_bias else None
    args = (x, kernel, layer["strides"], layer["dilation"], (0, 0, 0), start, shape, np.float32)
    for engine in engines_for(kernel, layer["strides"]):
        fresh = conv_transpose_region(*args, engine=engine, bias=bias, activation=activation)
        out = np.full_like(fresh, np.nan)
        got = conv_transpose_region(*args, engine=engine, bias=bias, activation=activation, out=out)
        assert got is out
        _assert_identical(out, fresh, f"engine={engine}")


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (np.zeros((1, 4, 4, 4, 2), np.float32), r"shape=\(1, 4, 4, 4, 1\)"),
        (np.zeros((1, 4, 4, 4, 1), np.float64), "dtype=float32"),
        (np.zeros((1, 4, 4, 8, 1), np.float32)[:, :, :, ::2], "C-contiguous"),
        ([[0.0]], "Received: list"),
    ],
)
def test_out_that_does_not_fit_is_refused(out: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        conv_transpose_region(
            np.ones((1, 2, 2, 2, 1), np.float32),
            np.ones((2, 2, 2, 1, 1), np.float32),
            (2, 2, 2),
            (1, 1, 1),
            (0, 0, 0),
            (0, 0, 0),
            (4, 4, 4),
            out=out,
        )
