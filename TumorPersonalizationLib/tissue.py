"""Brain tissue: white matter, grey matter and CSF fractions on a grid, with its geometry.

Tissue comes as a hard label map (what most segmentation tools give) or as three probability maps. Both become the
same ``Tissue``: three float32 fraction arrays in (k, j, i) order plus a ``Geometry``.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

import numpy as np

from .constants import BRAIN_FRACTION_THRESHOLD
from .errors import InputError
from .geometry import Geometry, Volume, crop_with_padding, cube_box_kji, resample_fraction, resample_linear
from .imageio import read_image

# Registration-warped probability maps overshoot [0, 1] a little (interpolation of sharp edges) and their sum can
# exceed 1 where three independently warped maps overlap: up to these limits they are cleaned with a warning, beyond
# them the maps are refused as not probability maps at all.
FRACTION_EXCURSION_LIMIT = 0.05
FRACTION_SUM_LIMIT = 1.10
# Sums up to this much over 1 are rounding, not overlap: maps stored as bytes (value / 255, as the bundled atlas) add
# up to 1 + 3 * 0.5 / 255 and are left as they are, so that a tissue written and read back is the same tissue.
FRACTION_SUM_ROUNDING = 0.01
# Three maps whose grids differ by at most this share of a voxel (at any corner of the image) are one grid written
# with rounding differences: they are resampled onto the WM map's grid.
GRID_MISMATCH_LIMIT_VOXELS = 0.1


@dataclass(frozen=True)
class TissueLabels:
    """Label values of a tissue label map; everything else is background."""

    csf: int = 1
    gm: int = 2
    wm: int = 3

    def __post_init__(self):
        values = (self.csf, self.gm, self.wm)
        if len(set(values)) != 3:
            raise InputError(f"tissue labels must be three different values, got CSF={self.csf} GM={self.gm} "
                             f"WM={self.wm}")


ImageLike = Union[str, Path, Volume, Any]  # Any: a SimpleITK.Image (not imported at module level)


def as_volume(image: ImageLike) -> Volume:
    """A Volume from a Volume, a file path or a SimpleITK image (InputError for an unreadable file)."""
    if isinstance(image, Volume):
        return image
    if isinstance(image, (str, Path)):
        return Volume.load(image)
    return Volume.from_sitk(image)


def _check_finite(array: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(array)):
        count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError(f"{what} contains {count} NaN or infinite voxels")


class Tissue:
    """WM/GM/CSF fractions (float32, (k, j, i)) on one grid."""

    def __init__(self, wm: np.ndarray, gm: np.ndarray, csf: np.ndarray, geometry: Geometry):
        arrays = []
        for name, array in (("WM", wm), ("GM", gm), ("CSF", csf)):
            array = np.asarray(array, dtype=np.float32)
            if array.shape != geometry.shape_kji:
                raise InputError(f"{name} map has shape {array.shape}, expected {geometry.shape_kji}")
            _check_finite(array, f"{name} map")
            if array.min() < -1e-3 or array.max() > 1 + 1e-3:
                raise InputError(f"{name} map must hold fractions in [0, 1], found values in "
                                 f"[{array.min():.3g}, {array.max():.3g}]")
            arrays.append(np.clip(array, 0.0, 1.0))
        self.wm, self.gm, self.csf = arrays
        self.geometry = geometry
        # What was done to the input to make it valid (cleaned excursions, resampled maps): the pipeline passes
        # these on as warnings.
        self.notes: List[str] = []

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_labelmap(cls, labelmap: ImageLike, labels: TissueLabels = TissueLabels()) -> "Tissue":
        volume = as_volume(labelmap)
        array = volume.array
        if array.ndim != 3:
            raise InputError(f"a tissue label map must be a scalar 3-D image, got array shape {array.shape}")
        _check_finite(np.asarray(array, dtype=np.float64), "tissue label map")
        if np.issubdtype(array.dtype, np.floating) and not np.all(array == np.round(array)):
            raise InputError("tissue label map has non-integer values: for probability maps use "
                             "Tissue.from_probabilities (CLI: --wm/--gm/--csf)")
        found = {int(v) for v in np.unique(array)}
        if not found & {labels.wm, labels.gm}:
            raise InputError(f"tissue label map has no WM ({labels.wm}) or GM ({labels.gm}) voxels; labels found: "
                             f"{sorted(found)[:10]} (set the labels with --labels CSF GM WM)")
        return cls((array == labels.wm), (array == labels.gm), (array == labels.csf), volume.geometry)

    @classmethod
    def from_probabilities(cls, wm: ImageLike, gm: ImageLike, csf: ImageLike) -> "Tissue":
        """Tissue from three probability maps (WM, GM, CSF), e.g. warped from an atlas or written by SPM/FAST.

        Values outside [0, 1] by up to FRACTION_EXCURSION_LIMIT and sums up to FRACTION_SUM_LIMIT are cleaned
        (clipped, then renormalised where the sum exceeds 1) and noted; GM and CSF maps on a grid within
        GRID_MISMATCH_LIMIT_VOXELS of the WM map's are resampled onto it and noted (Tissue.notes). Raises InputError
        naming the map for larger excursions or sums, differing grids, or NaN values."""
        volumes = [as_volume(x) for x in (wm, gm, csf)]
        notes = []
        arrays = [np.asarray(volumes[0].array, np.float32)]
        for name, volume in zip(("GM", "CSF"), volumes[1:]):
            array = np.asarray(volume.array, np.float32)
            if not volume.geometry.same_grid(volumes[0].geometry):
                mismatch = grid_mismatch_voxels(volume.geometry, volumes[0].geometry)
                if mismatch > GRID_MISMATCH_LIMIT_VOXELS:
                    raise InputError(f"{name} map grid ({volume.geometry.describe()}) does not match the WM map grid "
                                     f"({volumes[0].geometry.describe()}): they differ by {mismatch:.2g} voxel "
                                     f"(at most {GRID_MISMATCH_LIMIT_VOXELS:g} is resampled)")
                _check_finite(array, f"{name} map")
                array = resample_linear(array, volume.geometry, volumes[0].geometry).astype(np.float32)
                notes.append(f"the {name} map's grid differs from the WM map's by {mismatch:.2g} voxel: resampled "
                             f"onto the WM map's grid")
            arrays.append(array)
        cleaned, cleaning_notes = clean_fractions(arrays, ("WM", "GM", "CSF"), volumes[0].geometry)
        tissue = cls(*cleaned, volumes[0].geometry)
        tissue.notes = notes + cleaning_notes
        return tissue

    @classmethod
    def from_file(cls, path: Union[str, Path], labels: TissueLabels = TissueLabels()) -> "Tissue":
        """A label map, or a 3-component image of (WM, GM, CSF) fractions."""
        import SimpleITK as sitk

        image = read_image(path)
        if image.GetDimension() != 3:
            raise InputError(f"{path}: expected a 3-D image, got {image.GetDimension()}-D")
        if image.GetNumberOfComponentsPerPixel() == 3:
            geometry = Geometry.from_sitk(image)
            array = sitk.GetArrayFromImage(image).astype(np.float32)
            cleaned, notes = clean_fractions([array[..., c] for c in range(3)], ("WM", "GM", "CSF"), geometry)
            tissue = cls(*cleaned, geometry)
            tissue.notes = notes
            return tissue
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{path}: expected a label map or 3 components (WM, GM, CSF), got "
                             f"{image.GetNumberOfComponentsPerPixel()} components")
        return cls.from_labelmap(image, labels)

    def to_volume_image(self):
        """The tissue as one 3-component SimpleITK image (WM, GM, CSF fractions, float32) on its grid: what
        tissue.nii.gz holds and Tissue.from_file reads back."""
        import SimpleITK as sitk

        stacked = np.stack([self.wm, self.gm, self.csf], axis=-1).astype(np.float32)
        image = sitk.GetImageFromArray(stacked, isVector=True)
        self.geometry.apply_to_sitk(image)
        return image

    # ---- derived maps ----------------------------------------------------------------------------------------
    @property
    def brain_fraction(self) -> np.ndarray:
        return self.wm + self.gm

    @property
    def brain_mask(self) -> np.ndarray:
        """Voxels that can hold tumor cells (WM+GM >= 0.1)."""
        return self.brain_fraction >= BRAIN_FRACTION_THRESHOLD

    def fractions_at_ras(self, ras_mm) -> Tuple[float, float, float]:
        """(WM, GM, CSF) of the voxel containing a RAS point; InputError if the point is outside the image."""
        if not self.geometry.contains_ras(ras_mm):
            raise InputError(f"point {tuple(round(float(x), 1) for x in ras_mm)} RAS mm is outside the image "
                             f"({self.geometry.describe()})")
        k, j, i = np.clip(np.round(self.geometry.ras_to_index_kji(ras_mm)).astype(int), 0,
                          np.asarray(self.geometry.shape_kji) - 1)
        return float(self.wm[k, j, i]), float(self.gm[k, j, i]), float(self.csf[k, j, i])

    def labelmap(self, labels: TissueLabels = TissueLabels()) -> np.ndarray:
        """Hard labels by largest fraction (background where all three are below 0.5 in sum)."""
        stack = np.stack([self.csf, self.gm, self.wm])
        out = np.asarray([labels.csf, labels.gm, labels.wm], dtype=np.uint8)[np.argmax(stack, axis=0)]
        out[stack.sum(axis=0) < 0.5] = 0
        return out

    def volume(self, array: np.ndarray) -> Volume:
        """Wrap an array that lives on this tissue's grid."""
        return Volume(array, self.geometry)

    # ---- grids -----------------------------------------------------------------------------------------------
    def resample(self, spacing_mm) -> "Tissue":
        """The same tissue on a grid with the given voxel size, area-averaged when coarsening."""
        target = self.geometry.with_spacing(spacing_mm)
        return Tissue(*(resample_fraction(a, self.geometry, target) for a in (self.wm, self.gm, self.csf)), target)

    def crop_cube(self, center_ras_mm: Sequence[float], size_mm: float) -> "Tissue":
        """A cube of side size_mm (rounded to whole voxels) centred on a RAS point; outside the image is background."""
        box = cube_box_kji(self.geometry, center_ras_mm, size_mm)
        return Tissue(*(crop_with_padding(a, box) for a in (self.wm, self.gm, self.csf)), self.geometry.sub_box(box))

    def mirrored_left_right(self) -> "Tissue":
        """The brain reflected left-right about the grid's central sagittal plane, on the same grid (augmentation).

        Needs an image axis aligned with R-L; for the symmetric MNI atlas centred on x=0 this is the mirror image."""
        lr_axis_ijk = int(np.argmax(np.abs(self.geometry.direction_ras[0])))
        if abs(abs(self.geometry.direction_ras[0, lr_axis_ijk]) - 1) > 1e-6:
            raise InputError("left-right mirroring needs an image axis aligned with R-L")
        flip = [slice(None)] * 3
        flip[2 - lr_axis_ijk] = slice(None, None, -1)
        return Tissue(*(np.ascontiguousarray(a[tuple(flip)]) for a in (self.wm, self.gm, self.csf)), self.geometry)


