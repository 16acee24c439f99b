"""Shared fixtures: one local Ray for the whole test session, tiny configs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# tables and generated clients the tests read are cached here, not in ~/.cache (set before Ray
# starts: actors inherit it), and removed when the session ends
if "FEDMETA_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="fedmeta-test-cache-")
    os.environ["FEDMETA_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# and the runs' secrets go to a throwaway state directory, not the user's (sim/artifacts/statedir.py)
if "FEDMETA_STATE_DIR" not in os.environ:
    _STATE = tempfile.mkdtemp(prefix="fedmeta-test-state-")
    os.environ["FEDMETA_STATE_DIR"] = _STATE
    atexit.register(shutil.rmtree, _STATE, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_raw(tmp_path=None, **sections) -> dict:
    """A small writers experiment (seconds to run) as a raw dict; `sections` override per section."""
    raw = {
        "seed": 3,
        "data": {
            "kind": "writers",
            "num_clients": 40,
            "samples_per_client": 30,
            "global_clients": 4,
            "writers": {"alpha": 0.5},
        },
        "model": {"kind": "mlp", "hidden": [32]},
        "algorithm": {"name": "fedavg", "batch_size": 8, "lr": 0.1},
        "federation": {"rounds": 4, "clients_per_round": 10},
        "eval": {"every": 2, "num_individuals": 8, "finetune_steps": 5},
        "privacy": {"audit_canaries": 0},  # tiny federations: the audit's tests ask for canaries
        "ray": {"num_workers": 2, "num_cpus_per_worker": 0.5},
        "run": {"name": "t", "out_dir": str(tmp_path or "runs"), "checkpoint_every": 1, "progress": False},
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw
