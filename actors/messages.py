"""What workers send the aggregator, and what the aggregator makes of it (pure, no Ray).

A worker sends ONE message per round (or per secure-sum session): sums over its clients, never
data. A plain update carries the float sum of weighted updates; a masked one carries the sum of
the clients' quantized, masked vectors mod 2^b, which means nothing until the secure-sum session
unmasks the total. Both reduce to a `SummedUpdates`, on which the server rule acts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LocalDPSteps = tuple[tuple[int, int, int], ...]   # (client id, local steps, n_train) per client


@dataclass(frozen=True)
class PlainUpdate:
    """A worker's round without secure aggregation: sum_i w_i * (local_i - global) and sum_i w_i."""

    round_id: int
    worker: int
    weighted_sum: np.ndarray                  # (n_params,) float32
    weight: float
    client_ids: tuple[int, ...]
    train_loss_sum: float                     # sum over clients of their mean local loss
    compute_s: float = 0.0
    local_dp_steps: LocalDPSteps | None = None   # local DP-SGD: for each client's own accounting

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)


@dataclass(frozen=True)
class MaskedUpdate:
    """A worker's share of a secure sum: the sum of its clients' masked inputs mod 2^b (pair masks
    between clients of this worker already cancelled). `round_id` is the session's protocol round."""

    round_id: int
    worker: int
    masked_sum: np.ndarray                    # (dim,) uint64, each entry < 2^bits
    client_ids: tuple[int, ...]
    train_loss_sum: float = 0.0
    compute_s: float = 0.0
    local_dp_steps: LocalDPSteps | None = None

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)


@dataclass(frozen=True)
class SummedUpdates:
    """A round's aggregate before the server rule: the (unmasked) sum, its weight, and facts about
    who contributed. Plain and secure rounds both end here."""

    total: np.ndarray                         # (n,) float64
    weight: float
    metrics: dict = field(default_factory=dict)


def local_dp_steps(messages) -> dict:
    """The clients' local DP-SGD step counts, passed on for their own accounting ({} when off)."""
    logs = [m.local_dp_steps for m in messages if m.local_dp_steps is not None]
    return {"local_dp_steps": [e for log in logs for e in log]} if logs else {}
