"""Training data for the neural surrogate and the inverse network: FD simulations on the atlas, cropped and coarsened.

Prior (the recipe of the published synthetic dataset, mapped onto the folded parameters of docs/model.md):
    D_WM ~ U[0.001, 10] mm^2/day,  rho ~ U[0.001, 1] /day,  visible-volume target V ~ U[1, 250] cm^3,
    the tumor grows until its visible volume (c >= 0.25) reaches V, or until T = 100 days,
    mu_D = sqrt(D_WM T), mu_rho = sqrt(rho T) at that T   (so mu_D <= 31.6 mm, mu_rho <= 10),
    seed uniform over atlas voxels with WM+GM >= 0.5, the atlas mirrored left-right with probability 1/2, and
    with probability 1/2 the atlas as a hard label map (argmax of the fractions), since most patients' tissue
    comes from segmentation tools as labels, not probabilities.
The stopping time is found by the simulation itself (solver stop hook, checked after every step), planned for
4x the time a sphere growing at the Fisher speed 2 sqrt(D rho) would need (that estimate is 1.5-3x too short on the
atlas: the front has to form, the visible edge lags it and GM slows it), extended to 100 days if V is not reached.
A draw is kept when the final visible volume lies in [1, 250] cm^3 (as in BraTS), otherwise it is replaced by the
next draw of the same sample's random stream; the kept distribution is recorded in the manifest.

Each sample: the FD solution on the 2 mm atlas, then the cube of 128 mm centred on the tumor's centre of mass (on
the simulation grid), area-averaged to the surrogate grid, with the same crop of the tissue and the parameters (seed
as an offset in mm from the crop centre). Sample i depends only on (dataset seed, i), so shards can be computed in
any order, on any worker, and a stopped run resumes where it stopped.

Anatomical variety (format 3; augment.AnatomyPrior, off in the atlas recipe): each sample's brain may be
a random smooth deformation of its atlas variant (scaling, rotation, smooth displacement), carry segmentation-like
noise at tissue borders, or be re-acquired on an oblique thick-slice grid; its crop centre may be the visible
tumor's centre of mass and be shifted at random. What each sample drew is stored with it (augment.AnatomyDraw), and
RECIPES names the settings: "atlas" (the first datasets), "anatomy" (training), "shifted" (a test set that no
training sample can come from: its rotations lie beyond the training range, so the drawn deformations differ).
"""
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .augment import AnatomyDraw, AnatomyPrior, apply_anatomy, draw_anatomy
from ..constants import CORE_THRESHOLD, EDEMA_THRESHOLD
from ..errors import InputError
from ..imageio import sha256_file
from ..progress import ProgressCallback, check_cancel, report
from ..metrics import tumor_volume_cm3
from ..frame import SurrogateFrame
from ..observation import labels_pseudo_concentration
from ..tissue import Tissue

FORMAT_VERSION = 3


@dataclass(frozen=True)
class Prior:
    d_wm_mm2_per_day: tuple = (0.001, 10.0)
    rho_per_day: tuple = (0.001, 1.0)
    max_days: float = 100.0
    visible_volume_cm3: tuple = (1.0, 250.0)
    visible_threshold: float = EDEMA_THRESHOLD
    seed_min_brain_fraction: float = 0.5
    mirror_probability: float = 0.5
    hard_label_probability: float = 0.5
    max_draws_per_sample: int = 50
    plan_factor: float = 4.0  # first run planned for this multiple of the sphere-growth time


