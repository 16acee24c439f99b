"""Shaping: curriculum schedules that change how often an individual's data is seen.

Schneider & Vlachos, "Personalization of Deep Learning" (Sec. III-A to III-C, Algorithm 1):
  ES(n)    early shaping: n batches from D_I, then train on D_G;
  SW(n_I)  sample weighing: epochs of ceil(|D_G| / batch) iterations where every n_I-th batch comes
           from D_I (n_I >= 1), or all but every (1/n_I)-th batch (n_I < 1);
  TL(n)    transfer learning: train on D_G, then n batches from D_I (optionally only the last layers);
and the paper's baseline: train on D_G united with ANOTHER individual's data D_I' (so the baseline
sees as many distinct samples as the shaping methods but none of the evaluated individual's).

Federated reading: D_G lives on the server and D_I on the individual's device, so a D_G batch is a
server step and a D_I batch a device step; only the model moves between them, never data. A `Plan`
records which side runs each step; `transfers` counts the model handovers it needs.

Every plan indexes the concatenation [D_G | D_I'] of one individual (D_G first), so all plans of a
cohort of individuals train together in `train_vmap` with one step function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedmeta.sim.algorithms.base import SGDClient
from fedmeta.sim.algorithms.local import batch_schedule
from fedmeta.sim.config import AlgorithmConfig

SERVER, DEVICE = "G", "I"


@dataclass(frozen=True)
class Plan:
    """One individual's training run: batches (indices into [D_G | D_I']) and where each runs."""

    batches: list[np.ndarray]
    sources: str  # one character per batch: "G" (server) or "I" (device)

    @property
    def transfers(self) -> int:
        """Model handovers between server and device (a run that starts on the device counts one)."""
        changes = sum(a != b for a, b in zip(self.sources, self.sources[1:]))
        return changes + (1 if self.sources[:1] == DEVICE else 0)


def _batches(
    n: int, count: int, batch_size: int, gen: np.random.Generator, offset: int = 0
) -> list[np.ndarray]:
    """`count` batches over n samples in reshuffled passes, shifted by `offset` into [D_G | D_I']."""
    if count <= 0:
        return []
    return [b + offset for b in batch_schedule(n, batch_size, gen, steps=count)]


def baseline(n_g: int, n_other: int, batch_size: int, epochs: int, gen: np.random.Generator) -> Plan:
    """Uniform epochs over D_G united with another individual's data (all pooled at the server)."""
    batches = batch_schedule(n_g + n_other, batch_size, gen, epochs=epochs)
    return Plan(batches, SERVER * len(batches))


def early_shaping(n: int, n_g: int, n_i: int, batch_size: int, epochs: int, gen: np.random.Generator) -> Plan:
    """ES(n): n batches from D_I first (on the device), then `epochs` over D_G (on the server)."""
    first = _batches(n_i, n, batch_size, gen, offset=n_g)
    rest = batch_schedule(n_g, batch_size, gen, epochs=epochs)
    return Plan(first + rest, DEVICE * len(first) + SERVER * len(rest))


def weighed_sources(n_period: float, iterations: int) -> str:
    """Algorithm 1, line 5: iteration j (1-based) takes D_I if (j mod n_I = 0 and n_I >= 1) or
    (j mod 1/n_I != 0 and n_I < 1)."""
    if n_period <= 0:
        raise ValueError(f"sample weighing periodicity n_I must be > 0, got {n_period}")
    if n_period >= 1:
        period = round(n_period)
        return "".join(DEVICE if j % period == 0 else SERVER for j in range(1, iterations + 1))
    inverse = round(1 / n_period)
    return "".join(DEVICE if j % inverse != 0 else SERVER for j in range(1, iterations + 1))


def sample_weighing(
    n_period: float, n_g: int, n_i: int, batch_size: int, epochs: int, gen: np.random.Generator
) -> Plan:
    """SW(n_I): `epochs` of ceil(|D_G| / batch) iterations, D_I batches interleaved per n_I. Each
    stream is its own sequence of reshuffled passes, so D_G is only partly covered per epoch when
    D_I takes iterations (as in the paper)."""
    sources = weighed_sources(n_period, epochs * math.ceil(n_g / batch_size))
    g_stream = iter(_batches(n_g, sources.count(SERVER), batch_size, gen))
    i_stream = iter(_batches(n_i, sources.count(DEVICE), batch_size, gen, offset=n_g))
    return Plan([next(i_stream) if s == DEVICE else next(g_stream) for s in sources], sources)


def transfer(n: int, n_g: int, n_i: int, batch_size: int, gen: np.random.Generator) -> Plan:
    """TL(n), the individual's part: n batches from D_I, run from the model trained on D_G."""
    batches = _batches(n_i, n, batch_size, gen, offset=n_g)
    return Plan(batches, DEVICE * len(batches))


def last_layer_names(names: list[str], k: int) -> set[str]:
    """Parameter names of the last k layers (a layer = a weight and its bias, e.g. '4.weight' and
    '4.bias' of an nn.Sequential): what TL adapts when it is limited to the last layers."""
    layers: list[str] = []
    for name in names:
        layer = name.rsplit(".", 1)[0]
        if layer not in layers:
            layers.append(layer)
    if not 1 <= k <= len(layers):
        raise ValueError(f"last_layers: must be in 1..{len(layers)} for this model, got {k}")
    keep = set(layers[-k:])
    return {n for n in names if n.rsplit(".", 1)[0] in keep}


class PartialSGD(SGDClient):
    """SGD that moves only the parameters named in `trainable` (TL limited to the last layers)."""

    def __init__(self, cfg: AlgorithmConfig, trainable: set[str]):
        super().__init__(cfg)
        self.trainable = trainable

    def step(self, ops, params, batches):
        ((x, y, m),) = batches
        g, loss = ops.grad(params, x, y, m)
        g = {k: v if k in self.trainable else torch.zeros_like(v) for k, v in g.items()}
        return ops.descend(params, g, self.lr), loss
