"""Property tests of :func:`conv3dt.ops.conv3d_transpose`.

Three independent checks over random arguments:

* values against the slow float64 reference (``conv3dt.engine.reference``),
  for every engine, both data formats, float32 and float64;
* the adjoint identity ``<conv3d_transpose(x), y> == <x, conv3d(y)>`` with a
  plain direct convolution written here, not taken from conv3dt;
* the output shape against Keras's documented output-length formula, also
  written here.
"""

from __future__ import annotations

import numpy as np
import pytest
from _kernels import separable_kernel
from hypothesis import given, settings
from hypothesis import strategies as st

from conv3dt.engine import ENGINES
from conv3dt.engine.reference import reference_conv_transpose
from conv3dt.ops import conv3d_transpose, layer_geometry

triples = st.tuples


@st.composite
def configs(draw: st.DrawFn) -> dict:
    """Arguments of one transposed convolution, with matching input and kernel shapes."""
    kernel_size = draw(triples(*[st.integers(1, 4)] * 3))
    strides = draw(triples(*[st.integers(1, 4)] * 3))
    dilation = draw(triples(*[st.integers(1, 3)] * 3))
    use_op = draw(st.booleans())
    output_padding = tuple(draw(st.integers(0, s - 1)) for s in strides) if use_op else None
    return {
        "spatial": draw(triples(*[st.integers(1, 5)] * 3)),
        "kernel_size": kernel_size,
        "strides": strides,
        "dilation": dilation,
        "padding": draw(st.sampled_from(["valid", "same", "VALID", "Same"])),
        "output_padding": output_padding,
        "channels": draw(st.integers(1, 4)),
        "filters": draw(st.integers(1, 4)),
        "batch": draw(st.integers(1, 3)),
        "data_format": draw(st.sampled_from(["channels_last", "channels_first"])),
        "dtype": draw(st.sampled_from([np.float32, np.float64])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _arrays(cfg: dict, separable: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Channels-last input, kernel and bias; the kernel is scaled so outputs are unit-scale.

    The kernel is exactly separable when ``separable`` says so, by default for a
    third of the seeds.
    """
    rng = np.random.default_rng(cfg["seed"])
    x = rng.standard_normal((cfg["batch"], *cfg["spatial"], cfg["channels"]))
    if cfg["seed"] % 3 == 0 if separable is None else separable:
        kernel = separable_kernel(
            rng, cfg["kernel_size"], cfg["filters"], cfg["channels"], np.float64
        )
    else:
        fan_in = cfg["channels"] * int(np.prod(cfg["kernel_size"]))
        kernel = rng.standard_normal((*cfg["kernel_size"], cfg["filters"], cfg["channels"]))
        kernel /= np.sqrt(fan_in)
    bias = rng.standard_normal(cfg["filters"])
    return x.astype(cfg["dtype"]), kernel.astype(cfg["dtype"]), bias.astype(cfg["dtype"])


def _to_format(a: np.ndarray, data_format: str) -> np.ndarray:
    return a if data_format == "channels_last" else np.moveaxis(a, -1, 1)


def _from_format(a: np.ndarray, data_format: str) -> np.ndarray:
    return a if data_format == "channels_last" else np.moveaxis(a, 1, -1)


def _run(cfg: dict, x: np.ndarray, kernel: np.ndarray, bias, engine: str = "auto") -> np.ndarray:
    """conv3d_transpose on a channels-last input; result returned channels-last."""
    out = conv3d_transpose(
        _to_format(x, cfg["data_format"]),
        kernel,
        bias,
        strides=cfg["strides"],
        padding=cfg["padding"],
        output_padding=cfg["output_padding"],
        data_format=cfg["data_format"],
        dilation_rate=cfg["dilation"],
        engine=engine,
    )
    return _from_format(out, cfg["data_format"])


# ----------------------------------------------------------------------------
# Independent formulas (Keras's documentation / compute_conv_transpose_output_shape)


def keras_output_length(n: int, k: int, s: int, padding: str, op: int | None, d: int) -> int:
    """Output length on one axis as Keras documents it."""
    k_eff = (k - 1) * d + 1
    if padding.lower() == "valid":
        if op is None:
            return (n - 1) * s + max(k_eff, s)
        return (n - 1) * s + k_eff + op
    if op is None:
        return n * s
    return (n - 1) * s + k_eff % 2 + op


def keras_left_crop(k: int, s: int, padding: str, op: int | None, d: int) -> int:
    """Full-output index of Keras's output index 0 on one axis.

    The full (uncropped) output has input ``i`` and tap ``t`` landing on
    ``i * s + t * d``. "valid" keeps it from index 0. "same" is the
    direct-convolution padding of total ``pad`` around the stride-dilated input,
    split with the larger half on the left but never more than ``k_eff - 1``;
    the output starts ``k_eff - 1 - left`` into the full output.
    """
    k_eff = (k - 1) * d + 1
    if padding.lower() == "valid":
        return 0
    pad = s + k_eff - 2 if op is None else k_eff + k_eff % 2 - 2 + op
    left = min((pad + 1) // 2, k_eff - 1)
    return k_eff - 1 - left


def direct_conv3d(
    y: np.ndarray,
    kernel: np.ndarray,
    in_spatial: tuple[int, int, int],
    strides: tuple[int, int, int],
    dilation: tuple[int, int, int],
    left: tuple[int, int, int],
) -> np.ndarray:
    """Strided, dilated cross-correlation of channels-last ``y`` with ``kernel``.

    ``y`` is shifted right by ``left`` zeros (and zero-extended on the right as
    far as the taps reach); output voxel ``i`` is
    ``sum_t kernel[t].T @ y_padded[i * s + t * d]``. This is the adjoint of a
    transposed convolution whose output window starts ``left`` into the full output.
    """
    y = np.asarray(y, dtype=np.float64)
    pads = [(0, 0)]
    for a in range(3):
        reach = (in_spatial[a] - 1) * strides[a] + (kernel.shape[a] - 1) * dilation[a] + 1
        right = max(0, reach - left[a] - y.shape[1 + a])
        pads.append((left[a], right))
    pads.append((0, 0))
    y_pad = np.pad(y, pads)
    out = np.zeros((y.shape[0], *in_spatial, kernel.shape[4]))
    for t in np.ndindex(*kernel.shape[:3]):
        window = tuple(
            slice(
                t[a] * dilation[a],
                t[a] * dilation[a] + (in_spatial[a] - 1) * strides[a] + 1,
                strides[a],
            )
            for a in range(3)
        )
        out += np.einsum("bdhwf,fc->bdhwc", y_pad[(slice(None), *window)], kernel[t])
    return out


# ----------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=300, deadline=None)
@given(cfg=configs())
def test_matches_reference(engine: str, cfg: dict) -> None:
    x, kernel, bias = _arrays(cfg, separable=engine == "separable" or None)
    use_bias = cfg["seed"] % 2 == 0
    got = _run(cfg, x, kernel, bias if use_bias else None, engine=engine)
    axes = layer_geometry(
        cfg["spatial"],
        cfg["kernel_size"],
        cfg["strides"],
        cfg["padding"].lower(),
        cfg["output_padding"],
        cfg["dilation"],
    )
    expected = reference_conv_transpose(x, kernel, axes)
    if use_bias:
        expected = expected + bias.astype(np.float64)
    assert got.dtype == cfg["dtype"]
    assert got.shape == expected.shape
    tol = 1e-5 if cfg["dtype"] == np.float32 else 1e-12
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@settings(max_examples=300, deadline=None)
@given(cfg=configs())
def test_output_shape_matches_keras_formula(cfg: dict) -> None:
    x, kernel, _ = _arrays(cfg)
    got = _run(cfg, x, kernel, None)
    spatial = tuple(
        keras_output_length(
            cfg["spatial"][a],
            cfg["kernel_size"][a],
            cfg["strides"][a],
            cfg["padding"],
            None if cfg["output_padding"] is None else cfg["output_padding"][a],
            cfg["dilation"][a],
        )
        for a in range(3)
    )
    assert got.shape == (cfg["batch"], *spatial, cfg["filters"])


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=300, deadline=None)
@given(cfg=configs())
def test_adjoint_identity(engine: str, cfg: dict) -> None:
    cfg = {**cfg, "dtype": np.float64}
    x, kernel, _ = _arrays(cfg, separable=engine == "separable" or None)
    out = _run(cfg, x, kernel, None, engine=engine)
    y = np.random.default_rng(cfg["seed"] + 1).standard_normal(out.shape)
    left = tuple(
        keras_left_crop(
            cfg["kernel_size"][a],
            cfg["strides"][a],
            cfg["padding"],
            None if cfg["output_padding"] is None else cfg["output_padding"][a],
            cfg["dilation"][a],
        )
        for a in range(3)
    )
    x_adj = direct_conv3d(y, kernel, cfg["spatial"], cfg["strides"], cfg["dilation"], left)
    lhs = float(np.vdot(out, y))
    rhs = float(np.vdot(x, x_adj))
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)


def test_direct_conv3d_is_plain_correlation() -> None:
    """Sanity check of the test's own helper on a case worked by hand.

    One axis of length 3, kernel [1, 10] (taps 0 and 1), stride 1, no padding:
    out[i] = y[i] * 1 + y[i + 1] * 10 for i in {0, 1} (input length 2).
    """
    y = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1, 1)
    kernel = np.array([1.0, 10.0]).reshape(2, 1, 1, 1, 1)
    out = direct_conv3d(y, kernel, (2, 1, 1), (1, 1, 1), (1, 1, 1), (0, 0, 0))
    np.testing.assert_array_equal(out.ravel(), [21.0, 32.0])


@pytest.mark.parametrize("engine", ENGINES)
def test_spatial_one_and_stride_above_kernel(engine: str) -> None:
    """A single voxel with stride 4 > kernel 2, "valid": kernel copy then zeros."""
    x = np.ones((1, 1, 1, 1, 1), dtype=np.float64)
    kernel = np.arange(1.0, 9.0).reshape(2, 2, 2, 1, 1)
    if engine == "separable":
        kernel = np.einsum("i,j,k->ijk", [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]).reshape(2, 2, 2, 1, 1)
    out = conv3d_transpose(x, kernel, strides=4, padding="valid", engine=engine)
    assert out.shape == (1, 4, 4, 4, 1)
    np.testing.assert_array_equal(out[0, :2, :2, :2, 0], kernel[..., 0, 0])
    assert float(np.abs(out).sum()) == float(kernel.sum())