@dataclass(frozen=True)
class DatasetConfig:
    samples: int = 1000
    seed: int = 0
    grid: int = 32  # surrogate grid points per side
    cube_mm: float = 128.0
    simulation_spacing_mm: int = 2  # atlas resolution of the FD runs
    shard_size: int = 50
    prior: Prior = field(default_factory=Prior)
    anatomy: AnatomyPrior = field(default_factory=AnatomyPrior)
    # Time steps of the FD runs (solver.StepControl): the solver's defaults (0.5 voxel, 0.4) unless set. The
    # recipes for patients' brains take a front step of 1 voxel with reaction accuracy 0.4 (1.19x the samples per
    # hour, benchmarks/dataset_throughput.py), within 1e-3 of a converged run (test_solver_physics, and at most
    # 7.4e-4 on 8 drawn samples); reaction accuracy 0.5 had left one sample of 8 (mu_rho 5.3) at 1.14e-3.
    front_step_voxels: float = 0.5
    reaction_accuracy: float = 0.4

    @property
    def surrogate_spacing_mm(self) -> float:
        return self.cube_mm / self.grid

    @property
    def shards(self) -> int:
        return math.ceil(self.samples / self.shard_size)

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict) -> "DatasetConfig":
        data = dict(data)
        data["prior"] = Prior(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["prior"].items()})
        data["anatomy"] = AnatomyPrior.from_dict(data.get("anatomy"))  # absent in format 2: the atlas-only recipe
        return cls(**data)

    def step_control(self):
        from ..solver import StepControl

        return StepControl(max_front_step_voxels=self.front_step_voxels, reaction_accuracy=self.reaction_accuracy)


# Named settings of the anatomy and the time steps (scripts/generate_dataset.py --recipe).
RECIPES: Dict[str, Dict] = {
    # The first datasets: the atlas, its mirror image and hard-label versions only; crops on the concentration's
    # centre of mass; the solver's default steps.
    "atlas": {"anatomy": AnatomyPrior()},
    # Training for patients' brains: 4 in 5 samples deformed (scales 1 +/- 0-10 %, rotations 0-15 deg,
    # 3 mm smooth displacement), border noise on half the soft ones, crops on the visible tumor shifted by up to
    # 8 mm per axis; longer steps (see front_step_voxels).
    "anatomy": {"anatomy": AnatomyPrior(deformation_probability=0.8, border_noise_probability=0.5,
                                        crop_jitter_mm=8.0, crop_center="visible"),
                "front_step_voxels": 1.0, "reaction_accuracy": 0.4},
    # The shifted test set: every sample deformed beyond the training range (scales 1 +/- 10-15 %, rotations
    # 15-25 deg, 4.5 mm displacement), half re-acquired on an oblique 0.9 x 0.9 x 3 mm grid, crops centred on the
    # visible tumor as the inversion centres them.
    "shifted": {"anatomy": AnatomyPrior(deformation_probability=1.0, scale_range=(0.10, 0.15),
                                        rotation_deg=(15.0, 25.0), displacement_mm=4.5, border_noise_probability=0.5,
                                        oblique_probability=0.5, crop_center="visible"),
                "front_step_voxels": 1.0, "reaction_accuracy": 0.4},
}


