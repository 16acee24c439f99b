"""The federated-dataset interface every data source implements.

Following Schneider & Vlachos, "Personalization of Deep Learning" (Sec. II), a federation is a set S of
individuals I, each holding a dataset D_I split into a train and a test part, plus a general dataset D_G
from individuals outside the federation. Sources generate an individual's data on demand from
(experiment seed, client id), so a federation of any size costs memory only for the clients requested,
and any worker can regenerate any client in any order.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


# eq=False: a generated __eq__ would compare tensors and raise "ambiguous truth value"; identity is
# the only meaningful equality for a bundle of tensors.
@dataclass(frozen=True, eq=False)
class ClientData:
    """D_I of one individual, already split into train and test."""

    cid: int
    x_train: torch.Tensor  # (n_train, *input_shape) float32
    y_train: torch.Tensor  # (n_train,) int64
    x_test: torch.Tensor  # (n_test, *input_shape) float32; (0, *input_shape) when train_fraction == 1
    y_test: torch.Tensor  # (n_test,) int64


class FederatedDataset(ABC):
    """Individuals 0..num_clients-1 (the federation) plus D_G from individuals outside it."""

    num_clients: int
    num_classes: int
    input_shape: tuple[int, ...]
    global_clients: int  # individuals behind D_G

    @abstractmethod
    def clients(self, cids: Sequence[int]) -> list[ClientData]:
        """Data of the given individuals, in the given order; deterministic from (seed, cid)."""

    def client(self, cid: int) -> ClientData:
        return self.clients([cid])[0]

    @abstractmethod
    def global_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """D_G as (x, y); computed once and cached."""

    def global_sizes(self) -> list[int]:
        """Samples of each D_G individual, in the order `global_data()` lays them out (one block
        each), so accuracy on D_G can be reported per individual (mean/sd/min/max)."""
        n, k = len(self.global_data()[1]), self.global_clients
        return [n // k] * k

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_clients={self.num_clients}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape})"
        )


def check_cids(cids: Sequence[int], num_clients: int) -> list[int]:
    """Client ids as plain ints; an id outside 0..num_clients-1 is a ValueError naming it."""
    out = []
    for cid in cids:
        try:
            i = operator.index(cid)  # accepts numpy integers, rejects 1.0 and "1"
        except TypeError:
            raise TypeError(f"client id {cid!r} is not an integer") from None
        if not 0 <= i < num_clients:
            raise ValueError(f"client id {i} out of range: valid ids are 0..{num_clients - 1}")
        out.append(i)
    return out


def train_size(n: int, train_fraction: float) -> int:
    """Samples of an individual's n that go to training: round(n * train_fraction) within [1, n]."""
    return min(max(round(n * train_fraction), 1), n)


def split_order(keys: np.ndarray) -> np.ndarray:
    """The seeded train/test permutation of each row: argsort of uniform keys drawn from the client's stream.

    keys: (clients, n) uniforms. Sample perm[c, j] lands in slot j; the first n_train slots are train.
    """
    return np.argsort(keys, axis=-1, kind="stable")


def split_clients(cids: Sequence[int], x: torch.Tensor, y: torch.Tensor, n_train: int) -> list[ClientData]:
    """Cut batched samples, already in split order, into one ClientData per client.

    x: (clients, n, *input_shape), y: (clients, n). Each client gets its own storage (train and test
    are views of it): pickling one client's tensors to another process must not ship the whole batch.
    """
    xs = [t.clone() for t in x.unbind(0)]
    ys = [t.clone() for t in y.unbind(0)]
    return [
        ClientData(
            cid=cid, x_train=xi[:n_train], y_train=yi[:n_train], x_test=xi[n_train:], y_test=yi[n_train:]
        )
        for cid, xi, yi in zip(cids, xs, ys, strict=True)
    ]
