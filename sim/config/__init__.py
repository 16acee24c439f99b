"""Typed experiment configuration: one validated model per component, loaded in one place.

Unknown keys, wrong types and out-of-range values are rejected with a `ConfigError` whose message
names the key path (e.g. ``federation.rounds``) and what was expected. The CLI turns that into a
one-line message and exit status 2.

The sections live in one module per group (`data`, `model` (and algorithm), `federation` (and
eval), `privacy` (and secagg), `personalization` (and profiles), `tune`, `run` (and ray)), the root
model in `experiment` and the loading in `loading`; every name is importable from here.
"""

from __future__ import annotations

from fedmeta.sim.config.base import ConfigError, Section
from fedmeta.sim.config.data import (
    DataConfig,
    DriftConfig,
    FemnistConfig,
    PartitionConfig,
    PrototypesConfig,
    SyntheticConfig,
    TableConfig,
    WritersConfig,
)
from fedmeta.sim.config.experiment import ExperimentConfig
from fedmeta.sim.config.federation import (
    CompressionConfig,
    EvalConfig,
    FedBuffConfig,
    FederationConfig,
    SystemConfig,
)
from fedmeta.sim.config.loading import (
    DATA_PATHS,
    INT64,
    MAX_CONFIG_BYTES,
    config_path,
    default_config_path,
    from_dict,
    load,
    load_raw,
    parse_overrides,
    presets,
    read_yaml,
    to_yaml,
    with_absolute_paths,
)
from fedmeta.sim.config.model import BUILTIN_ALGORITHMS, AlgorithmConfig, ModelConfig
from fedmeta.sim.config.personalization import MethodSpec, PersonalizationConfig, ProfilesConfig
from fedmeta.sim.config.privacy import (
    DEFAULT_NOISE_MULTIPLIER,
    LeakageControlConfig,
    PrivacyConfig,
    SecAggConfig,
)
from fedmeta.sim.config.run import RayConfig, RunConfig
from fedmeta.sim.config.tune import TUNE_OBJECTIVES, TuneConfig, TuneObjective, TuneParam

__all__ = [
    # base
    "ConfigError",
    "Section",
    # sections
    "DataConfig",
    "DriftConfig",
    "FemnistConfig",
    "PartitionConfig",
    "PrototypesConfig",
    "SyntheticConfig",
    "TableConfig",
    "WritersConfig",
    "BUILTIN_ALGORITHMS",
    "AlgorithmConfig",
    "ModelConfig",
    "CompressionConfig",
    "EvalConfig",
    "FedBuffConfig",
    "FederationConfig",
    "SystemConfig",
    "DEFAULT_NOISE_MULTIPLIER",
    "LeakageControlConfig",
    "PrivacyConfig",
    "SecAggConfig",
    "MethodSpec",
    "PersonalizationConfig",
    "ProfilesConfig",
    "TUNE_OBJECTIVES",
    "TuneConfig",
    "TuneObjective",
    "TuneParam",
    "RayConfig",
    "RunConfig",
    "ExperimentConfig",
    # loading
    "DATA_PATHS",
    "INT64",
    "MAX_CONFIG_BYTES",
    "config_path",
    "default_config_path",
    "from_dict",
    "load",
    "load_raw",
    "parse_overrides",
    "presets",
    "read_yaml",
    "to_yaml",
    "with_absolute_paths",
]
