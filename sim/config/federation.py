"""The `federation` and `eval` sections: how rounds run and how the models are judged.

`FederationConfig` is the round loop (sync cohorts or buffered asynchronous FedBuff), cohort
sampling, dropout, stragglers and update screening, with the simulated devices (`SystemConfig`)
and update compression (`CompressionConfig`) inside it; `EvalConfig` is the periodic evaluation
of the global and personalized models on the panel of individuals.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedmeta.sim.config.base import Section


class SystemConfig(Section):
    """A seeded model of the clients' devices, for simulated time (as FedScale and FedBuff's
    simulations use): each device's compute speed and bandwidths are log-normal around a median."""

    enabled: bool = False
    step_s: float = Field(0.05, gt=0, description="seconds a median device takes for one local batch")
    speed_sigma: float = Field(0.0, ge=0, le=5, description="log-normal sigma of device speed (0: all alike)")
    down_mbps: float = Field(20.0, gt=0, description="median download bandwidth, Mbit/s")
    up_mbps: float = Field(5.0, gt=0, description="median upload bandwidth, Mbit/s")
    bandwidth_sigma: float = Field(0.0, ge=0, le=5, description="log-normal sigma of both bandwidths")
    availability: float = Field(
        1.0,
        gt=0,
        le=1,
        description=(
            "probability a device is online when it is asked (each round, independently); offline ones never "
            "answer, not even to secure aggregation's key set-up"
        ),
    )


class CompressionConfig(Section):
    """What a client does to its update before the upload (sim/compression.py)."""

    kind: Literal["none", "int8", "topk"] = Field(
        "none", description="int8: stochastic 8-bit quantization; topk: the largest coordinates only"
    )
    topk_fraction: float = Field(0.01, gt=0, le=1, description="topk: the share of coordinates sent")
    error_feedback: bool = Field(
        True, description="topk: a client keeps what it left out and adds it next time"
    )


class FedBuffConfig(Section):
    """Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022)."""

    concurrency: int = Field(
        20, ge=1, description="clients training at any moment (each finished one is replaced)"
    )
    staleness: Literal["sqrt", "constant"] = Field(
        "sqrt", description="weight of an update that started tau server steps ago: 1/sqrt(1+tau), or 1"
    )


class FederationConfig(Section):
    rounds: int = Field(20, ge=1)
    mode: Literal["sync", "fedbuff"] = Field(
        "sync",
        description="sync: rounds of a sampled cohort; fedbuff: buffered asynchronous aggregation on the "
        "simulated clock (federation.system), a server step every clients_per_round updates",
    )
    fedbuff: FedBuffConfig = FedBuffConfig()
    clients_per_round: int = Field(
        100, ge=1, description="the cohort: exact (fixed sampling) or expected (Poisson)"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="probability a sampled client drops out")
    over_selection: float = Field(
        1.0,
        ge=1,
        le=10,
        description=(
            "stragglers: sample this many times clients_per_round and keep the first clients_per_round to "
            "finish (production FL's over-selection, e.g. 1.3); the privacy accounting uses the larger sample"
        ),
    )
    deadline_s: float | None = Field(
        None,
        gt=0,
        description=(
            "stragglers: a round's training deadline in seconds; clients not finished by then drop out, and a "
            "worker's shard not back by 1.5x the deadline is cancelled (its clients drop out). With "
            "federation.system enabled: in simulated seconds"
        ),
    )
    max_update_norm: float | None = Field(
        None,
        gt=0,
        description=(
            "reject a client's update whose L2 norm exceeds this (before any clipping), as one with a NaN or an "
            "infinity always is: rejected updates are counted (round log rejected_updates) and never summed"
        ),
    )
    system: SystemConfig = SystemConfig()
    compression: CompressionConfig = CompressionConfig()
    sampling: Literal["auto", "poisson", "fixed"] = Field(
        "auto",
        description="how cohorts are drawn. poisson: each client joins independently with rate "
        "clients_per_round / num_clients (what DP accountants assume); fixed: exactly "
        "clients_per_round without replacement (accounted under replace-one adjacency); "
        "auto: poisson when DP is on, else fixed",
    )


class EvalConfig(Section):
    every: int = Field(5, ge=1, description="evaluate every N rounds (and after the last)")
    num_individuals: int = Field(100, ge=1, description="individuals evaluated for acc(D_I)")
    finetune_steps: int = Field(
        20, ge=0, description="personalization: SGD steps on the individual's train split"
    )
    finetune_lr: float = Field(0.05, gt=0)
    batch_size: int = Field(16, ge=1)
    target: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "an accuracy to reach: the summary gives the rounds and the simulated time (federation.system) to it"
        ),
    )
    target_metric: Literal["acc_global_DI", "acc_personalized_DI", "acc_global_DG"] = Field(
        "acc_global_DI", description="which evaluation mean `target` is for"
    )
