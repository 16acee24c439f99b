"""Typed experiment configuration: one validated model per component, loaded in one place.

Unknown keys, wrong types and out-of-range values are rejected with a `ConfigError` whose message
names the key path (e.g. ``federation.rounds``) and what was expected. The CLI turns that into a
one-line message and exit status 2.
"""
from __future__ import annotations

import re
import reprlib
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A bad config value; the message names the key path and the expectation."""


class Section(BaseModel):
    # strict: a YAML string "5" for an int field is an error, not silently coerced; .nan/.inf are
    # never a setting (YAML reads 1.0e+999 as inf).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------- data
class WritersConfig(Section):
    """Federated handwriting from scikit-learn's digits with per-individual hidden factors."""

    image_size: int = Field(8, ge=8, le=32, description="side of the square images")
    flips: bool = Field(False, description="add horizontally/vertically flipped digits as classes 10-29")
    alpha: float | None = Field(None, gt=0, description="Dirichlet label skew; null = uniform classes")
    style_strength: float = Field(1.0, ge=0, description="scales every hidden factor (0 = no style)")


class SyntheticConfig(Section):
    """Synthetic(alpha, beta) of the FedProx paper (Li et al. 2020)."""

    alpha: float = Field(1.0, ge=0, description="model heterogeneity across devices")
    beta: float = Field(1.0, ge=0, description="feature heterogeneity across devices")
    dim: int = Field(60, ge=1)
    num_classes: int = Field(10, ge=2)


class FemnistConfig(Section):
    """LEAF-format FEMNIST JSON files (a file, or a directory searched recursively for *.json)."""

    path: str | None = None


class PrototypesConfig(Section):
    """Class prototypes plus noise: cheap FEMNIST-shaped data for benchmarks."""

    input_shape: list[int] = Field(default_factory=lambda: [1, 28, 28], min_length=1, max_length=3)
    num_classes: int = Field(62, ge=2)
    noise: float = Field(1.0, ge=0)


class PartitionConfig(Section):
    """How a table without a client column is cut into clients (data.num_clients + data.global_clients
    of them): the label and quantity skew of Li, Diao, Chen & He, "Federated Learning on Non-IID Data
    Silos: An Experimental Study" (ICDE 2022), as flwr-datasets' partitioners offer. Seeded."""

    alpha: float | None = Field(None, gt=0, description="label skew: each class's rows are split over the clients "
                                                       "in Dirichlet(alpha) shares; null = rows dealt at random")
    size_alpha: float | None = Field(None, gt=0, description="quantity skew: client sizes in Dirichlet(size_alpha) "
                                                            "shares; null = equal sizes")


class TableConfig(Section):
    """Your own federated data: a Parquet or CSV file with one row per sample."""

    path: str | None = Field(None, description="a .parquet/.pq or .csv file (relative: to the working directory, "
                                               "else to the config file's folder)")
    client_column: str | None = Field(None, description="the column naming each row's client; null = a centralised "
                                                        "table, cut into clients by `partition`")
    label_column: str = Field("label", description="integer or string class labels")
    feature_columns: list[str] | None = Field(None, min_length=1, description="default: every other numeric column")
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1, max_length=3,
                                          description="reshape each row's features, e.g. [1, 28, 28] for pixel columns")
    standardize: bool = Field(True, description="scale features to mean 0, sd 1 with statistics of the federation's "
                                                "train rows only")
    partition: PartitionConfig = PartitionConfig()

    @model_validator(mode="after")
    def _partition_needs_no_clients(self) -> "TableConfig":
        if self.client_column is not None and self.partition != PartitionConfig():
            raise ValueError(f"partition: only for tables without a client column (client_column is "
                             f"{self.client_column!r})")
        return self


class DriftConfig(Section):
    """A drift scenario: from round `at_round` on, every individual's data changes (repeatable from
    the seed), or, with `joiners`, new individuals with the changed data join. Any combination of:
    images rotate, writing styles change, label mixes shift."""

    at_round: int | None = Field(None, ge=1, description="first training round (0-based, as the runner counts) "
                                                        "on drifted data; evaluations after it see it too; null = no drift")
    rotation: float = Field(0.0, ge=-180, le=180, description="degrees every image is rotated by after the drift")
    style_strength: float | None = Field(None, ge=0, description="writers: new hidden-factor strength (new styles)")
    alpha: float | None = Field(None, gt=0, description="writers: new Dirichlet label skew (label-mix shift)")
    joiners: int = Field(0, ge=0, description=(
        "new individuals: the last N ids (before the audit's canaries) are out of the federation until "
        "at_round and then join, holding the drifted data (e.g. unseen styles); the others' data stays"))

    @model_validator(mode="after")
    def _joiners_join_at_a_round(self) -> "DriftConfig":
        if self.joiners and self.at_round is None:
            raise ValueError("joiners: new individuals join at at_round; set data.drift.at_round")
        return self


