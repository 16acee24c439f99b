"""Your own federated data: a Parquet or CSV table with one row per sample.

With `data.table.client_column` each distinct value of that column is one individual; without it
the rows of a centralised table are cut into clients by `partition_rows` (label and quantity skew,
seeded). A seeded choice of `data.global_clients` individuals is held out as D_G (the server's
general data); the federation is up to `data.num_clients` of the rest, in the order of their ids.
Each individual's rows are split `train_fraction` / rest with a stream keyed by (seed, client id),
and features are standardised with the mean and sd of the federation's train rows only, so no
D_I test row, and no D_G row, shapes the training inputs.

The table is read and grouped once: the grouped, split and standardised arrays are written to a
cache folder (`FEDMETA_CACHE_DIR`, else `$XDG_CACHE_HOME/fedmeta` or `~/.cache/fedmeta`), keyed by
the file (path, size, modification time) and every setting that shapes them, and every process
(driver and workers) memory-maps them from there: a round reads only its cohort's rows, and the
workers of one machine share one copy in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedmeta.sim.config import ConfigError, DataConfig, TableConfig
from fedmeta.sim.data.base import ClientData, FederatedDataset, check_cids, train_size
from fedmeta.sim.seeding import np_rng

KEY = "data.table"
MIN_SAMPLES = 2  # one to train on, one to test on
CACHE_VERSION = 1  # bump when the cached layout changes

if TYPE_CHECKING:  # pandas is imported only when a table is read: every worker imports this module
    import pandas as pd


class TableDataset(FederatedDataset):
    def __init__(self, cfg: DataConfig, seed: int):
        arrays = cached_table(cfg, seed)
        meta = arrays["meta"]
        self.x, self.y = arrays["x"], arrays["y"]  # memory-mapped (rows, features), (rows,)
        self.offsets, self.n_train = arrays["offsets"], arrays["n_train"]
        self.num_clients = meta["num_clients"]
        self.global_clients = meta["global_clients"]
        self.num_classes = meta["num_classes"]
        self.input_shape = tuple(meta["input_shape"])
        self.client_names = meta["client_names"]  # cid -> the table's id (D_G last)
        self.classes = meta["classes"]  # label -> the table's class value
        self._global: tuple[torch.Tensor, torch.Tensor] | None = None

    def clients(self, cids: Sequence[int]) -> list[ClientData]:
        return [self._client(cid) for cid in check_cids(cids, self.num_clients)]

    def _client(self, cid: int) -> ClientData:
        start, end, k = int(self.offsets[cid]), int(self.offsets[cid + 1]), int(self.n_train[cid])
        x, y = self._rows(start, end)  # rows are stored train first, then test
        return ClientData(cid=cid, x_train=x[:k], y_train=y[:k], x_test=x[k:], y_test=y[k:])

    def _rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        # np.array copies out of the read-only map: every client owns its storage
        x = torch.from_numpy(np.array(self.x[start:end])).view(-1, *self.input_shape)
        return x, torch.from_numpy(np.array(self.y[start:end]))

    def global_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._global is None:
            self._global = self._rows(int(self.offsets[self.num_clients]), int(self.offsets[-1]))
        return self._global

    def global_sizes(self) -> list[int]:
        return np.diff(self.offsets[self.num_clients :]).tolist()


# ---------------------------------------------------------------- reading and checking the table
def read_table(path: str | Path) -> pd.DataFrame:
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{KEY}.path: no such file: {p}")
    suffixes = "".join(p.suffixes[-2:]).lower()
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if suffixes.endswith((".csv", ".csv.gz", ".csv.zip", ".csv.bz2", ".csv.xz")):
            return pd.read_csv(p)
    except Exception as e:  # pyarrow and pandas raise many types for a corrupt file
        raise ConfigError(
            f"{KEY}.path: cannot read {p} ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    raise ConfigError(f"{KEY}.path: {p} is neither Parquet (.parquet, .pq) nor CSV (.csv, .csv.gz)")


def _column(df: pd.DataFrame, name: str, key: str) -> pd.Series:
    if name not in df.columns:
        shown = ", ".join(map(str, df.columns[:12])) + (", ..." if len(df.columns) > 12 else "")
        raise ConfigError(f"{KEY}.{key}: no column {name!r} in the table (columns: {shown})")
    col = df[name]
    if col.isna().any():
        raise ConfigError(f"{KEY}.{key}: column {name!r} has {int(col.isna().sum())} missing values")
    return col


def features(df: pd.DataFrame, tc: TableConfig) -> tuple[np.ndarray, list[str]]:
    """(rows, features) float32 and the feature column names; every named column must be numeric."""
    taken = {tc.label_column, tc.client_column}
    names = tc.feature_columns or [c for c in df.columns if c not in taken and _numeric(df[c])]
    if not names:
        raise ConfigError(
            f"{KEY}.feature_columns: the table has no numeric column besides the label and client"
        )
    for name in names:
        col = _column(df, name, "feature_columns")
        if not _numeric(col):
            raise ConfigError(f"{KEY}.feature_columns: column {name!r} is not numeric (dtype {col.dtype})")
        if name in taken:
            raise ConfigError(f"{KEY}.feature_columns: {name!r} is the label or client column")
    x = df[names].to_numpy(dtype=np.float32)
    if not np.isfinite(x).all():
        bad = names[int(np.flatnonzero(~np.isfinite(x).all(axis=0))[0])]
        raise ConfigError(f"{KEY}.feature_columns: column {bad!r} has infinite values")
    return x, list(names)


def _numeric(col: pd.Series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_complex_dtype(col)


def labels(df: pd.DataFrame, tc: TableConfig) -> tuple[np.ndarray, list]:
    """Class indices (rows,) int64 and the class values: non-negative integer labels keep their
    values (so class 3 stays 3); any other labels are numbered in sorted order."""
    import pandas as pd

    col = _column(df, tc.label_column, "label_column")
    values = col.to_numpy()
    if pd.api.types.is_integer_dtype(col) and values.min() >= 0:
        y = values.astype(np.int64)
        classes = list(range(int(y.max()) + 1))
    else:
        codes, uniques = pd.factorize(col, sort=True)
        y, classes = codes.astype(np.int64), uniques.tolist()
    if len(np.unique(y)) < 2:
        raise ConfigError(
            f"{KEY}.label_column: column {tc.label_column!r} holds a single class; need at least 2"
        )
    return y, [c.item() if hasattr(c, "item") else c for c in classes]


# ---------------------------------------------------------------- partitioning a centralised table
def shares_to_counts(shares: np.ndarray, n: int) -> np.ndarray:
    """Integer counts summing to n in the given shares (largest remainder)."""
    raw = shares / shares.sum() * n
    counts = np.floor(raw).astype(np.int64)
    counts[np.argsort(counts - raw, kind="stable")[: n - counts.sum()]] += 1
    return counts


def partition_rows(
    y: np.ndarray,
    n_clients: int,
    alpha: float | None,
    size_alpha: float | None,
    rng: np.random.Generator,
    min_size: int = MIN_SAMPLES,
) -> np.ndarray:
    """The client (0..n_clients-1) of every row. Each client first gets `min_size` random rows, so
    no client is too small to split; the remaining rows follow the skews: client sizes in
    Dirichlet(size_alpha) shares (quantity skew; equal without it), and with `alpha` each class's
    rows are split in Dirichlet(alpha) shares weighted by those sizes (label skew, as Hsu, Qi &
    Brown 2019 and NIID-Bench draw it); without `alpha` rows are dealt at random."""
    n = len(y)
    if n < min_size * n_clients:
        raise ValueError(f"{n} rows cannot give {n_clients} clients {min_size} samples each")
    order = rng.permutation(n)
    owner = np.empty(n, dtype=np.int64)
    reserved, rest = order[: min_size * n_clients], order[min_size * n_clients :]
    owner[reserved] = np.repeat(np.arange(n_clients), min_size)
    size = (
        rng.dirichlet(np.full(n_clients, size_alpha)) if size_alpha else np.full(n_clients, 1.0 / n_clients)
    )
    if alpha is None:
        owner[rest] = np.repeat(np.arange(n_clients), shares_to_counts(size, len(rest)))
        return owner
    for k in np.unique(y[rest]):
        rows = rest[y[rest] == k]  # already in random order
        label = rng.dirichlet(np.full(n_clients, alpha))
        share = label * size
        if not share.sum() > 0:  # tiny alphas: every product of the two draws can underflow to 0
            share = label
        owner[rows] = np.repeat(np.arange(n_clients), shares_to_counts(share, len(rows)))
    return owner


# ---------------------------------------------------------------- grouping, splitting, standardising
def build_arrays(cfg: DataConfig, seed: int) -> dict:
    """The table grouped by client (federation first, in id order, then D_G), each federation
    client's rows in split order (train first), standardised; plus what describes them."""
    tc = cfg.table
    df = read_table(tc.path)
    x, names = features(df, tc)
    y, classes = labels(df, tc)
    input_shape = _input_shape(tc, x.shape[1])
    owner, client_names, n_all = _owners(df, cfg, y, seed)
    if n_all <= cfg.global_clients:
        raise ConfigError(
            f"data.global_clients: {cfg.global_clients} individuals are held out for D_G, but the "
            f"table has only {n_all}; need at least {cfg.global_clients + 1}"
        )
    held_out = np.sort(np_rng(seed, "table-global-clients").choice(n_all, cfg.global_clients, replace=False))
    federation = np.setdiff1d(np.arange(n_all), held_out)[: cfg.num_clients]
    clients = np.concatenate([federation, held_out])  # new id -> old id
    rows, n_train = _client_rows(cfg, seed, owner, n_all, clients, len(federation))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    order = np.concatenate(rows)
    x, y = x[order], y[order]
    x, mean, sd = _standardized(x, offsets, n_train, len(federation), tc.standardize)
    meta = {
        "num_clients": len(federation),
        "global_clients": cfg.global_clients,
        "num_classes": len(classes),
        "input_shape": input_shape,
        "client_names": [client_names[i] for i in clients],
        "classes": classes,
        "feature_columns": names,
        "mean": mean.tolist(),
        "sd": sd.tolist(),
    }
    return {
        "x": x.astype(np.float32),
        "y": y,
        "offsets": offsets,
        "n_train": np.asarray(n_train, np.int64),
        "meta": meta,
    }


