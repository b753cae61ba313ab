"""How many threads the engines use: one setting for our workers, BLAS and Numba.

:func:`set_threads` changes it, as a call or as a context manager::

    set_threads(1)              # from now on
    with set_threads(2):        # for a block, then back to the previous setting
        ...

``None`` means every core this process may run on. BLAS is limited through
threadpoolctl, Numba through ``numba.set_num_threads`` (applied by the engines
in the thread that launches a Numba kernel, as Numba's setting is per thread).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

__all__ = [
    "available_cores",
    "get_threads",
    "numba_threads",
    "set_threads",
    "single_threaded_blas",
]

_lock = threading.Lock()
_threads: int | None = None
_controller: Any = None
_blas_limiter: Any = None
_single_users = 0
_single_limiter: Any = None


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def get_threads() -> int:
    """The engines' thread count (all available cores unless set)."""
    return available_cores() if _threads is None else _threads


def _blas_controller() -> Any:
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


def _apply_blas(n: int | None) -> None:
    """Limit BLAS to ``n`` threads, or give it back its own setting for None."""
    global _blas_limiter
    if _blas_limiter is not None:
        _blas_limiter.restore_original_limits()
        _blas_limiter = None
    if n is not None:
        _blas_limiter = _blas_controller().limit(limits=n, user_api="blas")


class set_threads:
    """Set the engines' thread count; also a context manager restoring the previous one.

    Parameters
    ----------
    n : int or None
        Threads for the engines' workers, BLAS and Numba; None for all cores.

    Raises
    ------
    ValueError
        If ``n`` is not a positive integer or None.
    """

    def __init__(self, n: int | None) -> None:
        global _threads
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"`n` must be a positive integer or None. Received: n={n!r}")
        with _lock:
            self._previous = _threads
            _threads = n
            _apply_blas(n)

    def __enter__(self) -> set_threads:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _threads
        with _lock:
            _threads = self._previous
            _apply_blas(self._previous)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run BLAS on one thread for a block (the engines' workers each run their own GEMMs).

    Nested and concurrent blocks share one limit; the last to leave restores BLAS.
    """
    global _single_users, _single_limiter
    with _lock:
        if _single_users == 0:
            _single_limiter = _blas_controller().limit(limits=1, user_api="blas")
        _single_users += 1
    try:
        yield
    finally:
        with _lock:
            _single_users -= 1
            if _single_users == 0:
                _single_limiter.restore_original_limits()
                _single_limiter = None


def numba_threads() -> int:
    """Apply the thread count to Numba in the calling thread and return it."""
    import numba

    n = min(get_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    return n
