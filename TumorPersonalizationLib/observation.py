"""What was observed of the tumor, and how the model's concentration is compared with it (the imaging model).

Two kinds of observation:
- a tumor-cell concentration map in [0, 1] (synthetic data, or the output of another model): compared by the mean
  squared error over brain voxels;
- a tumor segmentation (BraTS-style labels): a tumor is visible on FLAIR/T2 where c >= 0.25 (edema and everything
  inside it) and on T1Gd where c >= 0.675 (the core: enhancing tumor and necrosis), constants.py. Thresholds are
  steps, so the fit uses a smooth version of them: p(c) = sigmoid((c - threshold) / width) with width 0.05 (the
  step blurred over +/- 0.1 in c), and the loss is the mean over brain voxels of
      ((p_edema(c) - visible)^2 + (p_core(c) - core)^2) / 2,
  a squared error between soft and observed masks: bounded, smooth, and zero only when both iso-surfaces of the
  model sit on the segmentation's borders.

Labels default to BraTS 2023 (1 necrotic core, 2 edema, 3 enhancing); BraTS 2021 files use enhancing = 4
(SegmentationLabels(1, 2, 4)). Any other label value in a segmentation is refused, so a tissue map given as a tumor
by mistake is caught.

An observation is resampled onto the tissue's grid (linear for a concentration, nearest label for a segmentation)
before anything else; from there the pipeline samples it onto the working and surrogate grids as fractions.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .constants import CORE_THRESHOLD, DEFAULT_TUMOR_LABELS, EDEMA_THRESHOLD
from .errors import InputError
from .geometry import Geometry, Volume, mask_box, resample_fraction, resample_linear

KINDS = ("concentration", "segmentation")


@dataclass(frozen=True)
class SegmentationLabels:
    """Label values of a tumor segmentation (BraTS 2023 defaults); 0 is background."""

    necrotic: int = DEFAULT_TUMOR_LABELS[0]
    edema: int = DEFAULT_TUMOR_LABELS[1]
    enhancing: int = DEFAULT_TUMOR_LABELS[2]

    def __post_init__(self):
        values = (self.necrotic, self.edema, self.enhancing)
        if len(set(values)) != 3 or 0 in values:
            raise InputError(f"tumor labels must be three different non-zero values, got NECROTIC={self.necrotic} "
                             f"EDEMA={self.edema} ENHANCING={self.enhancing}")

    @property
    def all(self) -> Tuple[int, int, int]:
        return (self.necrotic, self.edema, self.enhancing)


def labels_from_concentration(concentration, edema_threshold: float = EDEMA_THRESHOLD,
                              core_threshold: float = CORE_THRESHOLD,
                              labels: SegmentationLabels = SegmentationLabels()) -> np.ndarray:
    """A segmentation of a concentration map (array in [0, 1], (k, j, i)) as the imaging model sees it: edema where
    c >= edema_threshold, enhancing where c >= core_threshold (no necrosis), 0 elsewhere; int16, same shape."""
    c = np.asarray(concentration)
    out = np.zeros(c.shape, np.int16)
    out[c >= edema_threshold] = labels.edema
    out[c >= core_threshold] = labels.enhancing
    return out


@dataclass(frozen=True)
class ImagingModel:
    """Visibility thresholds of the imaging model and the width of their smooth version used in the fit."""

    edema_threshold: float = EDEMA_THRESHOLD
    core_threshold: float = CORE_THRESHOLD
    width: float = 0.05

    def __post_init__(self):
        if not 0 < self.edema_threshold < self.core_threshold < 1:
            raise InputError(f"imaging thresholds must satisfy 0 < edema < core < 1, got {self.edema_threshold} and "
                             f"{self.core_threshold}")
        if not 0 < self.width <= 0.5:
            raise InputError(f"imaging-model width must be in (0, 0.5], got {self.width}")


@dataclass
class Observation:
    """An observed tumor on its own grid: kind 'concentration' (values in [0, 1]) or 'segmentation' (labels)."""

    kind: str
    volume: Volume
    labels: SegmentationLabels = field(default_factory=SegmentationLabels)
    imaging: ImagingModel = field(default_factory=ImagingModel)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"unknown tumor kind {self.kind!r}: use 'concentration' or 'segmentation'")
        array = np.asarray(self.volume.array)
        if array.ndim != 3:
            raise InputError(f"the tumor image must be a scalar 3-D image, got array shape {array.shape}")
        if not np.all(np.isfinite(array)):
            count = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise InputError(f"tumor image contains {count} NaN or infinite voxels")
        if self.kind == "concentration":
            if array.min() < -1e-3 or array.max() > 1 + 1e-3:
                raise InputError(f"a tumor concentration must lie in [0, 1], found values in [{array.min():.3g}, "
                                 f"{array.max():.3g}] (a segmentation? use --tumor-kind segmentation)")
            self.volume = Volume(np.clip(array.astype(np.float32), 0.0, 1.0), self.volume.geometry)
        else:
            if np.issubdtype(array.dtype, np.floating) and not np.all(array == np.round(array)):
                raise InputError("a tumor segmentation must hold whole-number labels (a concentration map? use "
                                 "--tumor-kind concentration)")
            found = {int(v) for v in np.unique(array)}
            unknown = sorted(found - {0, *self.labels.all})
            if unknown:
                raise InputError(f"tumor segmentation has labels {unknown[:10]} that are not among NECROTIC EDEMA "
                                 f"ENHANCING = {list(self.labels.all)} (set them with --tumor-labels)")
            self.volume = Volume(array.astype(np.int16), self.volume.geometry)
        if not np.any(self.visible_mask_native()):
            raise InputError("the tumor image is empty: no voxel is visible tumor"
                             + (f" (concentration >= {self.imaging.edema_threshold:g})"
                                if self.kind == "concentration" else " (no tumor label)"))

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_volume(cls, volume: Volume, kind: str = "concentration",
                    labels: Union[SegmentationLabels, Sequence[int]] = SegmentationLabels(),
                    imaging: ImagingModel = ImagingModel()) -> "Observation":
        if not isinstance(labels, SegmentationLabels):
            labels = SegmentationLabels(*labels)
        return cls(kind, volume, labels, imaging)

    @classmethod
    def from_file(cls, path: Union[str, Path], kind: str = "concentration",
                  labels: Union[SegmentationLabels, Sequence[int]] = SegmentationLabels(),
                  imaging: ImagingModel = ImagingModel()) -> "Observation":
        return cls.from_volume(Volume.load(path), kind, labels, imaging)

    # ---- masks on the observation's own grid -----------------------------------------------------------------
    def visible_mask_native(self) -> np.ndarray:
        array = self.volume.array
        if self.kind == "concentration":
            return array >= self.imaging.edema_threshold
        return np.isin(array, self.labels.all)

    # ---- onto the tissue grid --------------------------------------------------------------------------------
    def on_grid(self, target: Geometry) -> "GriddedObservation":
        """The observation resampled onto a grid (the tissue's), as soft maps; InputError if it falls outside."""
        source = self.volume.geometry
        same = source.same_grid(target)
        if self.kind == "concentration":
            c = self.volume.array if same else np.clip(resample_linear(self.volume.array, source, target), 0, 1)
            visible = (c >= self.imaging.edema_threshold).astype(np.float32)
            core = (c >= self.imaging.core_threshold).astype(np.float32)
            gridded = GriddedObservation(self.kind, target, visible, core, c.astype(np.float32), self.imaging)
        else:
            labels = self.volume.array if same else nearest_labels(self.volume.array, source, target)
            visible = np.isin(labels, self.labels.all).astype(np.float32)
            core = np.isin(labels, (self.labels.necrotic, self.labels.enhancing)).astype(np.float32)
            gridded = GriddedObservation(self.kind, target, visible, core, None, self.imaging)
        if not np.any(gridded.visible > 0):
            raise InputError("the tumor image does not overlap the tissue image in space: tumor spans "
                             f"{describe_extent(source)}, tissue spans {describe_extent(target)} (RAS mm)")
        return gridded


@dataclass
class GriddedObservation:
    """An observation on a given grid as soft maps in [0, 1]: visible tumor, core, and (for a concentration
    observation) the concentration itself."""

    kind: str
    geometry: Geometry
    visible: np.ndarray
    core: np.ndarray
    concentration: Optional[np.ndarray]
    imaging: ImagingModel

    def resample(self, target: Geometry) -> "GriddedObservation":
        """The same observation as area fractions on another grid (working or surrogate grid)."""
        def move(array):
            return None if array is None else resample_fraction(array, self.geometry, target).astype(np.float32)

        return GriddedObservation(self.kind, target, move(self.visible), move(self.core), move(self.concentration),
                                  self.imaging)

    def in_frame(self, frame) -> "GriddedObservation":
        """The same observation in a SurrogateFrame (this observation must be on the frame's source grid)."""
        def move(array):
            return None if array is None else frame.sample(array)

        return GriddedObservation(self.kind, frame.geometry, move(self.visible), move(self.core),
                                  move(self.concentration), self.imaging)

    def pseudo_concentration(self) -> np.ndarray:
        """What the inverse network is shown: the concentration itself, or for a segmentation the labels as a
        concentration-like map (core 0.9, edema 0.45) blurred by a Gaussian of 2 mm (as measured, this
        gives the net a start as good as a concentration map's)."""
        if self.concentration is not None:
            return self.concentration
        return labels_pseudo_concentration(self.visible > 0.5, self.core > 0.5, self.geometry.spacing_kji_mm)

    def center_of_mass_ras(self, visible_only: bool = False) -> np.ndarray:
        """Centre of mass of the (pseudo-)concentration in RAS mm (of its visible part with visible_only): where the
        surrogate frame is centred, as the network's training crops were centred (its card says which)."""
        from scipy.ndimage import center_of_mass

        weights = self.pseudo_concentration()
        if visible_only:
            weights = np.where(self.visible > 0.5, weights, 0.0)
        # In the bounding box of the non-zero weights (the rest adds nothing; on a 1 mm brain the whole image took
        # 0.08 s), with scipy's broadcast index grids, not a full (3, K, J, I) float64 index array.
        support = weights != 0
        if not np.any(support):
            raise InputError("the observation shows no visible tumor" if visible_only else
                             "the observation holds no tumor")
        box = mask_box(support)
        # Summed in float64 (cheap in the box): a float32 sum put a centre meant to be a voxel boundary 2e-7 short of
        # it, and the frame, which snaps to the grid, a whole voxel off.
        centre_kji = np.asarray(center_of_mass(weights[box].astype(np.float64)), np.float64) + [b.start for b in box]
        return self.geometry.index_kji_to_ras(centre_kji)

    # ---- the data loss ---------------------------------------------------------------------------------------
    def loss_terms(self, device="cpu", dtype=None):
        """Tensors the loss needs, moved once to a device: (targets dict)."""
        import torch

        dtype = dtype or torch.float32
        out = {"visible": torch.as_tensor(self.visible, dtype=dtype, device=device),
               "core": torch.as_tensor(self.core, dtype=dtype, device=device)}
        if self.concentration is not None:
            out["concentration"] = torch.as_tensor(self.concentration, dtype=dtype, device=device)
        return out

    def loss(self, predicted, brain_mask, terms=None):
        """Data loss of predicted concentrations (B, K, J, I) (torch) -> (B,), averaged over brain voxels."""
        import torch

        terms = terms if terms is not None else self.loss_terms(predicted.device, predicted.dtype)
        count = brain_mask.sum().clamp(min=1.0)
        if self.kind == "concentration":
            squared = (predicted - terms["concentration"]) ** 2
        else:
            width = self.imaging.width
            p_visible = torch.sigmoid((predicted - self.imaging.edema_threshold) / width)
            p_core = torch.sigmoid((predicted - self.imaging.core_threshold) / width)
            squared = 0.5 * ((p_visible - terms["visible"]) ** 2 + (p_core - terms["core"]) ** 2)
        return (squared * brain_mask).flatten(1).sum(1) / count

    def no_tumor_loss(self, brain_mask, terms=None) -> float:
        """The data loss of predicting no tumor anywhere (a concentration of 0 in every brain voxel of `brain_mask`,
        a (K, J, I) torch tensor): the loss's natural scale, which shrinks with the tumor's share of the brain.

        Optimisers whose stopping rule compares loss values (CMA-ES's tolfun) divide by it, so that the rule means the
        same for a 2 cm^3 tumor and a 100 cm^3 one."""
        import torch

        empty = torch.zeros((1,) + tuple(brain_mask.shape), dtype=brain_mask.dtype, device=brain_mask.device)
        return float(self.loss(empty, brain_mask, terms)[0])


def nearest_labels(array: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray:
    """A label map (k, j, i) on `source` resampled onto `target` by nearest label (int16; 0 outside the source)."""
    import SimpleITK as sitk

    image = Volume(np.asarray(array, np.int16), source).to_sitk()
    reference = Volume(np.zeros(target.shape_kji, np.int16), target).to_sitk()
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    return sitk.GetArrayFromImage(resampled)


def describe_extent(geometry: Geometry) -> str:
    """The RAS box (mm) a grid's voxel centres span, as text for error messages."""
    corners = np.array([[k, j, i] for k in (0, geometry.shape_kji[0] - 1) for j in (0, geometry.shape_kji[1] - 1)
                        for i in (0, geometry.shape_kji[2] - 1)], dtype=np.float64)
    ras = geometry.index_kji_to_ras(corners)
    low, high = ras.min(axis=0), ras.max(axis=0)
    return "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(low, high)) + "]"


def labels_pseudo_concentration(visible: np.ndarray, core: np.ndarray, spacing_kji_mm) -> np.ndarray:
    """A segmentation as a concentration-like map: core 0.9, rest of the visible tumor 0.45, blurred by a Gaussian of
    2 mm (spacing_kji_mm: the voxel size in mm, numpy order). What the inverse network is shown for a segmentation,
    at inference and in training alike."""
    from scipy.ndimage import gaussian_filter

    labels = np.maximum(0.45 * np.asarray(visible, np.float32), 0.9 * np.asarray(core, np.float32))
    sigma = [2.0 / s for s in spacing_kji_mm]
    out = np.zeros_like(labels)
    if not np.any(labels):
        return out
    # Blurred in the labels' bounding box grown by the kernel's radius (scipy's truncation at 4 sigma) and a voxel:
    # every pass then reads only zeros beyond the box and in what its borders reflect, so the box holds exactly the
    # whole image's result (bit for bit: the same sums) and the rest is 0, for a fraction of the work (a 1 mm image
    # took 0.16 s a blur, three times per personalisation).
    box = mask_box(labels > 0, [int(4.0 * s + 0.5) + 1 for s in sigma])
    out[box] = np.clip(gaussian_filter(labels[box], sigma), 0.0, 1.0)
    return out