def recipe_config(recipe: str, **settings) -> "DatasetConfig":
    """A DatasetConfig of a named recipe (RECIPES), other fields from settings (samples, seed, grid, ...)."""
    if recipe not in RECIPES:
        raise InputError(f"unknown dataset recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return DatasetConfig(**{**RECIPES[recipe], **settings})


def draw_physical(rng: np.random.Generator, prior: Prior) -> Dict[str, float]:
    """One draw of (D, rho, V target) and the age T of a sphere growing at 2 sqrt(D rho) to volume V (capped),
    mapped onto mu_D, mu_rho. The dataset then finds the true stopping time by simulation (with_days)."""
    d = rng.uniform(*prior.d_wm_mm2_per_day)
    rho = rng.uniform(*prior.rho_per_day)
    volume = rng.uniform(*prior.visible_volume_cm3)
    radius_mm = (3.0 * volume * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    days = min(prior.max_days, radius_mm / (2.0 * math.sqrt(d * rho)))
    return with_days({"d_wm_mm2_per_day": d, "rho_per_day": rho, "target_volume_cm3": volume}, days)


def with_days(physical: Dict[str, float], days: float) -> Dict[str, float]:
    """The same tumor at age `days`: mu_D = sqrt(D T), mu_rho = sqrt(rho T)."""
    return dict(physical, days=days, mu_d_mm=math.sqrt(physical["d_wm_mm2_per_day"] * days),
                mu_rho=math.sqrt(physical["rho_per_day"] * days))


def _crop_center_kji(concentration: np.ndarray, visible_only: bool = False) -> np.ndarray:
    """Centre of mass of the concentration (of its visible part, c >= 0.25, with visible_only), rounded to whole
    voxels so the crop aligns with the grid."""
    weights = np.where(concentration >= EDEMA_THRESHOLD, concentration, 0.0) if visible_only else concentration
    total = float(weights.sum())
    if total <= 0:
        raise InputError("empty simulation: no centre of mass")
    grids = np.indices(weights.shape, dtype=np.float64)
    return np.array([round(float((g * weights).sum() / total)) for g in grids])


def atlas_variants(spacing_mm: int) -> List[Tissue]:
    """The four atlases samples are drawn on, indexed by mirrored + 2 * hard_labels: the atlas, its mirror image,
    and both as hard label maps (argmax of the fractions)."""
    from ..atlas import load_atlas

    atlas = load_atlas(spacing_mm)
    hard = Tissue.from_labelmap(atlas.volume(atlas.labelmap()))
    return [atlas, atlas.mirrored_left_right(), hard, hard.mirrored_left_right()]


class SampleMaker:
    """Makes sample i of a dataset (holds the atlas and its mirror image once per worker)."""

    def __init__(self, config: DatasetConfig, device: str = "cpu"):
        from ..solver import TissueOperator

        self.config = config
        self.device = device
        self.tissues = atlas_variants(config.simulation_spacing_mm)
        self.operators = [TissueOperator(t, device=device) for t in self.tissues]
        # Seed candidates per variant, found once: every draw of every sample picks from them.
        self.seed_candidates = [np.argwhere(t.brain_fraction >= config.prior.seed_min_brain_fraction)
                                for t in self.tissues]
        n = config.cube_mm / config.simulation_spacing_mm
        if abs(n - round(n)) > 1e-6:
            raise InputError(f"cube of {config.cube_mm} mm is not a whole number of {config.simulation_spacing_mm} mm "
                             f"voxels")

    def make(self, index: int) -> Dict[str, np.ndarray]:
        return self.sample_of(index, self.simulate(index))

    def sample_of(self, index: int, run: Dict) -> Dict[str, np.ndarray]:
        """The stored sample of a run (simulate's result): the crop, the parameters and the anatomy draw."""
        config = self.config
        tissue, c, physical, seed_ras = run["tissue"], run["concentration"], run["physical"], run["seed_ras_mm"]
        center_kji = _crop_center_kji(c, visible_only=config.anatomy.crop_center == "visible")
        center_ras = tissue.geometry.index_kji_to_ras(center_kji) + run["anatomy"].crop_jitter_mm
        frame = SurrogateFrame.around(center_ras, tissue.geometry, config.grid, config.cube_mm)
        crop_center_ras = frame.center_ras_mm
        return {
            "index": np.int64(index),
            "tissue": frame.tissue_channels(tissue).astype(np.float16),
            "concentration": np.clip(frame.sample(c), 0, 1).astype(np.float16),
            # The same tumor as a BraTS-like segmentation (thresholds 0.25 / 0.675 on the simulation grid) shown the
            # way the inversion shows a segmentation to the inverse net: the inverse net learns from both.
            "segmentation_input": np.clip(frame.sample(labels_pseudo_concentration(
                c >= EDEMA_THRESHOLD, c >= CORE_THRESHOLD, tissue.geometry.spacing_kji_mm)), 0, 1).astype(np.float16),
            "mu_d_mm": np.float32(physical["mu_d_mm"]),
            "mu_rho": np.float32(physical["mu_rho"]),
            "seed_offset_mm": (np.asarray(seed_ras) - crop_center_ras).astype(np.float32),
            "seed_ras_mm": np.asarray(seed_ras, np.float32),
            "crop_center_ras_mm": crop_center_ras.astype(np.float32),
            "mirrored": np.int8(run["mirrored"]),
            "hard_labels": np.int8(run["hard_labels"]),
            "visible_volume_cm3": np.float32(run["visible_cm3"]),
            "target_volume_cm3": np.float32(physical["target_volume_cm3"]),
            "draws": np.int16(run["draw"] + 1),
            "physical": np.asarray([physical[k] for k in ("d_wm_mm2_per_day", "rho_per_day", "days")], np.float32),
            **run["anatomy"].record(),
        }

    def simulate(self, index: int) -> Dict:
        """Sample i's draws and its FD run on the simulation grid (before cropping): tissue, operator, seed_ras_mm,
        physical parameters at the final age, concentration, visible_cm3, flags and the anatomy draw."""
        config, prior, anatomy = self.config, self.config.prior, self.config.anatomy
        rng = np.random.default_rng([config.seed, index])
        for draw in range(prior.max_draws_per_sample):
            mirrored = int(rng.uniform() < prior.mirror_probability)
            hard_labels = int(rng.uniform() < prior.hard_label_probability)
            variant = mirrored + 2 * hard_labels
            shape = draw_anatomy(rng, anatomy, soft=not hard_labels)
            tissue, operator, candidates = self._anatomy(variant, shape, bool(hard_labels))
            seed_kji = candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, 3)
            seed_ras = tissue.geometry.index_kji_to_ras(seed_kji)
            physical, c, visible = self.grow_to_target(operator, seed_ras, draw_physical(rng, prior))
            if prior.visible_volume_cm3[0] <= visible <= prior.visible_volume_cm3[1]:
                break
        else:
            raise RuntimeError(f"sample {index}: no draw within the volume range after {prior.max_draws_per_sample}")
        return {"tissue": tissue, "operator": operator, "seed_ras_mm": seed_ras, "physical": physical,
                "concentration": c, "visible_cm3": visible, "mirrored": mirrored, "hard_labels": hard_labels,
                "draw": draw, "anatomy": shape}

    def _anatomy(self, variant: int, shape, hard_labels: bool):
        """(tissue, its operator, seed candidates) of a sample: the atlas variant itself, or its drawn anatomy."""
        from ..solver import TissueOperator

        if not shape.changes_tissue:
            return self.tissues[variant], self.operators[variant], self.seed_candidates[variant]
        tissue = apply_anatomy(self.tissues[variant], shape, self.config.anatomy, hard_labels)
        candidates = np.argwhere(tissue.brain_fraction >= self.config.prior.seed_min_brain_fraction)
        return tissue, TissueOperator(tissue, device=self.device), candidates

    def grow_to_target(self, operator, seed_ras, physical: Dict[str, float]):
        """Grow the drawn tumor until its visible volume reaches the target (or T = max_days); returns the
        physical parameters at that age, the concentration and the visible volume."""
        import torch

        from ..solver import simulate_tensor

        prior = self.config.prior
        voxel_cm3 = operator.geometry.voxel_volume_mm3() / 1000.0
        voxels_needed = physical["target_volume_cm3"] / voxel_cm3
        plan_days = min(prior.max_days, prior.plan_factor * physical["days"])
        while True:
            planned = with_days(physical, plan_days)
            with torch.no_grad():
                c, stats = simulate_tensor(
                    operator, [planned["mu_d_mm"]], [planned["mu_rho"]], [seed_ras],
                    control=self.config.step_control(), return_stats=True,
                    stop=lambda t, c_box: float((c_box >= prior.visible_threshold).sum()) >= voxels_needed)
            if stats.end_time < 1.0 or plan_days >= prior.max_days:
                break
            plan_days = prior.max_days  # the target was not reached: plan again up to the age limit
        c = c[0].cpu().numpy()
        physical = with_days(physical, plan_days * stats.end_time)
        return physical, c, tumor_volume_cm3(c, voxel_cm3 * 1000.0, prior.visible_threshold)


def sample_tissue(config: DatasetConfig, variants: List[Tissue], arrays: Dict[str, np.ndarray], n: int) -> Tissue:
    """The simulation-grid tissue sample n of a dataset was grown on, rebuilt from its stored draw (variants:
    atlas_variants(config.simulation_spacing_mm)); benchmarks re-run samples on it."""
    hard_labels = bool(arrays["hard_labels"][n])
    variant = int(arrays["mirrored"][n]) + 2 * int(hard_labels)
    draw = AnatomyDraw.from_record(arrays, n)
    if not draw.changes_tissue:
        return variants[variant]
    return apply_anatomy(variants[variant], draw, config.anatomy, hard_labels)


class SampleBrains:
    """The brains a finished dataset's samples grew on (sample_tissue), for benchmarks that re-run samples, with a
    solver operator per brain: an atlas variant's is built once and shared by its samples, a deformed brain's is
    built for its sample."""

    def __init__(self, config: DatasetConfig, arrays: Dict[str, np.ndarray]):
        self.config, self.arrays = config, arrays
        self.variants = atlas_variants(config.simulation_spacing_mm)
        self._operators = {}

    def tissue(self, n: int) -> Tissue:
        return sample_tissue(self.config, self.variants, self.arrays, n)

    def operator(self, tissue: Tissue):
        from ..solver import TissueOperator

        shared = next((i for i, v in enumerate(self.variants) if tissue is v), None)
        if shared is None:
            return TissueOperator(tissue)
        if shared not in self._operators:
            self._operators[shared] = TissueOperator(tissue)
        return self._operators[shared]


def _stack(samples: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {key: np.stack([s[key] for s in samples]) for key in samples[0]}


def shard_path(directory: Path, shard: int) -> Path:
    return Path(directory) / f"shard_{shard:05d}.npz"


def make_shard(config_dict: Dict, directory: str, shard: int, device: str = "cpu",
               torch_threads: Optional[int] = None) -> Dict:
    """Compute and write one shard (a function of plain arguments, so a Dask worker can run it). torch_threads: the
    worker's torch intra-op threads (1 on a LocalCluster of one process per core, where two processes of two
    threads each on two cores would wait on each other; Dask's workers already start with OMP_NUM_THREADS=1 unless
    the shell sets it, and this makes the setting explicit)."""
    from ..imageio import atomic_write_bytes

    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))

    config = DatasetConfig.from_dict(config_dict)
    maker = _maker_cache(config, device)
    start = shard * config.shard_size
    indices = range(start, min(start + config.shard_size, config.samples))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **_stack([maker.make(i) for i in indices]))
    path = shard_path(Path(directory), shard)
    atomic_write_bytes(path, buffer.getvalue())
    return {"shard": shard, "file": path.name, "samples": len(indices), "sha256": sha256_file(path)}


