"""The `ray` and `run` sections: where an experiment runs and where it writes.

`RayConfig` is the cluster (address, worker actors and their resources, the cohort engine,
placement and fault tolerance; `ray.path` is read as the deprecated name of `ray.compute`);
`RunConfig` is the run directory, checkpoint cadence, progress bar, code paths and secret seeding.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import Field, model_validator

from fedmeta.sim.config.base import Section


class RayConfig(Section):
    address: str | None = Field(None, description="existing cluster address; null = start local Ray")
    connect_timeout_s: float = Field(
        60.0,
        gt=0,
        description="how long a cluster at `address` may take to answer before the command fails (exit 2)",
    )
    num_workers: int = Field(2, ge=1, description="ClientWorker actors in the pool")
    num_cpus_per_worker: float = Field(1.0, ge=0)
    num_gpus_per_worker: float | None = Field(None, ge=0, description="null = share GPUs if present")
    compute: Literal["auto", "vmap", "loop"] = Field(
        "auto",
        description="cohort engine: vmap (torch.func over "
        "clients), loop (one client at a time), auto (per model kind)",
    )
    placement: Literal["spread", "pack"] = Field(
        "spread",
        description="spread: worker actors over as many nodes as "
        "have room (Ray's SPREAD strategy); pack: "
        "Ray's default (fill a node first)",
    )
    max_failures_per_round: int = Field(
        3,
        ge=0,
        description="lost worker/aggregator actors one round survives (Ray "
        "restarts them and the lost work is repeated); beyond "
        "it the run stops at its last checkpoint",
    )
    restart_timeout_s: float = Field(
        120.0,
        gt=0,
        description="how long a lost actor may take to come back before the pool goes on without it",
    )

    @model_validator(mode="before")
    @classmethod
    def _deprecated_path(cls, raw: Any) -> Any:
        """`ray.path` was the compute mode's first name: still read, with a warning."""
        if isinstance(raw, dict) and "path" in raw:
            if "compute" in raw:
                raise ValueError("path: deprecated alias of ray.compute; give only ray.compute")
            warnings.warn(
                "ray.path is deprecated and will be removed; use ray.compute (same values)",
                FutureWarning,
                stacklevel=2,
            )
            raw = {("compute" if k == "path" else k): v for k, v in raw.items()}
        return raw


class RunConfig(Section):
    name: str = "run"
    out_dir: str = "runs"
    checkpoint_every: int = Field(5, ge=1)
    progress: bool = True
    code_paths: list[str] = Field(
        default_factory=list,
        description="folders your own model/algorithm code is "
        "imported from, besides the working directory "
        "and PYTHONPATH; loading a config file adds its "
        "folder",
    )
    seeded_secrets: bool = Field(
        False,
        description="derive clients' keys, masks and all DP noise from the seed: "
        "bit-exact runs for tests and debugging, private only against "
        "parties that do not know the seed (default: a fresh run secret)",
    )
