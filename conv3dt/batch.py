"""Turn command-line inputs (files, directories, globs) into (input, output) pairs."""

from __future__ import annotations

import glob
import os
import re
import string
from dataclasses import dataclass

from conv3dt.validation import excerpt

__all__ = [
    "FORMAT_EXTENSIONS",
    "NAME_FIELDS",
    "BatchError",
    "Job",
    "check_name_template",
    "expand_inputs",
    "format_of",
    "plan_jobs",
    "split_extension",
    "strip_dataset",
]

FORMAT_EXTENSIONS = {
    "npy": ".npy",
    "nifti": ".nii.gz",
    "hdf5": ".h5",
    "zarr": ".zarr",
    "ome-zarr": ".ome.zarr",
    "tiff": ".tif",
}
_EXTENSIONS = (
    ".nii.gz",
    ".nii",
    ".npy",
    ".h5",
    ".hdf5",
    ".ome.zarr",
    ".zarr",
    ".ome.tiff",
    ".ome.tif",
    ".tiff",
    ".tif",
)
_FORMATS = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".npy": "npy",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".zarr": "zarr",
    ".ome.zarr": "ome-zarr",
    ".ome.tiff": "tiff",
    ".ome.tif": "tiff",
    ".tiff": "tiff",
    ".tif": "tiff",
}


#: The fields a ``--name`` template may use.
NAME_FIELDS = ("stem", "ext", "name", "index", "dataset")
# A file name is at most 255 bytes: no width or precision needs more.
_MAX_NAME_BYTES = 255
# Python's format specification mini-language, without nested fields.
_FORMAT_SPEC = re.compile(
    r"(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d+)?[_,]?(?:\.(?P<precision>\d+))?[bcdeEfFgGnosxX%]?",
    re.DOTALL,
)


class BatchError(ValueError):
    """Inputs or outputs that cannot be processed as asked."""


@dataclass(frozen=True)
class Job:
    """One input volume and where its result goes."""

    input: str
    output: str


def strip_dataset(path: str) -> str:
    """Drop an HDF5 ``:/dataset`` suffix."""
    lowered = path.lower()
    for ext in (".h5:", ".hdf5:"):
        index = lowered.find(ext)
        if index != -1:
            return path[: index + len(ext) - 1]
    return path


def split_extension(path: str) -> tuple[str, str]:
    """Split a volume path into (stem, extension), knowing ``.nii.gz``.

    An HDF5 ``:/dataset`` suffix is ignored.
    """
    name = os.path.basename(strip_dataset(path).rstrip("/"))
    lowered = name.lower()
    for ext in _EXTENSIONS:
        if lowered.endswith(ext):
            return name[: -len(ext)], name[-len(ext) :]
    stem, ext = os.path.splitext(name)
    return stem, ext


def format_of(path: str) -> str | None:
    """The format a path's extension implies, or None."""
    return _FORMATS.get(split_extension(path)[1].lower())


def _is_volume_entry(path: str) -> bool:
    """A volume file, or a Zarr array or OME-Zarr image (which are directories)."""
    kind = format_of(path)
    if kind in ("zarr", "ome-zarr"):
        return os.path.isdir(path)
    return kind is not None and os.path.isfile(path)


