"""Every warning a personalisation can carry is raised where it is due and absent on a good fit: poor fit (for a
concentration and for a segmentation), a parameter on its bound, a tumor larger than the networks' frame, several
foci, visible tumor outside grey/white matter, and a refilled lesion.

Where the answer itself must be bad (poor fit, on a bound), the method is replaced by one that returns a chosen
answer, so the test checks the pipeline's judgement of an answer, not a method's luck."""
import numpy as np
import pytest

from TumorPersonalizationLib import GrowthParameters, pipeline, simulate
from TumorPersonalizationLib.geometry import Volume
from TumorPersonalizationLib.inversion import MIN_MU_D_MM, Candidate
from TumorPersonalizationLib.observation import Observation
from TumorPersonalizationLib.pipeline import personalize
from TumorPersonalizationLib.tissue import Tissue

TRUTH = GrowthParameters((28.0, -12.0, 24.0), 6.0, 2.5)


@pytest.fixture(scope="module")
def atlas():
    from TumorPersonalizationLib.atlas import load_atlas

    return load_atlas(2)


@pytest.fixture(scope="module")
def tumor(atlas):
    return simulate(atlas, TRUTH)


def _segmentation(concentration: np.ndarray) -> np.ndarray:
    labels = np.zeros(concentration.shape, np.int16)
    labels[concentration >= 0.25] = 2
    labels[concentration >= 0.675] = 3
    return labels


def _answering(monkeypatch, parameters: GrowthParameters):
    """Make every method return `parameters` (found in the default search space of the problem)."""
    def method(name, problem):
        return Candidate(parameters, "chosen by the test", space=problem.space)

    monkeypatch.setattr(pipeline, "run_method", method)


def _kinds(warnings):
    """The warnings' kinds, from their wording's fixed part."""
    found = set()
    for warning in warnings:
        for kind, words in (("poor fit", "poor fit"), ("bound", "on its"), ("frame", "larger than the networks"),
                            ("foci", "separate components"), ("outside", "outside grey/white matter"),
                            ("refilled", "lesion tissue refilled")):
            if words in warning:
                found.add(kind)
    return found


@pytest.fixture(scope="module")
def good_fit(atlas, tumor):
    return personalize(atlas, Observation.from_volume(tumor, "concentration"), method="direct", device="cpu",
                       lesion_tissue="keep")


def test_a_good_fit_carries_no_warning(good_fit):
    assert good_fit.fit["ncc"] > 0.95
    assert good_fit.warnings == []


@pytest.mark.parametrize("kind, words", [("concentration", "poor fit: NCC"), ("segmentation", "poor fit: Dice")])
def test_a_poor_fit_is_flagged(atlas, tumor, monkeypatch, kind, words):
    array = tumor.array if kind == "concentration" else _segmentation(tumor.array)
    observation = Observation.from_volume(Volume(array, atlas.geometry), kind)
    # The right size in the wrong place: 20 mm away, still in the search space's brain.
    _answering(monkeypatch, GrowthParameters((28.0, -32.0, 24.0), TRUTH.mu_d_mm, TRUTH.mu_rho))
    result = personalize(atlas, observation, lesion_tissue="keep")
    assert any(w.startswith(words) and "do not rely on the infiltration map" in w for w in result.warnings)
    assert _kinds(result.warnings) == {"poor fit"}


def test_a_parameter_on_its_bound_is_flagged(atlas, tumor, monkeypatch):
    _answering(monkeypatch, GrowthParameters(TRUTH.seed_ras_mm, MIN_MU_D_MM, TRUTH.mu_rho))
    result = personalize(atlas, Observation.from_volume(tumor, "concentration"), lesion_tissue="keep")
    assert any(w.startswith("mu_D = 0.5 ended on its lower bound") for w in result.warnings)


def test_a_tumor_larger_than_the_frame_is_flagged(atlas):
    large = simulate(atlas, GrowthParameters((0.0, -20.0, 20.0), 20.0, 4.0))
    result = personalize(atlas, Observation.from_volume(large, "concentration"), method="direct", device="cpu",
                         lesion_tissue="keep")
    assert "frame" in _kinds(result.warnings)
    assert any("128 mm frame" in w for w in result.warnings)


def test_several_foci_are_flagged(atlas, tumor):
    other = simulate(atlas, GrowthParameters((-30.0, -12.0, 24.0), 4.0, 2.5))
    both = Volume(np.maximum(tumor.array, other.array), atlas.geometry)
    result = personalize(atlas, Observation.from_volume(both, "concentration"), method="direct", device="cpu",
                         lesion_tissue="keep")
    assert any("the tumor has 2 separate components" in w for w in result.warnings)


def test_tumor_outside_the_brain_and_a_refilled_lesion_are_flagged(atlas, tumor):
    labels = atlas.labelmap()
    seg = _segmentation(tumor.array)
    labels[seg == 3] = 1  # the core labelled CSF, as a segmentation tool labels a tumor-bearing brain
    tissue = Tissue.from_labelmap(Volume(labels, atlas.geometry))
    observation = Observation.from_volume(Volume(seg, atlas.geometry), "segmentation")
    kept = personalize(tissue, observation, method="direct", device="cpu", lesion_tissue="keep")
    assert "outside" in _kinds(kept.warnings) and "refilled" not in _kinds(kept.warnings)
    refilled = personalize(tissue, observation, method="direct", device="cpu", lesion_tissue="surround")
    assert "refilled" in _kinds(refilled.warnings) and "outside" not in _kinds(refilled.warnings)
