"""Run a batch on a dask.distributed cluster: files as tasks, or tiles as tasks.

A batch is spread over the cluster's worker slots (its threads) in one of two ways:

- **files**: each file is one task running :func:`conv3dt.run.upsample_file`
  on a worker, which writes that output atomically (temporary name, rename).
- **tiles**: when the batch has fewer files than slots (one large volume, say),
  each file's tiles are the tasks. Workers write their tiles into a *scratch*
  volume beside the target, in a format that takes concurrent writers to
  disjoint regions: a ``.npy`` file created up front with its header and full
  size, into which each tile goes with positional writes of its own byte runs;
  or a Zarr array whose chunks are the tiles, so no two writers share a chunk.
  A ``.npy``, ``.zarr`` or ``.ome.zarr`` target *is* its scratch (an OME-Zarr
  image's level 0 is that array; its further levels are computed from it at
  the end), renamed onto the target once the last tile is in. NIfTI and HDF5
  files are never written by several processes: their tiles go to a scratch
  ``.npy`` that one worker converts into the target at the end (under a
  temporary name, then renamed).

Resume: a worker flushes each tile to disk (fsync) before reporting it done,
with a CRC-32 of the tile's bytes; the client then appends the tile's id and
checksum to a completion record beside the scratch
(``.NAME.conv3dt-partial.jsonl``) and flushes that too. The record's first line
fingerprints the work (input file, layer and weights, shapes, tiles, dtype,
engine). With ``resume=True`` (``--skip-existing``) a matching record and
scratch mean only the missing tiles are computed; the result equals an
uninterrupted run's, since every tile is computed by the same code from the
same input and lands in the same place. The record is not trusted: each tile
it lists is read back from the scratch and recomputed unless its checksum
matches, and lines that are not exactly ``{"tile": INT, "crc32": INT}`` for a
tile of this run are ignored. Without resume, leftovers are discarded.

Every path must be visible to the client and to all workers under the same
name (a shared file system); relative paths are made absolute on the client,
which also reads each input's header to plan its tiles.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.lib import format as npformat

from conv3dt import __version__, interrupt
from conv3dt.batch import Job
from conv3dt.engine.threads import available_cores, set_threads
from conv3dt.geometry import AxisGeometry
from conv3dt.layout import DiskLayout
from conv3dt.plan import Plan, Tile, available_memory, default_memory_limit, format_bytes
from conv3dt.run import (
    FileSetup,
    RunResult,
    compute_tile,
    peak_rss_bytes,
    prepare_file,
    read_tile,
    storage_chunks,
    upsample_file,
    volume_engine,
    writer_options,
)
from conv3dt.spec import LayerSpec
from conv3dt.volumes import (
    OutputExistsError,
    VolumeError,
    VolumeReader,
    VolumeWriteError,
    create_volume,
    open_volume,
)
from conv3dt.volumes.base import (
    fsync_path,
    is_live_local_temp,
    normalize_box,
    pwrite_all,
    rename_noreplace,
    write_raw_box,
)
from conv3dt.volumes.hdf5 import split_hdf5_path
from conv3dt.volumes.npy import NpyReader
from conv3dt.volumes.ome_zarr import create_ome_zarr, write_pyramid
from conv3dt.volumes.zarr import (
    create_zarr_array,
    fsync_box,
    fsync_tree,
    open_zarr_array,
    replace_directory,
    zarr_attrs,
)

__all__ = [
    "INSTALL_HINT",
    "SPLITS",
    "WORKER_BASE_BYTES",
    "ClusterError",
    "DaskUnavailableError",
    "Session",
    "TiledOutput",
    "capped_workers",
    "connect",
    "import_distributed",
    "local_workers",
    "remove_stale_temps",
    "upsample_batch",
    "worker_slots",
]

log = logging.getLogger("conv3dt")
#: What one local worker process holds besides its task: the interpreter,
#: NumPy, Numba, h5py and Dask's own state (about 230 MB each, measured).
WORKER_BASE_BYTES = 256 * 2**20

INSTALL_HINT = "pip install 'conv3dt[dask]'"
SPLITS = ("auto", "files", "tiles")
_FLOAT_DTYPES = tuple(np.dtype(t) for t in ("float32", "float16", "float64"))
# Targets whose scratch is the target itself, in chunks that are the tiles.
_ZARR_SCRATCH = ("zarr", "ome-zarr")
# Tiles per worker slot when a file is split for the cluster: more than one
# evens out the slots' finishing times.
_TILES_PER_SLOT = 2
# Tasks handed to the scheduler at a time, per worker slot: enough to keep every
# slot busy, few enough that the client keeps up with completions and an
# interrupted run has little to cancel, however many tiles a volume has.
_TASKS_PER_SLOT = 4
# Tiles of fewer output voxels than this cost more in task overhead than in compute.
_SMALL_TILE_VOXELS = 4096
# Bytes per box when a scratch .npy is copied into a NIfTI or HDF5 target
# (without a memory limit to take a share of).
_COPY_BYTES = 64 << 20


class DaskUnavailableError(ImportError):
    """dask.distributed is not installed; the message says how to install it."""

    #: A usage error for the command line: the option cannot work here.
    exit_code = 2


class ClusterError(RuntimeError):
    """The Dask cluster cannot be started or reached."""


def import_distributed() -> Any:
    """The ``distributed`` package.

    Raises
    ------
    DaskUnavailableError
        When it is not installed.
    """
    try:
        import distributed
    except ImportError:
        raise DaskUnavailableError(
            f"running on a Dask cluster needs dask.distributed, which is not installed: "
            f"{INSTALL_HINT}"
        ) from None
    return distributed


def local_workers(address: str) -> int | None:
    """Worker processes to start for ``"local"`` / ``"local:N"``; None for a scheduler address.

    ``"local"`` alone means one worker per available core.

    Raises
    ------
    ValueError
        For an empty address or a ``local:`` count that is not a positive integer.
    """
    text = str(address).strip()
    if not text:
        raise ValueError(
            f"`address` must be a scheduler address (tcp://host:8786) or local:N. "
            f"Received address={address!r}"
        )
    if text == "local":
        return available_cores()
    if not text.startswith("local:"):
        return None
    count = text[len("local:") :]
    if not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"`address` local:N needs a positive number of workers N. Received address={address!r}"
        )
    return int(count)


def capped_workers(requested: int, task_memory: int | None = None) -> int:
    """``requested`` local workers, or as many as this machine holds when that is fewer.

    One single-threaded worker per available core, and no more than the
    available memory holds at :data:`WORKER_BASE_BYTES` plus one task's budget
    each. Logs a warning when it caps.
    """
    budget = default_memory_limit() if task_memory is None else int(task_memory)
    per_worker = WORKER_BASE_BYTES + budget
    memory = available_memory()
    cores = available_cores()
    cap = max(1, min(cores, memory // per_worker))
    if requested <= cap:
        return requested
    log.warning(
        "local:%d asks for %d workers, but this machine holds %d: %d cores, and %s of "
        "memory available for %s per worker; starting %d",
        requested,
        requested,
        cap,
        cores,
        format_bytes(memory),
        format_bytes(per_worker),
        cap,
    )
    return cap


@dataclass
class Session:
    """A connected client, and the local cluster it started (if any).

    Attributes
    ----------
    client : distributed.Client
    cluster : distributed.LocalCluster or None
        Set when the session started its own workers (``local:N``).
    """

    client: Any
    cluster: Any = None

    @property
    def owns_workers(self) -> bool:
        """Whether closing the session stops every worker (a ``local:N`` cluster)."""
        return self.cluster is not None

    def close(self) -> None:
        """Disconnect, and stop the local cluster if the session started one."""
        with contextlib.suppress(Exception):
            self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(
    address: str | None = None,
    *,
    scheduler_file: str | None = None,
    timeout: float = 30.0,
    log_level: int = logging.ERROR,
    task_memory: int | None = None,
) -> Session:
    """Connect to a Dask scheduler, or start a local cluster.

    Parameters
    ----------
    address : str, optional
        ``tcp://host:port`` (any address ``distributed.Client`` takes), or
        ``local:N`` to start N single-threaded worker processes on this machine.
    scheduler_file : str, optional
        A scheduler's JSON file (``dask scheduler --scheduler-file``,
        dask-jobqueue); waited for up to ``timeout`` seconds.
    timeout : float
        Seconds to wait for the scheduler.
    log_level : int
        What a local cluster's scheduler and workers log (task failures are
        reported to the caller anyway).
    task_memory : int, optional
        The memory budget of one task (default
        :func:`conv3dt.plan.default_memory_limit`): a local cluster gets no
        more workers than the available memory holds (see :func:`capped_workers`).

    Returns
    -------
    Session
        Use as a context manager, or call ``close()``.

    Raises
    ------
    ValueError
        For both or neither of ``address`` and ``scheduler_file``, or a bad ``local:`` count.
    DaskUnavailableError
        When dask.distributed is not installed.
    ClusterError
        When the scheduler cannot be reached or the local cluster cannot start.
    """
    if (address is None) == (scheduler_file is None):
        raise ValueError(
            "give exactly one of `address` and `scheduler_file`. Received "
            f"address={address!r}, scheduler_file={scheduler_file!r}"
        )
    workers = None if address is None else local_workers(address)
    if workers is not None:
        workers = capped_workers(workers, task_memory)
    distributed = import_distributed()
    where = address if scheduler_file is None else f"the scheduler file {scheduler_file}"
    try:
        if workers is not None:
            cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                # Any free port: a second local cluster must not find 8787 taken.
                dashboard_address="127.0.0.1:0",
                silence_logs=log_level,
            )
            try:
                return Session(distributed.Client(cluster), cluster)
            except BaseException:
                cluster.close()
                raise
        if scheduler_file is not None:
            # distributed.Client would wait for a missing file forever.
            deadline = time.monotonic() + timeout
            while not os.path.exists(scheduler_file):
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"the scheduler file {scheduler_file} did not appear within {timeout:g} s"
                    )
                time.sleep(0.1)
            return Session(distributed.Client(scheduler_file=scheduler_file, timeout=timeout))
        return Session(distributed.Client(address, timeout=timeout))
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot connect to the Dask scheduler at {where}: {exc}") from None


def worker_slots(client: Any) -> int:
    """Tasks the cluster runs at once: its workers' threads (at least 1)."""
    return max(1, sum(client.nthreads().values()))


