"""Anatomical variety for training data (offline code): random smooth deformations of a brain and
segmentation-like noise at tissue borders.

A deformation maps a point x of the new (deformed) brain to the atlas point it comes from,

    atlas(x) = c + A (x - c) + u(x),

with A a rotation times per-axis scaling about the centre c, and u a smooth random displacement field. The deformed
tissue is the atlas pulled back through that map (trilinear interpolation of the fractions), so every voxel of the
result holds fractions that some atlas neighbourhood had: they stay in [0, 1] and sum to at most 1. Everything is
drawn from a numpy Generator, so a deformation is a function of its seed.

A dataset draws each sample's anatomy in two steps: `draw_anatomy` (a few numbers: flags, scales, rotation, the seed
of the displacement field, an acquisition direction, a crop shift; cheap, and stored with the sample, so two datasets
can be checked for shared samples by what was drawn, not only by their random streams), then `apply_anatomy` (the
costly part: fields, interpolation).
"""
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..geometry import Geometry
from ..tissue import Tissue


@dataclass(frozen=True)
class DeformationPrior:
    """How large the random deformations are (defaults: the variety the anatomy recipe trains on)."""

    scale_range: float = 0.10  # each axis scaled by a factor in [1 - s, 1 + s]
    max_rotation_deg: float = 15.0  # about a uniformly random axis
    displacement_mm: float = 3.0  # standard deviation of each component of the smooth field
    smoothness_mm: float = 20.0  # the field's correlation length (Gaussian filter sigma)


@dataclass(frozen=True, eq=False)
class Deformation:
    """atlas(x) = center + matrix @ (x - center) + displacement(x); displacement is (K, J, I, 3) RAS mm on `grid`
    (None: a pure affine map)."""

    center_ras_mm: np.ndarray
    matrix: np.ndarray
    grid: Geometry
    displacement_ras_mm: Optional[np.ndarray] = None

    def atlas_points(self, ras_mm: np.ndarray) -> np.ndarray:
        """Atlas RAS points (..., 3) of deformed-brain RAS points (..., 3) (displacement: nearest grid value)."""
        ras_mm = np.asarray(ras_mm, np.float64)
        out = self.center_ras_mm + (ras_mm - self.center_ras_mm) @ self.matrix.T
        if self.displacement_ras_mm is not None:
            index = np.rint(self.grid.ras_to_index_kji(ras_mm)).astype(int)
            index = np.clip(index, 0, np.asarray(self.grid.shape_kji) - 1)
            out = out + self.displacement_ras_mm[index[..., 0], index[..., 1], index[..., 2]]
        return out

    def deformed_point(self, atlas_ras_mm) -> np.ndarray:
        """Where an atlas point lands in the deformed brain (the affine part inverted exactly; the displacement by
        fixed-point iteration, which converges as the field is smooth and small)."""
        target = np.asarray(atlas_ras_mm, np.float64)
        inverse = np.linalg.inv(self.matrix)
        x = self.center_ras_mm + (target - self.center_ras_mm) @ inverse.T
        for _ in range(20 if self.displacement_ras_mm is not None else 0):
            x = x + (target - self.atlas_points(x)) @ inverse.T
        return x


def random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    return _axis_angle_rotation(axis, rng.uniform(-max_angle_deg, max_angle_deg))


def _axis_angle_rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """The rotation by angle_deg about an axis (any length), by Rodrigues' formula."""
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def random_deformation(rng: np.random.Generator, grid: Geometry, prior: DeformationPrior = DeformationPrior(),
                       center_ras_mm=None) -> Deformation:
    """A deformation drawn from the prior, with its displacement field on `grid` (the tissue's)."""
    scales = rng.uniform(1 - prior.scale_range, 1 + prior.scale_range, 3)
    matrix = random_rotation(rng, prior.max_rotation_deg) @ np.diag(scales)
    displacement = smooth_displacement(rng, grid, prior.displacement_mm, prior.smoothness_mm)
    return Deformation(_grid_centre(grid) if center_ras_mm is None else np.asarray(center_ras_mm, np.float64),
                       matrix, grid, displacement)


def _grid_centre(grid: Geometry) -> np.ndarray:
    return grid.index_kji_to_ras((np.asarray(grid.shape_kji) - 1) / 2.0)


