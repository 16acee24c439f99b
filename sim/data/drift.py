"""Drift scenarios: the same federation after its data changed, from a configured round on, or
new individuals joining it then.

`DriftedDataset` regenerates every individual from the same (seed, client id) streams under the
post-drift settings (writing styles of a new strength, a new Dirichlet label mix) and rotates the
images, so a drift is repeatable from the seed and individual i before and after the drift is the
same person whose data moved. D_G, the server's general data, does not drift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedmeta.sim.config import DataConfig
from fedmeta.sim.data.base import ClientData, FederatedDataset


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate images (n, c, h, w) about their centre, nearest pixel, zeros outside. Nearest, not
    bilinear: bilinear resampling blurs 8x8 digits, which makes them *easier* to reconstruct, so a
    rotated stream would look less anomalous to the drift detectors, not more (sim/detectors.py)."""
    if x.dim() != 4:
        raise ValueError(
            f"drift.rotation: needs image inputs (n, channels, h, w), got shape {tuple(x.shape)}"
        )
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def post_drift_config(cfg: DataConfig) -> DataConfig:
    d, w = cfg.drift, cfg.writers
    writers = w.model_copy(
        update={k: v for k, v in (("style_strength", d.style_strength), ("alpha", d.alpha)) if v is not None}
    )
    return cfg.model_copy(update={"writers": writers})


class DriftedDataset(FederatedDataset):
    def __init__(self, cfg: DataConfig, seed: int, base: FederatedDataset):
        from fedmeta.sim.data import build_dataset

        self.base, self.degrees = base, cfg.drift.rotation
        self.inner = build_dataset(post_drift_config(cfg), seed)
        self.num_clients, self.num_classes = self.inner.num_clients, self.inner.num_classes
        self.input_shape, self.global_clients = self.inner.input_shape, self.inner.global_clients

    def _turn(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.degrees) if self.degrees and len(x) else x

    def clients(self, cids: Sequence[int]) -> list[ClientData]:
        return [
            ClientData(c.cid, self._turn(c.x_train), c.y_train, self._turn(c.x_test), c.y_test)
            for c in self.inner.clients(cids)
        ]

    def global_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.global_data()

    def global_sizes(self) -> list[int]:
        return self.base.global_sizes()


def joiner_ids(num_clients: int, canaries: int, joiners: int) -> np.ndarray:
    """The individuals who join at `data.drift.at_round`: the last `joiners` ids before the audit's
    canaries (which are the last ids)."""
    return np.arange(num_clients - canaries - joiners, num_clients - canaries)


class JoinedDataset(FederatedDataset):
    """The federation with its newcomers (`data.drift.joiners`): they hold the drifted generator's
    data (new people, e.g. with writing styles of a new strength), everyone else keeps theirs.
    Who is in the federation in which round is the driver's business (FederationPlan.absent)."""

    def __init__(self, base: FederatedDataset, drifted: FederatedDataset, joiners: Sequence[int]):
        self.base, self.drifted, self.joiners = base, drifted, frozenset(int(c) for c in joiners)
        self.num_clients, self.num_classes = base.num_clients, base.num_classes
        self.input_shape, self.global_clients = base.input_shape, base.global_clients

    def clients(self, cids: Sequence[int]) -> list[ClientData]:
        new = [c for c in cids if c in self.joiners]
        old = [c for c in cids if c not in self.joiners]
        got = {
            **dict(zip(old, self.base.clients(old) if old else [])),
            **dict(zip(new, self.drifted.clients(new) if new else [])),
        }
        return [got[c] for c in cids]

    def global_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.global_data()

    def global_sizes(self) -> list[int]:
        return self.base.global_sizes()


def drift_data(cfg: DataConfig, seed: int, base: FederatedDataset, canaries: int) -> FederatedDataset | None:
    """What the drift scenario hands individuals (None without one): everyone's drifted data, or,
    with `drift.joiners`, the newcomers' own data beside everyone else's."""
    if cfg.drift.at_round is None:
        return None
    drifted = DriftedDataset(cfg, seed, base)
    if not cfg.drift.joiners:
        return drifted
    return JoinedDataset(base, drifted, joiner_ids(base.num_clients, canaries, cfg.drift.joiners))


def data_for_round(
    cfg: DataConfig, base: FederatedDataset, drifted: FederatedDataset | None, rnd: int
) -> FederatedDataset:
    """The data individuals hold in training round `rnd` (0-based). Joiners hold theirs from the
    start (they are simply not in the federation before the drift round)."""
    at = cfg.drift.at_round
    return drifted if drifted is not None and at is not None and (rnd >= at or cfg.drift.joiners) else base
