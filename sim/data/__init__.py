"""Federated datasets: every individual's data generated on demand from (experiment seed, client id).

``build_dataset(cfg.data, cfg.seed)`` returns the source named by ``cfg.data.kind``:

- ``writers``: scikit-learn digits re-drawn by writers with personal styles and label mixes
  (the hidden-factor and class-count variations of Schneider & Vlachos).
- ``synthetic``: Synthetic(alpha, beta) of the FedProx paper.
- ``femnist``: LEAF's FEMNIST JSON files.
- ``prototypes``: class prototypes plus noise, FEMNIST-shaped, for benchmarks.
- ``table``: your own Parquet/CSV table, one row per sample (by a client column, or partitioned).

The generated sources (writers, synthetic, prototypes) come as their cached classes: the same
source, whose federation is generated once into memory-mapped files that every process shares
(sim/data/cache.py), when ``data.cache`` is on and it fits ``data.cache_max_mb``.
"""

from __future__ import annotations

from fedmeta.sim.config import DataConfig
from fedmeta.sim.data.base import ClientData, FederatedDataset
from fedmeta.sim.data.cache import CachedClients
from fedmeta.sim.data.femnist import FemnistDataset
from fedmeta.sim.data.prototypes import PrototypesDataset
from fedmeta.sim.data.synthetic import SyntheticDataset
from fedmeta.sim.data.tabular import TableDataset
from fedmeta.sim.data.writers import WritersDataset

DATASETS: dict[str, type[FederatedDataset]] = {
    "writers": WritersDataset,
    "synthetic": SyntheticDataset,
    "femnist": FemnistDataset,
    "prototypes": PrototypesDataset,
    "table": TableDataset,
}


class CachedWritersDataset(CachedClients, WritersDataset):
    """WritersDataset whose clients come from the shared cache (sim/data/cache.py)."""


class CachedSyntheticDataset(CachedClients, SyntheticDataset):
    """SyntheticDataset whose clients come from the shared cache (sim/data/cache.py)."""


class CachedPrototypesDataset(CachedClients, PrototypesDataset):
    """PrototypesDataset whose clients come from the shared cache (sim/data/cache.py)."""


# module-level classes, so a pickled dataset finds its class again in another process
CACHED: dict[str, type[FederatedDataset]] = {
    "writers": CachedWritersDataset,
    "synthetic": CachedSyntheticDataset,
    "prototypes": CachedPrototypesDataset,
}


def build_dataset(cfg: DataConfig, seed: int) -> FederatedDataset:
    """The federated dataset described by cfg, with all randomness keyed by seed: a generated source
    through its cached class when `data.cache` is on (it still generates on demand when the
    federation exceeds `data.cache_max_mb` or the cache folder is unusable)."""
    if cfg.kind not in DATASETS:
        raise ValueError(f"data.kind: unknown dataset {cfg.kind!r}; expected one of {sorted(DATASETS)}")
    kind = CACHED.get(cfg.kind) if cfg.cache else None
    return (kind or DATASETS[cfg.kind])(cfg, seed)


__all__ = [
    "CACHED",
    "DATASETS",
    "CachedPrototypesDataset",
    "CachedSyntheticDataset",
    "CachedWritersDataset",
    "ClientData",
    "FederatedDataset",
    "FemnistDataset",
    "PrototypesDataset",
    "SyntheticDataset",
    "TableDataset",
    "WritersDataset",
    "build_dataset",
]