def smooth_displacement(rng: np.random.Generator, grid: Geometry, displacement_mm: float,
                        smoothness_mm: float) -> Optional[np.ndarray]:
    """(K, J, I, 3) RAS mm: three Gaussian-smoothed noise fields (sigma smoothness_mm), each scaled to a root mean
    square of displacement_mm; None when displacement_mm is 0."""
    from scipy.ndimage import gaussian_filter

    if displacement_mm <= 0:
        return None
    sigma = [smoothness_mm / s for s in grid.spacing_kji_mm]
    fields = []
    for _ in range(3):
        field = gaussian_filter(rng.normal(size=grid.shape_kji), sigma, mode="wrap")
        # Scaled by its root mean square, not its standard deviation: on a grid not much larger than the
        # correlation length the field is nearly a constant shift, whose tiny deviation must not blow it up.
        fields.append(field * (displacement_mm / max(float(np.sqrt(np.mean(field ** 2))), 1e-12)))
    return np.stack(fields, axis=-1)


def deform_tissue(tissue: Tissue, deformation: Deformation) -> Tissue:
    """The tissue pulled back through the deformation, on the tissue's own grid (outside the atlas: background)."""
    from scipy.ndimage import map_coordinates

    points = tissue.geometry.ras_grid()
    atlas_points = deformation.center_ras_mm + (points - deformation.center_ras_mm) @ deformation.matrix.T
    if deformation.displacement_ras_mm is not None:
        if not deformation.grid.same_grid(tissue.geometry):
            raise ValueError("the displacement field must be on the tissue's grid")
        atlas_points = atlas_points + deformation.displacement_ras_mm
    index = tissue.geometry.ras_to_index_kji(atlas_points)
    coordinates = np.moveaxis(index, -1, 0)
    fractions = [map_coordinates(a, coordinates, order=1, mode="constant", cval=0.0).astype(np.float32)
                 for a in (tissue.wm, tissue.gm, tissue.csf)]
    return Tissue(*_as_fractions(fractions), tissue.geometry)


def border_noise(tissue: Tissue, rng: np.random.Generator, amplitude: float = 0.15,
                 smoothness_mm: float = 3.0) -> Tissue:
    """Partial-volume disagreement like a segmentation tool's: smooth noise moves fraction between WM and GM where
    both are present (their border) and between GM and CSF likewise; pure voxels keep their tissue."""
    from scipy.ndimage import gaussian_filter

    sigma = [smoothness_mm / s for s in tissue.geometry.spacing_kji_mm]

    def noise():
        field = gaussian_filter(rng.normal(size=tissue.geometry.shape_kji), sigma)
        return field / max(float(np.sqrt(np.mean(field ** 2))), 1e-12) * amplitude

    wm, gm, csf = (a.astype(np.float64) for a in (tissue.wm, tissue.gm, tissue.csf))
    # The exchanged amount is bounded by what both sides hold, so nothing turns negative.
    shift = np.clip(noise() * 4 * wm * gm, -wm, gm)
    wm, gm = wm + shift, gm - shift
    shift = np.clip(noise() * 4 * gm * csf, -gm, csf)
    gm, csf = gm + shift, csf - shift
    return Tissue(*_as_fractions([wm, gm, csf]), tissue.geometry)


def _as_fractions(arrays):
    stacked = np.clip(np.stack(arrays).astype(np.float64), 0.0, 1.0)
    total = stacked.sum(axis=0)
    stacked /= np.maximum(total, 1.0)  # a sum above 1 (interpolation rounding) is scaled back, never below
    return [a.astype(np.float32) for a in stacked]


