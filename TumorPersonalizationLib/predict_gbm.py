"""The PREDICT-GBM model contract: a folder of patients in, one tumor-cell map per patient out.

    tumor-personalization predict-gbm --input DIR --output OUT

reads every DIR/Patient-XXXXX/ holding XXXXX-gm.nii.gz, XXXXX-wm.nii.gz, XXXXX-csf.nii.gz (grey matter, white
matter and CSF probability maps on one grid) and XXXXX-tumorseg.nii.gz (labels 1 necrotic, 2 edema, 3 enhancing),
personalises the growth model with the library's default method (pipeline.personalize, the tumor given as a
segmentation) and writes OUT/XXXXX.nii.gz: the tumor-cell concentration on the probability maps' grid (same origin,
spacing and direction), float32.

The benchmark ranks the brain voxels by value and takes the highest ones up to the standard plan's volume, so the
written map is made fit for ranking (ranked_map):
- every brain voxel (GM + WM >= 0.1, holes such as the ventricles filled, as the plans' brain in plans.py) gets a
  value > 0: where the model's concentration is below RANK_FLOOR (1e-6; far in the tail it underflows to 0), the
  value is just below RANK_FLOOR instead of the concentration;
- no two brain voxels share a value: voxels of equal concentration (a plateau at 1 in a strongly proliferating
  core, the underflowed tail) are ordered by their distance to the fitted seed, nearer first, then by voxel order;
  values are then spread apart by the fewest float32 steps that make them strictly decreasing in that order;
- outside the brain the value is 0.
Every value stays in (0, 1] inside the brain, and a voxel of higher concentration always gets a higher value than
one of lower concentration (the ranking of non-tied voxels is unchanged). Values move by a few float32 steps
(1 step = 6e-8 just below 1) per voxel of a plateau: a plateau of 10,000 voxels at 1 ends about 6e-4 below 1.

A patient folder that is broken (a missing or unreadable file, a tumor outside the brain) is reported on stderr in
one line naming the folder and what is wrong, and the others are still processed; predict_gbm returns the failures.
"""
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .constants import DEFAULT_TUMOR_LABELS
from .errors import InputError
from .geometry import Geometry, Volume

PATIENT_PREFIX = "Patient-"
MAPS = ("gm", "wm", "csf", "tumorseg")
# Values below this are no concentration, only a rank: the model's tail there is below any imaging threshold by
# five orders of magnitude, and float32 has room for millions of distinct values just below it.
RANK_FLOOR = 1e-6


