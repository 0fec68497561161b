"""The bundled brain atlas: MNI ICBM152 2009a WM/GM/CSF fractions and the skull-stripped T1 template of the same
source, on one grid, at 1 mm and 2 mm (see Resources/Atlas/NOTICE)."""
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


def atlas_t1_path(spacing_mm: int = 2, directory: Path = None) -> Path:
    """Path of the atlas's skull-stripped T1 template (uint8, value / 255) at 1 or 2 mm; InputError otherwise."""
    if spacing_mm not in ATLAS_SPACINGS_MM:
        raise InputError(f"the atlas T1 is bundled at {ATLAS_SPACINGS_MM} mm, not {spacing_mm} mm")
    directory = Path(directory) if directory is not None else ATLAS_DIR
    return directory / f"icbm152_2009a_sym_{spacing_mm}mm_t1.nii.gz"


def load_atlas_t1(spacing_mm: int = 2) -> Volume:
    """The atlas's skull-stripped T1 template as a float32 Volume in [0, 1], on exactly the grid of
    load_atlas(spacing_mm) (RAS mm of MNI space); InputError when the file is missing."""
    path = atlas_t1_path(spacing_mm)
    if not path.exists():
        raise InputError(f"bundled atlas file missing: {path} (rebuild with scripts/make_atlas.py --only t1)")
    volume = Volume.load(path)
    return Volume(volume.array.astype(np.float32) / np.float32(255.0), volume.geometry)
