"""Canary clients of the one-run privacy audit (`privacy.audit_canaries`, actors/audit.py).

The last m client ids of the federation are canaries. Each is included with probability 1/2,
independently (the audit's secret coin; excluded canaries never join a cohort), and a canary that
takes part in a round submits, instead of a trained update, its own fixed random direction of L2
norm C (`privacy.clip_norm`): the worst-case client the DP analysis allows, as in the canary clients
of Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar 2024 ("One-shot Empirical Privacy Estimation
for Federated Learning"). The auditor scores each canary by the projection of the released model's
total change on its direction; random directions in many dimensions are nearly orthogonal, so an
included canary stands out by what it added, by as much as the noise lets it.
"""

from __future__ import annotations

import numpy as np

from fedmeta.sim.seeding import np_rng

MAX_AUTO = 100  # auto: 5% of the population, at most this many


def canary_count(requested: int | None, num_clients: int, dp_enabled: bool) -> int:
    """`privacy.audit_canaries` resolved: None audits every DP run with 5% of the population (at
    most 100); a non-private run has none unless asked for."""
    count = (min(MAX_AUTO, num_clients // 20) if dp_enabled else 0) if requested is None else requested
    if not 0 <= count < num_clients:
        raise ValueError(f"privacy.audit_canaries: must be fewer than the {num_clients} clients, got {count}")
    return count


def canary_ids(count: int, num_clients: int) -> np.ndarray:
    return np.arange(num_clients - count, num_clients)


def canary_inclusion(streams, count: int) -> np.ndarray:
    """Which canaries join the federation: independent fair coins from the run's secret streams
    (`Secrets`): the audit's guess is measured against coins the released model's observer cannot
    recompute from the seed."""
    return streams.np_rng("canary-inclusion").random(count) < 0.5


def canary_direction(seed: int, cid: int, n_params: int) -> np.ndarray:
    """Canary `cid`'s update direction: uniform on the unit sphere (float32)."""
    v = np_rng(seed, "canary-direction", cid).standard_normal(n_params)
    return (v / np.linalg.norm(v)).astype(np.float32)
