"""Where the actors run: connecting to Ray, and the resources a worker pool asks for."""
from __future__ import annotations

import ray

from sim.config import ConfigError, ExperimentConfig
from sim.signals import retake_sigterm


def init_ray(address: str | None) -> bool:
    """Connect to `address` (an existing cluster) or start local Ray. True if we started it.

    On an existing cluster the `sim` and `actors` packages travel with the job (Ray's
    `py_modules`), so the cluster's nodes need fedmeta's dependencies but not fedmeta itself."""
    if ray.is_initialized():
        return False
    kwargs: dict = dict(address=address, logging_level="ERROR", log_to_driver=True)
    if address:
        import actors
        import sim

        kwargs["runtime_env"] = {"py_modules": [sim, actors]}
    else:
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    retake_sigterm()            # ray.init put its own SIGTERM handler in place of a command's
    return True


def worker_resources(cfg: ExperimentConfig) -> tuple[float, float]:
    """(num_cpus, num_gpus) per worker actor; refuse pools the cluster can never place."""
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    n = cfg.ray.num_workers
    want_cpu = cfg.ray.num_cpus_per_worker
    if n * want_cpu > cpus + 1e-9:
        raise ConfigError(f"ray.num_cpus_per_worker: {n} workers x {want_cpu:g} CPUs needs {n * want_cpu:g} CPUs but "
                          f"the Ray cluster has {cpus:g}; use fractional CPUs (e.g. {cpus / n:g}) or fewer workers")
    want_gpu = cfg.ray.num_gpus_per_worker
    if want_gpu is None:  # use the GPUs when present, shared evenly
        want_gpu = min(1.0, gpus / n) if gpus > 0 else 0.0
    if n * want_gpu > gpus + 1e-9:
        raise ConfigError(f"ray.num_gpus_per_worker: {n} workers x {want_gpu} GPUs needs more than the {gpus:g} available")
    return want_cpu, want_gpu
