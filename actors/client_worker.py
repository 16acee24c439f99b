"""ClientWorker: trains and evaluates cohorts of virtual clients; the Ray actor is a thin wrapper.

One worker holds one model architecture, one dataset generator and one algorithm; per call it
regenerates its clients' data from (seed, client id), trains the whole cohort (vectorized with
torch.func or as a loop) and returns ONE message: the weighted sum of its clients' updates, or
under secure aggregation the sum of their masked inputs. Data never leaves the worker.

Rounds are named two ways: `round_index` is the 0-based index of the round being trained;
`rounds_done` counts completed rounds (an evaluation after round r sees rounds_done = r + 1).
"""

from __future__ import annotations

import os
import resource
import time
from typing import Callable, Iterable, Sequence

import numpy as np
import ray
import torch

from fedmeta.actors.messages import (
    METRIC_KEYS,
    Diagnostics,
    MaskedUpdate,
    PlainUpdate,
    ProtocolStateLost,
    wire_bytes,
)
from fedmeta.actors.privacy import UserLevelDP, clip_updates, individual_mia_auc
from fedmeta.actors.process import settle
from fedmeta.actors.screening import screen, without_rejected
from fedmeta.actors.secagg.protocol import (
    AdvertiseKeys,
    EncryptedShares,
    MaskedInput,
    SecAggClient,
    UnmaskRequest,
    UnmaskShares,
)
from fedmeta.actors.secagg.quantize import add_mod, quantize
from fedmeta.actors.secagg.session import SecAggParams
from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.algorithms.local import (
    LocalDP,
    accuracies_stacked,
    predictions_hit,
    resolve_compute,
    sample_losses,
)
from fedmeta.sim.artifacts.usercode import add_code_path
from fedmeta.sim.compression import compress
from fedmeta.sim.config import ExperimentConfig, from_dict
from fedmeta.sim.data import build_dataset
from fedmeta.sim.data.canaries import canary_count, canary_direction, canary_ids
from fedmeta.sim.data.drift import data_for_round, drift_data
from fedmeta.sim.models import build_model, num_params
from fedmeta.sim.seeding import Secrets, client_keys, np_rng, torch_gen
from fedmeta.sim.system import choose, device, duration

# Per-sample losses an evaluation returns for the membership-inference audit.
LOSS_KEYS = ("loss_global_train", "loss_global_test", "loss_personalized_train", "loss_personalized_test")
# Bound on clients trained in lockstep: (clients x n_params) floats of parameters and grads.
VMAP_FLOATS = 1 << 25
DEADLINE_CHUNK = 32  # clients per vectorized step when a round has a deadline (checked between steps)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _now() -> float:
    """The wall clock deadlines are set in (the driver's time.time(); hosts keep it in sync)."""
    return time.time()


def _cancelled() -> bool:
    """Whether the driver cancelled the running call (never, outside a Ray worker)."""
    try:
        return ray.get_runtime_context().is_canceled()
    except RuntimeError:
        return False


