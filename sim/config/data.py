"""The `data` section: which federation is simulated and how its clients' data is made.

One model per data source (`writers`, `synthetic`, `femnist`, `prototypes` and your own `table`,
with the `partition` that cuts a centralised table into clients) and the `drift` scenario that
changes the data mid-run; `DataConfig` holds them and checks that the chosen kind has what it needs.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedmeta.sim.config.base import Section


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

    alpha: float | None = Field(
        None,
        gt=0,
        description="label skew: each class's rows are split over the clients "
        "in Dirichlet(alpha) shares; null = rows dealt at random",
    )
    size_alpha: float | None = Field(
        None,
        gt=0,
        description="quantity skew: client sizes in Dirichlet(size_alpha) shares; null = equal sizes",
    )


class TableConfig(Section):
    """Your own federated data: a Parquet or CSV file with one row per sample."""

    path: str | None = Field(
        None,
        description="a .parquet/.pq or .csv file (relative: to the working directory, "
        "else to the config file's folder)",
    )
    client_column: str | None = Field(
        None,
        description="the column naming each row's client; null = a centralised "
        "table, cut into clients by `partition`",
    )
    label_column: str = Field("label", description="integer or string class labels")
    feature_columns: list[str] | None = Field(
        None, min_length=1, description="default: every other numeric column"
    )
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        None,
        min_length=1,
        max_length=3,
        description="reshape each row's features, e.g. [1, 28, 28] for pixel columns",
    )
    standardize: bool = Field(
        True, description="scale features to mean 0, sd 1 with statistics of the federation's train rows only"
    )
    partition: PartitionConfig = PartitionConfig()

    @model_validator(mode="after")
    def _partition_needs_no_clients(self) -> "TableConfig":
        if self.client_column is not None and self.partition != PartitionConfig():
            raise ValueError(
                f"partition: only for tables without a client column (client_column is "
                f"{self.client_column!r})"
            )
        return self


class DriftConfig(Section):
    """A drift scenario: from round `at_round` on, every individual's data changes (repeatable from
    the seed), or, with `joiners`, new individuals with the changed data join. Any combination of:
    images rotate, writing styles change, label mixes shift."""

    at_round: int | None = Field(
        None,
        ge=1,
        description="first training round (0-based, as the runner counts) "
        "on drifted data; evaluations after it see it too; null = no drift",
    )
    rotation: float = Field(
        0.0, ge=-180, le=180, description="degrees every image is rotated by after the drift"
    )
    style_strength: float | None = Field(
        None, ge=0, description="writers: new hidden-factor strength (new styles)"
    )
    alpha: float | None = Field(None, gt=0, description="writers: new Dirichlet label skew (label-mix shift)")
    joiners: int = Field(
        0,
        ge=0,
        description=(
            "new individuals: the last N ids (before the audit's canaries) are out of the federation until "
            "at_round and then join, holding the drifted data (e.g. unseen styles); the others' data stays"
        ),
    )

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
    cache: bool = Field(
        False,
        description="writers, synthetic, prototypes: generate every federation client once "
        "into memory-mapped files that the driver and all workers share "
        "(sim/data/cache.py, under ~/.cache/fedmeta/clients, never evicted), "
        "instead of regenerating each cohort every round; the benchmark "
        "workloads turn it on",
    )
    cache_max_mb: int = Field(
        1024,
        ge=0,
        description="the largest federation (estimated MB of inputs and labels) "
        "that is cached; larger ones are generated on demand",
    )
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
            raise ValueError(
                "drift.at_round: set what drifts too (rotation, style_strength or alpha; with joiners, what "
                "the newcomers bring)"
            )
        return self
