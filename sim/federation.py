"""The federation: a pool of ClientWorker actors and an Aggregator actor, started from a plan;
one round at a time.

One round: sample a cohort (seeded by (seed, round)), keep the consenting clients, drop some
(simulated dropout), split the survivors evenly over the workers, put the global model in the
object store once, and let every worker train its shard; the workers' messages go straight to
the aggregator, which returns the new global model. The driver only ever holds the global model
and metrics. Under secure aggregation the same round runs as a secure sum, and so does Tune's
metric: one flow (`_secure_sum`) for both.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from ray.exceptions import RayTaskError

from actors.aggregator import AggregatorActor, SecAggRoundAborted
from actors.client_worker import LOSS_KEYS, ClientWorkerActor, peak_rss_mib
from actors.messages import round_diagnostics
from actors.privacy import mia_auc
from actors.secagg.session import SecAggParams
from sim.cluster import worker_resources
from sim.config import ExperimentConfig
from sim.consent import ConsentGate
from sim.plan import FederationPlan
from sim.sampling import apply_dropout, draw_cohort, split_even
from sim.seeding import Secrets
from sim.userimport import code_paths

METRIC_ROUND_BASE = 1_000_000      # protocol round ids of secure metric rounds: never a training round's


@dataclass
class RoundResult:
    global_params: np.ndarray
    clients: int
    dropped: int
    seconds: float
    metrics: dict
    trained: list[int] = field(default_factory=list)   # the clients whose updates went in


class Federation:
    """The actor pool of one plan."""

    def __init__(self, plan: FederationPlan, run_dir: Path | None = None, secrets: Secrets | None = None):
        """`secrets`: the run's secret randomness (a fresh run secret unless `run.seeded_secrets`);
        the workers get it, the aggregator only its own derived part."""
        self.plan = plan
        self.workers, self.aggregator, self._server_state = [], None, {}
        seed = plan.cfg.seed
        self.secrets = secrets or (Secrets.seeded(seed) if plan.cfg.run.seeded_secrets else Secrets.fresh(seed))
        self._spawn()
        self.consent = ConsentGate(plan.cfg, plan.num_clients, run_dir) if plan.cfg.profiles.enabled else None

    @property
    def cfg(self) -> ExperimentConfig:
        return self.plan.cfg

    def _spawn(self) -> None:
        cfg, plan = self.plan.cfg, self.plan
        cpus, gpus = worker_resources(cfg)
        raw, threads = cfg.model_dump(mode="json"), max(1, int(cpus))
        code = code_paths(cfg)  # where a user's own model/algorithm modules live, as the driver imports them
        self.workers = [ClientWorkerActor.options(num_cpus=cpus, num_gpus=gpus).remote(raw, i, threads, plan.dp,
                                                                                      self.secrets, code)
                        for i in range(cfg.ray.num_workers)]
        self.aggregator = AggregatorActor.remote(cfg.algorithm.model_dump(), plan.n_params, plan.dp, cfg.seed,
                                                 plan.secagg is not None, self.secrets.derive("aggregator"), code)
        self.infos = ray.get([w.info.remote() for w in self.workers])  # fail fast if an actor cannot start

    def release(self) -> None:
        """Stop the workers and the aggregator (their CPUs go back to the cluster, e.g. to Tune trials);
        the server rule's state is kept for `restart`."""
        if self.aggregator is not None:
            self._server_state = self.server_state()
        self._kill()

    def _kill(self) -> None:
        for a in (*self.workers, *([self.aggregator] if self.aggregator is not None else [])):
            ray.kill(a)
        self.workers, self.aggregator = [], None

    def restart(self, cfg: ExperimentConfig) -> None:
        """Continue under new hyperparameters (after tuning): fresh workers and aggregator with
        `cfg`; the data, the consent store and the privacy budget of the run stay."""
        plan = self.plan.with_config(cfg)     # a bad config fails here, before anything is stopped
        self.release()
        self.plan = plan
        self._spawn()
        self.load_server_state(self._server_state)   # e.g. an adaptive server optimizer's moments

    def server_state(self) -> dict:
        """The server rule's state (an adaptive optimizer's moments; {} for FedAvg and the like)."""
        return ray.get(self.aggregator.server_state.remote())

    def load_server_state(self, state: dict) -> None:
        ray.get(self.aggregator.load_server_state.remote(state))

    def revoke(self, cid: int, purpose: str | None = None) -> None:
        """User `cid` withdraws consent (None: all purposes); they are out of the next round."""
        self.consent.revoke(cid, purpose)

    # ------------------------------------------------------------ training
    def train_round(self, round_index: int, global_params: np.ndarray) -> RoundResult:
        t0 = time.perf_counter()
        sampled = draw_cohort(self.cfg.seed, round_index, self.plan.sampling)
        admitted = self.consent.admit(sampled) if self.consent else sampled
        cohort = admitted[~np.isin(admitted, self.plan.excluded_canaries)]   # 'out' canaries never train
        alive, dropped = apply_dropout(self.cfg.seed, round_index, cohort, self.cfg.federation.dropout)
        g_ref = ray.put(global_params)
        if self.plan.secagg is None:
            trained = [w.train.options(num_returns=2).remote(round_index, g_ref, shard)
                       for w, shard in zip(self.workers, split_even(alive, len(self.workers)))]
            new, metrics = ray.get(self.aggregator.aggregate.remote(round_index, g_ref, *[m for m, _ in trained]))
            metrics.update(round_diagnostics(ray.get([d for _, d in trained])))
        else:
            new, metrics = self._secure_round(round_index, g_ref, cohort, alive, global_params)
        metrics["not_consenting"] = len(sampled) - len(admitted)
        return RoundResult(new, len(alive), len(dropped), time.perf_counter() - t0, metrics, alive.tolist())

    def _secure_round(self, round_index: int, g_ref, cohort: np.ndarray, alive: np.ndarray,
                      global_params: np.ndarray) -> tuple[np.ndarray, dict]:
        """The whole cohort takes part in key set-up; the clients that drop out do so after sharing
        their keys, before sending a masked input, so the server must recover their pairwise masks
        (the hard case). Too many dropouts for the threshold abort the round: nothing is
        released and the model stays."""
        live = set(alive.tolist())
        diagnostics = []     # to the driver only

        def train(worker, shard, inbox):   # a client trains on the worker that holds its protocol state
            msg, diag = worker.train.options(num_returns=2).remote(round_index, g_ref,
                                                                   [c for c in shard if c in live], inbox)
            diagnostics.append(diag)
            return msg

        try:
            summed = self._secure_sum(round_index, cohort.tolist(), self.plan.secagg, self.plan.n_params,
                                      "secagg-server", train)
            new, metrics = ray.get(self.aggregator.apply_sum.remote(round_index, g_ref, summed))
        except RayTaskError as e:
            cause = e.as_instanceof_cause()
            if not isinstance(cause, SecAggRoundAborted):
                raise
            return global_params, {"skipped": True, "aborted": str(cause.args[0] if cause.args else cause)}
        return new, {**metrics, **round_diagnostics(ray.get(diagnostics))}

    def _secure_sum(self, protocol_id: int, clients: list[int], params: SecAggParams, dim: int, graph_stream: str,
                    contribute: Callable) -> ray.ObjectRef:
        """One secure sum over `clients`, with Ray as the network between the clients (hosted by
        the workers) and the server (the aggregator); `contribute(worker, shard, inbox)` submits
        a worker's masked message. Returns a reference to the unmasked `SummedUpdates`.

        Clients are placed on workers in contiguous stretches of the server's Harary ring, so
        most neighbours share a worker, where their pair masks cancel in the worker's sum and
        are never expanded. Every phase is submitted at once, chained by object refs: no round
        trip through the driver between phases."""
        agg = self.aggregator
        ring = np.array(ray.get(agg.secure_open.remote(protocol_id, clients, params, dim, graph_stream)))
        shards = split_even(ring, len(self.workers))
        adverts = [w.secure_advertise.remote(protocol_id, shard, params) for w, shard in zip(self.workers, shards)]
        keys = agg.secure_keys.remote(protocol_id, *adverts)
        inbox = agg.secure_route.remote(protocol_id, *[w.secure_share.remote(protocol_id, keys) for w in self.workers])
        masked = [contribute(w, shard, inbox) for w, shard in zip(self.workers, shards)]
        request = agg.secure_collect.remote(protocol_id, *masked)
        return agg.secure_unmask.remote(protocol_id, *[w.secure_unmask.remote(protocol_id, request)
                                                       for w in self.workers])

    # ------------------------------------------------------------ evaluation
    def evaluate(self, rounds_done: int, global_params: np.ndarray, export: bool = False) -> dict:
        g_ref = ray.put(global_params)
        n = len(self.workers)
        ind = [w.evaluate.remote(g_ref, s, rounds_done, export)
               for w, s in zip(self.workers, split_even(self.plan.eval_ids, n))]
        hits = np.concatenate(ray.get([w.evaluate_global.remote(g_ref, i, n) for i, w in enumerate(self.workers)]))
        parts = ray.get(ind)
        # D_G is laid out one block per individual: accuracy per D_G individual (the fairness view)
        blocks = np.split(hits, np.cumsum(self.plan.global_sizes)[:-1])
        out = {"acc_DG": np.array([b.mean() if len(b) else np.nan for b in blocks]),
               "client_ids": [c for p in parts for c in p["client_ids"]]}
        for key in ("acc_global_DI", "acc_personalized_DI", *LOSS_KEYS, *(["personalized"] if export else [])):
            out[key] = np.concatenate([p[key] for p in parts])
        if self.cfg.privacy.mia_audit:
            # members: the individuals' train splits (seen in training / fine-tuning); non-members: test splits
            out["mia_auc_global"] = mia_auc(out["loss_global_train"], out["loss_global_test"])
            out["mia_auc_personalized"] = mia_auc(out["loss_personalized_train"], out["loss_personalized_test"])
        return out

    def private_metric(self, rounds_done: int, global_params: np.ndarray) -> dict:
        """acc(D_I) of the global and personalized models over the evaluation panel, aggregated by
        the aggregator from per-worker sums (with DP noise when DP is on); under secure
        aggregation the sums are masked per individual and the aggregator sees only their total."""
        g_ref = ray.put(global_params)
        shards = split_even(self.plan.eval_ids, len(self.workers))
        if self.plan.secagg is None:
            parts = [w.evaluate_sums.remote(g_ref, s, rounds_done) for w, s in zip(self.workers, shards)]
            return ray.get(self.aggregator.aggregate_metric.remote(rounds_done, *parts))
        pid = METRIC_ROUND_BASE + rounds_done

        def accuracies(worker, shard, inbox):
            return worker.secure_metric.remote(pid, g_ref, shard, inbox, rounds_done)

        summed = self._secure_sum(pid, self.plan.eval_ids.tolist(), self.plan.metric_secagg(), 3,
                                  "secagg-metric-server", accuracies)
        return ray.get(self.aggregator.metric_from_sum.remote(pid, summed))

    # ------------------------------------------------------------ lifecycle
    def peak_rss_mib(self) -> float:
        """Sum of the peak RSS of the driver and of every actor (workers and aggregator): an upper
        bound on the simulation's memory. Ray's own daemons (raylet, GCS) are not counted."""
        actors = ray.get([a.peak_rss_mib.remote() for a in (*self.workers, self.aggregator)])
        return peak_rss_mib() + sum(actors)

    def shutdown(self) -> None:
        if self.consent is not None:
            self.consent.close()
        self._kill()
