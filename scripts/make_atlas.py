#!/usr/bin/env python
"""Build the bundled brain atlas (Resources/Atlas) from the MNI ICBM152 2009a template shipped inside nilearn.

WM and GM are the template's probability maps. CSF = brain mask - GM - WM, where the brain mask keeps the
ventricles: GM+WM thresholded, closed and hole-filled, united with the (skull-stripped) T1 above a threshold.
The maps are cropped to the brain with a margin and stored as uint8 fractions (value / 255) at 1 mm and 2 mm
(2 mm = exact 2x2x2 block average of 1 mm, by the reference arithmetic geometry.resample_fraction keeps for committed
data: the files regenerate byte for byte).

The template's skull-stripped T1 (the same source, already scaled 0..1 in nilearn) is cropped to the same box and
stored the same way (uint8, value / 255) beside them: what registration.tissue_from_t1 registers to a patient's T1.

nilearn is needed only here:  pip install nilearn  &&  python scripts/make_atlas.py [--only t1]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TumorPersonalizationLib.atlas import ATLAS_DIR, atlas_paths, atlas_t1_path  # noqa: E402
from TumorPersonalizationLib.geometry import Geometry, Volume, resample_fraction  # noqa: E402
from TumorPersonalizationLib.tissue import Tissue  # noqa: E402


def nifti_to_kji(image):
    """nibabel image (i, j, k array, RAS affine) -> float32 (k, j, i) array and Geometry."""
    array = np.asarray(image.get_fdata(), dtype=np.float32).transpose(2, 1, 0)
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return np.ascontiguousarray(array), Geometry(array.shape, spacing, affine[:3, 3], affine[:3, :3] / spacing)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=ATLAS_DIR)
    parser.add_argument("--brain-threshold", type=float, default=0.5, help="GM+WM level that seeds the brain mask")
    parser.add_argument("--t1-threshold", type=float, default=0.1, help="T1 level (template scale 0..1) inside brain")
    parser.add_argument("--closing-radius", type=int, default=3, help="closing radius in voxels (1 mm)")
    parser.add_argument("--margin-mm", type=int, default=4)
    parser.add_argument("--only", choices=("tissue", "t1"), default=None,
                        help="write only the tissue maps (wm, gm, csf) or only the T1 template (default: both)")
    args = parser.parse_args()

    from nilearn import datasets

    gm, geometry = nifti_to_kji(datasets.load_mni152_gm_template(resolution=1))
    wm, _ = nifti_to_kji(datasets.load_mni152_wm_template(resolution=1))
    t1, _ = nifti_to_kji(datasets.load_mni152_template(resolution=1))
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    # Where the two probability maps overlap to more than 1 (interpolation), renormalise.
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]

    seed = sitk.GetImageFromArray(((gm + wm) > args.brain_threshold).astype(np.uint8))
    closed = sitk.BinaryMorphologicalClosing(seed, [args.closing_radius] * 3)
    filled = sitk.BinaryFillhole(closed)
    brain = sitk.GetArrayFromImage(filled).astype(bool) | (t1 > args.t1_threshold)
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0, 1)
    print(f"brain mask {brain.sum() / 1000:.0f} cm^3, GM {gm.sum() / 1000:.0f}, WM {wm.sum() / 1000:.0f}, "
          f"CSF {csf.sum() / 1000:.0f} cm^3")

    tissue = Tissue(wm, gm, csf, geometry)
    occupied = np.argwhere((wm + gm + csf) > 0.01)
    lo = np.maximum(occupied.min(axis=0) - args.margin_mm, 0)
    hi = np.minimum(occupied.max(axis=0) + 1 + args.margin_mm, geometry.shape_kji)
    hi = np.minimum(lo + (hi - lo + 1) // 2 * 2, geometry.shape_kji)  # even sizes: 2 mm is an exact average
    box = [(int(a), int(b)) for a, b in zip(lo, hi)]
    crop = tuple(slice(a, b) for a, b in box)
    maps = {"wm": tissue.wm[crop], "gm": tissue.gm[crop], "csf": tissue.csf[crop], "t1": np.clip(t1[crop], 0, 1)}
    cropped = geometry.sub_box(box)
    coarse = cropped.with_spacing(2.0)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    names = {"tissue": ("wm", "gm", "csf"), "t1": ("t1",), None: ("wm", "gm", "csf", "t1")}[args.only]
    for spacing in (1, 2):
        level = cropped if spacing == 1 else coarse
        for name in names:
            # reference_mean: the block average the committed 2 mm maps were made with (byte-identical files).
            array = maps[name] if spacing == 1 else resample_fraction(maps[name], cropped, coarse, reference_mean=True)
            quantised = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
            path = atlas_t1_path(spacing, args.out_dir) if name == "t1" else atlas_paths(spacing, args.out_dir)[name]
            Volume(quantised, level).save(path)
            print(f"wrote {path} ({level.describe()}, {path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
