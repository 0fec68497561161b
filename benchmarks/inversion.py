#!/usr/bin/env python
"""Which inversion method to trust: the published comparison (Table 1 layout) on held-out synthetic tumors, plus the
clinical question (how much of the later growth does each plan cover at equal volume).

Cases (never used in training: their own random stream, --seed, drawn afresh): a seed uniform over atlas voxels with
WM+GM >= 0.5, D_WM ~ U[0.001, 10] mm^2/day, rho ~ U[0.001, 1] /day as in the training prior, and a visible-volume
target V ~ U[2, 120] cm^3; the tumor is grown on the bundled 1 mm atlas with every time step divided by 4 (a
converged reference, so no method matches it by construction) until its visible volume (c >= 0.25) reaches V. The
same tumor grown on to 1.5x its age (steps / 2) gives the later growth: its visible part beyond today's.

Per case and method: MSE, MAE, normalised MSE/MAE, NCC and Dice of the method's final FD run (on the 1 mm grid)
against the hidden truth inside the brain; parameter and seed errors; wall time (and its ratio to one plain FD
forward run of the true parameters at 1 mm on the same case, `simulate(tissue, parameters)` as a user runs it); the
share of the later growth covered by the model plan at the standard plan's volume. For the default method and
hybrid-fd the same cases are also given as segmentations (thresholded at 0.25 / 0.675), and the plan is compared with
the 15 mm plan, a model-free plan (labels weighted 0.9 core / 0.45 edema, blurred by a 3 mm Gaussian, ranked) and the
true parameters' plan, all at equal volume.

Resumable: every finished (case, method, input, brain) appends one line to
benchmarks/results/inversion_runs.jsonl.gz and is skipped when the script runs again; tasks run in priority order,
in blocks of 5 cases (the four fast methods, the segmentation fits, the same on shifted brains, cma-surrogate on the
first 20 cases, cma-solver on the first 5). The 1-minute load average is recorded beside every timing: do not trust a
time taken while other jobs shared the cores (load above ~2.5 on this 2-core machine).

    python benchmarks/inversion.py --cases 50 --hours 1.5      # run (resumes)
    python benchmarks/inversion.py --report-only               # JSON, Markdown table and plots from what is done
    python benchmarks/inversion.py --make-cases-only           # grow the cases first (untimed; may share the cores)

Other brains: the same methods on --shifted-cases cases (default 25) whose brain is the atlas deformed
beyond the training range as the shifted test set's recipe draws it (half re-acquired on an oblique 0.9 x 0.9 x 3 mm
grid), and on --nipype-cases cases (default 15) on another template brain from another segmentation tool
(nipype_brain: the testbrain extra); each from its own streams, so no case's brain or tumor is one the networks
trained on.
"""
import argparse
import gzip
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from TumorPersonalizationLib.atlas import load_atlas  # noqa: E402
from TumorPersonalizationLib.constants import DEFAULT_METHOD, EDEMA_THRESHOLD  # noqa: E402
from TumorPersonalizationLib.offline.dataset import RECIPES, Prior, draw_physical, with_days  # noqa: E402
from TumorPersonalizationLib.offline.evaluation import summarise  # noqa: E402
from TumorPersonalizationLib.inversion import InversionOptions  # noqa: E402
from TumorPersonalizationLib.metrics import compare, tumor_volume_cm3  # noqa: E402
from TumorPersonalizationLib.observation import Observation  # noqa: E402
# The case's tumor today thresholded into labels, as the segmentation input is given (other benchmarks import it).
from TumorPersonalizationLib.observation import labels_from_concentration as segmentation_of  # noqa: E402
from TumorPersonalizationLib.parameters import LATER_AGE_FACTOR, GrowthParameters, later_growth  # noqa: E402
from TumorPersonalizationLib.parameters import parameter_errors  # noqa: E402
from TumorPersonalizationLib.pipeline import personalize  # noqa: E402
from TumorPersonalizationLib.registry import SHIPPED_MODELS  # noqa: E402
from TumorPersonalizationLib.plans import later_growth_coverage  # noqa: E402

FAST_METHODS = ("direct", "gb-surrogate", "hybrid", "hybrid-fd")
# Every method the benchmark runs, in the order its tables and plots list them (the CMA-ES ones on fewer cases).
BENCHMARKED_METHODS = FAST_METHODS + ("cma-surrogate", "cma-solver")
# Segmentation input, the clinical case: the default method and the most accurate one (when they differ).
SEGMENTATION_METHODS = tuple(dict.fromkeys((DEFAULT_METHOD, "hybrid-fd")))
CLEAN_LOAD = 2.5
# Every run's row, gzip-compressed (appended as one gzip member per row; readers see one stream).
RUNS = ROOT / "benchmarks" / "results" / "inversion_runs.jsonl.gz"
CASE_DIR = ROOT / "data" / "inversion_cases"
VOLUME_RANGE_CM3 = (2.0, 120.0)
BRAINS = ("atlas", "shifted", "nipype")
# The shifted test set's anatomy: beyond the training range, so no case's brain is a training brain.
SHIFTED_ANATOMY = RECIPES["shifted"]["anatomy"]
# Streams of a shifted case (seed, index, stream): its brain's draw, and its tumor's (apart from the atlas case of
# the same index, whose tumor is drawn from (seed, index): the two columns are independent cases).
SHIFTED_ANATOMY_STREAM, SHIFTED_TUMOR_STREAM = 9, 10
NIPYPE_TUMOR_STREAM = 11
BRAIN_NAMES = {"atlas": "atlas", "shifted": "shifted brains", "nipype": "nipype's 3 mm brain"}
# The networks each method used in rows written before the runs recorded them (the models shipped then).
LEGACY_MODELS = {"direct": ("inverse32",), "gb-surrogate": ("inverse32", "surrogate32"),
                 "hybrid": ("inverse32", "surrogate32"), "hybrid-fd": ("inverse32", "surrogate32"),
                 "cma-surrogate": ("surrogate32",), "cma-solver": ()}
# A method's revision, raised when a change to its code changes its answers; rows of an older revision are neither
# resumed nor reported (a row that records none counts as 1). 2: CMA-ES evaluates every
# candidate with its seed projected onto the allowed voxels, and its tolfun is relative to the no-tumor loss.
# 2 for the methods that start from the inverse net: its answer is averaged with its answer to the left-right
# mirrored input (InversionOptions.inverse_mirror_average). 3 for hybrid: a close call of the working grid's judge
# is judged again on the tissue's grid (InversionOptions.tissue_judge_ratio; hybrid-fd's start is chosen as before).
# 4 for hybrid: that judge's cap prices each run by the work its schedule will do (solver.schedule_run), not by the
# clock. 3 for hybrid-fd: a start with mu_D near the search's floor is compared with a ladder of larger mu_D
# (methods.floor_ladder) before the polish.
METHOD_REVISIONS = {"cma-surrogate": 2, "cma-solver": 2, "direct": 2, "gb-surrogate": 2, "hybrid": 4,
                    "hybrid-fd": 3}
# Whether `personalize` held numpy's BLAS to one thread (pipeline.blas_single_threaded, with threadpoolctl): rows
# from before it ran with OpenBLAS's threads competing with torch's, up to 1.8x slower on small cases
# (benchmarks/results/timing_repeats.json); their answers are the same.
BLAS_LIMITED = importlib.util.find_spec("threadpoolctl") is not None
# One run of this script: rows that share it were timed in the same state of the machine.
RUN_ID = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def nipype_brain():
    """Another template brain, segmented by another tool: nipype's testing data (Apache-2.0; `pip install -e
    '.[testbrain]'`, read offline) holds partial-volume maps of an MNI152-like brain at 3 mm (61 x 73 x 61): tpm_00
    CSF, tpm_01 WM, tpm_02 GM, as its label map segmentation0 (1 CSF, 2 GM, 3 WM) says (checked here). Resampled
    to 1 mm, as the atlas cases are grown. Its header's origin is not MNI's, which the growth model does not mind."""
    import importlib.util

    import SimpleITK as sitk

    from TumorPersonalizationLib.tissue import Tissue

    spec = importlib.util.find_spec("nipype")
    if spec is None:
        raise SystemExit("cases on the nipype brain need nipype's testing data: pip install -e '.[testbrain]' "
                         "(or --nipype-cases 0)")
    data = Path(list(spec.submodule_search_locations)[0]) / "testing" / "data"
    csf, wm, gm = (sitk.ReadImage(str(data / f"tpm_0{n}.nii.gz")) for n in range(3))
    tissue = Tissue.from_probabilities(wm, gm, csf)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "segmentation0.nii.gz")))
    classes = np.argmax(np.stack([tissue.csf, tissue.gm, tissue.wm]), axis=0) + 1
    inside = labels > 0
    if np.mean(classes[inside] == labels[inside]) < 0.9:
        raise RuntimeError("nipype's tissue maps no longer match its label map: check which map is which tissue")
    return tissue.resample(1.0)


