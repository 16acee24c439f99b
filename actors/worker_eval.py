"""A worker's evaluation of the global model on the panel individuals it hosts: accuracy and loss
of the global and personalized models on each individual's D_G and D_I splits (the paper's
metrics), the per-individual membership-inference inputs, and the sums the aggregator combines."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fedmeta.actors.messages import (
    METRIC_KEYS,
)
from fedmeta.actors.privacy import individual_mia_auc
from fedmeta.sim.algorithms import Algorithm
from fedmeta.sim.algorithms.local import (
    accuracies_stacked,
    predictions_hit,
    sample_losses,
)
from fedmeta.sim.seeding import np_rng

LOSS_KEYS = ("loss_global_train", "loss_global_test", "loss_personalized_train", "loss_personalized_test")


class WorkerEvaluation:
    """Mixed into ClientWorker (client_worker.py)."""

    def _panel_values(
        self,
        global_params: np.ndarray,
        cids: Sequence[int],
        rounds_done: int,
        stat: str,
        weight: float | None,
    ) -> dict:
        if stat not in METRIC_KEYS:
            raise ValueError(f"stat: one of {sorted(METRIC_KEYS)}, got {stat!r}")
        return self.evaluate(
            global_params, cids, rounds_done, audit=False, weight=weight, leakage=stat == "leakage"
        )

    # ------------------------------------------------------------ evaluation
    def evaluate(
        self,
        global_params: np.ndarray,
        cids: Sequence[int],
        rounds_done: int = 0,
        export: bool = False,
        audit: bool = True,
        weight: float | None = None,
        leakage: bool = False,
    ) -> dict:
        """acc(D_I) of the global model and of each individual's personalized model (the global
        model after `eval.finetune_steps` steps of the algorithm's personalization rule on the
        individual's train split: plain SGD fine-tuning, Ditto's proximal SGD). With the
        MIA audit on, also per-sample losses of both models on the individuals' train splits
        (members) and test splits (non-members). `export`: also the personalized parameters
        (clients, n_params), which each individual would keep (or, with consent, hand to serving).
        `weight`: the personalization's privacy weight (default: the algorithm's own). With the
        audit or `leakage`, also each individual's own AUC of its personalized model, `mia_auc_DI`."""
        g = self._global(global_params)
        finetuner = self.finetuner if weight is None else self.algorithm.personalizer(self.cfg.eval, weight)
        audit = audit and self.cfg.privacy.mia_audit
        out: dict[str, list] = {k: [] for k in ("acc_global_DI", "acc_personalized_DI", *LOSS_KEYS)}
        own_auc: list[np.ndarray] = []
        exported: list[torch.Tensor] = []
        ids: list[int] = []
        vectorized = self.compute == "vmap"
        for chunk in self._chunks(list(cids)):
            clients = self._clients(chunk, rounds_done - 1)  # the data of the last trained round
            xs_tr, ys_tr = [c.x_train for c in clients], [c.y_train for c in clients]
            xs_te, ys_te = [c.x_test for c in clients], [c.y_test for c in clients]
            glob = g.expand(len(chunk), -1)  # (clients, n_params)
            pers = self._personalized(finetuner, g, glob, chunk, xs_tr, ys_tr, rounds_done)
            if export:
                exported.append(pers.cpu())
            out["acc_global_DI"].append(accuracies_stacked(self.model, glob, xs_te, ys_te, vectorized))
            out["acc_personalized_DI"].append(accuracies_stacked(self.model, pers, xs_te, ys_te, vectorized))
            if audit or leakage:
                members = sample_losses(self.model, pers, xs_tr, ys_tr)
                others = sample_losses(self.model, pers, xs_te, ys_te)
                own_auc.append(individual_mia_auc(members, others))
            if audit:
                out["loss_personalized_train"] += members
                out["loss_personalized_test"] += others
                out["loss_global_train"] += sample_losses(self.model, glob, xs_tr, ys_tr)
                out["loss_global_test"] += sample_losses(self.model, glob, xs_te, ys_te)
            ids += [int(c) for c in chunk]
        return self._evaluation(out, ids, own_auc, exported, audit or leakage, export)

    def _personalized(
        self,
        finetuner: Algorithm,
        g: torch.Tensor,
        glob: torch.Tensor,
        chunk: Sequence[int],
        xs_tr: list,
        ys_tr: list,
        rounds_done: int,
    ) -> torch.Tensor:
        """Each individual's personalized model (clients, n_params): the global model `glob` after
        `eval.finetune_steps` steps of `finetuner` on its train split (none: the global model)."""
        pers = glob
        if self.cfg.eval.finetune_steps > 0:
            gens = [np_rng(self.cfg.seed, "finetune-batches", rounds_done, c) for c in chunk]
            upd, _ = finetuner.client_update(self.model, g, xs_tr, ys_tr, gens, self.compute)
            pers = g + upd
        return pers

    def _evaluation(
        self,
        out: dict[str, list],
        ids: list[int],
        own_auc: list[np.ndarray],
        exported: list[torch.Tensor],
        mia: bool,
        export: bool,
    ) -> dict:
        """`evaluate`'s result from the chunks' metrics: arrays over the individuals, in order."""
        res = {k: torch.cat(v).numpy() if v else np.zeros(0, np.float32) for k, v in out.items()}
        res["client_ids"] = ids
        if mia:
            res["mia_auc_DI"] = np.concatenate(own_auc) if own_auc else np.zeros(0)
        if export:
            res["personalized"] = (
                torch.cat(exported).numpy() if exported else np.zeros((0, self.n_params), np.float32)
            )
        return res

    def evaluate_sums(
        self,
        global_params: np.ndarray,
        cids: Sequence[int],
        rounds_done: int = 0,
        stat: str = "accuracy",
        weight: float | None = None,
    ) -> dict:
        """Only the shard's sums of METRIC_KEYS[stat] (for a private panel metric: Tune's
        accuracies, or the leakage the privacy weight's controller reads), over the individuals
        that have a value for all of them, and their count."""
        keys = METRIC_KEYS[stat]
        res = self._panel_values(global_params, cids, rounds_done, stat, weight)
        ok = np.logical_and.reduce([np.isfinite(res[k]) for k in keys])
        return {**{k: float(res[k][ok].sum()) for k in keys}, "count": int(ok.sum())}

    def evaluate_global(self, global_params: np.ndarray, shard: int = 0, num_shards: int = 1) -> np.ndarray:
        """Per-sample hits (bool) of the global model on shard `shard` of D_G (workers split D_G)."""
        x, y = self.data.global_data()
        n = len(y)
        lo, hi = n * shard // num_shards, n * (shard + 1) // num_shards
        return predictions_hit(self.model, self._global(global_params), x[lo:hi], y[lo:hi]).numpy()
