"""The helpers the command line's demo and the inversion benchmark share (observation.labels_from_concentration,
parameters.later_growth and parameter_errors), and the one device check."""
import math

import numpy as np
import pytest

from TumorPersonalizationLib.errors import InputError
from TumorPersonalizationLib.observation import SegmentationLabels, labels_from_concentration
from TumorPersonalizationLib.parameters import GrowthParameters, later_growth, parameter_errors


def test_labels_from_concentration_thresholds_edema_and_enhancing():
    c = np.array([[[0.0, 0.2499, 0.25, 0.6749, 0.675, 1.0]]], np.float32)
    np.testing.assert_array_equal(labels_from_concentration(c), [[[0, 0, 2, 2, 3, 3]]])
    assert labels_from_concentration(c).dtype == np.int16
    np.testing.assert_array_equal(labels_from_concentration(c, 0.1, 0.9, SegmentationLabels(1, 2, 4)),
                                  [[[0, 2, 2, 2, 2, 4]]])


def test_later_growth_scales_both_mus_by_the_root_of_the_age_factor():
    today = GrowthParameters((1.0, -2.0, 3.0), 8.0, 2.0)
    later = later_growth(today)
    assert later.seed_ras_mm == today.seed_ras_mm
    assert later.mu_d_mm == pytest.approx(8.0 * math.sqrt(1.5)) and later.mu_rho == pytest.approx(2.0 * math.sqrt(1.5))
    assert later_growth(today, 4.0).mu_d_mm == pytest.approx(16.0)
    with pytest.raises(InputError, match="mu_rho"):
        later_growth(GrowthParameters((0.0, 0.0, 0.0), 1.0, 10.0), 4.0)  # mu_rho 20 > 12


def test_parameter_errors():
    errors = parameter_errors(GrowthParameters((3.0, 4.0, 0.0), 6.0, 1.5), GrowthParameters((0.0, 0.0, 0.0), 8.0, 2.0))
    assert errors == pytest.approx({"seed_mm": 5.0, "mu_d_relative": 0.25, "mu_rho_relative": 0.25})


def test_one_device_check():
    import torch

    from TumorPersonalizationLib.pipeline import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")
