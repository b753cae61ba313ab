"""``conv3dt upsample``: the batch loop around :func:`conv3dt.run.upsample_file`."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import click
from conv3dt_cli import errors

log = logging.getLogger("conv3dt")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let a scheduler's SIGTERM unwind like Ctrl-C, so partial outputs are removed.

    Both signals also record the request, which the writer threads poll: they
    stop within a write rather than at the end of it. A request that reached
    no code able to act on it (a KeyboardInterrupt swallowed in a ``__del__``
    near the end of the run) still ends the command as interrupted.
    """

    from conv3dt import interrupt

    interrupt.clear()

    def handler(signum: int, frame: Any) -> None:
        interrupt.request()
        raise KeyboardInterrupt

    def unraisable(report: Any) -> None:
        # An interrupt raised inside a __del__ is recorded above and acted on
        # below; Python's own report of it would be a stray traceback.
        if not issubclass(report.exc_type, KeyboardInterrupt):
            hook(report)

    try:
        previous = {number: signal.signal(number, handler) for number in _STOP_SIGNALS}
    except ValueError:  # not the main thread (e.g. inside a test runner's thread)
        yield
        return
    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for number, earlier in previous.items():
            signal.signal(number, earlier)
    interrupt.check()


def _progress_bars(enabled: bool, total_files: int) -> tuple[Any, Callable[[str], Any]]:
    if not enabled:
        return None, lambda name: None
    from tqdm import tqdm

    files = (
        tqdm(total=total_files, unit="file", desc="files", position=0, file=sys.stderr)
        if total_files > 1
        else None
    )

    def voxel_bar(name: str) -> Any:
        return tqdm(
            total=0,
            unit="vox",
            unit_scale=True,
            desc=os.path.basename(name),
            position=1 if files is not None else 0,
            leave=False,
            file=sys.stderr,
        )

    return files, voxel_bar


