"""Read one ``Conv3DTranspose`` layer's config and weights from a Keras model file.

Keras itself is not needed. Three kinds of file are understood, recognised by
their content rather than their name:

* ``.keras`` archives (Keras 3, and Keras 2.13+): a zip holding ``config.json``
  and ``model.weights.h5``.
* Legacy HDF5 model files (``model.save("m.h5")`` in Keras 2 or 3): the model's
  config in the ``model_config`` attribute, weights under ``model_weights``.
* Weights-only HDF5 files (``model.save_weights("m.weights.h5")``). They carry no
  config: pass the model's config (``model.to_json()``, or a ``.keras`` file's
  ``config.json``) as ``model_config`` to get the layer's config and an exact
  lookup, or go without, in which case Conv3DTranspose layers are recognised by
  where Keras stored them and the config returned is ``None``.

Files are opened read-only; nothing is unpickled or evaluated. HDF5 soft and
external links, external and virtual datasets are refused, as Keras refuses them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import reprlib
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import h5py
import numpy as np

from conv3dt.hdf5_guard import Hdf5Guard
from conv3dt.validation import excerpt
from conv3dt.weight_files import check_zip_member

if TYPE_CHECKING:
    from conv3dt.layer import Conv3DTranspose

__all__ = [
    "KerasFileError",
    "is_legacy_weights_only",
    "list_conv3d_transpose_layers",
    "load_keras_layer",
    "load_layer",
]

CLASS_NAMES = ("Conv3DTranspose", "Convolution3DTranspose")

_CONFIG_MEMBER = "config.json"
_WEIGHTS_MEMBER = "model.weights.h5"
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
# A config larger than this is not a model config; refusing it keeps a
# malicious archive from exhausting memory.
_MAX_CONFIG_BYTES = 64 * 1024 * 1024
# Layer names a message lists before saying how many more there are.
_LISTED_LAYERS = 10
# A compressed weights member is inflated into a temporary file kept in memory
# up to this size, in pieces of the second.
_SPOOL_BYTES = 64 * 1024 * 1024
_COPY_BYTES = 1024 * 1024
# Where Keras saves a layer of class Conv3DTranspose inside a model (see _snake_case).
_TRANSPOSE_GROUP = re.compile(r"^conv3d_transpose(_\d+)?$")
log = logging.getLogger(__name__)
# Keras 2 layer arguments that only describe the model's input, not the layer.
_INPUT_HINTS = ("batch_input_shape", "input_shape", "input_dim", "batch_size")


class KerasFileError(ValueError):
    """A Keras model file that cannot be read, or lacks the layer asked for."""


@dataclass(frozen=True)
class _Entry:
    """A layer found in a model config (or, without a config, in a weights file)."""

    name: str
    qualified: str  # enclosing model names and the layer name, joined by "/"
    kind: str  # what it is, for messages: "class Conv3D"
    config: dict[str, Any] | None
    weights_path: str  # the layer's group in a Keras 3 weights file
    top_level: str  # the name of the top-level layer holding it (legacy HDF5 groups)
    is_transpose: bool


# --------------------------------------------------------------------- public API
def load_keras_layer(
    path: str | os.PathLike[str],
    layer_name: str | None = None,
    *,
    model_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any] | None, list[np.ndarray]]:
    """Read a Conv3DTranspose layer's config and weights from a Keras model file.

    Parameters
    ----------
    path : str or path-like
        A ``.keras`` archive, a legacy HDF5 model file or a weights-only HDF5 file.
    layer_name : str, optional
        The layer's name, anywhere in the model (nested models included). A
        name used in several nested models is told apart by prefixing the names
        of the models that hold it, joined by "/" (``"decoder/up"``). The layer's
        group in a Keras 3 weights file (``"layers/conv3d_transpose"``) is
        accepted too, which is how a weights-only file read without config names
        layers when it does not record their names. May be omitted when the file
        holds exactly one Conv3DTranspose layer.
    model_config : mapping or path, optional
        Only for weights-only files: the model's config, as a dict (the JSON of
        ``model.to_json()`` or of a ``.keras`` archive's ``config.json``) or the
        path of a JSON file holding it.

    Returns
    -------
    config : dict or None
        The layer's config as stored, i.e. what Keras's ``layer.get_config()``
        returned when the model was saved (Keras's ``shared_object_id``
        bookkeeping removed). ``None`` for a weights-only file read without
        ``model_config``.
    weights : list of numpy.ndarray
        ``[kernel, bias]``, or ``[kernel]`` for a layer without bias. The kernel
        has Keras's layout ``(kd, kh, kw, filters, in_channels)``. bfloat16
        weights are returned as float32 (exactly).

    Raises
    ------
    KerasFileError
        The file is missing, truncated or corrupt, lacks its config or the
        layer's weights, or has no Conv3DTranspose layer by that name (the
        message lists the ones it has).
    ValueError
        ``layer_name`` not a string; ``model_config`` not a model config, or
        given for a file that has its own config.
    """
    config, weights, _ = _read_layer(path, layer_name, model_config)
    return config, weights


def _read_layer(
    path: str | os.PathLike[str], layer_name: str | None, model_config: Any
) -> tuple[dict[str, Any] | None, list[np.ndarray], str | None]:
    """:func:`load_keras_layer`'s result and, when the model has other layers, a note saying so."""
    with _ModelFile(path, model_config) as model:
        entry = model.find(layer_name)
        weights = model.weights(entry)
        position = model.position(entry)
    config = None if entry.config is None else _without_sharing_ids(entry.config)
    note = None
    if position is not None:
        note = (
            f"{os.fspath(path)}: only its layer {entry.qualified!r} (layer {position[0]} of "
            f"{position[1]} in the model) is applied, not the whole model"
        )
    return config, weights, note