# ---- cases -------------------------------------------------------------------------------------------------------
class Cases:
    """The held-out cases of one random stream on one kind of brain: "atlas" (the bundled 1 mm atlas), "shifted"
    (per case, the atlas deformed beyond the training range and, for half the cases, re-acquired on an oblique
    0.9 x 0.9 x 3 mm grid: the shifted test set's anatomy prior, drawn from the case's own stream) or "nipype"
    (nipype_brain, the same for every case)."""

    def __init__(self, seed: int, brain: str = "atlas"):
        if brain not in BRAINS:
            raise ValueError(f"unknown brain {brain!r}: choose one of {', '.join(BRAINS)}")
        self.seed, self.brain_kind = seed, brain
        self.atlas = load_atlas(1)
        self._tissues = {}

    def anatomy(self, index: int):
        """Case index's anatomy draw (shifted brains only; another stream than the tumor's)."""
        from TumorPersonalizationLib.offline.augment import draw_anatomy

        return draw_anatomy(np.random.default_rng([self.seed, index, SHIFTED_ANATOMY_STREAM]), SHIFTED_ANATOMY)

    def tissue_of(self, index: int):
        """Case index's brain: the atlas, nipype's brain (built once), or the case's drawn deformation of the atlas
        (~10 s to build; the last 5 are kept, a block of tasks)."""
        from TumorPersonalizationLib.offline.augment import apply_anatomy

        if self.brain_kind == "atlas":
            return self.atlas
        if self.brain_kind == "nipype":
            if "nipype" not in self._tissues:
                self._tissues["nipype"] = nipype_brain()
            return self._tissues["nipype"]
        if index not in self._tissues:
            if len(self._tissues) >= 5:
                self._tissues.pop(next(iter(self._tissues)))
            self._tissues[index] = apply_anatomy(self.atlas, self.anatomy(index), SHIFTED_ANATOMY)
        return self._tissues[index]

    def get(self, index: int):
        """(truth parameters, c today, c at 1.5x age, info); made once and cached in data/ (stored as float16, and
        always returned through that rounding, so a fresh and a cached case are the same case)."""
        brain = "" if self.brain_kind == "atlas" else f"_{self.brain_kind}"
        path = CASE_DIR / f"seed{self.seed}{brain}_case{index:03d}.npz"
        if not path.exists():
            self._make(index, path)
        with np.load(path) as data:
            p = json.loads(str(data["parameters"]))
            today, later = data["today"].astype(np.float32), data["later"].astype(np.float32)
        if "anatomy" in p and not np.allclose(p["anatomy"]["matrix"], self.anatomy(index).matrix, atol=1e-9):
            raise RuntimeError(f"{path.name} was grown on another brain than this code draws: delete it to regrow")
        return GrowthParameters.from_dict(p), today, later, p

    def forward_seconds(self, index: int) -> Dict:
        """Wall time of one forward run of the true parameters at 1 mm as a user runs it, `simulate(tissue,
        parameters)` (which builds the tissue's operator, as `personalize`'s final run does), best of two, warm, in
        this run, with the load average: the yardstick of 'no case over 4 forward runs'."""
        from TumorPersonalizationLib.solver import simulate

        tissue, truth = self.tissue_of(index), self.get(index)[0]
        times = []
        for _ in range(2):
            started = time.perf_counter()
            simulate(tissue, truth)
            times.append(time.perf_counter() - started)
        return {"forward_1mm_s": min(times), "forward_loadavg": os.getloadavg()[0]}

    def _make(self, index: int, path: Path) -> None:
        import torch

        from TumorPersonalizationLib.solver import StepControl, TissueOperator, simulate_tensor

        stream = [self.seed, index] + {"atlas": [], "shifted": [SHIFTED_TUMOR_STREAM],
                                       "nipype": [NIPYPE_TUMOR_STREAM]}[self.brain_kind]
        rng = np.random.default_rng(stream)
        prior = Prior(visible_volume_cm3=VOLUME_RANGE_CM3)
        tissue = self.tissue_of(index)
        operator = TissueOperator(tissue)
        candidates = np.argwhere(tissue.brain_fraction >= 0.5)
        voxel_cm3 = tissue.geometry.voxel_volume_mm3() / 1000.0
        for _ in range(50):
            seed_kji = candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, 3)
            seed_ras = tissue.geometry.index_kji_to_ras(seed_kji)
            physical = draw_physical(rng, prior)
            needed = physical["target_volume_cm3"] / voxel_cm3
            plan_days = min(prior.max_days, prior.plan_factor * physical["days"])
            planned = with_days(physical, plan_days)
            with torch.no_grad():
                c, stats = simulate_tensor(
                    operator, [planned["mu_d_mm"]], [planned["mu_rho"]], [seed_ras],
                    control=StepControl(refinement=4.0), return_stats=True,
                    stop=lambda t, box: float((box >= EDEMA_THRESHOLD).sum()) >= needed)
            today = c[0].numpy()
            visible = tumor_volume_cm3(today, voxel_cm3 * 1000.0, EDEMA_THRESHOLD)
            if VOLUME_RANGE_CM3[0] <= visible <= VOLUME_RANGE_CM3[1] and stats.end_time < 1.0:
                break
        else:
            raise RuntimeError(f"case {index}: no draw reached its volume target in 50 draws")
        physical = with_days(physical, plan_days * stats.end_time)
        truth = GrowthParameters(tuple(seed_ras), physical["mu_d_mm"], physical["mu_rho"])
        later_parameters = later_growth(truth, LATER_AGE_FACTOR)
        with torch.no_grad():
            later = simulate_tensor(operator, [later_parameters.mu_d_mm], [later_parameters.mu_rho], [seed_ras],
                                    control=StepControl(refinement=2.0))[0].numpy()
        p = {**truth.to_dict(), "visible_cm3": visible, **{k: float(v) for k, v in physical.items()}}
        if self.brain_kind != "atlas":  # what the brain drew, so the case says which brain it is
            draw = self.anatomy(index)
            p["anatomy"] = {"matrix": draw.matrix.tolist(), "rotation_deg": draw.rotation_deg,
                            "oblique": bool(draw.oblique), "border_noise": draw.noise_seed >= 0}
        CASE_DIR.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, today=today.astype(np.float16), later=later.astype(np.float16),
                            parameters=json.dumps(p))


def observation_of(tissue, today: np.ndarray, kind: str) -> Observation:
    """What a method is given: the case's tumor today as a concentration map, or thresholded into labels."""
    if kind == "segmentation":
        return Observation.from_volume(tissue.volume(segmentation_of(today)), "segmentation")
    return Observation.from_volume(tissue.volume(today), "concentration")