class ClientWorker:
    """Plain class (testable without Ray): the cohort engine of one worker. `dp` is the run's
    user-level DP (the driver resolves it once); without it, DP is off."""

    def __init__(
        self,
        cfg: ExperimentConfig | dict,
        worker_id: int = 0,
        dp: UserLevelDP | None = None,
        device: str | None = None,
        secrets: Secrets | None = None,
        code_path: Sequence[str] = (),
    ):
        add_code_path(code_path)  # where the researcher's own model and algorithm are imported from
        self.cfg = cfg if isinstance(cfg, ExperimentConfig) else from_dict(cfg)
        add_code_path(self.cfg.run.code_paths)
        self.worker_id = worker_id
        # The clients' secret randomness (keys, masks, rounding, noise) comes with each call: the keys
        # of the clients this worker hosts in that round (sim.seeding.client_keys), never the run
        # secret. Called without them (a worker used on its own), the clients' keys of the round
        # derive from `secrets`, or from a fresh secret; public streams use the seed.
        self._fallback = secrets or (
            Secrets.seeded(self.cfg.seed) if self.cfg.run.seeded_secrets else Secrets.fresh(self.cfg.seed)
        )
        self._session_keys: dict[int, Secrets] = {}  # the open secure-sum session's client keys
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pc = self.cfg.privacy
        if dp is None and pc.mode != "off":
            raise ValueError(
                "ClientWorker: privacy.mode is on; pass the run's UserLevelDP (FederationPlan.dp)"
            )
        self.dp = dp or UserLevelDP(bound_updates=self.cfg.secagg.enabled)
        self.data = build_dataset(self.cfg.data, self.cfg.seed)
        # the audit's canaries (the last ids): they submit a fixed direction of norm C, not a trained update
        self.canaries = frozenset(
            canary_ids(
                canary_count(pc.audit_canaries, self.data.num_clients, self.dp.enabled), self.data.num_clients
            ).tolist()
        )
        # the same individuals after the drift, from data.drift.at_round on (or the joiners beside the others)
        self.drifted = drift_data(self.cfg.data, self.cfg.seed, self.data, len(self.canaries))
        self.model = build_model(self.cfg.model, self.data.input_shape, self.data.num_classes).to(self.device)
        self.algorithm = build_algorithm(self.cfg.algorithm)
        self.system = self.cfg.federation.system  # simulated devices (sim/system.py), if enabled
        self.compression = self.cfg.federation.compression
        self.max_update_norm = self.cfg.federation.max_update_norm
        self._residuals: dict[int, torch.Tensor] = {}  # top-k error feedback: what each client left out
        self.compute = resolve_compute(
            self.cfg.ray.compute, self.cfg.model.kind, pc.local_dp, self.model, tuple(self.data.input_shape)
        )
        self.local_dp = LocalDP(pc.local_clip, pc.local_noise_multiplier) if pc.local_dp else None
        self.n_params = num_params(self.model)
        self.finetuner = self.algorithm.personalizer(
            self.cfg.eval
        )  # fine-tuning, or Ditto's proximal objective
        # the one open secure-sum session: protocol round -> (parameters, its clients' protocol state)
        self._session: dict[int, tuple[SecAggParams, dict[int, SecAggClient]]] = {}

    def info(self) -> dict:
        return {
            "worker": self.worker_id,
            "pid": os.getpid(),
            "device": str(self.device),
            "compute": self.compute,
            "n_params": self.n_params,
            "num_threads": torch.get_num_threads(),
        }

    def _chunks(self, cids: Sequence[int], deadline: float | None = None) -> list[Sequence[int]]:
        size = len(cids) if self.compute == "loop" else max(1, VMAP_FLOATS // (4 * self.n_params))
        if deadline is not None:  # the deadline is checked between chunks: keep them short
            size = 1 if self.compute == "loop" else min(size, DEADLINE_CHUNK)
        return [cids[i : i + size] for i in range(0, len(cids), size)]

    def _global(self, global_params: np.ndarray) -> torch.Tensor:
        return torch.tensor(global_params, dtype=torch.float32, device=self.device)

    def _clients(self, chunk: Sequence[int], data_round: int):
        return data_for_round(self.cfg.data, self.data, self.drifted, data_round).clients(chunk)

    # ------------------------------------------------------------ training
    def train(
        self,
        round_index: int,
        global_params: np.ndarray,
        cids: Sequence[int],
        inbox: dict[int, dict] | None = None,
        quota: int | None = None,
        deadline: float | None = None,
        keys: dict[int, Secrets] | None = None,
    ) -> tuple[PlainUpdate | MaskedUpdate, Diagnostics]:
        """Run the algorithm's client rule for every client in `cids`; sum their weighted updates.
        `keys`: each client's key for this round (its local DP-SGD noise; `fedmeta.sim.seeding.client_keys`).
        With secure aggregation (`inbox`: the encrypted shares routed to each client) the
        clients' clipped updates are quantized and masked, and only the masked sum leaves.
        Stragglers: only the first `quota` clients to finish report (over-selection), and none
        that has not finished by `deadline` (time.time()) or once the driver cancelled this call;
        the others are dropouts. Returns (the message for the aggregator, the diagnostics)."""
        t0 = time.perf_counter()
        if inbox is not None:
            self._protocol(round_index)  # fail before training when the protocol state is gone
        sampled, sim_s = len(cids), 0.0
        if self.system.enabled:  # simulated devices decide who reports, and the round's time
            cids, sim_s = self._simulated(
                round_index, global_params, list(cids), quota, deadline, inbox is not None
            )
            deadline = None
        else:
            cids = list(cids)[:quota]  # a worker's clients finish in the order it trains them
        g = self._global(global_params)
        total = torch.zeros_like(g)
        masked = None if inbox is None else np.zeros(self.n_params, dtype=np.uint64)
        weight, loss_sum, rejected = 0.0, 0.0, 0
        releases: list[tuple[int, int, int]] = []
        here = frozenset(int(c) for c in cids)  # clients summed in this message (their pair masks cancel)
        done: list[int] = []
        for chunk in self._chunks(cids, deadline):
            if deadline is not None and (_now() > deadline or _cancelled()):
                break
            done += chunk
            clients = self._clients(chunk, round_index)
            xs, ys = [c.x_train for c in clients], [c.y_train for c in clients]
            gens = self._batch_streams(round_index, chunk, keys)
            updates, met = self.algorithm.client_update(
                self.model,
                g,
                xs,
                ys,
                gens,
                self.compute,
                self.local_dp,
                self._local_noise(round_index, chunk, keys),
            )  # (clients, n_params)
            if self.canaries.intersection(chunk):
                updates = self._canary_updates(chunk, updates)
            # the admission check: a NaN, an infinity or an oversized update never enters the sum
            keep, bad = screen(updates, self.max_update_norm)
            if bad["non_finite"] or bad["oversized"]:
                rejected += bad["non_finite"] + bad["oversized"]
                updates = without_rejected(updates, keep)
                loss = torch.as_tensor(met["train_loss"])
                met = {**met, "train_loss": torch.where(keep.to(loss.device), loss, 0.0)}
            if self.local_dp is not None:  # each client's noisy gradients, for its own ledger
                releases += [(int(c), int(r), len(y)) for c, r, y in zip(chunk, met["local_releases"], ys)]
            # DP's client half: clipped with equal weights when bounded, else the algorithm's weights
            updates, w = self.dp.client_half(updates, [self.algorithm.client_weight(len(y)) for y in ys])
            if masked is None and not bool(keep.all()):
                w = w * keep.to(w.device, w.dtype)  # plain sums: a rejected client weighs nothing
            if self.compression.kind != "none":
                updates, upload = self._compressed(round_index, chunk, updates)
            if masked is not None:
                rows = zip(chunk, updates.cpu().numpy())
                # a chunk reports whole or not at all: under a deadline only its own pair masks may cancel
                together = here if deadline is None else frozenset(int(c) for c in chunk)
                part = self._masked_sum(
                    round_index, self.n_params, rows, inbox, together, "quantize", self.dp.noise_share
                )
                masked = add_mod(masked, part, self._protocol(round_index)[0].bits)
            else:
                total += w @ updates
            weight += float(w.sum())
            loss_sum += float(met["train_loss"].sum())
        ids = tuple(int(c) for c in done)
        upload = upload if self.compression.kind != "none" and ids else 0
        diag = Diagnostics(
            self.worker_id,
            len(ids),
            loss_sum,
            time.perf_counter() - t0,
            tuple(releases) if self.local_dp is not None else None,
            os.getpid(),
            sampled - len(ids),
            sim_s,
            rejected,
        )
        if masked is not None:
            return MaskedUpdate(round_index, self.worker_id, masked, ids), diag
        return PlainUpdate(
            round_index, self.worker_id, total.cpu().numpy(), weight, ids, upload, rejected
        ), diag

    def _compressed(
        self, round_index: int, chunk: Sequence[int], updates: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """What the server decodes from these clients' updates (sim/compression.py), each client's
        residual kept here for its next round (error feedback; clients stay on one worker then),
        and the bytes one client's encoded message takes. Under DP the decoded update is clipped
        again, so a round's sensitivity stays C."""
        cfg = self.compression
        feedback = cfg.kind == "topk" and cfg.error_feedback
        residual = (
            torch.stack([self._residuals.get(int(c), torch.zeros_like(updates[0])) for c in chunk])
            if feedback
            else None
        )
        gens = [torch_gen(self.cfg.seed, "compress", round_index, int(c), device=self.device) for c in chunk]
        decoded, kept, sample = compress(cfg.kind, updates, residual, cfg.topk_fraction, gens)
        if kept is not None:
            self._residuals.update({int(c): r for c, r in zip(chunk, kept)})
        if self.dp.bound_updates:
            decoded, _ = clip_updates(decoded, self.dp.clip_norm)
        return decoded, wire_bytes(sample)

    def _simulated(
        self,
        round_index: int,
        global_params: np.ndarray,
        cids: list[int],
        quota: int | None,
        deadline: float | None,
        secure: bool,
    ) -> tuple[list[int], float]:
        """The clients that report on their simulated devices (none past the deadline, in
        simulated seconds; the `quota` fastest) and how long the round lasts for them. Transfer
        time counts the model down and the update (or masked vector) up, as built here."""
        keep, sim_s = choose(np.array(self.device_seconds(round_index, cids, secure)), quota, deadline)
        return [c for c, k in zip(cids, keep) if k], sim_s

    def device_seconds(self, round_index: int, cids: Sequence[int], secure: bool = False) -> list[float]:
        """Each client's simulated duration for a round started at `round_index` (its batch
        stream's): the model down, its local batches on its device, its update up."""
        n = self.n_params
        down = wire_bytes(np.zeros(n, dtype=np.float32))
        up = wire_bytes(
            MaskedInput(0, np.zeros(n, np.uint64))
            if secure
            else PlainUpdate(round_index, self.worker_id, np.zeros(n, np.float32), 1.0, (0,))
        )
        durations = []
        for chunk in self._chunks(list(cids)):
            for c, data in zip(chunk, self._clients(chunk, round_index)):
                plan = self.algorithm.schedules(
                    len(data.y_train), np_rng(self.cfg.seed, "local-batches", round_index, c)
                )
                batches = sum(len(s) for s in plan)
                durations.append(
                    duration(device(self.cfg.seed, c, self.system), batches, down, up, self.system.step_s)
                )
        return durations

    def _canary_updates(self, chunk: Sequence[int], updates: torch.Tensor) -> torch.Tensor:
        """The audit's canaries in this chunk submit their own direction, scaled to the clip norm."""
        updates = updates.clone()
        for j, c in enumerate(chunk):
            if int(c) in self.canaries:
                u = canary_direction(self.cfg.seed, int(c), self.n_params) * self.cfg.privacy.clip_norm
                updates[j] = torch.as_tensor(u, device=updates.device)
        return updates

    def _batch_streams(self, round_index: int, chunk: Sequence[int], keys: dict[int, Secrets] | None) -> list:
        """Each client's local batch order. Under local DP-SGD its amplification by batch sampling
        needs the batches secret, so they come from the client's key of the round; otherwise (and
        with seeded secrets, where both agree) from the seed."""
        if self.local_dp is None:
            return [np_rng(self.cfg.seed, "local-batches", round_index, c) for c in chunk]
        keys = self._keys(round_index, chunk, keys)
        return [keys[int(c)].np_rng("local-batches", round_index, int(c)) for c in chunk]

    def _keys(self, scope: int, cids: Iterable[int], keys: dict[int, Secrets] | None) -> dict[int, Secrets]:
        """The clients' keys for round (or protocol round) `scope`: as given, or derived here."""
        return keys if keys is not None else client_keys(self._fallback, scope, cids)

    def _local_noise(
        self, round_index: int, chunk: Sequence[int], keys: dict[int, Secrets] | None = None
    ) -> list | None:
        """Each client's secret DP-SGD noise source (attack-safe, `SecureGaussian`; None: seeded
        secrets, where the noise follows the client's batch stream as it always has)."""
        if self.local_dp is None or self._fallback.is_seeded:
            return None
        keys = self._keys(round_index, chunk, keys)
        return [keys[int(c)].noise("local-dp-noise", round_index, int(c), device=self.device) for c in chunk]

    # ------------------------------------------------------------ secure sums (client side)
    def secure_advertise(
        self,
        protocol_id: int,
        cids: Sequence[int],
        params: SecAggParams,
        keys: dict[int, Secrets] | None = None,
    ) -> list[AdvertiseKeys]:
        """Phase 0: every client of this shard makes its key pairs (its state lives here, as on its
        device) from its key for this protocol round (`keys`). One session is open at a time: a new
        one forgets an aborted one."""
        keys = self._keys(protocol_id, cids, keys)
        clients = {
            int(c): SecAggClient(
                int(c),
                protocol_id,
                params.bits,
                params.threshold,
                keys[int(c)].np_rng("secagg-client", protocol_id, int(c)),
            )
            for c in cids
        }
        self._session = {protocol_id: (params, clients)}
        self._session_keys = {int(c): keys[int(c)] for c in cids}
        return [client.advertise() for client in clients.values()]

    def _protocol(self, protocol_id: int) -> tuple[SecAggParams, dict[int, SecAggClient]]:
        if protocol_id not in self._session:  # e.g. Ray restarted this worker mid-protocol
            raise ProtocolStateLost(
                f"worker {self.worker_id}: no secure-aggregation state for protocol round "
                f"{protocol_id}: its clients drop out"
            )
        return self._session[protocol_id]

    def secure_share(self, protocol_id: int, neighbour_keys: dict[int, dict]) -> list[EncryptedShares]:
        """Phase 1: Shamir shares of each client's secrets, encrypted for its neighbours.
        `neighbour_keys` is the server's answer for the cohort; each client here reads its entry."""
        _, clients = self._protocol(protocol_id)
        pair_keys: dict[bytes, bytes] = {}  # co-hosted neighbours derive each pair's key once
        return [
            client.share_keys(neighbour_keys[c], pair_keys)
            for c, client in clients.items()
            if c in neighbour_keys
        ]

    def secure_unmask(self, protocol_id: int, request: UnmaskRequest) -> list[UnmaskShares]:
        """Phase 3: the clients still online reveal the shares the server needs; then forget the session."""
        _, clients = self._protocol(protocol_id)
        self._session.pop(protocol_id)
        self._session_keys = {}
        return [client.unmask(request) for c, client in clients.items() if c in request.survivors]

    def _masked_sum(
        self,
        protocol_id: int,
        dim: int,
        rows: Iterable[tuple[int, np.ndarray]],
        inbox: dict[int, dict],
        here: frozenset[int],
        quantize_stream: str,
        share: Callable | None,
    ) -> np.ndarray:
        """Phase 2 for some clients: quantize each client's vector (with its distributed-DP noise
        share, `share(n, step, rng)`, when that gives one), mask it, return the sum mod 2^b. Pair masks between two clients
        both summed here (`here`) cancel in this worker's sum, so they are never expanded."""
        p, clients = self._protocol(protocol_id)
        total = np.zeros(dim, dtype=np.uint64)
        for c, v in rows:
            key = self._session_keys[int(c)]
            q = quantize(v, p.clip, p.step, p.bits, key.uniform(len(v), quantize_stream, protocol_id, c))
            noise = share(len(q), p.step, key.np_rng("dp-noise-share", protocol_id, c)) if share else None
            if noise is not None:
                # this client's Skellam share, in quantization steps, before masking, so the sum the
                # aggregator unmasks is already private (two's complement into Z_2^b)
                q = add_mod(q, noise.astype(np.uint64) & np.uint64((1 << p.bits) - 1), p.bits)
            total += clients[c].masked_input(q, inbox.get(c, {}), cancels=here).y  # uint64 wraps mod 2^64
        total &= np.uint64((1 << p.bits) - 1)  # then mod 2^b, once
        return total

    def secure_metric(
        self,
        protocol_id: int,
        global_params: np.ndarray,
        cids: Sequence[int],
        inbox: dict,
        rounds_done: int,
        stat: str = "accuracy",
        weight: float | None = None,
        noise: float | None = None,
        panel: int | None = None,
    ) -> MaskedUpdate:
        """Each evaluated individual's [values of METRIC_KEYS[stat]..., 1], quantized and masked;
        the sum over this worker's clients leaves (pair masks between them cancel), mod 2^b.
        Distributed DP: each adds its share of the release's noise (`noise`, over the `panel`)."""
        keys = METRIC_KEYS[stat]
        res = self._panel_values(global_params, cids, rounds_done, stat, weight)
        values = np.stack([res[k] for k in keys], axis=1)
        rows = [
            (
                c,
                np.append(v, 1.0) if np.isfinite(v).all() else np.zeros(len(keys) + 1),
            )  # no test data: nothing
            for c, v in zip(res["client_ids"], values)
        ]
        here = frozenset(int(c) for c in cids)
        share = (
            (lambda n, step, rng: self.dp.metric_share(n, step, noise, panel or len(cids), rng))
            if panel is not None
            else None
        )
        total = self._masked_sum(protocol_id, len(keys) + 1, rows, inbox, here, "metric-quantize", share)
        return MaskedUpdate(protocol_id, self.worker_id, total, tuple(int(c) for c in cids))

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
            pers = glob
            if self.cfg.eval.finetune_steps > 0:
                gens = [np_rng(self.cfg.seed, "finetune-batches", rounds_done, c) for c in chunk]
                upd, _ = finetuner.client_update(self.model, g, xs_tr, ys_tr, gens, self.compute)
                pers = g + upd
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
        res = {k: torch.cat(v).numpy() if v else np.zeros(0, np.float32) for k, v in out.items()}
        res["client_ids"] = ids
        if audit or leakage:
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

    def peak_rss_mib(self) -> float:
        return peak_rss_mib()


@ray.remote
class ClientWorkerActor(ClientWorker):
    """Ray actor over ClientWorker. Torch math runs with as many threads as CPUs the actor asked
    for (at least one), so N single-CPU actors use N cores without oversubscription."""

    def __init__(
        self,
        cfg: dict,
        worker_id: int,
        num_threads: int = 1,
        dp: UserLevelDP | None = None,
        secrets: Secrets | None = None,
        code_path: Sequence[str] = (),
    ):
        torch.set_num_threads(max(1, num_threads))
        super().__init__(cfg, worker_id, dp, secrets=secrets, code_path=code_path)
        settle()  # no full GC walks over start-up state, no page faults per step