def list_conv3d_transpose_layers(
    path: str | os.PathLike[str],
    *,
    model_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
) -> list[str]:
    """Names of the Conv3DTranspose layers in a Keras model file, in model order.

    Each name is one that :func:`load_keras_layer` accepts: a plain layer name,
    qualified with its models' names where several nested models use it.

    Raises
    ------
    KerasFileError
        The file cannot be read as a Keras model file.
    """
    with _ModelFile(path, model_config) as model:
        return model.transpose_names()


def is_legacy_weights_only(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Keras 2 weights-only HDF5 file (``model.save_weights("w.h5")``).

    Such a file names its layers but not their classes, so reading a layer
    from it needs the model's config. Any file that is not one (including one
    that cannot be read) gives False: the readers report what is wrong with it.
    """
    try:
        with open(path, "rb") as stream:
            if stream.read(4) in _ZIP_SIGNATURES:
                return False
        with h5py.File(path, "r") as file:
            return "layer_names" in file.attrs and "model_config" not in file.attrs
    except OSError:
        return False


def load_layer(
    path: str | os.PathLike[str],
    layer_name: str | None = None,
    *,
    model_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    layer_config: Mapping[str, Any] | None = None,
) -> Conv3DTranspose:
    """Build a :class:`conv3dt.Conv3DTranspose` from a layer in a Keras model file.

    Parameters
    ----------
    path, layer_name, model_config
        As for :func:`load_keras_layer`.
    layer_config : mapping, optional
        The layer's config (as Keras's ``get_config()`` returns it) for a
        weights-only file read without ``model_config``; for instance from a spec.

    Returns
    -------
    Conv3DTranspose
        Built, with the file's weights. Keras 2 configs lose the arguments that
        only described the model's input (``batch_input_shape`` and the like)
        and ``groups=1``, which Keras 3's layer no longer takes. When the model
        has other layers, a warning on the ``conv3dt.keras_file`` logger says
        that only this one is applied.

    Raises
    ------
    KerasFileError
        As for :func:`load_keras_layer`; also when no config is available, or
        when the file's weights do not fit its config.
    ValueError
        As for :func:`load_keras_layer`; also ``layer_config`` given for a file
        that has the layer's config, and what ``Conv3DTranspose.from_config``
        refuses.
    """
    # Imported here so that reading files works even where the layer's own
    # dependencies are not importable.
    from conv3dt.layer import Conv3DTranspose

    config, weights, note = _read_layer(path, layer_name, model_config)
    if config is None:
        if layer_config is None:
            raise KerasFileError(
                f"{os.fspath(path)!r} holds weights only: pass the layer's config "
                "(layer_config, e.g. from a spec) or the model's (model_config)."
            )
        config = dict(layer_config)
    elif layer_config is not None:
        raise ValueError(
            f"Argument `layer_config` is only for weights-only files; {os.fspath(path)!r} "
            f"has the layer's config. Received: layer_config={reprlib.repr(layer_config)}"
        )
    layer = Conv3DTranspose.from_config(_constructor_config(config, path))
    try:
        layer.set_weights(weights)
    except ValueError as error:
        raise KerasFileError(f"{os.fspath(path)!r}: {error}") from error
    if note is not None:
        # Whoever gives a whole model may expect the whole model to run.
        log.warning("warning: %s", note)
    return layer


# ------------------------------------------------------------------ config walks
def _snake_case(class_name: str) -> str:
    # The name Keras 3 gives a layer's group in a weights file, from its class.
    name = re.sub(r"\W+", "", class_name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _inner_layers(config: Any) -> list[Any] | None:
    # Old Keras 2 Sequential configs are the bare list of layers.
    if isinstance(config, list):
        return config
    if isinstance(config, dict) and isinstance(config.get("layers"), list):
        return config["layers"]
    return None


def _layer_name(entry: dict[str, Any]) -> str:
    config = entry.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    if not isinstance(name, str):
        name = entry.get("name")
    return name if isinstance(name, str) else ""


def _is_transpose(entry: dict[str, Any]) -> bool:
    module = entry.get("module")
    # A user's own class that happens to share Keras's class name is not Keras's layer.
    custom = isinstance(module, str) and not module.startswith(("keras", "tf_keras"))
    return entry.get("class_name") in CLASS_NAMES and not custom


def _walk_layers(
    layers: list[Any], prefix: str, models: tuple[str, ...], top_level: str | None
) -> Iterator[_Entry]:
    """Every layer of a model's layer list and of its nested models, depth first."""
    # Keras 3 saves a model's layers under "layers/<class name in snake case>",
    # numbering repeats of a class in model order: conv3d_transpose,
    # conv3d_transpose_1, ... A "Model" config is built as a Functional.
    used: dict[str, int] = {}
    for layer in layers:
        if not isinstance(layer, dict) or not isinstance(layer.get("class_name"), str):
            continue
        class_name = layer["class_name"]
        group = _snake_case("Functional" if class_name == "Model" else class_name)
        if group in used:
            used[group] += 1
            group = f"{group}_{used[group]}"
        else:
            used[group] = 0
        path = f"{prefix}/layers/{group}" if prefix else f"layers/{group}"
        name = _layer_name(layer)
        top = name if top_level is None else top_level
        config = layer.get("config")
        transpose = _is_transpose(layer)
        yield _Entry(
            name=name,
            qualified="/".join((*models, name)),
            kind=f"class {class_name}",
            config=(config if isinstance(config, dict) else {}) if transpose else None,
            weights_path=path,
            top_level=top,
            is_transpose=transpose,
        )
        inner = None if transpose else _inner_layers(config)
        if inner is not None:
            yield from _walk_layers(inner, path, (*models, name), top)