class DataConfig(Section):
    kind: Literal["writers", "synthetic", "femnist", "prototypes", "table"] = "writers"
    num_clients: int = Field(1000, ge=1, description="individuals in the federation")
    samples_per_client: int = Field(64, ge=2)
    train_fraction: float = Field(0.7, gt=0, le=1, description="share of D_I used for training")
    global_clients: int = Field(50, ge=1, description="individuals outside the federation forming D_G")
    cache: bool = Field(False, description="writers, synthetic, prototypes: generate every federation client once "
                                           "into memory-mapped files that the driver and all workers share "
                                           "(sim/data/cache.py, under ~/.cache/fedmeta/clients, never evicted), "
                                           "instead of regenerating each cohort every round; the benchmark "
                                           "workloads turn it on")
    cache_max_mb: int = Field(1024, ge=0, description="the largest federation (estimated MB of inputs and labels) "
                                                      "that is cached; larger ones are generated on demand")
    writers: WritersConfig = WritersConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    femnist: FemnistConfig = FemnistConfig()
    prototypes: PrototypesConfig = PrototypesConfig()
    table: TableConfig = TableConfig()
    drift: DriftConfig = DriftConfig()

    @model_validator(mode="after")
    def _femnist_needs_path(self) -> "DataConfig":
        if self.kind == "femnist" and not self.femnist.path:
            raise ValueError("femnist.path: required when kind is 'femnist'")
        if self.kind == "table" and not self.table.path:
            raise ValueError("table.path: required when kind is 'table'")
        d = self.drift
        if self.kind != "writers" and (d.style_strength is not None or d.alpha is not None):
            raise ValueError("drift.style_strength: style and label-mix drift need kind 'writers'")
        if d.at_round is not None and not (d.rotation or d.style_strength is not None or d.alpha is not None):
            raise ValueError("drift.at_round: set what drifts too (rotation, style_strength or alpha; with joiners, what "
                             "the newcomers bring)")
        return self


# ---------------------------------------------------------------- model + algorithm
class ModelConfig(Section):
    kind: Literal["mlp", "cnn", "custom"] = "mlp"
    target: str | None = Field(None, description="custom: 'package.module:factory', factory(input_shape, num_classes, "
                                                 "**kwargs) -> nn.Module, importable from the working directory or "
                                                 "PYTHONPATH")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="custom: keyword arguments of the factory")
    hidden: list[int] = Field(default_factory=lambda: [128], description="MLP hidden widths")
    channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1, description="CNN conv widths")
    kernel_size: int = Field(5, ge=1)
    padding: int = Field(0, ge=0)
    cnn_hidden: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _custom_needs_target(self) -> "ModelConfig":
        if self.kind == "custom" and not (self.target and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.target)):
            raise ValueError(f"target: kind 'custom' needs 'package.module:factory', got {self.target!r}")
        if self.kind != "custom" and (self.target or self.kwargs):
            key = "target" if self.target else "kwargs"
            raise ValueError(f"{key}: only for kind 'custom' (kind is {self.kind!r})")
        return self


BUILTIN_ALGORITHMS = ("fedavg", "reptile", "fomaml", "fedprox", "fedadam", "fedyogi", "fedadagrad", "ditto")


class AlgorithmConfig(Section):
    name: str = Field("fedavg", description="fedavg, reptile, fomaml, fedprox, fedadam, fedyogi, fedadagrad, ditto, "
                                            "or your "
                                            "own: 'package.module:Class' "
                                            "(a subclass of fedmeta.Algorithm, importable from the working "
                                            "directory or PYTHONPATH)")
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1, description="if set, overrides local_epochs")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.05, gt=0, description="client SGD learning rate (outer beta for fomaml)")
    inner_lr: float = Field(0.02, gt=0, description="fomaml inner (adaptation) learning rate alpha")
    server_lr: float = Field(1.0, gt=0, description="server step on the aggregated update")
    weighted: bool | None = Field(None, description="weight updates by train size; null = algorithm default")
    privacy_lambda: float = Field(0.0, ge=0, description="weight of the output-confidence privacy penalty in the local loss")
    proximal_mu: float = Field(0.01, ge=0, description="fedprox: weight of the proximal term mu/2 ||w - w_global||^2")
    beta1: float = Field(0.9, ge=0, lt=1, description="fedadam/fedyogi/fedadagrad: server momentum")
    beta2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi: server second-moment decay")
    tau: float = Field(1e-3, gt=0, description="fedadam/fedyogi/fedadagrad: adaptivity (epsilon) of the server step")
    ditto_lambda: float = Field(0.1, ge=0, description="ditto: pull lambda/2 ||v - w_global||^2 of each personalized "
                                                       "model v towards the global model")

    @field_validator("name")
    @classmethod
    def _known_or_importable(cls, name: str) -> str:
        if name in BUILTIN_ALGORITHMS or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name):
            return name
        raise ValueError(f"expected one of {', '.join(BUILTIN_ALGORITHMS)} or 'package.module:ClassName', got {name!r}")


DEFAULT_NOISE_MULTIPLIER = 1.0


