"""Surviving lost actors: what counts as a loss, and the run's tally of them.

Ray restarts a lost worker or aggregator actor (they are created with `max_restarts=-1`); the
federation (sim/engine/federation.py) then repeats the lost work on the restarted actor. That repeat gives
the same result: a client's update depends only on (seed, round, client id), the global model and
the run's secrets, never on which process computed it or how often, and the aggregator sums the
workers' messages in a fixed order. So a disturbed run ends where an undisturbed one does, bit for
bit, as long as the pool keeps its size. `ray.max_failures_per_round` bounds the losses one round
survives; beyond it the round fails with `RoundFailed` and the run stops at its last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from fedmeta.actors.messages import ProtocolStateLost

# an actor died or is unreachable, or an object it held is gone with it
LOST = (RayActorError, ObjectLostError)


FAULT_KEYS = ("worker_failures", "aggregator_failures", "retried_shards", "retried_rounds", "workers_dropped")


class RoundFailed(RuntimeError):
    """A round lost more actors than `ray.max_failures_per_round` allows."""


def lost_actor(err: BaseException) -> bool:
    """Whether `err` means an actor (or an object it held, or the protocol state it held) was
    lost, also when a task that depended on the lost actor's result reports it."""
    if isinstance(err, LOST):
        return True
    if isinstance(err, RayTaskError):
        return isinstance(getattr(err, "cause", None), (*LOST, ProtocolStateLost)) or isinstance(
            err.as_instanceof_cause(), (*LOST, ProtocolStateLost)
        )
    return False


def one_line(err: BaseException | str) -> str:
    text = str(err).strip().splitlines()
    head = text[0][:200] if text else ""
    return head if isinstance(err, str) else f"{type(err).__name__}: {head}"


@dataclass
class FaultLog:
    """Losses over the run (carried in checkpoints) and within the current round."""

    limit: int  # ray.max_failures_per_round
    counts: dict = field(default_factory=lambda: dict.fromkeys(FAULT_KEYS, 0))
    this_round: int = 0
    last_error: str = ""

    def begin_round(self) -> None:
        self.this_round = 0

    def lost(self, round_index: int, who: str, err: BaseException | str) -> None:
        """Count a loss; past the round's limit, fail the round with a one-line reason."""
        self.counts["aggregator_failures" if who == "aggregator" else "worker_failures"] += 1
        self.this_round += 1
        self.last_error = one_line(err)
        if self.this_round > self.limit:
            raise RoundFailed(
                f"round {round_index}: {self.this_round} actor losses, more than "
                f"ray.max_failures_per_round ({self.limit}); last: {who}: {self.last_error}"
            )

    def retried(self, what: str) -> None:
        self.counts[f"retried_{what}"] += 1

    def total(self) -> int:
        return self.counts["worker_failures"] + self.counts["aggregator_failures"]
