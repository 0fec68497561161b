"""personalize / demo / batch on the command line: outputs as one set, JSON progress, one-line errors with exit code 2
and nothing written for every bad input, a batch that survives a broken case and resumes."""
import csv
import json
import shutil

import numpy as np
import pytest

from TumorPersonalizationLib import GrowthParameters, simulate
from TumorPersonalizationLib.cli import main
from TumorPersonalizationLib.constants import DEFAULT_METHOD
from TumorPersonalizationLib.geometry import Geometry, Volume
from TumorPersonalizationLib.registry import SHIPPED_MODELS

TRUTH = GrowthParameters((28.0, -12.0, 24.0), 6.0, 2.5)
OUTPUTS = {"parameters.json", "infiltration.nii.gz", "tissue.nii.gz", "report.png", "plan_standard.nii.gz",
           "plan_model.nii.gz"}


@pytest.fixture(scope="module")
def atlas():
    from TumorPersonalizationLib.atlas import load_atlas

    return load_atlas(2)


@pytest.fixture(scope="module")
def tumor_file(atlas, tmp_path_factory):
    path = tmp_path_factory.mktemp("tumor") / "tumor.nii.gz"
    simulate(atlas, TRUTH).save(path)
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def personalize_args(tumor, out, *extra):
    return ["personalize", "--tissue", "atlas", "--tumor", tumor, "--method", "direct", "--progress", "none",
            "--out-dir", out, *extra]


def test_personalize_writes_one_set_and_json_progress(tumor_file, tmp_path, capsys):
    out = tmp_path / "result"
    code, stdout, stderr = run(personalize_args(tumor_file, out)[:-3] + ["json", "--out-dir", out], capsys)
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == OUTPUTS
    updates = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert len(updates) >= 3 and all(set(u) == {"fraction", "message"} for u in updates)
    fractions = [u["fraction"] for u in updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    summary = json.loads(stdout)
    written = json.loads((out / "parameters.json").read_text())
    assert summary["mu_d_mm"] == written["mu_d_mm"] and written["method"] == "direct"
    for key in ("seed_ras_mm", "mu_d_mm", "mu_rho", "loss", "runtime_s", "plans", "warnings", "provenance"):
        assert key in written
    assert written["plans"]["standard_cm3"] > 0
    assert written["provenance"]["models"][SHIPPED_MODELS["inverse"]]["sha256"]
    plan = Volume.load(out / "plan_model.nii.gz")
    assert set(np.unique(plan.array)) == {0, 1}


def test_close_call_options_reach_the_method_and_are_checked(tumor_file, tmp_path, capsys):
    out = tmp_path / "result"
    code, _, stderr = run(personalize_args(tumor_file, out, "--close-call-ratio", "0", "--close-call-max-runs", "2.5"),
                          capsys)
    assert code == 0, stderr
    options = json.loads((out / "parameters.json").read_text())["provenance"]["options"]
    assert options["tissue_judge_ratio"] == 0 and options["tissue_judge_max_runs"] == 2.5
    for flag, value, message in (("--close-call-ratio", "0.5", "must be 0 (off) or >= 1"),
                                 ("--close-call-max-runs", "0", "must be >= 1 run")):
        bad = tmp_path / f"bad{flag}"
        code, _, stderr = run(personalize_args(tumor_file, bad, flag, value), capsys)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
        assert not bad.exists()


def _write(tmp_path, name, array, geometry):
    path = tmp_path / name
    Volume(array, geometry).save(path)
    return path


@pytest.mark.parametrize("case, message", [
    ("empty", "the tumor image is empty"),
    ("outside_brain", "the tumor lies outside the brain"),
    ("no_overlap", "does not overlap the tissue image in space"),
    ("above_one", "must lie in [0, 1]"),
    ("nan", "NaN or infinite voxels"),
    ("unknown_labels", "labels [7] that are not among"),
])
def test_bad_tumor_inputs_get_one_line_and_nothing_is_written(case, message, atlas, tmp_path, capsys):
    geometry = atlas.geometry
    array = np.zeros(geometry.shape_kji, np.float32)
    name, extra = "tumor.nii.gz", []
    if case == "outside_brain":
        array[:4, :4, :4] = 0.8  # a corner of the image: background
    elif case == "no_overlap":
        array[40:45, 40:45, 40:45] = 0.8
        geometry = Geometry(geometry.shape_kji, geometry.spacing_ijk_mm,
                            tuple(np.add(geometry.origin_ras_mm, 1000.0)), geometry.direction_ras)
    elif case == "above_one":
        array[40:45, 40:45, 40:45] = 2.0
    elif case == "nan":
        array[40:45, 40:45, 40:45] = 0.8
        array[41, 41, 41] = np.nan
        name = "tumor.nrrd"  # NIfTI readers turn NaN into 0; NRRD keeps it
    elif case == "unknown_labels":
        array = array.astype(np.int16)
        array[40:45, 40:45, 40:45] = 7
        extra = ["--tumor-kind", "segmentation"]
    tumor = _write(tmp_path, name, array, geometry)
    out = tmp_path / "out"
    code, _, stderr = run(personalize_args(tumor, out, *extra), capsys)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("tumor-personalization: error: ")
    assert message in stderr
    assert not out.exists()


def test_unknown_method_is_refused(tumor_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in ["personalize", "--tissue", "atlas", "--tumor", tumor_file, "--method", "newton",
                               "--out-dir", tmp_path / "out"]])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'newton'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage, message", [("corrupt", "is corrupt or was replaced"),
                                              ("missing", "weights file not found")])