class LeakageControlConfig(Section):
    """The privacy weight lambda of the personalization objective, adapted between rounds (sim/run/leakage.py):
    a dual-ascent step on the constraint `leakage <= target_auc`, from a private release of the panel's
    membership-inference AUC."""

    target_auc: float | None = Field(None, gt=0.5, lt=1, description=(
        "drive the personalized models' mean per-individual MIA AUC to this (null: lambda stays fixed)"))
    step: float = Field(20.0, gt=0, description="lambda += step * (released AUC - target_auc) at each update")
    max_weight: float = Field(100.0, gt=0, description="lambda is kept in [0, max_weight]")
    every: int | None = Field(None, ge=1, description="rounds between updates (null: eval.every)")
    noise_multiplier: float | None = Field(None, gt=0, description=(
        "under DP: noise std of each leakage release / its sensitivity 1 (null: privacy.metric_noise_multiplier, "
        "else z); the mean's "
        "noise is this over eval.num_individuals"))


class PrivacyConfig(Section):
    """User-level DP-FedAvg: clip each client's update to L2 norm C, Gaussian noise z*C on the sum."""

    mode: Literal["off", "central", "distributed"] = Field(
        "off", description="central: the aggregator adds noise to the sum; distributed: each client adds a "
                           "Skellam share before masking (needs secagg)")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound C on each client's update")
    noise_multiplier: float | None = Field(None, gt=0, description="z (1.0 when neither this nor target_epsilon is set)")
    target_epsilon: float | None = Field(None, gt=0, description="alone: find z for this epsilon over all rounds "
                                                                 "(Opacus); with noise_multiplier: the budget at "
                                                                 "which training and tuning stop")
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    mia_audit: bool = Field(True, description="loss-threshold membership inference at each evaluation")
    local_dp: bool = Field(False, description="sample-level DP-SGD inside each client (per-sample clipping + "
                                              "Gaussian noise at every local step; loop path)")
    local_clip: float = Field(1.0, gt=0, description="local DP-SGD: L2 bound on each per-sample gradient")
    local_noise_multiplier: float = Field(1.0, gt=0, description="local DP-SGD: noise std / local_clip")
    audit_canaries: int | None = Field(None, ge=0, description="canary clients of the one-run audit "
                                                               "(Steinke et al. 2023); null: 5% of the population "
                                                               "(at most 100) when DP is on, none otherwise")
    audit_confidence: float = Field(0.95, gt=0, lt=1, description="the audit's lower bound holds with this probability")
    metric_noise_multiplier: float | None = Field(None, gt=0, description=(
        "under DP: noise std of each panel metric release (Tune's reports, the card's quality) / its sensitivity 1; "
        "the mean's noise is this over eval.num_individuals (null: z)"))
    profile_clip: float | None = Field(None, gt=0, description=(
        "under DP: L2 bound on each client's contribution to the model card's input profile (its per-feature "
        "means of x and x^2); null: sqrt(2 x features), which never clips inputs in [0, 1]"))
    leakage_control: LeakageControlConfig = LeakageControlConfig()


class SecAggConfig(Section):
    """Masked secure aggregation (Bonawitz et al. 2017; SecAgg+ neighbour graph, Bell et al. 2020)."""

    enabled: bool = False
    neighbors: int | Literal["auto"] | None = Field(
        "auto", description="k of the k-regular mask graph (even, >= 2; SecAgg+); auto = the smallest k (and its "
                            "threshold) that meets the targets below for the cohort (Bell et al. 2020's parameter "
                            "finder, actors/secagg/params.py; the complete graph when no sparser one does); "
                            "null = complete graph")
    threshold: int | None = Field(None, ge=1, description="t shares recover a secret; null = the finder's t with "
                                                          "neighbors: auto, else k // 2 + 1")
    quant_bits: int = Field(16, ge=1, le=30, description="quantization step = privacy.clip_norm / 2^quant_bits")
    # security targets: what `auto` is chosen for, and what an explicit k/t is checked against (a
    # UserWarning at plan time when it falls short); the summary reports them (secagg_targets)
    dropout_rate: float | None = Field(None, ge=0, lt=1, description=(
        "delta: the most a round's cohort may lose after key set-up (a bound, not a mean: a round keeping fewer "
        "than ceil(n (1 - delta)) of its n clients is refused); null = the larger of "
        "0.33 (Bell et al.'s example) and the share the federation drops by design (federation.dropout and the "
        "over-selected clients) in all but 2^-correctness_bits of rounds"))
    adversarial_fraction: float = Field(0.05, ge=0, lt=1, description=(
        "gamma: the most clients that may collude with the server"))
    security_bits: int = Field(40, ge=1, le=128, description="sigma: the adversary learns more than the sum, or a "
                                                             "sum over part of the cohort, with probability < 2^-sigma")
    correctness_bits: int = Field(20, ge=1, le=64, description="eta: a round with at most dropout_rate dropouts "
                                                               "aborts with probability < 2^-eta")
    adversary: Literal["semi_honest", "semi_malicious"] = Field("semi_honest", description=(
        "the server auto sizes k and t against: semi_honest follows the protocol (this simulation's model, and "
        "Bell et al.'s tables: k = 72, t = 24 for 1,000 clients); semi_malicious may lie about who dropped out, "
        "which needs t > k/2 (k = 398, t = 223 there)"))

    @field_validator("neighbors", mode="before")
    @classmethod
    def _auto_int_or_null(cls, v: Any) -> Any:
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 2):
            return v
        raise ValueError(f"expected an even integer >= 2, 'auto' or null, got {_SHORT.repr(v)}")

    @model_validator(mode="after")
    def _even_k(self) -> "SecAggConfig":
        if isinstance(self.neighbors, int) and self.neighbors % 2:
            raise ValueError(f"neighbors: must be even (a k-regular Harary graph), got {self.neighbors}")
        return self


