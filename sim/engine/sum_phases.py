"""The driver's side of one secure sum: four phases between the clients (hosted by the worker
actors) and the server (the aggregator actor), with Ray as the network.

Every phase is submitted at once, chained by object refs: no round trip through the driver
between phases. When a worker is lost mid-protocol, its clients' protocol state (their keys) is
lost with it, so they become what the protocol calls dropouts (Bonawitz et al. 2017, Sec. 4):
`recover` walks the phases in order, removes the lost worker from the phase it failed in and
every later one, and submits again only the steps that never ran (a step whose input failed is
not executed by Ray). The protocol then recovers the dropped clients' masks from the survivors'
shares, or aborts below the threshold (`SecAggRoundAborted`): the round completes or leaves the
model untouched, and no protocol round is ever run twice.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import ray

from fedmeta.actors.secagg.session import SecAggParams
from fedmeta.sim.engine.faults import lost_actor
from fedmeta.sim.sampling import split_even

MASKED = 2  # the phase in which clients send their masked inputs


class SecureSumRun:
    """One secure sum over `clients`. `contribute(worker, shard, inbox)` submits a worker's masked
    message; `on_lost(slot, err)` is told of each worker lost on the way, `placed(shards)` of the
    clients' placement on the workers before any is asked for anything; masked messages not in
    by `cutoff` (time.time(), a round's deadline) are left behind; `keys(shard)` gives the keys of
    a shard's clients for this protocol round (`fedmeta.sim.seeding.client_keys`), all a worker is told. `result` is a reference
    to the unmasked `SummedUpdates`; if waiting on it reports a lost actor, `recover()` gives the
    reference of the sum over the workers left (and raises if the aggregator itself was lost)."""

    def __init__(
        self,
        aggregator,
        workers: list,
        protocol_id: int,
        clients: list[int],
        params: SecAggParams,
        dim: int,
        graph_stream: str,
        contribute: Callable,
        on_lost: Callable,
        placed: Callable | None = None,
        cutoff: float | None = None,
        keys: Callable | None = None,
    ):
        self.agg, self.pid, self.on_lost = aggregator, protocol_id, on_lost
        self.late: list[int] = []  # slots whose masked message missed the cutoff
        # clients are placed on workers in contiguous stretches of the server's Harary ring, so most
        # neighbours share a worker, where their pair masks cancel in the worker's sum
        ring = np.array(
            ray.get(aggregator.secure_open.remote(protocol_id, clients, params, dim, graph_stream))
        )
        self.hosts = dict(enumerate(workers))  # slot -> worker still in this protocol
        self.shards = dict(enumerate(split_even(ring, len(workers))))
        if placed is not None:  # e.g. a round's quotas, which follow the placement
            placed(list(self.shards.values()))
        self.steps = [  # (client side of a phase given the server's last answer, server side)
            (
                lambda i, _: self.hosts[i].secure_advertise.remote(
                    protocol_id, self.shards[i], params, keys(self.shards[i]) if keys else None
                ),
                "secure_keys",
            ),
            (lambda i, keys: self.hosts[i].secure_share.remote(protocol_id, keys), "secure_route"),
            (lambda i, inbox: contribute(self.hosts[i], self.shards[i], inbox), "secure_collect"),
            (lambda i, request: self.hosts[i].secure_unmask.remote(protocol_id, request), "secure_unmask"),
        ]
        self.sent, server = [], None
        for phase, (client_side, server_side) in enumerate(self.steps):
            outs = {i: client_side(i, server) for i in self.hosts}
            if phase == MASKED and cutoff is not None:
                self._leave_late(outs, cutoff)
            server = getattr(aggregator, server_side).remote(protocol_id, *outs.values())
            self.sent.append((outs, server))
        self.result = server

    def _leave_late(self, outs: dict, cutoff: float) -> None:
        """A round with a deadline: masked messages not in by `cutoff` (time.time()) are cancelled;
        their workers' clients are dropouts, and the workers sit out the rest of the protocol."""
        refs = list(outs.values())
        ready, _ = ray.wait(
            refs, num_returns=len(refs), timeout=max(0.0, cutoff - time.time()), fetch_local=False
        )
        for i in [i for i, ref in outs.items() if ref not in ready]:
            ray.cancel(outs.pop(i))
            del self.hosts[i]
            self.late.append(i)

    def recover(self) -> ray.ObjectRef:
        """Phase by phase: a worker whose step failed is lost (with its clients); once one is,
        the server's step and every later step are submitted again without it."""
        server, changed = None, False
        for (client_side, server_side), (outs, sent_server) in zip(self.steps, self.sent):
            if changed:  # every later call waited on a server step that never ran
                outs = {i: client_side(i, server) for i in self.hosts}
            for i, ref in list(outs.items()):
                try:
                    ray.get(ref)
                except Exception as e:
                    if not lost_actor(e):
                        raise
                    self.on_lost(i, e)
                    del self.hosts[i], outs[i]
                    changed = True
            server = (
                getattr(self.agg, server_side).remote(self.pid, *outs.values()) if changed else sent_server
            )
            ray.get(server)  # a lost aggregator, or an abort below the threshold, ends the walk here
        self.result = server
        return server
