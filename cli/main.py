"""The ``conv3dt`` command: parse, call the library, print, choose an exit code.

Exit codes: 0 success, 1 runtime failure, 2 usage error or invalid spec/input,
130 interrupted. Heavy modules are imported inside the commands so that
``conv3dt --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click
from conv3dt_cli import errors

log = logging.getLogger("conv3dt")

_FORMATS = click.Choice(["npy", "nifti", "hdf5", "zarr", "ome-zarr", "tiff"])
_OUTPUT_DTYPES = click.Choice(["float32", "float16", "float64", "int16", "uint8"])
# conv3dt.engine.ENGINES, written out so that --help does not import the engines.
_ENGINES = click.Choice(["auto", "gemm", "numba", "numpy", "separable"])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("conv3dt")
    except PackageNotFoundError:
        return "unknown"


def _debug_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")(function)


def _model_options(function: Callable[..., Any]) -> Callable[..., Any]:
    function = click.option(
        "--layer",
        "layer_name",
        metavar="NAME",
        help="Name of the Conv3DTranspose layer in --keras-model (optional when it has one).",
    )(function)
    function = click.option(
        "--model-config",
        type=click.Path(dir_okay=False),
        metavar="JSON",
        help="The model's config (model.to_json() saved to a file), for a weights-only "
        "--keras-model such as a Keras 2 save_weights .h5; instead of --spec.",
    )(function)
    function = click.option(
        "--keras-model",
        type=click.Path(dir_okay=False),
        help="A Keras model file (.keras, legacy .h5) to take the layer and weights from; "
        "or a weights-only .weights.h5, with --spec for the layer config.",
    )(function)
    function = click.option(
        "--spec",
        type=click.Path(dir_okay=False),
        help="Layer spec (YAML or JSON): Keras layer arguments, weight files, seed.",
    )(function)
    function = click.option(
        "--boundary",
        type=click.Choice(["zeros", "replicate", "reflect", "symmetric"]),
        default=None,
        help="What lies beyond the volume's edges: zeros (Keras's padding) or the edge "
        "voxels replicated, reflected or mirrored (default: the spec's, else zeros; "
        "replicate for presets).",
    )(function)
    return function


def _with_boundary(layer_spec: Any, boundary: str | None) -> Any:
    """``layer_spec`` with the command line's --boundary, when one was given."""
    if boundary is not None:
        layer_spec.boundary = boundary
    return layer_spec


def _load_layer_spec(
    spec: str | None,
    keras_model: str | None,
    layer_name: str | None,
    seed: int | None = None,
    model_config: str | None = None,
) -> Any:
    """The layer from --spec, --keras-model, or a weights-only model file and its config.

    A weights-only file (``model.save_weights``) records no layer config: a spec
    supplies the layer's, or ``--model-config`` the model's (``model.to_json()``,
    which a Keras 2 ``.h5`` of weights needs, as it does not even record the
    layers' classes). The spec must then leave out ``weights``, since the file's
    weights and the spec's would compete. A full model file has its own config,
    so a spec or model config beside it is refused rather than ignored or merged.
    """
    if model_config is not None and (keras_model is None or spec is not None):
        raise click.UsageError(
            "--model-config goes with --keras-model (a weights-only file), instead of --spec"
        )
    if spec is None and keras_model is None:
        raise click.UsageError(
            "give --spec, --keras-model, or both (a .weights.h5 file and the spec of its layer)"
        )
    if layer_name is not None and keras_model is None:
        raise click.UsageError("--layer needs --keras-model")
    from conv3dt.spec import LayerSpec, SpecError, load_spec

    if keras_model is None:
        loaded = load_spec(spec)
        if seed is not None:
            loaded.seed = seed
        return loaded
    from conv3dt.keras_file import KerasFileError, load_layer

    if model_config is not None:
        layer = load_layer(keras_model, layer_name, model_config=model_config)
        return LayerSpec(
            layer=layer, source=f"{keras_model} (model config: {model_config})", seed=seed
        )
    if spec is None:
        try:
            layer = load_layer(keras_model, layer_name)
        except KerasFileError:
            # Reading the layer's entry alone tells a weights-only file (no config).
            if _stored_config(keras_model, layer_name) is not None:
                raise
            raise KerasFileError(
                f"{keras_model} holds weights only, not the layer's config (filters, "
                "kernel_size, ...)\n  give the config with --spec SPEC (a spec with a "
                "'layer' entry and no 'weights') or --model-config MODEL.json"
            ) from None
        return LayerSpec(layer=layer, source=str(keras_model), seed=seed)
    loaded = load_spec(spec)
    stored_config = _stored_config(keras_model, layer_name)
    if stored_config is not None:
        raise KerasFileError(
            f"{keras_model} is a model file with the layer's own config, which --spec "
            f"{spec} would contradict\n  use --spec only with a weights-only file "
            "(.weights.h5), or leave it out"
        )
    if loaded.layer.built:
        raise SpecError(
            f"{spec} gives weights and so does --keras-model {keras_model}\n  remove the "
            "spec's 'weights' entry: with a .weights.h5 file the spec gives the layer config only"
        )
    layer = load_layer(keras_model, layer_name, layer_config=loaded.layer.get_config())
    return LayerSpec(layer=layer, source=f"{keras_model} (layer config: {spec})", seed=seed)


