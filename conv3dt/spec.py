"""Read a layer spec (YAML or JSON): Keras layer arguments, weight files and a seed.

A spec looks like::

    layer:                # Keras Conv3DTranspose arguments (layer.get_config() works as is)
      filters: 8
      kernel_size: 3
      strides: 2
      padding: same
      activation: relu
    weights:              # optional: without it the initializers draw the weights
      kernel: kernel.npy  # .npy, file.npz:name or file.h5:/path, relative to the spec
      bias: bias.npy
      layout: keras       # keras (kd, kh, kw, filters, in) or torch (in, filters, kd, kh, kw)
    seed: 0
    boundary: zeros       # optional: zeros (Keras's), replicate, reflect or symmetric

or, for interpolation without a trained model (:mod:`conv3dt.presets`)::

    preset: {name: linear, factor: [2, 2, 2], channels: 1}
    boundary: replicate   # a preset's default
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from conv3dt.boundary import BOUNDARIES, check_boundary
from conv3dt.dtypes import numpy_dtype
from conv3dt.layer import _ALLOWED_KWARGS, _IGNORED_KWARGS, Conv3DTranspose
from conv3dt.plan import available_memory, format_bytes
from conv3dt.presets import check_factor, preset_config, preset_layer
from conv3dt.validation import excerpt, weight_count
from conv3dt.weight_files import read_weight_array

__all__ = [
    "ChannelMismatchError",
    "LayerSpec",
    "SpecError",
    "load_spec",
    "load_weight_array",
    "spec_from_layer",
    "spec_from_preset",
]

_TOP_KEYS = ("layer", "weights", "seed", "preset", "boundary")
_PRESET_KEYS = ("name", "factor", "channels")
# Nodes a spec may expand to through YAML aliases; a spec has a few dozen.
_YAML_NODE_BUDGET = 10_000
_WEIGHT_KEYS = ("kernel", "bias", "layout")
_LAYER_KEYS = (
    *(
        name
        for name, parameter in inspect.signature(Conv3DTranspose.__init__).parameters.items()
        if name != "self" and parameter.kind is not parameter.VAR_KEYWORD
    ),
    *_ALLOWED_KWARGS,
    *_IGNORED_KWARGS,
)


class SpecError(ValueError):
    """A spec file or one of its fields is invalid; the message names both."""


class ChannelMismatchError(SpecError):
    """A volume's channel count is not the one the loaded kernel was made for.

    Attributes
    ----------
    expected : int
        The kernel's input channels.
    got : int
        The volume's channels.
    four_d : bool
        The volume is a 4D array read as one volume with channels, which could
        be read as a batch of single-channel volumes instead.
    """

    def __init__(self, message: str, expected: int, got: int, four_d: bool = False) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got
        self.four_d = four_d


@dataclass
class LayerSpec:
    """A layer ready to run, and where it came from.

    Attributes
    ----------
    layer : Conv3DTranspose
        Built when the spec gave weights; otherwise built on first use with ``seed``.
    source : str
        The spec or model file.
    seed : int or None
        Seed for initializers when weights are drawn.
    files : tuple of str
        The spec file and the weight files it names (outputs must not replace them).
    boundary : str
        What lies beyond the volume's edges (:mod:`conv3dt.boundary`): the
        spec's ``boundary:``, else ``"replicate"`` for a preset and ``"zeros"``
        (Keras's) for any other layer. The command line may replace it.
    """

    layer: Conv3DTranspose
    source: str
    seed: int | None = None
    files: tuple[str, ...] = ()
    boundary: str = "zeros"

    def ensure_built(self, in_channels: int, four_d: bool = False) -> None:
        """Draw weights for ``in_channels`` input channels if none were loaded.

        ``four_d`` tells that the channels are a 4D array's 4th axis (see
        :attr:`ChannelMismatchError.four_d`).

        Raises
        ------
        ChannelMismatchError
            When loaded weights expect a different number of input channels.
        """
        layer = self.layer
        if layer.built and layer.kernel is not None:
            expected = int(layer.kernel.shape[-1])
            if expected != in_channels:
                raise ChannelMismatchError(
                    f"the volume has {in_channels} channel(s); the layer's kernel "
                    f"({self.source}) expects {expected} input channel(s)",
                    expected,
                    in_channels,
                    four_d,
                )
            return
        count = math.prod(layer.kernel_shape(in_channels))
        nbytes = count * max(numpy_dtype(layer.dtype).itemsize, 4)
        available = available_memory()
        if nbytes > available:
            # No tile plan helps: every tile needs the whole kernel.
            raise SpecError(
                f"{self.source}: kernel_size={layer.kernel_size} and "
                f"filters={excerpt(layer.filters)} with {in_channels} input channel(s) make a "
                f"kernel of {weight_count(count)} weights ({format_bytes(nbytes)}), more than "
                f"the memory available ({format_bytes(available)})"
            )
        shape = (
            (1, 1, 1, 1, in_channels)
            if layer.data_format == "channels_last"
            else (1, in_channels, 1, 1, 1)
        )
        layer.build(shape, seed=self.seed)


def _unknown_keys(given: Iterable[Any], known: Sequence[str]) -> tuple[str, bool] | None:
    """The keys of ``given`` not in ``known``, each with the nearest known key, or None.

    Returns the listing and whether every unknown key got a suggestion.
    Suggestions use difflib's closeness, as Click's "did you mean" for options does.
    """
    unknown = sorted({key for key in given if key not in known}, key=str)
    if not unknown:
        return None
    parts = []
    suggested = 0
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1)
        parts.append(f"{excerpt(key)} (did you mean {close[0]!r}?)" if close else excerpt(key))
        suggested += bool(close)
    return ", ".join(parts), suggested == len(unknown)


class _AliasBomb(yaml.YAMLError):
    """A YAML document whose aliases expand it past :data:`_YAML_NODE_BUDGET` nodes."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader that refuses documents whose aliases expand too far.

    An alias shares its anchor's node, so a few hundred bytes can describe a
    tree of billions of nodes; whatever walks the result (a copy of the
    config, a value echoed in a message) pays for the whole tree. Each node's
    expanded size is counted as it is composed, an alias counting its anchor's
    whole size again, and composition stops once a node exceeds the budget.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        node = super().compose_node(parent, index)
        if id(node) in self._sizes:  # an alias: its anchor is already counted
            return node
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes[id(item)] for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes[id(key)] + self._sizes[id(value)] for key, value in node.value)
        if size > _YAML_NODE_BUDGET:
            raise _AliasBomb()
        self._sizes[id(node)] = size
        return node


