"""The federation: a pool of ClientWorker actors and an Aggregator actor, started from a plan;
one round at a time.

One round: sample a cohort (from the run's secret streams: the seed does not say who was in it),
keep the consenting clients, drop some (simulated dropout), split the survivors evenly over the
workers, put the global model in the object store once, and let every worker train its shard; the
workers' messages go straight to the aggregator, which returns the new global model. A worker is
given the keys of the clients it hosts for the round at hand, never the run secret. The driver
only ever holds the global model and metrics. Under secure aggregation the same round runs as a secure sum, and so does Tune's
metric: one flow (`_secure_sum`) for both.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError, TaskCancelledError

from fedmeta.actors.aggregator import AggregatorActor, SecAggRoundAborted
from fedmeta.actors.client_worker import LOSS_KEYS, ClientWorkerActor, peak_rss_mib
from fedmeta.actors.messages import METRIC_KEYS, round_diagnostics
from fedmeta.actors.privacy import mia_auc
from fedmeta.actors.secagg.session import SecAggParams
from fedmeta.sim.algorithms import Algorithm, build_algorithm
from fedmeta.sim.engine.cluster import worker_resources
from fedmeta.sim.config import ExperimentConfig
from fedmeta.sim.engine.consent import ConsentGate, consenting_panel
from fedmeta.sim.engine.faults import LOST, FaultLog, RoundFailed, lost_actor
from fedmeta.sim.engine.fedbuff import BufferClock, staleness_weight
from fedmeta.sim.engine.plan import FederationPlan, secagg_round_facts
from fedmeta.sim.artifacts.rundir import forget_personalized
from fedmeta.sim.sampling import apply_dropout, draw_cohort, split_even
from fedmeta.sim.engine.secure_round import SecureSumRun
from fedmeta.sim.seeding import Secrets, client_keys
from fedmeta.sim.system import online
from fedmeta.sim.artifacts.usercode import code_paths

METRIC_ROUND_BASE = 1_000_000      # protocol round ids of secure metric rounds: never a training round's
METRIC_BASES = {"accuracy": METRIC_ROUND_BASE, "leakage": 2 * METRIC_ROUND_BASE}   # nor each other's


@dataclass
class RoundResult:
    global_params: np.ndarray
    clients: int
    dropped: int
    seconds: float
    metrics: dict
    trained: list[int] = field(default_factory=list)   # the clients whose updates went in
    faults: dict = field(default_factory=dict)          # the run's actor losses so far (FaultLog.counts)


class Federation:
    """The actor pool of one plan."""

    def __init__(self, plan: FederationPlan, run_dir: Path | None = None, secrets: Secrets | None = None):
        """`secrets`: the run's secret randomness (a fresh run secret unless `run.seeded_secrets`).
        The driver keeps it: cohorts are drawn from it here, the aggregator gets only its own derived
        key, and each worker, with each call, only the keys of that round's clients it hosts."""
        self.plan = plan
        self.workers, self.aggregator, self._server_state = [], None, {}
        self._clock: BufferClock | None = None        # FedBuff's simulated clock and the model versions in flight
        self._step = 0                                # the FedBuff step being served
        self._versions: dict[int, np.ndarray] = {}
        self.faults = FaultLog(plan.cfg.ray.max_failures_per_round)
        # the server rule's state is kept on the driver after every round when it has any, so a
        # lost aggregator comes back where it was
        self._stateful = type(build_algorithm(plan.cfg.algorithm)).state_dict is not Algorithm.state_dict
        seed = plan.cfg.seed
        self.secrets = secrets or (Secrets.seeded(seed) if plan.cfg.run.seeded_secrets else Secrets.fresh(seed))
        # Who takes part (cohorts, dropout, availability, FedBuff's draws, the audit's canary coins) is
        # drawn in secret when the run claims DP: amplification by subsampling needs it. A run without
        # DP claims no epsilon, so its cohorts follow the seed and it replays exactly.
        private = plan.dp.enabled or plan.cfg.privacy.local_dp
        self.membership = self.secrets if private else Secrets.seeded(seed)
        self.plan = plan = plan.with_secrets(self.membership)
        self._spawn()
        self.consent = ConsentGate(plan.cfg, plan.num_clients, run_dir) if plan.cfg.profiles.enabled else None
        self.run_dir = run_dir                        # where a revoked user's exported model is deleted
        self.plan = self._gated(self.plan)

    @property
    def cfg(self) -> ExperimentConfig:
        return self.plan.cfg

    def _spawn(self) -> None:
        cfg, plan = self.plan.cfg, self.plan
        cpus, gpus = worker_resources(cfg)
        raw, threads = cfg.model_dump(mode="json"), max(1, int(cpus))
        code = code_paths(cfg)  # where a user's own model/algorithm modules live, as the driver imports them
        # max_restarts=-1: Ray brings a lost actor back (same arguments, so the same state); the rounds
        # repeat the lost work on it (sim/engine/faults.py)
        # inside a Tune trial the actors belong to the trial's placement group, which already places them
        in_group = ray.util.get_current_placement_group() is not None
        spread = {"scheduling_strategy": "SPREAD"} if cfg.ray.placement == "spread" and not in_group else {}
        self._new_worker = lambda i: ClientWorkerActor.options(  # noqa: E731
            num_cpus=cpus, num_gpus=gpus, max_restarts=-1, **spread).remote(raw, i, threads, plan.dp, None, code)
        self._new_aggregator = lambda: AggregatorActor.options(max_restarts=-1).remote(  # noqa: E731
            cfg.algorithm.model_dump(), plan.n_params, plan.dp, cfg.seed, plan.secagg is not None,
            self.secrets.derive("aggregator"), code)
        self.workers = [self._new_worker(i) for i in range(cfg.ray.num_workers)]
        self.aggregator = self._new_aggregator()
        self.infos = ray.get([w.info.remote() for w in self.workers])  # fail fast if an actor cannot start
        self._pids = {i["worker"]: i["pid"] for i in self.infos}     # a new pid: Ray restarted that worker
        self._aggregator_pid = ray.get(self.aggregator.info.remote())["pid"]

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
        if self.consent is not None:          # the run's consenting panel stays; revocations are filtered at use
            plan = replace(plan, eval_ids=self.plan.eval_ids)
        self.release()
        self.plan = plan
        self._spawn()
        self.load_server_state(self._server_state)   # e.g. an adaptive server optimizer's moments

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
        sampled = draw_cohort(self.membership, round_index, self.plan.sampling)
        admitted = self.consent.admit(sampled) if self.consent else sampled
        # 'out' canaries never train; joiners only from the drift round on
        asked = admitted[~np.isin(admitted, np.concatenate([self.plan.excluded_canaries, self.plan.absent(round_index)]))]
        system = self.cfg.federation.system
        cohort = asked[online(self.membership, round_index, asked, system.availability)] if system.enabled else asked
        alive, dropped = apply_dropout(self.membership, round_index, cohort, self.cfg.federation.dropout)
        g_ref = ray.put(global_params)
        self.faults.begin_round()
        while True:
            try:
                if self.plan.secagg is None:
                    new, metrics = self._plain_round(round_index, g_ref, alive)
                else:
                    new, metrics = self._secure_round(round_index, g_ref, cohort, alive, global_params)
                if not self._stateful:
                    break
                state = self.server_state()    # read before the pid check: it is the state of that process
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
        metrics["not_consenting"] = len(sampled) - len(admitted)
        # who reported: not a lost or cancelled worker's clients (named), nor those past a deadline or quota (counted)
        out = np.isin(alive, metrics.pop("lost_clients", []))
        if out.any():
            metrics["lost_clients"] = int(out.sum())
        reported = len(alive) - int(out.sum()) - metrics.get("late_clients", 0) if not metrics.get("aborted") \
            else len(alive)
        metrics["offline"] = len(asked) - len(cohort)
        return RoundResult(new, reported, len(asked) - reported, time.perf_counter() - t0, metrics,
                           alive[~out].tolist(), dict(self.faults.counts))

    def _noise_keys(self, scope: int, cids) -> dict | None:
        """The keys of a round's clients for their local DP-SGD noise (None without local DP)."""
        return client_keys(self.secrets, scope, cids) if self.cfg.privacy.local_dp else None

    def _deadline(self) -> tuple[float | None, float | None]:
        """The round's deadline for starting a client, and the later cutoff past which a worker's
        message is no longer waited for (time.time(); None: no deadline). With simulated devices
        the deadline is in simulated seconds and nothing is cut off in real time."""
        fed = self.cfg.federation
        if fed.system.enabled:        # simulated devices: the deadline is in simulated seconds, kept by the workers
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
        shards = list(zip(parts, self._quotas(parts)))       # (clients, how many of them report)
        deadline, cutoff = self._deadline()

        def submit(w, shard):
            return w.train.options(num_returns=2).remote(round_index, g_ref, shard[0], quota=shard[1],
                                                         deadline=deadline, keys=self._noise_keys(round_index, shard[0]))

        trained = [submit(w, shard) for w, shard in zip(self.workers, shards)]
        if cutoff is not None:
            return self._by_deadline(round_index, g_ref, shards, trained, cutoff)
        try:
            # the aggregator starts as soon as the messages exist: no stop at the driver in between
            new, metrics = ray.get(self.aggregator.aggregate.remote(round_index, g_ref, *[m for m, _ in trained]))
        except Exception as e:
            if not lost_actor(e):
                raise
            # a worker (or the aggregator) was lost: repeat the lost shards, then aggregate again (a lost
            # aggregator fails this second call, and train_round heals it and repeats the round)
            trained = self._on_workers(round_index, shards, submit, started=trained)
            new, metrics = ray.get(self.aggregator.aggregate.remote(round_index, g_ref, *[m for m, _ in trained]))
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

    def _by_deadline(self, round_index: int, g_ref, shards: list, trained: list,
                     cutoff: float) -> tuple[np.ndarray, dict]:
        """A round with a deadline cannot wait for a retry: the workers stop starting clients at
        the deadline, and a shard not back by the cutoff (1.5x the deadline: a stuck worker), or
        whose worker is lost, is cancelled; its clients are dropouts."""
        messages = [m for m, _ in trained]
        ready, _ = ray.wait(messages, num_returns=len(messages), timeout=max(0.0, cutoff - time.time()),
                            fetch_local=False)
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
        new, metrics = ray.get(self.aggregator.aggregate.remote(round_index, g_ref, *[messages[i] for i in kept]))
        diags = ray.get([trained[i][1] for i in kept])
        self._note_restarts(round_index, diags)
        metrics.update(round_diagnostics(diags))
        metrics["lost_clients"] = out
        return new, metrics

    # ------------------------------------------------------------ buffered asynchronous aggregation
    def _fedbuff_step(self, step: int, global_params: np.ndarray) -> RoundResult:
        """One FedBuff server step (sim/engine/fedbuff.py): the next clients_per_round completions on the
        simulated clock, each trained from the model it started with, weighted by staleness; then
        as many new clients start from the new model. A run resumed from a checkpoint starts its
        in-flight clients afresh (the clock is not checkpointed)."""
        t0 = time.perf_counter()
        fed = self.cfg.federation
        self._step = step                          # who may start is decided as of this step
        if self._clock is None:                    # the first step (or a resume): fill the pipeline
            self._clock = BufferClock(self.membership, self.plan.num_clients, self._eligible)
            self._versions = {step: global_params}
            self._start_clients(fed.fedbuff.concurrency, step)
        before = self._clock.now
        self.faults.begin_round()
        arrived = self._clock.pop(fed.clients_per_round)
        versions = sorted({a.version for a in arrived})
        submit = lambda w, shard: w.train.options(num_returns=2).remote(  # noqa: E731
            shard[1], shard[2], shard[0], keys=self._noise_keys(shard[1], shard[0]))
        groups = []
        for v in versions:                         # one batch per model version, split over the workers
            ref = ray.put(self._versions[v])
            groups.append([(part, v, ref) for part in split_even(np.array([a.cid for a in arrived if a.version == v]),
                                                                   len(self.workers))])
        started = [[submit(w, shard) for w, shard in zip(self.workers, g)] for g in groups]
        trained = [t for g, s in zip(groups, started) for t in self._on_workers(step, g, submit, started=s)]
        tags = [shard[1] for g in groups for shard in g]
        weights = [staleness_weight(step - v, fed.fedbuff.staleness) for v in tags]
        g_ref, messages = ray.put(global_params), [m for m, _ in trained]
        while True:
            try:
                new, metrics = ray.get(self.aggregator.aggregate_buffered.remote(step, g_ref, tags, weights, *messages))
                if self._stateful:
                    self._server_state = self.server_state()
                break
            except Exception as e:
                if not lost_actor(e):
                    raise
                self._heal(step, e)               # the updates are still held: only the server step repeats
                self.faults.retried("rounds")
        diags = ray.get([d for _, d in trained])
        self._note_restarts(step, diags)
        metrics.update(round_diagnostics(diags))
        taus = [step - a.version for a in arrived]
        metrics.update(sim_round_s=self._clock.now - before, staleness_mean=float(np.mean(taus)),
                       staleness_max=int(max(taus)))
        self._versions[step + 1] = new             # the next clients start from the new model
        self._start_clients(len(arrived), step + 1)
        self._versions = {v: p for v, p in self._versions.items() if v in self._clock.versions_in_flight()}
        return RoundResult(new, len(arrived), 0, time.perf_counter() - t0, metrics, [a.cid for a in arrived],
                           dict(self.faults.counts))

    def _start_clients(self, n: int, version: int) -> None:
        cids = self._clock.draw(n)
        shards = split_even(np.array(cids), len(self.workers))
        seconds = ray.get(self._on_workers(version, shards, lambda w, s: w.device_seconds.remote(version, s)))
        self._clock.start([c for s in shards for c in s], [d for part in seconds for d in part], version)

    def _eligible(self, ids: np.ndarray) -> np.ndarray:
        """Clients that may start: consenting, not an audit canary that stays out, in the federation
        (a joiner from the drift round on), and online when asked (`federation.system.availability`,
        seeded by the draw)."""
        ids = self.consent.admit(ids) if self.consent else ids
        ids = ids[~np.isin(ids, np.concatenate([self.plan.excluded_canaries, self.plan.absent(self._step)]))]
        return ids[online(self.membership, self._clock.draws, ids, self.cfg.federation.system.availability)]

    def _note_restarts(self, round_index: int, diags) -> None:
        """A worker Ray restarted between two calls loses no work (the calls wait for it), but it
        was lost all the same: count it."""
        for d in diags:
            if d.pid and self._pids.get(d.worker, d.pid) != d.pid:
                self.faults.lost(round_index, f"worker {d.worker}", "restarted by Ray between two calls")
            self._pids[d.worker] = d.pid

    # ------------------------------------------------------------ lost actors
    def _on_workers(self, round_index: int, shards: list, submit: Callable, started: list | None = None) -> list:
        """`submit(worker, shard)` for every shard (one per worker; `started`: the refs of calls already
        submitted that way); returns each shard's refs, in shard order. A shard whose worker is lost
        is submitted again, to the restarted worker (or, when it does not come back, to another
        one): same shard, same result."""
        def as_tuple(refs):
            return tuple(refs) if isinstance(refs, (list, tuple)) else (refs,)

        started = started or [submit(w, s) for w, s in zip(self.workers, shards)]
        calls = {i: (w, as_tuple(refs)) for i, (w, refs) in enumerate(zip(self.workers, started))}
        done: dict[int, tuple] = {}
        while calls:
            last = {refs[-1]: i for i, (_, refs) in calls.items()}
            ready, _ = ray.wait(list(last), num_returns=1)
            i = last[ready[0]]
            worker, refs = calls.pop(i)
            try:
                ray.get(ready[0])
                done[i] = refs
            except LOST as e:
                self.faults.lost(round_index, f"worker {i}", e)
                self.faults.retried("shards")
                fresh = self._revive(worker, i)
                calls[i] = fresh, as_tuple(submit(fresh, shards[i]))
        return [done[i] if len(done[i]) > 1 else done[i][0] for i in range(len(shards))]

    def _revive(self, worker, slot: int):
        """The lost worker once Ray has restarted it; a fresh actor if it is gone for good; when
        neither answers within `ray.restart_timeout_s` (its node is gone and the cluster has no
        room), the pool goes on without it and another worker takes the shard."""
        until = time.monotonic() + self.cfg.ray.restart_timeout_s
        if worker not in self.workers:            # already dropped while retrying another shard
            return self._any_worker(slot)
        try:
            info = _answer(worker, until)
            self._pids[info["worker"]] = info["pid"]      # this loss is counted already
            return worker
        except RayActorError:                     # dead for good: a fresh actor in its place
            fresh = self._new_worker(slot)
            try:
                info = _answer(fresh, until)
                self._pids[info["worker"]] = info["pid"]
                self.workers[self.workers.index(worker)] = fresh
                return fresh
            except (RayActorError, GetTimeoutError):
                ray.kill(fresh)
        except GetTimeoutError:
            pass
        self.workers.remove(worker)
        ray.kill(worker)
        self.faults.counts["workers_dropped"] += 1
        return self._any_worker(slot)

    def _any_worker(self, slot: int):
        if not self.workers:
            raise RoundFailed("every worker actor was lost and none came back within ray.restart_timeout_s")
        return self.workers[slot % len(self.workers)]

    def _aggregator_restarted(self, timeout: float | None = None) -> bool:
        info = ray.get(self.aggregator.info.remote()) if timeout is None else \
            _answer(self.aggregator, time.monotonic() + timeout)
        return info["pid"] != self._aggregator_pid

    def _heal(self, round_index: int, err: BaseException | str) -> None:
        """After a loss somewhere in a round: find who was lost (restarted actors come back with a
        new process id), bring them back, and give a restarted aggregator the server state."""
        before = self.faults.this_round
        for slot, worker in enumerate(list(self.workers)):
            try:
                info = _answer(worker, time.monotonic() + self.cfg.ray.restart_timeout_s)
                if self._pids.get(info["worker"], info["pid"]) != info["pid"]:
                    self.faults.lost(round_index, f"worker {info['worker']}", err)
                self._pids[info["worker"]] = info["pid"]
            except (RayActorError, GetTimeoutError):
                self.faults.lost(round_index, f"worker {slot}", err)
                self._revive(worker, slot)
        self.infos = ray.get([w.info.remote() for w in self.workers])
        try:
            restarted = self._aggregator_restarted(self.cfg.ray.restart_timeout_s)
        except (RayActorError, GetTimeoutError):
            ray.kill(self.aggregator)
            self.aggregator, restarted = self._new_aggregator(), True
        if restarted:
            self.faults.lost(round_index, "aggregator", err)
            self.load_server_state(self._server_state)
        self._aggregator_pid = ray.get(self.aggregator.info.remote())["pid"]
        if self.faults.this_round == before:    # an object was lost though every actor answers: still a loss
            self.faults.lost(round_index, "object store", err)

    def _secure_round(self, round_index: int, g_ref, cohort: np.ndarray, alive: np.ndarray,
                      global_params: np.ndarray) -> tuple[np.ndarray, dict]:
        """The whole cohort takes part in key set-up; the clients that drop out do so after sharing
        their keys, before sending a masked input, so the server must recover their pairwise masks
        (the hard case). Too many dropouts for the threshold, or fewer survivors than the floor the
        graph is sized for, abort the round: nothing is released and the model stays. Either way
        the round reports the floor and the bits its k and t reach for this cohort's size."""
        live = set(alive.tolist())
        sized = secagg_round_facts(self.cfg, self.plan.secagg, len(cohort))
        diagnostics = []     # to the driver only

        quota_of = {}
        deadline, cutoff = self._deadline()

        def train(worker, shard, inbox):   # a client trains on the worker that holds its protocol state
            clients = [c for c in shard if c in live]
            msg, diag = worker.train.options(num_returns=2).remote(round_index, g_ref, clients, inbox,
                                                                   quota=quota_of.get(tuple(shard)), deadline=deadline,
                                                                   keys=self._noise_keys(round_index, clients))
            diagnostics.append(diag)
            return msg

        def placed(shards):       # the ring placement is known before training: split the quota by it
            quota_of.update({tuple(s): q for s, q in zip(shards, self._quotas(shards, live))})

        try:
            (new, metrics), lost = self._secure_sum(
                round_index, round_index, cohort.tolist(), self.plan.secagg, self.plan.n_params, "secagg-server",
                train, lambda summed: self.aggregator.apply_sum.remote(round_index, g_ref, summed), placed, cutoff)
        except RayTaskError as e:
            cause = e.as_instanceof_cause()
            if not isinstance(cause, SecAggRoundAborted):
                raise
            return global_params, {"skipped": True, "aborted": str(cause.args[0] if cause.args else cause), **sized}
        diags = _survivors(diagnostics)          # a lost worker's clients are dropouts: no diagnostics
        self._note_restarts(round_index, diags)
        return new, {**metrics, **round_diagnostics(diags), "lost_clients": lost, **sized}

    def _secure_sum(self, round_index: int, protocol_id: int, clients: list[int], params: SecAggParams, dim: int,
                    graph_stream: str, contribute: Callable, finish: Callable, placed: Callable | None = None,
                    cutoff: float | None = None):
        """One secure sum over `clients` (sim/engine/secure_round.py); `contribute(worker, shard, inbox)`
        submits a worker's masked message, `finish(summed)` the aggregator's call on the unmasked
        sum. Returns its result and the clients of the workers lost on the way or left behind at
        the deadline: they are dropouts of this sum (lost workers are brought back, or replaced,
        for the next one)."""
        lost = {}
        workers = list(self.workers)

        def on_lost(slot, err):
            self.faults.lost(round_index, f"worker {slot}", err)
            lost[slot] = workers[slot]

        run = SecureSumRun(self.aggregator, workers, protocol_id, clients, params, dim, graph_stream,
                           contribute, on_lost, placed, cutoff, keys=lambda shard: client_keys(self.secrets, protocol_id, shard))
        try:
            try:
                result = ray.get(finish(run.result))
            except Exception as e:
                if not lost_actor(e):
                    raise
                result = ray.get(finish(run.recover()))
            return result, sorted(int(c) for slot in [*lost, *run.late] for c in run.shards[slot])
        finally:
            for slot, worker in lost.items():
                self._revive(worker, slot)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, rounds_done: int, global_params: np.ndarray, export: bool = False,
                 weight: float | None = None) -> dict:
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
        started = [individuals(w, s) for w, s in zip(self.workers, shards)], \
            [general(w, p) for w, p in zip(self.workers, dg_parts)]
        parts = ray.get(self._on_workers(rounds_done, shards, individuals, started[0]))
        hits = np.concatenate(ray.get(self._on_workers(rounds_done, dg_parts, general, started[1])))
        # D_G is laid out one block per individual: accuracy per D_G individual (the fairness view)
        blocks = np.split(hits, np.cumsum(self.plan.global_sizes)[:-1])
        out = {"acc_DG": np.array([b.mean() if len(b) else np.nan for b in blocks]),
               "client_ids": [c for p in parts for c in p["client_ids"]]}
        for key in ("acc_global_DI", "acc_personalized_DI", *LOSS_KEYS, *(["personalized"] if export else [])):
            out[key] = np.concatenate([p[key] for p in parts]) if parts else np.zeros(0)   # none: nobody consents
        if self.cfg.privacy.mia_audit and parts:
            # members: the individuals' train splits (seen in training / fine-tuning); non-members: test splits
            out["mia_auc_global"] = mia_auc(out["loss_global_train"], out["loss_global_test"])
            out["mia_auc_personalized"] = mia_auc(out["loss_personalized_train"], out["loss_personalized_test"])
            out["mia_auc_DI"] = np.concatenate([p["mia_auc_DI"] for p in parts])
        return out

    def private_metric(self, rounds_done: int, global_params: np.ndarray, stat: str = "accuracy",
                       weight: float | None = None, noise: float | None = None) -> dict:
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
                self._heal(rounds_done, e)      # the aggregator was lost: heal and ask again

    def _private_metric(self, rounds_done: int, g_ref, stat: str, weight: float | None, noise: float | None) -> dict:
        ids = self.panel()
        shards, panel = split_even(ids, len(self.workers)), len(ids)
        if not panel:     # nobody (still) consents: an empty sum, under DP its noise alone
            empty = {**{k: 0.0 for k in METRIC_KEYS[stat]}, "count": 0}
            return ray.get(self.aggregator.aggregate_metric.remote(rounds_done, empty, noise=noise, panel=0))
        if self.plan.secagg is None:
            parts = self._on_workers(rounds_done, shards,
                                     lambda w, s: w.evaluate_sums.remote(g_ref, s, rounds_done, stat, weight))
            return ray.get(self.aggregator.aggregate_metric.remote(rounds_done, *parts, noise=noise, panel=panel))
        pid = METRIC_BASES[stat] + rounds_done

        def panel_values(worker, shard, inbox):
            # distributed DP: the panel's clients add the release's noise shares themselves
            return worker.secure_metric.remote(pid, g_ref, shard, inbox, rounds_done, stat, weight, noise,
                                               panel if self.plan.dp.enabled else None)

        metric, _ = self._secure_sum(rounds_done, pid, ids.tolist(), self.plan.metric_secagg(),
                                     len(METRIC_KEYS[stat]) + 1, "secagg-metric-server", panel_values,
                                     lambda summed: self.aggregator.metric_from_sum.remote(pid, summed, stat,
                                                                                            noise, panel))
        return metric

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


def _survivors(refs: list) -> list:
    """The values of `refs`, leaving out those of lost workers and of calls cancelled as late."""
    try:
        return ray.get(refs)
    except Exception:
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref))
            except TaskCancelledError:
                pass
            except Exception as e:
                if not lost_actor(e):
                    raise
        return out


def _answer(actor, until: float) -> dict:
    """The actor's `info()` once it answers. An actor Ray is restarting is only unavailable for
    now: ask again until `until` (time.monotonic()), then GetTimeoutError; RayActorError if it
    is dead for good."""
    while True:
        try:
            return ray.get(actor.info.remote(), timeout=max(0.1, until - time.monotonic()))
        except ActorUnavailableError:
            if time.monotonic() >= until:
                raise GetTimeoutError("the actor did not come back in time") from None
            time.sleep(0.5)