def run_task(cases: Cases, index: int, method: str, kind: str, forward: Dict):
    import torch

    truth, today, later, info = cases.get(index)
    tissue = cases.tissue_of(index)
    brain = tissue.brain_mask
    labels = segmentation_of(today)
    observation = observation_of(tissue, today, kind)
    load_before = os.getloadavg()[0]
    # The brain's own healthy tissue: this benchmark measures the inversion; benchmarks/patients.py measures the refill
    # of a tumor-bearing brain's tissue.
    result = personalize(tissue, observation, method=method, device="cpu", options=InversionOptions(),
                         lesion_tissue="keep")
    load_after = os.getloadavg()[0]
    p = result.parameters
    errors = parameter_errors(p, truth)
    scores = compare(result.concentration.array, today, brain)
    row = {"case": index, "method": method, "kind": kind, "brain": cases.brain_kind, "truth": info,
           "found": p.to_dict(),
           "metrics": scores, "seed_error_mm": errors["seed_mm"], "mu_d_relative_error": errors["mu_d_relative"],
           "mu_rho_relative_error": errors["mu_rho_relative"],
           "runtime_s": result.runtime_s, **forward,
           "runtime_in_forward_runs": result.runtime_s / max(forward["forward_1mm_s"], 1e-6),
           "fd_runs_working_grid": result.provenance["fd_runs_working_grid"], "winner": result.provenance["winner"],
           "fd_runs_tissue_grid": result.provenance["fd_runs_tissue_grid"],
           "close_calls_not_judged": result.provenance["close_calls_not_judged"],
           "models": {name: entry["sha256"] for name, entry in result.provenance["models"].items()},
           "shipped_models": dict(SHIPPED_MODELS), "threads": torch.get_num_threads(),
           "evaluations": len(result.history), "stopped": result.provenance.get("stopped"),
           "method_revision": METHOD_REVISIONS.get(method, 1), "run_id": RUN_ID,
           "loadavg_before": load_before, "loadavg_after": load_after, "warnings": result.warnings,
           "blas_single_threaded": BLAS_LIMITED}
    growth = (later >= EDEMA_THRESHOLD) & (today < EDEMA_THRESHOLD)
    covered = later_growth_coverage(tissue, result.plans, growth, labels > 0, labels == 3, today)
    row.update(plan_cm3=result.plans.volumes_cm3["standard_cm3"], coverage_model=covered["model"],
               coverage_standard=covered["standard"], coverage_blur=covered["blurred_labels"],
               coverage_truth=covered["true_parameters"])
    return row


def tasks(count: int, other_counts: Dict[str, int] = None):
    """(case, method, input kind, brain) in the order they run; other_counts: cases per brain other than the atlas."""
    counts = {"atlas": count, **(other_counts or {})}
    out = []
    for brain in BRAINS:
        out += [(i, m, "concentration", brain) for i in range(counts.get(brain, 0)) for m in FAST_METHODS]
        out += [(i, m, "segmentation", brain) for i in range(counts.get(brain, 0)) for m in SEGMENTATION_METHODS]
    out += [(i, "cma-surrogate", "concentration", "atlas") for i in range(min(count, 20))]
    out += [(i, "cma-solver", "concentration", "atlas") for i in range(min(count, 5))]
    # In blocks of 5 cases (fast methods, the segmentation fit, the same on the other brains, then cma-surrogate),
    # with the slow cma-solver run of case i at the end of block i: a run that stops early still has every
    # method on its first cases. A case's methods run one after another (its brain is built once).
    priority = {"cma-surrogate": 2 * len(BRAINS), "cma-solver": 2 * len(BRAINS) + 1}

    def order(task):
        index, method, kind, brain = task
        block = index if method == "cma-solver" else index // 5
        rank = priority.get(method, (1 if kind == "segmentation" else 0) + 2 * BRAINS.index(brain))
        return block, rank, index, FAST_METHODS.index(method) if method in FAST_METHODS else 0, kind

    return sorted(out, key=order)


def brain_of(row) -> str:
    """A run's brain: rows from before the other brains' columns have none (the atlas)."""
    return row.get("brain", "atlas")


def models_of(row) -> tuple:
    """The names of the networks a run used, sorted (rows from before runs recorded them: LEGACY_MODELS)."""
    return tuple(sorted(row["models"])) if "models" in row else LEGACY_MODELS[row["method"]]


def with_current_models(row) -> bool:
    """Whether a run belongs to the networks shipped now: runs of replaced networks are neither resumed nor reported.

    A run records the shipped pair it ran beside (`shipped_models`), so a method that uses no network (cma-solver)
    is run again with every new pair: the wall-time comparison with it must come from the same run. Rows from
    before that field: those that used networks belong to them; cma-solver's to the first pair."""
    if "shipped_models" in row:
        return row["shipped_models"] == SHIPPED_MODELS
    used = models_of(row)
    return bool(used) and set(used) <= set(SHIPPED_MODELS.values())


def is_current(row) -> bool:
    """Whether a run counts: the networks shipped now (with_current_models) and its method's current revision."""
    return with_current_models(row) and row.get("method_revision", 1) == METHOD_REVISIONS.get(row["method"], 1)


def row_key(row):
    """A run's task."""
    return row["case"], row["method"], row["kind"], brain_of(row)


def read_runs():
    if not RUNS.exists():
        return []
    with gzip.open(RUNS, "rt") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def latest_per_task(rows):
    """The last row of every task (the file is in the order the runs finished: a task run again replaces its row)."""
    latest = {}
    for row in rows:
        latest[row_key(row)] = row
    return list(latest.values())


def same_run(rows) -> bool:
    """Whether the rows were all written by one run of this script (rows from before runs recorded it: unknown)."""
    ids = {row.get("run_id") for row in rows}
    return len(ids) == 1 and None not in ids


# ---- report ------------------------------------------------------------------------------------------------------
METRICS = ("mse", "mae", "mse_normalised", "mae_normalised", "ncc", "dice_0.25", "dice_0.675")


