"""TumorPersonalization library: personalised Fisher-Kolmogorov brain-tumor growth modelling.

No Slicer or Qt import happens here; heavy modules (torch, SimpleITK) load when first used.
"""
from .errors import InputError
from .geometry import Geometry, Volume
from .parameters import GrowthParameters
from .tissue import Tissue, TissueLabels

__all__ = ["Geometry", "GrowthParameters", "InputError", "Tissue", "TissueLabels", "Volume", "load_atlas",
           "personalize",
           "simulate"]
__version__ = "0.1.0"


def simulate(*args, **kwargs):
    """Tumor-cell concentration at T = 1 on the tissue's grid; see solver.simulate."""
    from .solver import simulate as _simulate

    return _simulate(*args, **kwargs)


def load_atlas(spacing_mm: int = 2):
    """The bundled MNI ICBM152 2009a tissue atlas; see atlas.load_atlas."""
    from .atlas import load_atlas as _load_atlas

    return _load_atlas(spacing_mm)


def personalize(*args, **kwargs):
    """Growth parameters and infiltration map that explain an observed tumor; see pipeline.personalize."""
    from .pipeline import personalize as _personalize

    return _personalize(*args, **kwargs)
