"""Where Numba keeps conv3dt's compiled kernels: a per-user cache folder, never the package.

Numba's default for ``cache=True`` writes ``.nbi`` / ``.nbc`` files into the
``__pycache__`` folder beside the source. In an installed package that breaks
two things: read-only installs (HPC modules, containers, system site-packages)
cannot keep their kernels, and the files outlive an uninstall, leaving a
``site-packages/conv3dt/`` folder without ``__init__.py`` that Python then
imports as an empty namespace package ahead of a later (editable) install.

So conv3dt's kernels are compiled without Numba's own cache and
:func:`enable_cache` turns caching on afterwards with a locator that sends
them to ``$NUMBA_CACHE_DIR`` when it is set, else to the platform's user cache
folder (``$XDG_CACHE_HOME/conv3dt/numba``, ``~/.cache/conv3dt/numba`` on
Linux). Where that folder cannot be written, the kernels are compiled in each
process and nothing is written anywhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["COMPILE_LOGGER", "announce_compiles", "cache_directory", "enable_cache"]

log = logging.getLogger("conv3dt")
# The one-line notice that kernels are being compiled; the CLI shows it at a
# terminal (it is worth knowing why a first run sits silent for seconds).
COMPILE_LOGGER = "conv3dt.compile"


def cache_directory() -> str:
    """The folder conv3dt's compiled Numba kernels are kept in.

    Returns
    -------
    str
        ``$NUMBA_CACHE_DIR`` when set (Numba's own setting), else
        ``<user cache dir>/conv3dt/numba`` from :mod:`platformdirs`.
    """
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    import platformdirs

    return os.path.join(platformdirs.user_cache_dir("conv3dt", appauthor=False), "numba")


def _locator_class() -> type:
    """A Numba cache locator for conv3dt's own functions, in :func:`cache_directory`."""
    from numba.core import caching

    class UserCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
        def __init__(self, py_func: Callable[..., Any], py_file: str) -> None:
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            subpath = self.get_suitable_cache_subpath(py_file)
            self._cache_path = os.path.join(cache_directory(), subpath)

        def get_cache_path(self) -> str:
            return self._cache_path

        @classmethod
        def from_function(cls, py_func: Callable[..., Any], py_file: str) -> Any:
            # Other packages' functions keep Numba's usual locations.
            if not py_func.__module__.startswith("conv3dt."):
                return None
            # None when the folder cannot be created or written.
            return super().from_function(py_func, py_file)

    return UserCacheLocator


_LOCATOR: type | None = None


def _registered_locator() -> type:
    """The locator class, put first in Numba's list of locators once per process."""
    global _LOCATOR
    if _LOCATOR is None:
        from numba.core import caching

        impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
        _LOCATOR = _locator_class()
        # A list of its own on the class, so no other CacheImpl subclass is changed
        # in place, with conv3dt's locator ahead of the in-tree one.
        impl._locator_classes = [_LOCATOR, *impl._locator_classes]
    return _LOCATOR


def enable_cache(dispatchers: Sequence[Any]) -> bool:
    """Cache the compiled code of ``dispatchers`` in :func:`cache_directory`.

    Parameters
    ----------
    dispatchers : sequence of Numba dispatchers
        conv3dt's kernels, compiled without ``cache=True``.

    Returns
    -------
    bool
        Whether caching is on. When the cache folder cannot be written the
        kernels stay uncached (they compile in each process), and this is
        logged once at INFO level.
    """
    import inspect

    if not dispatchers:
        return False
    locator = _registered_locator()
    first = dispatchers[0].py_func
    if locator.from_function(first, inspect.getfile(first)) is None:
        log.info(
            "the kernel cache folder %s cannot be written; kernels are compiled "
            "in each run (set NUMBA_CACHE_DIR to a writable folder to keep them)",
            cache_directory(),
        )
        return False
    for dispatcher in dispatchers:
        dispatcher.enable_caching()
    return True


_NOTICE_REGISTERED = False


def announce_compiles() -> None:
    """Log ``"compiling kernels, first run only"`` once, when Numba first compiles one of conv3dt's.

    Numba raises its ``numba:compile`` event only for code it did not find in
    the cache, so the notice appears on the runs that pay for compiling and on
    no others. It goes to the :data:`COMPILE_LOGGER` logger at INFO level.
    """
    global _NOTICE_REGISTERED
    if _NOTICE_REGISTERED:
        return
    from numba.core import event

    class CompileNotice(event.Listener):
        shown = False

        def on_start(self, ev: Any) -> None:
            dispatcher = ev.data.get("dispatcher") if isinstance(ev.data, dict) else None
            module = getattr(getattr(dispatcher, "py_func", None), "__module__", "")
            if not self.shown and module.startswith("conv3dt."):
                self.shown = True
                logging.getLogger(COMPILE_LOGGER).info("compiling kernels, first run only")

        def on_end(self, ev: Any) -> None:
            pass

    event.register("numba:compile", CompileNotice())
    _NOTICE_REGISTERED = True
