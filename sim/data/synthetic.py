"""Synthetic(alpha, beta): the heterogeneous logistic-regression federation of the FedProx paper.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in Heterogeneous Networks",
MLSys 2020, Sec. 5.1. For each device k:

    u_k ~ N(0, alpha),  B_k ~ N(0, beta)            (alpha, beta are variances)
    W_k ~ N(u_k, 1)  (classes, dim),  b_k ~ N(u_k, 1)  (classes,)
    v_k ~ N(B_k, 1)  (dim,)
    x ~ N(v_k, Sigma),  Sigma diagonal with Sigma_jj = j^-1.2  (j = 1..dim)
    y = argmax(W_k x + b_k)

alpha controls how much the devices' labelling models differ, beta how much their inputs differ.
Every device holds samples_per_client samples; D_G comes from devices outside the federation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedmeta.sim.config import DataConfig
from fedmeta.sim.data.base import (
    ClientData,
    FederatedDataset,
    check_cids,
    split_clients,
    split_order,
    train_size,
)
from fedmeta.sim.seeding import np_rng

FED_STREAM, GLOBAL_STREAM = "synthetic-device", "synthetic-global-device"
CHUNK = 256  # devices generated per batch, bounding the temporaries of huge requests


class SyntheticDataset(FederatedDataset):
    def __init__(self, cfg: DataConfig, seed: int):
        s = cfg.synthetic
        self.seed = seed
        self.num_clients = cfg.num_clients
        self.num_classes = s.num_classes
        self.input_shape = (s.dim,)
        self.alpha, self.beta = s.alpha, s.beta
        self.samples = cfg.samples_per_client
        self.n_train = train_size(cfg.samples_per_client, cfg.train_fraction)
        self.global_clients = cfg.global_clients
        self.feature_std = np.arange(1, s.dim + 1, dtype=np.float64) ** -0.6  # sqrt(Sigma_jj) = j^-0.6
        self._global: tuple[torch.Tensor, torch.Tensor] | None = None

    def clients(self, cids: Sequence[int]) -> list[ClientData]:
        cids = check_cids(cids, self.num_clients)
        out: list[ClientData] = []
        for lo in range(0, len(cids), CHUNK):
            chunk = cids[lo : lo + CHUNK]
            x, y = self._generate(FED_STREAM, chunk)
            out += split_clients(chunk, x, y, self.n_train)
        return out

    def global_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._global is None:
            devices = list(range(self.global_clients))
            parts = [
                self._generate(GLOBAL_STREAM, devices[lo : lo + CHUNK])
                for lo in range(0, len(devices), CHUNK)
            ]
            self._global = (
                torch.cat([x.flatten(0, 1) for x, _ in parts]),
                torch.cat([y.flatten() for _, y in parts]),
            )
        return self._global

    def _generate(self, stream: str, cids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x (C, n, dim) float32 and y (C, n) int64 of the devices, samples in train/test order."""
        n, d, k = self.samples, self.input_shape[0], self.num_classes
        c = len(cids)
        w = np.empty((c, k, d))
        b = np.empty((c, k))
        v = np.empty((c, d))
        z = np.empty((c, n, d))
        keys = np.empty((c, n))
        for i, cid in enumerate(cids):
            rng = np_rng(self.seed, stream, cid)
            # the device's model and feature centre come first, so they do not depend on n
            u_k, b_k = rng.normal(0.0, [np.sqrt(self.alpha), np.sqrt(self.beta)])
            w[i] = rng.normal(u_k, 1.0, (k, d))
            b[i] = rng.normal(u_k, 1.0, k)
            v[i] = rng.normal(b_k, 1.0, d)
            z[i] = rng.standard_normal((n, d))
            keys[i] = rng.random(n)
        # samples are i.i.d. given the device; the seeded permutation still decides train vs test
        z = np.take_along_axis(z, split_order(keys)[:, :, None], axis=1)
        x = v[:, None, :] + z * self.feature_std  # (C, n, dim)
        logits = np.einsum("cnd,ckd->cnk", x, w) + b[:, None, :]  # (C, n, classes)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(logits.argmax(-1))