# ---- per-sample anatomy of a dataset -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnatomyPrior:
    """How each sample's brain differs from the atlas. The defaults switch everything off (the atlas-only recipe of
    the first datasets); dataset.RECIPES holds the training and shifted-test settings.

    deformation_probability: chance of a random deformation: every axis scaled by 1 +/- a draw from scale_range,
        a rotation by an angle drawn from rotation_deg about a random axis, and a smooth displacement field of
        displacement_mm (root mean square per component, correlation length smoothness_mm).
    border_noise_probability: chance of partial-volume noise at tissue borders (border_noise) of this amplitude,
        on soft (probability) tissue only.
    oblique_probability: chance that the tissue is re-acquired as a clinical scan would give it: resampled onto a
        grid of oblique_spacing_mm voxels (i, j, k) rotated by an angle from oblique_rotation_deg, then back onto
        the simulation grid (what the pipeline's working grid does to a patient's scan).
    crop_jitter_mm: the crop centre is shifted by a uniform draw in [-j, j] mm per axis, so the tumor does not sit
        at the frame's centre in every sample and the seed offset has to say where it is.
    crop_center: "concentration" (centre of mass of the whole simulated concentration) or "visible" (of its visible
        part, c >= 0.25: what an observation shows).
    """

    deformation_probability: float = 0.0
    scale_range: Tuple[float, float] = (0.0, 0.10)
    rotation_deg: Tuple[float, float] = (0.0, 15.0)
    displacement_mm: float = 3.0
    smoothness_mm: float = 20.0
    border_noise_probability: float = 0.0
    border_noise_amplitude: float = 0.15
    oblique_probability: float = 0.0
    oblique_spacing_mm: Tuple[float, float, float] = (0.9, 0.9, 3.0)
    oblique_rotation_deg: Tuple[float, float] = (5.0, 20.0)
    crop_jitter_mm: float = 0.0
    crop_center: str = "concentration"

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[Dict]) -> "AnatomyPrior":
        data = dict(data or {})
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class AnatomyDraw:
    """What one sample drew (identity / None where a step was not drawn)."""

    matrix: np.ndarray  # rotation @ diag(scales); the identity without deformation
    rotation_deg: float
    field_seed: int  # seed of the displacement field's noise; -1 without deformation
    noise_seed: int  # seed of the border noise; -1 without
    oblique_direction: np.ndarray  # direction of the re-acquisition grid; the identity without
    crop_jitter_mm: np.ndarray

    @property
    def deformed(self) -> bool:
        return self.field_seed >= 0

    @property
    def oblique(self) -> bool:
        return not np.allclose(self.oblique_direction, np.eye(3))

    @property
    def changes_tissue(self) -> bool:
        """False when the sample's tissue is its atlas variant itself (no deformation, re-acquisition or noise)."""
        return self.deformed or self.oblique or self.noise_seed >= 0

    @classmethod
    def from_record(cls, arrays: Dict[str, np.ndarray], n: int) -> "AnatomyDraw":
        """Sample n's draw from a dataset's arrays (format 2 data, without these fields: the atlas itself)."""
        if "deformation_matrix" not in arrays:
            return cls(np.eye(3), 0.0, -1, -1, np.eye(3), np.zeros(3))
        return cls(np.asarray(arrays["deformation_matrix"][n], np.float64),
                   float(arrays["deformation_rotation_deg"][n]), int(arrays["deformation_field_seed"][n]),
                   int(arrays["border_noise_seed"][n]), np.asarray(arrays["oblique_direction"][n], np.float64),
                   np.asarray(arrays["crop_jitter_mm"][n], np.float64))

    def record(self) -> Dict[str, np.ndarray]:
        """The draw as sample fields (stored in the dataset)."""
        # Matrices and shifts in float64: the sample's tissue can then be rebuilt exactly (sample_tissue).
        return {"deformation_matrix": self.matrix.astype(np.float64),
                "deformation_rotation_deg": np.float32(self.rotation_deg),
                "deformation_field_seed": np.int64(self.field_seed), "border_noise_seed": np.int64(self.noise_seed),
                "oblique_direction": self.oblique_direction.astype(np.float64),
                "crop_jitter_mm": self.crop_jitter_mm.astype(np.float64)}


def _rotation(rng: np.random.Generator, angle_range_deg: Sequence[float]) -> Tuple[np.ndarray, float]:
    """A rotation about a random axis by an angle whose size is drawn from angle_range_deg (random sign); and that
    size."""
    axis = rng.normal(size=3)
    angle = float(rng.uniform(*angle_range_deg)) * (1 if rng.uniform() < 0.5 else -1)
    return _axis_angle_rotation(axis, angle), abs(angle)


def draw_anatomy(rng: np.random.Generator, prior: AnatomyPrior, soft: bool = True) -> AnatomyDraw:
    """One sample's anatomy draw. Nothing is drawn from rng for a step whose probability is 0, so a prior with
    everything off leaves the stream as the first datasets used it. soft: the tissue holds probabilities (border
    noise applies only then)."""
    matrix, angle, field_seed, noise_seed = np.eye(3), 0.0, -1, -1
    oblique, jitter = np.eye(3), np.zeros(3)
    if prior.deformation_probability > 0 and rng.uniform() < prior.deformation_probability:
        signs = np.where(rng.uniform(size=3) < 0.5, -1.0, 1.0)
        scales = 1.0 + signs * rng.uniform(*prior.scale_range, size=3)
        rotation, angle = _rotation(rng, prior.rotation_deg)
        matrix = rotation @ np.diag(scales)
        field_seed = int(rng.integers(2 ** 62))
    if prior.border_noise_probability > 0 and rng.uniform() < prior.border_noise_probability and soft:
        noise_seed = int(rng.integers(2 ** 62))
    if prior.oblique_probability > 0 and rng.uniform() < prior.oblique_probability:
        oblique, _ = _rotation(rng, prior.oblique_rotation_deg)
    if prior.crop_jitter_mm > 0:
        jitter = rng.uniform(-prior.crop_jitter_mm, prior.crop_jitter_mm, 3)
    return AnatomyDraw(matrix, angle, field_seed, noise_seed, oblique, jitter)


