"""Secure rounds of a federation: a round's cohort summed by SecAgg+ (sum_phases.py drives the
phases), with the survivor floor and the achieved bits logged per round; the same flow sums
the secure tuning metric.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import ray
from ray.exceptions import RayTaskError

from fedmeta.actors.aggregator import SecAggRoundAborted
from fedmeta.actors.messages import round_diagnostics
from fedmeta.actors.secagg.policy import secagg_round_facts
from fedmeta.actors.secagg.session import SecAggParams
from fedmeta.sim.engine.faults import lost_actor
from fedmeta.sim.engine.pool import survivors
from fedmeta.sim.engine.sum_phases import SecureSumRun
from fedmeta.sim.seeding import client_keys


class SecureRounds:
    """Mixed into Federation (federation.py): its secure rounds and secure metric sums."""

    def _secure_round(
        self, round_index: int, g_ref, cohort: np.ndarray, alive: np.ndarray, global_params: np.ndarray
    ) -> tuple[np.ndarray, dict]:
        """The whole cohort takes part in key set-up; the clients that drop out do so after sharing
        their keys, before sending a masked input, so the server must recover their pairwise masks
        (the hard case). Too many dropouts for the threshold, or fewer survivors than the floor the
        graph is sized for, abort the round: nothing is released and the model stays. Either way
        the round reports the floor and the bits its k and t reach for this cohort's size."""
        live = set(alive.tolist())
        sized = secagg_round_facts(self.cfg, self.plan.secagg, len(cohort))
        diagnostics = []  # to the driver only
        train, placed, cutoff = self._secure_training(round_index, g_ref, live, diagnostics)
        try:
            (new, metrics), lost = self._secure_sum(
                round_index,
                round_index,
                cohort.tolist(),
                self.plan.secagg,
                self.plan.n_params,
                "secagg-server",
                train,
                lambda summed: self.aggregator.apply_sum.remote(round_index, g_ref, summed),
                placed,
                cutoff,
            )
        except RayTaskError as e:
            cause = e.as_instanceof_cause()
            if not isinstance(cause, SecAggRoundAborted):
                raise
            return global_params, {
                "skipped": True,
                "aborted": str(cause.args[0] if cause.args else cause),
                **sized,
            }
        diags = survivors(diagnostics)  # a lost worker's clients are dropouts: no diagnostics
        self._note_restarts(round_index, diags)
        return new, {**metrics, **round_diagnostics(diags), "lost_clients": lost, **sized}

    def _secure_training(
        self, round_index: int, g_ref, live: set[int], diagnostics: list
    ) -> tuple[Callable, Callable, float | None]:
        """A secure round's `contribute` (a worker trains its shard's live clients; their diagnostics
        ref goes to `diagnostics`) and `placed` (the over-selection quota split by the ring
        placement) for `_secure_sum`, and the round's cutoff."""
        quota_of = {}
        deadline, cutoff = self._deadline()

        def train(worker, shard, inbox):  # a client trains on the worker that holds its protocol state
            clients = [c for c in shard if c in live]
            msg, diag = worker.train.options(num_returns=2).remote(
                round_index,
                g_ref,
                clients,
                inbox,
                quota=quota_of.get(tuple(shard)),
                deadline=deadline,
                keys=self._noise_keys(round_index, clients),
            )
            diagnostics.append(diag)
            return msg

        def placed(shards):  # the ring placement is known before training: split the quota by it
            quota_of.update({tuple(s): q for s, q in zip(shards, self._quotas(shards, live))})

        return train, placed, cutoff

    def _secure_sum(
        self,
        round_index: int,
        protocol_id: int,
        clients: list[int],
        params: SecAggParams,
        dim: int,
        graph_stream: str,
        contribute: Callable,
        finish: Callable,
        placed: Callable | None = None,
        cutoff: float | None = None,
    ):
        """One secure sum over `clients` (sim/engine/sum_phases.py); `contribute(worker, shard, inbox)`
        submits a worker's masked message, `finish(summed)` the aggregator's call on the unmasked
        sum. Returns its result and the clients of the workers lost on the way or left behind at
        the deadline: they are dropouts of this sum (lost workers are brought back, or replaced,
        for the next one)."""
        lost = {}
        workers = list(self.workers)

        def on_lost(slot, err):
            self.faults.lost(round_index, f"worker {slot}", err)
            lost[slot] = workers[slot]

        run = SecureSumRun(
            self.aggregator,
            workers,
            protocol_id,
            clients,
            params,
            dim,
            graph_stream,
            contribute,
            on_lost,
            placed,
            cutoff,
            keys=lambda shard: client_keys(self.secrets, protocol_id, shard),
        )
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
