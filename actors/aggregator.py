"""The central aggregator: combines update messages (never data) into a new global model.

`Aggregator.aggregate` is split in stages so secure aggregation and differential privacy plug in
without touching the server rule:
  1. `combine(messages) -> (sum of weighted updates, total weight, metrics)`: here a plain sum;
     with secure aggregation it becomes "unmask the masked sum";
  2. `privatize`: the DP server half (central Gaussian noise on the sum; identity when off);
  3. the algorithm's server rule on the mean update.
A message that does not belong to this round, or carries non-finite numbers, aborts the round
with an error before anything changes: the caller keeps its previous global model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import ray
import torch

from sim.algorithms import build_algorithm
from actors.privacy import central_noise
from actors.secagg.protocol import (AdvertiseKeys, EncryptedShares, ProtocolViolation, SecAggAbort, SecAggServer,
                                    UnmaskRequest, UnmaskShares)
from actors.secagg.quantize import dequantize
from actors.secagg.session import SecAggParams
from sim.config import AlgorithmConfig, PrivacyConfig
from sim.seeding import np_rng, torch_gen

from actors.client_worker import UpdateMessage, peak_rss_mib


class AggregationError(RuntimeError):
    """The round cannot be aggregated; the global model must stay as it was."""


class SecAggRoundAborted(AggregationError):
    """Secure aggregation could not finish this round (too many dropouts for threshold t): the
    round releases nothing, the model stays, and the federation goes on with the next round."""


def weighted_sum(messages: Sequence[UpdateMessage], n_params: int) -> tuple[np.ndarray, float]:
    """Sum of the workers' weighted update sums, in message order (deterministic float adds)."""
    total = np.zeros(n_params, dtype=np.float64)
    weight = 0.0
    for m in messages:
        total += m.weighted_sum
        weight += m.weight
    return total, weight


def local_dp_steps(messages: Sequence[UpdateMessage]) -> dict:
    """The clients' local DP-SGD step counts, passed on for their own accounting ({} when off)."""
    logs = [m.local_dp_steps for m in messages if m.local_dp_steps is not None]
    return {"local_dp_steps": [e for log in logs for e in log]} if logs else {}


