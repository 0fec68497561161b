"""Atlas registration (registration.py): known deformations recovered, the lesion refilled, failures reported.

Deformed copies of the atlas come from benchmarks/known_deformation.py, shared with the registration benchmark.
Grids are 2-3 mm for speed.
"""
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from TumorPersonalizationLib.atlas import load_atlas, load_atlas_t1
from TumorPersonalizationLib.errors import InputError
from TumorPersonalizationLib.geometry import Geometry, Volume
from TumorPersonalizationLib.metrics import dice
from TumorPersonalizationLib.progress import Cancelled
from TumorPersonalizationLib.registration import (T1_QUALITY_THRESHOLD, TISSUE_QUALITY_THRESHOLD,
                                                  register_atlas_to_tissue, tissue_from_t1)
from TumorPersonalizationLib.tissue import Tissue

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from known_deformation import centre_of, known_deformation, oblique_grid, warp  # noqa: E402

@pytest.fixture(scope="module")
def atlas():
    return load_atlas(2)


@pytest.fixture(scope="module")
def deformed(atlas):
    """The atlas deformed by a known transform onto an oblique 2 x 2 x 3 mm grid: (tissue, transform)."""
    center = centre_of(atlas.geometry)
    transform = known_deformation(center)
    grid = oblique_grid(center, (2.0, 2.0, 3.0))
    maps = [np.clip(warp(a, atlas.geometry, transform, grid), 0, 1) for a in (atlas.wm, atlas.gm, atlas.csf)]
    return Tissue(*maps, grid), transform


def test_atlas_t1_is_on_the_tissue_grid():
    for spacing in (1, 2):
        t1, tissue = load_atlas_t1(spacing), load_atlas(spacing)
        assert t1.geometry.same_grid(tissue.geometry)
        assert t1.array.dtype == np.float32 and 0.0 <= t1.array.min() and t1.array.max() <= 1.0
        # The template is skull-stripped: bright inside the brain, dark outside the tissue maps.
        brain = tissue.brain_fraction > 0.5
        assert t1.array[brain].mean() > 0.5
        assert t1.array[(tissue.wm + tissue.gm + tissue.csf) < 0.01].mean() < 0.05


def test_t1_registration_recovers_a_known_deformation(atlas, deformed):
    truth, transform = deformed
    template = load_atlas_t1(2)
    t1 = Volume(warp(template.array * 800.0, template.geometry, transform, truth.geometry), truth.geometry)
    result = tissue_from_t1(t1, atlas_spacing_mm=2)
    assert result.tissue.geometry.same_grid(truth.geometry)
    # The registration alone (the warped atlas), then with the T1's intensity classes on top.
    registered = dice(result.registered.wm > 0.5, truth.wm > 0.5)
    classified = dice(result.tissue.wm > 0.5, truth.wm > 0.5)
    unregistered = dice(warp(atlas.wm, atlas.geometry, sitk.Transform(), truth.geometry) > 0.5, truth.wm > 0.5)
    assert registered >= 0.85, (registered, unregistered)
    assert unregistered < 0.7, unregistered
    # The template's own T1 classified by its intensities agrees with the template's WM probability map (a
    # population average, not a segmentation of that T1) less closely than the exact registration: 0.94 against 0.97.
    assert result.metrics["classes_used"] == 1.0 and classified >= 0.9, (classified, registered)
    assert result.passed and result.quality >= max(T1_QUALITY_THRESHOLD, 0.9)
    total = result.tissue.wm + result.tissue.gm + result.tissue.csf
    assert total.max() <= 1.0 + 1e-5
    assert result.runtime_s > 0 and result.warnings == []