def test_missing_or_corrupt_weights_are_refused(damage, message, tumor_file, tmp_path, capsys, monkeypatch):
    from TumorPersonalizationLib.atlas import resources_dir

    resources = tmp_path / "Resources"
    shutil.copytree(resources_dir() / "Models", resources / "Models",
                    ignore=shutil.ignore_patterns("*_stage*", "*_check.npz"))
    weights = resources / "Models" / f"{SHIPPED_MODELS['inverse']}.pt"
    if damage == "corrupt":
        data = bytearray(weights.read_bytes())
        data[1000] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    monkeypatch.setenv("TUMORPERSONALIZATION_RESOURCES", str(resources))
    out = tmp_path / "out"
    code, _, stderr = run(personalize_args(tumor_file, out), capsys)
    assert code == 2 and message in stderr and f"{SHIPPED_MODELS['inverse']}.pt" in stderr
    assert not out.exists()


def test_out_dir_with_foreign_files_is_refused_before_work(tumor_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, stderr = run(personalize_args(tumor_file, out), capsys)
    assert code == 2 and "holds other files" in stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_batch_finishes_good_cases_reports_broken_ones_and_resumes(tumor_file, tmp_path, capsys):
    cases = tmp_path / "cases.csv"
    with open(cases, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["case", "tissue", "tumor"])
        writer.writerow(["good", "atlas", str(tumor_file)])
        writer.writerow(["broken", "atlas", "does_not_exist.nii.gz"])
    out = tmp_path / "batch"
    argv = ["batch", "--cases", cases, "--out-dir", out, "--method", "direct", "--progress", "none"]
    code, stdout, stderr = run(argv, capsys)
    assert code == 1
    assert "case broken failed" in stderr and "file not found" in stderr
    assert {p.name for p in (out / "good").iterdir()} == OUTPUTS
    assert not (out / "broken").exists()
    rows = {r["case"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["good"]["status"] == "done" and float(rows["good"]["mu_d_mm"]) > 0
    assert rows["broken"]["status"] == "failed" and "file not found" in rows["broken"]["error"]
    assert json.loads(stdout)["failed"] == ["broken"]

    stamp = (out / "good" / "parameters.json").stat().st_mtime_ns
    code, _, stderr = run(argv, capsys)
    assert code == 1 and "1 already done, 1 to run" in stderr
    assert (out / "good" / "parameters.json").stat().st_mtime_ns == stamp  # resumed: not recomputed


def test_demo_runs_end_to_end_with_the_default_method(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, stderr = run(["demo", "--out-dir", out, "--progress", "none"], capsys)
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == OUTPUTS
    summary = json.loads(stdout)
    assert summary["method"] == DEFAULT_METHOD
    assert summary["errors"]["seed_mm"] < 3.0
    assert summary["errors"]["mu_d_relative"] < 0.1 and summary["errors"]["mu_rho_relative"] < 0.1
    assert summary["metrics_vs_truth"]["ncc"] > 0.99
    covered = summary["later_growth_covered"]
    assert set(covered) == {"standard", "model", "blurred_labels", "true_parameters"}
    assert all(0 < v < 1 for v in covered.values())
    assert covered["model"] >= covered["standard"]  # deterministic case: the fitted model plan beats the margin
    assert "recovered" in stderr and "mu_D mm" in stderr
