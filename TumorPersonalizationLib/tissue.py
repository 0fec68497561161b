"""Brain tissue: white matter, grey matter and CSF fractions on a grid, with its geometry.

Tissue comes as a hard label map (what most segmentation tools give) or as three probability maps. Both become the
same ``Tissue``: three float32 fraction arrays in (k, j, i) order plus a ``Geometry``.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Tuple, Union

import numpy as np

from .constants import BRAIN_FRACTION_THRESHOLD
from .errors import InputError
from .geometry import Geometry, Volume, crop_with_padding, cube_box_kji, resample_fraction
from .imageio import read_image


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


def _as_volume(image: ImageLike) -> Volume:
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

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_labelmap(cls, labelmap: ImageLike, labels: TissueLabels = TissueLabels()) -> "Tissue":
        volume = _as_volume(labelmap)
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
        volumes = [_as_volume(x) for x in (wm, gm, csf)]
        for name, volume in zip(("GM", "CSF"), volumes[1:]):
            if not volume.geometry.same_grid(volumes[0].geometry):
                raise InputError(f"{name} map grid ({volume.geometry.describe()}) does not match the WM map grid "
                                 f"({volumes[0].geometry.describe()})")
        return cls(*(v.array for v in volumes), volumes[0].geometry)

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
            return cls(array[..., 0], array[..., 1], array[..., 2], geometry)
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{path}: expected a label map or 3 components (WM, GM, CSF), got "
                             f"{image.GetNumberOfComponentsPerPixel()} components")
        return cls.from_labelmap(image, labels)

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
