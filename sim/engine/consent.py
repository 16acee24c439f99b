"""The consent gate of a federation: the encrypted profile store (actors/profile_store/) decides
who may train, and who is evaluated, fine-tuned, exported and served by id. Every client signs up;
a seeded share grants 'personalization'; the driver keeps each user's token as that user's device
would (it acts for them in `revoke`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from fedmeta.actors.profile_store import ProfileStoreActor
from fedmeta.sim.artifacts.statedir import store_key_path
from fedmeta.sim.config import ExperimentConfig
from fedmeta.sim.seeding import np_rng

PURPOSE = "personalization"


def consenting_panel(seed: int, consenting: np.ndarray, k: int) -> np.ndarray:
    """The evaluation panel when consent gates it: k of the `consenting` users drawn uniformly
    (seeded, sorted), or all of them when fewer than k consent. Drawn once per run; users who
    revoke later leave it and are not replaced, so successive evaluations stay comparable."""
    consenting = np.asarray(consenting, dtype=np.int64)
    rng = np_rng(seed, "eval-individuals", "consenting")
    return np.sort(rng.choice(consenting, size=min(k, len(consenting)), replace=False))


class ConsentGate:
    def __init__(self, cfg: ExperimentConfig, num_clients: int, run_dir: Path | None):
        p = cfg.profiles
        path = Path(p.path) if p.path else (run_dir or Path(cfg.run.out_dir)) / "profiles.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        # the master key lives in the per-user state directory, never beside the database (sim/artifacts/statedir.py):
        # with the run's secrets for the run's own store, by the database's path for a store runs share
        self.store = ProfileStoreActor.remote(
            path, key_file=store_key_path(path, None if p.path else run_dir)
        )
        grants = np_rng(cfg.seed, "profiles-consent").random(num_clients) < p.consent_rate
        ids = np.arange(num_clients)
        self._tokens = ray.get(self.store.register_many.remote(ids[grants].tolist(), [PURPOSE]))
        self._tokens |= ray.get(self.store.register_many.remote(ids[~grants].tolist()))

    def admit(self, cohort: np.ndarray) -> np.ndarray:
        """The sampled clients that consent; the others never hear of the round."""
        return np.array(ray.get(self.store.eligible.remote(PURPOSE, cohort.tolist())), dtype=np.int64)

    def revoke(self, cid: int, purpose: str | None = None) -> None:
        """User `cid` withdraws consent (None: all purposes); they are out of the next round."""
        ray.get(self.store.revoke.remote(cid, self._tokens[cid], purpose))

    def close(self) -> None:
        ray.get(self.store.close.remote())
        ray.kill(self.store)
