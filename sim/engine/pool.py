"""The actor pool under a federation: starting, releasing and killing its workers and aggregator,
running a call on every worker, and healing after a lost actor (Ray restarts the actor; the
round is retried on the survivors or fails without touching the model).
"""

from __future__ import annotations

import time
from typing import Callable

import ray
from ray.exceptions import (
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    TaskCancelledError,
)

from fedmeta.actors.aggregator import AggregatorActor
from fedmeta.actors.client_worker import ClientWorkerActor, peak_rss_mib
from fedmeta.sim.artifacts.usercode import code_paths
from fedmeta.sim.engine.cluster import worker_resources
from fedmeta.sim.engine.faults import LOST, RoundFailed, lost_actor


class WorkerPool:
    """Mixed into Federation (federation.py): its actors, and healing them."""

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
            num_cpus=cpus, num_gpus=gpus, max_restarts=-1, **spread
        ).remote(raw, i, threads, plan.dp, None, code)
        self._new_aggregator = lambda: AggregatorActor.options(max_restarts=-1).remote(  # noqa: E731
            cfg.algorithm.model_dump(),
            plan.n_params,
            plan.dp,
            cfg.seed,
            plan.secagg is not None,
            self.secrets.derive("aggregator"),
            code,
        )
        self.workers = [self._new_worker(i) for i in range(cfg.ray.num_workers)]
        self.aggregator = self._new_aggregator()
        self.infos = ray.get([w.info.remote() for w in self.workers])  # fail fast if an actor cannot start
        self._pids = {i["worker"]: i["pid"] for i in self.infos}  # a new pid: Ray restarted that worker
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

    # ------------------------------------------------------------ lost actors
    def _on_workers(
        self, round_index: int, shards: list, submit: Callable, started: list | None = None
    ) -> list:
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
        if worker not in self.workers:  # already dropped while retrying another shard
            return self._any_worker(slot)
        try:
            info = _answer(worker, until)
            self._pids[info["worker"]] = info["pid"]  # this loss is counted already
            return worker
        except RayActorError:  # dead for good: a fresh actor in its place
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
        info = (
            ray.get(self.aggregator.info.remote())
            if timeout is None
            else _answer(self.aggregator, time.monotonic() + timeout)
        )
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
        if self.faults.this_round == before:  # an object was lost though every actor answers: still a loss
            self.faults.lost(round_index, "object store", err)

    def _note_restarts(self, round_index: int, diags) -> None:
        """A worker Ray restarted between two calls loses no work (the calls wait for it), but it
        was lost all the same: count it."""
        for d in diags:
            if d.pid and self._pids.get(d.worker, d.pid) != d.pid:
                self.faults.lost(round_index, f"worker {d.worker}", "restarted by Ray between two calls")
            self._pids[d.worker] = d.pid

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


def survivors(refs: list) -> list:
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