def expand_inputs(items: list[str]) -> list[str]:
    """Expand directories (their volumes, sorted) and glob patterns, keep order, drop repeats.

    A ``.zarr`` or ``.ome.zarr`` directory is a volume, not a directory of volumes.

    Raises
    ------
    BatchError
        For a pattern that matches nothing or a path that does not exist.
    """
    found: list[str] = []
    for item in items:
        if item == "-":
            found.append(item)
            continue
        base = strip_dataset(item)
        if os.path.isdir(item) and format_of(item) not in ("zarr", "ome-zarr"):
            entries = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if _is_volume_entry(os.path.join(item, name))
            )
            if not entries:
                raise BatchError(
                    f"{item}: directory holds no .npy, .nii, .nii.gz, .h5, .zarr, .ome.zarr "
                    "or .tif volumes"
                )
            found.extend(entries)
        elif os.path.exists(base):
            found.append(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise BatchError(f"{item}: pattern matches no files")
            found.extend(matches)
        else:
            raise BatchError(f"{item}: no such file")
    unique: list[str] = []
    seen: set[str] = set()
    for path in found:
        key = (
            path
            if path == "-"
            else os.path.realpath(strip_dataset(path)) + path[len(strip_dataset(path)) :]
        )
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def check_name_template(template: str) -> None:
    """Refuse a ``--name`` template before anything is formatted with it.

    Only the fields :func:`plan_jobs` fills are allowed, without attribute or
    index lookups, and format widths and precisions stay within a file name's
    length: ``{index:>2000000000}`` would otherwise build a 2 GB string.

    Raises
    ------
    BatchError
        Naming the template (a bounded excerpt) and what is wrong with it.
    """
    shown = excerpt(template)
    fields = ", ".join(f"{{{name}}}" for name in NAME_FIELDS)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise BatchError(f"--name {shown}: {exc}") from None
    for _text, field, spec, _conversion in parts:
        if field is None:
            continue
        if field not in NAME_FIELDS:
            raise BatchError(f"--name {shown}: unknown field {excerpt(field)}; use {fields}")
        match = _FORMAT_SPEC.fullmatch(spec or "")
        numbers = [] if match is None else [n for n in match.group("width", "precision") if n]
        if match is None or any(len(n) > 3 or int(n) > _MAX_NAME_BYTES for n in numbers):
            raise BatchError(
                f"--name {shown}: format {excerpt(spec)} of {{{field}}} is not a plain format "
                f"with width and precision up to {_MAX_NAME_BYTES}"
            )


def plan_jobs(
    inputs: list[str],
    *,
    output: str | None,
    output_dir: str | None,
    name_template: str = "{stem}_up{ext}",
    output_format: str | None = None,
) -> list[Job]:
    """Pair inputs with outputs: ``-o`` for one input, else ``--output-dir`` and a name template.

    Template fields: ``{stem}`` (file name without extension), ``{ext}`` (the
    input's extension, or the output format's), ``{name}`` (the whole file
    name), ``{index}`` (position in the batch, from 0) and ``{dataset}`` (the
    HDF5 dataset an input names after ``:``, its ``/`` replaced by ``_``, empty
    for other inputs).

    Raises
    ------
    BatchError
        For a missing or conflicting destination, a bad template, two inputs
        mapped to one output, or an output equal to an input.
    """
    if (output is None) == (output_dir is None):
        raise BatchError("give exactly one of -o/--output and --output-dir")
    if output is not None and len(inputs) != 1:
        raise BatchError(f"-o/--output takes a single input, got {len(inputs)}; use --output-dir")
    jobs: list[Job] = []
    if output is not None:
        jobs.append(Job(inputs[0], output))
    else:
        assert output_dir is not None
        check_name_template(name_template)
        for index, path in enumerate(inputs):
            if path == "-":
                raise BatchError("stdin ('-') needs -o/--output")
            stem, ext = split_extension(path)
            if output_format is not None:
                ext = FORMAT_EXTENSIONS[output_format]
            try:
                name = name_template.format(
                    stem=stem,
                    ext=ext,
                    name=os.path.basename(strip_dataset(path)),
                    index=index,
                    dataset=path[len(strip_dataset(path)) + 1 :].strip("/").replace("/", "_"),
                )
            except ValueError as exc:
                # The fields are known (checked above), but a format code may not
                # suit the value: {stem:d}.
                raise BatchError(f"--name {excerpt(name_template)}: {exc}") from None
            if not name or os.sep in name or len(os.fsencode(name)) > _MAX_NAME_BYTES:
                raise BatchError(
                    f"--name {excerpt(name_template)} gives an invalid file name {excerpt(name)}"
                    f" (empty, with {os.sep!r} or longer than {_MAX_NAME_BYTES} bytes)"
                )
            jobs.append(Job(path, os.path.join(output_dir, name)))
    targets: dict[str, str] = {}
    sources = {os.path.realpath(strip_dataset(job.input)) for job in jobs if job.input != "-"}
    for job in jobs:
        if job.output == "-":
            continue
        real = os.path.realpath(strip_dataset(job.output))
        if real in sources:
            raise BatchError(f"{job.output}: output would overwrite an input")
        if real in targets:
            other = targets[real]
            same_file = os.path.realpath(strip_dataset(other)) == os.path.realpath(
                strip_dataset(job.input)
            )
            fields, field = (
                ("{dataset} or {index}", "dataset") if same_file else ("{index}", "index")
            )
            raise BatchError(
                f"{job.output}: both {other} and {job.input} would be written there; tell them "
                f"apart in --name with {fields}, e.g. --name '{{stem}}_{{{field}}}_up{{ext}}'"
            )
        targets[real] = job.input
    return jobs


def output_exists(path: str) -> bool:
    """Whether an output target already exists (``-`` never does).

    Any entry counts, a dangling symbolic link included: writing there would
    replace the link.
    """
    return path != "-" and os.path.lexists(strip_dataset(path))
