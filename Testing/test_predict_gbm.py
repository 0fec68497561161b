"""predict-gbm, the PREDICT-GBM model contract: the rank-keeping map on known plateaus, and the command on a folder
of small patients cut from the 2 mm atlas (one with a flipped axis, one without its tumor segmentation)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from TumorPersonalizationLib import GrowthParameters, simulate
from TumorPersonalizationLib.cli import main
from TumorPersonalizationLib.errors import InputError
from TumorPersonalizationLib.geometry import Geometry, Volume
from TumorPersonalizationLib.predict_gbm import RANK_FLOOR, ranked_map

GRID = Geometry((12, 12, 12), (2.0, 2.0, 2.0), (-11.0, -11.0, -11.0), np.eye(3))


def _groups_keep_their_order(c, v):
    """Every voxel of a higher concentration has a higher value than every voxel of a lower one."""
    levels, group = np.unique(c, return_inverse=True)
    low = np.full(levels.size, np.inf)
    high = np.full(levels.size, -np.inf)
    np.minimum.at(low, group, v)
    np.maximum.at(high, group, v)
    return bool(np.all(low[1:] > high[:-1]))


def test_ranked_map_breaks_ties_by_distance_and_keeps_every_other_order():
    rng = np.random.default_rng(3)
    c = rng.uniform(0.0, 1.0, GRID.shape_kji).astype(np.float32)
    c[3:9, 3:9, 3:9] = 1.0  # a plateau at 1 around the seed (grid centre, RAS 0)
    c[:, :, :2] = 0.0  # an underflowed tail
    c[:, :, 2] = np.float32(0.5)  # a plateau in the middle of the range
    c[0, 0, 3] = np.nextafter(np.float32(1.0), np.float32(0.0))  # one step below the plateau: room must be made
    brain = np.ones(GRID.shape_kji, bool)
    brain[:, :2, :] = False
    v = ranked_map(c, brain, GRID, (0.0, 0.0, 0.0))
    assert v.dtype == np.float32
    assert np.all(v[~brain] == 0)
    inside, c_inside = v[brain], c[brain]
    assert inside.min() > 0 and inside.max() <= 1.0 and inside.max() == 1.0
    assert np.unique(inside).size == inside.size  # no ties anywhere in the brain
    assert _groups_keep_their_order(c_inside, inside)
    # the tied tail sits just below the floor, every value above it is at most the concentration
    floor = np.float32(RANK_FLOOR)
    assert np.all(inside[c_inside == 0] <= floor) and np.all(inside <= np.maximum(c_inside, floor))
    # on the plateau at 1, nearer the seed is higher
    plateau = (c == 1.0) & brain
    distance = np.linalg.norm(GRID.ras_grid()[plateau], axis=1)
    order = np.argsort(distance, kind="stable")
    values = v[plateau][order]
    strictly_nearer = np.diff(distance[order]) > 1e-9
    assert np.all(np.diff(values)[strictly_nearer] < 0)
    # values that were already distinct and not crowded by a plateau above them are left as they were
    untouched = brain & (c > 0.0) & (c < 0.5)
    assert np.array_equal(v[untouched], c[untouched])


def test_ranked_map_refuses_mismatched_shapes():
    with pytest.raises(InputError, match="differ in shape"):
        ranked_map(np.zeros((3, 3, 3)), np.ones((3, 3, 4), bool), GRID, (0, 0, 0))


def _flipped_i(volume: Volume) -> Volume:
    """The same image with its i axis reversed (origin and direction changed to match): a non-trivial direction."""
    g = volume.geometry
    origin = g.index_kji_to_ras((0, 0, g.shape_kji[2] - 1))
    direction = g.direction_ras.copy()
    direction[:, 0] *= -1
    return Volume(np.ascontiguousarray(volume.array[:, :, ::-1]),
                  Geometry(g.shape_kji, g.spacing_ijk_mm, tuple(origin), direction))


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    from TumorPersonalizationLib.atlas import load_atlas

    tissue = load_atlas(2).crop_cube((28.0, -12.0, 24.0), 80.0)  # 40^3 voxels of 2 mm
    root = tmp_path_factory.mktemp("predict_gbm") / "input"
    grown = {}
    for name, seed, flip in (("00000", (28.0, -12.0, 24.0), False), ("00001", (20.0, -4.0, 20.0), True),
                             ("00002", (28.0, -12.0, 24.0), False)):
        if seed not in grown:
            grown[seed] = simulate(tissue, GrowthParameters(seed, 5.0, 2.5)).array
        c = grown[seed]
        maps = {"gm": tissue.gm, "wm": tissue.wm, "csf": tissue.csf,
                "tumorseg": np.where(c >= 0.675, 3, np.where(c >= 0.25, 2, 0)).astype(np.int16)}
        folder = root / f"Patient-{name}"
        folder.mkdir(parents=True)
        for key, array in maps.items():
            if name == "00002" and key == "tumorseg":
                continue  # the broken patient
            volume = Volume(array, tissue.geometry)
            (_flipped_i(volume) if flip else volume).save(folder / f"{name}-{key}.nii.gz")
    return root


def test_predict_gbm_writes_ranked_maps_on_the_input_grids_and_reports_a_broken_patient(patients, tmp_path,
                                                                                        capsys):
    output = tmp_path / "output"
    code = main(["predict-gbm", "--input", str(patients), "--output", str(output), "--method", "direct",
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1  # a patient failed
    assert sorted(p.name for p in output.iterdir()) == ["00000.nii.gz", "00001.nii.gz"]
    failures = [line for line in captured.err.splitlines() if "failed" in line]
    assert len(failures) == 1 and "Patient-00002" in failures[0] and "00002-tumorseg.nii.gz" in failures[0]
    assert sum("wrote" in line for line in captured.err.splitlines()) == 2  # progress per patient
    assert json.loads(captured.out) == {"written": 2, "failed": ["Patient-00002"], "output": str(output)}
    for name in ("00000", "00001"):
        written = sitk.ReadImage(str(output / f"{name}.nii.gz"))
        reference = sitk.ReadImage(str(patients / f"Patient-{name}" / f"{name}-gm.nii.gz"))
        assert written.GetPixelID() == sitk.sitkFloat32 and written.GetSize() == reference.GetSize()
        np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
        values = sitk.GetArrayFromImage(written)
        wm = sitk.GetArrayFromImage(sitk.ReadImage(str(patients / f"Patient-{name}" / f"{name}-wm.nii.gz")))
        brain = wm + sitk.GetArrayFromImage(reference) >= 0.1
        assert values[brain].min() > 0 and values.max() <= 1.0 and values.min() >= 0
        assert np.unique(values[brain]).size == brain.sum()  # no ties, at 1 or anywhere in the brain
        tumor = sitk.GetArrayFromImage(sitk.ReadImage(str(patients / f"Patient-{name}" / f"{name}-tumorseg.nii.gz")))
        # the map follows the tumor: its core is ranked above the brain outside the visible tumor
        assert np.median(values[tumor == 3]) > np.percentile(values[brain & (tumor == 0)], 99)


def test_predict_gbm_refuses_an_input_without_patients(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["predict-gbm", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "holds no Patient-XXXXX folders" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
