"""The central aggregator: combines update messages (never data) into a new global model.

Every round, plain or secure, goes through the same stages:
  1. a sum: `combine` adds the workers' plain messages; under secure aggregation a `SecureSum`
     session (actors/secagg/session.py) unmasks the total of their masked messages;
  2. the DP server half (`UserLevelDP.server_half`: central noise, fixed denominator);
  3. the algorithm's server rule on the mean update.
The same secure-sum session also releases Tune's metric (a sum of accuracies): only what happens
to the sum differs. A message that does not belong to this round, or carries non-finite numbers,
aborts the round with an error before anything changes: the caller keeps its previous global model.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import ray
import torch

from fedmeta.actors.client_worker import peak_rss_mib
from fedmeta.actors.messages import (
    METRIC_KEYS,
    MaskedUpdate,
    PlainUpdate,
    SummedUpdates,
    one_client_update,
    wire_bytes,
)
from fedmeta.actors.privacy import UserLevelDP
from fedmeta.actors.process import settle
from fedmeta.actors.secagg.protocol import (
    AdvertiseKeys,
    EncryptedShares,
    ProtocolViolation,
    SecAggAbort,
    UnmaskRequest,
    UnmaskShares,
)
from fedmeta.actors.secagg.session import SecAggParams, SecureSum
from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.artifacts.usercode import add_code_path
from fedmeta.sim.config import AlgorithmConfig
from fedmeta.sim.seeding import Secrets, np_rng


class AggregationError(RuntimeError):
    """The round cannot be aggregated; the global model must stay as it was."""


class SecAggRoundAborted(AggregationError):
    """Secure aggregation could not finish this round (too many dropouts for threshold t, or for
    the survivor floor the graph is sized for): the round releases nothing, the model stays, and
    the federation goes on with the next round."""


def weighted_sum(messages: Sequence[PlainUpdate], n_params: int) -> tuple[np.ndarray, float]:
    """Sum of the workers' weighted update sums, in message order (deterministic float adds)."""
    total = np.zeros(n_params, dtype=np.float64)
    weight = 0.0
    for m in messages:
        total += m.weighted_sum
        weight += m.weight
    return total, weight