class SystemConfig(Section):
    """A seeded model of the clients' devices, for simulated time (as FedScale and FedBuff's
    simulations use): each device's compute speed and bandwidths are log-normal around a median."""

    enabled: bool = False
    step_s: float = Field(0.05, gt=0, description="seconds a median device takes for one local batch")
    speed_sigma: float = Field(0.0, ge=0, le=5, description="log-normal sigma of device speed (0: all alike)")
    down_mbps: float = Field(20.0, gt=0, description="median download bandwidth, Mbit/s")
    up_mbps: float = Field(5.0, gt=0, description="median upload bandwidth, Mbit/s")
    bandwidth_sigma: float = Field(0.0, ge=0, le=5, description="log-normal sigma of both bandwidths")
    availability: float = Field(1.0, gt=0, le=1, description=(
        "probability a device is online when it is asked (each round, independently); offline ones never "
        "answer, not even to secure aggregation's key set-up"))


class CompressionConfig(Section):
    """What a client does to its update before the upload (sim/compression.py)."""

    kind: Literal["none", "int8", "topk"] = Field(
        "none", description="int8: stochastic 8-bit quantization; topk: the largest coordinates only")
    topk_fraction: float = Field(0.01, gt=0, le=1, description="topk: the share of coordinates sent")
    error_feedback: bool = Field(True, description="topk: a client keeps what it left out and adds it next time")


class FedBuffConfig(Section):
    """Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022)."""

    concurrency: int = Field(20, ge=1, description="clients training at any moment (each finished one is replaced)")
    staleness: Literal["sqrt", "constant"] = Field(
        "sqrt", description="weight of an update that started tau server steps ago: 1/sqrt(1+tau), or 1")


class FederationConfig(Section):
    rounds: int = Field(20, ge=1)
    mode: Literal["sync", "fedbuff"] = Field(
        "sync", description="sync: rounds of a sampled cohort; fedbuff: buffered asynchronous aggregation on the "
                            "simulated clock (federation.system), a server step every clients_per_round updates")
    fedbuff: FedBuffConfig = FedBuffConfig()
    clients_per_round: int = Field(100, ge=1, description="the cohort: exact (fixed sampling) or expected (Poisson)")
    dropout: float = Field(0.0, ge=0, lt=1, description="probability a sampled client drops out")
    over_selection: float = Field(1.0, ge=1, le=10, description=(
        "stragglers: sample this many times clients_per_round and keep the first clients_per_round to "
        "finish (production FL's over-selection, e.g. 1.3); the privacy accounting uses the larger sample"))
    deadline_s: float | None = Field(None, gt=0, description=(
        "stragglers: a round's training deadline in seconds; clients not finished by then drop out, and a "
        "worker's shard not back by 1.5x the deadline is cancelled (its clients drop out). With "
        "federation.system enabled: in simulated seconds"))
    max_update_norm: float | None = Field(None, gt=0, description=(
        "reject a client's update whose L2 norm exceeds this (before any clipping), as one with a NaN or an "
        "infinity always is: rejected updates are counted (round log rejected_updates) and never summed"))
    system: SystemConfig = SystemConfig()
    compression: CompressionConfig = CompressionConfig()
    sampling: Literal["auto", "poisson", "fixed"] = Field(
        "auto", description="how cohorts are drawn. poisson: each client joins independently with rate "
                            "clients_per_round / num_clients (what DP accountants assume); fixed: exactly "
                            "clients_per_round without replacement (accounted under replace-one adjacency); "
                            "auto: poisson when DP is on, else fixed")


class EvalConfig(Section):
    every: int = Field(5, ge=1, description="evaluate every N rounds (and after the last)")
    num_individuals: int = Field(100, ge=1, description="individuals evaluated for acc(D_I)")
    finetune_steps: int = Field(20, ge=0, description="personalization: SGD steps on the individual's train split")
    finetune_lr: float = Field(0.05, gt=0)
    batch_size: int = Field(16, ge=1)
    target: float | None = Field(None, gt=0, le=1, description=(
        "an accuracy to reach: the summary gives the rounds and the simulated time (federation.system) to it"))
    target_metric: Literal["acc_global_DI", "acc_personalized_DI", "acc_global_DG"] = Field(
        "acc_global_DI", description="which evaluation mean `target` is for")


