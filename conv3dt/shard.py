"""Split one batch across independent processes: ``--shard I/N`` and SLURM job arrays.

Every process expands the same inputs, sorts them by a stable key (the
normalized path as given on the command line, so the order the file system
lists a directory in does not matter) and keeps every N-th one starting at
rank I: round-robin over the sorted list, so shard sizes differ by at most one.
Each process therefore needs the same list of inputs; add files between
batches, not while an array is running.

Inside a SLURM job array the array variables give the default shard:
``I = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP``
and ``N = SLURM_ARRAY_TASK_COUNT``, so ``#SBATCH --array=0-7`` runs eight
disjoint shards that together cover the batch once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

__all__ = [
    "ShardError",
    "parse_shard",
    "select_shard",
    "shard_from_environment",
    "shard_key",
]

T = TypeVar("T")

_SHARD = re.compile(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*")


class ShardError(ValueError):
    """A shard that is malformed or out of range; the message says which and why."""


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"I/N"`` into ``(I, N)`` with ``0 <= I < N``.

    Raises
    ------
    ShardError
        When the text is not two integers separated by ``/`` or is out of range.
    """
    match = _SHARD.fullmatch(str(text))
    if not match:
        raise ShardError(
            f"invalid shard {text!r}; expected I/N with integers 0 <= I < N, for example 0/4"
        )
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ShardError(f"invalid shard {text!r}; the shard count N must be at least 1")
    if not 0 <= index < count:
        raise ShardError(
            f"invalid shard {text!r}; the shard index I must be in 0..{count - 1} "
            "(shards are numbered from 0)"
        )
    return index, count


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None or not value.strip():
        if default is not None:
            return default
        raise ShardError(
            f"SLURM_ARRAY_TASK_ID is set but {name} is not; give the shard as --shard I/N"
        )
    try:
        return int(value)
    except ValueError:
        raise ShardError(
            f"{name}={value!r} is not an integer; give the shard as --shard I/N"
        ) from None


def shard_from_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard a SLURM job array task stands for, or None outside a job array.

    Parameters
    ----------
    environ : mapping, optional
        The environment to read (default ``os.environ``).

    Raises
    ------
    ShardError
        When the array variables are incomplete, not integers, or name a task
        that is not one of ``COUNT`` evenly spaced ids from ``MIN`` (an
        ``--array`` list such as ``1,5,9`` has gaps SLURM does not describe).
    """
    env = os.environ if environ is None else environ
    if not env.get("SLURM_ARRAY_TASK_ID", "").strip():
        return None
    task_id = _env_int(env, "SLURM_ARRAY_TASK_ID")
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    minimum = _env_int(env, "SLURM_ARRAY_TASK_MIN")
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP", default=1)
    if count < 1 or step < 1:
        raise ShardError(
            f"SLURM_ARRAY_TASK_COUNT={count} and SLURM_ARRAY_TASK_STEP={step} must be "
            "positive; give the shard as --shard I/N"
        )
    offset = task_id - minimum
    if offset % step == 0 and 0 <= offset // step < count:
        return offset // step, count
    raise ShardError(
        f"SLURM array task {task_id} (min {minimum}, step {step}, count {count}) is not one "
        f"of {count} evenly spaced task ids, so it names no shard; use --array=0-{count - 1} "
        "or give the shard as --shard I/N"
    )


def shard_key(path: str) -> str:
    """The sort key of an input: its path as given, normalized (``a/./b`` is ``a/b``)."""
    return os.path.normpath(path) if path != "-" else path


def select_shard(
    items: Sequence[T], index: int, count: int, key: Callable[[T], str] = shard_key
) -> list[T]:
    """The items of shard ``index`` of ``count``, in their original order.

    Items are ranked by ``key`` (ties keep their order) and the item of rank r
    belongs to shard ``r % count``; the shards are disjoint and cover ``items``.

    Raises
    ------
    ValueError
        When ``index`` or ``count`` is out of range.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`count` must be a positive integer. Received count={count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"`index` must be an integer in 0..{count - 1}. Received index={index!r}")
    ranked = sorted(range(len(items)), key=lambda position: key(items[position]))
    chosen = {position for rank, position in enumerate(ranked) if rank % count == index}
    return [item for position, item in enumerate(items) if position in chosen]
