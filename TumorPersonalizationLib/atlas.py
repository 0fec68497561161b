"""The bundled brain atlas: MNI ICBM152 2009a WM/GM/CSF fractions at 1 mm and 2 mm (see Resources/Atlas/NOTICE)."""
import os
from pathlib import Path
from typing import Dict

import numpy as np

from .errors import InputError
from .geometry import Volume
from .tissue import Tissue


def resources_dir() -> Path:
    """Resources/ of the extension; TUMORPERSONALIZATION_RESOURCES overrides (e.g. inside a Slicer package)."""
    override = os.environ.get("TUMORPERSONALIZATION_RESOURCES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1] / "Resources"


ATLAS_DIR = resources_dir() / "Atlas"
ATLAS_SPACINGS_MM = (1, 2)


def atlas_paths(spacing_mm: int = 2, directory: Path = None) -> Dict[str, Path]:
    if spacing_mm not in ATLAS_SPACINGS_MM:
        raise InputError(f"the atlas is bundled at {ATLAS_SPACINGS_MM} mm, not {spacing_mm} mm")
    directory = Path(directory) if directory is not None else ATLAS_DIR
    return {name: directory / f"icbm152_2009a_sym_{spacing_mm}mm_{name}.nii.gz" for name in ("wm", "gm", "csf")}


def load_atlas(spacing_mm: int = 2) -> Tissue:
    """The bundled adult brain atlas as a Tissue (RAS mm coordinates of MNI space)."""
    paths = atlas_paths(spacing_mm)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise InputError(f"bundled atlas file missing: {missing[0]} (rebuild with scripts/make_atlas.py)")
    volumes = {name: Volume.load(path) for name, path in paths.items()}
    fractions = {name: v.array.astype(np.float32) / 255.0 for name, v in volumes.items()}
    return Tissue(fractions["wm"], fractions["gm"], fractions["csf"], volumes["wm"].geometry)
