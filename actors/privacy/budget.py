"""Privacy budgets: when the next release must not happen, and what a hyperparameter search spends.

``budget_spent`` is the stop rule of a training loop: has the accountant passed the target
epsilon, or would one more round at (z, q) take it past? ``PrivacyBudget`` is the budget of a search
over hyperparameters (Ray Tune trials) on the same users: each trial reserves a round and a metric
release before running them, at their worst noise, and settles them with the noise achieved; a
reservation that would take the total (with what the run spent before tuning) past the target is
refused, and every change is written whole or not at all to a ledger file
(``fedmeta.sim.artifacts.durable.write_atomic``), which a resumed search starts from.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from fedmeta.actors.privacy.accountants import PrivacyAccountant, make_accountant
from fedmeta.actors.privacy.checks import _positive

if TYPE_CHECKING:
    from fedmeta.actors.privacy.policy import UserLevelDP


def budget_spent(
    accountant: PrivacyAccountant,
    target_epsilon: float,
    delta: float,
    next_round: tuple[float, float] | None = None,
) -> bool:
    """True once the spent epsilon exceeds ``target_epsilon``.

    With ``next_round=(z, q)`` it asks whether running one more such round would exceed it, so a
    training loop can stop *before* overshooting rather than after.
    """
    _positive("target_epsilon", target_epsilon)
    if next_round is not None:
        accountant = copy.deepcopy(accountant)
        accountant.step(*next_round)
    return accountant.epsilon(delta) > target_epsilon


class PrivacyBudget:
    """What a search over hyperparameters spends on the same users (Ray Tune trials). Every trial
    round is a subsampled Gaussian release of the model and every tuning-metric report a Gaussian
    release over the evaluation panel; both compose with what the run had spent before tuning
    (`base`: an accountant's `state_dict`, e.g. from the checkpoint tuning starts from).

    A trial `reserve`s a round before running it, at the worst noise the round can end with (the
    distributed mode's z at the secure-aggregation threshold), and `settle`s it with the noise it
    achieved. A reservation that would take the total past `target_epsilon` is refused, so
    concurrent trials can never overshoot the target together: what is reserved is an upper bound
    of what was released (a failed round keeps its reservation).

    `ledger`: a file this budget's entries are written to at every change; `prior`: the entries of
    earlier sittings of the same search (a resumed search: its earlier trials' rounds stay spent,
    and a reservation that was never settled counts at its reserved noise)."""

    def __init__(
        self,
        dp: UserLevelDP,
        base: dict | None = None,
        target_epsilon: float | None = None,
        ledger: str | Path | None = None,
        prior: Sequence[Sequence[float]] = (),
    ):
        self.dp, self.base, self.target = dp, base, target_epsilon
        self.entries: dict[int, tuple[float, float]] = {}  # id -> (round z or 0: none, release z)
        self.prior = [(float(a), float(b)) for a, b in prior]
        self._next = 0
        self.ledger = Path(ledger) if ledger is not None else None

    def _save(self) -> None:
        if self.ledger is None:
            return
        from fedmeta.sim.artifacts.durable import (
            write_atomic,
        )  # whole or not at all: a crash keeps the last one

        write_atomic(self.ledger, json.dumps({"entries": [list(e) for e in self.entries.values()]}))

    def _accountant(self, with_base: bool):
        acc = make_accountant(self.dp.accountant, self.dp.sampling)
        if with_base and self.base:
            acc.load_state_dict(self.base)
        # composition does not depend on the order: like steps in a row, so the history stays short
        spent = [*self.prior, *self.entries.values()]
        for round_z in sorted(z for z, _ in spent if z > 0):
            acc.step(round_z, self.dp.sample_rate)
        for release_z in sorted(z for _, z in spent if z > 0):
            acc.release(release_z)
        return acc

    def reserve(self, round_z: float, release_z: float) -> int | None:
        """An id for one more round (noise `round_z`; 0: it releases no model) and metric release
        (`release_z`; 0: it reports nothing), or None when it would exceed the target."""
        rid, self._next = self._next, self._next + 1
        self.entries[rid] = (float(round_z), float(release_z))
        if self.target is not None and self._accountant(True).epsilon(self.dp.delta) > self.target:
            del self.entries[rid]
            return None
        self._save()
        return rid

    def settle(self, rid: int, round_z: float, release_z: float) -> None:
        """What reservation `rid` released: `round_z` 0 for a round that released no model,
        `release_z` 0 for one that reported nothing."""
        if rid not in self.entries:
            raise KeyError(f"reservation {rid}: unknown")
        self.entries[rid] = (float(round_z), float(release_z))
        self._save()

    def epsilon(self) -> dict:
        """Epsilon of the tuning alone and of the run with it, and the accountant state of the
        latter (what the run continues from)."""
        total = self._accountant(True)
        return {
            "epsilon_tuning": self._accountant(False).epsilon(self.dp.delta),
            "epsilon_total": total.epsilon(self.dp.delta),
            "reserved_rounds": len(self.prior) + len(self.entries),
            "accountant_state": total.state_dict(),
        }
