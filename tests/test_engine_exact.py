"""Tiles of the GEMM engine are exact under a BLAS whose rounding depends on where a row sits.

OpenBLAS's Haswell sgemm rounds a row's result differently at some positions
within the matrix. The fake BLAS here goes further on purpose: it rounds each
row from the exact product, then moves rows at some positions (which also
depend on the matrix's row count and on where it starts in memory) one unit in
the last place. Only the row's values, its position, the shape and the
alignment decide its bits, never the other rows, as with a real BLAS. Tiles
must still equal the untiled result bit for bit.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conv3dt.engine import conv_transpose_region
from conv3dt.engine.reference import reference_conv_transpose
from conv3dt.ops import layer_geometry

_matmul = np.matmul


def _fake_blas_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One ``(m, k) @ (k, n)`` product as the fake BLAS rounds it."""
    result = _matmul(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
    # Rows at positions 4 and 5 modulo 6, counted from a point that moves with
    # the matrix's start address and row count, come out one unit higher.
    misalignment = a.ctypes.data % 64 // a.itemsize
    position = np.arange(a.shape[0]) + misalignment + a.shape[0] % 5
    moved = position % 6 >= 4
    result[moved] = np.nextafter(result[moved], np.inf)
    return result


def _fake_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``np.matmul`` for a stack of matrices times one matrix, through the fake BLAS."""
    stack = [_fake_blas_matrix(m, b) for m in a.reshape(-1, *a.shape[-2:])]
    result = np.stack(stack).reshape(*a.shape[:-1], b.shape[-1])
    if out is None:
        return result
    out[...] = result
    return out


def test_the_fake_blas_rounds_by_position() -> None:
    """The same rows give other bits at other positions: the fake is what the tests
    below need it to be."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 24)).astype(np.float32)
    b = rng.standard_normal((24, 8)).astype(np.float32)
    here = _fake_matmul(a[1:33], b)
    shifted = _fake_matmul(a[:32], b)[1:]
    np.testing.assert_allclose(here, a[1:33] @ b, rtol=1e-5, atol=1e-5)
    assert (here[:31] != shifted).any(axis=1).sum() >= 5
    # Same position, shape and alignment, other rows changed: same bits.
    before = _fake_matmul(a, b)
    a[::2] = 0
    np.testing.assert_array_equal(_fake_matmul(a, b)[1::2], before[1::2])


# kernel, strides, dilation, channels, filters, spatial: the whole product and
# the split one (dilated and stride 1), several groups, anisotropic, and a product
# wide enough for the engine's longer blocks, with lines longer than a block.
LAYERS = [
    ((3, 3, 3), (2, 2, 2), (1, 1, 1), 8, 4, (5, 6, 37)),
    ((3, 3, 3), (1, 1, 1), (2, 2, 2), 5, 6, (6, 5, 41)),
    ((4, 4, 4), (2, 2, 2), (1, 1, 1), 6, 5, (5, 4, 23)),
    ((2, 2, 2), (2, 2, 2), (1, 1, 1), 12, 8, (4, 5, 35)),
    ((2, 3, 1), (3, 1, 2), (2, 1, 3), 3, 2, (6, 7, 45)),
    ((2, 2, 2), (2, 2, 2), (1, 1, 1), 64, 32, (3, 3, 70)),
]


def _boxes(out_shape: tuple[int, ...], rng: np.random.Generator) -> list[tuple[tuple, tuple]]:
    """Odd boxes: random ones, one voxel, a corner, a thin slab, and a whole row of tiles."""
    boxes = []
    for _ in range(8):
        lo = [int(rng.integers(0, n)) for n in out_shape]
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, out_shape, strict=True)]
        boxes.append((tuple(lo), tuple(hi)))
    boxes.append(((1, 2, 3), (2, 3, 4)))
    boxes.append(((0, 0, 0), (3, 3, 17)))
    boxes.append(((1, 0, 0), (2, out_shape[1], out_shape[2])))
    n2 = out_shape[2]
    for lo2, hi2 in itertools.pairwise([0, 5, 6, 19, 33, n2 // 2 + 7, n2]):
        if lo2 < hi2:
            boxes.append(((0, 1, lo2), (out_shape[0], out_shape[1], hi2)))
    return boxes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", LAYERS)
def test_gemm_tiles_are_exact_under_a_position_dependent_blas(
    monkeypatch: pytest.MonkeyPatch, case: tuple, dtype: type
) -> None:
    kernel_size, strides, dilation, channels, filters, spatial = case
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, *spatial, channels)).astype(dtype)
    kernel = rng.standard_normal((*kernel_size, filters, channels)).astype(dtype)
    kernel /= np.sqrt(channels * np.prod(kernel_size)).astype(dtype)
    axes = layer_geometry(spatial, kernel_size, strides, "same", None, dilation)
    crop = tuple(g.crop_left for g in axes)
    out_shape = tuple(g.output_length for g in axes)
    expected = reference_conv_transpose(x, kernel, axes)
    calls = []

    def counted(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        calls.append(a.shape)
        return _fake_matmul(a, b, out=out)

    monkeypatch.setattr(np, "matmul", counted)

    def run(x_box: np.ndarray, origin: tuple, start: tuple, shape: tuple) -> np.ndarray:
        return conv_transpose_region(
            x_box, kernel, strides, dilation, origin, start, shape, dtype, engine="gemm"
        )

    whole = run(x, (0, 0, 0), crop, out_shape)
    assert calls, "the engine did not multiply through np.matmul"
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(whole, expected, rtol=tol, atol=tol)
    for lo, hi in _boxes(out_shape, rng):
        ranges = [g.input_range(a, b) for g, a, b in zip(axes, lo, hi, strict=True)]
        tile = run(
            x[:, slice(*ranges[0]), slice(*ranges[1]), slice(*ranges[2])],
            tuple(r[0] for r in ranges),
            tuple(a + c for a, c in zip(lo, crop, strict=True)),
            tuple(b - a for a, b in zip(lo, hi, strict=True)),
        )
        np.testing.assert_array_equal(
            tile, whole[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], err_msg=f"{lo}-{hi}"
        )


@pytest.mark.parametrize("lines", [(1, 64, 64), (4, 33, 33), (1, 3, 5), (2, 1, 1), (3, 40, 70)])
@pytest.mark.parametrize("width", [1, 4, 33, 52, 64, 66])
def test_line_layout_places_every_line_where_its_residue_says(lines: tuple, width: int) -> None:
    """Every line once, at a stream row congruent to its residue, none overlapping."""
    from conv3dt.engine.gemm_engine import _line_layout, _spread

    rows, residue = 64, 5
    order, start = _line_layout(lines, width, residue, rows)
    batch, g0, g1 = lines
    u0, u1 = np.meshgrid(np.arange(g0), np.arange(g1), indexing="ij")
    expected = np.tile((residue + _spread(rows) * u0 + u1).ravel(), batch)
    np.testing.assert_array_equal(np.sort(order), np.arange(batch * g0 * g1))
    np.testing.assert_array_equal((start - expected[order]) % rows, 0)
    assert (np.diff(start) >= width).all()
    assert start[0] >= 0
