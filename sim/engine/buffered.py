"""Buffered asynchronous rounds (FedBuff, Nguyen et al. 2022) of a federation on the simulated
clock: the next clients_per_round completions make one server step (the maths: fedbuff.py).
"""

from __future__ import annotations

import time

import numpy as np
import ray

from fedmeta.actors.messages import round_diagnostics
from fedmeta.sim.engine.faults import lost_actor
from fedmeta.sim.engine.fedbuff import BufferClock, staleness_weight
from fedmeta.sim.engine.result import RoundResult
from fedmeta.sim.sampling import split_even
from fedmeta.sim.system import online


class BufferedRounds:
    """Mixed into Federation (federation.py): its FedBuff server steps."""

    # ------------------------------------------------------------ buffered asynchronous aggregation
    def _fedbuff_step(self, step: int, global_params: np.ndarray) -> RoundResult:
        """One FedBuff server step (sim/engine/fedbuff.py): the next clients_per_round completions on the
        simulated clock, each trained from the model it started with, weighted by staleness; then
        as many new clients start from the new model. A run resumed from a checkpoint starts its
        in-flight clients afresh (the clock is not checkpointed)."""
        t0 = time.perf_counter()
        fed = self.cfg.federation
        self._step = step  # who may start is decided as of this step
        if self._clock is None:  # the first step (or a resume): fill the pipeline
            self._clock = BufferClock(self.membership, self.plan.num_clients, self._eligible)
            self._versions = {step: global_params}
            self._start_clients(fed.fedbuff.concurrency, step)
        before = self._clock.now
        self.faults.begin_round()
        arrived = self._clock.pop(fed.clients_per_round)
        trained, tags = self._train_arrived(step, arrived)
        weights = [staleness_weight(step - v, fed.fedbuff.staleness) for v in tags]
        new, metrics = self._aggregate_buffered(step, global_params, tags, weights, trained)
        diags = ray.get([d for _, d in trained])
        self._note_restarts(step, diags)
        metrics.update(round_diagnostics(diags))
        taus = [step - a.version for a in arrived]
        metrics.update(
            sim_round_s=self._clock.now - before,
            staleness_mean=float(np.mean(taus)),
            staleness_max=int(max(taus)),
        )
        self._versions[step + 1] = new  # the next clients start from the new model
        self._start_clients(len(arrived), step + 1)
        self._versions = {v: p for v, p in self._versions.items() if v in self._clock.versions_in_flight()}
        return RoundResult(
            new,
            len(arrived),
            0,
            time.perf_counter() - t0,
            metrics,
            [a.cid for a in arrived],
            dict(self.faults.counts),
        )

    def _train_arrived(self, step: int, arrived: list) -> tuple[list, list[int]]:
        """The arrived clients' training, each from the model version it started with: the
        (message, diagnostics) refs of every shard, and each shard's version."""
        versions = sorted({a.version for a in arrived})
        submit = lambda w, shard: w.train.options(num_returns=2).remote(  # noqa: E731
            shard[1], shard[2], shard[0], keys=self._noise_keys(shard[1], shard[0])
        )
        groups = []
        for v in versions:  # one batch per model version, split over the workers
            ref = ray.put(self._versions[v])
            groups.append(
                [
                    (part, v, ref)
                    for part in split_even(
                        np.array([a.cid for a in arrived if a.version == v]), len(self.workers)
                    )
                ]
            )
        started = [[submit(w, shard) for w, shard in zip(self.workers, g)] for g in groups]
        trained = [t for g, s in zip(groups, started) for t in self._on_workers(step, g, submit, started=s)]
        tags = [shard[1] for g in groups for shard in g]
        return trained, tags

    def _aggregate_buffered(
        self, step: int, global_params: np.ndarray, tags: list[int], weights: list[float], trained: list
    ) -> tuple[np.ndarray, dict]:
        """The server step on the trained messages, repeated on a fresh aggregator if it is lost."""
        g_ref, messages = ray.put(global_params), [m for m, _ in trained]
        while True:
            try:
                new, metrics = ray.get(
                    self.aggregator.aggregate_buffered.remote(step, g_ref, tags, weights, *messages)
                )
                if self._stateful:
                    self._server_state = self.server_state()
                break
            except Exception as e:
                if not lost_actor(e):
                    raise
                self._heal(step, e)  # the updates are still held: only the server step repeats
                self.faults.retried("rounds")
        return new, metrics

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
