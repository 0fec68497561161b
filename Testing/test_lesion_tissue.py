"""A tumor-bearing brain's tissue: warped probability maps cleaned or refused at the stated limits, the lesion refilled
with healthy tissue (nothing outside it changed), and the tissue the model ran on written so that it reproduces the
infiltration map."""
import json
import re

import numpy as np
import pytest

from conftest import make_tissue
from TumorPersonalizationLib import GrowthParameters, simulate
from TumorPersonalizationLib.cli import main
from TumorPersonalizationLib.errors import InputError
from TumorPersonalizationLib.geometry import Geometry, Volume
from TumorPersonalizationLib.lesion import lesion_mask, refill_lesion
from TumorPersonalizationLib.tissue import Tissue, clean_fractions, grid_mismatch_voxels

TRUTH = GrowthParameters((28.0, -12.0, 24.0), 6.0, 2.5)


# ---- registration-warped probability maps --------------------------------------------------------------------------
def _maps(shape=(12, 14, 16), seed=0):
    rng = np.random.default_rng(seed)
    wm = rng.uniform(0, 1, shape).astype(np.float32)
    gm = ((1 - wm) * rng.uniform(0, 1, shape)).astype(np.float32)
    csf = (1 - wm - gm).astype(np.float32)
    return wm, gm, csf


def test_small_excursions_are_cleaned_with_a_note():
    wm, gm, csf = _maps()
    geometry = Geometry(wm.shape, (1.0, 1.0, 2.0), (0, 0, 0))
    wm[0, 0, 0], gm[0, 0, 0], csf[0, 0, 0] = -0.02, 0.0, 1.0
    wm[0, 0, 1], gm[0, 0, 1], csf[0, 0, 1] = 1.03, 0.0, 0.0
    gm[1, 1, 1] += 0.08  # the voxel's sum is 1.08: renormalised
    cleaned, notes = clean_fractions([wm, gm, csf], ("WM", "GM", "CSF"), geometry)
    total = sum(cleaned)
    assert all(a.min() >= 0 and a.max() <= 1 for a in cleaned)
    assert total.max() <= 1 + 1e-6
    assert cleaned[1][1, 1, 1] == pytest.approx(gm[1, 1, 1] / (wm[1, 1, 1] + gm[1, 1, 1] + csf[1, 1, 1]), rel=1e-5)
    # Voxels that were valid fractions are untouched.
    assert cleaned[0][5, 5, 5] == wm[5, 5, 5]
    assert len(notes) == 1
    assert "0.03" in notes[0] and "1.08" in notes[0]
    changed_cm3 = float(re.search(r"\(([\d.]+) cm\^3 changed\)", notes[0]).group(1))
    assert changed_cm3 == pytest.approx(3 * 2.0 / 1000, abs=0.005)  # three voxels of 2 mm^3


def test_valid_maps_give_no_note():
    wm, gm, csf = _maps()
    _, notes = clean_fractions([wm, gm, csf], ("WM", "GM", "CSF"), Geometry(wm.shape, (1, 1, 1), (0, 0, 0)))
    assert notes == []


@pytest.mark.parametrize("which, value, message", [
    (1, -0.07, "GM map holds -0.07"),
    (2, 1.06, "CSF map holds 1.06"),
])
def test_large_excursions_are_refused_naming_map_and_value(which, value, message):
    maps = list(_maps())
    maps[which][3, 3, 3] = value
    with pytest.raises(InputError, match=re.escape(message)):
        clean_fractions(maps, ("WM", "GM", "CSF"), Geometry(maps[0].shape, (1, 1, 1), (0, 0, 0)))


def test_a_sum_over_the_limit_is_refused():
    wm, gm, csf = _maps()
    wm[2, 2, 2], gm[2, 2, 2], csf[2, 2, 2] = 0.6, 0.55, 0.0
    with pytest.raises(InputError, match="add up to 1.15"):
        clean_fractions([wm, gm, csf], ("WM", "GM", "CSF"), Geometry(wm.shape, (1, 1, 1), (0, 0, 0)))


