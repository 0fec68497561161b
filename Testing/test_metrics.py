"""Metrics against hand-computed answers."""
import numpy as np
import pytest

from TumorPersonalizationLib import InputError
from TumorPersonalizationLib.metrics import compare, dice, ncc, tumor_volume_cm3


def test_known_answers():
    reference = np.array([0.0, 0.5, 1.0, 0.3, 9.0])
    predicted = np.array([0.0, 0.3, 1.0, 0.5, -9.0])
    brain = np.array([True, True, True, True, False])  # the last voxel is outside the brain and must not count
    m = compare(predicted, reference, brain)
    assert m["mse"] == pytest.approx((0.04 + 0.04) / 4)
    assert m["mae"] == pytest.approx(0.4 / 4)
    assert m["mse_normalised"] == pytest.approx(0.08 / 1.8)
    assert m["mae_normalised"] == pytest.approx(0.4 / 1.8)
    assert m["dice_0.25"] == pytest.approx(1.0)
    assert m["dice_0.675"] == pytest.approx(1.0)
    assert m["ncc"] == pytest.approx(np.corrcoef(predicted[:4], reference[:4])[0, 1])


def test_dice_and_ncc_edge_cases():
    assert dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    assert dice(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)) == pytest.approx(0.5)
    assert ncc(np.ones(3), np.ones(3)) == 1.0
    assert ncc(np.array([1.0, 2, 3]), np.array([-1.0, -2, -3])) == pytest.approx(-1.0)
    assert tumor_volume_cm3(np.array([0.2, 0.3, 0.9]), 1000.0) == pytest.approx(2.0)


def test_mismatched_shapes_refused():
    with pytest.raises(InputError, match="different shapes"):
        compare(np.zeros(3), np.zeros(4), np.ones(3, bool))
