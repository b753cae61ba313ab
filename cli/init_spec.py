"""``conv3dt init``: write a spec and freshly drawn weights from command-line options."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from conv3dt_cli.errors import CommandError


def _triple(text: str | None, option: str) -> int | list[int] | None:
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(
            f"expected N or D,H,W integers, got {text!r}", param_hint=option
        ) from None
    if len(values) == 1:
        return values[0]
    if len(values) != 3:
        raise click.BadParameter(f"expected 1 or 3 integers, got {len(values)}", param_hint=option)
    return values


def _atomic_write(path: Path, write: object) -> None:
    tmp = path.with_name(f".{path.name}.conv3dt-tmp")
    try:
        write(tmp)  # type: ignore[operator]
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_spec(
    spec_path: str,
    *,
    filters: int,
    kernel_size: str,
    strides: str,
    padding: str,
    output_padding: str | None,
    dilation_rate: str,
    data_format: str,
    activation: str | None,
    use_bias: bool,
    kernel_initializer: str,
    bias_initializer: str,
    in_channels: int,
    seed: int,
    overwrite: bool,
) -> list[str]:
    """Build the layer, draw its weights and write the spec plus .npy weights; return the paths."""
    import numpy as np
    import yaml

    from conv3dt.layer import Conv3DTranspose
    from conv3dt.spec import spec_from_layer

    path = Path(spec_path)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise click.BadParameter("the spec must end in .yaml, .yml or .json", param_hint="-o")
    if not path.parent.exists():
        raise click.BadParameter(f"directory {path.parent} does not exist", param_hint="-o")
    kernel_path = path.with_name(f"{path.stem}_kernel.npy")
    bias_path = path.with_name(f"{path.stem}_bias.npy") if use_bias else None
    targets = [p for p in (path, kernel_path, bias_path) if p is not None]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise CommandError(f"{', '.join(existing)} exist(s); give --overwrite to replace them")
    layer = Conv3DTranspose(
        filters,
        _triple(kernel_size, "--kernel-size"),
        strides=_triple(strides, "--strides"),
        padding=padding,
        output_padding=_triple(output_padding, "--output-padding"),
        data_format=data_format,
        dilation_rate=_triple(dilation_rate, "--dilation-rate"),
        activation=activation,
        use_bias=use_bias,
        kernel_initializer=kernel_initializer,
        bias_initializer=bias_initializer,
    )
    shape = (
        (1, 1, 1, 1, in_channels) if data_format == "channels_last" else (1, in_channels, 1, 1, 1)
    )
    layer.build(shape, seed=seed)
    assert layer.kernel is not None
    document = spec_from_layer(layer, kernel_path.name, bias_path.name if bias_path else None, seed)

    def saver(array: np.ndarray):
        def save(target: Path) -> None:
            with open(target, "wb") as handle:
                np.save(handle, array)

        return save

    _atomic_write(kernel_path, saver(layer.kernel))
    if bias_path is not None:
        _atomic_write(bias_path, saver(layer.bias))
    if path.suffix.lower() == ".json":
        text = json.dumps(document, indent=2) + "\n"
    else:
        text = yaml.safe_dump(document, sort_keys=False)
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return [str(p) for p in targets]


# init's options that describe a layer by hand; a preset makes its own.
_LAYER_OPTIONS = (
    "filters",
    "kernel_size",
    "strides",
    "padding",
    "output_padding",
    "dilation_rate",
    "data_format",
    "activation",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
    "seed",
)


def write_preset_spec(
    spec_path: str,
    *,
    preset: str,
    factor: str,
    boundary: str | None,
    in_channels: int,
    overwrite: bool,
    given: set[str],
) -> list[str]:
    """Write a spec naming an interpolation preset (no weight files); return its path."""
    import yaml

    from conv3dt.spec import spec_from_preset

    clashing = sorted(f"--{name.replace('_', '-')}" for name in given & set(_LAYER_OPTIONS))
    if clashing:
        raise click.UsageError(
            f"--preset builds its own layer and weights; drop {', '.join(clashing)}"
        )
    path = Path(spec_path)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise click.BadParameter("the spec must end in .yaml, .yml or .json", param_hint="-o")
    if not path.parent.exists():
        raise click.BadParameter(f"directory {path.parent} does not exist", param_hint="-o")
    if path.exists() and not overwrite:
        raise CommandError(f"{path} exists; give --overwrite to replace it")
    try:
        document = spec_from_preset(
            preset,
            _triple(factor, "--factor"),
            in_channels,
            boundary,  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--factor") from None
    if path.suffix.lower() == ".json":
        text = json.dumps(document, indent=2) + "\n"
    else:
        text = yaml.safe_dump(document, sort_keys=False, default_flow_style=None)
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return [str(path)]
