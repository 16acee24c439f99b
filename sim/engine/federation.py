"""The federation: a pool of ClientWorker actors and an Aggregator actor, started from a plan;
one round at a time.

One round: sample a cohort (from the run's secret streams: the seed does not say who was in it),
keep the consenting clients, drop some (simulated dropout), split the survivors evenly over the
workers, put the global model in the object store once, and let every worker train its shard; the
workers' messages go straight to the aggregator, which returns the new global model. A worker is
given the keys of the clients it hosts for the round at hand, never the run secret. The driver
only ever holds the global model and metrics. Under secure aggregation the same round runs as a secure sum, and so does Tune's
metric: one flow (`_secure_sum`) for both.

This file holds the rounds themselves (synchronous, and by deadline); the class's other jobs are
mixins, one a file: pool.py (the actors, and healing after a lost one), buffered.py (FedBuff
server steps), secure_rounds.py (secure rounds and metric sums), evaluation.py (the panel and the
private metric).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray

from fedmeta.actors.messages import round_diagnostics
from fedmeta.sim.algorithms import Algorithm, build_algorithm
from fedmeta.sim.artifacts.rundir import forget_personalized
from fedmeta.sim.config import ExperimentConfig
from fedmeta.sim.engine.buffered import BufferedRounds
from fedmeta.sim.engine.consent import ConsentGate, consenting_panel
from fedmeta.sim.engine.evaluation import PanelEvaluation
from fedmeta.sim.engine.faults import FaultLog, lost_actor
from fedmeta.sim.engine.fedbuff import BufferClock
from fedmeta.sim.engine.plan import FederationPlan
from fedmeta.sim.engine.pool import WorkerPool
from fedmeta.sim.engine.result import RoundResult
from fedmeta.sim.engine.secure_rounds import SecureRounds
from fedmeta.sim.sampling import apply_dropout, draw_cohort, split_even
from fedmeta.sim.seeding import Secrets, client_keys
from fedmeta.sim.system import online


class Federation(WorkerPool, BufferedRounds, SecureRounds, PanelEvaluation):
    """The actor pool of one plan."""

    def __init__(self, plan: FederationPlan, run_dir: Path | None = None, secrets: Secrets | None = None):
        """`secrets`: the run's secret randomness (a fresh run secret unless `run.seeded_secrets`).
        The driver keeps it: cohorts are drawn from it here, the aggregator gets only its own derived
        key, and each worker, with each call, only the keys of that round's clients it hosts."""
        self.plan = plan
        self.workers, self.aggregator, self._server_state = [], None, {}
        self._clock: BufferClock | None = None  # FedBuff's simulated clock and the model versions in flight
        self._step = 0  # the FedBuff step being served
        self._versions: dict[int, np.ndarray] = {}
        self.faults = FaultLog(plan.cfg.ray.max_failures_per_round)
        # the server rule's state is kept on the driver after every round when it has any, so a
        # lost aggregator comes back where it was
        self._stateful = type(build_algorithm(plan.cfg.algorithm)).state_dict is not Algorithm.state_dict
        seed = plan.cfg.seed
        self.secrets = secrets or (
            Secrets.seeded(seed) if plan.cfg.run.seeded_secrets else Secrets.fresh(seed)
        )
        # Who takes part (cohorts, dropout, availability, FedBuff's draws, the audit's canary coins) is
        # drawn in secret when the run claims DP: amplification by subsampling needs it. A run without
        # DP claims no epsilon, so its cohorts follow the seed and it replays exactly.
        private = plan.dp.enabled or plan.cfg.privacy.local_dp
        self.membership = self.secrets if private else Secrets.seeded(seed)
        self.plan = plan = plan.with_secrets(self.membership)
        self._spawn()
        self.consent = ConsentGate(plan.cfg, plan.num_clients, run_dir) if plan.cfg.profiles.enabled else None
        self.run_dir = run_dir  # where a revoked user's exported model is deleted
        self.plan = self._gated(self.plan)

    @property
    def cfg(self) -> ExperimentConfig:
        return self.plan.cfg

    def restart(self, cfg: ExperimentConfig) -> None:
        """Continue under new hyperparameters (after tuning): fresh workers and aggregator with
        `cfg`; the data, the consent store and the privacy budget of the run stay."""
        plan = self.plan.with_config(cfg)  # a bad config fails here, before anything is stopped
        if self.consent is not None:  # the run's consenting panel stays; revocations are filtered at use
            plan = replace(plan, eval_ids=self.plan.eval_ids)
        self.release()
        self.plan = plan
        self._spawn()
        self.load_server_state(self._server_state)  # e.g. an adaptive server optimizer's moments

    def server_state(self) -> dict:
        """The server rule's state (an adaptive optimizer's moments; {} for FedAvg and the like)."""
        return ray.get(self.aggregator.server_state.remote())

    def load_server_state(self, state: dict) -> None:
        ray.get(self.aggregator.load_server_state.remote(state))
        self._server_state = state

    def revoke(self, cid: int, purpose: str | None = None) -> None:
        """User `cid` withdraws consent (None: all purposes); they are out of the next round and the
        next evaluation, and without 'personalization' their exported personalized model is deleted
        (per-user serving loads it from the run directory)."""
        self.consent.revoke(cid, purpose)
        if not len(self.consent.admit(np.array([cid]))):
            forget_personalized(self.run_dir, cid)

    def _gated(self, plan: FederationPlan) -> FederationPlan:
        """With consent on, the plan's evaluation panel drawn from the consenting non-canary users
        (all of them when fewer than eval.num_individuals consent); the plan as it is otherwise."""
        if self.consent is None:
            return plan
        users = self.consent.admit(np.arange(plan.num_clients - len(plan.canary_ids)))
        return replace(plan, eval_ids=consenting_panel(plan.cfg.seed, users, plan.cfg.eval.num_individuals))

    def panel(self) -> np.ndarray:
        """The evaluation panel as of now: those of the plan's panel who still consent, asked at each
        use, so a revocation takes effect from the next evaluation (everyone without consent on)."""
        return self.consent.admit(self.plan.eval_ids) if self.consent else self.plan.eval_ids

    # ------------------------------------------------------------ training
    def train_round(self, round_index: int, global_params: np.ndarray) -> RoundResult:
        if self.cfg.federation.mode == "fedbuff":
            return self._fedbuff_step(round_index, global_params)
        t0 = time.perf_counter()
        sampled, admitted, asked, cohort = self._round_cohort(round_index)
        alive, dropped = apply_dropout(self.membership, round_index, cohort, self.cfg.federation.dropout)
        g_ref = ray.put(global_params)
        self.faults.begin_round()
        new, metrics = self._aggregate_round(round_index, g_ref, cohort, alive, global_params)
        metrics["not_consenting"] = len(sampled) - len(admitted)
        # who reported: not a lost or cancelled worker's clients (named), nor those past a deadline or quota (counted)
        out = np.isin(alive, metrics.pop("lost_clients", []))
        if out.any():
            metrics["lost_clients"] = int(out.sum())
        reported = (
            len(alive) - int(out.sum()) - metrics.get("late_clients", 0)
            if not metrics.get("aborted")
            else len(alive)
        )
        metrics["offline"] = len(asked) - len(cohort)
        return RoundResult(
            new,
            reported,
            len(asked) - reported,
            time.perf_counter() - t0,
            metrics,
            alive[~out].tolist(),
            dict(self.faults.counts),
        )

    def _round_cohort(self, round_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The round's draw (sampled), the consenting ones (admitted), those of them in the
        federation (asked), and those of them online (the cohort)."""
        sampled = draw_cohort(self.membership, round_index, self.plan.sampling)
        admitted = self.consent.admit(sampled) if self.consent else sampled
        # 'out' canaries never train; joiners only from the drift round on
        asked = admitted[
            ~np.isin(admitted, np.concatenate([self.plan.excluded_canaries, self.plan.absent(round_index)]))
        ]
        system = self.cfg.federation.system
        cohort = (
            asked[online(self.membership, round_index, asked, system.availability)]
            if system.enabled
            else asked
        )
        return sampled, admitted, asked, cohort

    def _aggregate_round(
        self, round_index: int, g_ref, cohort: np.ndarray, alive: np.ndarray, global_params: np.ndarray
    ) -> tuple[np.ndarray, dict]:
        """The round's training and aggregation (plain or secure), repeated whole on a fresh
        aggregator when it is lost, or restarted under a stateful server rule."""
        while True:
            try:
                if self.plan.secagg is None:
                    new, metrics = self._plain_round(round_index, g_ref, alive)
                else:
                    new, metrics = self._secure_round(round_index, g_ref, cohort, alive, global_params)
                if not self._stateful:
                    break
                state = self.server_state()  # read before the pid check: it is the state of that process
                if not self._aggregator_restarted():
                    self._server_state = state
                    break
                # Ray restarted the aggregator without a call failing: it served this round without
                # the server state, so the round repeats once the state is back
                self._heal(round_index, "the aggregator was restarted by Ray")
                self.faults.retried("rounds")
                continue
            except Exception as e:
                if not lost_actor(e):
                    raise
                # the aggregator was lost (a lost worker is retried, or under secure aggregation a
                # dropout): the pool is healed and the whole round repeats on a fresh aggregator
                self._heal(round_index, e)
                self.faults.retried("rounds")
        return new, metrics

    def _noise_keys(self, scope: int, cids) -> dict | None:
        """The keys of a round's clients for their local DP-SGD noise (None without local DP)."""
        return client_keys(self.secrets, scope, cids) if self.cfg.privacy.local_dp else None

    def _deadline(self) -> tuple[float | None, float | None]:
        """The round's deadline for starting a client, and the later cutoff past which a worker's
        message is no longer waited for (time.time(); None: no deadline). With simulated devices
        the deadline is in simulated seconds and nothing is cut off in real time."""
        fed = self.cfg.federation
        if fed.system.enabled:  # simulated devices: the deadline is in simulated seconds, kept by the workers
            return fed.deadline_s, None
        now = time.time()
        return (now + fed.deadline_s, now + 1.5 * fed.deadline_s) if fed.deadline_s else (None, None)

    def _quotas(self, shards: list[list[int]], live: set[int] | None = None) -> list[int | None]:
        """Over-selection: how many of each shard's live clients report, the round's
        clients_per_round split in proportion (None: all of them)."""
        fed = self.cfg.federation
        sizes = [len(s) if live is None else sum(c in live for c in s) for s in shards]
        if fed.over_selection <= 1 or sum(sizes) <= fed.clients_per_round:
            return [None] * len(shards)
        edges = np.round(np.cumsum([0, *sizes]) * fed.clients_per_round / sum(sizes)).astype(int)
        return np.diff(edges).tolist()

    def _plain_round(self, round_index: int, g_ref, alive: np.ndarray) -> tuple[np.ndarray, dict]:
        parts = self._split(alive)
        shards = list(zip(parts, self._quotas(parts)))  # (clients, how many of them report)
        deadline, cutoff = self._deadline()

        def submit(w, shard):
            return w.train.options(num_returns=2).remote(
                round_index,
                g_ref,
                shard[0],
                quota=shard[1],
                deadline=deadline,
                keys=self._noise_keys(round_index, shard[0]),
            )

        trained = [submit(w, shard) for w, shard in zip(self.workers, shards)]
        if cutoff is not None:
            return self._by_deadline(round_index, g_ref, shards, trained, cutoff)
        try:
            # the aggregator starts as soon as the messages exist: no stop at the driver in between
            new, metrics = ray.get(
                self.aggregator.aggregate.remote(round_index, g_ref, *[m for m, _ in trained])
            )
        except Exception as e:
            if not lost_actor(e):
                raise
            # a worker (or the aggregator) was lost: repeat the lost shards, then aggregate again (a lost
            # aggregator fails this second call, and train_round heals it and repeats the round)
            trained = self._on_workers(round_index, shards, submit, started=trained)
            new, metrics = ray.get(
                self.aggregator.aggregate.remote(round_index, g_ref, *[m for m, _ in trained])
            )
        diags = ray.get([d for _, d in trained])
        self._note_restarts(round_index, diags)
        metrics.update(round_diagnostics(diags))
        return new, metrics

    def _split(self, alive: np.ndarray) -> list[list[int]]:
        """One shard per worker: contiguous stretches of the cohort; with top-k error feedback a
        client always goes to the same worker (its residual lives there), by its place in the
        population."""
        c = self.cfg.federation.compression
        if c.kind == "topk" and c.error_feedback:
            n = len(self.workers)
            home = alive * n // self.plan.num_clients
            return [alive[home == w].tolist() for w in range(n)]
        return split_even(alive, len(self.workers))

    def _by_deadline(
        self, round_index: int, g_ref, shards: list, trained: list, cutoff: float
    ) -> tuple[np.ndarray, dict]:
        """A round with a deadline cannot wait for a retry: the workers stop starting clients at
        the deadline, and a shard not back by the cutoff (1.5x the deadline: a stuck worker), or
        whose worker is lost, is cancelled; its clients are dropouts."""
        messages = [m for m, _ in trained]
        ready, _ = ray.wait(
            messages, num_returns=len(messages), timeout=max(0.0, cutoff - time.time()), fetch_local=False
        )
        kept, out = [], []
        for i, (m, d) in enumerate(trained):
            if m not in ready:
                ray.cancel(m)
                out += shards[i][0]
                continue
            try:
                ray.get(d)
                kept.append(i)
            except Exception as e:
                if not lost_actor(e):
                    raise
                self.faults.lost(round_index, f"worker {i}", e)
                self._revive(self.workers[i], i)
                out += shards[i][0]
        new, metrics = ray.get(
            self.aggregator.aggregate.remote(round_index, g_ref, *[messages[i] for i in kept])
        )
        diags = ray.get([trained[i][1] for i in kept])
        self._note_restarts(round_index, diags)
        metrics.update(round_diagnostics(diags))
        metrics["lost_clients"] = out
        return new, metrics
