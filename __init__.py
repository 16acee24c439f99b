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

import copy as _copy
from dataclasses import dataclass as _dataclass
from importlib import metadata as _metadata
from pathlib import Path as _Path
from typing import Any as _Any

from fedmeta.sim.algorithms.base import Algorithm
from fedmeta.sim.config import ConfigError, ExperimentConfig, presets
from fedmeta.sim.config import from_dict as _from_dict
from fedmeta.sim.config import load as _load
from fedmeta.sim.config import parse_overrides as _parse_overrides
from fedmeta.sim.data.base import ClientData, FederatedDataset

try:
    __version__ = _metadata.version("fedmeta")
except _metadata.PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Algorithm",
    "ClientData",
    "ConfigError",
    "ExperimentConfig",
    "FederatedDataset",
    "RunResult",
    "__version__",
    "load_config",
    "presets",
    "run",
]


@_dataclass(frozen=True)
class RunResult:
    """What `fedmeta.run` returns: the run's summary (summary.json) and its run directory."""

    summary: dict  # what summary.json holds
    run_dir: _Path


def load_config(
    config: str | _Path | dict | ExperimentConfig | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """The validated config: a path, a preset name, a dict of sections or a config (None: quickstart)."""
    if isinstance(config, ExperimentConfig):
        config = config.model_dump(mode="json")
    if isinstance(config, dict):
        raw: dict[str, _Any] = _copy.deepcopy(config)
        for key, value in _parse_overrides(overrides or []):
            node = raw
            *path, last = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{key}: {part} is not a section")
            node[last] = value
        return _from_dict(raw)
    return _load(config, list(overrides or []))


def run(
    config: str | _Path | dict | ExperimentConfig | None = None,
    overrides: list[str] | None = None,
    *,
    run_dir: str | _Path | None = None,
    resume: bool = False,
    address: str | None = None,
) -> RunResult:
    """Run (or, with `resume`, continue) an experiment on local Ray or the cluster at `address`;
    returns its summary and run directory. Same as `fedmeta run` on the command line."""
    from fedmeta.sim.tuning.autotune import run_experiment

    cfg = load_config(config, overrides)
    if address:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
    path, summary = run_experiment(cfg, run_dir=_Path(run_dir) if run_dir else None, resume=resume)
    return RunResult(summary, _Path(path))