def _read_document(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read spec file ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    try:
        # A SafeLoader subclass: yaml.safe_load's tags and nothing more.
        return yaml.load(text, Loader=_BoundedLoader)
    except _AliasBomb:
        raise SpecError(
            f"{path}: YAML aliases expand the document past {_YAML_NODE_BUDGET} nodes; "
            "refused (a spec needs a few dozen)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None


def _split_reference(reference: str) -> tuple[str, str | None]:
    """Split ``file.npz:name`` / ``file.h5:/path`` into the file and the inner name."""
    lowered = reference.lower()
    for ext in (".npz", ".h5", ".hdf5"):
        marker = ext + ":"
        index = lowered.find(marker)
        if index != -1:
            cut = index + len(ext)
            return reference[:cut], reference[cut + 1 :]
    return reference, None


def load_weight_array(
    reference: str,
    base_dir: Path,
    field: str,
    spec_path: Path,
    check: Callable[[tuple[int, ...]], None] | None = None,
) -> np.ndarray:
    """Load one weight array named in a spec, its size checked before its data is read.

    Parameters
    ----------
    reference : str
        ``file.npy``, ``file.npz:name`` or ``file.h5:/dataset``; relative paths
        are relative to ``base_dir`` (the spec's directory).
    field : str
        The spec field, for error messages (e.g. ``weights.kernel``).
    check : callable, optional
        Called with the array's shape as the file declares it, before its data
        is read; raises :class:`SpecError` to refuse it.
    """
    file_part, inner = _split_reference(reference)
    path = Path(file_part)
    if not path.is_absolute():
        path = base_dir / path
    where = f"{spec_path}: {field}"
    if not path.exists():
        raise SpecError(f"{where}: weight file {path} not found")
    return read_weight_array(path, inner, where, SpecError, check)


def _to_keras_layout(kernel: np.ndarray, layout: str) -> np.ndarray:
    if layout == "torch":
        # torch ConvTranspose3d stores (in_channels, filters, kd, kh, kw).
        return np.ascontiguousarray(np.transpose(kernel, (2, 3, 4, 1, 0)))
    return kernel


def load_spec(path: str | os.PathLike) -> LayerSpec:
    """Read a YAML or JSON spec into a :class:`LayerSpec`.

    Raises
    ------
    SpecError
        With the file, the field and what was expected, for anything invalid.
    """
    spec_path = Path(path)
    document = _read_document(spec_path)
    if not isinstance(document, dict):
        raise SpecError(f"{spec_path}: expected a mapping with a 'layer' key at the top level")
    unknown = _unknown_keys(document, _TOP_KEYS)
    if unknown:
        raise SpecError(
            f"{spec_path}: unknown top-level key(s) {unknown[0]}; expected {list(_TOP_KEYS)}"
        )
    boundary = document.get("boundary")
    if boundary is not None:
        try:
            check_boundary(boundary)
        except ValueError:
            raise SpecError(
                f"{spec_path}: field 'boundary' must be one of {', '.join(BOUNDARIES)}, "
                f"got {excerpt(boundary)}"
            ) from None
    if "preset" in document:
        return _load_preset(document, spec_path, boundary)
    config = document.get("layer")
    if not isinstance(config, dict):
        raise SpecError(
            f"{spec_path}: field 'layer' must be a mapping of Conv3DTranspose arguments"
        )
    # Before the required keys: a misspelt key is the real problem when one seems missing.
    unknown = _unknown_keys(config, _LAYER_KEYS)
    if unknown:
        listing, suggested = unknown
        # The arguments are too many to list after a suggestion.
        expected = (
            "" if suggested else f"; expected Conv3DTranspose arguments: {', '.join(_LAYER_KEYS)}"
        )
        raise SpecError(f"{spec_path}: unknown key(s) {listing} in 'layer'{expected}")
    seed = document.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise SpecError(
            f"{spec_path}: field 'seed' must be a non-negative integer, got {excerpt(seed)}"
        )
    if "filters" not in config or "kernel_size" not in config:
        raise SpecError(f"{spec_path}: field 'layer' needs 'filters' and 'kernel_size'")
    try:
        layer = Conv3DTranspose.from_config(dict(config))
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{spec_path}: layer: {exc}") from None
    weights = document.get("weights")
    files = [str(spec_path)]
    if weights is not None:
        _apply_weights(layer, weights, spec_path)
        for field in ("kernel", "bias"):
            reference = weights.get(field)
            if isinstance(reference, str):
                files.append(str(spec_path.parent / _split_reference(reference)[0]))
    return LayerSpec(
        layer=layer,
        source=str(spec_path),
        seed=seed,
        files=tuple(files),
        boundary=boundary or "zeros",
    )


def _load_preset(document: dict, spec_path: Path, boundary: str | None) -> LayerSpec:
    """A spec whose ``preset:`` names an interpolation (:mod:`conv3dt.presets`)."""
    for field in ("layer", "weights"):
        if field in document:
            raise SpecError(
                f"{spec_path}: a spec with 'preset' builds its own layer and weights; "
                f"remove '{field}' (or 'preset')"
            )
    preset = document["preset"]
    if not isinstance(preset, dict):
        raise SpecError(
            f"{spec_path}: field 'preset' must be a mapping with 'name' and 'factor' "
            "(and 'channels')"
        )
    unknown = _unknown_keys(preset, _PRESET_KEYS)
    if unknown:
        raise SpecError(
            f"{spec_path}: unknown key(s) {unknown[0]} in 'preset'; expected {list(_PRESET_KEYS)}"
        )
    try:
        layer = preset_layer(preset.get("name"), preset.get("factor", 2), preset.get("channels", 1))
    except ValueError as exc:
        raise SpecError(f"{spec_path}: preset: {exc}") from None
    return LayerSpec(
        layer=layer,
        source=str(spec_path),
        files=(str(spec_path),),
        boundary=boundary or "replicate",
    )


def spec_from_preset(
    name: str, factor: int | Sequence[int], channels: int = 1, boundary: str | None = None
) -> dict[str, Any]:
    """A spec document (a dict ready for YAML) naming a preset; checked as loading would.

    Raises
    ------
    ValueError
        On an unknown preset, factor, channel count or boundary.
    """
    factors = check_factor(factor)
    preset_config(name, factors, channels)
    document: dict[str, Any] = {
        "preset": {"name": name, "factor": list(factors), "channels": channels}
    }
    document["boundary"] = check_boundary(boundary or "replicate")
    return document


def _apply_weights(layer: Conv3DTranspose, weights: Any, spec_path: Path) -> None:
    if not isinstance(weights, dict):
        raise SpecError(
            f"{spec_path}: field 'weights' must be a mapping with 'kernel' (and 'bias')"
        )
    unknown = _unknown_keys(weights, _WEIGHT_KEYS)
    if unknown:
        raise SpecError(
            f"{spec_path}: unknown key(s) {unknown[0]} in 'weights'; expected {list(_WEIGHT_KEYS)}"
        )
    layout = weights.get("layout", "keras")
    if layout not in ("keras", "torch"):
        raise SpecError(
            f"{spec_path}: weights.layout must be 'keras' or 'torch', got {excerpt(layout)}"
        )
    if not isinstance(weights.get("kernel"), str):
        raise SpecError(f"{spec_path}: weights.kernel must name a weight file")
    base = spec_path.parent
    kernel_check = _kernel_check(layer, layout, spec_path)
    kernel = load_weight_array(weights["kernel"], base, "weights.kernel", spec_path, kernel_check)
    kernel = _to_keras_layout(kernel, layout)
    arrays = [kernel]
    bias_ref = weights.get("bias")
    if layer.use_bias:
        if bias_ref is None:
            arrays.append(np.zeros(layer.filters, dtype=np.float32))
        else:
            if not isinstance(bias_ref, str):
                raise SpecError(f"{spec_path}: weights.bias must name a weight file")
            arrays.append(
                load_weight_array(
                    bias_ref, base, "weights.bias", spec_path, _bias_check(layer, spec_path)
                )
            )
    elif bias_ref is not None:
        raise SpecError(f"{spec_path}: weights.bias is given but layer.use_bias is false")
    for name, array in zip(("kernel", "bias"), arrays, strict=False):
        if not np.issubdtype(array.dtype, np.number):
            raise SpecError(f"{spec_path}: weights.{name} must be numeric, got dtype {array.dtype}")
    try:
        layer.set_weights(arrays)
    except ValueError as exc:
        raise SpecError(f"{spec_path}: weights: {exc}") from None


def _kernel_check(
    layer: Conv3DTranspose, layout: str, spec_path: Path
) -> Callable[[tuple[int, ...]], None]:
    """A check of a kernel file's declared shape, run before its data is read."""

    def check(shape: tuple[int, ...]) -> None:
        if len(shape) != 5:
            raise SpecError(f"{spec_path}: weights.kernel must be 5D, got shape {shape}")
        # torch stores (in, filters, kd, kh, kw); see _to_keras_layout.
        keras_shape = shape if layout == "keras" else (*shape[2:], shape[1], shape[0])
        expected = (*layer.kernel_size, layer.filters)
        if keras_shape[:4] != expected:
            hint = (
                " (weights.layout: torch expects (in, filters, kd, kh, kw))"
                if layout == "keras"
                else ""
            )
            raise SpecError(
                f"{spec_path}: weights.kernel has shape {shape} in {layout} layout; "
                f"expected {(*expected, 'in_channels')}{hint}"
            )

    return check


def _bias_check(layer: Conv3DTranspose, spec_path: Path) -> Callable[[tuple[int, ...]], None]:
    """A check of a bias file's declared shape, run before its data is read."""

    def check(shape: tuple[int, ...]) -> None:
        if shape != (layer.filters,):
            raise SpecError(
                f"{spec_path}: weights.bias has shape {shape}; expected ({layer.filters},)"
            )

    return check


def spec_from_layer(
    layer: Conv3DTranspose, kernel_ref: str, bias_ref: str | None, seed: int | None
) -> dict[str, Any]:
    """A spec document (a dict ready for YAML) describing ``layer`` and its weight files."""
    config = layer.get_config()
    config = json.loads(json.dumps(config))
    document: dict[str, Any] = {"layer": config}
    weights: dict[str, Any] = {"kernel": kernel_ref}
    if bias_ref is not None:
        weights["bias"] = bias_ref
    weights["layout"] = "keras"
    document["weights"] = weights
    if seed is not None:
        document["seed"] = seed
    return document