class MethodSpec(Section):
    """One row of the personalization table (Schneider & Vlachos, Table I)."""

    method: Literal["baseline", "es", "sw", "tl", "random", "sg", "ig"] = Field(
        description="shaping: baseline, es, sw, tl; grouping: random (the grouping baseline), sg, ig")
    n: float | None = Field(None, gt=0, description="es/tl: batches on D_I; sw: periodicity n_I (may be < 1); "
                                                    "random/sg: samples added; ig: individuals added")
    last_layers: int | None = Field(None, ge=1, description="tl: adapt only the last k layers")

    @model_validator(mode="after")
    def _n_fits_method(self) -> "MethodSpec":
        if self.method == "baseline":
            if self.n is not None:
                raise ValueError("n: the shaping baseline takes no n")
        elif self.n is None:
            raise ValueError(f"n: required for method '{self.method}'")
        elif self.method != "sw" and self.n != int(self.n):
            raise ValueError(f"n: must be a whole number for method '{self.method}', got {self.n}")
        if self.last_layers is not None and self.method != "tl":
            raise ValueError("last_layers: only for method 'tl'")
        return self

    @property
    def group(self) -> str:
        return "shaping" if self.method in ("baseline", "es", "sw", "tl") else "grouping"

    @property
    def label(self) -> str:
        names = {"baseline": "BaseLine", "es": "EarlyShape-ES", "sw": "SampleWeigh-SW", "tl": "TransferL-TL",
                 "random": "BaseLine", "sg": "SingleSa.Group-SG", "ig": "IndividualGroup-IG"}
        if self.n is None:
            return names[self.method]
        n = int(self.n) if self.n == int(self.n) else self.n
        tail = f"-last-{self.last_layers}" if self.last_layers else ""
        return f"{names[self.method]}-n-{n}{tail}"


def _table_i_methods() -> list[MethodSpec]:
    rows = [("baseline", None), ("es", 40), ("es", 400), ("sw", 12), ("sw", 2), ("tl", 10), ("tl", 300),
            ("random", 1500), ("random", 6500), ("ig", 5), ("ig", 21), ("sg", 1500), ("sg", 6500)]
    return [MethodSpec(method=m, n=n) for m, n in rows]


class PersonalizationConfig(Section):
    """`fedmeta table`: one model per individual and method, trained on D_G (the server's data) and
    the individual's D_I (its device), evaluated on D_I's test split and on held-out D_G."""

    individuals: int = Field(30, ge=2, description="evaluated individuals (from the federation)")
    global_test_fraction: float = Field(0.2, gt=0, lt=1, description="share of D_G held out for acc(D_G)")
    epochs: int = Field(5, ge=1, description="passes over D_G")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0, description="SGD learning rate of every method")
    grouping_periodicity: float = Field(2.0, gt=0, description="SW n_I with which grouping methods mix in D_I'")
    latent_dim: int = Field(16, ge=1, description="auto-encoder code size")
    ae_epochs: int = Field(20, ge=1)
    ae_lr: float = Field(1e-3, gt=0, description="auto-encoder Adam learning rate")
    ig_pool: int = Field(300, ge=2, description="federation individuals whose class-mean latents enter the "
                                                "profile store as IG candidates")
    consent_rate: float = Field(1.0, ge=0, le=1, description="share of the pool consenting to 'grouping'")
    methods: list[MethodSpec] = Field(default_factory=_table_i_methods, min_length=1)


class RayConfig(Section):
    address: str | None = Field(None, description="existing cluster address; null = start local Ray")
    connect_timeout_s: float = Field(60.0, gt=0, description="how long a cluster at `address` may take to answer "
                                                             "before the command fails (exit 2)")
    num_workers: int = Field(2, ge=1, description="ClientWorker actors in the pool")
    num_cpus_per_worker: float = Field(1.0, ge=0)
    num_gpus_per_worker: float | None = Field(None, ge=0, description="null = share GPUs if present")
    compute: Literal["auto", "vmap", "loop"] = Field("auto", description="cohort engine: vmap (torch.func over "
                                                     "clients), loop (one client at a time), auto (per model kind)")
    placement: Literal["spread", "pack"] = Field("spread", description="spread: worker actors over as many nodes as "
                                                                       "have room (Ray's SPREAD strategy); pack: "
                                                                       "Ray's default (fill a node first)")
    max_failures_per_round: int = Field(3, ge=0, description="lost worker/aggregator actors one round survives (Ray "
                                                             "restarts them and the lost work is repeated); beyond "
                                                             "it the run stops at its last checkpoint")
    restart_timeout_s: float = Field(120.0, gt=0, description="how long a lost actor may take to come back before "
                                                              "the pool goes on without it")

    @model_validator(mode="before")
    @classmethod
    def _deprecated_path(cls, raw: Any) -> Any:
        """`ray.path` was the compute mode's first name: still read, with a warning."""
        if isinstance(raw, dict) and "path" in raw:
            if "compute" in raw:
                raise ValueError("path: deprecated alias of ray.compute; give only ray.compute")
            warnings.warn("ray.path is deprecated and will be removed; use ray.compute (same values)",
                          FutureWarning, stacklevel=2)
            raw = {("compute" if k == "path" else k): v for k, v in raw.items()}
        return raw


