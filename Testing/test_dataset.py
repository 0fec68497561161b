"""Dataset generation: determinism, resumability, checksums, geometry of the crops, parameter mapping."""
import json
import math

import numpy as np
import pytest

from TumorPersonalizationLib import InputError
from TumorPersonalizationLib.offline.dataset import (DatasetConfig, Prior, draw_physical, generate, load_dataset,
                                             shard_path)

# A narrow prior keeps the FD runs small (slow growth to small targets); the mapping is the same as the default one.
SMALL_PRIOR = Prior(d_wm_mm2_per_day=(0.05, 0.2), rho_per_day=(0.1, 0.3), visible_volume_cm3=(1.0, 3.0))


def small_config(**changes):
    values = dict(samples=3, seed=7, grid=16, shard_size=2, prior=SMALL_PRIOR)
    values.update(changes)
    return DatasetConfig(**values)


def test_prior_mapping_to_folded_parameters():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = draw_physical(rng, Prior())
        assert p["days"] <= 100.0 + 1e-9
        assert p["mu_d_mm"] == pytest.approx(math.sqrt(p["d_wm_mm2_per_day"] * p["days"]))
        assert p["mu_rho"] == pytest.approx(math.sqrt(p["rho_per_day"] * p["days"]))
        assert p["mu_d_mm"] <= math.sqrt(1000.0) and p["mu_rho"] <= 10.0


def test_generate_is_deterministic_resumable_and_checked(tmp_path):
    config = small_config()
    first = generate(config, tmp_path / "a", local=True)
    assert first["complete"] and first["samples"] == 3 and len(first["shards"]) == 2
    data = load_dataset(tmp_path / "a")
    assert data["tissue"].shape == (3, 3, 16, 16, 16) and data["concentration"].shape == (3, 16, 16, 16)
    assert np.all((data["visible_volume_cm3"] >= 1) & (data["visible_volume_cm3"] <= 250))
    # Growth stops at the drawn visible volume (within the last step), unless the 100 days ran out first.
    visible, target, days = data["visible_volume_cm3"], data["target_volume_cm3"], data["physical"][:, 2]
    reached = (visible >= target * 0.999) & (visible <= target * 1.5 + 0.5)
    assert np.all(reached | (np.abs(days - 100.0) < 1e-3))
    np.testing.assert_allclose(data["mu_d_mm"] ** 2, data["physical"][:, 0] * days, rtol=1e-4)
    assert float(data["concentration"].max()) <= 1.0 and float(data["concentration"].max()) > 0.25
    # The seed is stored as an offset from the crop centre, consistent with the absolute RAS position.
    np.testing.assert_allclose(data["seed_ras_mm"] - data["crop_center_ras_mm"], data["seed_offset_mm"], atol=1e-3)
    assert np.all(np.abs(data["seed_offset_mm"]) < 64.0)

    # Resume: remove one shard; only it is recomputed, and it comes back bit-identical.
    manifest_a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    shard_path(tmp_path / "a", 1).unlink()
    again = generate(config, tmp_path / "a", local=True)
    assert again["sha256"] == manifest_a["sha256"]

    # Another folder, same seed: the same data; another seed: different data.
    assert generate(config, tmp_path / "b", local=True)["sha256"] == first["sha256"]
    assert generate(small_config(seed=8, samples=1), tmp_path / "c", local=True)["shards"][0]["sha256"] != \
        first["shards"][0]["sha256"]

    # A corrupted shard is refused on load, naming the file.
    path = shard_path(tmp_path / "b", 0)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(InputError, match="shard_00000.npz"):
        load_dataset(tmp_path / "b")


def test_other_configuration_in_same_folder_is_refused(tmp_path):
    generate(small_config(samples=1), tmp_path / "d", local=True)
    with pytest.raises(InputError, match="another configuration"):
        generate(small_config(samples=1, grid=8), tmp_path / "d", local=True)


def test_dask_local_cluster_gives_the_same_data(tmp_path):
    config = small_config(samples=2, shard_size=1)
    serial = generate(config, tmp_path / "serial", local=True)
    distributed = generate(config, tmp_path / "dask", workers=2)  # a Dask LocalCluster of 2 processes
    assert distributed["sha256"] == serial["sha256"]


def test_local_cluster_workers_keep_glibc_malloc_defaults():
    """Dask's MALLOC_TRIM_THRESHOLD_ made every FD sample 3.2x slower in a worker; our LocalCluster unsets it and
    keeps Dask's other worker settings (one OpenMP thread per process)."""
    import os

    from distributed import Client

    from TumorPersonalizationLib.cluster import local_cluster

    def environment():
        return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")

    # as after an earlier cluster with Dask's defaults, whose nanny left the variable in this process's environment
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"
    try:
        cluster = local_cluster(1)
    finally:
        del os.environ["MALLOC_TRIM_THRESHOLD_"]
    try:
        with Client(cluster) as client:
            # Dask's OMP_NUM_THREADS=1 unless this process's environment sets its own
            assert list(client.run(environment).values()) == [(None, os.environ.get("OMP_NUM_THREADS", "1"))]
    finally:
        cluster.close()


def test_anatomy_recipe_sample_records_its_draw_and_its_shifted_crop():
    """One sample of the training recipe: its anatomy is stored, the seed offset agrees with the shifted crop centre,
    and the visible tumor is off the frame's centre by about the drawn shift."""
    from TumorPersonalizationLib.offline.augment import AnatomyPrior
    from TumorPersonalizationLib.offline.dataset import RECIPES, SampleMaker, recipe_config, sample_tissue

    with pytest.raises(InputError, match="unknown dataset recipe"):
        recipe_config("nope")
    anatomy = AnatomyPrior(**{**RECIPES["anatomy"]["anatomy"].to_dict(), "deformation_probability": 1.0,
                              "crop_jitter_mm": 8.0})
    config = recipe_config("anatomy", samples=1, seed=3, grid=32, prior=SMALL_PRIOR, anatomy=anatomy)
    assert DatasetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    maker = SampleMaker(config)
    run = maker.simulate(0)
    sample = maker.sample_of(0, run)
    # The stored draw rebuilds the very brain the tumor grew in (what the benchmarks re-run samples on).
    stored = {k: np.asarray(v)[None] for k, v in sample.items()}
    rebuilt = sample_tissue(config, maker.tissues, stored, 0)
    assert np.array_equal(rebuilt.wm, run["tissue"].wm) and np.array_equal(rebuilt.csf, run["tissue"].csf)
    assert sample["deformation_field_seed"] >= 0 and abs(np.linalg.det(sample["deformation_matrix"]) - 1) < 0.35
    np.testing.assert_allclose(sample["seed_ras_mm"] - sample["crop_center_ras_mm"], sample["seed_offset_mm"],
                               atol=1e-3)
    jitter = sample["crop_jitter_mm"]
    assert np.all(np.abs(jitter) <= 8.0) and np.abs(jitter).max() > 0
    c = sample["concentration"].astype(np.float64)
    visible = np.where(c >= 0.25, c, 0.0)
    kji = np.array([(g * visible).sum() / visible.sum() for g in np.indices(c.shape)])
    direction = maker.tissues[0].geometry.direction_ras  # the frame has the atlas's axes
    offset_ras = direction @ ((kji - 15.5)[::-1] * 4.0)
    # The tumor sits where the shift put it (within a voxel of the frame and the rounding of the crop centre).
    assert np.linalg.norm(offset_ras + jitter) < 6.0, (offset_ras, jitter)
    # An old (format 2) configuration without anatomy reads as the atlas-only recipe.
    old = config.to_dict()
    del old["anatomy"]
    assert DatasetConfig.from_dict(old).anatomy == AnatomyPrior()


def test_committed_dataset_manifests_are_what_their_recipes_generate():
    """The datasets stay out of git; their manifests (scripts/recipes/datasets) are committed so that a regenerated
    set can be checked by its sha256. That only works while the recipe still gives the same configuration: a change
    to a recipe (a prior, the time steps) must not silently make the documented command produce other data."""
    from pathlib import Path

    from TumorPersonalizationLib.offline.dataset import FORMAT_VERSION, RECIPES, recipe_config

    manifests = sorted((Path(__file__).resolve().parents[1] / "scripts" / "recipes" / "datasets").glob(
        "*.manifest.json"))
    assert manifests, "no committed dataset manifest"
    for path in manifests:
        manifest = json.loads(path.read_text())
        assert manifest["complete"] and manifest["format_version"] == FORMAT_VERSION, path.name
        assert manifest["samples"] == manifest["config"]["samples"] == sum(s["samples"] for s in manifest["shards"])
        assert len(manifest["sha256"]) == 64 and all(len(s["sha256"]) == 64 for s in manifest["shards"])
        config = DatasetConfig.from_dict(manifest["config"])
        settings = {k: getattr(config, k) for k in ("samples", "seed", "grid", "cube_mm", "simulation_spacing_mm",
                                                     "shard_size")}
        matching = [name for name in RECIPES if recipe_config(name, **settings) == config]
        assert len(matching) == 1, f"{path.name}: its configuration is no recipe's any more ({matching})"
