"""Recurrence coverage: known answers on hand-made plans, resampling from another grid, the enhancing part, the
errors; and on the command line, the block in parameters.json against the written plans, and every bad follow-up
refused with one line, exit code 2 and nothing written."""
import csv
import json

import numpy as np
import pytest

from TumorPersonalizationLib import GrowthParameters, simulate
from TumorPersonalizationLib.cli import main
from TumorPersonalizationLib.errors import InputError
from TumorPersonalizationLib.geometry import Geometry, Volume
from TumorPersonalizationLib.observation import Observation
from TumorPersonalizationLib.recurrence import add_recurrence, coverage_summary, recurrence_coverage

GRID = Geometry((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))


def box(lo, hi, shape=(10, 10, 10), value=1, dtype=np.uint8):
    out = np.zeros(shape, dtype)
    out[lo:hi, lo:hi, lo:hi] = value
    return out


def hand_plans():
    # standard: 4^3 cube at 2..5, model: 4^3 cube at 5..8
    return {"standard": box(2, 6), "model": box(5, 9), "iso": None}


def hand_recurrence():
    labels = box(3, 7, value=2, dtype=np.int16)  # 64 voxels at 3..6
    labels[5:7, 5:7, 5:7] = 3  # 8 enhancing voxels at 5..6
    return labels


def test_hand_computed_coverage_all_and_enhancing():
    coverage = recurrence_coverage(hand_plans(), Volume(hand_recurrence(), GRID), GRID)
    # all: standard holds 3..5 (27 of 64), model 5..6 (8 of 64); enhancing (5..6): standard 1 of 8, model 8 of 8
    assert coverage["all"]["standard"] == pytest.approx(27 / 64)
    assert coverage["all"]["model"] == pytest.approx(8 / 64)
    assert coverage["all"]["iso"] is None
    assert coverage["all"]["volume_cm3"] == pytest.approx(0.064)
    assert coverage["enhancing"]["standard"] == pytest.approx(1 / 8)
    assert coverage["enhancing"]["model"] == 1.0
    assert coverage["enhancing"]["volume_cm3"] == pytest.approx(0.008)
    assert coverage["labels"] == [1, 2, 3] and coverage["notes"] == []
    assert "standard 0.42, model 0.12" in coverage_summary(coverage)


def test_inside_the_standard_plan_is_one_and_outside_both_is_zero():
    inside = box(3, 5, dtype=np.int16, value=3)
    assert recurrence_coverage(hand_plans(), Volume(inside, GRID), GRID)["all"]["standard"] == 1.0
    outside = np.zeros((10, 10, 10), np.int16)
    outside[0:2, 0:2, 0:2] = 2  # neither plan reaches the corner
    coverage = recurrence_coverage(hand_plans(), Volume(outside, GRID), GRID)
    assert coverage["all"]["standard"] == 0.0 and coverage["all"]["model"] == 0.0


def test_empty_enhancing_part_gives_none_and_a_note():
    labels = box(3, 7, value=2, dtype=np.int16)
    coverage = recurrence_coverage(hand_plans(), Volume(labels, GRID), GRID)
    assert coverage["enhancing"] is None
    assert any("no enhancing voxel (label 3)" in note for note in coverage["notes"])
    # BraTS 2021 labels: enhancing is 4
    labels[5:7, 5:7, 5:7] = 4
    coverage = recurrence_coverage(hand_plans(), Volume(labels, GRID), GRID, labels=(1, 2, 4))
    assert coverage["enhancing"]["model"] == 1.0 and coverage["labels"] == [1, 2, 4]


def test_a_finer_grid_is_resampled_by_nearest_label():
    # 0.5 mm voxels whose every other centre is a tissue voxel's centre: fine index 2k is tissue index k.
    fine = Geometry((20, 20, 20), (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), np.eye(3))
    labels = np.zeros(fine.shape_kji, np.int16)
    labels[6:14, 6:14, 6:14] = 2  # tissue voxels 3..6
    labels[10:14, 10:14, 10:14] = 3  # tissue voxels 5..6
    coverage = recurrence_coverage(hand_plans(), Volume(labels, fine), GRID)
    assert coverage["all"]["standard"] == pytest.approx(27 / 64)
    assert coverage["enhancing"]["model"] == 1.0


