"""Argument checks shared by the functional op and the layer, worded as Keras words them."""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Sequence

__all__ = [
    "default_data_format",
    "excerpt",
    "standardize_data_format",
    "standardize_padding",
    "standardize_tuple",
    "weight_count",
]


# How much of a user's value a message echoes.
EXCERPT_CHARS = 80
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = EXCERPT_CHARS


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, for echoing user input.

    Values from files can be huge (a long string, a deeply nested list, an
    integer of thousands of digits); a message echoes a bounded excerpt, and
    building it never walks the whole value.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        # Python refuses to print integers beyond 4300 digits; no message needs them all.
        return f"<an integer of {len(hex(value)) - 2} hex digits>"
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr of the user's own object may fail; say what it was
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def weight_count(count: int) -> str:
    """A count of weights for a message: ``2.7e+27``, or a power of two past floats' range."""
    if count.bit_length() < 1000:
        return f"{float(count):.3g}"
    return f"about 2**{count.bit_length()}"


def standardize_tuple(
    value: int | Sequence[int], n: int, name: str, allow_zero: bool = False
) -> tuple[int, ...]:
    """Turn an int or a sequence of ``n`` ints into a tuple of ``n`` ints.

    Raises
    ------
    ValueError
        When the value is not an int or a sequence of ``n`` ints, or holds a value
        that is negative (or zero, unless ``allow_zero``). The message names the
        argument and the value received.
    """
    shown = excerpt(value)
    message = f"The `{name}` argument must be a tuple of {n} integers. Received {name}={shown}"
    # bool is an int, and Keras takes it as one.
    if isinstance(value, int):
        values = (value,) * n
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise ValueError(message) from None
        if len(values) != n:
            raise ValueError(message)
        converted = []
        for item in values:
            if not _is_integral(item):
                raise ValueError(
                    f"{message}, including element {excerpt(item)} of type {type(item)}"
                )
            converted.append(int(item))
        values = tuple(converted)
    # A set, printed as Keras prints it ("including values {0}"): its tests match that text.
    bad = {v for v in values if (v < 0 if allow_zero else v <= 0)}
    if bad:
        requirement = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{message}, including values {bad} that do not satisfy `value {requirement}`"
        )
    return values


def _is_integral(item: object) -> bool:
    try:
        return int(item) == item  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False


def standardize_padding(value: str) -> str:
    """Lower-case ``padding`` and check it is "valid" or "same"."""
    if not isinstance(value, str) or value.lower() not in ("valid", "same"):
        raise ValueError(
            f"The `padding` argument must be one of 'valid', 'same' (case-insensitive). "
            f"Received: padding={excerpt(value)}"
        )
    return value.lower()


def default_data_format() -> str:
    """Keras's ``image_data_format``: from ``$KERAS_HOME/keras.json`` or ``~/.keras/keras.json``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = os.path.join(home, "keras.json")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return "channels_last"
    value = config.get("image_data_format", "channels_last") if isinstance(config, dict) else None
    return value if value in ("channels_last", "channels_first") else "channels_last"


def standardize_data_format(value: str | None) -> str:
    """Resolve ``data_format`` (None means Keras's configured default) and check it."""
    if value is None:
        return default_data_format()
    if not isinstance(value, str) or value.lower() not in ("channels_last", "channels_first"):
        raise ValueError(
            "The `data_format` argument must be one of {'channels_first', 'channels_last'}. "
            f"Received: data_format={excerpt(value)}"
        )
    return value.lower()
