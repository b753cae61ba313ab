"""Finish a batch's outputs behind the next file's work: one commit at a time, in order.

A writer's :meth:`~conv3dt.volumes.base.VolumeWriter.commit` flushes the
file to disk (``fsync``) and only then renames it onto its target, which is
what makes an output atomic and durable. In a batch nothing else needs to
wait for that: a :class:`Committer` runs each commit on one background thread
while the caller reads and computes the next file. It keeps every guarantee
of an inline commit:

- at most one commit is pending; handing over the next one first waits for
  it, so outputs appear in the batch's order and the writers' buffers of two
  finished files are never held at once;
- a commit's outcome (success or the error it raised) is given to the
  ``on_settled`` callback with the key it was handed over with, so an error is
  reported for the file it belongs to, and the callback may raise it to stop
  the batch exactly where an inline commit would have;
- leaving the committer (normally, on an error, on an interrupt) waits for the
  pending commit, so no temporary file outlives the run and a file whose
  commit completed is reported as written.

A commit that fails, or is interrupted, removes its own temporary file (the
writer's ``commit`` aborts itself), so a batch never leaves a partial output.

Memory: the commit thread allocates as it finishes a file (a compressor's last
blocks), and glibc keeps what a thread frees in that thread's own heap arena,
resident, beside the main thread's. Without returning it, a batch's peak RSS
grew by 70-120 MiB over commits inline in MNI-sized batches; with
``malloc_trim`` after each commit it stays where it was.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from types import TracebackType
from typing import Any, Protocol

__all__ = ["Committable", "Committer"]

log = logging.getLogger("conv3dt")


class Committable(Protocol):
    """What a :class:`Committer` finishes: a volume writer (its ``commit`` and ``abort``)."""

    def commit(self) -> None: ...  # pragma: no cover - protocol

    def abort(self) -> None: ...  # pragma: no cover - protocol


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def _commit_and_release(writer: Committable) -> None:
    """Commit on the committer's thread, then give the memory it freed back to the system."""
    try:
        writer.commit()
    finally:
        trim = _malloc_trim()
        if trim is not None:
            trim(0)


@dataclass
class _Pending:
    writer: Committable
    key: Any
    future: Future | None = field(default=None)


class Committer:
    """Run writers' commits on one background thread, one at a time, in order.

    Parameters
    ----------
    on_settled : callable
        Called on the caller's thread as ``on_settled(key, error)`` once a
        commit has ended: ``error`` is None when the output is complete,
        else the exception the commit raised (its temporary file is removed by
        then). It may raise, for instance to stop a batch at its first failure;
        the exception then comes out of :meth:`commit`, :meth:`wait` or the
        ``with`` block's end.

    Examples
    --------
    >>> with Committer(lambda key, error: print(key, error)) as committer:  # doctest: +SKIP
    ...     for job in jobs:
    ...         upsample_file(spec, job.input, job.output, committer=committer, commit_key=job)
    """

    def __init__(self, on_settled: Callable[[Any, BaseException | None], None]) -> None:
        self._on_settled = on_settled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conv3dt-commit")
        self._pending: _Pending | None = None

    def commit(self, writer: Committable, key: Any) -> None:
        """Start ``writer.commit()`` in the background, after the previous commit has settled.

        Parameters
        ----------
        writer : VolumeWriter
            A writer with everything written. From the moment this returns it
            belongs to the committer: the caller must neither commit nor abort it
            (see :meth:`owns`).
        key : object
            Handed back to ``on_settled`` with the commit's outcome.

        Raises
        ------
        Exception
            Whatever ``on_settled`` raises for the previous commit; ``writer``
            is then not taken (the caller still owns it and aborts it).
        """
        self.wait()
        # Recorded before it is submitted: an interrupt landing between the two
        # leaves a writer that wait() aborts, never one that nobody owns.
        pending = _Pending(writer, key)
        self._pending = pending
        pending.future = self._pool.submit(_commit_and_release, writer)

    def owns(self, writer: Committable) -> bool:
        """Whether ``writer`` was handed over and is being committed here."""
        return self._pending is not None and self._pending.writer is writer

    def wait(self) -> None:
        """Wait for the pending commit, if any, and give its outcome to ``on_settled``."""
        pending = self._pending
        if pending is None:
            return
        error = self._outcome(pending)
        self._pending = None
        if isinstance(error, KeyboardInterrupt):
            # The commit stopped on the run's stop request: the run stops too.
            raise KeyboardInterrupt
        self._on_settled(pending.key, error)

    def close(self, interrupted: bool = False) -> None:
        """Wait for the pending commit and stop the thread.

        Parameters
        ----------
        interrupted : bool
            The run is stopping on an interrupt: a commit's failure is then only
            logged, so that the interrupt stays what the run ends with.
        """
        try:
            if interrupted and self._pending is not None:
                pending, self._pending = self._pending, None
                error = self._outcome(pending)
                if error is None:
                    self._on_settled(pending.key, None)
                elif not isinstance(error, KeyboardInterrupt):
                    log.debug("a commit failed while the run stopped: %s", error)
            else:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def _outcome(self, pending: _Pending) -> BaseException | None:
        """Block until ``pending`` has ended; the exception it raised, or None."""
        if pending.future is None:
            # Interrupted before it was submitted: it never started, drop it.
            pending.writer.abort()
            return KeyboardInterrupt()
        return pending.future.exception()

    def __enter__(self) -> Committer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(interrupted=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))