def run_upsample(
    inputs: list[str],
    *,
    layer_spec_loader: Callable[[], Any],
    output: str | None,
    output_dir: str | None,
    name_template: str,
    input_format: str | None,
    output_format: str | None,
    output_dtype: str,
    four_d_as_batch: bool,
    memory_limit: str | None,
    compression: str | None,
    engine: str,
    threads: int | None,
    overwrite: bool,
    skip_existing: bool,
    keep_going: bool,
    as_json: bool,
    quiet: bool,
    debug: bool,
    shard: str | None = None,
    tile_shape: str | None = None,
    dask_address: str | None = None,
    dask_scheduler_file: str | None = None,
    protected: tuple[str | None, ...] = (),
    nifti_channels: str = "vector",
    level: int | None = None,
    pyramid: int = 0,
) -> int:
    """Process every input (or this shard's); return the exit code.

    ``protected`` are the files the layer comes from (the spec, model file,
    model config); no output may be written onto them, nor onto the spec's
    weight files.
    """
    from conv3dt.batch import expand_inputs, output_exists, plan_jobs
    from conv3dt.commit import Committer
    from conv3dt.plan import parse_memory
    from conv3dt.run import upsample_file

    started = time.perf_counter()
    _check_streams(inputs, output, input_format, output_format)
    on_cluster = dask_address is not None or dask_scheduler_file is not None
    if on_cluster:
        _check_cluster_options(dask_address, dask_scheduler_file)
    chosen_shard = _parse_shard(shard, output_dir)
    limit = None
    if memory_limit is not None:
        try:
            limit = parse_memory(memory_limit)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--memory-limit") from None
    tiles = None if tile_shape is None else _parse_tile_shape(tile_shape)
    jobs = plan_jobs(
        expand_inputs(inputs),
        output=output,
        output_dir=output_dir,
        name_template=name_template,
        output_format=output_format,
    )
    _check_extensions(jobs, input_format, output_format)
    _check_ngff_options(jobs, input_format, output_format, level, pyramid)
    if chosen_shard is not None:
        jobs = _select_shard(jobs, *chosen_shard)
    if on_cluster and any("-" in (job.input, job.output) for job in jobs):
        raise click.UsageError("--dask works on files; '-' (stdin, stdout) cannot be used with it")
    layer_spec = layer_spec_loader()
    _refuse_clobbering(jobs, (*protected, *getattr(layer_spec, "files", ())))
    if output_dir is not None:
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as exc:
            raise errors.CommandError(
                f"--output-dir {output_dir}: cannot create it ({exc.strerror})"
            ) from None
    todo = []
    for job in jobs:
        if output_exists(job.output):
            if skip_existing:
                log.info("skipping %s: %s exists", job.input, job.output)
                continue
            if not overwrite:
                raise errors.CommandError(
                    f"{job.output} exists; give --overwrite to replace it "
                    "or --skip-existing to keep it"
                )
            _refuse_replacing_a_directory(job.output, output_format)
        todo.append(job)
    show = not quiet and _is_terminal(sys.stderr)
    if on_cluster:
        code = _run_on_cluster(
            todo,
            layer_spec,
            dask_address=dask_address,
            dask_scheduler_file=dask_scheduler_file,
            run_options={
                "input_format": input_format,
                "output_format": output_format,
                "output_dtype": output_dtype,
                "memory_limit": limit,
                "tile_shape": tiles,
                "four_d_as_batch": four_d_as_batch,
                "nifti_channels": nifti_channels,
                "level": level,
                "pyramid": pyramid,
                "compression": compression,
                "engine": engine,
                "threads": threads,
                "overwrite": overwrite,
            },
            resume=skip_existing,
            keep_going=keep_going,
            as_json=as_json,
            show=show,
            debug=debug,
        )
        return _finish(code, len(todo), len(jobs), started, show)
    from conv3dt.engine.threads import set_threads

    set_threads(threads)
    files_bar, voxel_bar = _progress_bars(show, len(todo))
    failures: list[tuple[str, BaseException]] = []
    results: dict[int, Any] = {}

    def settled(index: int, error: BaseException | None) -> None:
        # A file is reported once its output is complete (committed), in order.
        job = todo[index]
        if error is not None:
            if not keep_going:
                raise error
            errors.report(error, debug)
            failures.append((job.input, error))
            return
        result = results.pop(index, None)
        if files_bar is not None:
            files_bar.update(1)
        if result is None:  # stopped between handing the output over and returning
            return
        if as_json:
            click.echo(json.dumps(result.as_json()))
        log.info("%s: %.2f s, %.3g voxels/s", job.output, result.seconds, result.voxels_per_second)

    # In a batch each output is made durable and renamed while the next file is
    # read and computed; a single file is finished before upsample_file returns.
    committer = Committer(settled) if len(todo) > 1 else None
    with _sigterm_as_interrupt(), committer or nullcontext():
        for index, job in enumerate(todo):
            bar = voxel_bar(job.input)

            def progress(done: int, total: int, bar: Any = bar) -> None:
                if bar is not None:
                    bar.total = total
                    bar.n = done
                    bar.refresh()

            log.info("%s -> %s", job.input, job.output)
            try:
                result = upsample_file(
                    layer_spec,
                    job.input,
                    job.output,
                    input_format=input_format,
                    output_format=output_format,
                    output_dtype=output_dtype,
                    memory_limit=limit,
                    tile_shape=tiles,
                    four_d_as_batch=four_d_as_batch,
                    compression=compression,
                    engine=engine,
                    progress=progress,
                    overwrite=overwrite,
                    nifti_channels=nifti_channels,
                    level=level,
                    pyramid=pyramid,
                    committer=committer,
                    commit_key=index,
                )
            except KeyboardInterrupt:
                raise
            except Exception as error:
                if bar is not None:
                    bar.close()
                if not keep_going:
                    raise
                if committer is not None:
                    committer.wait()  # the earlier file's outcome is reported first
                errors.report(error, debug)
                failures.append((job.input, error))
                continue
            finally:
                if bar is not None:
                    bar.close()
            results[index] = result
            if committer is None:
                settled(index, None)
    if files_bar is not None:
        files_bar.close()
    return _finish(_summary(failures, len(todo)), len(todo), len(jobs), started, show)


def _refuse_clobbering(jobs: list[Any], sources: tuple[str | None, ...]) -> None:
    """Refuse outputs onto the files the layer was read from, whatever --overwrite says.

    Paths are compared after resolving symbolic links, so a link to the spec
    counts as the spec.
    """
    from conv3dt.batch import strip_dataset

    protected = {os.path.realpath(strip_dataset(path)) for path in sources if path}
    for job in jobs:
        if job.output == "-":
            continue
        if os.path.realpath(strip_dataset(job.output)) in protected:
            raise errors.CommandError(
                f"{job.output}: the layer is read from this file, so it cannot be an output "
                "(not even with --overwrite); choose another output"
            )