def test_voxels_outside_the_brain_count_and_outside_the_image_are_noted():
    brain = np.zeros((10, 10, 10), bool)
    brain[:, :, :5] = True  # the recurrence's i = 5, 6 half lies outside the brain
    coverage = recurrence_coverage(hand_plans(), Volume(hand_recurrence(), GRID), GRID, brain=brain)
    assert coverage["all"]["outside_brain_share"] == pytest.approx(0.5)
    assert coverage["all"]["standard"] == pytest.approx(27 / 64)  # the denominator keeps the outside half
    shifted = Geometry(GRID.shape_kji, GRID.spacing_ijk_mm, (5.0, 0.0, 0.0), np.eye(3))  # R by 5 mm
    coverage = recurrence_coverage(hand_plans(), Volume(hand_recurrence(), shifted), GRID)
    assert coverage["all"]["volume_cm3"] == pytest.approx(0.032)  # i = 3..6 shifted to 8..11: half is left
    assert any("50.0 % of the recurrence lies outside the tissue image" in n for n in coverage["notes"])


@pytest.mark.parametrize("labels, geometry, message", [
    (np.zeros((10, 10, 10), np.int16), GRID, "is empty"),
    (box(3, 5, value=7, dtype=np.int16), GRID, "labels [7] that are not among"),
    (box(3, 5, value=0.5, dtype=np.float32), GRID, "whole-number labels"),
    (box(3, 5, value=2, dtype=np.int16), Geometry(GRID.shape_kji, (1, 1, 1), (500.0, 0, 0), np.eye(3)),
     "does not overlap the tissue image"),
])
def test_bad_recurrences_are_refused(labels, geometry, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        recurrence_coverage(hand_plans(), Volume(labels, geometry), GRID)


def test_add_recurrence_stores_the_coverage_in_the_result_and_its_dict():
    from TumorPersonalizationLib.pipeline import PersonalizationResult
    from TumorPersonalizationLib.plans import TargetPlans

    plans = TargetPlans(GRID, box(2, 6), box(5, 9))
    result = PersonalizationResult(GrowthParameters((5.0, 5.0, 5.0), 5.0, 2.0),
                                   Volume(np.zeros(GRID.shape_kji, np.float32), GRID), 0.0, 0.0, [], plans, "direct")
    assert "recurrence" not in result.to_dict()
    observation = Observation.from_volume(Volume(hand_recurrence(), GRID), "segmentation")
    coverage = add_recurrence(result, observation)
    assert result.recurrence is coverage and result.to_dict()["recurrence"]["all"]["model"] == pytest.approx(8 / 64)
    with pytest.raises(InputError, match="segmentation"):
        add_recurrence(result, Observation.from_volume(Volume(box(3, 5, value=0.5, dtype=np.float32), GRID)))


# ---- command line -----------------------------------------------------------------------------------------------
TRUTH = GrowthParameters((28.0, -12.0, 24.0), 6.0, 2.5)
FAR_BLOB_RAS_MM = (-30.0, -12.0, 24.0)  # the other hemisphere, beyond the 15 mm margin


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tumor grown on the 2 mm atlas, and a follow-up: its core (enhancing) plus a blob in the other hemisphere."""
    from TumorPersonalizationLib.atlas import load_atlas

    atlas = load_atlas(2)
    folder = tmp_path_factory.mktemp("recurrence")
    tumor = simulate(atlas, TRUTH)
    tumor.save(folder / "tumor.nii.gz")
    labels = np.where(tumor.array >= 0.675, 3, 0).astype(np.int16)
    k, j, i = np.round(atlas.geometry.ras_to_index_kji(FAR_BLOB_RAS_MM)).astype(int)
    labels[k - 2:k + 2, j - 2:j + 2, i - 2:i + 2] = 2
    Volume(labels, atlas.geometry).save(folder / "followup.nii.gz")
    return folder, labels


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def personalize_args(folder, out, recurrence):
    return ["personalize", "--tissue", "atlas", "--tumor", folder / "tumor.nii.gz", "--method", "direct",
            "--progress", "none", "--recurrence", recurrence, "--out-dir", out]


def test_personalize_with_recurrence_writes_the_coverage_of_the_written_plans(case, tmp_path, capsys):
    folder, labels = case
    out = tmp_path / "out"
    code, stdout, stderr = run(personalize_args(folder, out, folder / "followup.nii.gz"), capsys)
    assert code == 0, stderr
    written = json.loads((out / "parameters.json").read_text())["recurrence"]
    assert json.loads(stdout)["recurrence"] == written
    standard = Volume.load(out / "plan_standard.nii.gz").array > 0
    model = Volume.load(out / "plan_model.nii.gz").array > 0
    recurrence = labels > 0
    assert not np.any(standard & (labels == 2)) and not np.any(model & (labels == 2))  # the blob is outside both
    assert written["enhancing"]["standard"] == 1.0  # the core lies inside its own 15 mm margin
    assert written["all"]["standard"] == pytest.approx((labels == 3).sum() / recurrence.sum())
    assert written["all"]["model"] == pytest.approx((model & recurrence).sum() / recurrence.sum())
    assert written["all"]["iso"] is None


@pytest.mark.parametrize("name, message", [("missing.nii.gz", "file not found"),
                                           ("tumor.nii.gz", "whole-number labels"),
                                           ("empty.nii.gz", "is empty"),
                                           ("elsewhere.nii.gz", "does not overlap the tissue image")])
def test_bad_recurrence_gets_one_line_exit_code_2_and_nothing_written(name, message, case, tmp_path, capsys):
    folder, labels = case
    from TumorPersonalizationLib.atlas import load_atlas

    geometry = load_atlas(2).geometry
    if name == "empty.nii.gz":
        Volume(np.zeros_like(labels), geometry).save(tmp_path / name)
    elif name == "elsewhere.nii.gz":
        Volume(labels, Geometry(geometry.shape_kji, geometry.spacing_ijk_mm,
                                tuple(np.add(geometry.origin_ras_mm, 1000.0)), geometry.direction_ras)).save(
            tmp_path / name)
    recurrence = folder / name if name == "tumor.nii.gz" else tmp_path / name
    out = tmp_path / "out"
    code, stdout, stderr = run(personalize_args(folder, out, recurrence), capsys)
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("tumor-personalization: error: ")
    assert message in stderr
    assert not out.exists()


def test_batch_reads_a_recurrence_column(case, tmp_path, capsys):
    folder, labels = case
    cases = tmp_path / "cases.csv"
    with open(cases, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["case", "tissue", "tumor", "recurrence"])
        writer.writerow(["a", "atlas", folder / "tumor.nii.gz", folder / "followup.nii.gz"])
        writer.writerow(["b", "atlas", folder / "tumor.nii.gz", folder / "tumor.nii.gz"])  # not a label map
    out = tmp_path / "batch"
    code, _, stderr = run(["batch", "--cases", cases, "--out-dir", out, "--method", "direct", "--progress", "none"],
                          capsys)
    assert code == 1 and "case b failed" in stderr and "whole-number labels" in stderr
    rows = {r["case"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    written = json.loads((out / "a" / "parameters.json").read_text())["recurrence"]
    assert float(rows["a"]["recurrence_standard"]) == pytest.approx(written["all"]["standard"])
    assert float(rows["a"]["recurrence_model"]) == pytest.approx(written["all"]["model"])
    assert not (out / "b").exists()


def test_cli_recurrence_labels_reach_the_coverage(tmp_path, capsys):
    """--recurrence-labels 1 2 4 (BraTS 2021) are the labels both of the check and of the coverage."""
    import json

    from TumorPersonalizationLib import GrowthParameters, load_atlas, simulate
    from TumorPersonalizationLib.cli import main
    from TumorPersonalizationLib.geometry import Volume

    atlas = load_atlas(2)
    tumor = simulate(atlas, GrowthParameters((28.0, -12.0, 24.0), 6.0, 2.5))
    tumor.save(tmp_path / "tumor.nii.gz")
    later = np.zeros(tumor.array.shape, np.int16)
    later[tumor.array >= 0.2], later[tumor.array >= 0.7] = 2, 4
    Volume(later, atlas.geometry).save(tmp_path / "later.nii.gz")
    out = tmp_path / "out"
    code = main(["personalize", "--tissue", "atlas", "--tumor", str(tmp_path / "tumor.nii.gz"), "--method", "direct",
                 "--progress", "none", "--lesion-tissue", "keep", "--recurrence", str(tmp_path / "later.nii.gz"),
                 "--recurrence-labels", "1", "2", "4", "--out-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    coverage = json.loads((out / "parameters.json").read_text())["recurrence"]
    assert coverage["labels"] == [1, 2, 4]
    enhancing_cm3 = (later == 4).sum() * atlas.geometry.voxel_volume_mm3() / 1000
    assert coverage["enhancing"]["volume_cm3"] == pytest.approx(enhancing_cm3, abs=1e-3)