def grid_mismatch_voxels(a: Geometry, b: Geometry) -> float:
    """How far apart two grids of the same shape put the same voxel, in voxels (of the smaller spacing): the largest
    distance between the RAS positions of the image's eight corner voxels. +inf for different shapes."""
    if a.shape_kji != b.shape_kji:
        return float("inf")
    corners = np.array([[k, j, i] for k in (0, a.shape_kji[0] - 1) for j in (0, a.shape_kji[1] - 1)
                        for i in (0, a.shape_kji[2] - 1)], dtype=np.float64)
    distance_mm = np.linalg.norm(a.index_kji_to_ras(corners) - b.index_kji_to_ras(corners), axis=1).max()
    return float(distance_mm / min(min(a.spacing_ijk_mm), min(b.spacing_ijk_mm)))


def clean_fractions(arrays: Sequence[np.ndarray], names: Sequence[str], geometry: Geometry):
    """Probability maps with small excursions made fractions: each map clipped to [0, 1], then the three divided by
    their sum where it exceeds 1 + FRACTION_SUM_ROUNDING. Returns (arrays, notes); notes is empty when nothing changed.

    Raises InputError naming the map and the value when a map leaves [0, 1] by more than FRACTION_EXCURSION_LIMIT,
    or naming the voxel's sum when the maps add up to more than FRACTION_SUM_LIMIT (not probability maps)."""
    arrays = [np.asarray(a, np.float32) for a in arrays]
    for name, array in zip(names, arrays):
        _check_finite(array, f"{name} map")
        low, high = float(array.min()), float(array.max())
        if low < -FRACTION_EXCURSION_LIMIT or high > 1 + FRACTION_EXCURSION_LIMIT:
            value = low if low < -FRACTION_EXCURSION_LIMIT else high
            raise InputError(f"{name} map holds {value:.3g}: probability maps must lie in [0, 1] (up to "
                             f"{FRACTION_EXCURSION_LIMIT:g} outside is cleaned as interpolation overshoot)")
    total_raw = sum(arrays)
    worst_sum = float(total_raw.max())
    if worst_sum > FRACTION_SUM_LIMIT:
        raise InputError(f"WM + GM + CSF maps add up to {worst_sum:.3g} in a voxel: probability maps must sum to at "
                         f"most 1 (up to {FRACTION_SUM_LIMIT:g} is renormalised)")
    excursion = max(max(float(-a.min()), float(a.max()) - 1.0) for a in arrays)
    if excursion <= 1e-6 and worst_sum <= 1.0 + FRACTION_SUM_ROUNDING:
        return arrays, []
    clipped = [np.clip(a, 0.0, 1.0) for a in arrays]
    total = sum(clipped)
    over = total > 1.0 + FRACTION_SUM_ROUNDING
    cleaned = [np.where(over, a / np.maximum(total, 1e-12), a).astype(np.float32) for a in clipped]
    changed = np.zeros(total.shape, bool)
    for before, after in zip(arrays, cleaned):
        changed |= np.abs(before - after) > 1e-6
    volume_cm3 = float(changed.sum()) * geometry.voxel_volume_mm3() / 1000.0
    note = (f"tissue maps cleaned: values up to {max(excursion, 0.0):.3g} outside [0, 1] clipped and sums up to "
            f"{worst_sum:.3g} renormalised to 1 ({volume_cm3:.2f} cm^3 changed)")
    return cleaned, [note]