class Aggregator:
    def __init__(self, algorithm: AlgorithmConfig | dict, n_params: int, privacy: PrivacyConfig | dict | None = None,
                 noise_multiplier: float = 0.0, expected_clients: int = 1, seed: int = 0,
                 secagg: SecAggParams | None = None):
        cfg = algorithm if isinstance(algorithm, AlgorithmConfig) else AlgorithmConfig.model_validate(algorithm)
        self.algorithm = build_algorithm(cfg)
        self.n_params = n_params
        self.privacy = (privacy if isinstance(privacy, PrivacyConfig) else PrivacyConfig.model_validate(privacy or {}))
        self.noise_multiplier = noise_multiplier    # resolved z (from the config or a target epsilon)
        self.expected_clients = expected_clients    # DP-FedAvg's fixed denominator: the cohort size
        self.seed = seed
        self.secagg = secagg                        # None: plain sums of updates
        self._server: SecAggServer | None = None    # this round's secure-aggregation server state
        self._pending: dict = {}                    # metadata of the masked messages of this round
        self.rounds_done = 0

    def check(self, rnd: int, messages: Sequence[UpdateMessage]) -> None:
        seen: set[int] = set()
        for m in messages:
            if m.round != rnd:
                raise AggregationError(f"round {rnd}: message from worker {m.worker} is for round {m.round}")
            if m.masked_sum is not None:
                if self.secagg is None:
                    raise AggregationError(f"round {rnd}: worker {m.worker} sent a masked sum, secure aggregation is off")
                if m.masked_sum.shape != (self.n_params,) or m.masked_sum.dtype != np.uint64:
                    raise AggregationError(f"round {rnd}: worker {m.worker} sent a malformed masked sum")
            elif self.secagg is not None:
                raise AggregationError(f"round {rnd}: worker {m.worker} sent an unmasked update under secure aggregation")
            elif m.weighted_sum.shape != (self.n_params,):
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
        return total, weight, {"clients": sum(m.num_clients for m in messages), **local_dp_steps(messages)}

    def privatize(self, rnd: int, total: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """DP server half: central Gaussian noise z*C on the sum of clipped updates. Identity when
        off, and in the distributed mode, where the clients' noise shares are already in the sum."""
        if self.privacy.mode != "central":
            return total, {}
        gen = torch_gen(self.seed, "dp-noise", rnd)
        return central_noise(total, self.privacy.clip_norm, self.noise_multiplier, gen)

    def aggregate(self, rnd: int, global_params: np.ndarray, *messages: UpdateMessage) -> tuple[np.ndarray, dict]:
        """New global parameters (n_params,) float32 and the round's server metrics."""
        self.check(rnd, messages)
        total, weight, metrics = self.combine(rnd, messages)
        metrics["train_loss"] = (sum(m.train_loss_sum for m in messages) / metrics["clients"]
                                 if metrics["clients"] else float("nan"))
        return self._finish(rnd, global_params, total, weight, metrics)

    # ------------------------------------------------------------ secure aggregation (server side)
    def secagg_plan(self, rnd: int, clients: list[int]) -> list[int]:
        """Before phase 0: the round's server and the ring placement of its neighbour graph (the
        simulator hosts ring neighbours on one worker, where their pair masks cancel)."""
        p = self.secagg
        try:
            self._server = SecAggServer(rnd, clients, p.neighbors, p.threshold, p.bits, self.n_params,
                                        np_rng(self.seed, "secagg-server", rnd))
        except ValueError as e:   # e.g. too few consenting clients for the threshold this round
            self._server = None
            raise SecAggRoundAborted(f"round {rnd}: secure aggregation aborted: {e}") from None
        return self._server.placement()

    def secagg_begin(self, rnd: int, *adverts: list[AdvertiseKeys]) -> dict[int, dict]:
        """Phase 0: public keys in, the mask graph built; returns each client's neighbours' keys."""
        if self._server is None or self._server.round_id != rnd:
            raise SecAggRoundAborted(f"round {rnd}: secagg_begin without secagg_plan for this round")
        return self._secure(rnd, lambda: self._server.receive_keys([a for batch in adverts for a in batch]))

    def secagg_route(self, rnd: int, *shares: list[EncryptedShares]) -> dict[int, dict[int, bytes]]:
        """Phase 1: route the encrypted shares (the server cannot read them)."""
        return self._secure(rnd, lambda: self._server.route_shares([s for batch in shares for s in batch]))

    def secagg_collect(self, rnd: int, *messages: UpdateMessage) -> UnmaskRequest:
        """Phase 2: add the workers' masked sums; name the survivors and the dropped."""
        self.check(rnd, messages)
        for m in messages:
            self._secure(rnd, lambda m=m: self._server.receive_masked_sum(m.client_ids, m.masked_sum))
        self._pending = {"clients": sum(m.num_clients for m in messages), **local_dp_steps(messages),
                         "train_loss_sum": sum(m.train_loss_sum for m in messages)}
        return self._secure(rnd, self._server.close_masked)

    def aggregate_secure(self, rnd: int, global_params: np.ndarray, *unmask: list[UnmaskShares]) -> tuple[np.ndarray, dict]:
        """Phase 3: unmask the sum from the revealed shares, decode it, then DP and the server rule."""
        q_sum = self._secure(rnd, lambda: self._server.unmask([u for batch in unmask for u in batch]))
        server, self._server = self._server, None
        total = dequantize(q_sum, self.secagg.step, self.secagg.bits)             # (n_params,) float64
        clients = self._pending["clients"]
        metrics = {"clients": clients, "train_loss": self._pending["train_loss_sum"] / max(clients, 1),
                   **{k: v for k, v in self._pending.items() if k == "local_dp_steps"},
                   "secagg_survivors": len(server.survivors), "secagg_dropped": len(server.dropped)}
        return self._finish(rnd, global_params, total, float(len(server.survivors)), metrics)

    # ------------------------------------------------------------ secure metric (Tune's objective)
    def metric_plan(self, rnd: int, clients: list[int], params) -> list[int]:
        """A secure sum of the evaluated individuals' [acc global, acc personalized, 1] vectors, on
        its own protocol round `rnd` (distinct from the training rounds' ids)."""
        self._metric_params = params
        try:
            self._server = SecAggServer(rnd, clients, params.neighbors, params.threshold, params.bits, 3,
                                        np_rng(self.seed, "secagg-metric-server", rnd))
        except ValueError as e:
            self._server = None
            raise SecAggRoundAborted(f"metric round {rnd}: secure aggregation aborted: {e}") from None
        return self._server.placement()

    def metric_collect(self, rnd: int, *masked: tuple[list[int], np.ndarray]) -> UnmaskRequest:
        for ids, y in masked:
            self._secure(rnd, lambda ids=ids, y=y: self._server.receive_masked_sum(ids, y))
        return self._secure(rnd, self._server.close_masked)

    def metric_finish(self, rnd: int, *unmask: list[UnmaskShares]) -> dict:
        q_sum = self._secure(rnd, lambda: self._server.unmask([u for batch in unmask for u in batch]))
        self._server = None
        total = dequantize(q_sum, self._metric_params.step, self._metric_params.bits)    # (3,)
        return self.aggregate_metric(rnd, {"acc_global_DI": total[0], "acc_personalized_DI": total[1],
                                           "count": int(round(total[2]))})

    def _secure(self, rnd: int, step):
        try:
            return step()
        except (SecAggAbort, ProtocolViolation) as e:
            self._server = None
            raise SecAggRoundAborted(f"round {rnd}: secure aggregation aborted: {e}") from None

    def _finish(self, rnd: int, global_params: np.ndarray, total: np.ndarray, weight: float,
                metrics: dict) -> tuple[np.ndarray, dict]:
        if weight <= 0:
            # every sampled client dropped out: the round completes and the model stays
            metrics.update(skipped=True, update_norm=0.0)
            return np.asarray(global_params, dtype=np.float32).copy(), metrics
        g = torch.tensor(global_params, dtype=torch.float32)
        total_t, dp_metrics = self.privatize(rnd, torch.as_tensor(total, dtype=torch.float32))
        metrics.update(dp_metrics)
        # DP divides by the planned cohort size, not the (data-dependent) number that reported
        denom = self.expected_clients if self.privacy.mode != "off" else weight
        mean = total_t / denom
        new, server_metrics = self.algorithm.server_update(g, mean)
        if not torch.isfinite(new).all():
            raise AggregationError(f"round {rnd}: the new global model has non-finite values")
        self.rounds_done += 1
        metrics.update(server_metrics, skipped=False)
        return new.numpy(), metrics

    def aggregate_metric(self, rnd: int, *parts: dict) -> dict:
        """Mean evaluation accuracy from the workers' per-shard SUMS (no individual's value reaches
        the aggregator); with DP on, Gaussian noise of std z on each sum (an individual's accuracy
        lies in [0, 1]). What Tune trials optimize."""
        count = sum(p["count"] for p in parts)
        out = {"count": count}
        for key in ("acc_global_DI", "acc_personalized_DI"):
            total = torch.tensor(float(sum(p[key] for p in parts)))
            if self.privacy.mode != "off":
                total = total + self.noise_multiplier * torch.randn((), generator=torch_gen(self.seed, "metric", key, rnd))
            out[key] = float(total) / max(count, 1)
        return out

    def peak_rss_mib(self) -> float:
        return peak_rss_mib()


# Thin actor wrapper: the aggregator needs no CPU reservation of its own (it only adds vectors).
AggregatorActor = ray.remote(num_cpus=0)(Aggregator)
