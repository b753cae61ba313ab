"""Streaming volumes through the tiled run: exact tiles, storage-shaped plans, bounded memory.

Every exactness test compares the file ``upsample_file`` writes with small tiles
against the whole-volume ``layer(x)`` with ``assert_array_equal``: tiles are
never blended, so they must agree bit for bit.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import tracemalloc
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from _kernels import separable_kernel

from conv3dt import Conv3DTranspose
from conv3dt.geometry import axis_geometry
from conv3dt.plan import ENGINE_WORKSPACE_BYTES, MemoryLimitError, plan_tiles
from conv3dt.run import prepare, upsample_file
from conv3dt.spec import LayerSpec
from conv3dt.volumes import create_volume, open_volume
from conv3dt.volumes.nifti import int_scaling

EXTENSIONS = {"npy": ".npy", "nii": ".nii", "niigz": ".nii.gz", "h5": ".h5"}


# -- helpers -----------------------------------------------------------------


def _layer(rng: np.random.Generator, in_channels: int, **config) -> Conv3DTranspose:
    layer = Conv3DTranspose(**config)
    shape = (
        (1, in_channels, 1, 1, 1)
        if layer.data_format == "channels_first"
        else (1, 1, 1, 1, in_channels)
    )
    layer.build(shape, seed=0)
    kernel = rng.standard_normal(layer.kernel.shape).astype(np.float32)
    weights = [kernel]
    if layer.use_bias:
        weights.append(rng.standard_normal(layer.filters).astype(np.float32))
    layer.set_weights(weights)
    return layer


def _save(path: Path, array: np.ndarray) -> None:
    name = path.name
    if name.endswith(".npy"):
        np.save(path, array)
    elif name.endswith(".h5"):
        with h5py.File(path, "w") as handle:
            handle.create_dataset("volume", data=array, chunks=True)
    else:
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def _load(path: Path) -> np.ndarray:
    name = path.name
    if name.endswith(".npy"):
        return np.load(path)
    if name.endswith(".h5"):
        with h5py.File(path, "r") as handle:
            return handle["data"][()]
    image = nib.load(path)
    if image.header.get_intent()[0] == "vector":
        # Several filters are stored as vector components in the 5th dimension.
        return np.asarray(image.dataobj)[:, :, :, 0]
    return np.asarray(image.dataobj)


def _canonical_input(stored: np.ndarray, channels_first: bool, nifti: bool) -> np.ndarray:
    """The stored input as ``(batch, z, y, x, channels)``."""
    if stored.ndim == 3:
        return stored[None, ..., None]
    if nifti or not channels_first:
        return stored[None] if stored.ndim == 4 else stored
    return np.moveaxis(stored if stored.ndim == 5 else stored[None], 1, -1)


def _expected(
    layer: Conv3DTranspose, stored: np.ndarray, in_nifti: bool, out_nifti: bool
) -> np.ndarray:
    """What the output file must hold: the whole-volume ``layer(x)`` in the output's layout."""
    channels_first = layer.data_format == "channels_first"
    x = _canonical_input(stored, channels_first, in_nifti)
    whole = layer(np.moveaxis(x, -1, 1) if channels_first else x)
    out = np.moveaxis(whole, 1, -1) if channels_first else whole  # (b, z, y, x, f)
    if stored.ndim == 5:
        return np.moveaxis(out, -1, 1) if channels_first else out
    out = out[0]
    # A channel axis is kept when the input had one and added when filters > 1.
    if stored.ndim == 3 and layer.filters == 1:
        return out[..., 0]
    if out_nifti or in_nifti or not channels_first:
        return out
    return np.moveaxis(out, -1, 0)


def _run(tmp_path, layer, stored, fmt_in, fmt_out, **kwargs):
    src = tmp_path / f"in{EXTENSIONS[fmt_in]}"
    dst = tmp_path / f"out{EXTENSIONS[fmt_out]}"
    _save(src, stored)
    result = upsample_file(LayerSpec(layer, "test"), str(src), str(dst), **kwargs)
    return result, _load(dst)


def _smallest_budget(tmp_path, layer, stored, fmt_in, fmt_out) -> int:
    """The smallest budget the planner accepts: tiles of one stride block per split axis."""
    with pytest.raises(MemoryLimitError) as refused:
        _run(tmp_path, layer, stored, fmt_in, fmt_out, memory_limit=1)
    return refused.value.minimum