def report(seed: int):
    import torch

    all_runs = [r for r in read_runs() if r.get("seed", seed) == seed]
    runs = latest_per_task([r for r in all_runs if is_current(r)])
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["kind"], brain_of(r)), []).append(r)
    summary = {"seed": seed, "cases_grown_on": "bundled 1 mm atlas, steps / 4",
               "nipype_cases_grown_on": "nipype's testing-data brain (3 mm partial-volume maps of an MNI152-like "
                                        "template, another segmentation tool) resampled to 1 mm, steps / 4",
               "shifted_cases_grown_on": "per case, the 1 mm atlas deformed as the shifted test set's recipe draws "
                                         "(scales 1 +/- 10-15 %, rotations 15-25 deg, 4.5 mm displacement, half "
                                         "re-acquired on an oblique 0.9 x 0.9 x 3 mm grid, border noise on half), "
                                         "steps / 4",
               "torch": torch.__version__,
               # the runs' torch threads (rows from before they recorded it ran with 2, this machine's cores)
               "threads": sorted({r.get("threads", 2) for r in runs}) or [torch.get_num_threads()],
               "machine": "2-core CPU (development machine)",
               "models": dict(SHIPPED_MODELS), "method_revisions": dict(METHOD_REVISIONS),
               "runs_of_replaced_models_or_revisions_or_run_again_left_out": len(all_runs) - len(runs),
               "methods": {}}
    for (method, kind, brain), rows in sorted(groups.items(), key=lambda item: (item[0][2], item[0][:2])):
        metric_rows = [{k: r["metrics"][k] for k in METRICS} for r in rows]
        entry = summarise(metric_rows, worst_is_low={"ncc", "dice_0.25", "dice_0.675"})
        entry.update(summarise([{k: r[k] for k in ("seed_error_mm", "mu_d_relative_error", "mu_rho_relative_error")}
                                for r in rows], worst_is_low=set()))
        # Timings only from runs the machine was not shared during (1-minute load average < 2.5 on 2 cores).
        clean = [r for r in rows if r["loadavg_after"] < CLEAN_LOAD and r.get("forward_loadavg", 0) < CLEAN_LOAD]
        entry["clean_timings"] = len(clean)
        if clean:
            entry.update(summarise([{k: r[k] for k in ("runtime_s", "runtime_in_forward_runs")} for r in clean],
                                   worst_is_low=set()))
            entry["runtime_in_forward_runs"]["max"] = float(max(r["runtime_in_forward_runs"] for r in clean))
            entry["runtime_in_forward_runs"]["cases_over_4"] = int(sum(r["runtime_in_forward_runs"] > 4.0
                                                                       for r in clean))
        entry["samples"] = len(rows)  # every case (the timing summary above counted only the clean ones)
        if any("fd_runs_tissue_grid" in r for r in rows):  # hybrid's close calls, judged again on the tissue grid
            entry["tissue_grid_judged"] = int(sum(r.get("fd_runs_tissue_grid", 1) >= 2 for r in rows))
            entry["close_calls_not_judged"] = int(sum(r.get("close_calls_not_judged", 0) > 0 for r in rows))
        entry["timed_with_blas_single_threaded"] = int(sum(bool(r.get("blas_single_threaded")) for r in rows))
        # Rows kept from an earlier run (tagged by the commit they ran on) when a change could not alter their
        # answers: their timings are from that run's machine state, not comparable with this one's. (The rows'
        # field that holds the commit keeps the name it was written with.)
        earlier = sorted({r["sitting"] for r in rows if r.get("sitting")})
        if earlier:
            entry["earlier_run"] = {"commits": earlier, "rows": int(sum(bool(r.get("sitting")) for r in rows))}
        for name in ("coverage_model", "coverage_standard", "coverage_blur", "coverage_truth"):
            values = np.array([r[name] for r in rows if not math.isnan(r[name])])
            entry[name] = {"mean": float(values.mean()), "standard_error": float(values.std(ddof=1) / math.sqrt(
                len(values))) if len(values) > 1 else 0.0} if len(values) else None
        for other in ("standard", "blur", "truth"):
            paired = np.array([r["coverage_model"] - r[f"coverage_{other}"] for r in rows
                               if not (math.isnan(r["coverage_model"]) or math.isnan(r[f"coverage_{other}"]))])
            if len(paired) > 1:
                entry[f"model_minus_{other}"] = {"mean": float(paired.mean()),
                                                 "standard_error": float(paired.std(ddof=1) / math.sqrt(len(paired)))}
        summary["methods"][group_name(method, kind, brain)] = entry
    # Same-case comparison with cma-solver (the classical baseline), where both ran.
    solver = {r["case"]: r for r in runs if r["method"] == "cma-solver" and brain_of(r) == "atlas"}
    if solver:
        for method in FAST_METHODS + ("cma-surrogate",):
            pairs = [(r, solver[r["case"]]) for r in runs if r["method"] == method and r["kind"] == "concentration"
                     and brain_of(r) == "atlas" and r["case"] in solver]
            if pairs:
                summary["methods"][f"{method} (concentration)"]["versus_cma_solver_same_cases"] = {
                    "cases": len(pairs),
                    "speed_up": float(np.sum([b["runtime_s"] for _, b in pairs]) / np.sum([a["runtime_s"]
                                                                                         for a, _ in pairs])),
                    "ncc": float(np.mean([a["metrics"]["ncc"] for a, _ in pairs])),
                    "ncc_cma_solver": float(np.mean([b["metrics"]["ncc"] for _, b in pairs])),
                    "same_run": same_run([row for pair in pairs for row in pair])}
    retimed = retimed_every_case(groups)
    if retimed:
        summary["retimed_every_case"] = retimed
    out = ROOT / "benchmarks" / "results" / "inversion.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    write_table(summary, ROOT / "benchmarks" / "results" / "inversion.md")
    plot(groups, ROOT / "benchmarks" / "results" / "inversion.png")
    print(f"wrote {out}, inversion.md, inversion.png from {len(runs)} runs")


