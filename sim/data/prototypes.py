"""Class prototypes plus Gaussian noise: cheap FEMNIST-shaped data for throughput benchmarks.

Each class c has a prototype image p_c ~ N(0, I) drawn once from (seed, "prototypes"); a sample of
class y is p_y + noise * eps with eps ~ N(0, I), and each individual draws uniform labels from its own
(seed, cid) stream. The task is easy on purpose: the point is exercising the simulator at FEMNIST's
shapes (62 classes, 1x28x28) without FEMNIST's download and parsing.

Speed: fresh Gaussian pixels would dominate generation (100 clients x 64 samples x 784 pixels), so eps
is the normalised sum of two rows of a seeded N(0, I) bank picked per sample. Each sample's eps is still
exactly N(0, I); two samples' noises are correlated only when they happen to pick a common row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedmeta.sim.config import DataConfig
from fedmeta.sim.data.base import ClientData, FederatedDataset, check_cids, split_order, train_size
from fedmeta.sim.seeding import np_rng

FED_STREAM, GLOBAL_STREAM = "prototypes-client", "prototypes-global-client"
BANK_VALUES = 1 << 22  # the noise bank holds about this many floats (16 MiB)...
BANK_ROWS = (256, 4096)  # ...within these row counts
SAMPLE_DRAWS = 4  # uniforms per sample: label, split key, two noise rows


class PrototypesDataset(FederatedDataset):
    def __init__(self, cfg: DataConfig, seed: int):
        p = cfg.prototypes
        self.seed = seed
        self.num_clients = cfg.num_clients
        self.num_classes = p.num_classes
        self.input_shape = tuple(p.input_shape)
        self.samples = cfg.samples_per_client
        self.n_train = train_size(cfg.samples_per_client, cfg.train_fraction)
        self.global_clients = cfg.global_clients
        size = math.prod(self.input_shape)
        prototypes = np_rng(seed, "prototypes").standard_normal((self.num_classes, size), dtype=np.float32)
        self.bank_rows = min(max(BANK_VALUES // size, BANK_ROWS[0]), BANK_ROWS[1])
        noise = np_rng(seed, "prototype-noise").standard_normal((self.bank_rows, size), dtype=np.float32)
        noise *= p.noise / math.sqrt(2.0)  # so that the sum of two rows is noise * N(0, I)
        # one table, so a sample is a single fused embedding_bag sum of 3 rows: prototype + 2 noise rows
        self.table = torch.from_numpy(np.concatenate([prototypes, noise]))  # (classes + rows, D)
        self._global: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def prototypes(self) -> torch.Tensor:
        """The class prototypes, (classes, *input_shape)."""
        return self.table[: self.num_classes].view(self.num_classes, *self.input_shape)

    def clients(self, cids: Sequence[int]) -> list[ClientData]:
        cids = check_cids(cids, self.num_clients)
        rows = self._draw(FED_STREAM, cids)  # (C, n, 3)
        k = self.n_train
        out = []
        for cid, r in zip(cids, rows.unbind(0), strict=True):
            # one embedding_bag per client: each client owns its storage, so pickling it ships no batch
            x = F.embedding_bag(r, self.table, mode="sum").view(-1, *self.input_shape)  # (n, *input_shape)
            y = r[:, 0].clone()  # the label is the prototype row
            out.append(ClientData(cid=cid, x_train=x[:k], y_train=y[:k], x_test=x[k:], y_test=y[k:]))
        return out

    def global_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._global is None:
            rows = self._draw(GLOBAL_STREAM, list(range(self.global_clients))).view(-1, 3)
            x = F.embedding_bag(rows, self.table, mode="sum")
            self._global = x.view(-1, *self.input_shape), rows[:, 0].clone()
        return self._global

    def _draw(self, stream: str, cids: list[int]) -> torch.Tensor:
        """Per sample, the 3 table rows it sums, (C, n, 3): its label first, then two noise rows.

        Samples come in train/test order.
        """
        n, c = self.samples, len(cids)
        draws = np.empty((c, SAMPLE_DRAWS, n))
        for i, cid in enumerate(cids):
            draws[i] = np_rng(self.seed, stream, cid).random((SAMPLE_DRAWS, n))
        draws = np.take_along_axis(draws, split_order(draws[:, 1])[:, None, :], axis=2)  # (C, 4, n)
        labels = np.minimum((draws[:, 0] * self.num_classes).astype(np.int64), self.num_classes - 1)  # (C, n)
        noise_rows = self.num_classes + np.minimum(
            (draws[:, 2:] * self.bank_rows).astype(np.int64), self.bank_rows - 1
        )  # (C, 2, n)
        rows = np.stack([labels, noise_rows[:, 0], noise_rows[:, 1]], axis=-1)  # (C, n, 3)
        return torch.from_numpy(rows)