_MAKERS: Dict[str, SampleMaker] = {}


def _maker_cache(config: DatasetConfig, device: str) -> SampleMaker:
    key = json.dumps([config.to_dict(), device], sort_keys=True)
    if key not in _MAKERS:
        _MAKERS.clear()
        _MAKERS[key] = SampleMaker(config, device)
    return _MAKERS[key]


def generate(config: DatasetConfig, directory, scheduler: Optional[str] = None, workers: Optional[int] = None,
             local: bool = False, progress: Optional[ProgressCallback] = None, device: str = "cpu",
             cancel=None) -> Dict:
    """Generate (or finish) a dataset in `directory`; returns the manifest.

    scheduler: address of an existing Dask scheduler; otherwise a Dask LocalCluster with `workers` processes, or
    in-process work when local=True or Dask is not installed. device: where the FD runs go ("cuda" on GPU workers;
    the data do not depend on it beyond float rounding). progress(fraction, message) after every shard; cancel is
    checked between shards (progress.py). Finished shards (listed in the progress file with
    a matching checksum) are kept, so an interrupted run resumes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / "progress.json"
    state = _load_state(state_path, config)
    todo = [s for s in range(config.shards) if not _shard_done(directory, state, s)]
    report(progress, (config.shards - len(todo)) / config.shards, f"{config.shards - len(todo)}/{config.shards} shards")

    def record(result):
        state["shards"][str(result["shard"])] = result
        from ..imageio import atomic_write_bytes

        atomic_write_bytes(state_path, (json.dumps(state, indent=1) + "\n").encode())
        done = len(state["shards"])
        report(progress, done / config.shards, f"{done}/{config.shards} shards")
        check_cancel(cancel)

    client, cluster = (None, None) if local else _dask_client(scheduler, workers)
    try:
        if client is None:
            for shard in todo:
                record(make_shard(config.to_dict(), str(directory), shard, device))
        else:
            from distributed import as_completed

            # One torch thread per worker process when the cluster is ours (a process per core); on a cluster
            # someone else set up, the workers keep their own setting.
            threads = 1 if cluster is not None else None
            futures = [client.submit(make_shard, config.to_dict(), str(directory.resolve()), s, device, threads,
                                     pure=False) for s in todo]
            for future in as_completed(futures):
                record(future.result())
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return write_manifest(config, directory, state)


def _dask_client(scheduler: Optional[str], workers: Optional[int]):
    try:
        from distributed import Client
    except ImportError:
        if scheduler:
            raise InputError("--scheduler needs Dask: pip install 'TumorPersonalizationLib[distributed]'")
        return None, None
    if scheduler:
        return Client(scheduler), None
    from ..cluster import local_cluster

    cluster = local_cluster(workers or 1)
    return Client(cluster), cluster


def _load_state(path: Path, config: DatasetConfig) -> Dict:
    if path.exists():
        state = json.loads(path.read_text())
        if state.get("config") != json.loads(json.dumps(config.to_dict())):
            raise InputError(f"{path.parent} holds a dataset made with another configuration; use a new folder")
        return state
    return {"format_version": FORMAT_VERSION, "config": json.loads(json.dumps(config.to_dict())), "shards": {}}


def _shard_done(directory: Path, state: Dict, shard: int) -> bool:
    entry = state["shards"].get(str(shard))
    path = shard_path(directory, shard)
    return bool(entry) and path.exists() and sha256_file(path) == entry["sha256"]


def write_manifest(config: DatasetConfig, directory: Path, state: Dict) -> Dict:
    from ..imageio import atomic_write_bytes

    shards = [state["shards"][str(s)] for s in range(config.shards) if str(s) in state["shards"]]
    summary = {}
    if shards:
        values = {k: [] for k in ("mu_d_mm", "mu_rho", "visible_volume_cm3", "target_volume_cm3", "draws")}
        for entry in shards:
            with np.load(directory / entry["file"]) as data:
                for key in values:
                    values[key].extend(np.asarray(data[key], np.float64).tolist())
        summary = {key: {"min": float(np.min(v)), "mean": float(np.mean(v)), "max": float(np.max(v))}
                   for key, v in values.items()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "description": __doc__.strip().splitlines()[0],
        "config": state["config"],
        "complete": len(shards) == config.shards,
        "samples": int(sum(e["samples"] for e in shards)),
        "shards": shards,
        "kept_distribution": summary,
        "surrogate_geometry": {"grid": config.grid, "spacing_mm": config.surrogate_spacing_mm,
                               "cube_mm": config.cube_mm},
    }
    manifest["sha256"] = hashlib.sha256(json.dumps(manifest["shards"], sort_keys=True).encode()).hexdigest()
    atomic_write_bytes(directory / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def load_dataset(directory) -> Dict[str, np.ndarray]:
    """All shards of a finished dataset, concatenated, after checking every checksum of its manifest."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise InputError(f"no manifest.json in {directory}: generate the dataset first")
    manifest = json.loads(manifest_path.read_text())
    parts = []
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if not path.exists() or sha256_file(path) != entry["sha256"]:
            raise InputError(f"dataset shard {path} is missing or does not match its checksum")
        with np.load(path) as data:
            parts.append({k: data[k] for k in data.files})
    if not parts:
        raise InputError(f"dataset in {directory} has no shards")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