def _level0(scratch: str, scratch_format: str) -> str:
    """The directory of the Zarr array tiles are written into (an OME-Zarr image's level 0)."""
    return os.path.join(scratch, "0") if scratch_format == "ome-zarr" else scratch


def _file_path(path: str) -> str:
    """The file or directory a volume path names (an HDF5 ``:/dataset`` dropped)."""
    return split_hdf5_path(path)[0].rstrip("/") or path


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def remove_stale_temps(target: str) -> list[str]:
    """Remove the temporary files a killed writer left beside ``target``.

    Writers name them ``.NAME.conv3dt-tmp-*``; one whose process died without
    cleaning up stays behind, on whichever host its worker ran. Those of live
    processes on this host are kept; call this only when no process on another
    host is writing ``target``. Returns the paths removed.
    """
    file_path = _file_path(target)
    directory, name = os.path.split(os.path.abspath(file_path))
    pattern = os.path.join(glob.escape(directory), glob.escape(f".{name}.conv3dt-tmp-") + "*")
    removed = [
        path for path in sorted(glob.glob(pattern)) if not is_live_local_temp(path, file_path)
    ]
    for path in removed:
        _remove(path)
    return removed


@dataclass(frozen=True)
class _Options:
    """The per-file settings, as :func:`conv3dt.run.upsample_file` takes them."""

    input_format: str | None
    output_format: str | None
    output_dtype: str
    memory_limit: int | None
    four_d_as_batch: bool
    compression: str | None
    engine: str
    threads: int | None
    tile_shape: tuple[int, int, int] | None
    overwrite: bool = True
    nifti_channels: str = "vector"
    level: int | None = None
    pyramid: int = 0


