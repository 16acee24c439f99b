"""ClientWorker: trains and evaluates cohorts of virtual clients; the Ray actor is a thin wrapper.

One worker holds one model architecture, one dataset generator and one algorithm; per call it
regenerates its clients' data from (seed, client id), trains the whole cohort (vectorized with
torch.func or as a loop) and returns ONE message: the weighted sum of its clients' updates. Data
never leaves the worker; only sums of updates (local minus global parameters) do.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import ray
import torch

from actors.privacy import clip_updates, distributed_noise_share
from actors.secagg.protocol import AdvertiseKeys, EncryptedShares, SecAggClient, UnmaskRequest, UnmaskShares
from actors.secagg.quantize import add_mod, quantize
from actors.secagg.session import SecAggParams
from sim.algorithms import SGDClient, build_algorithm
from sim.algorithms.local import LocalDP, accuracies_stacked, predictions_hit, sample_losses
from sim.config import AlgorithmConfig, ExperimentConfig, from_dict
from sim.data import build_dataset
from sim.data.drift import DriftedDataset, data_for_round
from sim.models import build_model, num_params
from sim.seeding import np_rng

# Measured on the 2-core dev machine (README, `fedmeta bench`): vmap trains an MLP cohort several
# times faster than a loop, while for a CNN on CPU vmap becomes grouped convolutions and loses.
AUTO_PATH = {"mlp": "vmap", "cnn": "loop"}
# Per-sample losses an evaluation returns for the membership-inference audit.
LOSS_KEYS = ("loss_global_train", "loss_global_test", "loss_personalized_train", "loss_personalized_test")
# Bound on clients trained in lockstep: (clients x n_params) floats of parameters and grads.
VMAP_FLOATS = 1 << 25


@dataclass
class UpdateMessage:
    """What a worker sends the aggregator for one round: sums over its clients, never data."""

    round: int
    worker: int
    weighted_sum: np.ndarray        # (n_params,) float32: sum_i w_i * (local_i - global)
    weight: float                   # sum_i w_i
    num_clients: int
    client_ids: list[int]
    train_loss_sum: float           # sum over clients of their mean local loss
    compute_s: float
    masked_sum: np.ndarray | None = None  # secure aggregation: sum of the clients' masked inputs mod 2^b
    # local DP-SGD: (client id, local steps, n_train) per client, for each client's own accounting
    local_dp_steps: list[tuple[int, int, int]] | None = None


def resolve_path(path: str, model_kind: str, local_dp: bool = False) -> Literal["vmap", "loop"]:
    if local_dp:
        return "loop"   # per-sample gradients with per-client noise streams (config refuses vmap)
    return AUTO_PATH[model_kind] if path == "auto" else path  # type: ignore[return-value]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class ClientWorker:
    """Plain class (testable without Ray): the cohort engine of one worker."""

    def __init__(self, cfg: ExperimentConfig | dict, worker_id: int = 0, device: str | None = None):
        self.cfg = cfg if isinstance(cfg, ExperimentConfig) else from_dict(cfg)
        self.worker_id = worker_id
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.data = build_dataset(self.cfg.data, self.cfg.seed)
        # the same individuals after the drift, from data.drift.at_round on
        self.drifted = (DriftedDataset(self.cfg.data, self.cfg.seed, self.data)
                        if self.cfg.data.drift.at_round is not None else None)
        self.model = build_model(self.cfg.model, self.data.input_shape, self.data.num_classes).to(self.device)
        self.algorithm = build_algorithm(self.cfg.algorithm)
        self.path = resolve_path(self.cfg.ray.path, self.cfg.model.kind, self.cfg.privacy.local_dp)
        pc = self.cfg.privacy
        self.local_dp = LocalDP(pc.local_clip, pc.local_noise_multiplier) if pc.local_dp else None
        self.n_params = num_params(self.model)
        ev = self.cfg.eval
        self.finetuner = SGDClient(AlgorithmConfig(local_steps=max(ev.finetune_steps, 1), lr=ev.finetune_lr,
                                                   batch_size=ev.batch_size))
        self._secagg: dict[int, SecAggClient] = {}       # this round's clients' protocol state
        self._secagg_params: SecAggParams | None = None

    def info(self) -> dict:
        return {"worker": self.worker_id, "device": str(self.device), "path": self.path,
                "n_params": self.n_params, "num_threads": torch.get_num_threads()}

    def _chunks(self, cids: Sequence[int]) -> list[Sequence[int]]:
        size = len(cids) if self.path == "loop" else max(1, VMAP_FLOATS // (4 * self.n_params))
        return [cids[i:i + size] for i in range(0, len(cids), size)]

    def _global(self, global_params: np.ndarray) -> torch.Tensor:
        return torch.tensor(global_params, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------ training
    def train(self, rnd: int, global_params: np.ndarray, cids: Sequence[int],
              inbox: dict[int, dict] | None = None) -> UpdateMessage:
        """Run the algorithm's client rule for every client in `cids`; sum their weighted updates.
        With secure aggregation (`inbox`: the encrypted shares routed to each client) the
        clients' updates are clipped, quantized and masked, and only the masked sum leaves."""
        t0 = time.perf_counter()
        g = self._global(global_params)
        total = torch.zeros_like(g)
        masked = None if inbox is None else np.zeros(self.n_params, dtype=np.uint64)
        weight, loss_sum = 0.0, 0.0
        steps_log: list[tuple[int, int, int]] = []
        dp = self.cfg.privacy.mode != "off" or inbox is not None
        here = frozenset(int(c) for c in cids)   # clients summed in this message (their pair masks cancel)
        for chunk in self._chunks(list(cids)):
            clients = data_for_round(self.cfg.data, self.data, self.drifted, rnd).clients(chunk)
            xs = [c.x_train for c in clients]
            ys = [c.y_train for c in clients]
            gens = [np_rng(self.cfg.seed, "local-batches", rnd, c) for c in chunk]
            updates, met = self.algorithm.client_update(self.model, g, xs, ys, gens, self.path,
                                                        self.local_dp)  # (clients, n_params)
            if self.local_dp is not None:
                steps_log += [(int(c), int(t), len(y)) for c, t, y in zip(chunk, met["local_steps"], ys)]
            if dp:
                # DP client half, also what secure aggregation's fixed-point encoding needs: each user's
                # contribution bounded by C and weighted equally (a sample-count weight would change
                # the sensitivity the noise is calibrated to)
                updates, _ = clip_updates(updates, self.cfg.privacy.clip_norm)
                w = torch.ones(len(chunk), device=g.device)
            else:
                w = torch.tensor([self.algorithm.client_weight(len(y)) for y in ys], device=g.device)
            if masked is not None:
                masked = add_mod(masked, self._mask(rnd, chunk, updates, inbox, here), self._secagg_params.bits)
            else:
                total += w @ updates
            weight += float(w.sum())
            loss_sum += float(met["train_loss"].sum())
        plain = total.cpu().numpy() if masked is None else np.zeros(0, dtype=np.float32)
        return UpdateMessage(round=rnd, worker=self.worker_id, weighted_sum=plain, weight=weight,
                             num_clients=len(cids), client_ids=[int(c) for c in cids], train_loss_sum=loss_sum,
                             compute_s=time.perf_counter() - t0, masked_sum=masked,
                             local_dp_steps=steps_log if self.local_dp is not None else None)

    # ------------------------------------------------------------ secure aggregation (client side)
    def secagg_advertise(self, rnd: int, cids: Sequence[int], params: SecAggParams) -> list[AdvertiseKeys]:
        """Phase 0: every client of this shard makes its key pairs (its state lives here, as on its device)."""
        self._secagg_params = params
        self._secagg = {int(c): SecAggClient(int(c), rnd, params.bits, params.threshold,
                                             np_rng(self.cfg.seed, "secagg-client", rnd, int(c))) for c in cids}
        return [client.advertise() for client in self._secagg.values()]

    def secagg_share(self, rnd: int, neighbour_keys: dict[int, dict]) -> list[EncryptedShares]:
        """Phase 1: Shamir shares of each client's secrets, encrypted for its neighbours.
        `neighbour_keys` is the server's answer for the cohort; each client here reads its entry."""
        return [client.share_keys(neighbour_keys[c]) for c, client in self._secagg.items() if c in neighbour_keys]

    def secagg_unmask(self, rnd: int, request: UnmaskRequest) -> list[UnmaskShares]:
        """Phase 3: the clients still online reveal the shares the server needs; then forget the round."""
        out = [client.unmask(request) for c, client in self._secagg.items() if c in request.survivors]
        self._secagg = {}
        return out

    def _mask(self, rnd: int, chunk: Sequence[int], updates: torch.Tensor, inbox: dict[int, dict],
              here: frozenset[int]) -> np.ndarray:
        """Phase 2 for a chunk of clients: quantize each clipped update and mask it; return the sum
        mod 2^b. Pair masks between two clients that are both summed here (`here`) cancel in this
        worker's sum, so they are not expanded (see SecAggClient.masked_input)."""
        p = self._secagg_params
        total = np.zeros(updates.shape[1], dtype=np.uint64)
        for c, u in zip(chunk, updates.cpu().numpy()):
            q = quantize(u, p.clip, p.step, p.bits, np_rng(self.cfg.seed, "quantize", rnd, c))
            if p.noise_multiplier > 0:
                # distributed DP: this client's Skellam share, in quantization steps, before masking,
                # so the sum the aggregator unmasks is already private (two's complement into Z_2^b)
                noise = distributed_noise_share(len(q), p.clip, p.noise_multiplier, p.cohort, p.step,
                                                np_rng(self.cfg.seed, "dp-noise-share", rnd, c))
                q = add_mod(q, noise.astype(np.uint64) & np.uint64((1 << p.bits) - 1), p.bits)
            total = add_mod(total, self._secagg[c].masked_input(q, inbox.get(c, {}), cancels=here).y, p.bits)
        return total

    # ------------------------------------------------------------ evaluation
    def evaluate(self, global_params: np.ndarray, cids: Sequence[int], rnd: int = 0, export: bool = False,
                 audit: bool = True) -> dict:
        """acc(D_I) of the global model and of each individual's personalized model (the global
        model fine-tuned `eval.finetune_steps` SGD steps on the individual's train split). With the
        MIA audit on, also per-sample losses of both models on the individuals' train splits
        (members) and test splits (non-members). `export`: also the personalized parameters
        (clients, n_params), which each individual would keep (or, with consent, hand to serving)."""
        g = self._global(global_params)
        out: dict[str, list] = {k: [] for k in ("acc_global_DI", "acc_personalized_DI", *LOSS_KEYS)}
        exported: list[torch.Tensor] = []
        ids: list[int] = []
        vectorized = self.path == "vmap"
        for chunk in self._chunks(list(cids)):
            # rnd counts completed rounds here: the data is that of the last trained round (rnd - 1)
            clients = data_for_round(self.cfg.data, self.data, self.drifted, rnd - 1).clients(chunk)
            xs_tr, ys_tr = [c.x_train for c in clients], [c.y_train for c in clients]
            xs_te, ys_te = [c.x_test for c in clients], [c.y_test for c in clients]
            glob = g.expand(len(chunk), -1)                                             # (clients, n_params)
            pers = glob
            if self.cfg.eval.finetune_steps > 0:
                gens = [np_rng(self.cfg.seed, "finetune-batches", rnd, c) for c in chunk]
                upd, _ = self.finetuner.client_update(self.model, g, xs_tr, ys_tr, gens, self.path)
                pers = g + upd
            if export:
                exported.append(pers.cpu())
            out["acc_global_DI"].append(accuracies_stacked(self.model, glob, xs_te, ys_te, vectorized))
            out["acc_personalized_DI"].append(accuracies_stacked(self.model, pers, xs_te, ys_te, vectorized))
            if audit and self.cfg.privacy.mia_audit:
                for key, flats, xs, ys in (("loss_global_train", glob, xs_tr, ys_tr),
                                           ("loss_global_test", glob, xs_te, ys_te),
                                           ("loss_personalized_train", pers, xs_tr, ys_tr),
                                           ("loss_personalized_test", pers, xs_te, ys_te)):
                    out[key] += sample_losses(self.model, flats, xs, ys)
            ids += [int(c) for c in chunk]
        res = {k: torch.cat(v).numpy() if v else np.zeros(0, np.float32) for k, v in out.items()}
        res["client_ids"] = ids
        if export:
            res["personalized"] = (torch.cat(exported).numpy() if exported
                                   else np.zeros((0, self.n_params), np.float32))
        return res

    def evaluate_sums(self, global_params: np.ndarray, cids: Sequence[int], rnd: int = 0) -> dict:
        """Only the sums of the shard's accuracies (for the private tuning metric)."""
        res = self.evaluate(global_params, cids, rnd, audit=False)
        return {"acc_global_DI": float(np.nansum(res["acc_global_DI"])),
                "acc_personalized_DI": float(np.nansum(res["acc_personalized_DI"])),
                "count": int(np.isfinite(res["acc_personalized_DI"]).sum())}

    def secagg_metric(self, rnd: int, global_params: np.ndarray, cids: Sequence[int], inbox: dict,
                      data_round: int) -> tuple[list[int], np.ndarray]:
        """Each evaluated individual's [acc global, acc personalized, 1], quantized and masked; the
        sum over this worker's clients leaves (pair masks between them cancel), mod 2^b."""
        p = self._secagg_params
        res = self.evaluate(global_params, cids, data_round, audit=False)
        here = frozenset(int(c) for c in cids)
        total = np.zeros(3, dtype=np.uint64)
        for c, ag, ap in zip(res["client_ids"], res["acc_global_DI"], res["acc_personalized_DI"]):
            v = np.array([ag, ap, 1.0]) if np.isfinite(ap) else np.zeros(3)   # no test data: counts nothing
            q = quantize(v, p.clip, p.step, p.bits, np_rng(self.cfg.seed, "metric-quantize", rnd, c))
            total = add_mod(total, self._secagg[c].masked_input(q, inbox.get(c, {}), cancels=here).y, p.bits)
        return [int(c) for c in cids], total

    def evaluate_global(self, global_params: np.ndarray, shard: int = 0, num_shards: int = 1) -> np.ndarray:
        """Per-sample hits (bool) of the global model on shard `shard` of D_G (workers split D_G)."""
        x, y = self.data.global_data()
        n = len(y)
        lo, hi = n * shard // num_shards, n * (shard + 1) // num_shards
        return predictions_hit(self.model, self._global(global_params), x[lo:hi], y[lo:hi]).numpy()

    def peak_rss_mib(self) -> float:
        return peak_rss_mib()


@ray.remote
class ClientWorkerActor(ClientWorker):
    """Ray actor over ClientWorker. Torch math runs with as many threads as CPUs the actor asked
    for (at least one), so N single-CPU actors use N cores without oversubscription."""

    def __init__(self, cfg: dict, worker_id: int, num_threads: int = 1):
        torch.set_num_threads(max(1, num_threads))
        super().__init__(cfg, worker_id)