class Aggregator:
    def __init__(
        self,
        algorithm: AlgorithmConfig | dict,
        n_params: int,
        dp: UserLevelDP | None = None,
        seed: int = 0,
        secure: bool = False,
        secrets: Secrets | None = None,
        code_path: Sequence[str] = (),
    ):
        add_code_path(code_path)  # a researcher's own algorithm brings its own server rule
        cfg = (
            algorithm if isinstance(algorithm, AlgorithmConfig) else AlgorithmConfig.model_validate(algorithm)
        )
        self.algorithm = build_algorithm(cfg)
        self.n_params = n_params
        self.dp = dp or UserLevelDP()
        self.seed = seed
        self.secrets = secrets or Secrets.fresh(seed)  # the server's own: central and metric noise
        self.secure = secure  # training rounds must arrive masked
        self._sessions: dict[int, SecureSum] = {}  # open secure sums by protocol round
        self.rounds_done = 0

    # ------------------------------------------------------------ plain rounds
    def check(
        self,
        round_id: int,
        messages: Sequence[PlainUpdate | MaskedUpdate],
        dim: int,
        versions: Sequence[int] | None = None,
    ) -> None:
        """`versions`: the round each message must be for (FedBuff: the step a client trained from)."""
        seen: set[int] = set()
        for i, m in enumerate(messages):
            expected = round_id if versions is None else versions[i]
            if m.round_id != expected:
                raise AggregationError(
                    f"round {round_id}: message from worker {m.worker} is for round {m.round_id}, "
                    f"expected {expected}"
                )
            if isinstance(m, MaskedUpdate):
                if m.masked_sum.shape != (dim,) or m.masked_sum.dtype != np.uint64:
                    raise AggregationError(f"round {round_id}: worker {m.worker} sent a malformed masked sum")
            elif self.secure:
                raise AggregationError(
                    f"round {round_id}: worker {m.worker} sent an unmasked update under secure aggregation"
                )
            elif m.weighted_sum.shape != (dim,):
                raise AggregationError(
                    f"round {round_id}: worker {m.worker} sent {m.weighted_sum.shape[0]} "
                    f"parameters, expected {dim}"
                )
            elif not np.isfinite(m.weighted_sum).all() or not np.isfinite(m.weight):
                raise AggregationError(
                    f"round {round_id}: worker {m.worker} sent non-finite values "
                    "(diverging local training? lower algorithm.lr)"
                )
            dup = seen.intersection(m.client_ids)
            if dup:
                raise AggregationError(f"round {round_id}: clients {sorted(dup)[:5]} reported twice")
            seen.update(m.client_ids)
        rejected = sum(getattr(m, "rejected", 0) for m in messages)
        if rejected and rejected == len(seen):
            # some rejections are a broken or hostile device; all of them is the run's own training
            raise AggregationError(
                f"round {round_id}: every client's update ({rejected}) was non-finite or oversized "
                "(diverging local training? lower algorithm.lr)"
            )

    def combine(self, round_id: int, messages: Sequence[PlainUpdate]) -> SummedUpdates:
        if any(isinstance(m, MaskedUpdate) for m in messages):
            raise AggregationError(f"round {round_id}: a masked sum outside a secure-aggregation session")
        total, weight = weighted_sum(messages, self.n_params)
        clients = sum(m.num_clients for m in messages)
        # every client uploads its own update: a one-client message of the shape the workers sent
        first = messages[0] if clients else None
        up = 0 if first is None else first.upload_bytes or wire_bytes(one_client_update(first))
        return SummedUpdates(
            total,
            weight,
            {
                "clients": clients,
                "bytes_up": clients * up,
                "bytes_up_per_client": up,
                "bytes_down": 0,
                "bytes_down_per_client": 0,
            },
        )

    def aggregate(
        self, round_id: int, global_params: np.ndarray, *messages: PlainUpdate
    ) -> tuple[np.ndarray, dict]:
        """A plain round: new global parameters (n_params,) float32 and the round's server metrics."""
        self.check(round_id, messages, self.n_params)
        return self.apply_sum(round_id, global_params, self.combine(round_id, messages))

    def aggregate_buffered(
        self,
        round_id: int,
        global_params: np.ndarray,
        versions: Sequence[int],
        weights: Sequence[float],
        *messages: PlainUpdate,
    ) -> tuple[np.ndarray, dict]:
        """A FedBuff server step (sim/engine/fedbuff.py): message i trained from server step `versions[i]`
        and counts with its staleness weight `weights[i]` (<= 1, so a clipped update's
        sensitivity stays C); the mean divides by the unweighted total weight, so staleness
        shrinks stale updates rather than being normalized away."""
        self.check(round_id, messages, self.n_params, versions)
        summed = self.combine(round_id, messages)
        total = sum(
            (float(w) * m.weighted_sum.astype(np.float64) for m, w in zip(messages, weights)),
            np.zeros(self.n_params),
        )
        return self.apply_sum(round_id, global_params, SummedUpdates(total, summed.weight, summed.metrics))

    def apply_sum(
        self, round_id: int, global_params: np.ndarray, summed: SummedUpdates
    ) -> tuple[np.ndarray, dict]:
        """DP server half, then the server rule; the round's sum may come plain or unmasked."""
        metrics = dict(summed.metrics)
        if "bytes_down" in metrics:  # and every reporting client downloaded the global model
            model = wire_bytes(np.asarray(global_params, dtype=np.float32))
            metrics["bytes_down"] += metrics["clients"] * model
            metrics["bytes_down_per_client"] += model if metrics["clients"] else 0
        if summed.weight <= 0 and not self.dp.noise_without_clients:
            # every sampled client dropped out: the round completes and the model stays
            metrics.update(skipped=True, update_norm=0.0)
            return np.asarray(global_params, dtype=np.float32).copy(), metrics
        g = torch.tensor(global_params, dtype=torch.float32)
        mean, dp_metrics = self.dp.server_half(
            torch.tensor(summed.total, dtype=torch.float32),
            summed.weight,
            self.secrets.noise("dp-noise", round_id),
        )
        metrics.update(dp_metrics)
        new, server_metrics = self.algorithm.server_update(g, mean)
        if not torch.isfinite(new).all():
            raise AggregationError(f"round {round_id}: the new global model has non-finite values")
        self.rounds_done += 1
        metrics.update(server_metrics, skipped=False)
        return new.numpy(), metrics

    # ------------------------------------------------------------ secure sums (training and metric rounds)
    def secure_open(
        self,
        protocol_id: int,
        clients: list[int],
        params: SecAggParams,
        dim: int,
        graph_stream: str = "secagg-server",
    ) -> list[int]:
        """Before phase 0: a session for this protocol round and the ring placement of its mask graph
        (the simulator hosts ring neighbours on one worker, where their pair masks cancel). The
        graph is drawn from (seed, `graph_stream`, protocol round)."""
        try:
            self._sessions[protocol_id] = SecureSum(
                protocol_id, clients, params, dim, np_rng(self.seed, graph_stream, protocol_id)
            )
        except ValueError as e:  # e.g. too few consenting clients for the threshold this round
            raise SecAggRoundAborted(f"round {protocol_id}: secure aggregation aborted: {e}") from None
        return self._step(protocol_id, lambda s: s.placement())

    def secure_keys(self, protocol_id: int, *adverts: list[AdvertiseKeys]) -> dict[int, dict]:
        return self._step(protocol_id, lambda s: s.keys([a for batch in adverts for a in batch]))

    def secure_route(self, protocol_id: int, *shares: list[EncryptedShares]) -> dict[int, dict[int, bytes]]:
        return self._step(protocol_id, lambda s: s.route([x for batch in shares for x in batch]))

    def secure_collect(self, protocol_id: int, *messages: MaskedUpdate) -> UnmaskRequest:
        if not all(isinstance(m, MaskedUpdate) for m in messages):
            raise AggregationError(
                f"round {protocol_id}: a worker sent an unmasked update under secure aggregation"
            )
        session = self._sessions.get(protocol_id)
        self.check(protocol_id, messages, session.server.vector_length if session else 0)
        return self._step(protocol_id, lambda s: s.collect(messages))

    def secure_unmask(self, protocol_id: int, *reveals: list[UnmaskShares]) -> SummedUpdates:
        summed = self._step(protocol_id, lambda s: s.unmask([u for batch in reveals for u in batch]))
        del self._sessions[protocol_id]
        return summed

    def _step(self, protocol_id: int, step: Callable[[SecureSum], object]):
        session = self._sessions.get(protocol_id)
        if session is None:
            raise SecAggRoundAborted(
                f"round {protocol_id}: no secure-aggregation session open for this round"
            )
        try:
            return step(session)
        except (SecAggAbort, ProtocolViolation) as e:
            del self._sessions[protocol_id]
            raise SecAggRoundAborted(f"round {protocol_id}: secure aggregation aborted: {e}") from None

    # ------------------------------------------------------------ Tune's metric
    def aggregate_metric(
        self,
        round_id: int,
        *parts: dict,
        noise: float | None = None,
        panel: int | None = None,
        noised: bool = False,
    ) -> dict:
        """Panel means from the workers' per-shard SUMS (no individual's value reaches the
        aggregator); with DP on, Gaussian noise of std z (or `noise`) on each sum (an individual's
        value lies in [0, 1]) and the planned `panel` size as divisor: the count of individuals who
        reported would tell whether one of them is there. The accuracies Tune trials optimize, or
        the leakage the privacy weight follows. `noised`: the sums already carry the panel's
        distributed noise shares (distributed DP): the aggregator adds none of its own."""
        count = sum(p["count"] for p in parts)
        private = self.dp.enabled and panel is not None
        out = {"count": panel if private else count}
        for key in (k for k in parts[0] if k != "count"):
            total = torch.tensor(float(sum(p[key] for p in parts)))
            if not noised:
                total = self.dp.noisy_sum(total, self.secrets.noise("metric", key, round_id), noise)
            out[key] = float(total) / max(out["count"], 1)
        return out

    def metric_from_sum(
        self,
        protocol_id: int,
        summed: SummedUpdates,
        stat: str = "accuracy",
        noise: float | None = None,
        panel: int | None = None,
    ) -> dict:
        """The metric from a secure sum of the panel's [values of METRIC_KEYS[stat]..., 1] vectors."""
        t, keys = summed.total, METRIC_KEYS[stat]
        return self.aggregate_metric(
            protocol_id,
            {**{k: t[i] for i, k in enumerate(keys)}, "count": int(round(t[len(keys)]))},
            noise=noise,
            panel=panel,
            noised=self.dp.mode == "distributed" and panel is not None,
        )

    # ------------------------------------------------------------ the server rule's state
    def server_state(self) -> dict:
        return self.algorithm.state_dict()

    def load_server_state(self, state: dict) -> None:
        self.algorithm.load_state_dict(state)

    def info(self) -> dict:
        return {"pid": os.getpid(), "rounds_done": self.rounds_done}

    def peak_rss_mib(self) -> float:
        return peak_rss_mib()


# Thin actor wrapper: the aggregator needs no CPU reservation of its own (it only adds vectors).
@ray.remote(num_cpus=0)
class AggregatorActor(Aggregator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settle()  # no full GC walks over start-up state (actors/process.py)
