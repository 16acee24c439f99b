"""Which clients take part in a round: cohort sampling and simulated dropout (pure).

Every draw takes the run's `Secrets` (sim/seeding.py): cohorts come from its secret streams, so
nobody who holds only the published seed can recompute who was in which round, which is what
privacy amplification by subsampling assumes. With `run.seeded_secrets` they follow the seed, as
every stream then does (bit-exact replays)."""

from __future__ import annotations

import numpy as np

from fedmeta.sim.seeding import Secrets, np_rng


def sample_cohort(streams: Secrets, rnd: int, num_clients: int, k: int) -> np.ndarray:
    """k distinct client ids drawn uniformly for round `rnd` (sorted, so work splits are stable)."""
    if not 1 <= k <= num_clients:
        raise ValueError(f"cohort size {k} must be in [1, {num_clients}]")
    return np.sort(streams.np_rng("cohort", rnd).choice(num_clients, size=k, replace=False))


def sample_poisson(streams: Secrets, rnd: int, num_clients: int, rate: float) -> np.ndarray:
    """Poisson sampling for round `rnd`: every client joins independently with probability `rate`
    (sorted ids; the cohort's size varies). Drawn as a Binomial(num_clients, rate) size and then
    that many distinct ids uniformly, which is the same distribution at O(cohort) cost."""
    if not 0 < rate <= 1:
        raise ValueError(f"sampling rate {rate} must be in (0, 1]")
    rng = streams.np_rng("cohort-poisson", rnd)
    k = int(rng.binomial(num_clients, rate))
    return np.sort(rng.choice(num_clients, size=k, replace=False))


def draw_cohort(streams: Secrets, rnd: int, sampling) -> np.ndarray:
    """Round `rnd`'s cohort as `sampling` (an `fedmeta.actors.privacy.Sampling`-like kind/population/cohort) says."""
    if sampling.kind == "poisson":
        return sample_poisson(streams, rnd, sampling.population, sampling.cohort / sampling.population)
    return sample_cohort(streams, rnd, sampling.population, sampling.cohort)


def apply_dropout(streams: Secrets, rnd: int, cohort: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """(survivors, dropped): each sampled client independently fails to report with probability p."""
    if p <= 0:
        return cohort, cohort[:0]
    drop = streams.np_rng("dropout", rnd).random(len(cohort)) < p
    return cohort[~drop], cohort[drop]


def eval_individuals(seed: int, num_clients: int, k: int) -> np.ndarray:
    """The fixed panel of individuals evaluated every evaluation round."""
    return np.sort(
        np_rng(seed, "eval-individuals").choice(num_clients, size=min(k, num_clients), replace=False)
    )


def split_even(ids: np.ndarray, parts: int) -> list[list[int]]:
    """Contiguous, near-equal shards (one per worker, empty shards dropped)."""
    return [s.tolist() for s in np.array_split(ids, parts) if len(s)]
