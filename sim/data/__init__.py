"""Federated datasets: every individual's data generated on demand from (experiment seed, client id).

``build_dataset(cfg.data, cfg.seed)`` returns the source named by ``cfg.data.kind``:

- ``writers``: scikit-learn digits re-drawn by writers with personal styles and label mixes
  (the hidden-factor and class-count variations of Schneider & Vlachos).
- ``synthetic``: Synthetic(alpha, beta) of the FedProx paper.
- ``femnist``: LEAF's FEMNIST JSON files.
- ``prototypes``: class prototypes plus noise, FEMNIST-shaped, for benchmarks.
- ``table``: your own Parquet/CSV table, one row per sample (by a client column, or partitioned).
"""
from __future__ import annotations

from sim.config import DataConfig
from sim.data.base import ClientData, FederatedDataset
from sim.data.femnist import FemnistDataset
from sim.data.prototypes import PrototypesDataset
from sim.data.synthetic import SyntheticDataset
from sim.data.tabular import TableDataset
from sim.data.writers import WritersDataset

DATASETS: dict[str, type[FederatedDataset]] = {
    "writers": WritersDataset,
    "synthetic": SyntheticDataset,
    "femnist": FemnistDataset,
    "prototypes": PrototypesDataset,
    "table": TableDataset,
}


def build_dataset(cfg: DataConfig, seed: int) -> FederatedDataset:
    """The federated dataset described by cfg, with all randomness keyed by seed."""
    try:
        kind = DATASETS[cfg.kind]
    except KeyError:
        raise ValueError(f"data.kind: unknown dataset {cfg.kind!r}; expected one of {sorted(DATASETS)}") from None
    return kind(cfg, seed)


__all__ = ["DATASETS", "ClientData", "FederatedDataset", "FemnistDataset", "PrototypesDataset",
           "SyntheticDataset", "TableDataset", "WritersDataset", "build_dataset"]
