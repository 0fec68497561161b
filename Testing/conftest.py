"""Shared builders for small synthetic tissues (tests must stay fast on a 2-core CPU)."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from TumorPersonalizationLib.geometry import Geometry  # noqa: E402
from TumorPersonalizationLib.tissue import Tissue  # noqa: E402

# The stock-Slicer tests need the environments `make test-stock-slicer` builds, which sets this variable.
collect_ignore = [] if os.environ.get("TUMORPERSONALIZATION_STOCK_SLICER") else ["stock_slicer"]


def make_tissue(wm, gm=None, csf=None, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    wm = np.asarray(wm, np.float32)
    gm = np.zeros_like(wm) if gm is None else np.asarray(gm, np.float32)
    csf = np.zeros_like(wm) if csf is None else np.asarray(csf, np.float32)
    geometry = Geometry(wm.shape, spacing, origin, np.eye(3) if direction is None else direction)
    return Tissue(wm, gm, csf, geometry)


def heterogeneous_tissue(shape=(20, 22, 24), seed=0):
    """Random smooth-ish WM/GM/CSF mixture with a CSF pocket: exercises every face rule."""
    rng = np.random.default_rng(seed)
    wm = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    gm = (rng.uniform(0.0, 1.0, shape) * (1.0 - wm)).astype(np.float32)
    csf = (1.0 - wm - gm).astype(np.float32)
    k, j, i = (n // 2 for n in shape)
    wm[k - 3:k + 3, j + 3:j + 6, i - 3:i + 3] = 0.0
    gm[k - 3:k + 3, j + 3:j + 6, i - 3:i + 3] = 0.0
    csf[k - 3:k + 3, j + 3:j + 6, i - 3:i + 3] = 1.0
    # Centre voxel stays brain, so a seed there is valid.
    wm[k, j, i], gm[k, j, i], csf[k, j, i] = 0.8, 0.2, 0.0
    return make_tissue(wm, gm, csf)


@pytest.fixture
def atlas_2mm():
    from TumorPersonalizationLib.atlas import load_atlas

    return load_atlas(2)
