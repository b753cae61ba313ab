"""``conv3dt``'s error and status messages: each names the input, field or option to change."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from _cli_helpers import run_cli, write_spec
from click.testing import CliRunner
from conv3dt_cli.main import main
from test_cli import _assert_clean_failure

from conv3dt import Conv3DTranspose


@pytest.fixture()
def one_channel(tmp_path: Path) -> tuple[Path, Path]:
    """A spec with a kernel for one input channel, and a 3D .npy volume."""
    spec = write_spec(tmp_path, Conv3DTranspose(1, 2, strides=2), 1)
    volume = tmp_path / "v.npy"
    np.save(volume, np.ones((4, 4, 4), np.float32))
    return spec, volume


def _spec_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ("layer: {filters: 1, kernel: 2}\n", "'kernel' (did you mean 'kernel_size'?)"),
        ("layer: {filters: 1, kernel_size: 2, stride: 2}\n", "'stride' (did you mean 'strides'?)"),
        ("layr: {filters: 1, kernel_size: 2}\n", "'layr' (did you mean 'layer'?)"),
        (
            "layer: {filters: 1, kernel_size: 2}\nweights: {kernal: kernel.npy}\n",
            "'kernal' (did you mean 'kernel'?)",
        ),
    ],
)
def test_unknown_spec_keys_get_a_suggestion(tmp_path, one_channel, text, suggestion):
    _, volume = one_channel
    spec = _spec_text(tmp_path, text)
    result = run_cli("upsample", str(volume), "--spec", str(spec), "-o", str(tmp_path / "o.npy"))
    _assert_clean_failure(result, 2, "typo.yaml", suggestion)


def test_a_4d_nifti_in_a_batch_names_the_file_and_both_fixes(tmp_path, one_channel):
    spec, _ = one_channel
    series = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4)), series)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    result = run_cli(
        "upsample",
        str(tmp_path / "a.nii.gz"),
        str(series),
        "--spec",
        str(spec),
        "--output-dir",
        str(tmp_path / "out"),
    )
    _assert_clean_failure(
        result, 2, "series.nii.gz: the volume has 2 channel(s)", "--4d-as-batch", "--in-channels 2"
    )
    inspected = run_cli("inspect", "--spec", str(spec), "--input", str(series))
    _assert_clean_failure(inspected, 2, "series.nii.gz:", "--4d-as-batch")


def test_a_batch_with_channels_names_the_file_and_init(tmp_path, one_channel):
    spec, _ = one_channel
    np.save(tmp_path / "batch.npy", np.ones((2, 4, 4, 4, 3), np.float32))
    result = run_cli(
        "upsample", str(tmp_path / "batch.npy"), "--spec", str(spec), "-o", str(tmp_path / "o.npy")
    )
    _assert_clean_failure(result, 2, "batch.npy: the volume has 3 channel(s)", "--in-channels 3")
    assert "--4d-as-batch" not in result.output


def test_a_volume_of_the_wrong_rank_is_named(tmp_path, one_channel):
    spec, _ = one_channel
    np.save(tmp_path / "flat.npy", np.ones((4, 4), np.float32))
    result = run_cli(
        "upsample", str(tmp_path / "flat.npy"), "--spec", str(spec), "-o", str(tmp_path / "o.npy")
    )
    _assert_clean_failure(result, 2, "flat.npy: expected a 3D volume")


def test_a_layer_of_a_larger_model_warns_that_only_it_is_applied(tmp_path, caplog):
    model = Path(__file__).parent / "fixtures" / "keras" / "functional.keras"
    np.save(tmp_path / "in.npy", np.ones((4, 5, 6, 3), np.float32))
    args = ["--keras-model", str(model), "--layer", "up_cf", "-o", str(tmp_path / "o.npy")]
    result = run_cli("upsample", str(tmp_path / "in.npy"), *args)
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"warning: {model}: only its layer 'up_cf' (layer 2 of 5 in the model) is applied, "
        "not the whole model"
    ]


def _lines(result) -> list[str]:
    return [line for line in result.output.strip().splitlines() if line.strip()]


def test_an_existing_output_is_one_line_without_usage(tmp_path, one_channel):
    spec, volume = one_channel
    (tmp_path / "o.npy").write_bytes(b"keep")
    result = run_cli("upsample", str(volume), "--spec", str(spec), "-o", str(tmp_path / "o.npy"))
    assert result.exit_code == 2
    assert _lines(result) == [
        f"conv3dt: error: {tmp_path / 'o.npy'} exists; give --overwrite to replace it "
        "or --skip-existing to keep it"
    ]


def test_command_line_mistakes_use_the_same_style(tmp_path, one_channel):
    spec, volume = one_channel
    result = run_cli("upsample", str(volume), "--sped", str(spec), "-o", str(tmp_path / "o.npy"))
    assert result.exit_code == 2
    first, second = _lines(result)
    assert first == (
        "conv3dt: error: No such option '--sped'. (Did you mean one of: '--seed', '--shard', "
        "'--spec'?)"
    )
    # The program's name is the runner's here, "conv3dt" when installed.
    assert re.fullmatch(r"  see '\S+ upsample --help'", second)


def test_engine_choices_are_in_help_and_checked_by_click(tmp_path, one_channel):
    from conv3dt.engine import ENGINES

    shown = run_cli("upsample", "--help")
    assert f"--engine [{'|'.join(ENGINES)}]" in shown.output
    spec, volume = one_channel
    result = run_cli(
        "upsample", str(volume), "--spec", str(spec), "--engine", "fast", "-o", "o.npy"
    )
    _assert_clean_failure(result, 2, "'--engine'", "'fast' is not one of 'auto'")


@pytest.mark.parametrize(
    ("name", "kind"), [("three.nii.gz", "gzip (a .nii.gz?)"), ("three.nii", "NIfTI")]
)
def test_stdin_names_what_it_got_instead_of_npy(tmp_path, one_channel, name, kind):
    spec, _ = one_channel
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / name)
    result = CliRunner().invoke(
        main,
        ["upsample", "-", "--spec", str(spec), "-o", str(tmp_path / "o.npy")],
        input=(tmp_path / name).read_bytes(),
    )
    _assert_clean_failure(
        result,
        2,
        f"stdin takes an .npy stream only; got {kind} data: give the file path instead",
    )


def test_stdin_with_another_format_names_the_option(tmp_path, one_channel):
    spec, volume = one_channel
    result = CliRunner().invoke(
        main,
        ["upsample", "-", "--input-format", "nifti", "--spec", str(spec), "-o", "o.npy"],
        input=volume.read_bytes(),
    )
    _assert_clean_failure(result, 2, "stdin ('-') takes an .npy stream only", "--input-format")
    assert "`format`" not in result.output


def test_binary_output_to_a_terminal_is_refused(tmp_path, one_channel, monkeypatch):
    from conv3dt_cli import upsample

    monkeypatch.setattr(upsample, "_is_terminal", lambda stream: True)
    spec, volume = one_channel
    result = run_cli("upsample", str(volume), "--spec", str(spec), "-o", "-")
    _assert_clean_failure(result, 2, "-o -", "stdout, which is a terminal")


def test_an_unknown_output_extension_names_output_format(tmp_path, one_channel):
    spec, volume = one_channel
    result = run_cli("upsample", str(volume), "--spec", str(spec), "-o", str(tmp_path / "x.nifti"))
    _assert_clean_failure(result, 2, "x.nifti", "--output-format")


def _two_datasets(tmp_path: Path) -> Path:
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as handle:
        handle["t1/raw"] = np.ones((4, 4, 4), np.float32)
        handle["t2/raw"] = np.ones((4, 4, 4), np.float32)
    return path


def test_two_datasets_of_one_file_into_one_name_suggest_a_field(tmp_path, one_channel):
    spec, _ = one_channel
    scan = _two_datasets(tmp_path)
    out = tmp_path / "out"
    inputs = [f"{scan}:/t1/raw", f"{scan}:/t2/raw"]
    result = run_cli("upsample", *inputs, "--spec", str(spec), "--output-dir", str(out))
    _assert_clean_failure(result, 2, "scan_up.h5", "--name", "{index}", "{dataset}")
    named = run_cli(
        "upsample", *inputs, "--spec", str(spec), "--output-dir", str(out), "--name", "{dataset}.h5"
    )
    assert named.exit_code == 0, named.output
    assert sorted(p.name for p in out.iterdir()) == ["t1_raw.h5", "t2_raw.h5"]


def test_a_successful_run_at_a_terminal_ends_with_a_summary(tmp_path, one_channel, monkeypatch):
    from conv3dt_cli import upsample

    spec, volume = one_channel
    args = ["upsample", str(volume), "--spec", str(spec), "-o", str(tmp_path / "o.npy")]
    piped = run_cli(*args)
    assert piped.exit_code == 0 and "wrote" not in piped.output
    monkeypatch.setattr(upsample, "_is_terminal", lambda stream: True)
    quiet = run_cli(*args, "--overwrite", "-q")
    assert quiet.exit_code == 0 and "wrote" not in quiet.output
    shown = run_cli(*args, "--overwrite")
    assert shown.exit_code == 0
    assert re.fullmatch(r"conv3dt: wrote 1 output in \d+\.\d s", _lines(shown)[-1])


def test_an_unknown_input_extension_names_input_format(tmp_path, one_channel):
    spec, volume = one_channel
    (tmp_path / "v.dat").write_bytes(volume.read_bytes())
    args = [str(tmp_path / "v.dat"), "--spec", str(spec), "--output-dir", str(tmp_path / "out")]
    _assert_clean_failure(run_cli("upsample", *args), 2, "v.dat:", "--input-format")
    both = run_cli("upsample", *args, "--input-format", "npy", "--output-format", "npy")
    assert both.exit_code == 0, both.output