def _random_case(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    strides = tuple(int(s) for s in rng.integers(1, 4, 3))
    config = dict(
        filters=int(rng.integers(1, 4)),
        kernel_size=tuple(int(k) for k in rng.integers(1, 5, 3)),
        strides=strides,
        padding=str(rng.choice(["valid", "same"])),
        data_format=str(rng.choice(["channels_last", "channels_first"])),
        activation=str(rng.choice(["linear", "tanh", "relu", "softmax", "log_softmax"])),
        use_bias=bool(rng.integers(0, 2)),
    )
    if rng.integers(0, 2):
        config["output_padding"] = tuple(int(rng.integers(0, s)) for s in strides)
    if rng.integers(0, 3) == 0 and max(strides) == 1:
        # Keras refuses dilation together with strides > 1.
        config["dilation_rate"] = tuple(int(d) for d in rng.integers(1, 3, 3))
    fmt_in, fmt_out = list(EXTENSIONS)[seed % 4], list(EXTENSIONS)[(seed // 4) % 4]
    in_channels = int(rng.integers(1, 4))
    spatial = tuple(int(n) for n in rng.integers(1, 6, 3))
    nifti = fmt_in.startswith("nii")
    if nifti:
        rank = 3 if in_channels == 1 and rng.integers(0, 2) else 4
        shape = spatial if rank == 3 else (*spatial, in_channels)
    else:
        rank = int(rng.choice([3, 4, 5])) if in_channels == 1 else int(rng.choice([4, 5]))
        channels = (in_channels,) if rank > 3 else ()
        batch = (int(rng.integers(1, 3)),) if rank == 5 else ()
        if config["data_format"] == "channels_first":
            shape = (*batch, *channels, *spatial)
        else:
            shape = (*batch, *spatial, *channels)
    if fmt_out.startswith("nii") and rank == 5:
        fmt_out = "npy"  # a batch of multi-channel volumes has no NIfTI form
    tile = tuple(int(t) for t in rng.integers(1, 9, 3))
    return dict(
        config=config,
        shape=shape,
        fmt_in=fmt_in,
        fmt_out=fmt_out,
        tile=tile,
        in_channels=in_channels,
        rng=rng,
    )


# -- tiled equals untiled, exactly ---------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_random_layers_shapes_tiles_and_formats_are_exact(tmp_path, seed):
    case = _random_case(seed)
    rng = case["rng"]
    layer = _layer(rng, case["in_channels"], **case["config"])
    stored = rng.standard_normal(case["shape"]).astype(np.float32)
    _, got = _run(tmp_path, layer, stored, case["fmt_in"], case["fmt_out"], tile_shape=case["tile"])
    expected = _expected(
        layer, stored, case["fmt_in"].startswith("nii"), case["fmt_out"].startswith("nii")
    )
    np.testing.assert_array_equal(got, expected, err_msg=str(case["config"]))


@pytest.mark.parametrize("fmt", list(EXTENSIONS))
@pytest.mark.parametrize("tile", [(1, 1, 1), (2, 3, 1), (5, 1, 4), (100, 100, 100)])
def test_one_voxel_tiles_and_tiles_touching_every_border(tmp_path, fmt, tile):
    rng = np.random.default_rng(hash((fmt, tile)) % 2**32)
    layer = _layer(
        rng,
        2,
        filters=2,
        kernel_size=(3, 2, 4),
        strides=(2, 3, 1),
        padding="same",
        activation="tanh",
    )
    stored = rng.standard_normal((4, 3, 5, 2)).astype(np.float32)
    nifti = fmt.startswith("nii")
    _, got = _run(tmp_path, layer, stored, fmt, fmt, tile_shape=tile)
    np.testing.assert_array_equal(got, _expected(layer, stored, nifti, nifti))


def test_dilation_and_negative_crops(tmp_path):
    rng = np.random.default_rng(3)
    # Valid padding with output_padding: zeros past the full output (negative crop).
    cropped = _layer(rng, 1, filters=2, kernel_size=2, strides=3, padding="valid", output_padding=2)
    assert all(g.crop_right < 0 for g in cropped.geometry((4, 4, 4)))
    dilated = _layer(rng, 2, filters=1, kernel_size=3, dilation_rate=(2, 1, 3), padding="same")
    for layer, shape in [(cropped, (4, 4, 4)), (dilated, (5, 6, 4, 2))]:
        stored = rng.standard_normal(shape).astype(np.float32)
        for tile in [(1, 1, 1), (2, 5, 3)]:
            _, got = _run(tmp_path, layer, stored, "npy", "npy", tile_shape=tile)
            np.testing.assert_array_equal(got, _expected(layer, stored, False, False))


def test_a_batch_of_volumes(tmp_path):
    rng = np.random.default_rng(8)
    for data_format, shape in [
        ("channels_last", (3, 4, 3, 5, 2)),
        ("channels_first", (2, 2, 4, 3, 5)),
    ]:
        layer = _layer(rng, 2, filters=3, kernel_size=3, strides=2, data_format=data_format)
        stored = rng.standard_normal(shape).astype(np.float32)
        for fmt in ("npy", "h5"):
            _, got = _run(tmp_path, layer, stored, fmt, fmt, tile_shape=(3, 2, 4))
            np.testing.assert_array_equal(got, _expected(layer, stored, False, False))


def test_nifti_series_as_a_batch(tmp_path):
    rng = np.random.default_rng(12)
    layer = _layer(rng, 1, filters=1, kernel_size=3, strides=2, padding="same")
    stored = rng.standard_normal((4, 5, 3, 3)).astype(np.float32)
    for fmt in ("nii", "niigz"):
        _, got = _run(tmp_path, layer, stored, fmt, fmt, tile_shape=(3, 4, 2), four_d_as_batch=True)
        expected = np.stack([_expected(layer, stored[..., b], True, True) for b in range(3)], -1)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("activation", ["softmax", "log_softmax"])
def test_coupling_activations_keep_the_width_whole(tmp_path, activation):
    rng = np.random.default_rng(21)
    layer = _layer(
        rng,
        2,
        filters=3,
        kernel_size=3,
        strides=2,
        data_format="channels_first",
        activation=activation,
    )
    stored = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    result, got = _run(tmp_path, layer, stored, "npy", "npy", tile_shape=(1, 1, 1))
    # softmax acts on the last axis, the width in channels_first: never split.
    width = got.shape[-1]
    assert result.extra["tile_shape"] == [1, 1, width]
    np.testing.assert_array_equal(got, _expected(layer, stored, False, False))
    # The same for a budget-driven plan that must split the other axes.
    limit = _smallest_budget(tmp_path, layer, stored, "npy", "npy")
    result, got = _run(tmp_path, layer, stored, "npy", "npy", memory_limit=limit)
    assert result.extra["tile_shape"][2] == width and result.tiles > 1
    np.testing.assert_array_equal(got, _expected(layer, stored, False, False))


def test_splitting_a_coupled_axis_would_change_the_result():
    # The guard above matters: tiles along the width give a different softmax.
    rng = np.random.default_rng(21)
    layer = _layer(
        rng,
        1,
        filters=2,
        kernel_size=3,
        strides=2,
        data_format="channels_first",
        activation="softmax",
    )
    x = rng.standard_normal((1, 1, 2, 2, 4)).astype(np.float32)
    whole = layer(x)
    halves = [layer(x[..., :2]), layer(x[..., 2:])]
    assert not np.array_equal(np.concatenate(halves, -1), whole[..., : 2 * halves[0].shape[-1]])


@pytest.mark.parametrize("dtype", ["int16", "uint8"])
@pytest.mark.parametrize("fmt", ["nii", "niigz"])
def test_integer_nifti_output_is_quantized_from_the_exact_range(tmp_path, dtype, fmt):
    rng = np.random.default_rng(5)
    layer = _layer(rng, 1, filters=1, kernel_size=3, strides=2, padding="same")
    stored = rng.standard_normal((6, 5, 4)).astype(np.float32)
    _save(tmp_path / "in.nii", stored)
    out = tmp_path / f"out{EXTENSIONS[fmt]}"
    upsample_file(
        LayerSpec(layer, "t"),
        str(tmp_path / "in.nii"),
        str(out),
        output_dtype=dtype,
        tile_shape=(3, 2, 1),
    )
    whole = _expected(layer, stored, True, True).astype(np.float64)
    image = nib.load(out)
    header = image.header.copy()
    header.set_slope_inter(*int_scaling(np.dtype(dtype), whole.min(), whole.max()))
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    assert (float(image.dataobj.slope), float(image.dataobj.inter)) == (slope, inter)
    info = np.iinfo(dtype)
    quantized = np.clip(np.rint((whole - inter) / slope), info.min, info.max)
    np.testing.assert_array_equal(np.asarray(image.dataobj.get_unscaled()), quantized)
    assert sorted(os.listdir(tmp_path)) == ["in.nii", out.name]


def test_every_engine_gives_the_same_tiles(tmp_path):
    from conv3dt.engine import ENGINES

    rng = np.random.default_rng(30)
    layer = _layer(rng, 3, filters=4, kernel_size=3, strides=2, padding="same")
    stored = rng.standard_normal((7, 6, 5, 3)).astype(np.float32)
    separable = _layer(rng, 3, filters=4, kernel_size=3, strides=2, padding="same")
    separable.set_weights([separable_kernel(rng, (3, 3, 3), 4, 3), separable.bias])
    for engine in ENGINES:
        used = separable if engine == "separable" else layer
        for tile in [(1, 1, 1), (3, 5, 2)]:
            _, got = _run(tmp_path, used, stored, "npy", "npy", tile_shape=tile, engine=engine)
            whole = used(stored[None], engine=engine)[0]
            np.testing.assert_array_equal(got, whole, err_msg=f"{engine} {tile}")


# -- plans shaped to the storage ---------------------------------------------------


def _axes(shape, k=3, s=2, padding="same"):
    return tuple(axis_geometry(n, k, s, padding) for n in shape)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_tiles_are_iterated_with_the_split_order_outermost(order):
    plan = plan_tiles(_axes((5, 6, 7)), 1, 1, tile_shape=(3, 4, 5), split_order=order)
    starts = [t.out_start for t in plan]
    keys = [tuple(s[a] for a in order) for s in starts]
    assert keys == sorted(keys) and len(set(starts)) == len(plan)


def test_nifti_inputs_give_k_slabs_in_increasing_k(tmp_path):
    _save(tmp_path / "in.nii.gz", np.zeros((40, 30, 20), np.float32))
    layer = _layer(np.random.default_rng(0), 1, filters=1, kernel_size=3, strides=2)
    with open_volume(str(tmp_path / "in.nii.gz")) as reader:
        prepared = prepare(
            LayerSpec(layer, "t"),
            reader.shape,
            spatial_first=True,
            storage_order="F",
            memory_limit=ENGINE_WORKSPACE_BYTES + 2 * 2**20,
        )
    plan = prepared.plan
    assert plan.order[0] == 2 and plan.tile_shape[:2] == plan.output_shape[:2]
    assert len(plan) > 1
    ks = [t.out_start[2] for t in plan]
    assert ks == sorted(ks)


def test_budget_bounds_the_estimate_and_the_stream_windows_count():
    axes = _axes((64, 64, 64))
    plain = plan_tiles(
        axes, 4, 8, memory_limit=ENGINE_WORKSPACE_BYTES + 48 * 2**20, split_order=(2, 1, 0)
    )
    streamed = plan_tiles(
        axes,
        4,
        8,
        memory_limit=ENGINE_WORKSPACE_BYTES + 48 * 2**20,
        split_order=(2, 1, 0),
        stream_in_bytes=16,
        stream_out_bytes=32,
    )
    for plan in (plain, streamed):
        assert plan.peak_bytes <= ENGINE_WORKSPACE_BYTES + 48 * 2**20
    assert streamed.in_window_bytes > 0 and streamed.out_window_bytes > 0
    assert streamed.tile_shape[2] < plain.tile_shape[2]
    # The output window is whole planes for the tile's k extent, all channels.
    assert streamed.out_window_bytes == 32 * 128 * 128 * streamed.tile_shape[2]


def test_output_chunks_divide_the_tiles_and_input_chunks_align():
    axes = _axes((50, 40, 30))
    plan = plan_tiles(
        axes,
        1,
        2,
        memory_limit=ENGINE_WORKSPACE_BYTES + 6 * 2**20,
        chunk_bytes=2**16,
        in_chunks=(4, 8, 8),
    )
    assert plan.chunks is not None
    assert np.prod(plan.chunks) * 2 * 4 <= 2**16
    for axis in range(3):
        if plan.tile_shape[axis] < plan.output_shape[axis]:
            assert plan.tile_shape[axis] % plan.chunks[axis] == 0
            # Whole input chunks (4 voxels, 8 output voxels at stride 2) per tile.
            assert plan.tile_shape[axis] % 8 == 0


def test_hdf5_output_is_chunked_to_the_tiles(tmp_path):
    rng = np.random.default_rng(2)
    layer = _layer(rng, 2, filters=3, kernel_size=2, strides=2, padding="valid")
    stored = rng.standard_normal((20, 24, 16, 2)).astype(np.float32)
    result, got = _run(
        tmp_path, layer, stored, "h5", "h5", memory_limit=ENGINE_WORKSPACE_BYTES + 2**20
    )
    assert result.tiles > 1
    np.testing.assert_array_equal(got, _expected(layer, stored, False, False))
    with h5py.File(tmp_path / "out.h5", "r") as handle:
        chunks = handle["data"].chunks
    tile = result.extra["tile_shape"]
    assert chunks[3] == 3
    for axis in range(3):
        if tile[axis] < got.shape[axis]:
            assert tile[axis] % chunks[axis] == 0


# -- bounded memory ---------------------------------------------------------------


def _traced_peak(function):
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_gzip_output_streams_planes_in_order(tmp_path):
    shape = (64, 48, 384)
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    path = tmp_path / "out.nii.gz"

    def write():
        with create_volume(str(path), shape, "float32") as writer:
            for k in range(0, shape[2], 8):
                writer.write((slice(None), slice(None), slice(k, k + 8)), data[..., k : k + 8])

    slab = data[..., :8].nbytes
    peak = _traced_peak(write)
    # The slab being written, its compressed bytes and zlib's state (256 KiB at
    # level 1), never the volume (4.7 MB).
    assert peak < 2 * slab + 2**19 < data.nbytes / 4
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), data)
    assert os.listdir(tmp_path) == ["out.nii.gz"]


def test_gzip_output_boxes_out_of_order_spill_to_scratch(tmp_path):
    shape = (16, 12, 10, 3)
    data = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    path = tmp_path / "out.nii.gz"
    boxes = list(
        itertools.product(
            *(
                [slice(a, min(a + t, n)) for a in range(0, n, t)]
                for n, t in zip(shape, (5, 7, 3, 2), strict=True)
            )
        )
    )
    np.random.default_rng(2).shuffle(boxes)
    writer = create_volume(str(path), shape, "float32")
    writer.buffer_limit = 3 * 16 * 12 * 4  # three planes
    for box in boxes:
        writer.write(box, data[box])
    writer.commit()
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), data)
    assert os.listdir(tmp_path) == ["out.nii.gz"]