def _refuse_replacing_a_directory(output: str, output_format: str | None) -> None:
    """--overwrite replaces a Zarr store, never an ordinary directory."""
    from conv3dt.batch import format_of, strip_dataset
    from conv3dt.volumes.zarr import is_zarr_store

    path = strip_dataset(output)
    if not os.path.isdir(path) or os.path.islink(path):
        return
    if (output_format or format_of(output)) in ("zarr", "ome-zarr") and is_zarr_store(path):
        return
    raise errors.CommandError(
        f"{output} is a directory that is not a Zarr store; --overwrite replaces only "
        "files and Zarr stores, so remove it yourself or choose another output"
    )


def _check_ngff_options(
    jobs: list[Any],
    input_format: str | None,
    output_format: str | None,
    level: int | None,
    pyramid: int,
) -> None:
    """Refuse --level for inputs and --pyramid for outputs that are not OME-Zarr."""
    from conv3dt.batch import format_of

    for job in jobs:
        if level is not None and (input_format or format_of(job.input)) != "ome-zarr":
            raise click.UsageError(
                f"--level picks a level of an OME-Zarr input, and {job.input} is not one "
                "(.ome.zarr, or --input-format ome-zarr)"
            )
        if pyramid and (output_format or format_of(job.output)) != "ome-zarr":
            raise click.UsageError(
                f"--pyramid adds levels to an OME-Zarr output, and {job.output} is not one "
                "(name it .ome.zarr, or give --output-format ome-zarr)"
            )


def _is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (one function, for tests to stand in for one)."""
    return stream.isatty()


def _check_streams(
    inputs: list[str], output: str | None, input_format: str | None, output_format: str | None
) -> None:
    """Refuse what ``-`` (an .npy stream on stdin or stdout) cannot do, before any work."""
    if "-" in inputs and input_format not in (None, "npy"):
        raise click.UsageError(
            f"stdin ('-') takes an .npy stream only, not --input-format {input_format}; "
            "give the file path instead"
        )
    if output != "-":
        return
    if output_format not in (None, "npy"):
        raise click.UsageError(
            f"-o - writes an .npy stream only, not --output-format {output_format}; "
            "give a file name instead"
        )
    if sys.stdout is None:  # Python's stand-in when the process began with fd 1 closed
        raise click.UsageError(
            "-o - writes an .npy stream to stdout, which is closed; give a file name instead"
        )
    if _is_terminal(sys.stdout):
        raise click.UsageError(
            "-o - writes binary .npy data to stdout, which is a terminal; redirect it "
            "(> out.npy), pipe it into a command, or give a file name"
        )


def _check_extensions(jobs: list[Any], input_format: str | None, output_format: str | None) -> None:
    """Every file's extension must name its format, unless its format option gives it.

    Inputs first: an input's unknown extension is also its default output name's.
    """
    from conv3dt.batch import format_of

    for job in jobs:
        if input_format is None and job.input != "-" and format_of(job.input) is None:
            raise click.UsageError(
                f"{job.input}: no volume format has this extension; give --input-format "
                "with the format it holds"
            )
    for job in jobs:
        if output_format is None and job.output != "-" and format_of(job.output) is None:
            raise click.UsageError(
                f"{job.output}: no volume format has this extension; name it .npy, .nii, "
                ".nii.gz, .h5, .hdf5, .zarr, .ome.zarr, .tif or .ome.tif, or give --output-format"
            )


def _finish(code: int, written: int, planned: int, started: float, show: bool) -> int:
    """Say at a terminal what a successful run wrote and how long it took; return ``code``."""
    if code == 0 and show:
        skipped = f" ({planned - written} skipped: they exist)" if planned > written else ""
        plural = "" if written == 1 else "s"
        seconds = time.perf_counter() - started
        click.echo(f"conv3dt: wrote {written} output{plural}{skipped} in {seconds:.1f} s", err=True)
    return code


def _summary(failures: list[tuple[str, BaseException]], total: int) -> int:
    if failures:
        click.echo(f"conv3dt: {len(failures)} of {total} input(s) failed:", err=True)
        for path, error in failures:
            message = errors.message_for(error).splitlines()[0]
            # Most messages about an input start with its path already.
            if not message.startswith(f"{path}:"):
                message = f"{path}: {message}"
            click.echo(f"  {message}", err=True)
        return errors.EXIT_FAILURE
    return 0


def _parse_tile_shape(text: str) -> tuple[int, int, int]:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise click.BadParameter(
            f"{text!r}: expected three positive integers D,H,W (or one for all three)",
            param_hint="--tile-shape",
        )
    return int(parts[0]), int(parts[1]), int(parts[2])


def _parse_shard(shard: str | None, output_dir: str | None) -> tuple[int, int] | None:
    """The shard to process: --shard, else a SLURM array task's (batches only), else None."""
    from conv3dt.shard import ShardError, parse_shard, shard_from_environment

    if shard is not None:
        try:
            return parse_shard(shard)
        except ShardError as exc:
            raise click.BadParameter(str(exc), param_hint="--shard") from None
    if output_dir is None:
        # A single -o output in an array task is that task's own file, not a shard of one.
        return None
    try:
        found = shard_from_environment()
    except ShardError as exc:
        raise click.UsageError(str(exc)) from None
    if found is not None:
        log.info("SLURM array task: shard %d/%d", *found)
    return found


