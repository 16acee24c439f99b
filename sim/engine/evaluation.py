"""Evaluating a federation's global model on the fixed panel of individuals (global and
personalized accuracy, the membership-inference audit), and the private metric Tune reads: the
panel's statistic released through a secure sum under distributed DP or noised centrally.
"""

from __future__ import annotations

import numpy as np
import ray

from fedmeta.actors.messages import METRIC_KEYS
from fedmeta.actors.privacy import mia_auc
from fedmeta.actors.worker_eval import LOSS_KEYS
from fedmeta.sim.engine.faults import lost_actor
from fedmeta.sim.sampling import split_even

METRIC_ROUND_BASE = 1_000_000  # protocol round ids of secure metric rounds: never a training round's
METRIC_BASES = {"accuracy": METRIC_ROUND_BASE, "leakage": 2 * METRIC_ROUND_BASE}  # nor each other's


class PanelEvaluation:
    """Mixed into Federation (federation.py): evaluation on the panel, and the private metric."""

    # ------------------------------------------------------------ evaluation
    def evaluate(
        self, rounds_done: int, global_params: np.ndarray, export: bool = False, weight: float | None = None
    ) -> dict:
        """The evaluation panel and D_G; `weight`: the personalization's privacy weight (default:
        the algorithm's own)."""
        g_ref = ray.put(global_params)
        n = len(self.workers)
        shards, dg_parts = split_even(self.panel(), n), list(range(n))

        def individuals(w, shard):
            return w.evaluate.remote(g_ref, shard, rounds_done, export, weight=weight)

        def general(w, part):
            return w.evaluate_global.remote(g_ref, part, n)

        # both kinds of call are queued on every worker before any is waited for
        started = (
            [individuals(w, s) for w, s in zip(self.workers, shards)],
            [general(w, p) for w, p in zip(self.workers, dg_parts)],
        )
        parts = ray.get(self._on_workers(rounds_done, shards, individuals, started[0]))
        hits = np.concatenate(ray.get(self._on_workers(rounds_done, dg_parts, general, started[1])))
        # D_G is laid out one block per individual: accuracy per D_G individual (the fairness view)
        blocks = np.split(hits, np.cumsum(self.plan.global_sizes)[:-1])
        out = {
            "acc_DG": np.array([b.mean() if len(b) else np.nan for b in blocks]),
            "client_ids": [c for p in parts for c in p["client_ids"]],
        }
        for key in (
            "acc_global_DI",
            "acc_personalized_DI",
            *LOSS_KEYS,
            *(["personalized"] if export else []),
        ):
            out[key] = (
                np.concatenate([p[key] for p in parts]) if parts else np.zeros(0)
            )  # none: nobody consents
        if self.cfg.privacy.mia_audit and parts:
            # members: the individuals' train splits (seen in training / fine-tuning); non-members: test splits
            out["mia_auc_global"] = mia_auc(out["loss_global_train"], out["loss_global_test"])
            out["mia_auc_personalized"] = mia_auc(
                out["loss_personalized_train"], out["loss_personalized_test"]
            )
            out["mia_auc_DI"] = np.concatenate([p["mia_auc_DI"] for p in parts])
        return out

    def private_metric(
        self,
        rounds_done: int,
        global_params: np.ndarray,
        stat: str = "accuracy",
        weight: float | None = None,
        noise: float | None = None,
    ) -> dict:
        """A panel mean the aggregator releases from per-worker sums (with DP noise when DP is on;
        under secure aggregation the sums are masked per individual and it sees only their total):
        `stat` "accuracy", acc(D_I) of the global and personalized models; "leakage", the mean of
        each individual's own membership-inference AUC of its personalized model (`weight`: the
        personalization's privacy weight). `noise`: the release's noise multiplier (default z)."""
        g_ref = ray.put(global_params)
        self.faults.begin_round()
        while True:
            try:
                return self._private_metric(rounds_done, g_ref, stat, weight, noise)
            except Exception as e:
                if not lost_actor(e):
                    raise
                self._heal(rounds_done, e)  # the aggregator was lost: heal and ask again

    def _private_metric(
        self, rounds_done: int, g_ref, stat: str, weight: float | None, noise: float | None
    ) -> dict:
        ids = self.panel()
        shards, panel = split_even(ids, len(self.workers)), len(ids)
        if not panel:  # nobody (still) consents: an empty sum, under DP its noise alone
            empty = {**{k: 0.0 for k in METRIC_KEYS[stat]}, "count": 0}
            return ray.get(self.aggregator.aggregate_metric.remote(rounds_done, empty, noise=noise, panel=0))
        if self.plan.secagg is None:
            parts = self._on_workers(
                rounds_done, shards, lambda w, s: w.evaluate_sums.remote(g_ref, s, rounds_done, stat, weight)
            )
            return ray.get(
                self.aggregator.aggregate_metric.remote(rounds_done, *parts, noise=noise, panel=panel)
            )
        pid = METRIC_BASES[stat] + rounds_done

        def panel_values(worker, shard, inbox):
            # distributed DP: the panel's clients add the release's noise shares themselves
            return worker.secure_metric.remote(
                pid,
                g_ref,
                shard,
                inbox,
                rounds_done,
                stat,
                weight,
                noise,
                panel if self.plan.dp.enabled else None,
            )

        metric, _ = self._secure_sum(
            rounds_done,
            pid,
            ids.tolist(),
            self.plan.metric_secagg(),
            len(METRIC_KEYS[stat]) + 1,
            "secagg-metric-server",
            panel_values,
            lambda summed: self.aggregator.metric_from_sum.remote(pid, summed, stat, noise, panel),
        )
        return metric
