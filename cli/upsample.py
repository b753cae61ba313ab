"""``conv3dt upsample``: the batch loop around :func:`conv3dt.run.upsample_file`."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from conv3dt_cli import errors

log = logging.getLogger("conv3dt")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let a scheduler's SIGTERM unwind like Ctrl-C, so partial outputs are removed."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner's thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
) -> int:
    """Process every input; return the exit code."""
    from conv3dt.batch import expand_inputs, output_exists, plan_jobs
    from conv3dt.engine import ENGINES
    from conv3dt.plan import parse_memory
    from conv3dt.run import upsample_file

    if engine not in ENGINES:
        raise click.BadParameter(f"expected one of {', '.join(ENGINES)}", param_hint="--engine")
    limit = None
    if memory_limit is not None:
        try:
            limit = parse_memory(memory_limit)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--memory-limit") from None
    jobs = plan_jobs(
        expand_inputs(inputs),
        output=output,
        output_dir=output_dir,
        name_template=name_template,
        output_format=output_format,
    )
    layer_spec = layer_spec_loader()
    if output_dir is not None:
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as exc:
            raise click.UsageError(
                f"--output-dir {output_dir}: cannot create it ({exc.strerror})"
            ) from None
    todo = []
    for job in jobs:
        if output_exists(job.output):
            if skip_existing:
                log.info("skipping %s: %s exists", job.input, job.output)
                continue
            if not overwrite:
                raise click.UsageError(
                    f"{job.output} exists; use --overwrite to replace it "
                    "or --skip-existing to keep it"
                )
        todo.append(job)
    from conv3dt.engine.threads import set_threads

    set_threads(threads)
    show = not quiet and sys.stderr.isatty()
    files_bar, voxel_bar = _progress_bars(show, len(todo))
    failures: list[tuple[str, BaseException]] = []
    with _sigterm_as_interrupt():
        for job in todo:
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
                    four_d_as_batch=four_d_as_batch,
                    compression=compression,
                    engine=engine,
                    progress=progress,
                )
            except KeyboardInterrupt:
                raise
            except Exception as error:
                if bar is not None:
                    bar.close()
                if not keep_going:
                    raise
                errors.report(error, debug)
                failures.append((job.input, error))
                continue
            finally:
                if bar is not None:
                    bar.close()
            if files_bar is not None:
                files_bar.update(1)
            if as_json:
                click.echo(json.dumps(result.as_json()))
            log.info(
                "%s: %.2f s, %.3g voxels/s", job.output, result.seconds, result.voxels_per_second
            )
    if files_bar is not None:
        files_bar.close()
    if failures:
        click.echo(f"conv3dt: {len(failures)} of {len(todo)} input(s) failed:", err=True)
        for path, error in failures:
            click.echo(f"  {path}: {errors.message_for(error)}", err=True)
        return errors.EXIT_FAILURE
    return 0
