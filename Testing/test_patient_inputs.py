"""The patients benchmark's synthesised tissue inputs (benchmarks/patient_inputs.py) have the properties it states:
a segmentation tool's labels of the tumor-bearing brain, the core cut out, registration-warped maps within the limits
the library cleans, and a T1 whose classes are ordered as on a real T1."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import patient_inputs as pi  # noqa: E402

from TumorPersonalizationLib.geometry import Volume  # noqa: E402
from TumorPersonalizationLib.tissue import Tissue  # noqa: E402


@pytest.fixture(scope="module")
def patient():
    """The 2 mm atlas with a tumor in the left hemisphere's white matter: a 12 mm core (half necrotic, half
    enhancing) inside a 24 mm oedema, both limited to WM+GM."""
    from TumorPersonalizationLib.atlas import load_atlas

    healthy = load_atlas(2)
    centre_kji = np.array(healthy.geometry.ras_to_index_kji((-25.0, -10.0, 20.0)))
    grid = np.indices(healthy.geometry.shape_kji, dtype=np.float64)
    spacing = np.asarray(healthy.geometry.spacing_kji_mm)[:, None, None, None]
    radius_mm = np.sqrt((((grid - centre_kji[:, None, None, None]) * spacing) ** 2).sum(axis=0))
    brain = healthy.brain_mask
    segmentation = np.zeros(healthy.geometry.shape_kji, np.int16)
    segmentation[(radius_mm <= 24) & brain] = pi.EDEMA
    segmentation[(radius_mm <= 12) & brain] = pi.ENHANCING
    segmentation[(radius_mm <= 6) & brain] = pi.NECROTIC
    assert (segmentation == pi.NECROTIC).sum() > 10 and (segmentation == pi.EDEMA).sum() > 500
    return healthy, segmentation


def test_labels_core_as_csf_oedema_as_gm_rest_unchanged(patient):
    healthy, segmentation = patient
    labels = pi.make_input("labels", healthy, segmentation, np.random.default_rng(0)).array
    core, edema = pi.core_and_edema(segmentation)
    assert np.all(labels[core] == pi.LABELS.csf)
    assert np.all(labels[edema] == pi.LABELS.gm)
    outside = segmentation == 0
    assert np.array_equal(labels[outside], healthy.labelmap()[outside])
    # The healthy brain under the core was mostly WM: the input really differs from the healthy labels there.
    assert np.mean(healthy.labelmap()[core] == pi.LABELS.wm) > 0.5
    tissue = Tissue.from_labelmap(Volume(labels, healthy.geometry))
    assert np.all(tissue.csf[core] == 1.0) and np.all(tissue.wm[core] == 0.0)


def test_core_cut_is_background_and_oedema_gm(patient):
    healthy, segmentation = patient
    labels = pi.make_input("core-cut", healthy, segmentation, np.random.default_rng(0)).array
    core, edema = pi.core_and_edema(segmentation)
    assert np.all(labels[core] == 0)
    assert np.all(labels[edema] == pi.LABELS.gm)
    outside = segmentation == 0
    assert np.array_equal(labels[outside], healthy.labelmap()[outside])
    tissue = Tissue.from_labelmap(Volume(labels, healthy.geometry))
    assert np.all(tissue.wm[core] + tissue.gm[core] + tissue.csf[core] == 0.0)


def test_warped_maps_within_cleanable_limits_and_moved(patient):
    healthy, segmentation = patient
    maps = pi.make_input("warped", healthy, segmentation, np.random.default_rng(3))
    arrays = {name: volume.array for name, volume in maps.items()}
    total = arrays["wm"] + arrays["gm"] + arrays["csf"]
    for name, array in arrays.items():
        assert maps[name].geometry.same_grid(healthy.geometry)
        assert -0.05 <= array.min() and array.max() <= 1.05, name
    assert total.max() <= 1.10 + 1e-6
    # The excursions a registration leaves are there (so the input tests the cleaning), within [-0.02, 1.03].
    low = min(a.min() for a in arrays.values())
    high = max(a.max() for a in arrays.values())
    assert -0.02 - 1e-6 <= low < -0.005 and 1.005 < high <= 1.03 + 1e-6
    assert total.max() > 1.0
    # Moved by a 1-2 mm displacement: different from the healthy maps at the borders, the same tissue overall.
    assert np.mean(np.abs(arrays["wm"] - healthy.wm)) > 0.01
    assert np.corrcoef(arrays["wm"].ravel(), healthy.wm.ravel())[0, 1] > 0.9
    # The same rng stream gives the same input.
    again = pi.make_input("warped", healthy, segmentation, np.random.default_rng(3))
    assert np.array_equal(again["gm"].array, arrays["gm"])


def test_t1_class_ordering_background_and_bias(patient):
    healthy, segmentation = patient
    t1 = pi.make_input("t1", healthy, segmentation, np.random.default_rng(5))
    assert t1.geometry.same_grid(healthy.geometry)
    array = t1.array
    core, edema = pi.core_and_edema(segmentation)
    labels = healthy.labelmap()
    outside = segmentation == 0
    means = {"wm": array[(labels == pi.LABELS.wm) & outside].mean(),
             "gm": array[(labels == pi.LABELS.gm) & outside].mean(),
             "oedema": array[edema].mean(), "core": array[core].mean(),
             "csf": array[(labels == pi.LABELS.csf) & outside].mean()}
    assert means["wm"] > means["gm"] > means["oedema"] > means["core"] > means["csf"] > 0, means
    head = (healthy.wm + healthy.gm + healthy.csf) >= pi.T1_HEAD_FRACTION
    assert np.all(array[~head] == 0.0) and array.min() >= 0.0
    # Noise: pure WM voxels scatter by about T1_NOISE and the bias (not a constant image).
    pure_wm = (healthy.wm > 0.99) & outside
    assert 0.5 * pi.T1_NOISE < array[pure_wm].std() < pi.T1_NOISE + pi.T1_BIAS * pi.T1_INTENSITY["wm"]
    assert abs(np.median(array[pure_wm]) - pi.T1_INTENSITY["wm"]) < 0.05


def test_unknown_input_named():
    with pytest.raises(ValueError, match="unknown input 'flair'"):
        pi.make_input("flair", None, None, np.random.default_rng(0))
