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
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import ray
import torch

from fedmeta.actors.messages import (
    Diagnostics,
    MaskedUpdate,
    PlainUpdate,
    wire_bytes,
)
from fedmeta.actors.privacy import UserLevelDP, clip_updates
from fedmeta.actors.process import settle
from fedmeta.actors.screening import screen, without_rejected
from fedmeta.actors.secagg.protocol import (
    MaskedInput,
    SecAggClient,
)
from fedmeta.actors.secagg.quantize import add_mod
from fedmeta.actors.secagg.session import SecAggParams
from fedmeta.actors.worker_eval import WorkerEvaluation
from fedmeta.actors.worker_secure import SecureClientSide
from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.algorithms.local import (
    LocalDP,
    resolve_compute,
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


@dataclass
class _Sums:
    """What one `train` call's message adds up over the chunks of clients trained so far."""

    total: torch.Tensor  # the weighted sum of the plain updates
    masked: np.ndarray | None  # under secure aggregation: the sum of the masked inputs, mod 2^b
    here: frozenset[int]  # clients summed in this message (their pair masks cancel)
    weight: float = 0.0
    loss_sum: float = 0.0
    rejected: int = 0
    releases: list[tuple[int, int, int]] = field(default_factory=list)
    done: list[int] = field(default_factory=list)  # the clients trained (they report)
    upload: int = 0  # compression: the bytes one client's encoded message takes


class ClientWorker(SecureClientSide, WorkerEvaluation):
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
        self._init_dp(dp)
        self._init_data()
        self._init_training()
        # the one open secure-sum session: protocol round -> (parameters, its clients' protocol state)
        self._session: dict[int, tuple[SecAggParams, dict[int, SecAggClient]]] = {}

    def _init_dp(self, dp: UserLevelDP | None) -> None:
        """The run's user-level DP, required when privacy is on (off without it)."""
        pc = self.cfg.privacy
        if dp is None and pc.mode != "off":
            raise ValueError(
                "ClientWorker: privacy.mode is on; pass the run's UserLevelDP (FederationPlan.dp)"
            )
        self.dp = dp or UserLevelDP(bound_updates=self.cfg.secagg.enabled)

    def _init_data(self) -> None:
        """The population's data generator, the audit's canaries and the drifted data."""
        pc = self.cfg.privacy
        self.data = build_dataset(self.cfg.data, self.cfg.seed)
        # the audit's canaries (the last ids): they submit a fixed direction of norm C, not a trained update
        self.canaries = frozenset(
            canary_ids(
                canary_count(pc.audit_canaries, self.data.num_clients, self.dp.enabled), self.data.num_clients
            ).tolist()
        )
        # the same individuals after the drift, from data.drift.at_round on (or the joiners beside the others)
        self.drifted = drift_data(self.cfg.data, self.cfg.seed, self.data, len(self.canaries))

    def _init_training(self) -> None:
        """The model, the algorithm and how the clients train it (compute path, devices, compression)."""
        pc = self.cfg.privacy
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
        # fine-tuning, or Ditto's proximal objective
        self.finetuner = self.algorithm.personalizer(self.cfg.eval)

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
        sums = _Sums(
            total=torch.zeros_like(g),
            masked=None if inbox is None else np.zeros(self.n_params, dtype=np.uint64),
            here=frozenset(int(c) for c in cids),
        )
        for chunk in self._chunks(cids, deadline):
            if deadline is not None and (_now() > deadline or _cancelled()):
                break
            self._train_chunk(sums, round_index, g, chunk, inbox, deadline, keys)
        return self._message(round_index, sums, sampled, sim_s, t0)

    def _train_chunk(
        self,
        sums: _Sums,
        round_index: int,
        g: torch.Tensor,
        chunk: Sequence[int],
        inbox: dict[int, dict] | None,
        deadline: float | None,
        keys: dict[int, Secrets] | None,
    ) -> None:
        """Train one chunk of clients and add what they report to the message's `sums`."""
        sums.done += chunk
        updates, met, ys = self._chunk_updates(round_index, g, chunk, keys)
        # the admission check: a NaN, an infinity or an oversized update never enters the sum
        keep, bad = screen(updates, self.max_update_norm)
        if bad["non_finite"] or bad["oversized"]:
            sums.rejected += bad["non_finite"] + bad["oversized"]
            updates = without_rejected(updates, keep)
            loss = torch.as_tensor(met["train_loss"])
            met = {**met, "train_loss": torch.where(keep.to(loss.device), loss, 0.0)}
        if self.local_dp is not None:  # each client's noisy gradients, for its own ledger
            sums.releases += [(int(c), int(r), len(y)) for c, r, y in zip(chunk, met["local_releases"], ys)]
        # DP's client half: clipped with equal weights when bounded, else the algorithm's weights
        updates, w = self.dp.client_half(updates, [self.algorithm.client_weight(len(y)) for y in ys])
        if sums.masked is None and not bool(keep.all()):
            w = w * keep.to(w.device, w.dtype)  # plain sums: a rejected client weighs nothing
        if self.compression.kind != "none":
            updates, sums.upload = self._compressed(round_index, chunk, updates)
        if sums.masked is not None:
            rows = zip(chunk, updates.cpu().numpy())
            # a chunk reports whole or not at all: under a deadline only its own pair masks may cancel
            together = sums.here if deadline is None else frozenset(int(c) for c in chunk)
            part = self._masked_sum(
                round_index, self.n_params, rows, inbox, together, "quantize", self.dp.noise_share
            )
            sums.masked = add_mod(sums.masked, part, self._protocol(round_index)[0].bits)
        else:
            sums.total += w @ updates
        sums.weight += float(w.sum())
        sums.loss_sum += float(met["train_loss"].sum())

    def _chunk_updates(
        self, round_index: int, g: torch.Tensor, chunk: Sequence[int], keys: dict[int, Secrets] | None
    ) -> tuple[torch.Tensor, dict, list]:
        """The algorithm's client rule on this chunk's data (the canaries' own directions in place
        of theirs): the updates (clients, n_params), the rule's metrics and each client's labels."""
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
        return updates, met, ys

    def _message(
        self, round_index: int, sums: _Sums, sampled: int, sim_s: float, t0: float
    ) -> tuple[PlainUpdate | MaskedUpdate, Diagnostics]:
        """The message for the aggregator from the clients that reported, and the diagnostics."""
        ids = tuple(int(c) for c in sums.done)
        upload = sums.upload if self.compression.kind != "none" and ids else 0
        diag = Diagnostics(
            self.worker_id,
            len(ids),
            sums.loss_sum,
            time.perf_counter() - t0,
            tuple(sums.releases) if self.local_dp is not None else None,
            os.getpid(),
            sampled - len(ids),
            sim_s,
            sums.rejected,
        )
        if sums.masked is not None:
            return MaskedUpdate(round_index, self.worker_id, sums.masked, ids), diag
        return PlainUpdate(
            round_index, self.worker_id, sums.total.cpu().numpy(), sums.weight, ids, upload, sums.rejected
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