def _owners(df: pd.DataFrame, cfg: DataConfig, y: np.ndarray, seed: int) -> tuple[np.ndarray, list, int]:
    """Each row's individual (0..n_all-1), the individuals' names and n_all: the distinct values of
    `client_column` in sorted order, or without it the rows cut into num_clients + global_clients
    clients by `partition_rows`."""
    import pandas as pd

    tc = cfg.table
    if tc.client_column is not None:
        col = _column(df, tc.client_column, "client_column")
        owner, ids = pd.factorize(col, sort=True)
        client_names = [c.item() if hasattr(c, "item") else c for c in ids.tolist()]
        counts = np.bincount(owner, minlength=len(ids))
        if counts.min() < MIN_SAMPLES:
            small = int(np.argmin(counts))
            raise ConfigError(
                f"{KEY}.client_column: client {client_names[small]!r} has {counts[small]} sample(s); "
                f"every client needs at least {MIN_SAMPLES} (one to train, one to test)"
            )
        n_all = len(ids)
    else:
        n_all = cfg.num_clients + cfg.global_clients
        try:
            owner = partition_rows(
                y, n_all, tc.partition.alpha, tc.partition.size_alpha, np_rng(seed, "table-partition")
            )
        except ValueError as e:
            raise ConfigError(f"data.num_clients: {e} (num_clients + global_clients = {n_all})") from None
        client_names = list(range(n_all))
    return owner, client_names, n_all


