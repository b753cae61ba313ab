"""A stop request that survives being raised at an awkward moment.

A signal handler that raises ``KeyboardInterrupt`` can hit a frame that
swallows it (an object's ``__del__``, for one). Recording the request as well
lets the run loops stop at their next tile or task.
"""

from __future__ import annotations

import threading

__all__ = ["check", "clear", "request", "requested"]

_stop = threading.Event()


def request() -> None:
    """Record that the run should stop."""
    _stop.set()


def requested() -> bool:
    """Whether a stop was requested."""
    return _stop.is_set()


def clear() -> None:
    """Forget an earlier request (a new run starts)."""
    _stop.clear()


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a stop was requested."""
    if _stop.is_set():
        raise KeyboardInterrupt
