from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medimg.infer import main as infer_main
from tests.helpers import run_module
from tests.label.vendors import philips_volume


def _make(tmp_path, case):
    path = tmp_path / f"{case}.nii.gz"
    if case == "truncated":
        nib.save(nib.Nifti1Image(np.random.rand(16, 16, 16).astype(np.float32), np.eye(4)), str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "not_an_image":
        path.write_bytes(gzip.compress(b"hello world" * 50))
    elif case == "missing":
        pass
    elif case == "four_d":
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4)), str(path))
    elif case == "nan":
        v = np.ones((8, 8, 8), np.float32)
        v[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(v, np.eye(4)), str(path))
    elif case == "no_dicom":
        path = tmp_path / "empty_series"
        path.mkdir()
        (path / "DICOMDIR.txt").write_text("nothing")
    return path


def test_truncated_input_exits_2_with_one_line(phantom_run, tmp_path):
    bad = _make(tmp_path, "truncated")
    out = tmp_path / "out.nii.gz"
    proc = run_module("medimg.infer", "--bundle", str(phantom_run / "bundle"), "--input", str(bad),
                      "--output", str(out))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated or corrupt" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("case,problem", [
    ("empty", "file is empty"), ("not_an_image", "NIfTI"), ("missing", "no such file"),
    ("four_d", "is 4D"), ("nan", "NaN intensities"), ("no_dicom", "no images"),
])
def test_bad_inputs_in_process(phantom_run, tmp_path, capsys, case, problem):
    bad = _make(tmp_path, case)
    out = tmp_path / "out.nii.gz"
    code = infer_main(["--bundle", str(phantom_run / "bundle"), "--input", str(bad), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"error: {bad}") and problem in err[-1]
    assert not out.exists()


def test_folder_with_one_bad_file_leaves_no_outputs(phantom_run, phantom_manifest, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a_good.nii.gz").write_bytes((phantom_manifest.parent / "img00.nii.gz").read_bytes())
    (inputs / "b_bad.nii.gz").write_bytes(b"")
    out = tmp_path / "out"
    code = infer_main(["--bundle", str(phantom_run / "bundle"), "--input", str(inputs), "--output", str(out)])
    assert code == 2 and "b_bad.nii.gz: file is empty" in capsys.readouterr().err
    assert not list(out.glob("*.nii.gz"))


@pytest.mark.parametrize("case", ["truncated", "nan", "empty"])
def test_input_errors_come_before_the_network_loads(phantom_run, tmp_path, capsys, monkeypatch, case):
    import medimg.bundle.loader as loader

    def forbidden(*args, **kwargs):
        raise AssertionError("the bundle's network was loaded before the input was checked")

    monkeypatch.setattr(loader, "load_bundle_network", forbidden)
    bad = _make(tmp_path, case)
    code = infer_main(["--bundle", str(phantom_run / "bundle"), "--input", str(bad), "--output",
                       str(tmp_path / "o.nii.gz")])
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {bad}")


def test_a_bug_while_handling_a_user_error_keeps_its_traceback():
    from medimg.errors import DataError, run_cli

    def body():
        try:
            raise DataError("scan.nii.gz", "bad file")
        except DataError:
            return {}["missing"]  # a genuine bug in the error path: never printed as a user mistake

    with pytest.raises(KeyError):
        run_cli(body)

    def wrapped():
        try:
            raise DataError("scan.nii.gz", "bad file")
        except DataError as exc:
            raise RuntimeError("applying transform") from exc  # MONAI's wrapping keeps the user error

    assert run_cli(wrapped) == 2


def test_a_missing_input_is_reported_before_monai_or_torch_import(phantom_run, tmp_path):
    """The fast start: reading the bundle's metadata and checking the input import neither MONAI nor PyTorch."""
    code = ("import sys; from medimg.infer import main; "
            f"rc = main(['--bundle', {str(phantom_run / 'bundle')!r}, '--input', {str(tmp_path / 'no.nii.gz')!r}, "
            f"'--output', {str(tmp_path / 'o.nii.gz')!r}]); "
            "print('LOADED', sorted(m for m in ('monai', 'torch', 'lightning') if m in sys.modules)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "no such file" in proc.stderr and "LOADED []" in proc.stdout


def test_lean_monai_import_hides_only_unused_packages():
    """medimg.fastimport: MONAI imports without Transformers / ITK / pandas, which stay importable after."""
    code = ("import sys; from medimg.fastimport import import_monai_lean, HIDDEN; import_monai_lean(); "
            "import monai.transforms, monai.inferers; "
            "print('HIDDEN_LOADED', [m for m in HIDDEN if m in sys.modules]); "
            "import pandas; print('PANDAS', pandas.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HIDDEN_LOADED []" in proc.stdout and "PANDAS pandas" in proc.stdout


def test_set_overrides_a_bundle_setting_for_one_run_and_refuses_what_it_lacks(phantom_run, phantom_manifest,
                                                                               tmp_path, capsys):
    """``--set KEY=VALUE`` is ``monai.bundle run --KEY VALUE`` for medimg.infer: the folder stays as it is."""
    import json

    from medimg.bundle.loader import load_bundle

    bundle = phantom_run / "bundle"
    config = bundle / "configs" / "inference.json"
    before = config.read_bytes()
    image = phantom_manifest.parent / json.loads(phantom_manifest.read_text())["validation"][0]["image"]
    flip = not json.loads(before)["intensity_refinement"]
    plain, other = tmp_path / "plain.nii.gz", tmp_path / "other.nii.gz"
    assert infer_main(["--bundle", str(bundle), "--input", str(image), "--output", str(plain)]) == 0
    assert infer_main(["--bundle", str(bundle), "--input", str(image), "--output", str(other),
                       "--set", f"intensity_refinement={json.dumps(flip)}", "--set", "overlap=0.5"]) == 0
    a, b = (np.asarray(nib.load(str(p)).dataobj) for p in (plain, other))
    assert a.shape == b.shape and not np.array_equal(a, b)  # the refinement really switched
    predictor = load_bundle(bundle, "cpu", {"intensity_refinement": flip, "overlap": 0.5})
    np.testing.assert_array_equal(np.asarray(predictor.predict(str(image)).array), b)
    assert config.read_bytes() == before
    capsys.readouterr()
    for setting, problem in (("nosuch=1", "has no setting 'nosuch'"), ("network_def=1", "network_def"),
                             ("oops", "is not KEY=VALUE"), ("overlap=5", "'overlap' must be < 1, got 5"),
                             ("intensity_refinement=maybe", "must be true or false"),
                             ("roi_size=[64,64]", "must be a list of 3 numbers")):
        out = tmp_path / "bad.nii.gz"
        code = infer_main(["--bundle", str(bundle), "--input", str(image), "--output", str(out), "--set", setting])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error:") and problem in err[-1], err
        assert not out.exists()


def test_dicom_slice_without_orientation_exits_2_naming_file_and_tag(tmp_path, capsys):
    """A real Philips series with one slice stripped of ImageOrientationPatient: one line, exit 2, no output."""
    stripped = philips_volume(tmp_path / "series", "ImageOrientationPatient", 4)[4]
    out = tmp_path / "seg.nii.gz"
    code = infer_main(["--bundle", "tissue_t1", "--input", str(tmp_path / "series"), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {stripped}: slice has no ImageOrientationPatient (0020,0037)")
    assert not out.exists()


SIGTERM_MIDWAY = """
import os, signal, sys, time
from medimg.errors import atomic_output, exit_on_sigterm
if sys.argv[2] == "installed":
    exit_on_sigterm()  # what python -m medimg.infer / medimg.export / medimg.label serve do first
with atomic_output(sys.argv[1]) as tmp:
    tmp.write_text("half an output")
    os.kill(os.getpid(), signal.SIGTERM)  # kill, docker stop, a scheduler's preemption
    time.sleep(30)
"""


@pytest.mark.parametrize("handler", ["installed", "default"])
def test_sigterm_midway_leaves_no_partial_output(tmp_path, handler):
    out = tmp_path / "out" / "seg.nii.gz"
    proc = subprocess.run([sys.executable, "-c", SIGTERM_MIDWAY, str(out), handler], capture_output=True, text=True,
                          timeout=120)
    left = sorted(p.name for p in out.parent.iterdir())
    if handler == "installed":
        assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert left == []  # neither the output nor its partial file
    else:  # Python's default: the process ends on the spot, the partial file stays (why the CLIs install it)
        assert proc.returncode == -15 and len(left) == 1 and ".partial-" in left[0]


CONSOLE_SCRIPT = """
import runpy, signal, sys
from medimg.errors import _exit_for_signal
module, func, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [module, *args]
try:
    if func == "-m":  # python -m MODULE
        runpy.run_module(module, run_name="__main__")
    else:  # what pip's console-script wrapper does: sys.exit(func())
        sys.exit(getattr(__import__(module, fromlist=[func]), func)())
except SystemExit as exc:
    print("exit", exc.code, "handler", signal.getsignal(signal.SIGTERM) is _exit_for_signal)
"""


@pytest.mark.parametrize("script,args", [("medimg-infer", ["--bundle", "nosuch", "--input", "x", "--output", "y"]),
                                         ("medimg-export", ["nosuch", "--out", "y"])])
def test_console_scripts_install_the_sigterm_handler_like_python_m(tmp_path, script, args):
    """``medimg-infer`` / ``medimg-export`` (pyproject's console scripts) leave through the clean-ups on SIGTERM."""
    import tomllib

    from tests.helpers import REPO

    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][script]
    module, func = entry.split(":")
    for how in (func, "-m"):
        proc = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, module, how, *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout.split() == ["exit", "2", "handler", "True"], (how, proc.stdout, proc.stderr[-2000:])


@pytest.mark.parametrize("where", ["pseudo file system", "under a file", "preview under a file", "folder mode",
                                   "--keep-going"])
def test_an_unwritable_output_is_one_line_before_the_network_loads(tmp_path, capsys, monkeypatch, where):
    """``--output /proc/nope/x.nii.gz`` or a path under a file: exit 2 naming it, before any inference."""
    import medimg.bundle.loader as loader

    def forbidden(*args, **kwargs):
        raise AssertionError("the bundle's network was loaded before the output was checked")

    monkeypatch.setattr(loader, "load_bundle_network", forbidden)
    (tmp_path / "in").mkdir()
    image = tmp_path / "in" / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), str(image))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    out, extra = a_file / "x.nii.gz", []
    if where == "pseudo file system":
        out = "/proc/nope/x.nii.gz"
    elif where == "preview under a file":
        out, extra = tmp_path / "ok.nii.gz", ["--preview", str(a_file / "p.png")]
    elif where in ("folder mode", "--keep-going"):
        image, out = tmp_path / "in", a_file / "sub"
        extra = ["--keep-going"] if where == "--keep-going" else []
    bad = extra[-1] if where.startswith("preview") else str(out)
    code = infer_main(["--bundle", "tissue_t1", "--input", str(image), "--output", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {bad}: cannot be written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "in"]  # nothing created


def test_a_failed_atomic_write_is_a_config_error_naming_the_path(tmp_path):
    from medimg.errors import ConfigError, atomic_output

    (tmp_path / "a_file").write_text("x")
    for target, why in ((tmp_path / "a_file" / "o.json", "a_file is a file, not a folder"),
                        (Path("/proc/nope/o.json"), "No such file or directory")):
        with pytest.raises(ConfigError, match=why) as err, atomic_output(target) as tmp:
            tmp.write_text("{}")
        assert err.value.path == str(target)
    with pytest.raises(FileNotFoundError), atomic_output(tmp_path / "o.json"):
        open(tmp_path / "missing" / "input")  # not the output's own failure: left as it is


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_while_writing_is_one_line_naming_the_output(tmp_path):
    """write() and close() report ENOSPC / EDQUOT / EIO without a file name: still the output's own failure."""
    from medimg.errors import ConfigError, atomic_output
    from medimg.io.image import Image

    image = Image(np.zeros((4, 4, 4), np.float32), np.eye(4), Path("x"), "memory")
    writers = {"metrics.json": lambda tmp: tmp.write_text("{}" * 10_000),
               "seg.nii.gz": lambda tmp: image.to_nibabel().to_filename(str(tmp))}
    for name, write in writers.items():
        target = tmp_path / name
        with pytest.raises(ConfigError, match="No space left on device") as err, atomic_output(target) as tmp:
            os.symlink("/dev/full", tmp)  # the disk is full: every write() fails with ENOSPC
            write(tmp)
        assert err.value.path == str(target) and not target.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary left behind


def test_a_bad_input_leaves_no_empty_preview_folder(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = _make(inputs, "truncated")
    code = infer_main(["--bundle", "tissue_t1", "--input", str(inputs), "--output", str(tmp_path / "out"),
                       "--preview", str(tmp_path / "png")])
    assert code == 2 and capsys.readouterr().err.strip().startswith(f"error: {bad}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
