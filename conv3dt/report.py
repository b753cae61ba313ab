"""What ``conv3dt inspect`` reports: the resolved layer, its weights and, for a volume, the plan."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from conv3dt.engine.separable import separable_factors
from conv3dt.spec import LayerSpec

__all__ = ["axis_names", "inspect_report", "weight_statistics"]

# NIfTI's first three dimensions are its i, j, k; other formats' are z, y, x.
_NIFTI_AXES = str.maketrans("zyx", "ijk")


def axis_names(layout_axes: str, nifti: bool) -> str:
    """A layout's axis labels as users read them, space-separated (``"i j k c"``).

    ``b`` is a batch and ``c`` channels; the spatial axes are ``i j k`` for
    NIfTI (first index fastest on disk), ``z y x`` for C-ordered arrays.
    """
    return " ".join(layout_axes.translate(_NIFTI_AXES) if nifti else layout_axes)


def weight_statistics(array: np.ndarray) -> dict[str, Any]:
    """Shape, dtype and summary statistics of a weight array."""
    values = np.asarray(array, dtype=np.float64)
    return {
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "std": float(values.std()),
    }


def inspect_report(
    spec: LayerSpec,
    input_path: str | None = None,
    *,
    input_format: str | None = None,
    four_d_as_batch: bool = False,
    memory_limit: int | None = None,
) -> dict[str, Any]:
    """Describe a layer (and, given a volume, what running it on that volume takes).

    Without loaded weights and without a volume, the weights are drawn for one
    input channel (the spec's seed) so shapes and statistics can be shown.
    """
    layer = spec.layer
    report: dict[str, Any] = {"source": spec.source, "boundary": spec.boundary}
    plan_info: dict[str, Any] | None = None
    if input_path is not None:
        from conv3dt.run import (
            SPATIAL_FIRST_FORMATS,
            input_storage,
            naming_input,
            prepare,
            volume_engine,
        )
        from conv3dt.volumes import open_volume

        with open_volume(input_path, input_format) as reader, naming_input(input_path):
            spatial_first = reader.format in SPATIAL_FIRST_FORMATS
            nifti = reader.format == "nifti"
            prepared = prepare(
                spec,
                tuple(reader.shape),
                spatial_first=spatial_first,
                four_d_as_batch=four_d_as_batch,
                input_affine=reader.metadata.affine if reader.metadata is not None else None,
                memory_limit=memory_limit,
                **input_storage(reader),
            )
            voxel_size = reader.metadata.voxel_size if reader.metadata is not None else None
            input_shape = list(reader.shape)
        plan = prepared.plan
        batch = prepared.in_layout.batch
        in_voxels = batch * int(np.prod(prepared.in_layout.spatial))
        assert layer.kernel is not None
        flops = (
            2
            * in_voxels
            * prepared.in_layout.channels
            * layer.filters
            * int(np.prod(layer.kernel_size))
        )
        out_bytes = int(np.prod(prepared.out_layout.shape)) * prepared.output_dtype.itemsize
        plan_info = {
            "input": input_path,
            "input_shape": input_shape,
            "input_axes": axis_names(prepared.in_layout.axes, nifti),
            "output_shape": list(prepared.out_layout.shape),
            "output_axes": axis_names(prepared.out_layout.axes, nifti),
            "output_dtype": str(prepared.output_dtype),
            "output_bytes": out_bytes,
            "flops": flops,
            "voxel_size": None if voxel_size is None else [float(v) for v in voxel_size],
            "output_voxel_size": None
            if voxel_size is None
            else [float(v) / g.stride for v, g in zip(voxel_size, plan.axes, strict=False)],
            "crop_left": [g.crop_left for g in plan.axes],
            "tile_shape": list(plan.tile_shape),
            "tiles": len(plan) * batch,
            "memory_limit_bytes": plan.memory_limit,
            "expected_peak_bytes": plan.peak_bytes,
            "engine": volume_engine(layer, plan.axes, batch, "auto"),
        }
    elif not layer.built:
        spec.ensure_built(1)
        report["note"] = "no weights loaded: drawn from the initializers for 1 input channel"
    report["layer"] = json.loads(json.dumps(layer.get_config()))
    weights = {"kernel": weight_statistics(layer.kernel)} if layer.kernel is not None else {}
    if layer.kernel is not None:
        # Whether the separable engine can run it: three 1D passes instead of 3D.
        weights["kernel"]["separable"] = (
            separable_factors(layer.operands(np.zeros(0, np.float32))[1], layer.strides) is not None
        )
    if layer.bias is not None:
        weights["bias"] = weight_statistics(layer.bias)
    report["weights"] = weights
    penalties = {}
    if layer.kernel_regularizer is not None and layer.kernel is not None:
        penalties["kernel"] = float(layer.kernel_regularizer(layer.kernel))
    if layer.bias_regularizer is not None and layer.bias is not None:
        penalties["bias"] = float(layer.bias_regularizer(layer.bias))
    report["regularization_penalties"] = penalties
    report["constraints_satisfied"] = layer.check_constraints()
    if plan_info is not None:
        report["plan"] = plan_info
    return report