def test_maps_on_grids_a_tenth_of_a_voxel_apart_are_resampled(tmp_path):
    wm, gm, csf = _maps()
    base = Geometry(wm.shape, (1.0, 1.0, 1.0), (10.0, 20.0, 30.0))
    near = Geometry(wm.shape, (1.0, 1.0, 1.0), (10.05, 20.0, 30.0))
    far = Geometry(wm.shape, (1.0, 1.0, 1.0), (10.5, 20.0, 30.0))
    assert grid_mismatch_voxels(base, near) == pytest.approx(0.05)
    tissue = Tissue.from_probabilities(Volume(wm, base), Volume(gm, near), Volume(csf, base))
    assert tissue.geometry.same_grid(base)
    assert any("GM map's grid differs" in n for n in tissue.notes)
    with pytest.raises(InputError, match="CSF map grid .* differ by 0.5 voxel"):
        Tissue.from_probabilities(Volume(wm, base), Volume(gm, base), Volume(csf, far))


def test_cli_refuses_a_warped_map_out_of_limits_in_one_line(tmp_path, capsys):
    wm, gm, csf = _maps((20, 20, 20))
    wm[10, 10, 10] = 1.2
    geometry = Geometry(wm.shape, (2.0, 2.0, 2.0), (0, 0, 0))
    paths = []
    for name, array in (("wm", wm), ("gm", gm), ("csf", csf)):
        paths.append(tmp_path / f"{name}.nii.gz")
        Volume(array, geometry).save(paths[-1])
    tumor = np.zeros(wm.shape, np.int16)
    tumor[8:12, 8:12, 8:12] = 2
    Volume(tumor, geometry).save(tmp_path / "seg.nii.gz")
    out = tmp_path / "out"
    code = main(["personalize", "--wm", str(paths[0]), "--gm", str(paths[1]), "--csf", str(paths[2]), "--tumor",
                 str(tmp_path / "seg.nii.gz"), "--tumor-kind", "segmentation", "--out-dir", str(out),
                 "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "WM map holds 1.2" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# ---- the lesion refilled ---------------------------------------------------------------------------------------------
def _tumor_bearing(atlas, core_label_to):
    """The 2 mm atlas's hard labels with a tumor whose core is relabelled (CSF: what FAST/SPM do to a dark core; 0:
    cut out of the brain mask), and the tumor's visible and core masks."""
    c = simulate(atlas, TRUTH).array
    visible, core = c >= 0.25, c >= 0.675
    labels = atlas.labelmap()
    labels[core] = core_label_to
    return Tissue.from_labelmap(Volume(labels, atlas.geometry)), visible, core


@pytest.mark.parametrize("core_label_to", [1, 0])
def test_surround_refill_makes_the_core_brain_and_changes_nothing_outside(atlas_2mm, core_label_to):
    tissue, visible, core = _tumor_bearing(atlas_2mm, core_label_to)
    before_brain = tissue.brain_mask[core].mean()
    assert before_brain == 0.0  # the core is CSF or background: no tumor can grow there
    refilled = refill_lesion(tissue, visible, "surround")
    lesion = refilled.lesion
    assert lesion[visible].all() and lesion.sum() > visible.sum()  # the visible tumor grown by a margin
    new = refilled.tissue
    # Every core voxel is now whole brain (WM + GM), no CSF.
    assert np.all(new.brain_fraction[core] >= 0.999) and np.all(new.csf[core] == 0)
    # Outside the lesion, not one voxel changed.
    for before, after in zip((tissue.wm, tissue.gm, tissue.csf), (new.wm, new.gm, new.csf)):
        assert np.array_equal(before[~lesion], after[~lesion])
    # The warning states the volume that changed.
    changed = np.zeros(core.shape, bool)
    for before, after in zip((tissue.wm, tissue.gm, tissue.csf), (new.wm, new.gm, new.csf)):
        changed |= before != after
    expected_cm3 = changed.sum() * tissue.geometry.voxel_volume_mm3() / 1000
    message = [w for w in refilled.warnings if w.startswith("lesion tissue refilled")]
    assert len(message) == 1
    assert float(re.search(r"refilled: ([\d.]+) cm\^3", message[0]).group(1)) == pytest.approx(expected_cm3, abs=0.05)
    assert refilled.refilled_cm3 == pytest.approx(expected_cm3)


def test_keep_changes_nothing_and_says_nothing(atlas_2mm):
    tissue, visible, _ = _tumor_bearing(atlas_2mm, 1)
    kept = refill_lesion(tissue, visible, "keep")
    assert kept.tissue is tissue and kept.warnings == [] and kept.refilled_cm3 == 0


def test_lesion_is_the_visible_tumor_grown_in_mm_on_an_anisotropic_grid():
    tissue = make_tissue(np.ones((21, 21, 21)), spacing=(1.0, 1.0, 2.0))
    visible = np.zeros((21, 21, 21), bool)
    visible[10, 10, 10] = True
    lesion = lesion_mask(visible, tissue.geometry, 3.0)
    # Along k (2 mm voxels) one voxel is within 3 mm, along i (1 mm voxels) three are.
    assert lesion[10, 10, 7:14].all() and not lesion[10, 10, 6] and not lesion[10, 10, 14]
    assert lesion[9:12, 10, 10].all() and not lesion[8, 10, 10] and not lesion[12, 10, 10]
    with pytest.raises(InputError, match="unknown lesion tissue"):
        refill_lesion(tissue, visible, "nearest")
    with pytest.raises(InputError, match="empty"):
        lesion_mask(np.zeros_like(visible), tissue.geometry, 3.0)


# ---- the tissue the model ran on, as an output -----------------------------------------------------------------
def test_written_tissue_reproduces_the_infiltration_through_simulate(atlas_2mm, tmp_path, capsys):
    tissue, visible, core = _tumor_bearing(atlas_2mm, 1)
    Volume(tissue.labelmap(), tissue.geometry).save(tmp_path / "tissue_labels.nii.gz")
    seg = np.where(core, 3, np.where(visible, 2, 0)).astype(np.int16)
    Volume(seg, tissue.geometry).save(tmp_path / "seg.nii.gz")
    out = tmp_path / "out"
    code = main(["personalize", "--tissue", str(tmp_path / "tissue_labels.nii.gz"), "--tumor",
                 str(tmp_path / "seg.nii.gz"), "--tumor-kind", "segmentation", "--method", "direct",
                 "--lesion-tissue", "surround", "--progress", "none", "--out-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    written = json.loads((out / "parameters.json").read_text())
    assert written["tissue"]["source"] == "surround" and written["tissue"]["refilled_cm3"] > 0
    ran_on = Tissue.from_file(out / "tissue.nii.gz")
    assert ran_on.geometry.same_grid(tissue.geometry)
    assert np.all(ran_on.brain_fraction[core] >= 0.999)  # the refilled tissue, not the given one
    again = tmp_path / "again.nii.gz"
    code = main(["simulate", "--tissue", str(out / "tissue.nii.gz"), "--seed-ras", *map(str, written["seed_ras_mm"]),
                 "--mu-d", str(written["mu_d_mm"]), "--mu-rho", str(written["mu_rho"]), "--out", str(again),
                 "--quiet"])
    assert code == 0
    infiltration = Volume.load(out / "infiltration.nii.gz").array
    reproduced = Volume.load(again).array
    assert infiltration.max() > 0.5
    assert np.abs(reproduced - infiltration).max() < 1e-4


def test_core_labelled_csf_fits_the_truth_once_the_lesion_is_refilled_from_the_atlas():
    """The tumor-bearing brain case: the 1 mm atlas, a tumor the solver grew, given as a BraTS segmentation, and the
    tissue's tumor core labelled CSF (what FAST or SPM do to a dark core). Kept as given, the fit explains the tumor
    from its rim (NCC 0.13); with the default atlas refill it must match the truth."""
    from TumorPersonalizationLib.atlas import load_atlas
    from TumorPersonalizationLib.metrics import compare
    from TumorPersonalizationLib.observation import Observation
    from TumorPersonalizationLib.pipeline import personalize

    atlas = load_atlas(1)
    truth = GrowthParameters((28.0, -12.0, 24.0), 8.0, 3.0)
    c = simulate(atlas, truth).array
    seg = np.zeros(c.shape, np.int16)
    seg[c >= 0.25], seg[c >= 0.675], seg[c >= 0.95] = 2, 3, 1
    labels = atlas.labelmap()
    labels[(seg == 1) | (seg == 3)] = 1
    tissue = Tissue.from_labelmap(Volume(labels, atlas.geometry))
    result = personalize(tissue, Observation.from_volume(Volume(seg, atlas.geometry), "segmentation"))
    assert result.lesion.source == "atlas"
    assert compare(result.concentration.array, c, atlas.brain_mask, thresholds=())["ncc"] >= 0.95
    assert np.linalg.norm(np.subtract(result.parameters.seed_ras_mm, truth.seed_ras_mm)) < 3.0
    assert not any("outside grey/white matter" in w for w in result.warnings)
