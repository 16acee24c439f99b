"""Buffered asynchronous aggregation on the simulated clock (pure): FedBuff (Nguyen et al. 2022,
"Federated Learning with Buffered Asynchronous Aggregation", AISTATS).

`concurrency` clients are always training, each from the model version current when it started.
Their completions are events on the simulated clock (sim/system.py gives each client's duration);
the server takes a step every `buffer` completions, with each update weighted by its staleness
s(tau) = 1/sqrt(1 + tau), tau = the server steps taken since that client started; then each
finished client is replaced by a new one, drawn uniformly from the clients not in flight, which
starts from the new model. Who is drawn follows the run's secret streams (with
`run.seeded_secrets`, the seed: a run is then reproducible bit for bit).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(order=True)
class Arrival:
    finish: float  # simulated time the client's update reaches the server
    seq: int  # ties break by start order: deterministic
    cid: int = field(compare=False)
    version: int = field(compare=False)  # the server step whose model it trained from


def staleness_weight(tau: int, kind: str) -> float:
    """FedBuff's polynomial staleness weight (its Sec. 4); 'constant' switches it off."""
    return 1.0 / math.sqrt(1.0 + tau) if kind == "sqrt" else 1.0


class BufferClock:
    """The event queue of client completions."""

    def __init__(self, streams, population: int, eligible: Callable[[np.ndarray], np.ndarray] | None = None):
        # streams: the run's Secrets; who starts when is who takes part, so it is drawn in secret
        self.streams, self.population = streams, population
        self.eligible = eligible or (lambda ids: ids)  # e.g. consent, canaries left out
        self.now = 0.0
        self.queue: list[Arrival] = []
        self.in_flight: set[int] = set()
        self.started = 0  # clients started so far (each start has its own seq)
        self.draws = 0

    def draw(self, n: int) -> list[int]:
        """`n` eligible clients not in flight, uniformly at random (seeded by the draw's index)."""
        rng = self.streams.np_rng("fedbuff-draw", self.draws)
        self.draws += 1
        chosen: list[int] = []
        for _ in range(1000):
            ids = self.eligible(np.unique(rng.integers(0, self.population, size=2 * n + 8)))
            fresh = [
                int(c) for c in rng.permutation(ids) if int(c) not in self.in_flight and int(c) not in chosen
            ]
            chosen += fresh[: n - len(chosen)]
            if len(chosen) == n:
                return chosen
        raise ValueError(f"federation.fedbuff.concurrency: cannot find {n} eligible clients out of flight")

    def start(self, cids: list[int], durations: list[float], version: int) -> None:
        for c, d in zip(cids, durations):
            heapq.heappush(self.queue, Arrival(self.now + float(d), self.started, int(c), version))
            self.started += 1
            self.in_flight.add(int(c))

    def pop(self, k: int) -> list[Arrival]:
        """The next `k` completions; the clock moves to the last of them."""
        out = [heapq.heappop(self.queue) for _ in range(min(k, len(self.queue)))]
        if out:
            self.now = out[-1].finish
        self.in_flight -= {a.cid for a in out}
        return out

    def versions_in_flight(self) -> set[int]:
        return {a.version for a in self.queue}
