"""What workers send the aggregator, and what the aggregator makes of it (pure, no Ray).

A worker sends ONE message per round (or per secure-sum session): sums over its clients, never
data. A plain update carries the float sum of weighted updates; a masked one carries the sum of
the clients' quantized, masked vectors mod 2^b, which means nothing until the secure-sum session
unmasks the total. Both reduce to a `SummedUpdates`, on which the server rule acts.

What the protocol does not release stays out of the messages: the clients' training losses, their
compute time and their local DP-SGD release counts are `Diagnostics`, which go from the worker to
the driver only (a simulation's view of its clients that a real deployment would not have).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np

LocalDPReleases = tuple[tuple[int, int, int], ...]  # (client id, noisy gradients released, n_train)

# The panel statistics the aggregator may release (each a noisy mean of per-individual values in
# [0, 1]): the evaluation accuracies Tune optimizes, and each individual's own membership-inference
# AUC of its personalized model, which the privacy weight's controller reads (sim/run/leakage.py).
METRIC_KEYS = {"accuracy": ("acc_global_DI", "acc_personalized_DI"), "leakage": ("mia_auc_DI",)}


@dataclass(frozen=True)
class PlainUpdate:
    """A worker's round without secure aggregation: sum_i w_i * (local_i - global) and sum_i w_i."""

    round_id: int
    worker: int
    weighted_sum: np.ndarray  # (n_params,) float32
    weight: float
    client_ids: tuple[int, ...]
    upload_bytes: int = 0  # what each client uploaded, when compressed (0: the update itself)
    rejected: int = 0  # of client_ids, those whose update the admission check refused

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)


@dataclass(frozen=True)
class MaskedUpdate:
    """A worker's share of a secure sum: the sum of its clients' masked inputs mod 2^b (pair masks
    between clients of this worker already cancelled). `round_id` is the session's protocol round."""

    round_id: int
    worker: int
    masked_sum: np.ndarray  # (dim,) uint64, each entry < 2^bits
    client_ids: tuple[int, ...]

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)


@dataclass(frozen=True)
class SummedUpdates:
    """A round's aggregate before the server rule: the (unmasked) sum, its weight, and facts about
    who contributed. Plain and secure rounds both end here."""

    total: np.ndarray  # (n,) float64
    weight: float
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Diagnostics:
    """A worker's round as only the simulation sees it (to the driver, never to the aggregator)."""

    worker: int
    clients: int
    train_loss_sum: float  # sum over clients of their mean local loss
    compute_s: float
    local_dp_releases: LocalDPReleases | None = None  # local DP-SGD: each client's own accounting
    pid: int = 0  # the worker's process: a new one means Ray restarted it
    late: int = 0  # clients that did not report: past the deadline or the quota
    sim_s: float = 0.0  # simulated seconds this worker's reporting clients took (system model)
    rejected: int = 0  # clients whose update failed the admission check (actors/screening.py)


def wire_bytes(message) -> int:
    """The size of a message as it travels: its pickle (protocol 5, what Ray serializes with),
    numpy buffers included. Communication accounting measures the messages actually built."""
    return len(pickle.dumps(message, protocol=5))


def one_client_update(m: PlainUpdate) -> PlainUpdate:
    """The message one client would send in place of a worker's sum: same vector shape and type,
    one client id (a worker sums many, a device sends its own)."""
    return PlainUpdate(m.round_id, m.worker, m.weighted_sum, 1.0, m.client_ids[:1])


def round_diagnostics(diags) -> dict:
    """The round's training loss and local DP-SGD releases from the workers' diagnostics."""
    clients = sum(d.clients for d in diags)
    out = {
        "train_loss": sum(d.train_loss_sum for d in diags) / clients if clients else float("nan"),
        "late_clients": sum(d.late for d in diags),
        "rejected_updates": sum(d.rejected for d in diags),
    }
    if any(d.sim_s for d in diags):  # a synchronous round lasts as long as its slowest reporting client
        out["sim_round_s"] = max(d.sim_s for d in diags)
    logs = [d.local_dp_releases for d in diags if d.local_dp_releases is not None]
    if logs:
        out["local_dp_releases"] = [e for log in logs for e in log]
    return out


class ProtocolStateLost(RuntimeError):
    """A worker was asked for a protocol step whose state it no longer holds (Ray restarted it
    mid-protocol): its clients are dropouts of that secure sum."""