def retimed_every_case(groups):
    """Every benchmarks/results/timing_repeats*.json that timed the default method's current revision again on every
    atlas case of this report, in interleaved rounds (benchmarks/timing_repeats.py --top ALL), pooled: per input kind
    the worst per-case median of all their rounds' ratios and the cases whose median is over 4, and each run's own
    worst median. One timing of a 1-5 s run on this shared machine can be off by tens of percent, and 'no case over
    4' is judged on the worst case, where one noisy timing matters most; runs in different states of the machine can
    disagree (a slow spell stretches the 1 mm yardstick more than the search), so every run counts, not the newest or
    the kindest. None when no such file is here."""
    cases = {r["case"] for kind in ("concentration", "segmentation")
             for r in groups.get((DEFAULT_METHOD, kind, "atlas"), [])}
    passes = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("timing_repeats*.json")):
        data = json.loads(path.read_text())
        if (data.get("method") == DEFAULT_METHOD and data.get("method_revision") == METHOD_REVISIONS.get(
                DEFAULT_METHOD, 1) and cases and set(data.get("cases", [])) >= cases):
            passes.append((data["date_utc"], path.name, data))
    if not passes:
        return None
    passes.sort(key=lambda item: item[0])
    arm = "limited"  # the library as shipped (numpy's BLAS on one thread)
    result = {"passes": [{"file": name, "date_utc": date, "rounds": data["repeats"]} for date, name, data in passes],
              "cases": len(cases), "by_kind": {}}
    for kind in ("concentration", "segmentation"):
        ratios = {}
        for index, (_, _, data) in enumerate(passes):
            for r in data["records"]:
                if r["kind"] == kind and r["case"] in cases and r["arm"] == arm:
                    ratios.setdefault(r["case"], []).append(r["ratio"])
            # Each run alone, from its own per-case summary (timing_repeats.summarise).
            entries = [e for e in data["per_task"] if e["kind"] == kind and e["case"] in cases]
            worst = max(entries, key=lambda e: e[arm]["ratio_median"])
            result["passes"][index].setdefault("worst_median", {})[kind] = {
                "ratio": float(worst[arm]["ratio_median"]), "case": int(worst["case"]),
                "cases_with_median_over_4": int(sum(e[arm]["ratio_median"] > 4.0 for e in entries))}
        medians = {case: float(np.median(values)) for case, values in ratios.items()}
        worst = max(medians, key=medians.get)
        result["by_kind"][kind] = {
            "worst_median": medians[worst], "worst_case": int(worst),
            "cases_with_median_over_4": sorted(int(c) for c, m in medians.items() if m > 4.0),
            "median_of_medians": float(np.median(list(medians.values()))),
            "rounds_over_4": int(sum(x > 4.0 for values in ratios.values() for x in values)),
            "rounds": int(sum(len(values) for values in ratios.values()))}
    return result


def group_name(method: str, kind: str, brain: str) -> str:
    return f"{method} ({kind})" if brain == "atlas" else f"{method} ({kind}, {BRAIN_NAMES[brain]})"


def _pm(entry, key, scale=1.0, digits=3):
    value = entry[key]
    return f"{value['mean'] * scale:.{digits}f} ± {value['standard_error'] * scale:.{digits}f}"