def _client_rows(
    cfg: DataConfig, seed: int, owner: np.ndarray, n_all: int, clients: np.ndarray, n_federation: int
) -> tuple[list[np.ndarray], list[int]]:
    """The table's rows of each client in new id order (a federation client's in a seeded split
    order, train first) and each federation client's number of train rows."""
    by_client = np.argsort(owner, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n_all))])
    rows, n_train = [], []
    for cid, old in enumerate(clients):
        mine = by_client[starts[old] : starts[old + 1]]
        if cid < n_federation:
            mine = mine[np_rng(seed, "table-split", cid).permutation(len(mine))]
            n_train.append(train_size(len(mine), cfg.train_fraction))
        rows.append(mine)
    return rows, n_train


def _standardized(
    x: np.ndarray, offsets: np.ndarray, n_train: list[int], n_federation: int, standardize: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x standardised with the mean and sd of the federation's train rows (unchanged without
    `standardize`), and that mean and sd (0 and 1 without it)."""
    mean, sd = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    if standardize:
        train = np.concatenate([np.arange(offsets[c], offsets[c] + n_train[c]) for c in range(n_federation)])
        mean, sd = x[train].mean(axis=0), x[train].std(axis=0)
        sd[sd == 0] = 1.0  # a constant feature stays constant (0) instead of dividing by 0
        x = (x - mean) / sd
    return x, mean, sd


def _input_shape(tc: TableConfig, n_features: int) -> list[int]:
    if tc.input_shape is None:
        return [n_features]
    if int(np.prod(tc.input_shape)) != n_features:
        raise ConfigError(
            f"{KEY}.input_shape: {tc.input_shape} holds {int(np.prod(tc.input_shape))} values but "
            f"there are {n_features} feature columns"
        )
    return list(tc.input_shape)


# ---------------------------------------------------------------- the cache every process maps
ARRAYS = ("x", "y", "offsets", "n_train")


def cache_root() -> Path:
    if os.environ.get("FEDMETA_CACHE_DIR"):
        return Path(os.environ["FEDMETA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedmeta"


def cache_key(cfg: DataConfig, seed: int) -> str:
    p = Path(cfg.table.path).resolve()
    st = p.stat() if p.is_file() else None
    ident = {
        "version": CACHE_VERSION,
        "path": str(p),
        "size": st and st.st_size,
        "mtime": st and st.st_mtime_ns,
        "table": cfg.table.model_dump(mode="json", exclude={"path"}),
        "seed": seed,
        "num_clients": cfg.num_clients,
        "global_clients": cfg.global_clients,
        "train_fraction": cfg.train_fraction,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def cached_table(cfg: DataConfig, seed: int) -> dict:
    """The arrays of `build_arrays`, memory-mapped from the cache (built on the first call). When
    the cache folder cannot be written the arrays stay in this process's memory."""
    if not Path(cfg.table.path).is_file():
        raise ConfigError(f"{KEY}.path: no such file: {cfg.table.path}")
    folder = cache_root() / "tables" / cache_key(cfg, seed)
    if not (folder / "meta.json").is_file():
        arrays = build_arrays(cfg, seed)
        try:
            _write(folder, arrays)
        except OSError:
            return arrays
    out = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    out["meta"] = json.loads((folder / "meta.json").read_text())
    return out


def _write(folder: Path, arrays: dict) -> None:
    """Write to a temporary folder, then rename it into place: a reader never sees a partial cache,
    and of two processes building it at once one rename wins and the other's copy is dropped."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", arrays[name])
        (tmp / "meta.json").write_text(json.dumps(arrays["meta"]))  # last: its presence marks a full cache
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "meta.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