def _stored_config(keras_model: str, layer_name: str | None) -> Any:
    """The layer's config as the file records it; None for a weights-only file."""
    from conv3dt.keras_file import KerasFileError, is_legacy_weights_only, load_keras_layer

    if is_legacy_weights_only(keras_model):
        raise KerasFileError(
            f"{keras_model} is a Keras 2 weights-only .h5, which does not record the "
            "layers' classes\n  give the model's config with --model-config MODEL.json "
            "(model.to_json() saved to a file)"
        )
    return load_keras_layer(keras_model, layer_name)[0]


class _OneLineError(click.ClickException):
    """A Click error shown as ``conv3dt: error: ...``, like every other error."""

    def __init__(self, error: click.ClickException) -> None:
        super().__init__(error.format_message())
        self.exit_code = error.exit_code
        ctx = getattr(error, "ctx", None)
        self.hint = f"see '{ctx.command_path} --help'" if ctx is not None else None

    def show(self, file: Any = None) -> None:
        click.echo(f"conv3dt: error: {self.format_message()}", file=file, err=file is None)
        if self.hint is not None:
            click.echo(f"  {self.hint}", file=file, err=file is None)


# Click 8.2 and later show a group's help through this "error" when no command is given.
_HELP_SHOWN = getattr(click.exceptions, "NoArgsIsHelpError", ())


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except (_OneLineError, _HELP_SHOWN):
        raise
    except click.ClickException as error:
        raise _OneLineError(error) from error


