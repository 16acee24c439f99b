"""Where the actors run: connecting to Ray, and the resources a worker pool asks for."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import ray

from fedmeta.sim.config import ConfigError, ExperimentConfig
from fedmeta.sim.engine.signals import retake_sigterm


def init_ray(address: str | None, timeout_s: float = 60.0) -> bool:
    """Connect to `address` (an existing cluster) or start local Ray. True if we started it.

    On an existing cluster the `fedmeta` package travels with the job (Ray's `py_modules`), so the cluster's nodes need fedmeta's dependencies but not fedmeta itself. A
    cluster (`address`, RAY_ADDRESS, or the one `auto` finds in Ray's cluster file) that does not
    answer within `timeout_s` is a one-line ConfigError, never a hang."""
    if ray.is_initialized():
        return False
    target = cluster_target(address)
    if target is not None:
        wait_for_cluster(target, timeout_s)
    kwargs: dict = dict(address=address, logging_level="ERROR", log_to_driver=True)
    if address:
        kwargs["runtime_env"] = {"py_modules": [package_folder()]}
    else:
        kwargs["include_dashboard"] = False
    try:
        ray.init(**kwargs)
    except ConnectionError as e:  # e.g. `auto` with no cluster running
        raise ConfigError(
            f"ray.address: {str(e).splitlines()[0] if str(e) else e} (start a cluster with "
            "`ray start --head`, or leave --address and RAY_ADDRESS unset to start local Ray)"
        ) from None
    retake_sigterm()  # ray.init put its own SIGTERM handler in place of a command's
    return True


def package_folder() -> str:
    """A folder named `fedmeta` holding the whole package, for Ray's `py_modules` (which names the
    module after the folder). An installed wheel is one already; an editable install is the
    checkout (any folder name; with its tests, docs and .git), so its package folders are copied,
    once per process."""
    here = Path(__file__).resolve().parents[2]  # the package: sim/engine/cluster.py -> the root
    if here.name == "fedmeta" and not (here / "pyproject.toml").is_file():
        return str(here)
    global _STAGED
    if _STAGED is None:
        stage = Path(tempfile.mkdtemp(prefix="fedmeta-job-")) / "fedmeta"
        skip = shutil.ignore_patterns("__pycache__", "*.pyc")
        stage.mkdir()
        for name in ("__init__.py", "__main__.py", "py.typed"):
            shutil.copy2(here / name, stage / name)
        for name in ("sim", "actors", "serve", "configs"):
            shutil.copytree(here / name, stage / name, ignore=skip)
        _STAGED = str(stage)
    return _STAGED


_STAGED: str | None = None


def cluster_target(address: str | None) -> str | None:
    """The host:port `ray.init(address)` will connect to (None: it starts local Ray, or `auto`
    finds no cluster file and Ray says so)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
        return None
    if address == "auto":
        from ray._private.utils import read_ray_address

        address = read_ray_address()  # the last cluster `ray start` wrote down (maybe stale)
        if not address:
            return None
    return address.split("://", 1)[-1]


def wait_for_cluster(target: str, timeout_s: float) -> None:
    """Return once something listens at `target` (host:port); a ConfigError after `timeout_s`."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address: expected host:port, got {target!r}")
    until = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(
                (host, int(port)), timeout=max(0.1, min(2.0, until - time.monotonic()))
            ).close()
            return
        except OSError:
            if time.monotonic() >= until:
                raise ConfigError(
                    f"ray.address: no Ray cluster answers at {target} within {timeout_s:g} s "
                    "(ray.connect_timeout_s); start one with `ray start --head`, or leave --address "
                    "and RAY_ADDRESS unset to start local Ray"
                ) from None
            time.sleep(0.5)


def worker_resources(cfg: ExperimentConfig) -> tuple[float, float]:
    """(num_cpus, num_gpus) per worker actor; refuse pools the cluster can never place."""
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    n = cfg.ray.num_workers
    want_cpu = cfg.ray.num_cpus_per_worker
    if n * want_cpu > cpus + 1e-9:
        raise ConfigError(
            f"ray.num_cpus_per_worker: {n} workers x {want_cpu:g} CPUs needs {n * want_cpu:g} CPUs but "
            f"the Ray cluster has {cpus:g}; use fractional CPUs (e.g. {cpus / n:g}) or fewer workers"
        )
    want_gpu = cfg.ray.num_gpus_per_worker
    if want_gpu is None:  # use the GPUs when present, shared evenly
        want_gpu = min(1.0, gpus / n) if gpus > 0 else 0.0
    if n * want_gpu > gpus + 1e-9:
        raise ConfigError(
            f"ray.num_gpus_per_worker: {n} workers x {want_gpu} GPUs needs more than the {gpus:g} available"
        )
    return want_cpu, want_gpu
