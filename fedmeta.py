"""fedmeta's Python API: one entry point, `fedmeta.run`, and the few types a researcher extends.

    import fedmeta

    result = fedmeta.run("quickstart", overrides=["federation.rounds=20"])
    result.summary["acc_personalized_DI"]["mean"], result.run_dir

`config` is a YAML path, a preset name (`fedmeta.presets()`), a dict of sections, or an
`ExperimentConfig`; `overrides` are `key.path=value` strings, as the CLI's `--set`. A bad value
raises `ConfigError` naming its key. Your own algorithm subclasses `fedmeta.Algorithm` (a client
rule `step` plus, optionally, a server rule) and is named in the config as
`algorithm.name: "package.module:ClassName"`; your data implements `fedmeta.FederatedDataset`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from sim.algorithms.base import Algorithm
from sim.config import ConfigError, ExperimentConfig, from_dict, load, parse_overrides, presets
from sim.data.base import ClientData, FederatedDataset

try:
    __version__ = metadata.version("fedmeta")
except metadata.PackageNotFoundError:      # a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["Algorithm", "ClientData", "ConfigError", "ExperimentConfig", "FederatedDataset", "RunResult",
           "__version__", "load_config", "presets", "run"]


@dataclass(frozen=True)
class RunResult:
    summary: dict        # what summary.json holds
    run_dir: Path


def load_config(config: str | Path | dict | ExperimentConfig | None = None,
                overrides: list[str] | None = None) -> ExperimentConfig:
    """The validated config: a path, a preset name, a dict of sections or a config (None: quickstart)."""
    if isinstance(config, ExperimentConfig):
        config = config.model_dump(mode="json")
    if isinstance(config, dict):
        raw: dict[str, Any] = copy.deepcopy(config)
        for key, value in parse_overrides(overrides or []):
            node = raw
            *path, last = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{key}: {part} is not a section")
            node[last] = value
        return from_dict(raw)
    return load(config, list(overrides or []))


def run(config: str | Path | dict | ExperimentConfig | None = None, overrides: list[str] | None = None, *,
        run_dir: str | Path | None = None, resume: bool = False, address: str | None = None) -> RunResult:
    """Run (or, with `resume`, continue) an experiment on local Ray or the cluster at `address`;
    returns its summary and run directory. Same as `fedmeta run` on the command line."""
    from sim.experiment import run_experiment

    cfg = load_config(config, overrides)
    if address:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
    path, summary = run_experiment(cfg, run_dir=Path(run_dir) if run_dir else None, resume=resume)
    return RunResult(summary, Path(path))
