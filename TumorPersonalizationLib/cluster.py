"""Dask LocalCluster for this library's work (batch personalisation, dataset generation): one single-threaded
worker process per core, with a worker environment that suits PyTorch's CPU kernels."""
from typing import Dict, Optional

# Environment of the worker processes, over Dask's defaults (None: unset). Dask sets glibc's MALLOC_TRIM_THRESHOLD_
# for its workers; setting it also switches off glibc's dynamic mmap threshold, so every box-sized tensor the FD
# solver allocates (hundreds per time step) is a fresh mmap whose pages fault in again: a training sample took 3.2x
# as long in such a worker as in a plain process (10.8 s against 3.4 s on average over 4 samples, this 2-core
# machine). benchmarks/dataset_throughput.py measures the generator with Dask's default and with this.
LOCAL_WORKER_ENVIRON: Dict[str, Optional[str]] = {"MALLOC_TRIM_THRESHOLD_": None}


def local_cluster(workers: int):
    """A started distributed.LocalCluster of `workers` single-threaded processes (needs the 'distributed' extra)."""
    import os

    import dask
    from distributed import LocalCluster

    overrides = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in LOCAL_WORKER_ENVIRON.items()}
    # Dask's nanny writes its pre-spawn variables into this process's environment too, and a variable left there
    # by an earlier cluster would reach the new workers by inheritance: unset ones are taken out while they spawn.
    saved = {k: os.environ.pop(k) for k, v in LOCAL_WORKER_ENVIRON.items() if v is None and k in os.environ}
    try:
        with dask.config.set(overrides):
            return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    finally:
        os.environ.update(saved)