class ProfilesConfig(Section):
    """The encrypted user profile store (actors/profile_store.py) as the federation's consent gate:
    every client is a registered user; only those consenting to 'personalization' train."""

    enabled: bool = False
    path: str | None = Field(None, description="SQLite file; null = profiles.sqlite in the run directory "
                                               "(its master key in the per-user state directory, "
                                               "$FEDMETA_STATE_DIR, never next to it)")
    consent_rate: float = Field(1.0, ge=0, le=1, description="share of users granting 'personalization' at sign-up")


class TuneParam(Section):
    """One searched hyperparameter: a dotted key of this config and its range."""

    key: str = Field(description="e.g. algorithm.lr, algorithm.local_epochs, privacy.clip_norm, algorithm.privacy_lambda, "
                                 "model.hidden.0 (a list entry by its index)")
    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _range(self) -> "TuneParam":
        if not self.low < self.high:
            raise ValueError(f"high: must be above low ({self.low}), got {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"low: a log-scale range needs low > 0, got {self.low}")
        return self


# What a trial can be judged on: the private panel accuracies (higher is better), the trial model's
# inference time per batch in ms, its membership-inference AUC (the audit's leakage) and the epsilon
# its own rounds and metric releases spent (lower is better).
TUNE_OBJECTIVES = {"acc_personalized_DI": "max", "acc_global_DI": "max", "latency_ms": "min", "mia_auc": "min",
                   "epsilon": "min"}


class TuneObjective(Section):
    """One objective of a multi-objective search."""

    metric: Literal["acc_personalized_DI", "acc_global_DI", "latency_ms", "mia_auc", "epsilon"]
    mode: Literal["max", "min"] | None = Field(None, description="null: max for the accuracies, min for the others")

    @property
    def direction(self) -> str:
        return self.mode or TUNE_OBJECTIVES[self.metric]


def _default_tune_params() -> list[TuneParam]:
    return [TuneParam(key="algorithm.lr", low=0.01, high=0.5, log=True),
            TuneParam(key="algorithm.local_epochs", low=1, high=10, integer=True),
            TuneParam(key="eval.finetune_lr", low=0.005, high=0.3, log=True)]


class TuneConfig(Section):
    """`fedmeta tune`: Bayesian (Optuna TPE) or random search over the federation's hyperparameters."""

    num_samples: int = Field(8, ge=1, description="trials")
    max_concurrent: int = Field(2, ge=1, description="trials at once (each runs its own actor pool)")
    rounds_per_trial: int = Field(10, ge=1)
    report_every: int = Field(1, ge=1, description="a trial reports its panel metrics every this many rounds and after "
                                                   "its last (ASHA sees only these); under DP each report is a "
                                                   "release that spends budget")
    searcher: Literal["optuna", "random"] = "optuna"
    metric: Literal["acc_personalized_DI", "acc_global_DI"] = "acc_personalized_DI"
    objectives: list[TuneObjective] = Field(
        default_factory=list, description="two or more: a multi-objective search (Optuna's multi-objective sampler "
                                          "through Tune's OptunaSearch, no early stopping) whose result is the Pareto "
                                          "front; empty: maximize `metric`")
    sampler: Literal["tpe", "gp", "nsga2"] = Field("tpe", description="optuna: the sampler: tpe, gp (Gaussian-process "
                                                                     "BO) or nsga2 (only with objectives)")
    startup_trials: int = Field(3, ge=1, description="optuna tpe/gp: random trials before the model proposes (Optuna's "
                                                     "default 10 would leave a short search random)")
    ei_candidates: int = Field(24, ge=1, description="optuna tpe: candidates drawn from the good trials' density per "
                                                     "proposal, of which the best density ratio runs (Optuna's default "
                                                     "24; more follows the model harder, which pays in a short search)")
    warm_start: bool = Field(True, description="optuna: the first trial runs the config's own values (e.g. the "
                                               "pre-drift hyperparameters), clipped into the ranges")
    latency_batch: int = Field(64, ge=1, description="objective latency_ms: inputs per timed inference batch")
    grace_period: int = Field(3, ge=1, description="ASHA: rounds before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2)
    params: list[TuneParam] = Field(default_factory=_default_tune_params, min_length=1)
    auto: bool = Field(False, description="fedmeta run: watch the individuals' inference inputs and tune on a drift alarm")
    reference_rounds: int = Field(3, ge=1, description="auto: rounds of inputs the drift detector is calibrated on")
    watch_individuals: int = Field(20, ge=1, description="auto: individuals whose test inputs form each round's stream")
    false_alarm_rate: float = Field(0.01, gt=0, lt=1, description="auto: detector calibration target per batch")

    @model_validator(mode="after")
    def _objectives(self) -> "TuneConfig":
        names = [o.metric for o in self.objectives]
        if len(self.objectives) == 1:
            raise ValueError("objectives: give two or more for a multi-objective search, or none and set `metric`")
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: each metric once, got {names}")
        if self.sampler == "nsga2" and not self.objectives:
            raise ValueError("sampler: nsga2 is a multi-objective sampler; give objectives, or use tpe")
        return self


class RunConfig(Section):
    name: str = "run"
    out_dir: str = "runs"
    checkpoint_every: int = Field(5, ge=1)
    progress: bool = True
    code_paths: list[str] = Field(default_factory=list, description="folders your own model/algorithm code is "
                                                                    "imported from, besides the working directory "
                                                                    "and PYTHONPATH; loading a config file adds its "
                                                                    "folder")
    seeded_secrets: bool = Field(False, description="derive clients' keys, masks and all DP noise from the seed: "
                                                    "bit-exact runs for tests and debugging, private only against "
                                                    "parties that do not know the seed (default: a fresh run secret)")


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
        if self.privacy.mode == "distributed" and not self.secagg.enabled:
            raise ValueError("privacy.mode: 'distributed' noise is added under secure aggregation; "
                             "set secagg.enabled: true (or use mode 'central')")
        fed = self.federation
        if fed.mode == "fedbuff":
            if not fed.system.enabled:
                raise ValueError("federation.mode: fedbuff runs on the simulated clock; set federation.system.enabled: "
                                 "true")
            if self.secagg.enabled:
                raise ValueError("federation.mode: fedbuff is not combined with secure aggregation here (a buffered "
                                 "secure sum needs a trusted aggregator, as FedBuff assumes); set secagg.enabled: false")
            if fed.over_selection != 1 or fed.deadline_s is not None or fed.dropout:
                raise ValueError("federation.mode: fedbuff has no rounds to over-select, time out or drop from; "
                                 "unset over_selection, deadline_s and dropout")
            if fed.fedbuff.concurrency < fed.clients_per_round:
                raise ValueError(f"federation.fedbuff.concurrency: must be >= clients_per_round (the buffer, "
                                 f"{fed.clients_per_round})")
        if fed.compression.kind != "none" and self.secagg.enabled:
            raise ValueError("federation.compression: secure aggregation sends masked vectors, which do not "
                             "compress; set secagg.enabled: false or compression.kind: none")
        if self.privacy.local_dp and self.ray.compute == "vmap":
            raise ValueError("ray.compute: local DP-SGD (privacy.local_dp) runs on the loop; set ray.compute "
                             "to 'loop' or 'auto'")
        objectives = {o.metric for o in self.tune.objectives}
        if "epsilon" in objectives and self.privacy.mode == "off":
            raise ValueError("tune.objectives: epsilon needs differential privacy (privacy.mode central or distributed)")
        if "mia_auc" in objectives and not self.privacy.mia_audit:
            raise ValueError("tune.objectives: mia_auc is measured by the audit; set privacy.mia_audit: true")
        if self.privacy.leakage_control.target_auc is not None and self.eval.finetune_steps == 0:
            raise ValueError("privacy.leakage_control.target_auc: the privacy weight acts on personalization; "
                             "needs eval.finetune_steps > 0")
        dumped = self.model_dump()
        for i, param in enumerate(self.tune.params):
            node = dumped
            for part in param.key.split("."):
                if isinstance(node, list):     # a list entry by its index, e.g. model.hidden.0
                    node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
                else:
                    node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, bool) or not isinstance(node, (int, float)):
                raise ValueError(f"tune.params.{i}.key: {param.key!r} is not a numeric key of this config")
        if self.data.kind not in ("femnist", "table") or (self.data.kind == "table"
                                                           and self.data.table.client_column is None):
            if self.federation.clients_per_round > self.data.num_clients:
                raise ValueError(
                    f"federation.clients_per_round: must be <= data.num_clients ({self.data.num_clients})")
            if self.eval.num_individuals > self.data.num_clients:
                raise ValueError(f"eval.num_individuals: must be <= data.num_clients ({self.data.num_clients})")
        return self


# ---------------------------------------------------------------- loading
def _describe(err: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    loc = ".".join(str(p) for p in (*prefix, *err["loc"]))
    msg = err["msg"]
    if err["type"] == "value_error":
        # our validators start their message with the key path relative to the section they check
        msg = msg.removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head:
            return f"{loc + '.' if loc else ''}{head}: {rest}"
        return f"{loc or '<root>'}: {msg}"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    got = err.get("input")
    # reprlib: a hostile value (YAML aliases nest a list 9^9 deep cheaply) is shown in bounded time
    shown = _SHORT.repr(got) if not isinstance(got, dict) else "a mapping"
    return f"{loc}: {msg} (got {shown})"


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 4, 40, 40, 40
INT64 = 2**63 - 1
MAX_CONFIG_BYTES = 1 << 20


def _check_plain(node: Any, path: tuple = (), seen: set | None = None) -> None:
    """Values no field can take, named by their key path before pydantic sees them: integers beyond
    int64 (numpy, torch and Ray would fail later with a traceback) and non-string keys. Shared
    subtrees (YAML aliases) are checked once, so an alias bomb costs its size on disk, not 9^9."""
    seen = set() if seen is None else seen
    if isinstance(node, (dict, list)):
        if id(node) in seen:
            return
        seen.add(id(node))
    where = ".".join(map(str, path)) or "<root>"
    if isinstance(node, int) and not isinstance(node, bool) and abs(node) > INT64:
        raise ConfigError(f"{where}: {_SHORT.repr(node)} is out of range (at most {INT64:,} in magnitude)")
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: keys are names, got the {type(k).__name__} {_SHORT.repr(k)}")
            _check_plain(v, (*path, k), seen)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_plain(v, (*path, i), seen)


def from_dict(raw: Any, source: str = "config") -> ExperimentConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        _check_plain(raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        errs = e.errors()
        first = _describe(errs[0])
        more = f" (and {len(errs) - 1} more error(s))" if len(errs) > 1 else ""
        raise ConfigError(f"{source}: {first}{more}") from None


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`key.path=value` strings; values are parsed as YAML scalars (3 -> int, null -> None)."""
    out = []
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            out.append((key.strip(), yaml.safe_load(val)))
        except (yaml.YAMLError, RecursionError):
            raise ConfigError(f"--set {key}: value {val!r} is not valid YAML") from None
    return out


def read_yaml(p: Path, missing: str) -> Any:
    """The YAML document in file `p`; a one-line ConfigError when it is not there (`missing` says
    what it should have been) or is not valid YAML (where)."""
    if not p.is_file():
        raise ConfigError(f"{p}: {missing}")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: {p.stat().st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,} (is this the "
                          f"right file?)")
    try:
        return yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None


def load_raw(path: str | Path) -> dict:
    raw = read_yaml(Path(path), f"config file not found (nor a preset: {', '.join(presets())})")
    return raw if raw is not None else {}


def config_path(path: str | Path | None) -> Path:
    """A config file, or the name of a built-in preset (`quickstart`, `table`, `bench_w1`, ...): a path
    that exists wins; otherwise a preset of that name; None is the quickstart."""
    if path is None:
        return default_config_path()
    p = Path(path)
    if p.is_file() or p.suffix or len(p.parts) > 1:
        return p
    preset = default_config_path(f"{p.name}.yaml")
    return preset if preset.is_file() else p


def presets() -> list[str]:
    return sorted(Path(str(f)).stem for f in default_config_path().parent.glob("*.yaml"))


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment (a path or a preset name; default: the built-in quickstart) with
    optional `key=value` overrides."""
    src = config_path(path)
    raw = load_raw(src)
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: expected a mapping of sections at the top level")
    for key, val in parse_overrides(overrides or []):
        _set_path(raw, key, val)
    if src.resolve().parent != default_config_path().resolve().parent:
        _anchor_to_folder(raw, src.resolve().parent)
    return from_dict(raw, source=str(src))


DATA_PATHS = (("data", "table", "path"), ("data", "femnist", "path"))


def _anchor_to_folder(raw: dict, folder: Path) -> None:
    """A config file's folder is where its own code and data are found too: the folder joins
    `run.code_paths`, and a relative data path missing from the working directory but present next
    to the file becomes that absolute path (so the saved config resumes from anywhere)."""
    run = raw.setdefault("run", {})
    if isinstance(run, dict):
        paths = run.setdefault("code_paths", [])
        if isinstance(paths, list) and str(folder) not in paths:
            paths.append(str(folder))
    for keys in DATA_PATHS:
        node: Any = raw
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute() and not Path(value).exists() \
                and (folder / value).exists():
            node[keys[-1]] = str(folder / value)


def with_absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with its relative data paths made absolute against this process's working
    directory, so actors started elsewhere (another folder, another node) read the same files."""
    data = cfg.data
    for name in ("table", "femnist"):
        section = getattr(data, name)
        if section.path and not Path(section.path).is_absolute():
            section = section.model_copy(update={"path": str(Path(section.path).resolve())})
            data = data.model_copy(update={name: section})
    return cfg if data is cfg.data else cfg.model_copy(update={"data": data})


def default_config_path(name: str = "quickstart.yaml") -> Path:
    """configs/<name> (default: the quickstart): the checkout's folder, or in an installed wheel the
    package data of `fedmeta.configs`, found with importlib.resources."""
    here = Path(__file__).resolve().parent.parent / "configs" / name
    if here.is_file():
        return here
    from importlib.resources import files

    return Path(str(files("fedmeta.configs") / name))


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
