"""The central aggregator: combines update messages (never data) into a new global model.

`Aggregator.aggregate` is split in two stages so secure aggregation and differential privacy can
replace the first without touching the second:
  1. `combine(messages) -> (sum of weighted updates, total weight, metrics)`: here a plain sum;
     with secure aggregation it becomes "unmask the masked sum", with DP "+ noise".
  2. the algorithm's server rule on the weighted mean update.
A message that does not belong to this round, or carries non-finite numbers, aborts the round
with an error before anything changes: the caller keeps its previous global model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import ray
import torch

from sim.algorithms import build_algorithm
from sim.config import AlgorithmConfig

from actors.client_worker import UpdateMessage, peak_rss_mib


class AggregationError(RuntimeError):
    """The round cannot be aggregated; the global model must stay as it was."""


def weighted_sum(messages: Sequence[UpdateMessage], n_params: int) -> tuple[np.ndarray, float]:
    """Sum of the workers' weighted update sums, in message order (deterministic float adds)."""
    total = np.zeros(n_params, dtype=np.float64)
    weight = 0.0
    for m in messages:
        total += m.weighted_sum
        weight += m.weight
    return total, weight


class Aggregator:
    def __init__(self, algorithm: AlgorithmConfig | dict, n_params: int):
        cfg = algorithm if isinstance(algorithm, AlgorithmConfig) else AlgorithmConfig.model_validate(algorithm)
        self.algorithm = build_algorithm(cfg)
        self.n_params = n_params
        self.rounds_done = 0

    def check(self, rnd: int, messages: Sequence[UpdateMessage]) -> None:
        seen: set[int] = set()
        for m in messages:
            if m.round != rnd:
                raise AggregationError(f"round {rnd}: message from worker {m.worker} is for round {m.round}")
            if m.weighted_sum.shape != (self.n_params,):
                raise AggregationError(f"round {rnd}: worker {m.worker} sent {m.weighted_sum.shape[0]} "
                                       f"parameters, expected {self.n_params}")
            if not np.isfinite(m.weighted_sum).all() or not np.isfinite(m.weight):
                raise AggregationError(f"round {rnd}: worker {m.worker} sent non-finite values "
                                       "(diverging local training? lower algorithm.lr)")
            dup = seen.intersection(m.client_ids)
            if dup:
                raise AggregationError(f"round {rnd}: clients {sorted(dup)[:5]} reported twice")
            seen.update(m.client_ids)

    def combine(self, rnd: int, messages: Sequence[UpdateMessage]) -> tuple[np.ndarray, float, dict]:
        total, weight = weighted_sum(messages, self.n_params)
        return total, weight, {"clients": sum(m.num_clients for m in messages)}

    def aggregate(self, rnd: int, global_params: np.ndarray, *messages: UpdateMessage) -> tuple[np.ndarray, dict]:
        """New global parameters (n_params,) float32 and the round's server metrics."""
        self.check(rnd, messages)
        total, weight, metrics = self.combine(rnd, messages)
        metrics["train_loss"] = (sum(m.train_loss_sum for m in messages) / metrics["clients"]
                                 if metrics["clients"] else float("nan"))
        if weight <= 0:
            # every sampled client dropped out: the round completes and the model stays
            metrics.update(skipped=True, update_norm=0.0)
            return np.asarray(global_params, dtype=np.float32).copy(), metrics
        g = torch.tensor(global_params, dtype=torch.float32)
        mean = torch.as_tensor(total / weight, dtype=torch.float32)
        new, server_metrics = self.algorithm.server_update(g, mean)
        if not torch.isfinite(new).all():
            raise AggregationError(f"round {rnd}: the new global model has non-finite values")
        self.rounds_done += 1
        metrics.update(server_metrics, skipped=False)
        return new.numpy(), metrics

    def peak_rss_mib(self) -> float:
        return peak_rss_mib()


# Thin actor wrapper: the aggregator needs no CPU reservation of its own (it only adds vectors).
AggregatorActor = ray.remote(num_cpus=0)(Aggregator)