def test_tissue_registration_refills_a_lesion(atlas, deformed):
    truth, _ = deformed
    # A 36 mm lesion in the right hemisphere's deep WM/GM, relabelled CSF as segmentation tools label a tumor core.
    center = centre_of(truth.geometry) + np.array([28.0, 5.0, 12.0])
    lesion = np.linalg.norm(truth.geometry.ras_grid() - center, axis=-1) < 18.0
    was_brain = lesion & (truth.brain_fraction >= 0.5)
    assert was_brain.sum() > 0.8 * lesion.sum()
    patient = Tissue(np.where(lesion, 0, truth.wm), np.where(lesion, 0, truth.gm),
                     np.where(lesion, 1, truth.csf), truth.geometry)
    updates = []
    result = register_atlas_to_tissue(patient, lesion, progress=lambda f, m: updates.append(f))
    refilled = result.tissue.brain_fraction >= 0.5
    assert refilled[was_brain].mean() >= 0.8
    # WM where the truth had WM; the unregistered atlas places it clearly worse (Dice ~0.75 there).
    registered_wm = dice(result.tissue.wm[lesion] > 0.5, truth.wm[lesion] > 0.5)
    unregistered_wm = dice(warp(atlas.wm, atlas.geometry, sitk.Transform(), truth.geometry)[lesion] > 0.5,
                           truth.wm[lesion] > 0.5)
    assert registered_wm >= 0.9 and unregistered_wm < 0.8, (registered_wm, unregistered_wm)
    assert result.passed and result.quality >= 0.9
    assert result.tissue.geometry.same_grid(truth.geometry)
    assert updates[-1] == 1.0 and all(b >= a for a, b in zip(updates, updates[1:]))
    assert result.transform.GetName() == "CompositeTransform"


def test_noise_fails_the_quality_check(atlas):
    rng = np.random.default_rng(1)
    # A small 4 mm grid over the atlas's centre keeps this fast; noise is noise at any size.
    grid = atlas.geometry.with_spacing(4.0)
    grid = grid.sub_box([(n // 4, n - n // 4) for n in grid.shape_kji])
    fractions = rng.uniform(size=(3,) + grid.shape_kji).astype(np.float32)
    fractions /= fractions.sum(axis=0)
    result = register_atlas_to_tissue(Tissue(fractions[0], fractions[1], fractions[2], grid), None)
    assert not result.passed
    assert result.quality < TISSUE_QUALITY_THRESHOLD
    assert any("registration is poor" in w for w in result.warnings)


def skull_t1():
    """The template T1 on a 2 mm grid with room around it, inside a dark gap (4-10 mm) and a bright shell (10-18 mm):
    what a T1 with its skull and scalp looks like to a threshold."""
    from scipy.ndimage import distance_transform_edt

    template = load_atlas_t1(2)
    pad = 16
    array = np.pad(template.array, pad)
    geometry = Geometry(array.shape, template.geometry.spacing_ijk_mm,
                        template.geometry.index_kji_to_ras([-pad, -pad, -pad]), template.geometry.direction_ras)
    distance_mm = distance_transform_edt(array < 0.05, sampling=geometry.spacing_kji_mm)
    array = np.where((distance_mm > 10) & (distance_mm <= 18), 0.9, array).astype(np.float32)
    return Volume(array, geometry)


def test_t1_with_skull_is_refused():
    with pytest.raises(InputError, match="looks like a T1 with the skull: skull-strip it first") as error:
        tissue_from_t1(skull_t1())
    assert "\n" not in str(error.value)


def test_bad_t1_inputs_are_refused(deformed):
    truth, _ = deformed
    grid = truth.geometry
    with pytest.raises(InputError, match="empty or constant"):
        tissue_from_t1(Volume(np.full(grid.shape_kji, 7.0, np.float32), grid))
    with pytest.raises(InputError, match="empty or constant"):
        tissue_from_t1(Volume(np.zeros(grid.shape_kji, np.float32), grid))
    with pytest.raises(InputError, match="3-D"):
        tissue_from_t1(sitk.Image([30, 30], sitk.sitkFloat32))
    with pytest.raises(InputError, match="NaN"):
        tissue_from_t1(Volume(np.full(grid.shape_kji, np.nan, np.float32), grid))
    t1 = Volume(truth.wm + 0.5 * truth.gm, grid)
    with pytest.raises(InputError, match="lesion mask has shape"):
        tissue_from_t1(t1, lesion_mask=np.zeros((3, 3, 3), bool))
    with pytest.raises(InputError, match="lesion mask has shape"):
        register_atlas_to_tissue(truth, np.zeros((3, 3, 3), bool))
    with pytest.raises(InputError, match="covers"):
        register_atlas_to_tissue(truth, np.ones(grid.shape_kji, bool))


def test_cancel_stops_the_registration(deformed):
    truth, _ = deformed
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        register_atlas_to_tissue(truth, None, cancel=cancel)
