"""The privacy a run has spent: ``RunAccounting``, stepped once per released round.

It holds the run's user-level accountant (``make_accountant``), the ledger of each client's local
DP-SGD steps, and under distributed DP what the aggregator, who knows each round's participants,
learns of each user (``KnownParticipation``); it answers whether the next round or metric release
would overshoot ``privacy.target_epsilon``, reports epsilon per party and the privacy facts that the
run summary and the model card share, and is checkpointable as plain lists and arrays.
"""

from __future__ import annotations

import copy
from typing import Sequence

from fedmeta.actors.privacy.accountants import KnownParticipation, LocalDPLedger, make_accountant
from fedmeta.actors.privacy.budget import budget_spent
from fedmeta.actors.privacy.policy import SampleLevelDP, UserLevelDP
from fedmeta.sim.seeding import noise_sampler

CENTRAL_TRUST = (
    "central DP: the aggregator adds the noise to the sum it computes, so it sees the cohort's exact "
    "clipped updates and is trusted; distributed DP (privacy.mode: distributed) does not trust it"
)


class RunAccounting:
    """The privacy a run has spent: user-level rounds in an Opacus accountant, and each client's
    local DP-SGD steps in a ledger; under distributed DP also what the aggregator, who knows each
    round's participants, learns of each user (`KnownParticipation`). Stepped once per released
    round; checkpointable. `seeded`: the run's secrets (cohorts included) follow the seed
    (`run.seeded_secrets`), so amplification holds only against parties without the seed."""

    def __init__(self, dp: UserLevelDP, local: SampleLevelDP | None = None, seeded: bool = False):
        self.dp, self.local, self.seeded = dp, local, seeded
        self.accountant = make_accountant(dp.accountant, dp.sampling) if dp.enabled else None
        self.ledger = LocalDPLedger(local.noise_multiplier, dp.accountant) if local else None
        self.known = (
            KnownParticipation(dp.sampling.population, replace_one=dp.sampling.kind == "fixed")
            if dp.mode == "distributed"
            else None
        )

    def budget_stop(self) -> str | None:
        """Why the next round must not run (it would overshoot target_epsilon), or None."""
        dp = self.dp
        if (
            self.accountant
            and dp.target_epsilon is not None
            and budget_spent(
                self.accountant, dp.target_epsilon, dp.delta, next_round=(dp.noise_multiplier, dp.sample_rate)
            )
        ):
            return f"privacy budget: one more round would exceed epsilon {dp.target_epsilon}"
        return None

    def record_round(self, metrics: dict, participants: Sequence[int] = ()) -> None:
        """Account a finished round from the aggregator's metrics and the clients whose updates
        went in (`participants`); a skipped round released nothing."""
        if metrics.get("skipped"):
            return
        if self.accountant:
            z = self.dp.round_noise(metrics.get("secagg_survivors"))
            self.accountant.step(z, self.dp.sample_rate)
            if self.known is not None:
                self.known.record_round(participants, z)
        if self.ledger:
            for cid, releases, n_train in metrics.get("local_dp_releases", []):
                self.ledger.record(cid, releases, min(1.0, self.local.batch_size / n_train))

    def release_stop(self, noise_multiplier: float) -> str | None:
        """Why one more Gaussian release over every user (noise std / sensitivity =
        `noise_multiplier`, e.g. a private panel metric) must not happen, or None."""
        dp = self.dp
        if self.accountant and dp.target_epsilon is not None:
            after = copy.deepcopy(self.accountant)
            after.release(noise_multiplier)
            if after.epsilon(dp.delta) > dp.target_epsilon:
                return f"privacy budget: one more metric release would exceed epsilon {dp.target_epsilon}"
        return None

    def record_release(self, noise_multiplier: float) -> None:
        """Account a Gaussian release over every user (composed with the rounds; under distributed
        DP its noise comes from the panel's shares, so it counts against the aggregator too)."""
        if self.accountant:
            self.accountant.release(noise_multiplier)
        if self.known is not None:
            self.known.record_release(noise_multiplier)

    def epsilon(self) -> float | None:
        return self.accountant.epsilon(self.dp.delta) if self.accountant else None

    def local_epsilon(self) -> float | None:
        return self.ledger.epsilon(self.dp.delta) if self.ledger else None

    def by_party(self) -> dict | None:
        """epsilon per party: `released_model` (an observer of the model and its card: amplified by
        the secret sampling) and `aggregator` (what it learns of each user, or why it is trusted)."""
        dp = self.dp
        if not dp.enabled:
            return None
        against = (
            "parties without the seed: run.seeded_secrets makes cohorts, keys and noise follow from it"
            if self.seeded
            else "anyone without the run secret, from which the cohorts are drawn"
        )
        released = {"epsilon": self.epsilon(), "amplified": True, "holds_against": against}
        if self.known is None:
            return {
                "released_model": released,
                "aggregator": {"trusted": True, "epsilon": None, "reason": CENTRAL_TRUST},
            }
        agg = self.known.facts(dp.delta, dp.accountant)
        agg["reason"] = (
            "distributed DP: the aggregator learns each round's participants, so each user's rounds "
            "compose without amplification (worst-off and median user; metric releases count for all)"
        )
        return {"released_model": released, "aggregator": agg}

    def facts(self) -> dict:
        """What the run's privacy is, for the summary and the model card alike."""
        dp, on = self.dp, self.dp.enabled
        local = self.local
        return {
            "mode": dp.mode,
            "differential_privacy": on,
            "epsilon": self.epsilon(),
            "epsilon_by_party": self.by_party(),
            "noise_sampler": noise_sampler(self.seeded) if on or local else None,
            "delta": dp.delta if on else None,
            "noise_multiplier": dp.noise_multiplier if on else None,
            "clip_norm": dp.clip_norm if on else None,
            "accountant": dp.accountant if on else None,
            "sample_rate": dp.sample_rate,
            "sampling": dp.sampling.kind,
            "adjacency": dp.sampling.adjacency if on else None,
            "local_dp": (
                {
                    "clip": local.clip,
                    "noise_multiplier": local.noise_multiplier,
                    "epsilon": self.local_epsilon(),
                }
                if local
                else None
            ),
        }

    def state_dict(self) -> dict:
        return {
            "accountant": self.accountant.state_dict() if self.accountant else None,
            "local_dp": self.ledger.state_dict() if self.ledger else None,
            "participation": self.known.state_dict() if self.known is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.accountant and state.get("accountant"):
            self.accountant.load_state_dict(state["accountant"])
        if self.ledger and state.get("local_dp"):
            self.ledger.load_state_dict(state["local_dp"])
        if self.known is not None and state.get("participation"):
            self.known.load_state_dict(state["participation"])