def _select_shard(jobs: list[Any], index: int, count: int) -> list[Any]:
    from conv3dt.shard import select_shard, shard_key

    selected = select_shard(jobs, index, count, key=lambda job: shard_key(job.input))
    log.info("shard %d/%d: %d of %d input(s)", index, count, len(selected), len(jobs))
    return selected


def _check_cluster_options(dask_address: str | None, dask_scheduler_file: str | None) -> None:
    from conv3dt.distributed import DaskUnavailableError, import_distributed, local_workers

    if dask_address is not None and dask_scheduler_file is not None:
        raise click.UsageError("--dask and --dask-scheduler-file exclude each other")
    if dask_address is not None:
        try:
            local_workers(dask_address)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--dask") from None
    option = "--dask" if dask_address is not None else "--dask-scheduler-file"
    try:
        import_distributed()
    except DaskUnavailableError as exc:
        raise click.UsageError(f"{option}: {exc}") from None


def _run_on_cluster(
    todo: list[Any],
    layer_spec: Any,
    *,
    dask_address: str | None,
    dask_scheduler_file: str | None,
    run_options: dict[str, Any],
    resume: bool,
    keep_going: bool,
    as_json: bool,
    show: bool,
    debug: bool,
) -> int:
    """The batch on a Dask cluster: progress and JSON lines as tasks complete."""
    from conv3dt.batch import output_exists
    from conv3dt.distributed import connect, remove_stale_temps, upsample_batch

    if not todo:
        return 0
    failures: list[tuple[str, BaseException]] = []
    files_bar, voxel_bar = _progress_bars(show, len(todo))
    voxels = voxel_bar("voxels")
    # Tiles of several files may be in flight at once: one bar sums them.
    counts: dict[str, tuple[int, int]] = {}

    def progress(job: Any, done: int, total: int) -> None:
        counts[job.output] = (done, total)
        if voxels is not None:
            voxels.total = sum(t for _, t in counts.values())
            voxels.n = sum(d for d, _ in counts.values())
            voxels.refresh()

    def on_result(result: Any) -> None:
        if files_bar is not None:
            files_bar.update(1)
        if as_json:
            click.echo(json.dumps(result.as_json()))
        log.info(
            "%s: %.2f s, %.3g voxels/s", result.output, result.seconds, result.voxels_per_second
        )

    def on_error(job: Any, error: BaseException) -> None:
        errors.report(error, debug)
        failures.append((job.input, error))

    # Dask's own messages duplicate the errors reported here; show them with -vv only.
    dask_level = logging.INFO if log.getEffectiveLevel() <= logging.DEBUG else logging.CRITICAL
    logging.getLogger("distributed").setLevel(dask_level)
    session = connect(
        dask_address,
        scheduler_file=dask_scheduler_file,
        log_level=dask_level,
        task_memory=run_options["memory_limit"],
    )
    try:
        with _sigterm_as_interrupt(), session:
            log.info("Dask cluster: %s", session.client)
            try:
                upsample_batch(
                    session.client,
                    layer_spec,
                    todo,
                    **run_options,
                    resume=resume,
                    keep_going=keep_going,
                    on_result=on_result,
                    on_error=on_error,
                    progress=progress,
                )
            except KeyboardInterrupt:
                if session.owns_workers:
                    # The workers are gone once the cluster closes: whatever
                    # temporary files they were writing are orphans now.
                    session.close()
                    for job in todo:
                        if not output_exists(job.output):
                            remove_stale_temps(job.output)
                raise
    finally:
        for bar in (voxels, files_bar):
            if bar is not None:
                bar.close()
    return _summary(failures, len(todo))