def write_table(summary, path):
    lines = ["# Inversion benchmark (Table 1 layout)", "",
             "Held-out synthetic tumors on the bundled 1 mm atlas (steps / 4); in the rows marked 'shifted brains', "
             "on the atlas deformed beyond the networks' training range, and in those marked 'nipype's 3 mm brain', "
             "on another template brain segmented by another tool; every method's final FD run on the "
             "1 mm grid against the hidden truth, inside the brain; mean ± standard error over cases. Wall time on "
             "this 2-core CPU (torch threads: {}); `clean` counts the runs whose timing was taken with a 1-minute "
             "load average < 2.5; rows not marked 'timed with BLAS on one thread' ran before `personalize` held "
             "numpy's BLAS to one thread, with its threads competing with torch's (slower, same answers; see "
             "timing_repeats.json). Networks: {}.".format(", ".join(map(str, summary["threads"])),
                                          ", ".join(summary["models"].values())), "",
             "| method (input) | cases | MSE (1e-3) | MAE (1e-2) | norm. MSE | norm. MAE | NCC | NCC worst 5 % | "
             "seed error mm | mu_D rel. err. | mu_rho rel. err. | wall time s (median) | "
             "× 1 mm forward runs: max (cases > 4) | clean |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in summary["methods"].items():
        if "earlier_run" in e:
            name += (f" ({e['earlier_run']['rows']} of {e['samples']} rows from an earlier run at "
                     f"{', '.join(e['earlier_run']['commits'])})")
        if e.get("timed_with_blas_single_threaded"):
            name += f" ({e['timed_with_blas_single_threaded']} of {e['samples']} timed with BLAS on one thread)"
        lines.append(f"| {name} | {e['samples']} | {_pm(e, 'mse', 1e3)} | {_pm(e, 'mae', 1e2)} | "
                     f"{_pm(e, 'mse_normalised')} | {_pm(e, 'mae_normalised')} | {_pm(e, 'ncc')} | "
                     f"{e['ncc']['worst_5_percent_mean']:.3f} | {_pm(e, 'seed_error_mm', digits=1)} | "
                     f"{_pm(e, 'mu_d_relative_error')} | {_pm(e, 'mu_rho_relative_error')} | "
                     + (f"{e['runtime_s']['median']:.1f} | {e['runtime_in_forward_runs']['max']:.1f} "
                        f"({e['runtime_in_forward_runs']['cases_over_4']}) | "
                        if e["clean_timings"] else "n/a | n/a | ") + f"{e['clean_timings']} |")
    judged = [(n, e) for n, e in summary["methods"].items()
              if e.get("tissue_grid_judged") or e.get("close_calls_not_judged")]
    if judged:
        lines += ["", "Close calls of the working grid's FD judge (both candidates' losses within "
                      "InversionOptions.tissue_judge_ratio) run again on the tissue's grid, and those the run cap "
                      "(tissue_judge_max_runs, runs priced by their plans) left to the working grid: " + "; ".join(
                          f"{n} {e['tissue_grid_judged']} of {e['samples']} judged, "
                          f"{e.get('close_calls_not_judged', 0)} not" for n, e in judged) + "."]
    retimed = summary.get("retimed_every_case")
    if retimed:
        rounds = sum(p["rounds"] for p in retimed["passes"])
        lines += ["", f"Every atlas case of {DEFAULT_METHOD} timed again, {len(retimed['passes'])} passes of "
                      f"interleaved rounds over all {retimed['cases']} cases ({rounds} rounds per case in all), each "
                      "round's ratio against that round's own yardstick (the true parameters' 1 mm run, best of "
                      "two); per case the median of all rounds: " + "; ".join(
                          f"{kind} worst median {v['worst_median']:.2f} (case {v['worst_case']}), cases with a "
                          f"median over 4: {', '.join(map(str, v['cases_with_median_over_4'])) or 'none'}, single "
                          f"rounds over 4: {v['rounds_over_4']} of {v['rounds']}"
                          for kind, v in retimed["by_kind"].items()) + ". Each pass alone: " + "; ".join(
                          f"{p['file']} ({p['date_utc']}, {p['rounds']} rounds): worst median " + ", ".join(
                              f"{kind} {w['ratio']:.2f} (case {w['case']}, {w['cases_with_median_over_4']} over 4)"
                              for kind, w in p["worst_median"].items()) for p in retimed["passes"]) + "."]
    lines += ["", "Later growth (the same tumors at 1.5x their age, visible part beyond today's) covered by plans of "
                  "equal volume (the 15 mm standard plan's):", "",
              "| method (input) | model plan | 15 mm plan | blurred labels | true parameters | model − 15 mm | "
              "model − blurred | model − truth |", "|---|---|---|---|---|---|---|---|"]
    for name, e in summary["methods"].items():
        if e.get("coverage_model") is None:
            continue
        paired = [f"{e[k]['mean']:+.3f} ± {e[k]['standard_error']:.3f}" if k in e else "n/a"
                  for k in ("model_minus_standard", "model_minus_blur", "model_minus_truth")]
        lines.append(f"| {name} | {_pm(e, 'coverage_model')} | {_pm(e, 'coverage_standard')} | "
                     f"{_pm(e, 'coverage_blur')} | {_pm(e, 'coverage_truth')} | " + " | ".join(paired) + " |")
    versus = [(n, e["versus_cma_solver_same_cases"]) for n, e in summary["methods"].items()
              if "versus_cma_solver_same_cases" in e]
    if versus:
        lines += ["", "Against cma-solver on the same cases:", "",
                  "| method | cases | wall-time ratio (cma-solver / method) | NCC | NCC cma-solver |",
                  "|---|---|---|---|---|"]
        for name, v in versus:
            if not v.get("same_run", True):
                name += " (a pair from different runs: timings not comparable)"
            lines.append(f"| {name} | {v['cases']} | {v['speed_up']:.0f}x | {v['ncc']:.4f} "
                         f"| {v['ncc_cma_solver']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(groups, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(groups, key=lambda k: (BRAINS.index(k[2]), k[1], BENCHMARKED_METHODS.index(k[0])))
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(BENCHMARKED_METHODS)}
    figure, axes = plt.subplots(1, 3, figsize=(20, 6), gridspec_kw={"width_ratios": [1.3, 1.3, 1]})
    for x, key in enumerate(names):
        ncc = [r["metrics"]["ncc"] for r in groups[key]]
        axes[0].scatter(np.full(len(ncc), x) + np.random.default_rng(x).uniform(-0.15, 0.15, len(ncc)), ncc, s=10,
                        alpha=0.7, color=colours[key[0]])
        axes[0].plot([x - 0.3, x + 0.3], [np.mean(ncc)] * 2, "k-", linewidth=1.5)
        times = [r["runtime_s"] for r in groups[key]]
        axes[1].scatter(np.full(len(times), x), times, s=10, alpha=0.7, color=colours[key[0]])
    labels = [f"{m} (seg.)" if k == "segmentation" else m for m, k, _ in names]
    for axis in axes[:2]:
        axis.set_xticks(range(len(names)), labels, fontsize=7, rotation=55, ha="right")
        # One block of columns per brain, named above it.
        for brain in BRAINS:
            columns = [x for x, key in enumerate(names) if key[2] == brain]
            if not columns:
                continue
            if columns[0] > 0:
                axis.axvline(columns[0] - 0.5, color="grey", linewidth=0.8)
            cases = max(len(groups[names[x]]) for x in columns)
            axis.text((columns[0] + columns[-1]) / 2, 1.01, f"{BRAIN_NAMES[brain]} (up to {cases})",
                      transform=axis.get_xaxis_transform(), ha="center", va="bottom", fontsize=7)
    axes[0].axhline(0.95, color="k", linestyle="--", linewidth=0.8)
    axes[0].axhline(0.85, color="k", linestyle=":", linewidth=0.8)
    axes[0].set_ylabel("NCC of the final FD run vs hidden truth (per case)")
    axes[0].set_title("per-case NCC (bar: mean; targets: mean 0.95 dashed, worst 5 % 0.85 dotted)", fontsize=9,
                      pad=16)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("wall time per case (s)")
    axes[1].set_title("wall time per case, 2-core CPU", fontsize=9, pad=16)
    # Equal-volume plans of the default method's segmentation fit, one group of four boxes per brain.
    ticks, tick_labels, counts = [], [], []
    for offset, brain in enumerate(b for b in BRAINS if (DEFAULT_METHOD, "segmentation", b) in groups):
        rows = groups[(DEFAULT_METHOD, "segmentation", brain)]
        values = [[r[f"coverage_{n}"] for r in rows if not math.isnan(r[f"coverage_{n}"])]
                  for n in ("standard", "blur", "model", "truth")]
        positions = [5 * offset + 1 + i for i in range(4)]
        axes[2].boxplot(values, positions=positions, showmeans=True)
        ticks += positions
        tick_labels += [f"15 mm\n{brain}", "blurred\nlabels", f"model\n({DEFAULT_METHOD})", "true\nparameters"]
        counts.append(f"{len(rows)} {brain}")
    if ticks:
        axes[2].set_xticks(ticks, tick_labels, fontsize=7)
        axes[2].set_ylabel("share of later growth covered")
        axes[2].set_title(f"equal-volume plans, segmentation input ({', '.join(counts)} cases)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--seed", type=int, default=2026, help="random stream of the cases (training used 0, the "
                                                                 "surrogate test set 1000)")
    # Fewer cases on the other brains than on the atlas: each of them costs a run about a minute of 2-core time
    # per case and method set, and the atlas column carries the personalisation targets.
    parser.add_argument("--shifted-cases", type=int, default=25, help="cases on shifted brains")
    parser.add_argument("--nipype-cases", type=int, default=15, help="cases on nipype's 3 mm template brain (needs "
                                                                      "the testbrain extra; 0: none)")
    parser.add_argument("--hours", type=float, default=1.5, help="stop starting new tasks after this long")
    parser.add_argument("--only", help="run only this method")
    parser.add_argument("--redo", default="", help="comma-separated methods to run again (concentration input, "
                                                   "and segmentation input for the methods the benchmark fits to "
                                                   "segmentations) on the first --redo-cases cases of --redo-brains "
                                                   "even where done, e.g. to time them in one run beside cma-solver; "
                                                   "their new rows replace the old ones in the report")
    parser.add_argument("--redo-cases", type=int, default=5)
    parser.add_argument("--redo-brains", default="atlas", help="comma-separated brains whose cases --redo runs "
                                                              f"again, of {', '.join(BRAINS)}")
    parser.add_argument("--redo-first", type=int, default=0, help="--redo starts at this case (a redo that stopped "
                                                                   "part-way goes on from where it stopped)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--make-cases-only", action="store_true",
                        help="grow the cases not yet in data/inversion_cases and stop (untimed work: it may share "
                             "the cores with other jobs, unlike the timed runs)")
    args = parser.parse_args()
    if args.report_only:
        report(args.seed)
        return
    done = {row_key(r) for r in read_runs() if r.get("seed", args.seed) == args.seed and is_current(r)}
    redo = [m for m in args.redo.split(",") if m]
    unknown = sorted(set(redo) - set(BENCHMARKED_METHODS))
    if unknown:
        parser.error(f"--redo: unknown method(s) {', '.join(unknown)}")
    redo_brains = [b for b in args.redo_brains.split(",") if b]
    if set(redo_brains) - set(BRAINS):
        parser.error(f"--redo-brains: unknown brain(s) {', '.join(sorted(set(redo_brains) - set(BRAINS)))}")
    done -= {(i, m, kind, brain) for m in redo for brain in redo_brains for i in range(args.redo_first, args.redo_cases)
             for kind in ("concentration",) + (("segmentation",) if m in SEGMENTATION_METHODS else ())}
    cases = {brain: Cases(args.seed, brain) for brain in BRAINS}
    started = time.perf_counter()
    forwards = {}
    other_counts = {"shifted": args.shifted_cases, "nipype": args.nipype_cases}
    if args.make_cases_only:
        for brain, count in {"atlas": args.cases, **other_counts}.items():
            for index in tqdm(range(count), desc=f"cases on {brain} brains"):
                cases[brain].get(index)
        return
    for index, method, kind, brain in tasks(args.cases, other_counts):
        if (index, method, kind, brain) in done or (args.only and method != args.only):
            continue
        if time.perf_counter() - started > args.hours * 3600:
            print("time budget reached; run again to resume", flush=True)
            break
        if (brain, index) not in forwards:  # the case is made (untimed) and its yardstick measured first
            forwards[(brain, index)] = cases[brain].forward_seconds(index)
        row = run_task(cases[brain], index, method, kind, forwards[(brain, index)])
        row["seed"] = args.seed
        with gzip.open(RUNS, "at") as stream:
            stream.write(json.dumps(row) + "\n")
        print(f"case {index} ({brain}) {method} ({kind}): NCC {row['metrics']['ncc']:.4f}, "
              f"seed {row['seed_error_mm']:.1f} mm, "
              f"mu_D {100 * row['mu_d_relative_error']:.0f} %, mu_rho {100 * row['mu_rho_relative_error']:.0f} %, "
              f"{row['runtime_s']:.1f} s (load {row['loadavg_after']:.1f}), coverage {row['coverage_model']:.3f} "
              f"vs 15 mm {row['coverage_standard']:.3f}", flush=True)
    report(args.seed)


if __name__ == "__main__":
    main()
