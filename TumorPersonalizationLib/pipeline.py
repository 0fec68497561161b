"""Personalisation end to end: tissue + observed tumor -> parameters, infiltration map, target plans, report.

    result = personalize(tissue, observation, method=None, progress=callback, cancel=event)
    result = personalize(None, observation, t1=t1_volume)        # no tissue: derived from a skull-stripped T1
    write_outputs(result, "out_dir")      # parameters.json, infiltration.nii.gz, tissue.nii.gz, report.png, plan_*

Steps: the observation is resampled onto the tissue's grid and checked; the tissue inside the lesion is refilled with
healthy tissue (lesion.py: a patient's segmentation is of a tumor-bearing brain), or the tissue is derived from a T1
by registering the atlas (registration.py); the search runs on a working grid (2 mm by
default, or the tissue's own grid when that is coarser) and, for the networks, in the surrogate frame around the
tumor's centre of mass; the answer is then run once more with the FD solver on the tissue's own grid (so narrow
fronts are resolved as finely as the data allow; unless the method made that run already, as hybrid's close-call
judge does), and that run is the infiltration map, its loss the reported loss, and the base of the plans.
"""
import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from .constants import DEFAULT_METHOD, DEFAULT_WORKING_SPACING_MM, METHODS, STANDARD_MARGIN_MM
from .errors import InputError
from .geometry import Volume, mask_box
from .inversion import STEP_FINAL, InversionOptions, Problem, SearchSpace, run_method
from .lesion import DEFAULT_LESION_TISSUE, LESION_GROW_MM, LesionTissue, lesion_mask, refill_lesion
from .metrics import compare, dice
from .observation import GriddedObservation, Observation
from .parameters import GrowthParameters
from .plans import TargetPlans, make_plans
from .progress import ProgressCallback, check_cancel, report, sub_progress
from .tissue import Tissue

# A fit is called poor below these agreements with the observation (NCC for a concentration, Dice of the visible
# tumor for a segmentation): then the model does not explain the data and its infiltration map should not be used.
POOR_FIT_NCC = 0.9
POOR_FIT_DICE = 0.7
OUTPUT_FILES = ("parameters.json", "infiltration.nii.gz", "tissue.nii.gz", "report.png", "plan_standard.nii.gz",
                "plan_model.nii.gz", "plan_iso.nii.gz")


@dataclass
class PersonalizationResult:
    """What personalize returns. concentration: the FD run of `parameters` on the tissue's grid. tissue: the tissue
    the model ran on (the given one with its lesion refilled, or the one derived from a T1). lesion: how that tissue
    was made (LesionTissue: the lesion mask, its source and volumes)."""

    parameters: GrowthParameters
    concentration: Volume
    loss: float
    runtime_s: float
    history: List[Dict]
    plans: TargetPlans
    method: str
    warnings: List[str] = field(default_factory=list)
    fit: Dict[str, float] = field(default_factory=dict)
    search_space: Dict = field(default_factory=dict)
    provenance: Dict = field(default_factory=dict)
    observation: Optional[GriddedObservation] = None
    tissue: Optional[Tissue] = None
    lesion: Optional[LesionTissue] = None
    # Coverage of a later tumor by the plans (recurrence.add_recurrence), when a follow-up was given.
    recurrence: Optional[Dict] = None

    def to_dict(self) -> Dict:
        """The content of parameters.json."""
        out = {**self.parameters.to_dict(), "method": self.method, "loss": self.loss,
               "runtime_s": round(self.runtime_s, 3), "plans": self.plans.to_dict(), "fit": self.fit,
               "warnings": list(self.warnings), "search_space": self.search_space, "provenance": self.provenance,
               "history": self.history}
        if self.lesion is not None:
            out["tissue"] = self.lesion.to_dict()
        if self.recurrence is not None:
            out["recurrence"] = self.recurrence
        return out