class _Main(click.Group):
    """The command group, its and its commands' Click errors in conv3dt's one style."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    if quiet:
        level = logging.ERROR
    logging.basicConfig(level=level, format="conv3dt: %(message)s", stream=sys.stderr)
    if not quiet and sys.stderr.isatty():
        # A first run that compiles kernels sits silent for seconds otherwise.
        from conv3dt.engine.numba_cache import COMPILE_LOGGER

        logging.getLogger(COMPILE_LOGGER).setLevel(logging.INFO)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    version=None, package_name="conv3dt", prog_name="conv3dt", message="%(prog)s %(version)s"
)
def main() -> None:
    """Apply a trained Keras Conv3DTranspose layer to NIfTI, HDF5 and .npy volumes.

    Exit codes: 0 success, 1 runtime failure, 2 usage error or invalid
    spec/input, 130 interrupted.
    """


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@_model_options
@click.option(
    "-o",
    "--output",
    metavar="PATH",
    help="Output file for a single input ('-' for an .npy stream on stdout).",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    help="Directory for the outputs of many inputs.",
)
@click.option(
    "--name",
    "name_template",
    default="{stem}_up{ext}",
    show_default=True,
    help="Output name template for --output-dir: {stem}, {ext}, {name}, {index}, {dataset} "
    "(an HDF5 input's dataset path, '/' replaced by '_').",
)
@click.option(
    "--input-format", type=_FORMATS, help="Read inputs as this format, whatever their extension."
)
@click.option(
    "--output-format", type=_FORMATS, help="Write outputs as this format, whatever their extension."
)
@click.option(
    "--output-dtype",
    type=_OUTPUT_DTYPES,
    default="float32",
    show_default=True,
    help="Storage dtype; int16 and uint8 are NIfTI only (with scl_slope/scl_inter).",
)
@click.option(
    "--4d-as-batch",
    "four_d_as_batch",
    is_flag=True,
    help="Treat a 4D NIfTI series as a batch of single-channel volumes.",
)
@click.option(
    "--nifti-channels",
    type=click.Choice(["vector", "volumes"]),
    default="vector",
    show_default=True,
    help="How a NIfTI output stores several channels: a 5D vector image (intent vector), "
    "or a 4th dimension as in a series.",
)
@click.option(
    "--level",
    type=click.IntRange(min=0),
    help="Read this level of OME-Zarr inputs' multiscale image (default 0, full resolution).",
)
@click.option(
    "--pyramid",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Add N downsampled levels to OME-Zarr outputs, each the 2x2x2 mean of the one before.",
)
@click.option(
    "--memory-limit",
    metavar="SIZE",
    help="Memory the tiles in flight may use, e.g. 512M or 2G "
    "(default: a quarter of available memory).",
)
@click.option("--compression", type=click.Choice(["gzip", "lzf"]), help="HDF5 output compression.")
@click.option(
    "--engine",
    type=_ENGINES,
    default="auto",
    show_default=True,
    help="Force an engine implementation (auto picks per layer and shape).",
)
@click.option("--threads", type=click.IntRange(min=1), help="Engine threads (default: all cores).")
@click.option(
    "--seed", type=click.IntRange(min=0), help="Seed for drawn weights (overrides the spec's)."
)
@click.option("--overwrite", is_flag=True, help="Replace outputs that already exist.")
@click.option(
    "--skip-existing", is_flag=True, help="Skip inputs whose output exists (resume a batch)."
)
@click.option(
    "--keep-going", is_flag=True, help="Process the remaining inputs after a failure, then exit 1."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON line per processed file on stdout."
)
@click.option(
    "--shard",
    metavar="I/N",
    help="Process only shard I of N of the inputs (0 <= I < N); default from a SLURM job "
    "array's SLURM_ARRAY_TASK_* variables with --output-dir.",
)
@click.option(
    "--tile-shape",
    metavar="D,H,W",
    help="Force the output tile shape instead of planning it from --memory-limit "
    "(benchmarks, tests; with --dask also the tasks' size).",
)
@click.option(
    "--dask",
    "dask_address",
    metavar="ADDRESS",
    help="Run on a Dask cluster: a scheduler address (tcp://host:8786) or local:N to start "
    "N worker processes here. Needs pip install 'conv3dt[dask]'.",
)
@click.option(
    "--dask-scheduler-file",
    type=click.Path(dir_okay=False),
    help="Run on the Dask cluster whose scheduler wrote this file (dask-jobqueue, "
    "dask scheduler --scheduler-file).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or messages, errors only.")
@click.option("-v", "--verbose", count=True, help="Log what happens (-vv for more).")
@_debug_option
def upsample(
    inputs: tuple[str, ...],
    spec: str | None,
    keras_model: str | None,
    model_config: str | None,
    layer_name: str | None,
    boundary: str | None,
    seed: int | None,
    verbose: int,
    **options: Any,
) -> None:
    """Apply the layer to each INPUT volume (files, directories, globs, '-' for stdin)."""
    _configure_logging(verbose, options["quiet"])
    with errors.reporting(options["debug"]):
        from conv3dt_cli.upsample import run_upsample

        if options["overwrite"] and options["skip_existing"]:
            raise click.UsageError("--overwrite and --skip-existing exclude each other")
        if options["as_json"] and options["output"] == "-":
            raise click.UsageError("--json and -o - both write to stdout; use one of them")
        code = run_upsample(
            list(inputs),
            layer_spec_loader=lambda: _with_boundary(
                _load_layer_spec(spec, keras_model, layer_name, seed, model_config), boundary
            ),
            protected=(spec, keras_model, model_config),
            **options,
        )
        _exit(code)


@main.command()
@_model_options
@click.option(
    "--input",
    "input_path",
    metavar="VOLUME",
    help="A volume to plan for: output shape, FLOPs, memory, tiles.",
)
@click.option("--input-format", type=_FORMATS, help="Read --input as this format.")
@click.option(
    "--4d-as-batch", "four_d_as_batch", is_flag=True, help="Treat a 4D NIfTI series as a batch."
)
@click.option("--memory-limit", metavar="SIZE", help="Memory budget to plan tiles for (e.g. 512M).")
@click.option(
    "--seed", type=click.IntRange(min=0), help="Seed for drawn weights (overrides the spec's)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_debug_option
def inspect(
    spec: str | None,
    keras_model: str | None,
    model_config: str | None,
    layer_name: str | None,
    boundary: str | None,
    input_path: str | None,
    input_format: str | None,
    four_d_as_batch: bool,
    memory_limit: str | None,
    seed: int | None,
    as_json: bool,
    debug: bool,
) -> None:
    """Show the resolved layer, its weights, penalties and constraints; with --input, the plan."""
    with errors.reporting(debug):
        from conv3dt_cli.report import inspect_report, render

        from conv3dt.plan import parse_memory

        try:
            limit = None if memory_limit is None else parse_memory(memory_limit)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--memory-limit") from None
        layer_spec = _with_boundary(
            _load_layer_spec(spec, keras_model, layer_name, seed, model_config), boundary
        )
        report = inspect_report(
            layer_spec,
            input_path,
            input_format=input_format,
            four_d_as_batch=four_d_as_batch,
            memory_limit=limit,
        )
        click.echo(json.dumps(report, indent=2) if as_json else render(report))


@main.command()
@click.argument("volumes", nargs=-1, required=True)
@click.option("--input-format", type=_FORMATS, help="Read the volumes as this format.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per volume.")
@_debug_option
def info(volumes: tuple[str, ...], input_format: str | None, as_json: bool, debug: bool) -> None:
    """Describe VOLUMES: shape, dtype, axes, channels, voxel size, affine, scaling, datasets."""
    with errors.reporting(debug):
        from conv3dt_cli.report import render

        from conv3dt.volumes import describe, open_volume

        for path in volumes:
            with open_volume(path, input_format) as reader:
                description = {"path": path, **describe(reader)}
            click.echo(json.dumps(description) if as_json else render(description) + "\n")


@main.command()
@click.option(
    "-o",
    "--output",
    "spec_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Spec file to write (.yaml, .yml or .json); weights go beside it.",
)
@click.option(
    "--preset",
    type=click.Choice(["nearest", "linear"]),
    default=None,
    help="Write an interpolation spec instead of a layer with drawn weights "
    "(nearest-neighbour or linear upsampling by --factor; see the README).",
)
@click.option(
    "--factor",
    default="2",
    show_default=True,
    help="With --preset: the upsampling factor, N or D,H,W (1 leaves an axis alone).",
)
@click.option(
    "--boundary",
    type=click.Choice(["zeros", "replicate", "reflect", "symmetric"]),
    default=None,
    help="With --preset: what lies beyond the edges (default replicate).",
)
@click.option("--filters", type=int, default=None, help="Number of output channels.")
@click.option("--kernel-size", default=None, help="Kernel size: N or D,H,W.")
@click.option("--strides", default="1", show_default=True, help="Strides: N or D,H,W.")
@click.option("--padding", default="valid", show_default=True, help="valid or same.")
@click.option(
    "--output-padding", default=None, help="Output padding: N or D,H,W (default: inferred)."
)
@click.option("--dilation-rate", default="1", show_default=True, help="Dilation: N or D,H,W.")
@click.option(
    "--data-format",
    type=click.Choice(["channels_last", "channels_first"]),
    default="channels_last",
    show_default=True,
    help="Axis order of the layer's tensors.",
)
@click.option("--activation", default=None, help="Activation name (e.g. relu); default linear.")
@click.option("--use-bias/--no-use-bias", default=True, show_default=True, help="Add a bias.")
@click.option(
    "--kernel-initializer",
    default="glorot_uniform",
    show_default=True,
    help="Kernel initializer name.",
)
@click.option(
    "--bias-initializer", default="zeros", show_default=True, help="Bias initializer name."
)
@click.option(
    "--in-channels",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Input channels the drawn kernel is for.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed for the drawn weights.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing spec and weight files.")
@_debug_option
def init(spec_path: str, debug: bool, **layer_options: Any) -> None:
    """Write a spec from layer options, with weights drawn from the initializers.

    With --preset, write an interpolation spec (nearest or linear upsampling by
    --factor, one kernel per channel of --in-channels) instead.
    """
    with errors.reporting(debug):
        from conv3dt_cli.init_spec import write_preset_spec, write_spec

        context = click.get_current_context()
        given = {
            name
            for name in layer_options
            if context.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
        }
        preset = layer_options.pop("preset")
        factor = layer_options.pop("factor")
        boundary = layer_options.pop("boundary")
        if preset is not None:
            written = write_preset_spec(
                spec_path,
                preset=preset,
                factor=factor,
                boundary=boundary,
                in_channels=layer_options["in_channels"],
                overwrite=layer_options["overwrite"],
                given=given,
            )
        else:
            for option, name in (("--factor", "factor"), ("--boundary", "boundary")):
                if name in given:
                    raise click.UsageError(f"{option} goes with --preset")
            for option, name in (("--filters", "filters"), ("--kernel-size", "kernel_size")):
                if layer_options[name] is None:
                    raise click.UsageError(f"Missing option '{option}' (or give --preset)")
            written = write_spec(spec_path, **layer_options)
        for path in written:
            click.echo(f"wrote {path}", err=True)


def _exit(code: int) -> NoReturn:
    sys.exit(code)
