"""The per-file set-up a serial run and a cluster's tiles share (conv3dt.run.prepare_file)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from conv3dt import Conv3DTranspose, __version__
from conv3dt.layout import DiskLayout
from conv3dt.run import prepare_file, read_tile_input, storage_chunks
from conv3dt.spec import LayerSpec
from conv3dt.volumes import VolumeError, open_volume
from conv3dt.volumes.npy import NpyStreamReader


def _spec(in_channels: int | None = 2, **config) -> LayerSpec:
    layer = Conv3DTranspose(
        **{"filters": 3, "kernel_size": 3, "strides": 2, "padding": "same", **config}
    )
    if in_channels is not None:
        rng = np.random.default_rng(0)
        kernel = rng.standard_normal(layer.kernel_shape(in_channels)).astype(np.float32)
        layer.set_weights([kernel, np.zeros(layer.filters, np.float32)])
    return LayerSpec(layer=layer, source="test", seed=3)


def _volume(shape: tuple[int, ...]) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_a_nifti_target_stores_spatial_axes_first_with_an_affine(tmp_path):
    np.save(tmp_path / "in.npy", _volume((2, 8, 6, 5)))
    spec = _spec(data_format="channels_first")
    with open_volume(str(tmp_path / "in.npy")) as source:
        to_npy = prepare_file(spec, source, str(tmp_path / "out.npy"))
        to_nifti = prepare_file(spec, source, str(tmp_path / "out.nii"))
        named = prepare_file(spec, source, str(tmp_path / "out.bin"), output_format="nifti")
    assert to_npy.output_format == "npy" and to_nifti.output_format == "nifti"
    assert to_npy.prepared.out_layout.axes == "czyx" and to_npy.prepared.affine is None
    assert to_nifti.prepared.out_layout.axes == "zyxc"
    assert to_nifti.prepared.out_layout.shape == (16, 12, 10, 3)
    # The .npy input has no affine: the output's comes from the identity, voxels halved.
    np.testing.assert_array_equal(np.diag(to_nifti.prepared.affine)[:3], [0.5, 0.5, 0.5])
    assert named.prepared.out_layout == to_nifti.prepared.out_layout


def test_provenance_names_the_layer_the_absolute_input_and_the_version(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save("in.npy", _volume((8, 6, 5, 2)))
    spec = _spec()
    with open_volume("in.npy") as source:
        setup = prepare_file(spec, source, "out.h5")
    assert setup.attrs == {
        "conv3dt_layer": json.dumps(spec.layer.get_config()),
        "conv3dt_source": os.path.join(str(tmp_path), "in.npy"),
        "conv3dt_version": __version__,
    }
    buffer = io.BytesIO()
    np.save(buffer, _volume((8, 6, 5, 2)))
    with NpyStreamReader(io.BytesIO(buffer.getvalue())) as stdin:
        assert prepare_file(spec, stdin, "out.h5").attrs["conv3dt_source"] == "-"


def test_chunks_divide_the_tiles_of_a_chunked_target_but_not_of_a_scratch(tmp_path):
    np.save(tmp_path / "in.npy", _volume((4, 20, 18, 16, 2)))
    spec = _spec()
    limit = 48 << 20
    with open_volume(str(tmp_path / "in.npy")) as source:
        direct = prepare_file(spec, source, str(tmp_path / "out.h5"), memory_limit=limit)
        scratch = prepare_file(
            spec, source, str(tmp_path / "out.h5"), memory_limit=limit, scratch=True
        )
        to_npy = prepare_file(spec, source, str(tmp_path / "out.npy"), memory_limit=limit)
    plan = direct.prepared.plan
    assert plan.chunks is not None
    assert direct.chunks == storage_chunks(direct.prepared.out_layout, plan.chunks)
    assert direct.chunks[0] == 1 and direct.chunks[-1] == 3
    assert all(t % c == 0 for t, c in zip(plan.tile_shape, plan.chunks, strict=True))
    assert scratch.chunks is None and scratch.prepared.plan.chunks is None
    assert to_npy.chunks is None
    assert scratch.prepared.out_layout == direct.prepared.out_layout


def test_a_compressed_nifti_target_is_streamed_unless_tiles_go_to_a_scratch(tmp_path):
    np.save(tmp_path / "in.npy", _volume((20, 18, 16, 2)))
    spec = _spec()
    target = str(tmp_path / "out.nii.gz")
    with open_volume(str(tmp_path / "in.npy")) as source:
        direct = prepare_file(spec, source, target, tile_shape=(8, 36, 32))
        scratch = prepare_file(spec, source, target, tile_shape=(8, 36, 32), scratch=True)
    assert direct.prepared.plan.out_window_bytes > 0
    assert scratch.prepared.plan.out_window_bytes == 0


@pytest.mark.parametrize(("dtype", "stored"), [("int16", "float32"), ("float64", "float64")])
def test_integer_outputs_reach_the_writer_as_float32(tmp_path, dtype, stored):
    np.save(tmp_path / "in.npy", _volume((8, 6, 5, 2)))
    with open_volume(str(tmp_path / "in.npy")) as source:
        setup = prepare_file(_spec(), source, str(tmp_path / "out.nii"), output_dtype=dtype)
    assert setup.prepared.output_dtype == np.dtype(dtype)
    assert setup.prepared.storage_dtype == np.dtype(stored)


def test_an_unknown_target_extension_is_refused_before_weights_are_drawn(tmp_path):
    np.save(tmp_path / "in.npy", _volume((8, 6, 5, 2)))
    spec = _spec(in_channels=None)
    with open_volume(str(tmp_path / "in.npy")) as source:
        with pytest.raises(VolumeError, match=r"out\.xyz: unknown volume format"):
            prepare_file(spec, source, str(tmp_path / "out.xyz"), scratch=True)
        assert spec.layer.kernel is None
        prepare_file(spec, source, str(tmp_path / "out.xyz"), output_format="npy")
    assert spec.layer.kernel is not None and spec.layer.kernel.shape[-1] == 2


def test_storage_chunks_hold_one_volume_and_all_channels():
    assert storage_chunks(DiskLayout("bzyxc", (3, 10, 12, 14, 4)), (5, 6, 7)) == (1, 5, 6, 7, 4)
    assert storage_chunks(DiskLayout("czyx", (4, 10, 12, 14)), (5, 6, 7)) == (4, 5, 6, 7)
    assert storage_chunks(DiskLayout("zyx", (10, 12, 14)), (5, 6, 7)) == (5, 6, 7)


def test_read_tile_input_is_the_tiles_box_of_the_canonical_volume(tmp_path):
    stored = _volume((2, 3, 9, 8, 7))  # a channels_first batch: (b, c, z, y, x)
    np.save(tmp_path / "in.npy", stored)
    canonical = np.moveaxis(stored, 1, -1)
    with open_volume(str(tmp_path / "in.npy")) as source:
        setup = prepare_file(
            _spec(3, data_format="channels_first"),
            source,
            str(tmp_path / "out.npy"),
            tile_shape=(6, 5, 4),
        )
        prepared = setup.prepared
        assert len(prepared.plan) > 1
        for sample in range(prepared.in_layout.batch):
            for tile in prepared.plan:
                box = tuple(slice(a, b) for a, b in zip(tile.in_start, tile.in_stop, strict=True))
                np.testing.assert_array_equal(
                    read_tile_input(source, prepared.in_layout, sample, tile),
                    canonical[(slice(sample, sample + 1), *box)],
                )


def test_peak_rss_is_this_process_own_not_its_parent() -> None:
    """A child started from a large process reports its own peak, not the parent's."""
    import subprocess
    import sys

    from conv3dt.run import peak_rss_bytes

    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    assert peak_rss_bytes() > ballast.nbytes
    child = subprocess.run(
        [sys.executable, "-c", "from conv3dt.run import peak_rss_bytes; print(peak_rss_bytes())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 0 < int(child.stdout) < 200 * 2**20
    del ballast


def test_tile_buffers_alternate_and_grow() -> None:
    from conv3dt.run import TileBuffers

    buffers = TileBuffers(2)
    first = buffers.take((1, 4, 4, 4, 2), np.dtype(np.float32))
    second = buffers.take((1, 4, 4, 4, 2), np.dtype(np.float32))
    assert not np.shares_memory(first, second)
    third = buffers.take((1, 2, 4, 4, 2), np.dtype(np.float32))  # a smaller edge tile
    assert np.shares_memory(third, first) and third.flags.c_contiguous
    assert third.shape == (1, 2, 4, 4, 2) and third.dtype == np.float32
    bigger = buffers.take((1, 8, 4, 4, 2), np.dtype(np.float64))  # outgrows the second
    assert bigger.nbytes == 8 * 4 * 4 * 2 * 8 and not np.shares_memory(bigger, second)