def resolve_device(device: str) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA device is available (use cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


def working_tissue(tissue: Tissue, spacing_mm: Optional[float]) -> Tissue:
    """The tissue on the working grid: resampled to spacing_mm when the tissue is finer, else itself."""
    if spacing_mm is None or min(tissue.geometry.spacing_ijk_mm) >= spacing_mm - 1e-6:
        return tissue
    return tissue.resample(spacing_mm)


def personalize(tissue: Optional[Tissue], observation: Union[Observation, Volume], method: Optional[str] = None,
                progress: Optional[ProgressCallback] = None, cancel=None, device: str = "auto",
                working_spacing_mm: Optional[float] = DEFAULT_WORKING_SPACING_MM,
                options: Optional[InversionOptions] = None, iso_level: Optional[float] = None,
                margin_mm: float = STANDARD_MARGIN_MM, lesion_tissue: str = DEFAULT_LESION_TISSUE,
                t1: Optional[Volume] = None, lesion_grow_mm: float = LESION_GROW_MM,
                recurrence: Optional[Union[Observation, Volume]] = None,
                recurrence_labels=None) -> PersonalizationResult:
    """Find the growth parameters that explain an observed tumor and the infiltration map they imply.

    tissue: the patient's WM/GM/CSF (any orientation and spacing), or None when a T1 is given. observation: an
    Observation (concentration or segmentation; a plain Volume is taken as a concentration map), on any grid
    overlapping the tissue's. lesion_tissue: what fills the lesion (the visible tumor grown by lesion_grow_mm mm)
    before the fit: "atlas" (the default: the bundled atlas registered to the tissue), "surround" (the healthy
    WM/GM around it) or "keep" (the tissue as given); see lesion.py. t1: a skull-stripped T1-weighted Volume of the
    patient, instead of a tissue: the atlas's T1 is registered to it and its WM/GM/CSF warped onto the T1's grid,
    which is then the grid of every output (registration.tissue_from_t1). recurrence: a later tumor segmentation
    of the same patient (Volume of labels, any grid; labels recurrence_labels, default BraTS 2023): its share inside
    each plan goes to result.recurrence (recurrence.add_recurrence); it is checked before the search.
    method: one of inversion.METHODS, None for the default (DEFAULT_METHOD). progress(fraction, message) and cancel
    (anything with is_set()): see progress.py. device: "auto" (CUDA when present), "cpu" or "cuda".
    working_spacing_mm: voxel size (mm) of the grid the FD work of the search runs on (None: the tissue's grid).
    iso_level: also make the iso-concentration plan at this level. margin_mm: the standard plan's margin.
    Raises InputError for bad input (empty tumor, tumor outside the brain or the image, unknown method, missing or
    corrupt weights, neither or both of tissue and t1, a T1 with its skull) and progress.Cancelled when cancelled;
    nothing is written either way.
    """
    with blas_single_threaded():
        grid_source = t1 if t1 is not None else tissue
        if recurrence is not None and grid_source is not None:
            from .recurrence import recurrence_on_grid

            recurrence_on_grid(recurrence, grid_source.geometry, recurrence_labels)  # refused before the search
        result = _personalize(tissue, observation, method, progress, cancel, device, working_spacing_mm, options,
                              iso_level, margin_mm, lesion_tissue, t1, lesion_grow_mm)
        if recurrence is not None:
            from .recurrence import add_recurrence

            add_recurrence(result, recurrence, recurrence_labels)
        return result


def blas_single_threaded():
    """A context in which numpy's and scipy's BLAS runs on the calling thread only.

    Why: a search alternates short numpy/scipy steps (the L-BFGS-B update, resampling) with torch's multi-threaded
    network and solver passes. On a 2-core machine OpenBLAS's worker threads, left spinning after a BLAS call, then
    compete with torch's threads for the same cores: a backward pass of the surrogate inside gb-surrogate's L-BFGS-B
    took 18-140 ms, against 13-22 ms in a loop of backward passes alone, and the default method ran up to 1.8 times
    as long on small tumors (benchmarks/results/timing_repeats.json: both ways in one run, 5 cases x 2 input kinds x 4
    rounds). No step of a personalisation gains from threaded BLAS: what it hands to BLAS is tiny (a 5-vector
    search, 4x4 affines). Without threadpoolctl (a Slicer install from before it was a dependency) this does
    nothing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    # A limit reaches only the BLAS libraries loaded when it is set, and scipy brings its own OpenBLAS (the one
    # L-BFGS-B calls), loaded on scipy's first import of linalg: in a fresh process (the CLI) that would come later.
    import scipy.optimize  # noqa: F401

    return threadpool_limits(limits=1, user_api="blas")


def _personalize(tissue, observation, method, progress, cancel, device, working_spacing_mm, options, iso_level,
                 margin_mm, lesion_tissue, t1, lesion_grow_mm) -> PersonalizationResult:
    started = time.perf_counter()
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if isinstance(observation, Volume):
        observation = Observation.from_volume(observation, "concentration")
    report(progress, 0.0, "preparing the tissue")
    lesion = patient_tissue(tissue, observation, lesion_tissue, t1, lesion_grow_mm,
                            sub_progress(progress, 0.0, 0.12, "tissue"), cancel)
    tissue = lesion.tissue
    check_cancel(cancel)
    report(progress, 0.12, "preparing the observation")
    problem, warnings = prepare_problem(tissue, observation, options, device, working_spacing_mm, cancel)
    warnings = list(tissue.notes) + lesion.warnings + warnings
    gridded, space, work, options, device = (problem.observation, problem.space, problem.work_tissue,
                                             problem.options, problem.device)
    visible = gridded.visible > 0.5
    check_cancel(cancel)

    problem.progress = sub_progress(progress, 0.14, 0.85, method)
    candidate = run_method(method, problem)
    parameters = space.project(candidate.parameters)
    check_cancel(cancel)

    if candidate.final is not None and candidate.parameters == parameters:
        # The method already ran these parameters on the tissue's grid (hybrid's close-call judge): that run is
        # the final one.
        concentration, loss = candidate.final, candidate.final_loss
        problem.record("final FD run (tissue grid, the judge's)", loss, "fd", STEP_FINAL, "tissue")
    else:
        report(progress, 0.85, "final FD run on the tissue's grid")
        concentration, loss = problem.tissue_grid_run(parameters, "final FD run (tissue grid)", STEP_FINAL,
                                                      sub_progress(progress, 0.85, 0.97, "final FD run"))
    fit = _fit(gridded, concentration, tissue)
    report(progress, 0.97, "target plans")
    plans = make_plans(tissue, concentration.array, gridded.core > 0.5, visible, margin_mm, iso_level)
    warnings += plans.notes + _fit_warnings(gridded, fit, candidate.space or space, parameters, problem)
    provenance = _provenance(method, options, device, work, problem, candidate)
    report(progress, 1.0, "done")
    return PersonalizationResult(parameters, concentration, loss, time.perf_counter() - started, problem.history, plans,
                                 method, warnings, fit, space.to_dict(), provenance, gridded, tissue, lesion)


def patient_tissue(tissue: Optional[Tissue], observation: Observation, lesion_tissue: str = DEFAULT_LESION_TISSUE,
                   t1: Optional[Volume] = None, lesion_grow_mm: float = LESION_GROW_MM, progress=None,
                   cancel=None) -> LesionTissue:
    """The tissue the model runs on: the given tissue with its lesion refilled (lesion.refill_lesion), or, when no
    tissue but a T1 is given, the atlas's tissue warped onto the T1 (registration.tissue_from_t1, the lesion kept
    out of the registration's metric). The given tissue's notes (cleaned maps) carry over.

    Raises InputError for neither or both of tissue and t1, a tissue that is not a Tissue, a T1 that is not a
    Volume, and what the refill or the registration refuses."""
    if tissue is not None and t1 is not None:
        raise InputError("give either a tissue or a T1 image, not both")
    if tissue is None and t1 is None:
        raise InputError("no tissue: give a tissue (label map or WM/GM/CSF maps) or a skull-stripped T1 image")
    if t1 is not None:
        from .registration import tissue_from_t1

        if not isinstance(t1, Volume):
            raise InputError("t1 must be a Volume (Volume.load(path))")
        visible = observation.on_grid(t1.geometry).visible
        lesion = lesion_mask(visible, t1.geometry, lesion_grow_mm)
        derived = tissue_from_t1(t1, lesion, progress=progress, cancel=cancel)
        warnings = list(derived.warnings)
        warnings.append(f"tissue derived from the T1: the atlas registered to it (quality {derived.quality:.2f}); "
                        f"the {float(lesion.sum()) * t1.geometry.voxel_volume_mm3() / 1000:.1f} cm^3 lesion was "
                        f"kept out of the registration")
        if not derived.passed:
            warnings.append(f"the T1 registration failed its quality check ({derived.quality:.2f}): check the "
                            f"tissue (tissue.nii.gz) before relying on the result")
        return LesionTissue(derived.tissue, lesion, "t1", 0.0, float(derived.quality), derived.runtime_s, warnings)
    if not isinstance(tissue, Tissue):
        raise InputError("tissue must be a Tissue (Tissue.from_file, from_labelmap or from_probabilities)")
    visible = observation.on_grid(tissue.geometry).visible
    refilled = refill_lesion(tissue, visible, lesion_tissue, lesion_grow_mm, progress, cancel)
    refilled.tissue.notes = list(tissue.notes)
    return refilled


def prepare_problem(tissue: Tissue, observation: Observation, options: Optional[InversionOptions] = None,
                    device: str = "auto", working_spacing_mm: Optional[float] = DEFAULT_WORKING_SPACING_MM,
                    cancel=None):
    """The inversion problem of a tissue and an observation (observation on the tissue and working grids, search
    space around the tumor), and the warnings the observation raises. InputError for a tumor outside the brain or
    the image."""
    options = options or InversionOptions()
    device = resolve_device(device)
    gridded = observation.on_grid(tissue.geometry)
    visible = gridded.visible > 0.5
    in_brain = visible & tissue.brain_mask
    if not np.any(in_brain):
        raise InputError("the tumor lies outside the brain: none of its visible voxels is grey or white matter")
    warnings = observation_warnings(tissue, visible, in_brain)
    work = working_tissue(tissue, working_spacing_mm)
    work_observation = gridded if work is tissue else gridded.resample(work.geometry)
    space = SearchSpace.around_tumor(tissue, gridded.visible, options.seed_margin_mm)
    return Problem(tissue, gridded, work, work_observation, space, options, device, None, cancel), warnings


def _fit(observation: GriddedObservation, concentration: Volume, tissue: Tissue) -> Dict[str, float]:
    """How the final run agrees with the observation (its data loss is Problem.tissue_grid_run's): NCC for a
    concentration, Dice of the visible tumor and of the core."""
    fit = {}
    if observation.concentration is not None:  # NCC against a segmentation's binary mask would be easy to misread
        fit["ncc"] = round(compare(concentration.array, observation.concentration, tissue.brain_mask,
                                   thresholds=())["ncc"], 4)
    for name, threshold, mask in (("dice_visible", observation.imaging.edema_threshold, observation.visible),
                                  ("dice_core", observation.imaging.core_threshold, observation.core)):
        fit[name] = round(dice(concentration.array >= threshold, mask > 0.5), 4)
    return fit


def observation_warnings(tissue: Tissue, visible: np.ndarray, in_brain: np.ndarray) -> List[str]:
    """One-line warnings about the observed tumor on the tissue's grid: its share outside grey/white matter and
    several separate foci. visible: boolean (k, j, i), the visible tumor; in_brain: its voxels inside the brain."""
    from scipy.ndimage import label

    warnings = []
    outside = 1.0 - in_brain.sum() / max(visible.sum(), 1)
    if outside > 0.05:
        warnings.append(f"{100 * outside:.0f} % of the visible tumor lies outside grey/white matter (ignored)")
    # Labelled in the tumor's bounding box (one voxel of padding keeps components apart at its faces): the same
    # components as the whole grid, at a fraction of the cost on a 1 mm brain.
    box = mask_box(visible, 1)
    components, count = label(visible[box])
    if count > 1:
        sizes = np.bincount(components.ravel())[1:] * tissue.geometry.voxel_volume_mm3() / 1000.0
        large = int((sizes >= 0.1).sum())
        if large > 1:
            warnings.append(f"the tumor has {large} separate components (>= 0.1 cm^3 each); the model grows one "
                            f"tumor from one seed, so a multifocal tumor is fitted only approximately")
    return warnings


def _fit_warnings(observation, fit, space, parameters, problem) -> List[str]:
    warnings = list(space.on_bound(parameters))
    if observation.kind == "concentration" and fit["ncc"] < POOR_FIT_NCC:
        warnings.append(f"poor fit: NCC {fit['ncc']:.2f} < {POOR_FIT_NCC} between the fitted and the observed "
                        f"concentration; do not rely on the infiltration map")
    if observation.kind == "segmentation" and fit["dice_visible"] < POOR_FIT_DICE:
        warnings.append(f"poor fit: Dice {fit['dice_visible']:.2f} < {POOR_FIT_DICE} between the fitted and the "
                        f"observed visible tumor; do not rely on the infiltration map")
    frame = problem.network_frame
    if frame is not None:
        inside = frame.fraction_inside(observation.visible > 0.5)
        if inside < 0.99:
            frame_mm = frame.grid * frame.geometry.spacing_ijk_mm[0]
            warnings.append(f"the tumor is larger than the networks' {frame_mm:.0f}"
                            f" mm frame ({100 * (1 - inside):.0f} % of it outside): their estimate is less reliable")
    return warnings


def _provenance(method, options, device, work, problem, candidate) -> Dict:
    import torch

    from . import __version__

    out = {"software": "TumorPersonalizationLib", "version": __version__, "torch": torch.__version__,
           "method": method, "winner": candidate.source, "device": device, "options": options.to_dict(),
           "working_grid": work.geometry.describe(), "tissue_grid": problem.tissue.geometry.describe(),
           "observation_kind": problem.observation.kind,
           "imaging_model": dict(problem.observation.imaging.__dict__),
           "models": problem.models_used,
           "fd_runs_working_grid": problem.fd_runs_working_grid,
           "fd_runs_tissue_grid": problem.tissue_runs,
           "close_calls_not_judged": problem.close_calls_not_judged}
    if candidate.stopped:  # CMA-ES: which of its termination criteria ended the search
        out["stopped"] = candidate.stopped
    return out


# ---- outputs, as one set --------------------------------------------------------------------------------------------
def write_outputs(result: PersonalizationResult, out_dir, picture: bool = True, extra: Optional[Dict] = None) -> Path:
    """Write parameters.json, infiltration.nii.gz, tissue.nii.gz (the WM, GM, CSF fractions the model ran on),
    plan_standard.nii.gz, plan_model.nii.gz (plan_iso.nii.gz when made) and report.png (skipped, and
    parameters.json says so, where matplotlib is absent) into out_dir as one set: everything goes to a temporary
    folder beside it, which then
    replaces out_dir, so a failure leaves either the previous complete set or nothing.

    out_dir may not exist, be empty, or hold a previous result (its files are replaced); other content is refused.
    extra: more entries for parameters.json (the demo's true parameters, a batch case name).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=str(out_dir.parent)))
    try:
        geometry = result.concentration.geometry
        result.concentration.save(temporary / "infiltration.nii.gz")
        if result.tissue is not None:
            from .imageio import write_image

            write_image(result.tissue.to_volume_image(), temporary / "tissue.nii.gz")
        Volume(result.plans.standard, geometry).save(temporary / "plan_standard.nii.gz")
        Volume(result.plans.model, geometry).save(temporary / "plan_model.nii.gz")
        if result.plans.iso is not None:
            Volume(result.plans.iso, geometry).save(temporary / "plan_iso.nii.gz")
        data = result.to_dict()
        if extra:
            data.update(extra)
        if picture:  # before parameters.json, which records whether the picture was drawn
            from .figures import save_result_figure_if_possible

            skipped = save_result_figure_if_possible(temporary / "report.png", result)
            data["report_png"] = skipped or "written"
            if skipped:
                data["warnings"] = list(data.get("warnings") or []) + [skipped]
        (temporary / "parameters.json").write_text(json.dumps(_jsonable(data), indent=2) + "\n")
        os.chmod(temporary, 0o777 & ~_umask())
        if out_dir.exists():
            previous = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, previous)
            os.replace(temporary, out_dir)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(temporary, out_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out_dir


def check_output_dir(out_dir) -> Path:
    """Refuse, before any work, an output folder that is a file, not writable, or holds something else than a
    previous result of this tool."""
    from .imageio import check_writable_directory

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} exists and is not a directory")
    if out_dir.is_dir():
        foreign = [p.name for p in out_dir.iterdir() if p.name not in OUTPUT_FILES]
        if foreign:
            raise InputError(f"--out-dir {out_dir} holds other files ({', '.join(sorted(foreign)[:3])}): choose an "
                             f"empty or new folder")
    check_writable_directory(out_dir.parent if not out_dir.exists() else out_dir)
    return out_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
