"""FEMNIST in LEAF's JSON format: real handwriting, one individual per writer.

Caldas et al., "LEAF: A Benchmark for Federated Settings" (2018) store each split as JSON files of the
form ``{"users": [...], "num_samples": [...], "user_data": {uid: {"x": [[784 floats], ...], "y": [...]}}}``.
LEAF's train/ and test/ folders hold different samples of the same writers; this loader merges a
writer's samples across every file and re-splits them with ``train_fraction``, so all sources share one
split rule. Writers are taken in sorted order: the last ``global_clients`` form D_G, the federation is
the first min(num_clients, remaining) of the rest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedmeta.sim.config import ConfigError, DataConfig
from fedmeta.sim.data.base import ClientData, FederatedDataset, check_cids, train_size
from fedmeta.sim.seeding import np_rng

KEY = "data.femnist.path"
SIDE = 28
PIXELS = SIDE * SIDE
LEAF_CLASSES = 62  # digits, upper- and lower-case letters


class FemnistDataset(FederatedDataset):
    def __init__(self, cfg: DataConfig, seed: int):
        users = load_leaf(cfg.femnist.path)  # uid -> (x (n, 784), y (n,))
        if len(users) <= cfg.global_clients:
            raise ConfigError(
                f"data.global_clients: {cfg.global_clients} users are held out for D_G, but "
                f"{cfg.femnist.path} has only {len(users)} users with samples; need at least "
                f"{cfg.global_clients + 1} to leave one for the federation"
            )
        uids = sorted(users)
        federation = uids[: len(uids) - cfg.global_clients][: cfg.num_clients]
        self.seed = seed
        self.train_fraction = cfg.train_fraction
        self.user_ids = federation  # cid -> LEAF user id
        self.global_user_ids = uids[len(uids) - cfg.global_clients :]
        self._users = [users[u] for u in federation]
        self._global_users = [users[u] for u in self.global_user_ids]
        self.num_clients = len(federation)
        max_label = max(int(y.max()) for _, y in users.values())
        self.num_classes = max(LEAF_CLASSES, max_label + 1)
        self.input_shape = (1, SIDE, SIDE)
        self._global: tuple[torch.Tensor, torch.Tensor] | None = None

    def clients(self, cids: Sequence[int]) -> list[ClientData]:
        return [self._client(cid) for cid in check_cids(cids, self.num_clients)]

    def global_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._global is None:
            x = np.concatenate([x for x, _ in self._global_users])
            y = np.concatenate([y for _, y in self._global_users])
            self._global = self._images(x), torch.from_numpy(y)
        return self._global

    def global_sizes(self) -> list[int]:
        return [len(y) for _, y in self._global_users]

    def _client(self, cid: int) -> ClientData:
        x, y = self._users[cid]
        perm = np_rng(self.seed, "femnist-split", cid).permutation(len(y))
        k = train_size(len(y), self.train_fraction)
        train, test = perm[:k], perm[k:]
        # fancy indexing copies, so every client owns its storage
        return ClientData(
            cid=cid,
            x_train=self._images(x[train]),
            y_train=torch.from_numpy(y[train]),
            x_test=self._images(x[test]),
            y_test=torch.from_numpy(y[test]),
        )

    def _images(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).view(-1, *self.input_shape)  # (n, 784) -> (n, 1, 28, 28)


def leaf_files(path: str | Path) -> list[Path]:
    """The JSON files named by path (a file, or a directory searched recursively), in sorted order."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{KEY}: no such file or directory: {p}")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*.json") if f.is_file())
    if not files:
        raise ConfigError(f"{KEY}: no LEAF JSON files under {p}")
    return files


def load_leaf(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every writer's samples merged across the files: uid -> (x (n, 784) float32, y (n,) int64).

    Files are read in sorted order, so a writer's samples are concatenated in a fixed order.
    Writers without samples are dropped.
    """
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for f in leaf_files(path):
        for uid, xy in _read_file(f).items():
            parts.setdefault(uid, []).append(xy)
    merged = {
        uid: (np.concatenate([x for x, _ in xs]), np.concatenate([y for _, y in xs]))
        for uid, xs in parts.items()
    }
    return {uid: xy for uid, xy in merged.items() if len(xy[1])}


def _read_file(f: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{KEY}: {f} is not valid JSON (line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{KEY}: cannot read {f}: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("user_data"), dict):
        raise ConfigError(f"{KEY}: {f} is not LEAF JSON (missing 'user_data')")
    return {str(uid): _user_arrays(f, str(uid), data) for uid, data in raw["user_data"].items()}


def _user_arrays(f: Path, uid: str, data: object) -> tuple[np.ndarray, np.ndarray]:
    """One writer's entry as (x (n, 784) float32, y (n,) int64), with errors naming file and writer."""
    where = f"{KEY}: {f}: user {uid!r}"
    if not isinstance(data, dict) or "x" not in data or "y" not in data:
        raise ConfigError(f"{where} is not LEAF JSON (needs 'x' and 'y')")
    try:
        x = np.asarray(data["x"], dtype=np.float32)
        y = np.asarray(data["y"], dtype=np.int64)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: 'x' must be a list of {PIXELS}-value images, 'y' a list of labels"
        ) from None
    if x.size == 0:
        x = x.reshape(0, PIXELS)  # a writer with no samples; dropped after merging
    if x.ndim != 2 or x.shape[1] != PIXELS:
        raise ConfigError(
            f"{where}: images have shape {x.shape[1:]}, expected {PIXELS} values ({SIDE}x{SIDE})"
        )
    if y.shape != (len(x),):
        raise ConfigError(f"{where}: {len(x)} images but {y.size} labels")
    if len(y) and y.min() < 0:
        raise ConfigError(f"{where}: labels must be non-negative, got {int(y.min())}")
    return x, y