def test_gzip_overlapping_a_compressed_plane_is_refused(tmp_path):
    writer = create_volume(str(tmp_path / "o.nii.gz"), (2, 2, 3), "float32")
    writer.write((slice(None), slice(None), slice(0, 1)), np.ones((2, 2, 1)))
    with pytest.raises(ValueError, match="overlap"):
        writer.write((slice(None), slice(None), slice(0, 2)), np.ones((2, 2, 2)))
    writer.abort()
    assert os.listdir(tmp_path) == []


def _counting_pread(monkeypatch):
    counted = {"bytes": 0}
    original = os.pread

    def pread(fd, size, offset):
        data = original(fd, size, offset)
        counted["bytes"] += len(data)
        return data

    monkeypatch.setattr(os, "pread", pread)
    return counted


@pytest.mark.parametrize("channels", [1, 3])
def test_gzip_input_is_decompressed_once_in_slab_order(tmp_path, monkeypatch, channels):
    shape = (64, 48, 384, channels) if channels > 1 else (96, 80, 384)
    data = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    path = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    size = path.stat().st_size
    counted = _counting_pread(monkeypatch)
    matches = []
    with open_volume(str(path)) as reader:
        reader.window_limit = shape[0] * shape[1] * 4 * 10

        def read():
            for k in range(0, 384, 8):
                # Slabs with a halo overlapping the previous one, split in j too.
                lo = max(0, k - 2)
                half = shape[1] // 2
                for j in (slice(0, half), slice(half, shape[1])):
                    box = reader.read((slice(None), j, slice(lo, k + 8)))
                    matches.append(np.array_equal(box, data[:, j, lo : k + 8]))

        peak = _traced_peak(read)
    assert len(matches) == 96 and all(matches)
    # Each compressed byte read about once (the first reads also walk to each
    # channel's start), however the tiles overlap.
    assert counted["bytes"] <= 2 * size + 2**20 * channels
    # Windows of 10 planes per channel, the boxes returned and zlib's buffers:
    # independent of the volume's depth.
    assert peak < data.nbytes / 6