def apply_anatomy(tissue: Tissue, draw: AnatomyDraw, prior: AnatomyPrior, hard_labels: bool = False) -> Tissue:
    """The sample's tissue on the tissue's grid: deformed, re-acquired obliquely and with border noise as drawn;
    hard_labels: the result is made a hard label map again (argmax), as the variant it came from."""
    out = tissue
    if draw.deformed:
        field = smooth_displacement(np.random.default_rng(draw.field_seed), tissue.geometry, prior.displacement_mm,
                                    prior.smoothness_mm)
        out = deform_tissue(out, Deformation(_grid_centre(tissue.geometry), draw.matrix, tissue.geometry, field))
    if draw.oblique:
        out = reacquire(out, draw.oblique_direction, prior.oblique_spacing_mm, hard_labels)
    elif hard_labels and out is not tissue:
        out = Tissue.from_labelmap(out.volume(out.labelmap()))
    if draw.noise_seed >= 0:
        out = border_noise(out, np.random.default_rng(draw.noise_seed), prior.border_noise_amplitude)
    return out


def oblique_geometry(geometry: Geometry, rotation: np.ndarray, spacing_ijk_mm: Sequence[float]) -> Geometry:
    """A grid of the given voxel size whose axes are the image's rotated by `rotation`, covering the image's
    whole extent, centred on the same point."""
    direction = np.asarray(rotation, np.float64) @ geometry.direction_ras
    corners = np.array([[k, j, i] for k in (-0.5, geometry.shape_kji[0] - 0.5)
                        for j in (-0.5, geometry.shape_kji[1] - 0.5) for i in (-0.5, geometry.shape_kji[2] - 0.5)])
    corners_ras = geometry.index_kji_to_ras(corners)
    centre = _grid_centre(geometry)
    along = (corners_ras - centre) @ direction  # coordinates along the new i, j, k axes
    extent = along.max(axis=0) - along.min(axis=0)
    spacing = np.asarray(spacing_ijk_mm, np.float64)
    shape_ijk = np.ceil(extent / spacing).astype(int)
    origin = centre - direction @ ((shape_ijk - 1) / 2.0 * spacing)
    return Geometry(tuple(int(n) for n in shape_ijk[::-1]), tuple(spacing), tuple(origin), direction)


def reacquire(tissue: Tissue, rotation: np.ndarray, spacing_ijk_mm: Sequence[float],
              hard_labels: bool = False) -> Tissue:
    """The tissue as an oblique, anisotropic scan would give it, brought back onto its own grid: resampled onto the
    oblique grid (area-weighted), optionally made hard labels there (a segmentation tool's output), and resampled
    back. The thick slices blur the brain along one oblique axis, as a clinical 3 mm acquisition does."""
    from ..geometry import resample_fraction

    scan = oblique_geometry(tissue.geometry, rotation, spacing_ijk_mm)
    fractions = [resample_fraction(a, tissue.geometry, scan) for a in (tissue.wm, tissue.gm, tissue.csf)]
    scanned = Tissue(*_as_fractions(fractions), scan)
    if hard_labels:
        scanned = Tissue.from_labelmap(scanned.volume(scanned.labelmap()))
    back = [resample_fraction(a, scan, tissue.geometry) for a in (scanned.wm, scanned.gm, scanned.csf)]
    return Tissue(*_as_fractions(back), tissue.geometry)


def shared_samples(first: Dict[str, np.ndarray], second: Dict[str, np.ndarray], seed_tolerance_mm: float = 0.5,
                   matrix_tolerance: float = 1e-4) -> list:
    """Pairs (i, j) of samples of two datasets that drew the same anatomy (variant flags, deformation matrix,
    acquisition direction) and the same seed (within seed_tolerance_mm): what 'no test sample comes from training'
    is checked on. Datasets without anatomy fields count as undeformed atlas samples."""
    def fields(data):
        n = len(data["seed_ras_mm"])
        eye = np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3))
        return (np.asarray(data["seed_ras_mm"], np.float64),
                np.asarray(data.get("deformation_matrix", eye), np.float64).reshape(n, 9),
                np.asarray(data.get("oblique_direction", eye), np.float64).reshape(n, 9),
                np.stack([np.asarray(data["mirrored"]), np.asarray(data["hard_labels"])], axis=1))

    seeds_a, matrix_a, oblique_a, flags_a = fields(first)
    seeds_b, matrix_b, oblique_b, flags_b = fields(second)
    pairs = []
    for i in range(len(seeds_a)):
        same = (np.linalg.norm(seeds_b - seeds_a[i], axis=1) <= seed_tolerance_mm) \
            & (np.abs(matrix_b - matrix_a[i]).max(axis=1) <= matrix_tolerance) \
            & (np.abs(oblique_b - oblique_a[i]).max(axis=1) <= matrix_tolerance) & np.all(flags_b == flags_a[i], axis=1)
        pairs += [(i, int(j)) for j in np.flatnonzero(same)]
    return pairs