def _engine_threads(requested: int | None) -> int:
    """The engine threads of one task: as asked, else this worker's cores per slot."""
    if requested is not None:
        return requested
    from distributed import get_worker

    try:
        slots = int(get_worker().state.nthreads)
    except (ValueError, AttributeError):  # not inside a worker
        slots = 1
    return max(1, available_cores() // max(1, slots))


def _identity(value: Any) -> Any:
    return value


def _file_task(spec: LayerSpec, job: Job, options: _Options) -> RunResult:
    with set_threads(_engine_threads(options.threads)):
        return upsample_file(
            spec,
            job.input,
            job.output,
            input_format=options.input_format,
            output_format=options.output_format,
            output_dtype=options.output_dtype,
            memory_limit=options.memory_limit,
            four_d_as_batch=options.four_d_as_batch,
            compression=options.compression,
            engine=options.engine,
            tile_shape=options.tile_shape,
            overwrite=options.overwrite,
            nifti_channels=options.nifti_channels,
            level=options.level,
            pyramid=options.pyramid,
        )


def _setup(
    spec: LayerSpec,
    source: VolumeReader,
    output: str,
    options: _Options,
    tile_shape: tuple[int, int, int] | None,
) -> FileSetup:
    # upsample_file's decisions, so tiles land where a serial run puts them;
    # they go to a scratch volume, whatever the target's format.
    return prepare_file(
        spec,
        source,
        output,
        output_format=options.output_format,
        output_dtype=options.output_dtype,
        memory_limit=options.memory_limit,
        four_d_as_batch=options.four_d_as_batch,
        tile_shape=tile_shape,
        scratch=True,
    )


def _finer_tiles(plan: Plan, wanted: int) -> tuple[int, int, int]:
    """A tile shape with about ``wanted`` tiles, cutting only the first axis further.

    Only the first axis is cut: an activation that couples voxels keeps the
    width whole, and the planner has already kept the other axes within budget.
    """
    tile = list(plan.tile_shape)
    factor = math.ceil(wanted / max(1, len(plan)))
    length = max(1, math.ceil(tile[0] / factor))
    stride = plan.axes[0].stride
    if length > stride:
        # Whole input voxels per tile, as the planner does, to avoid recomputing halos.
        length = math.ceil(length / stride) * stride
    tile[0] = min(length, tile[0])
    return tuple(tile)  # type: ignore[return-value]


@dataclass(frozen=True)
class _TileTask:
    id: int
    sample: int
    tile: Tile


@dataclass(frozen=True)
class _TileContext:
    """What every tile task of one file needs (sent with each task, so kept small)."""

    input: str
    input_format: str | None
    target: str
    scratch: str
    scratch_format: str
    scratch_order: str
    data_offset: int
    in_layout: DiskLayout
    out_layout: DiskLayout
    axes: tuple[AxisGeometry, ...]
    dtype: np.dtype
    engine: str
    threads: int | None
    level: int | None = None


@dataclass(frozen=True)
class _ConvertContext:
    """What the task turning a finished scratch .npy into a NIfTI or HDF5 target needs."""

    input: str
    input_format: str | None
    target: str
    output_format: str
    scratch: str
    record: str
    out_layout: DiskLayout
    dtype: np.dtype
    affine: np.ndarray | None
    attrs: dict[str, Any]
    compression: str | None
    boxes: tuple[tuple[slice, ...], ...]
    overwrite: bool
    writer_options: dict[str, Any] = field(default_factory=dict)
    level: int | None = None


def _tile_checksum(stored: np.ndarray, dtype: np.dtype) -> int:
    """CRC-32 of a tile's values as stored, in C order of the output's stored axes."""
    return zlib.crc32(np.ascontiguousarray(stored, dtype=dtype).data)


def _write_failure(target: str, exc: OSError) -> VolumeWriteError:
    reason = exc.strerror or str(exc)
    return VolumeWriteError(
        f"cannot write {target}: {reason}; its tiles so far are kept for resume"
    )


def _tile_task(spec: LayerSpec, context: _TileContext, task: _TileTask) -> tuple[int, int, int]:
    """Compute one tile, write it into the scratch and flush it.

    Returns the tile id, the peak RSS and the CRC-32 of the tile as written.
    """
    tile = task.tile
    with set_threads(_engine_threads(context.threads)):
        with open_volume(context.input, context.input_format, level=context.level) as source:
            x, compute_as = read_tile(
                source, context.in_layout, task.sample, tile, context.axes, spec.boundary
            )
        y = compute_tile(spec.layer, context.axes, x, compute_as, engine=context.engine)
    stored = context.out_layout.from_canonical(y.astype(context.dtype, copy=False))
    out_box = normalize_box(
        context.out_layout.box(task.sample, tile.out_start, tile.out_stop), context.out_layout.shape
    )
    checksum = _tile_checksum(stored, context.dtype)
    try:
        if context.scratch_format in _ZARR_SCRATCH:
            root = _level0(context.scratch, context.scratch_format)
            array = open_zarr_array(root, "r+")
            array[out_box] = stored
            fsync_box(array, root, out_box)
        else:
            shape = context.out_layout.shape
            if context.scratch_order == "F":
                # Fortran order is C order of the reversed axes.
                shape, out_box, stored = shape[::-1], out_box[::-1], stored.T
            fd = os.open(context.scratch, os.O_RDWR | getattr(os, "O_BINARY", 0))
            try:
                write_raw_box(fd, context.data_offset, shape, context.dtype, out_box, stored)
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        raise _write_failure(context.target, exc) from exc
    return task.id, peak_rss_bytes(), checksum


def _convert_task(context: _ConvertContext) -> int:
    """Write the target from the finished scratch .npy, in one process; return peak RSS."""
    if not os.path.exists(context.scratch):
        if os.path.exists(_file_path(context.target)):
            return peak_rss_bytes()  # an earlier attempt finished before its worker died
        raise VolumeError(f"{context.scratch}: the scratch output of {context.target} is missing")
    with open_volume(context.input, context.input_format, level=context.level) as source:
        template = source.metadata
    with NpyReader(context.scratch) as scratch:
        writer = create_volume(
            context.target,
            context.out_layout.shape,
            context.dtype,
            context.output_format,
            template=template,
            affine=context.affine,
            attrs=context.attrs,
            compression=context.compression,
            overwrite=context.overwrite,
            **context.writer_options,
        )
        with writer:
            for box in context.boxes:
                writer.write(box, scratch.read(box))
            writer.commit()
    _remove(context.record)
    _remove(context.scratch)
    return peak_rss_bytes()


def _npy_header(shape: tuple[int, ...], dtype: np.dtype, order: str) -> bytes:
    """The .npy header of an array stored in C or Fortran order."""
    buffer = io.BytesIO()
    header = {
        "descr": npformat.dtype_to_descr(dtype),
        "fortran_order": order == "F",
        "shape": tuple(shape),
    }
    npformat.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _slabs(
    shape: tuple[int, ...], order: str, itemsize: int, limit: int
) -> list[tuple[slice, ...]]:
    """Boxes of at most about ``limit`` bytes covering an array, in its storage order.

    Each box is a slab of consecutive indices along one axis, whole along every
    faster-varying axis, so it is contiguous on disk and a streaming writer
    completes its data front to back.
    """
    slowest_first = list(range(len(shape))) if order == "C" else list(range(len(shape)))[::-1]

    def inner_bytes(position: int) -> int:
        return math.prod(shape[a] for a in slowest_first[position + 1 :]) * itemsize

    # Cut along the slowest axis whose faster axes together fit the limit.
    position = 0
    while position < len(shape) - 1 and inner_bytes(position) > limit:
        position += 1
    axis = slowest_first[position]
    inner = inner_bytes(position)
    thickness = max(1, limit // max(1, inner))
    outer = slowest_first[:position]
    boxes = []
    for index in itertools.product(*(range(shape[a]) for a in outer)):
        for start in range(0, shape[axis], thickness):
            box = [slice(0, n) for n in shape]
            for a, i in zip(outer, index, strict=True):
                box[a] = slice(i, i + 1)
            box[axis] = slice(start, min(start + thickness, shape[axis]))
            boxes.append(tuple(box))
    return boxes


def _exact_int(value: Any) -> bool:
    # bool is an int subclass: ``true`` must not pass for tile 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _read_record(path: str, fingerprint: str, count: int) -> dict[int, int] | None:
    """The finished tiles of a completion record and their CRC-32s, or None when not this run's.

    Only lines ``{"tile": ID, "crc32": CRC}`` with an integer tile id of this
    run and a 32-bit checksum count; a tile listed twice keeps its last checksum.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        return None
    if not isinstance(header, dict) or header.get("fingerprint") != fingerprint:
        return None
    done: dict[int, int] = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash in mid-append
        if not isinstance(entry, dict) or set(entry) != {"tile", "crc32"}:
            continue
        tile, checksum = entry["tile"], entry["crc32"]
        if _exact_int(tile) and 0 <= tile < count and _exact_int(checksum):
            if 0 <= checksum < 2**32:
                done[tile] = checksum
    return done


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _fsync_directory(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class TiledOutput:
    """One volume whose tiles are cluster tasks, written into a scratch volume beside the target.

    Made on the client: reads the input's header, plans the tiles (at least
    ``min_tiles`` when the options force no tile shape) and names the scratch
    ``.NAME.conv3dt-partial.npy`` (``.zarr``, ``.ome.zarr`` for those targets) and its
    completion record ``.NAME.conv3dt-partial.jsonl``.

    Parameters
    ----------
    spec : LayerSpec
    job : Job
        Absolute input and output paths.
    options : _Options
    min_tiles : int
        Tiles to aim for, so that every worker slot gets work.

    Raises
    ------
    ValueError
        (VolumeError, LayoutError, SpecError) when the input cannot be
        processed or the target format cannot hold the output.
    """

    def __init__(self, spec: LayerSpec, job: Job, options: _Options, *, min_tiles: int = 1) -> None:
        self.job = job
        self.options = options
        with open_volume(job.input, options.input_format, level=options.level) as source:
            setup = _setup(spec, source, job.output, options, options.tile_shape)
            batch = setup.prepared.in_layout.batch
            if options.tile_shape is None and len(setup.prepared.plan) * batch < min_tiles:
                finer = _finer_tiles(setup.prepared.plan, math.ceil(min_tiles / batch))
                setup = _setup(spec, source, job.output, options, finer)
            self.input_shape = tuple(source.shape)
            template_attrs = dict(source.metadata.attrs)
            self._template = source.metadata
        self.prepared = prepared = setup.prepared
        if options.tile_shape is None and math.prod(prepared.plan.tile_shape) < _SMALL_TILE_VOXELS:
            log.warning(
                "%s: the memory limit allows tiles of only %s voxels (%d tasks); raise "
                "--memory-limit or give --tile-shape",
                job.input,
                "x".join(map(str, prepared.plan.tile_shape)),
                len(prepared.plan) * batch,
            )
        self.format = setup.output_format
        self.output_dtype = prepared.output_dtype
        if self.format in ("npy", *_ZARR_SCRATCH) and self.output_dtype not in _FLOAT_DTYPES:
            raise VolumeError(
                f"{job.output}: {self.format} output cannot be written as dtype="
                f"{self.output_dtype}; expected one of float32, float16, float64"
            )
        if options.compression is not None and self.format != "hdf5":
            raise ValueError(
                f"`compression` applies to HDF5 only. Received compression="
                f"{options.compression!r} for {self.format} output"
            )
        if options.pyramid and self.format != "ome-zarr":
            raise ValueError(
                f"`pyramid` applies to OME-Zarr output only. Received pyramid="
                f"{options.pyramid!r} for {self.format} output"
            )
        self.storage_dtype = prepared.storage_dtype
        self.in_place = self.format in ("npy", *_ZARR_SCRATCH)
        scratch_format = self.format if self.format in _ZARR_SCRATCH else "npy"
        # A NIfTI target is stored in Fortran order: a scratch in the same order
        # lets the final copy read contiguous slabs.
        scratch_order = "F" if self.format == "nifti" else "C"
        self._header = _npy_header(prepared.out_layout.shape, self.storage_dtype, scratch_order)
        directory, name = os.path.split(os.path.abspath(_file_path(job.output)))
        extension = "ome.zarr" if scratch_format == "ome-zarr" else scratch_format
        self.scratch = os.path.join(directory, f".{name}.conv3dt-partial.{extension}")
        self.record = os.path.join(directory, f".{name}.conv3dt-partial.jsonl")
        plan = prepared.plan
        self.tasks = [
            _TileTask(index, sample, tile)
            for index, (sample, tile) in enumerate(
                (sample, tile) for sample in range(batch) for tile in plan
            )
        ]
        self.attrs = setup.attrs
        self._template_attrs = template_attrs
        self.total_voxels = batch * math.prod(plan.output_shape)
        self.finished: set[int] = set()
        self._done_voxels = 0
        self.resumed = 0
        self._record_fd: int | None = None
        self.context = _TileContext(
            input=job.input,
            input_format=options.input_format,
            target=job.output,
            scratch=self.scratch,
            scratch_format=scratch_format,
            scratch_order=scratch_order,
            data_offset=len(self._header),
            in_layout=prepared.in_layout,
            out_layout=prepared.out_layout,
            axes=plan.axes,
            dtype=self.storage_dtype,
            engine=volume_engine(spec.layer, plan.axes, batch, options.engine),
            threads=options.threads,
            level=options.level,
        )
        self.fingerprint = self._fingerprint(spec)

    def _fingerprint(self, spec: LayerSpec) -> str:
        layer = spec.layer
        weights = hashlib.sha256()
        for array in (layer.kernel, layer.bias):
            if array is not None:
                weights.update(str(array.dtype).encode())
                weights.update(np.ascontiguousarray(array).tobytes())
        status = os.stat(_file_path(self.job.input))
        prepared = self.prepared
        payload = {
            "version": __version__,
            "input": self.job.input,
            "input_size": status.st_size,
            "input_mtime_ns": status.st_mtime_ns,
            "output": self.job.output,
            "format": self.format,
            "layer": layer.get_config(),
            "weights": weights.hexdigest(),
            "in_layout": [prepared.in_layout.axes, list(prepared.in_layout.shape)],
            "out_layout": [prepared.out_layout.axes, list(prepared.out_layout.shape)],
            "tile_shape": list(prepared.plan.tile_shape),
            "dtype": str(self.storage_dtype),
            "engine": self.options.engine,
            "boundary": spec.boundary,
        }
        if self.format == "ome-zarr":
            # The scratch image is made with its pyramid's (empty) levels.
            payload["pyramid"] = self.options.pyramid
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    # -- scratch and record ---------------------------------------------

    def _scratch_intact(self) -> bool:
        if self.context.scratch_format in _ZARR_SCRATCH:
            return os.path.isdir(self.scratch)
        shape = self.prepared.out_layout.shape
        expected = self.context.data_offset + math.prod(shape) * self.storage_dtype.itemsize
        try:
            return os.path.getsize(self.scratch) == expected
        except OSError:
            return False

    def _create_scratch(self) -> None:
        shape = self.prepared.out_layout.shape
        if self.context.scratch_format == "zarr":
            # A chunk a tile: no two workers write the same chunk.
            chunks = storage_chunks(self.prepared.out_layout, self.prepared.plan.tile_shape)
            attrs = zarr_attrs(self._template_attrs, self.prepared.affine, self.attrs)
            create_zarr_array(self.scratch, shape, self.storage_dtype, chunks=chunks, attrs=attrs)
            fsync_tree(self.scratch)
            return
        if self.context.scratch_format == "ome-zarr":
            # The whole image with empty levels; tiles fill level 0, chunk a tile.
            create_ome_zarr(
                self.scratch,
                shape,
                self.storage_dtype,
                labels=self.prepared.out_layout.axes,
                template=self._template,
                affine=self.prepared.affine,
                attrs=self.attrs,
                chunks=storage_chunks(self.prepared.out_layout, self.prepared.plan.tile_shape),
                pyramid=self.options.pyramid,
            )
            fsync_tree(self.scratch)
            return
        header = self._header
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        fd = os.open(self.scratch, flags, 0o666)
        try:
            pwrite_all(fd, header, 0)
            # Full size up front (sparse), so tiles land at their offsets in any order.
            os.ftruncate(fd, len(header) + math.prod(shape) * self.storage_dtype.itemsize)
            os.fsync(fd)
        finally:
            os.close(fd)

    def start(self, resume: bool) -> int:
        """Create the scratch and record, or with ``resume`` take up a matching pair.

        Returns the number of tiles already finished.
        """
        if resume:
            recorded = _read_record(self.record, self.fingerprint, len(self.tasks))
            if recorded is not None and self._scratch_intact():
                done = self._verified(recorded)
                self.finished = done
                self._done_voxels = sum(self._voxels(i) for i in done)
                self.resumed = len(done)
                self._record_fd = os.open(self.record, os.O_WRONLY | os.O_APPEND)
                if not _ends_with_newline(self.record):
                    # A line torn by a crash would swallow the next entry appended to it.
                    os.write(self._record_fd, b"\n")
                log.info("%s: resuming, %d of %d tiles done", self.job.output, len(done), len(self))
                return self.resumed
            if os.path.exists(self.record) or os.path.exists(self.scratch):
                log.info(
                    "%s: the partial output is from other settings; starting over", self.job.output
                )
        _remove(self.record)
        _remove(self.scratch)
        self._create_scratch()
        header = {"conv3dt": "tiles", "fingerprint": self.fingerprint, "tiles": len(self.tasks)}
        fd = os.open(self.record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
        self._record_fd = fd
        self._append(header)
        _fsync_directory(os.path.dirname(self.record))
        return 0

    def _verified(self, recorded: dict[int, int]) -> set[int]:
        """The recorded tiles whose data in the scratch still has the recorded checksum.

        The others (a record line for a tile never written, a scratch damaged
        or replaced) are computed again.
        """
        layout = self.context.out_layout
        if self.context.scratch_format in _ZARR_SCRATCH:
            array = open_zarr_array(_level0(self.scratch, self.context.scratch_format), "r")
            reader = None
        else:
            reader = NpyReader(self.scratch)
        good: set[int] = set()
        try:
            for tile_id in sorted(recorded):
                task = self.tasks[tile_id]
                box = normalize_box(
                    layout.box(task.sample, task.tile.out_start, task.tile.out_stop), layout.shape
                )
                stored = reader.read(box) if reader is not None else np.asarray(array[box])
                if _tile_checksum(stored, self.storage_dtype) == recorded[tile_id]:
                    good.add(tile_id)
        finally:
            if reader is not None:
                reader.close()
        if len(good) < len(recorded):
            log.warning(
                "%s: %d of the %d tiles the resume record lists do not match the partial "
                "output; computing them again",
                self.job.output,
                len(recorded) - len(good),
                len(recorded),
            )
        return good

    def _append(self, entry: dict[str, Any]) -> None:
        assert self._record_fd is not None
        os.write(self._record_fd, (json.dumps(entry) + "\n").encode())
        os.fsync(self._record_fd)

    def record_done(self, tile_id: int, checksum: int) -> None:
        """Note a tile whose data its worker has flushed to disk, with its CRC-32."""
        if tile_id not in self.finished:
            self._append({"tile": tile_id, "crc32": checksum})
            self.finished.add(tile_id)
            self._done_voxels += self._voxels(tile_id)

    def close(self) -> None:
        """Close the completion record (the scratch stays for a resume)."""
        fd, self._record_fd = self._record_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- progress and the end -------------------------------------------

    def __len__(self) -> int:
        return len(self.tasks)

    def pending(self) -> list[_TileTask]:
        """The tiles still to compute."""
        return [task for task in self.tasks if task.id not in self.finished]

    @property
    def complete(self) -> bool:
        """Whether every tile is in the scratch."""
        return len(self.finished) == len(self.tasks)

    def _voxels(self, tile_id: int) -> int:
        return math.prod(self.tasks[tile_id].tile.out_shape)

    def done_voxels(self) -> int:
        """Output voxels (per channel) of the finished tiles."""
        return self._done_voxels

    def finish_in_place(self) -> None:
        """Rename a finished .npy, Zarr or OME-Zarr scratch onto the target, then drop the record.

        An OME-Zarr image's further levels are computed here first, from the
        finished level 0 (on the client, a chunk at a time).

        Raises
        ------
        OutputExistsError
            Without ``overwrite``, when the target exists (the scratch and
            record are then kept).
        """
        if self.context.scratch_format == "ome-zarr" and self.options.pyramid:
            write_pyramid(self.scratch)
        if self.context.scratch_format in _ZARR_SCRATCH:
            fsync_tree(self.scratch)
        else:
            fsync_path(self.scratch)
        try:
            if not self.options.overwrite:
                rename_noreplace(self.scratch, self.job.output)
            elif self.context.scratch_format in _ZARR_SCRATCH:
                replace_directory(self.scratch, self.job.output)
            else:
                os.replace(self.scratch, self.job.output)
        except FileExistsError:
            raise OutputExistsError(
                f"cannot write {self.job.output}: it exists (made while this run was "
                "writing); it was left as it is"
            ) from None
        _fsync_directory(os.path.dirname(os.path.abspath(self.job.output)))
        self.close()
        _remove(self.record)

    def convert_context(self) -> _ConvertContext:
        """What the one process that writes a NIfTI or HDF5 target needs."""
        layout = self.prepared.out_layout
        limit = self.options.memory_limit
        boxes = _slabs(
            layout.shape,
            self.context.scratch_order,
            self.storage_dtype.itemsize,
            _COPY_BYTES if limit is None else max(1, limit // 4),
        )
        return _ConvertContext(
            input=self.job.input,
            input_format=self.options.input_format,
            target=self.job.output,
            output_format=self.format,
            scratch=self.scratch,
            record=self.record,
            out_layout=layout,
            dtype=self.output_dtype,
            affine=self.prepared.affine,
            attrs=self.attrs,
            compression=self.options.compression,
            boxes=tuple(boxes),
            overwrite=self.options.overwrite,
            writer_options=writer_options(self.prepared, self.options.nifti_channels),
            level=self.options.level,
        )

    def result(self, job: Job, seconds: float, peak: int) -> RunResult:
        """The run's summary under the paths the caller gave."""
        return RunResult(
            input=job.input,
            output=job.output,
            input_shape=self.input_shape,
            output_shape=self.prepared.out_layout.shape,
            dtype=str(self.output_dtype),
            seconds=seconds,
            voxels_per_second=self.total_voxels / seconds if seconds > 0 else float("inf"),
            peak_memory_bytes=peak,
            tiles=len(self.tasks),
            extra={"mode": "tiles", "resumed_tiles": self.resumed},
        )


def _absolute(job: Job) -> Job:
    return Job(os.path.abspath(job.input), os.path.abspath(job.output))


class _Batch:
    """The client's loop: submit tasks, react to each completion, finish files."""

    def __init__(
        self,
        client: Any,
        spec: LayerSpec,
        jobs: Sequence[Job],
        options: _Options,
        *,
        keep_going: bool,
        on_result: Callable[[RunResult], None] | None,
        on_error: Callable[[Job, BaseException], None] | None,
        progress: Callable[[Job, int, int], None] | None,
    ) -> None:
        self.distributed = import_distributed()
        self.client = client
        self.spec = spec
        self.jobs = list(jobs)
        self.absolute = [_absolute(job) for job in jobs]
        self.options = options
        self.keep_going = keep_going
        self.on_result = on_result
        self.on_error = on_error
        self.progress = progress
        self.token = secrets.token_hex(4)
        self.live: dict[str, tuple[Any, tuple[Any, ...]]] = {}
        self.runs: dict[int, TiledOutput] = {}
        self.started: dict[int, float] = {}
        self.peaks: dict[int, int] = {}
        self.failed: set[int] = set()
        self.results: list[RunResult] = []
        self.queue = self.distributed.as_completed()
        self.waiting: collections.deque[tuple[tuple[Any, ...], Callable[..., Any], tuple]] = (
            collections.deque()
        )
        self.window = 1

    def _submit(
        self, tag: tuple[Any, ...], function: Callable[..., Any], *args: Any, first: bool = False
    ) -> None:
        """Queue a task; ``first`` puts it ahead of the others (a file's last step)."""
        if first:
            self.waiting.appendleft((tag, function, args))
        else:
            self.waiting.append((tag, function, args))

    def _top_up(self) -> None:
        """Hand queued tasks to the scheduler until the window is full."""
        while self.waiting and len(self.live) < self.window:
            tag, function, args = self.waiting.popleft()
            key = "-".join(["conv3dt", *(str(part) for part in tag), self.token])
            future = self.client.submit(function, *args, key=key, pure=False)
            self.live[future.key] = (future, tag)
            self.queue.add(future)

    def _spec_future(self) -> Any:
        # One task holds the layer; the scheduler can recompute it if its worker dies.
        return self.client.submit(
            _identity, self.spec, key=f"conv3dt-spec-{self.token}", pure=False
        )

    def run(self, tiled: bool, resume: bool, slots: int) -> list[RunResult]:
        self.window = slots * _TASKS_PER_SLOT
        try:
            if tiled:
                self._start_tiles(resume, slots)
            else:
                self._start_files()
            self._top_up()
            for future in self.queue:
                entry = self.live.pop(future.key, None)
                if entry is not None:
                    self._handle(future, entry[1])
                interrupt.check()
                self._top_up()
        except BaseException:
            self.waiting.clear()
            self._cancel([future for future, _ in self.live.values()])
            raise
        finally:
            for tiled_output in self.runs.values():
                tiled_output.close()
        return self.results

    def _cancel(self, futures: list[Any]) -> None:
        if futures:
            with contextlib.suppress(Exception):
                self.client.cancel(futures)

    def _ensure_built(self) -> None:
        """Draw weights (when the spec has none) once, on the client, for every task."""
        if self.spec.layer.kernel is not None:
            return
        for job in self.absolute:
            try:
                with open_volume(
                    job.input, self.options.input_format, level=self.options.level
                ) as source:
                    _setup(self.spec, source, job.output, self.options, None)
                return
            except ValueError:
                continue  # this file's own task reports it

    def _start_files(self) -> None:
        self._ensure_built()
        spec = self._spec_future()
        for index, job in enumerate(self.absolute):
            self.started[index] = time.perf_counter()
            self._submit(("file", index), _file_task, spec, job, self.options)

    def _start_tiles(self, resume: bool, slots: int) -> None:
        for index, job in enumerate(self.absolute):
            try:
                tiled_output = TiledOutput(
                    self.spec, job, self.options, min_tiles=slots * _TILES_PER_SLOT
                )
                tiled_output.start(resume)
            except Exception as error:
                self._fail(index, error)
                continue
            self.runs[index] = tiled_output
            self.started[index] = time.perf_counter()
        if not self.runs:
            return
        spec = self._spec_future()
        for index, tiled_output in self.runs.items():
            self._report_progress(index)
            pending = tiled_output.pending()
            if not pending:
                self._finish(index)
            for task in pending:
                self._submit(("tile", index, task.id), _tile_task, spec, tiled_output.context, task)

    def _report_progress(self, index: int) -> None:
        if self.progress is not None:
            tiled_output = self.runs[index]
            self.progress(self.jobs[index], tiled_output.done_voxels(), tiled_output.total_voxels)

    def _handle(self, future: Any, tag: tuple[Any, ...]) -> None:
        kind, index = tag[0], tag[1]
        if future.status == "cancelled":
            return
        if future.status == "error":
            self._fail(index, future.exception())
            return
        if kind == "file":
            result = future.result()
            remove_stale_temps(self.absolute[index].output)
            job = self.jobs[index]
            extra = {**result.extra, "mode": "files"}
            self._done(dataclasses.replace(result, input=job.input, output=job.output, extra=extra))
            return
        tiled_output = self.runs[index]
        if kind == "tile":
            tile_id, peak, checksum = future.result()
            # A tile finished after its file failed is kept for a resume all the same.
            tiled_output.record_done(tile_id, checksum)
            self.peaks[index] = max(self.peaks.get(index, 0), peak)
            if index in self.failed:
                return
            self._report_progress(index)
            if tiled_output.complete:
                self._finish(index)
            return
        self.peaks[index] = max(self.peaks.get(index, 0), future.result())
        self._tiled_done(index)

    def _finish(self, index: int) -> None:
        tiled_output = self.runs[index]
        try:
            # Each task read only its tile's part of the input: a damaged
            # .nii.gz shows only when its whole stream is checked.
            with open_volume(
                tiled_output.job.input, self.options.input_format, level=self.options.level
            ) as source:
                source.verify()
        except VolumeError as error:
            self._fail(index, error)
            return
        if not tiled_output.in_place:
            self._submit(
                ("convert", index), _convert_task, tiled_output.convert_context(), first=True
            )
            return
        try:
            tiled_output.finish_in_place()
        except VolumeError as error:
            self._fail(index, error)
            return
        except OSError as exc:
            self._fail(index, _write_failure(self.jobs[index].output, exc))
            return
        self._tiled_done(index)

    def _tiled_done(self, index: int) -> None:
        seconds = time.perf_counter() - self.started[index]
        result = self.runs[index].result(self.jobs[index], seconds, self.peaks.get(index, 0))
        self._done(result)

    def _done(self, result: RunResult) -> None:
        self.results.append(result)
        if self.on_result is not None:
            self.on_result(result)

    def _fail(self, index: int, error: BaseException) -> None:
        self.failed.add(index)
        self.waiting = collections.deque(entry for entry in self.waiting if entry[0][1] != index)
        self._cancel([future for future, tag in self.live.values() if tag[1] == index])
        if not self.keep_going:
            raise error
        if self.on_error is not None:
            self.on_error(self.jobs[index], error)


def upsample_batch(
    client: Any,
    spec: LayerSpec,
    jobs: Sequence[Job],
    *,
    input_format: str | None = None,
    output_format: str | None = None,
    output_dtype: str = "float32",
    memory_limit: int | None = None,
    four_d_as_batch: bool = False,
    compression: str | None = None,
    engine: str = "auto",
    threads: int | None = None,
    tile_shape: tuple[int, int, int] | None = None,
    split: str = "auto",
    resume: bool = False,
    keep_going: bool = False,
    overwrite: bool = True,
    nifti_channels: str = "vector",
    level: int | None = None,
    pyramid: int = 0,
    on_result: Callable[[RunResult], None] | None = None,
    on_error: Callable[[Job, BaseException], None] | None = None,
    progress: Callable[[Job, int, int], None] | None = None,
) -> list[RunResult]:
    """Apply the spec's layer to every job's input on a Dask cluster.

    Parameters
    ----------
    client : distributed.Client
    spec : LayerSpec
    jobs : sequence of Job
        Input and output paths; every output is written (callers decide about
        existing ones). Paths must be files seen by every worker under the same
        name; ``-`` (standard input or output) is refused.
    input_format, output_format, output_dtype, memory_limit, four_d_as_batch, compression, engine
        As for :func:`conv3dt.run.upsample_file`; ``memory_limit`` is per task.
    threads : int, optional
        Engine threads per task (default: the worker's cores divided by its threads).
    tile_shape : three ints, optional
        Force the tile shape (tests and benchmarks).
    split : {"auto", "files", "tiles"}
        Tasks are files, or tiles; "auto" splits into tiles when there are
        fewer files than worker slots.
    resume : bool
        For tiles: take up a previous run's finished tiles (see the module notes).
    keep_going : bool
        After a failure, finish the other files (reported through ``on_error``);
        otherwise the remaining tasks are cancelled and the error raised.
    overwrite : bool
        Whether outputs may replace existing files; when False, an output
        that exists once its file is finished (another process wrote it
        meanwhile) fails with :class:`conv3dt.volumes.OutputExistsError`.
    nifti_channels : {"vector", "volumes"}
        How NIfTI outputs store several channels (see :func:`conv3dt.run.writer_options`).
    level, pyramid : int
        The level of OME-Zarr inputs to read, and the levels OME-Zarr outputs
        get after level 0 (as for :func:`conv3dt.run.upsample_file`).
    on_result : callable, optional
        Called with each file's RunResult as it finishes (completion order).
    on_error : callable, optional
        Called as ``on_error(job, error)`` for each failed file under ``keep_going``.
    progress : callable, optional
        Called as ``progress(job, done_voxels, total_voxels)`` as tiles finish.

    Returns
    -------
    list of RunResult
        In completion order; ``extra["mode"]`` is "files" or "tiles", and tiled
        results have ``extra["resumed_tiles"]``.

    Raises
    ------
    ValueError
        For a bad argument or, without ``keep_going``, an input the layer cannot process.
    DaskUnavailableError
        When dask.distributed is not installed.
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}. Received split={split!r}")
    for job in jobs:
        if "-" in (job.input, job.output):
            raise ValueError(
                "a cluster cannot read standard input or write standard output; give files. "
                f"Received job={job!r}"
            )
    options = _Options(
        input_format=input_format,
        output_format=output_format,
        output_dtype=output_dtype,
        memory_limit=memory_limit,
        four_d_as_batch=four_d_as_batch,
        compression=compression,
        engine=engine,
        threads=threads,
        tile_shape=None if tile_shape is None else tuple(int(t) for t in tile_shape),  # type: ignore[arg-type]
        overwrite=overwrite,
        nifti_channels=nifti_channels,
        level=level,
        pyramid=pyramid,
    )
    batch = _Batch(
        client,
        spec,
        jobs,
        options,
        keep_going=keep_going,
        on_result=on_result,
        on_error=on_error,
        progress=progress,
    )
    slots = worker_slots(client)
    tiled = split == "tiles" or (split == "auto" and len(jobs) < slots)
    return batch.run(tiled, resume, slots)