def find_patients(input_dir) -> List[Path]:
    """The patient folders (DIR/Patient-*) of the input, sorted by name. InputError when the input is not a folder or
    holds none."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise InputError(f"--input {input_dir} is not a folder")
    folders = sorted(p for p in input_dir.iterdir() if p.is_dir() and p.name.startswith(PATIENT_PREFIX))
    if not folders:
        raise InputError(f"--input {input_dir} holds no {PATIENT_PREFIX}XXXXX folders")
    return folders


def patient_id(folder) -> str:
    """XXXXX of DIR/Patient-XXXXX."""
    return Path(folder).name[len(PATIENT_PREFIX):]


def patient_files(folder) -> Dict[str, Path]:
    """{"gm", "wm", "csf", "tumorseg": path} of a patient folder; InputError naming the missing files."""
    folder = Path(folder)
    name = patient_id(folder)
    paths = {key: folder / f"{name}-{key}.nii.gz" for key in MAPS}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(f"missing {', '.join(missing)}")
    return paths


def ranked_map(concentration: np.ndarray, brain: np.ndarray, geometry: Geometry,
               seed_ras_mm: Sequence[float], floor: float = RANK_FLOOR) -> np.ndarray:
    """The concentration made fit for ranking (see the module's description): float32, 0 outside `brain`, in
    (0, 1] and pairwise distinct inside it, ordered as the concentration, ties broken by distance (mm) to
    seed_ras_mm (nearer higher), then by voxel order.

    concentration: (k, j, i) array with values in [0, 1] (clipped); brain: bool mask on the same grid; geometry: its
    grid (for the distances); floor: values below it become rank-keeping values just below it.
    """
    brain = np.asarray(brain, bool)
    if np.shape(concentration) != brain.shape or brain.shape != tuple(geometry.shape_kji):
        raise InputError(f"concentration {np.shape(concentration)}, brain {brain.shape} and grid "
                         f"{geometry.shape_kji} differ in shape")
    if not 0 < floor < 1:
        raise InputError(f"the rank floor must be in (0, 1), got {floor}")
    out = np.zeros(brain.shape, np.float32)
    index = np.flatnonzero(brain)
    if index.size == 0:
        return out
    values = np.clip(np.asarray(concentration, np.float64).ravel()[index], 0.0, 1.0)
    kji = np.column_stack(np.unravel_index(index, brain.shape))
    distance = np.linalg.norm(geometry.index_kji_to_ras(kji) - np.asarray(seed_ras_mm, np.float64), axis=1)
    order = np.lexsort((index, distance, -values))  # highest concentration first, then nearest the seed
    # Positive float32 numbers sort as their bit patterns read as integers: one step down in the integer is the next
    # float32 below. In the order above the capped values never increase; the running minimum of (bits + position),
    # minus the position, lowers each value by the fewest steps that make the sequence strictly decreasing, and
    # leaves it unchanged where it is already below its predecessor.
    capped = np.maximum(values[order], floor).astype(np.float32)
    bits = capped.view(np.int32).astype(np.int64)
    position = np.arange(bits.size, dtype=np.int64)
    bits = np.minimum.accumulate(bits + position) - position
    if bits[-1] <= 0:  # would need more voxels than float32 holds below the floor
        raise InputError(f"{index.size} brain voxels do not fit below a rank floor of {floor:g}")
    out.ravel()[index[order]] = bits.astype(np.int32).view(np.float32)
    return out


def predict_patient(folder, output_dir, method: Optional[str] = None, device: str = "auto",
                    tumor_labels: Sequence[int] = DEFAULT_TUMOR_LABELS, progress=None, **personalize_options) -> Path:
    """Personalise one patient folder and write OUTPUT/XXXXX.nii.gz (ranked_map of the concentration, on the
    probability maps' grid). method/device/progress: as pipeline.personalize (None: the default method);
    personalize_options: more keyword arguments of personalize. Returns the written path; raises InputError for a
    broken folder (missing or unreadable files, maps on different grids, a tumor outside the brain)."""
    from .observation import Observation
    from .pipeline import personalize
    from .plans import planning_brain_mask
    from .tissue import Tissue

    paths = patient_files(folder)
    tissue = Tissue.from_probabilities(paths["wm"], paths["gm"], paths["csf"])
    observation = Observation.from_file(paths["tumorseg"], "segmentation", tuple(tumor_labels))
    result = personalize(tissue, observation, method=method, device=device, progress=progress,
                         **personalize_options)
    brain = planning_brain_mask(tissue.wm, tissue.gm)
    ranked = ranked_map(result.concentration.array, brain, tissue.geometry, result.parameters.seed_ras_mm)
    out = Path(output_dir) / f"{patient_id(folder)}.nii.gz"
    Volume(ranked, tissue.geometry).save(out)
    return out


def predict_gbm(input_dir, output_dir, method: Optional[str] = None, device: str = "auto",
                tumor_labels: Sequence[int] = DEFAULT_TUMOR_LABELS, log: Optional[Callable[[str], None]] = None,
                **personalize_options) -> Tuple[List[Path], Dict[str, str]]:
    """Every patient folder of input_dir into output_dir/XXXXX.nii.gz. A broken folder is logged in one line and
    skipped; the others go on. Returns (written paths, {folder name: error message} of the failed ones).

    log(line): where progress and failures go (default: stderr). InputError (before any work) when input_dir holds
    no patient folders or output_dir cannot be written."""
    from .imageio import check_writable_directory

    if log is None:
        def log(line):
            print(line, file=sys.stderr, flush=True)

    folders = find_patients(input_dir)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output {output_dir} exists and is not a folder")
    check_writable_directory(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written, failed = [], {}
    for number, folder in enumerate(folders, 1):
        prefix = f"predict-gbm: [{number}/{len(folders)}] {folder.name}"
        started = time.perf_counter()
        try:
            patient_files(folder)  # a missing file is reported before the patient is announced
            log(f"{prefix}: personalising")
            path = predict_patient(folder, output_dir, method, device, tumor_labels, **personalize_options)
        except InputError as error:
            failed[folder.name] = " ".join(str(error).split())
        except Exception as error:  # one broken patient must not stop the others
            failed[folder.name] = " ".join(f"{type(error).__name__}: {error}".split())
        else:
            written.append(path)
            log(f"{prefix}: wrote {path} ({time.perf_counter() - started:.1f} s)")
            continue
        log(f"{prefix} failed: {failed[folder.name]}")
    return written, failed
