"""The command line: a working run, and a one-line error with exit code != 0 and no output for each bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from TumorPersonalizationLib.cli import main
from TumorPersonalizationLib.geometry import Geometry, Volume

GEOMETRY = Geometry((12, 14, 16), (1.5, 1.5, 1.5), (-10.0, 5.0, 3.0))


@pytest.fixture
def labelmap(tmp_path):
    labels = np.zeros(GEOMETRY.shape_kji, np.uint8)
    labels[1:-1, 1:-1, 1:-1] = 1
    labels[2:-2, 2:-2, 2:-2] = 2
    labels[3:-3, 3:-3, 3:-3] = 3
    path = tmp_path / "tissue.nii.gz"
    Volume(labels, GEOMETRY).save(path)
    return path


def seed_at(kji):
    return [f"{x:.3f}" for x in GEOMETRY.index_kji_to_ras(kji)]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def simulate_args(tissue, out, seed=None, mu_d="4", mu_rho="2"):
    return ["simulate", "--tissue", tissue, "--seed-ras", *(seed or seed_at((6, 7, 8))), "--mu-d", mu_d,
            "--mu-rho", mu_rho, "--out", out, "--quiet"]


def test_simulate_writes_concentration_on_tissue_grid(labelmap, tmp_path, capsys):
    out = tmp_path / "c.nii.gz"
    picture = tmp_path / "c.png"
    code, stdout, _ = run(simulate_args(labelmap, out) + ["--picture", picture], capsys)
    assert code == 0
    result = Volume.load(out)
    assert result.geometry.same_grid(GEOMETRY, tolerance_mm=1e-4)
    assert 0.0 <= result.array.min() and result.array.max() <= 1.0 and result.array[6, 7, 8] > 0.3
    assert json.loads(stdout)["mu_d_mm"] == 4.0
    assert picture.stat().st_size > 10_000


def test_simulate_with_probability_maps_and_working_grid(tmp_path, capsys):
    maps = {}
    wm = np.zeros(GEOMETRY.shape_kji, np.float32)
    wm[2:-2, 2:-2, 2:-2] = 0.9
    for name, array in (("wm", wm), ("gm", 0.1 * (wm > 0)), ("csf", 1.0 - wm - 0.1 * (wm > 0))):
        maps[name] = tmp_path / f"{name}.nrrd"
        Volume(array.astype(np.float32), GEOMETRY).save(maps[name])
    out = tmp_path / "c.mha"
    code, _, err = run(["simulate", "--wm", maps["wm"], "--gm", maps["gm"], "--csf", maps["csf"], "--seed-ras",
                        *seed_at((6, 7, 8)), "--mu-d", "3", "--mu-rho", "2", "--out", out, "--spacing", "3"],
                       capsys)
    assert code == 0, err
    coarse = Volume.load(out)
    assert coarse.geometry.same_grid(GEOMETRY, tolerance_mm=1e-4)
    assert "simulating" in err  # the progress bar
    native_out = tmp_path / "native.nii.gz"
    code, _, err = run(["simulate", "--wm", maps["wm"], "--gm", maps["gm"], "--csf", maps["csf"], "--seed-ras",
                        *seed_at((6, 7, 8)), "--mu-d", "3", "--mu-rho", "2", "--out", native_out, "--quiet"], capsys)
    native = Volume.load(native_out).array
    assert code == 0, err
    # A 2x coarser grid on this tiny domain (6x7x8 voxels) moves the front by up to a coarse voxel, so compare shapes.
    brain = wm > 0
    assert np.corrcoef(coarse.array[brain], native[brain])[0, 1] > 0.8 and coarse.array[6, 7, 8] > 0.3


def _nan_maps(tmp_path):
    paths = []
    for name in ("wm", "gm", "csf"):
        array = np.full(GEOMETRY.shape_kji, 0.3, np.float32)
        if name == "gm":
            array[3, 3, 3] = np.nan
        paths.append(tmp_path / f"{name}.nrrd")  # ITK's NIfTI reader turns NaN into 0; NRRD keeps it
        Volume(array, GEOMETRY).save(paths[-1])
    return paths


def _mismatched_maps(tmp_path):
    paths = []
    for name, shape in (("wm", GEOMETRY.shape_kji), ("gm", (12, 14, 17)), ("csf", GEOMETRY.shape_kji)):
        geometry = Geometry(shape, GEOMETRY.spacing_ijk_mm, GEOMETRY.origin_ras_mm)
        paths.append(tmp_path / f"{name}.nii.gz")
        Volume(np.full(shape, 0.3, np.float32), geometry).save(paths[-1])
    return paths


@pytest.mark.parametrize("case, message", [
    ("missing file", "file not found"),
    ("unreadable image", "cannot read image"),
    ("seed in CSF", "not in grey or white matter"),
    ("seed outside image", "outside the image"),
    ("mu_D too large", "mu_D = 99 mm is outside its bounds"),
    ("negative mu_rho", "mu_rho = -1 is outside its bounds"),
    ("NaN in input", "NaN"),
    ("mismatched grids", "does not match"),
    ("bad output format", "unsupported output format"),
    ("cuda missing", "no CUDA device"),
    ("missing option", "required"),
    ("2-D probability map", "expected a 3-D image"),
    ("picture is a directory", "output path is a directory"),
    ("output under a file", "is not a directory"),
    ("two-file output format", "unsupported output format"),
])
def test_bad_input_one_line_error_nonzero_exit_nothing_written(case, message, labelmap, tmp_path, capsys):
    out = tmp_path / "out" / "c.nii.gz"
    args = simulate_args(labelmap, out)
    if case == "missing file":
        args = simulate_args(tmp_path / "nope.nii.gz", out)
    elif case == "unreadable image":
        garbage = tmp_path / "garbage.nii.gz"
        garbage.write_bytes(b"this is not an image" * 10)
        args = simulate_args(garbage, out)
    elif case == "seed in CSF":
        args = simulate_args(labelmap, out, seed=seed_at((1, 1, 1)))
    elif case == "seed outside image":
        args = simulate_args(labelmap, out, seed=["500", "0", "0"])
    elif case == "mu_D too large":
        args = simulate_args(labelmap, out, mu_d="99")
    elif case == "negative mu_rho":
        args = simulate_args(labelmap, out, mu_rho="-1")
    elif case in ("NaN in input", "mismatched grids"):
        wm, gm, csf = _nan_maps(tmp_path) if case == "NaN in input" else _mismatched_maps(tmp_path)
        args = ["simulate", "--wm", wm, "--gm", gm, "--csf", csf, "--seed-ras", *seed_at((6, 7, 8)), "--mu-d", "4",
                "--mu-rho", "2", "--out", out]
    elif case == "bad output format":
        out = tmp_path / "out" / "c.png"
        args = simulate_args(labelmap, out)
    elif case == "cuda missing":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")  # only reachable on a GPU machine; CI has none
        args = simulate_args(labelmap, out) + ["--device", "cuda"]
    elif case == "missing option":
        args = ["simulate", "--tissue", labelmap, "--mu-d", "4", "--mu-rho", "2", "--out", out]
    elif case == "2-D probability map":
        flat = tmp_path / "flat.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(np.full((5, 6), 0.3, np.float32)), str(flat))
        args = ["simulate", "--wm", flat, "--gm", flat, "--csf", flat, "--seed-ras", "0", "0", "0", "--mu-d", "4",
                "--mu-rho", "2", "--out", out]
    elif case == "picture is a directory":
        (tmp_path / "pictures").mkdir()
        args = simulate_args(labelmap, out) + ["--picture", tmp_path / "pictures"]
    elif case == "output under a file":
        blocker = tmp_path / "out"
        blocker.write_text("a file where a folder is expected")
        out = blocker / "c.nii.gz"
        args = simulate_args(labelmap, out)
    elif case == "two-file output format":
        out = tmp_path / "out" / "c.mhd"
        args = simulate_args(labelmap, out)
    with pytest.raises(SystemExit) if case == "missing option" else _no_raise() as raised:
        code, _, err = run(args, capsys)
    if case == "missing option":
        code, err = raised.value.code, capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 or case == "missing option", err
    assert message in lines[-1], err
    assert not out.exists()
    if case != "output under a file":
        assert not (out.parent.exists() and any(out.parent.iterdir()))


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_failed_write_leaves_nothing(labelmap, tmp_path, capsys, monkeypatch):
    def broken_write(image, path, *args):
        with open(path, "wb") as stream:
            stream.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        main([str(a) for a in simulate_args(labelmap, out_dir / "c.nii.gz")])
    assert list(out_dir.iterdir()) == []


def test_console_entry_point_help_and_error():
    for command in ([], ["simulate"], ["personalize"], ["demo"], ["batch"]):
        result = subprocess.run([sys.executable, "-m", "TumorPersonalizationLib.cli", *command, "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout
    result = subprocess.run([sys.executable, "-m", "TumorPersonalizationLib.cli", "simulate", "--tissue", "missing.nii",
                             "--seed-ras", "0", "0", "0", "--mu-d", "5", "--mu-rho", "2", "--out", "x.nii.gz"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "tumor-personalization: error: file not found: missing.nii"
