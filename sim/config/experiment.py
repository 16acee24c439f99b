"""`ExperimentConfig`: the root model, one field per section, and the checks that span sections.

Each section validates itself (sim/config/data.py, federation.py, ...); what only the whole
experiment can decide is checked here, in a fixed order so the first error reported is always the
same: modes that do not combine (distributed noise without secure aggregation, FedBuff with
rounds-only settings, compression of masked vectors, local DP-SGD on vmap), tuning objectives and
searched keys the config cannot provide, and cohorts larger than the population.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from fedmeta.sim.config.base import Section
from fedmeta.sim.config.data import DataConfig
from fedmeta.sim.config.federation import EvalConfig, FederationConfig
from fedmeta.sim.config.model import AlgorithmConfig, ModelConfig
from fedmeta.sim.config.personalization import PersonalizationConfig, ProfilesConfig
from fedmeta.sim.config.privacy import PrivacyConfig, SecAggConfig
from fedmeta.sim.config.run import RayConfig, RunConfig
from fedmeta.sim.config.tune import TuneConfig


class ExperimentConfig(Section):
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    federation: FederationConfig = FederationConfig()
    eval: EvalConfig = EvalConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secagg: SecAggConfig = SecAggConfig()
    personalization: PersonalizationConfig = PersonalizationConfig()
    profiles: ProfilesConfig = ProfilesConfig()
    tune: TuneConfig = TuneConfig()
    ray: RayConfig = RayConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentConfig":
        _check_modes(self)
        _check_tuning(self)
        _check_population(self)
        return self


def _check_modes(cfg: ExperimentConfig) -> None:
    """Settings of different sections that do not combine."""
    if cfg.privacy.mode == "distributed" and not cfg.secagg.enabled:
        raise ValueError(
            "privacy.mode: 'distributed' noise is added under secure aggregation; "
            "set secagg.enabled: true (or use mode 'central')"
        )
    fed = cfg.federation
    if fed.mode == "fedbuff":
        if not fed.system.enabled:
            raise ValueError(
                "federation.mode: fedbuff runs on the simulated clock; set federation.system.enabled: true"
            )
        if cfg.secagg.enabled:
            raise ValueError(
                "federation.mode: fedbuff is not combined with secure aggregation here (a buffered "
                "secure sum needs a trusted aggregator, as FedBuff assumes); set secagg.enabled: false"
            )
        if fed.over_selection != 1 or fed.deadline_s is not None or fed.dropout:
            raise ValueError(
                "federation.mode: fedbuff has no rounds to over-select, time out or drop from; "
                "unset over_selection, deadline_s and dropout"
            )
        if fed.fedbuff.concurrency < fed.clients_per_round:
            raise ValueError(
                f"federation.fedbuff.concurrency: must be >= clients_per_round (the buffer, "
                f"{fed.clients_per_round})"
            )
    if fed.compression.kind != "none" and cfg.secagg.enabled:
        raise ValueError(
            "federation.compression: secure aggregation sends masked vectors, which do not "
            "compress; set secagg.enabled: false or compression.kind: none"
        )
    if cfg.privacy.local_dp and cfg.ray.compute == "vmap":
        raise ValueError(
            "ray.compute: local DP-SGD (privacy.local_dp) runs on the loop; set ray.compute "
            "to 'loop' or 'auto'"
        )


def _check_tuning(cfg: ExperimentConfig) -> None:
    """Objectives the run cannot measure, a privacy weight with nothing to act on, searched keys
    that are not numbers of this config."""
    objectives = {o.metric for o in cfg.tune.objectives}
    if "epsilon" in objectives and cfg.privacy.mode == "off":
        raise ValueError(
            "tune.objectives: epsilon needs differential privacy (privacy.mode central or distributed)"
        )
    if "mia_auc" in objectives and not cfg.privacy.mia_audit:
        raise ValueError("tune.objectives: mia_auc is measured by the audit; set privacy.mia_audit: true")
    if cfg.privacy.leakage_control.target_auc is not None and cfg.eval.finetune_steps == 0:
        raise ValueError(
            "privacy.leakage_control.target_auc: the privacy weight acts on personalization; "
            "needs eval.finetune_steps > 0"
        )
    dumped = cfg.model_dump()
    for i, param in enumerate(cfg.tune.params):
        node = dumped
        for part in param.key.split("."):
            if isinstance(node, list):  # a list entry by its index, e.g. model.hidden.0
                node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
            else:
                node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            raise ValueError(f"tune.params.{i}.key: {param.key!r} is not a numeric key of this config")


def _check_population(cfg: ExperimentConfig) -> None:
    """Cohort and panel within the federation, where its size is known before the data is read."""
    if cfg.data.kind not in ("femnist", "table") or (
        cfg.data.kind == "table" and cfg.data.table.client_column is None
    ):
        if cfg.federation.clients_per_round > cfg.data.num_clients:
            raise ValueError(
                f"federation.clients_per_round: must be <= data.num_clients ({cfg.data.num_clients})"
            )
        if cfg.eval.num_individuals > cfg.data.num_clients:
            raise ValueError(f"eval.num_individuals: must be <= data.num_clients ({cfg.data.num_clients})")