def _model_entries(model_config: Any) -> list[_Entry]:
    if not isinstance(model_config, dict):
        return []
    layers = _inner_layers(model_config.get("config"))
    return [] if layers is None else list(_walk_layers(layers, "", (), None))


def _without_sharing_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_sharing_ids(v) for k, v in value.items() if k != "shared_object_id"}
    if isinstance(value, list):
        return [_without_sharing_ids(v) for v in value]
    return value


def _constructor_config(config: Mapping[str, Any], path: str | os.PathLike[str]) -> dict:
    """The config minus what Keras 2 stored beside the layer's own arguments."""
    config = {k: v for k, v in config.items() if k not in _INPUT_HINTS}
    groups = config.pop("groups", 1)
    if groups != 1:
        raise KerasFileError(
            f"{os.fspath(path)!r}: Conv3DTranspose '{config.get('name')}' has groups={groups}; "
            "grouped transposed convolutions are not supported."
        )
    return config


# -------------------------------------------------------------------- HDF5 access
def _text(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _string_list(group: h5py.Group, name: str) -> list[str]:
    # Keras splits long name lists over "<name>0", "<name>1", ... attributes.
    if name in group.attrs:
        chunks = [group.attrs[name]]
    else:
        chunks = []
        while f"{name}{len(chunks)}" in group.attrs:
            chunks.append(group.attrs[f"{name}{len(chunks)}"])
    return [_text(item) for chunk in chunks for item in np.atleast_1d(chunk)]


class _H5(Hdf5Guard):
    """Read-only access to one HDF5 file that follows hard links only."""

    def __init__(self, file: h5py.File, where: str) -> None:
        super().__init__(file, where, KerasFileError, soft_links=False)

    def array(self, parent: h5py.Group, path: str) -> np.ndarray:
        """The array stored at ``path`` under ``parent``."""
        head, _, key = path.rpartition("/")
        group = self.group(head, parent) if head else parent
        node = None if group is None else self.child(group, key, path)
        if node is None:
            raise KerasFileError(f"{self.where}: weights entry {path!r} is missing.")
        if not isinstance(node, h5py.Dataset):
            raise KerasFileError(f"{self.where}: {path!r} is a group, expected a dataset.")
        self.check_dataset(node, path)
        self.check_expansion(node, path)
        try:
            data = np.asarray(node[()])
        except (OSError, RuntimeError) as error:
            raise KerasFileError(f"{self.where}: cannot read {path!r}: {error}") from error
        if _text(node.attrs.get("dtype", "")) == "bfloat16":
            # bfloat16 is the upper half of a float32: widening is exact.
            bits = data.view("<u2").astype(np.uint32) << 16
            data = bits.view(np.float32)
        return data


class _Keras3Weights:
    """Weights as Keras 3 saves them: ``<layer path>/vars/0`` (kernel), ``/vars/1`` (bias)."""

    def __init__(self, h5: _H5) -> None:
        self.h5 = h5

    def discover(self) -> list[_Entry]:
        """Layers found from the file's groups alone, for a weights file without config."""
        entries: list[_Entry] = []

        def visit(group: h5py.Group, path: str) -> None:
            for key in group:
                child = self.h5.child(group, key, f"{path}/{key}")
                if not isinstance(child, h5py.Group):
                    continue
                if key != "vars":
                    visit(child, f"{path}/{key}" if path else key)
                elif path:  # the model's own variables sit at the root
                    label = _text(child.attrs.get("name", path))
                    transpose = _TRANSPOSE_GROUP.match(path.rpartition("/")[2]) is not None
                    kind = f"stored under {path!r}"
                    entries.append(_Entry(label, path, kind, None, path, path, transpose))

        visit(self.h5.file, "")
        return entries

    def read(self, entry: _Entry) -> list[np.ndarray]:
        group = self._vars(entry)
        keys = list(group)
        if not all(key.isdigit() for key in keys):
            raise KerasFileError(
                f"{self.h5.where}: unexpected weights entries {sorted(keys)} for layer "
                f"{entry.qualified!r}."
            )
        return [self.h5.array(group, key) for key in sorted(keys, key=int)]

    def _vars(self, entry: _Entry) -> h5py.Group:
        tried = []
        parts = entry.weights_path.split("/")
        # Keras 2.13-2.15 archives name the layer list "_layer_checkpoint_dependencies".
        renamed = ["_layer_checkpoint_dependencies" if p == "layers" else p for p in parts]
        for candidate in dict.fromkeys(("/".join(parts), "/".join(renamed))):
            vars_path = f"{candidate}/vars"
            tried.append(vars_path)
            group = self.h5.group(vars_path)
            if group is None:
                continue
            stored_name = group.attrs.get("name")
            if stored_name is None or _text(stored_name) == entry.name:
                return group
        # Recent Keras also records each layer's name beside its variables.
        named = [
            e.weights_path
            for e in self.discover()
            if e.name == entry.name and e.name != e.weights_path
        ]
        if len(named) == 1:
            group = self.h5.group(f"{named[0]}/vars")
            if group is not None:
                return group
        raise KerasFileError(
            f"{self.h5.where}: no weights for layer {entry.qualified!r} "
            f"(looked for {' and '.join(repr(t) for t in tried)})."
        )


class _LegacyWeights:
    """Weights as legacy HDF5 files keep them: one group per top-level layer."""

    _ROLE = re.compile(r"^(kernel|bias)(:\d+)?$")

    def __init__(self, h5: _H5, root: h5py.Group) -> None:
        self.h5 = h5
        self.root = root

    def read(self, entry: _Entry) -> list[np.ndarray]:
        group = self.h5.group(entry.top_level, self.root)
        if group is None:
            raise KerasFileError(
                f"{self.h5.where}: no weights group for layer {entry.top_level!r}."
            )
        found: dict[str, list[str]] = {"kernel": [], "bias": []}
        nested = entry.top_level != entry.name or entry.qualified != entry.name
        for weight_name in _string_list(group, "weight_names"):
            parts = weight_name.split("/")
            # A nested model's group holds all its layers' weights, each named
            # ".../<layer name>/kernel" (":0" appended by Keras 2).
            if nested and (len(parts) < 2 or parts[-2] != entry.name):
                continue
            role = self._ROLE.match(parts[-1])
            if role is None:
                raise KerasFileError(
                    f"{self.h5.where}: unexpected weight {weight_name!r} for layer "
                    f"{entry.qualified!r}."
                )
            found[role.group(1)].append(weight_name)
        if len(found["kernel"]) != 1 or len(found["bias"]) > 1:
            raise KerasFileError(
                f"{self.h5.where}: expected one kernel and at most one bias for layer "
                f"{entry.qualified!r} in group {entry.top_level!r}; found "
                f"{found['kernel'] + found['bias'] or 'none'}."
            )
        return [self.h5.array(group, name) for name in found["kernel"] + found["bias"]]


# ------------------------------------------------------------------- model files
def _read_json(data: bytes | str, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KerasFileError(f"{what} is not valid JSON: {error}") from error


def _model_config_arg(model_config: Any) -> dict[str, Any]:
    if isinstance(model_config, Mapping):
        config: Any = dict(model_config)
    elif isinstance(model_config, (str, os.PathLike)):
        where = os.fspath(model_config)
        try:
            with open(where, "rb") as stream:
                config = _read_json(stream.read(_MAX_CONFIG_BYTES + 1), repr(where))
        except OSError as error:
            raise KerasFileError(f"Cannot read model config {where!r}: {error}") from error
    else:
        raise ValueError(
            "Argument `model_config` must be a dict or the path of a JSON file. "
            f"Received: model_config={reprlib.repr(model_config)}"
        )
    if isinstance(config, dict) and "class_name" not in config and "layers" in config:
        # ``model.get_config()`` rather than the serialized model.
        config = {"class_name": "Functional", "config": config}
    if not isinstance(config, dict) or _inner_layers(config.get("config")) is None:
        raise ValueError(
            "Argument `model_config` must be a model config with a list of layers "
            f"(as in model.to_json()). Received: model_config={reprlib.repr(model_config)}"
        )
    return config


class _ModelFile:
    """An open Keras model file: its layers and a reader for their weights."""

    def __init__(self, path: str | os.PathLike[str], model_config: Any) -> None:
        self.path = os.fspath(path)
        self.where = repr(self.path)
        self._model_config = model_config
        self._stack = contextlib.ExitStack()
        self.entries: list[_Entry] = []
        self._reader: _Keras3Weights | _LegacyWeights

    def __enter__(self) -> _ModelFile:
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    # ------------------------------------------------------------- opening
    def _open(self) -> None:
        try:
            with open(self.path, "rb") as stream:
                head = stream.read(4)
        except OSError as error:
            raise KerasFileError(f"Cannot read Keras model file {self.where}: {error}") from error
        if head in _ZIP_SIGNATURES:
            self._open_archive()
        else:
            self._open_hdf5()

    def _refuse_model_config(self) -> None:
        if self._model_config is not None:
            raise ValueError(
                f"Argument `model_config` is only for weights-only files; {self.where} "
                f"has its own config. Received: model_config={reprlib.repr(self._model_config)}"
            )

    def _open_archive(self) -> None:
        try:
            archive = self._stack.enter_context(zipfile.ZipFile(self.path))
            names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise KerasFileError(
                f"{self.where} is not a readable zip archive (truncated or corrupt?): {error}"
            ) from error
        if _CONFIG_MEMBER not in names:
            raise KerasFileError(
                f"{self.where} is a zip archive without {_CONFIG_MEMBER}: not a .keras model."
            )
        self._refuse_model_config()
        # zipfile never inflates a member past its declared size: checking the
        # declared sizes before reading bounds what a hostile archive can cost.
        check_zip_member(
            archive.getinfo(_CONFIG_MEMBER), self.where, KerasFileError, _MAX_CONFIG_BYTES
        )
        raw = self._archive_read(archive, _CONFIG_MEMBER)
        config = _read_json(raw, f"{self.where}: {_CONFIG_MEMBER}")
        self.entries = _model_entries(config)
        if _WEIGHTS_MEMBER not in names:
            others = sorted(n for n in names if n.startswith("model.weights"))
            detail = (
                f"its weights are stored as {others[0]!r}, which is not supported "
                "(re-save the model with the default HDF5 weights)"
                if others
                else f"it has no {_WEIGHTS_MEMBER}"
            )
            raise KerasFileError(f"{self.where}: {detail}.")
        info = archive.getinfo(_WEIGHTS_MEMBER)
        check_zip_member(info, self.where, KerasFileError)
        try:
            if info.compress_type == zipfile.ZIP_STORED:
                # Keras stores the weights uncompressed: read them in place.
                member: IO[bytes] = self._stack.enter_context(archive.open(info))
            else:
                # Inflated in pieces into a file that spills to disk, not into memory.
                member = self._stack.enter_context(
                    tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
                )
                with archive.open(info) as stream:
                    shutil.copyfileobj(stream, member, _COPY_BYTES)
                member.seek(0)
            weights = self._stack.enter_context(h5py.File(member, "r"))
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as error:
            raise KerasFileError(
                f"{self.where}: {_WEIGHTS_MEMBER} is not a readable HDF5 file: {error}"
            ) from error
        self._reader = _Keras3Weights(_H5(weights, f"{self.where} ({_WEIGHTS_MEMBER})"))

    def _archive_read(self, archive: zipfile.ZipFile, name: str) -> bytes:
        try:
            return archive.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise KerasFileError(f"{self.where}: cannot read {name}: {error}") from error

    def _open_hdf5(self) -> None:
        try:
            file = self._stack.enter_context(h5py.File(self.path, "r"))
        except OSError as error:
            raise KerasFileError(
                f"{self.where} is neither a .keras zip archive nor a readable HDF5 file "
                f"(truncated or corrupt?): {error}"
            ) from error
        h5 = _H5(file, self.where)
        if "model_config" in file.attrs:
            self._refuse_model_config()
            config = _read_json(_text(file.attrs["model_config"]), f"{self.where}: model_config")
            self.entries = _model_entries(config)
            root = h5.group("model_weights")
            if root is None:
                raise KerasFileError(f"{self.where} has a model config but no model_weights.")
            self._reader = _LegacyWeights(h5, root)
        elif "layer_names" in file.attrs:
            if self._model_config is None:
                raise KerasFileError(
                    f"{self.where} is a legacy weights-only file, which does not record "
                    "layer classes: pass the model's config (model_config)."
                )
            self.entries = _model_entries(_model_config_arg(self._model_config))
            self._reader = _LegacyWeights(h5, file)
        else:
            self._reader = _Keras3Weights(h5)
            if self._model_config is None:
                self.entries = self._reader.discover()
            else:
                self.entries = _model_entries(_model_config_arg(self._model_config))

    # ------------------------------------------------------------- layers
    def _labels(self) -> list[tuple[str, _Entry]]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            counts[entry.name] = counts.get(entry.name, 0) + 1
        return [
            (entry.name if counts[entry.name] == 1 else entry.qualified, entry)
            for entry in self.entries
            if entry.is_transpose
        ]

    def position(self, entry: _Entry) -> tuple[int, int] | None:
        """Where ``entry`` is among the model's computing layers: (1-based index, count).

        None when it is the model's only one (input layers aside), or when the
        model's layers are unknown (a weights file read without the model's config).
        """
        if entry.config is None:
            return None
        models = {e.qualified.rpartition("/")[0] for e in self.entries}
        layers = [
            e for e in self.entries if e.kind != "class InputLayer" and e.qualified not in models
        ]
        if len(layers) <= 1:
            return None
        index = next(i for i, e in enumerate(layers) if e is entry)
        return index + 1, len(layers)

    def transpose_names(self) -> list[str]:
        return list(dict.fromkeys(label for label, _ in self._labels()))

    def _listing(self) -> str:
        names = self.transpose_names()
        if not names:
            return f"{self.where} has no Conv3DTranspose layer."
        shown = ", ".join(excerpt(name) for name in names[:_LISTED_LAYERS])
        if len(names) > _LISTED_LAYERS:
            shown += f" and {len(names) - _LISTED_LAYERS} more"
        return f"Conv3DTranspose layers in {self.where}: {shown}."

    def find(self, layer_name: str | None) -> _Entry:
        if layer_name is None:
            labels = self._labels()
            if len({label for label, _ in labels}) == 1:
                return labels[0][1]
            if not labels:
                raise KerasFileError(self._listing())
            raise KerasFileError(
                f"{self.where} has {len(labels)} Conv3DTranspose layers; name one. "
                + self._listing()
            )
        if not isinstance(layer_name, str):
            raise ValueError(
                "Argument `layer_name` must be a string or None. "
                f"Received: layer_name={excerpt(layer_name)}"
            )
        matches = [e for e in self.entries if layer_name in (e.qualified, e.weights_path)]
        if not matches:
            matches = [e for e in self.entries if e.name == layer_name]
        # A layer shared between models appears once per model that uses it.
        unique = list({e.qualified: e for e in reversed(matches)}.values())[::-1]
        if not unique:
            raise KerasFileError(
                f"{self.where} has no layer named {excerpt(layer_name)}. " + self._listing()
            )
        if len(unique) > 1:
            raise KerasFileError(
                f"Several layers in {self.where} are named {excerpt(layer_name)}: "
                f"{', '.join(repr(e.qualified) for e in unique)}; give one of these paths."
            )
        entry = unique[0]
        if not entry.is_transpose:
            raise KerasFileError(
                f"Layer {excerpt(layer_name)} in {self.where} is not a Conv3DTranspose "
                f"({entry.kind}). " + self._listing()
            )
        return entry

    def weights(self, entry: _Entry) -> list[np.ndarray]:
        arrays = self._reader.read(entry)
        label = f"{self.where}: layer {entry.qualified!r}"
        if not 1 <= len(arrays) <= 2:
            raise KerasFileError(f"{label} has {len(arrays)} weight arrays, expected 1 or 2.")
        kernel = arrays[0]
        if kernel.ndim != 5:
            raise KerasFileError(
                f"{label}: kernel has shape {kernel.shape}, expected 5 dimensions "
                "(kd, kh, kw, filters, in_channels)."
            )
        if len(arrays) == 2 and arrays[1].shape != (kernel.shape[3],):
            raise KerasFileError(
                f"{label}: bias has shape {arrays[1].shape}, expected ({kernel.shape[3]},)."
            )
        if entry.config is not None:
            expected = 2 if entry.config.get("use_bias", True) else 1
            if len(arrays) != expected:
                raise KerasFileError(
                    f"{label}: use_bias={entry.config.get('use_bias', True)} but the file "
                    f"holds {len(arrays)} weight array(s)."
                )
        return arrays