def test_gzip_input_read_backwards_restarts_and_stays_correct(tmp_path):
    data = np.random.default_rng(6).standard_normal((6, 5, 9, 2)).astype(">f4")
    header = nib.Nifti1Header(endianness=">")
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    buffer = io.BytesIO()
    header.write_to(buffer)
    content = buffer.getvalue() + data.tobytes(order="F")
    # Two gzip members, split inside the data: readers must cross the boundary.
    cut = len(content) // 2 + 3
    (tmp_path / "two.nii.gz").write_bytes(
        gzip.compress(content[:cut]) + gzip.compress(content[cut:])
    )
    with open_volume(str(tmp_path / "two.nii.gz")) as reader:
        for box in [
            (slice(None),) * 4,
            (slice(1, 4), slice(0, 5), slice(5, 9), slice(1, 2)),
            (slice(0, 6), slice(2, 3), slice(0, 2), slice(0, 2)),
            (slice(2, 3), slice(1, 4), slice(3, 8), slice(0, 1)),
        ]:
            np.testing.assert_array_equal(reader.read(box), data[box])


@pytest.mark.parametrize(
    "fmt_in, fmt_out, config",
    [
        ("npy", "npy", {}),
        ("niigz", "niigz", {}),
        ("h5", "h5", {}),
        ("nii", "nii", {}),
        ("npy", "npy", {"activation": "softmax", "data_format": "channels_first"}),
        ("npy", "npy", {"activation": "linear"}),
    ],
)
def test_measured_memory_stays_within_the_plan(tmp_path, fmt_in, fmt_out, config):
    rng = np.random.default_rng(9)
    config = {"padding": "same", "activation": "tanh", **config}
    layer = _layer(rng, 2, filters=2, kernel_size=3, strides=2, **config)
    stored = rng.standard_normal((64, 64, 64, 2)).astype(np.float32)
    small = stored[:4, :4, :4]
    if layer.data_format == "channels_first":
        stored, small = np.moveaxis(stored, -1, 0), np.moveaxis(small, -1, 0)
    # Compile and warm the engine first: its one-off allocations are not tiles.
    _run(tmp_path, layer, small, "npy", "npy")
    src = tmp_path / f"in{EXTENSIONS[fmt_in]}"
    dst = tmp_path / f"out{EXTENSIONS[fmt_out]}"
    _save(src, stored)
    limit = ENGINE_WORKSPACE_BYTES + 4 * 2**20
    box = {}

    def run():
        box["result"] = upsample_file(LayerSpec(layer, "t"), str(src), str(dst), memory_limit=limit)

    peak = _traced_peak(run)
    result = box["result"]
    output_bytes = 128**3 * 2 * 4
    assert result.tiles > 8 and result.extra["expected_peak_bytes"] <= limit
    # What NumPy held at once stays within the plan's estimate and below the
    # 16 MiB output, engine work blocks included.
    assert peak <= result.extra["expected_peak_bytes"]
    assert peak < output_bytes
    expected = _expected(layer, stored, fmt_in.startswith("nii"), fmt_out.startswith("nii"))
    np.testing.assert_array_equal(_load(dst), expected)


def test_gzip_streams_when_the_slowest_axis_must_stay_whole(tmp_path):
    # channels_first softmax keeps the width whole, which in NIfTI is the k axis:
    # no window of planes can follow the tiles, so planes go through a scratch
    # file and reads restart per tile; the result is still exact.
    rng = np.random.default_rng(17)
    layer = _layer(
        rng,
        2,
        filters=2,
        kernel_size=3,
        strides=2,
        data_format="channels_first",
        activation="softmax",
    )
    stored = rng.standard_normal((5, 4, 6, 2)).astype(np.float32)
    limit = _smallest_budget(tmp_path, layer, stored, "niigz", "niigz")
    result, got = _run(tmp_path, layer, stored, "niigz", "niigz", memory_limit=limit)
    assert result.tiles > 1 and result.extra["tile_shape"][2] == got.shape[2]
    np.testing.assert_array_equal(got, _expected(layer, stored, True, True))
    assert sorted(os.listdir(tmp_path)) == ["in.nii.gz", "out.nii.gz"]
