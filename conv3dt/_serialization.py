"""Identifier and config handling shared by initializers, regularizers and constraints.

Keras resolves these objects the same way: by name, by the dict its
serialization writes (``module``, ``class_name``, ``config``, ``registered_name``),
as an instance or as a class; and it writes them back as that dict. Only Keras's
built-ins are accepted; dicts of custom objects are refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

from conv3dt.validation import EXCERPT_CHARS, excerpt

__all__ = ["resolve_identifier", "serialize_object", "shown_name"]

T = TypeVar("T")


def resolve_identifier(
    identifier: Any,
    *,
    kind: str,
    base: type[T],
    registry: Mapping[str, type[T]],
    refused: Mapping[str, str] | None = None,
) -> T | None:
    """Turn a Keras identifier into an instance of ``base``, as Keras's ``get`` does.

    Parameters
    ----------
    identifier : None, str, dict, ``base`` instance or ``base`` subclass
        A name looked up in ``registry``; a serialized dict (``class_name`` looked up
        in ``registry``, ``config`` passed to the class); an instance (returned
        as is); a class (instantiated with its defaults).
    kind : str
        What is resolved ("initializer", "regularizer", "constraint"), for messages.
    base : type
    registry : mapping of str to type
        Accepted names and class names.
    refused : mapping of str to str, optional
        Keras names deliberately not supported, with the reason.

    Returns
    -------
    object or None
        ``None`` for ``None``.

    Raises
    ------
    ValueError
        Unknown or refused names, malformed dicts, dicts of custom objects, config
        keys the class does not take, and values of other types. The message names
        the value received.
    """
    if identifier is None:
        return None
    if isinstance(identifier, base):
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, base):
        return identifier()
    refused = refused or {}
    if isinstance(identifier, str):
        return _lookup(identifier, kind, registry, refused)()
    if isinstance(identifier, dict):
        return _from_dict(identifier, kind, registry, refused)
    raise ValueError(
        f"Could not interpret {kind} identifier: expected a name, a Keras serialized dict "
        f"or a {base.__name__}. Received: {kind}={excerpt(identifier)}"
    )


def shown_name(name: str) -> str:
    """A name as Keras's "Could not interpret ... identifier: NAME" shows it (unquoted),
    or a bounded excerpt of a long or unprintable one."""
    return name if len(name) <= EXCERPT_CHARS and name.isprintable() else excerpt(name)


def _lookup(
    name: str, kind: str, registry: Mapping[str, type[T]], refused: Mapping[str, str]
) -> type[T]:
    if name in refused:
        raise ValueError(f"The {kind} {name!r} is not supported: {refused[name]}")
    try:
        return registry[name]
    except KeyError:
        raise ValueError(
            f"Could not interpret {kind} identifier: {shown_name(name)}. "
            f"Valid names are: {', '.join(sorted(registry))}"
        ) from None


def _from_dict(
    config: dict[str, Any],
    kind: str,
    registry: Mapping[str, type[T]],
    refused: Mapping[str, str],
) -> T:
    class_name = config.get("class_name")
    if not isinstance(class_name, str):
        raise ValueError(
            f"A serialized {kind} must have a string 'class_name'. "
            f"Received: {kind}={excerpt(config)}"
        )
    module = config.get("module", "keras")
    registered = config.get("registered_name")
    # Built-ins are written with a keras module and no registered name (files from
    # Keras 2 have neither key); anything else was registered by user code.
    custom = not isinstance(module, str) or not (module == "keras" or module.startswith("keras."))
    if custom or registered not in (None, class_name) or class_name not in registry:
        if not custom and class_name in refused:
            raise ValueError(f"The {kind} {class_name!r} is not supported: {refused[class_name]}")
        if not custom and registered in (None, class_name):
            raise ValueError(
                f"Could not interpret {kind} identifier: {excerpt(config)}: unknown "
                f"class_name {excerpt(class_name)}. Valid names are: {', '.join(sorted(registry))}"
            )
        raise ValueError(
            f"Custom {kind} objects are not supported, only Keras's built-ins. "
            f"Received: {kind}={excerpt(config)}"
        )
    inner = config.get("config")
    if inner is None:
        inner = {}
    if not isinstance(inner, dict):
        raise ValueError(
            f"The 'config' of a serialized {kind} must be a dict. "
            f"Received: {kind}={excerpt(config)}"
        )
    cls = registry[class_name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(inner) - accepted)
    if unknown:
        raise ValueError(
            f"Unrecognized arguments {unknown} in the config of the {kind} {class_name}; "
            f"it accepts {sorted(accepted)}. Received: {kind}={excerpt(config)}"
        )
    return cls.from_config(inner)


def serialize_object(obj: Any, *, kind: str, module: str) -> dict[str, Any] | None:
    """Keras's serialized form of a built-in object: module, class_name, config, registered_name.

    Parameters
    ----------
    obj : object with ``get_config()``, or None
    kind : str
        For messages.
    module : str
        The public Keras module Keras writes ("keras.initializers"...).

    Returns
    -------
    dict or None
        ``None`` for ``None``.

    Raises
    ------
    ValueError
        When ``obj`` has no ``get_config``.
    """
    if obj is None:
        return None
    if not callable(getattr(obj, "get_config", None)):
        raise ValueError(f"Cannot serialize the {kind} {obj!r}: it has no get_config().")
    return {
        "module": module,
        "class_name": type(obj).__name__,
        "config": obj.get_config(),
        "registered_name": None,
    }
