"""Known deformations of the bundled atlas, shared by the registration tests (Testing/test_registration.py) and the
registration benchmark (benchmarks/registration.py): an affine part (rotation 8 degrees about an oblique axis,
translation 6 mm, scale 1.05) and a smooth B-spline displacement (3 mm root mean square on a 60 mm control grid),
resampled onto an oblique, optionally anisotropic grid."""
import numpy as np
import SimpleITK as sitk

from TumorPersonalizationLib.geometry import Geometry, Volume

LPS = np.array([-1.0, -1.0, 1.0])


def rotation_matrix(axis, angle_deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def known_deformation(center_ras, seed=0, displacement_mm=3.0):
    """A SimpleITK transform from the deformed brain's points to the atlas's (LPS): the deformed brain is the atlas
    rotated by 8 degrees, scaled by 1.05, shifted by 6 mm and bent by a smooth field."""
    center = np.asarray(center_ras, float) * LPS
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(center))
    affine.SetMatrix(tuple((rotation_matrix([0.3, 0.5, 0.8], 8.0) / 1.05).ravel()))
    shift = np.array([1.0, -0.6, 0.5])
    affine.SetTranslation(tuple(shift / np.linalg.norm(shift) * 6.0))
    domain = sitk.Image([8, 8, 8], sitk.sitkUInt8)
    domain.SetSpacing([30.0] * 3)
    domain.SetOrigin(tuple(center - 105.0))
    bspline = sitk.BSplineTransformInitializer(domain, [4, 4, 4], 3)
    coefficients = np.random.default_rng(seed).normal(size=bspline.GetNumberOfParameters())
    bspline.SetParameters(tuple(coefficients * displacement_mm / np.sqrt(np.mean(coefficients ** 2))))
    return sitk.CompositeTransform([affine, bspline])


def oblique_grid(center_ras, spacing_ijk, size_mm=(200, 230, 190), angles_deg=(10, -7, 5)):
    direction = (rotation_matrix([1, 0, 0], angles_deg[0]) @ rotation_matrix([0, 1, 0], angles_deg[1])
                 @ rotation_matrix([0, 0, 1], angles_deg[2]))
    spacing = np.asarray(spacing_ijk, float)
    size = np.ceil(np.asarray(size_mm) / spacing).astype(int)
    origin = np.asarray(center_ras) - direction @ ((size - 1) / 2 * spacing)
    return Geometry(tuple(size[::-1]), tuple(spacing), tuple(origin), direction)


def warp(array, source: Geometry, transform, target: Geometry) -> np.ndarray:
    image = Volume(np.asarray(array, np.float32), source).to_sitk()
    reference = Volume(np.zeros(target.shape_kji, np.float32), target).to_sitk()
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def centre_of(geometry: Geometry) -> np.ndarray:
    return geometry.index_kji_to_ras((np.asarray(geometry.shape_kji) - 1) / 2.0)
