"""Generated federations materialised once into memory-mapped files that every process shares.

The generated sources (writers, synthetic, prototypes) regenerate a client's data from (seed, client
id) on every request, so every worker re-renders its whole cohort every round. When the federation
is small enough (`data.cache_max_mb`), the first process that builds the dataset (usually the
driver) generates every federation client once into a cache folder (`FEDMETA_CACHE_DIR`, else
`$XDG_CACHE_HOME/fedmeta` or `~/.cache/fedmeta`, under `clients/`), and every process, that one
included, then serves `clients(cids)` as zero-copy views of the maps: the workers of one machine
share one copy in the page cache, and a round reads only its cohort's pages.

The cached data is the source's own output, copied bit for bit; everything else (D_G, styles,
prototypes, ...) still comes from the source object. The folder's name is a hash of what shapes the
data: the data config (less `drift`, which DriftedDataset applies on top), the seed, CACHE_VERSION,
the numpy and torch versions, and the source code of the generating modules, so an edit to a
generator never serves a stale cache. Folders appear by an atomic rename of a finished build, a
file lock lets one process build while the others wait and then map, and a folder that fails its
checks (a missing or truncated file) is replaced. A cache folder that cannot be written means the
data is generated on demand, as without the cache, after one warning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fedmeta.sim.config import DataConfig
from fedmeta.sim.data.base import ClientData, FederatedDataset, check_cids
from fedmeta.sim.data.tabular import cache_root

try:  # advisory locks: POSIX only; elsewhere racing builders still end correct
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CACHE_VERSION = 1  # bump when the cached layout changes
CHUNK_BYTES = 64 << 20  # a build generates this much at a time...
MAX_CHUNK = 1024  # ...and at most this many clients
ARRAYS = ("x", "y", "offsets", "n_train")
# modules besides the source's own whose code shapes every generated client
SHARED_CODE = ("fedmeta.sim.data.base", "fedmeta.sim.seeding")
Generate = Callable[[Sequence[int]], list[ClientData]]


class CacheError(Exception):
    """The source produced something the cache layout cannot hold; the data stays uncached."""


class CachedClients(FederatedDataset):
    """Mixin before a generated source's class (`class CachedWriters(CachedClients, WritersDataset)`):
    the object is the source in every respect (attributes, methods, isinstance), except that
    `clients` reads the shared cache when there is one."""

    def __init__(self, cfg: DataConfig, seed: int):
        super().__init__(cfg, seed)  # the source's own constructor (next in the MRO)
        self._arrays = open_cache(cfg, seed, self._source(), super().clients, self)

    def _source(self) -> type:
        mro = type(self).__mro__
        return mro[mro.index(CachedClients) + 1]

    @property
    def cached(self) -> bool:
        """Whether clients() reads the memory-mapped cache (False: generated on demand)."""
        return self._arrays is not None

    def clients(self, cids: Sequence[int]) -> list[ClientData]:
        if self._arrays is None:
            return super().clients(cids)
        return self._arrays.clients(check_cids(cids, self.num_clients))

    def __getstate__(self) -> dict:
        # the maps travel as their folder: pickling the arrays would copy the whole federation
        state = dict(self.__dict__)
        arrays = state.pop("_arrays")
        state["_cache_folder"] = arrays and str(arrays.folder)
        return state

    def __setstate__(self, state: dict) -> None:
        folder = state.pop("_cache_folder")
        self.__dict__.update(state)
        try:
            self._arrays = _try_load(Path(folder), None) if folder else None
        except OSError:  # unpickled where the folder cannot be read: generate
            self._arrays = None


class ClientArrays:
    """The mapped arrays of one cache folder: every client's samples laid end to end, each in the
    source's split order (train first), with its start in `offsets` and its train count in `n_train`."""

    def __init__(self, folder: Path, x: np.ndarray, y: np.ndarray, offsets: np.ndarray, n_train: np.ndarray):
        self.folder = folder
        self.x, self.y = x, y
        # plain ints: numpy scalars would cost more than the views themselves in clients()
        self.offsets, self.n_train = offsets.tolist(), n_train.tolist()

    def clients(self, cids: list[int]) -> list[ClientData]:
        out = []
        for cid in cids:
            start, end, k = self.offsets[cid], self.offsets[cid + 1], self.n_train[cid]
            # views of the copy-on-write map: the tensors' storage is this client's rows only
            x, y = torch.from_numpy(self.x[start:end]), torch.from_numpy(self.y[start:end])
            out.append(ClientData(cid=cid, x_train=x[:k], y_train=y[:k], x_test=x[k:], y_test=y[k:]))
        return out


# ---------------------------------------------------------------- deciding, keying, opening
def open_cache(
    cfg: DataConfig, seed: int, source: type, generate: Generate, ds: FederatedDataset
) -> ClientArrays | None:
    """The cache of this federation, built first if no process has built it; None when the data
    should stay generated on demand (caching off, too big, or the cache folder is unusable)."""
    if not applies(cfg, ds):
        return None
    ident = identity(cfg, seed, source)
    folder = cache_root() / "clients" / cache_key(ident)
    try:
        arrays = _try_load(folder, ident) or _build_once(folder, ident, generate, ds, cfg.samples_per_client)
    except (OSError, CacheError) as e:
        _warn_once(f"data cache unusable ({type(e).__name__}: {e}); generating clients on demand")
        return None
    if arrays is None:
        _warn_once(
            f"data cache {folder} failed its checks right after it was built; generating clients on demand"
        )
    return arrays


def _build_once(
    folder: Path, ident: dict, generate: Generate, ds: FederatedDataset, samples: int
) -> ClientArrays | None:
    """Build the cache unless another process did while this one waited for the lock."""
    with _lock(folder.parent, folder.name) as locked:
        arrays = _try_load(folder, ident)
        if arrays is not None:
            return arrays
        _discard(folder)  # damaged: a missing, truncated or inconsistent file
        if locked:
            _sweep_builds(folder.parent, folder.name)
        build(folder, generate, ds.num_clients, samples, tuple(ds.input_shape), ident)
        return _try_load(folder, ident)


def applies(cfg: DataConfig, ds: FederatedDataset) -> bool:
    """Caching is on and the federation fits `data.cache_max_mb`."""
    return cfg.cache and estimated_bytes(ds, cfg.samples_per_client) <= cfg.cache_max_mb << 20


def estimated_bytes(ds: FederatedDataset, samples: int) -> int:
    """Size of the cache: float32 inputs and int64 labels of every sample, plus the index arrays."""
    per_sample = 4 * math.prod(ds.input_shape) + 8
    return ds.num_clients * (samples * per_sample + 16) + 8


def identity(cfg: DataConfig, seed: int, source: type) -> dict:
    """Everything that shapes the cached clients. Drift is left out (applied on top), and so are the
    cache settings and the other kinds' sections (they shape nothing here)."""
    other_kinds = {"writers", "synthetic", "femnist", "prototypes", "table"} - {cfg.kind}
    data = cfg.model_dump(mode="json", exclude={"drift", "cache", "cache_max_mb", *other_kinds})
    modules = (source.__module__, *SHARED_CODE)
    return {
        "version": CACHE_VERSION,
        "seed": seed,
        "data": data,
        "source": f"{source.__module__}.{source.__name__}",
        "code": {m: _code_hash(sys.modules[m].__file__) for m in modules},
        "numpy": np.__version__,
        "torch": torch.__version__,
    }


def cache_key(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=None)
def _code_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _try_load(folder: Path, ident: dict | None) -> ClientArrays | None:
    """The folder's arrays if it holds a complete, consistent cache (for `ident`, when given), else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        maps = {name: np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False) for name in ARRAYS}
    # missing, truncated (mmap longer than the file) or garbled; other OSErrors (no file handles
    # left, no permission) say nothing about the files, so they are not taken as damage
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(meta, dict) or (ident is not None and meta.get("ident") != ident):
        return None
    x, y, offsets, n_train = (np.asarray(maps[name]) for name in ARRAYS)  # plain views: cheaper to slice
    return ClientArrays(folder, x, y, offsets, n_train) if _consistent(meta, x, y, offsets, n_train) else None


def _consistent(meta: dict, x: np.ndarray, y: np.ndarray, offsets: np.ndarray, n_train: np.ndarray) -> bool:
    """The arrays have the dtypes and shapes meta.json promises, and the index arrays fit them."""
    n, shape = meta.get("num_clients"), meta.get("input_shape")
    if not (isinstance(n, int) and n >= 0 and isinstance(shape, list) and x.ndim == 1 + len(shape)):
        return False
    return (
        x.dtype == np.float32
        and y.dtype == np.int64
        and offsets.dtype == n_train.dtype == np.int64
        and x.shape[1:] == tuple(shape)
        and y.ndim == 1
        and offsets.shape == (n + 1,)
        and n_train.shape == (n,)
        and offsets[0] == 0
        and offsets[-1] == len(x) == len(y)
        and bool(np.all(n_train >= 0))
        and bool(np.all(np.diff(offsets) >= n_train))
    )


# ---------------------------------------------------------------- building
def build(
    folder: Path,
    generate: Generate,
    num_clients: int,
    samples: int,
    input_shape: tuple[int, ...],
    ident: dict,
) -> None:
    """Generate every client in chunks into a temporary folder, then rename it into place: a reader
    never sees a partial cache, and of two racing builders one rename wins and the other's copy is
    dropped. Files are written (not mapped) while building, so a full disk is an OSError, not a
    SIGBUS, and the builder's memory stays one chunk."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".building-{folder.name}-"))
    try:
        offsets, n_train = _write_samples(tmp, generate, num_clients, samples, input_shape)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "n_train.npy", n_train)
        meta = {"ident": ident, "num_clients": num_clients, "input_shape": list(input_shape)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        for f in tmp.iterdir():
            f.chmod(0o444)  # the maps are copy-on-write; this keeps other tools out too
        try:
            os.rename(tmp, folder)
        except OSError:
            if _try_load(folder, ident) is None:  # lost the race to a complete cache: keep that one
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_samples(
    tmp: Path, generate: Generate, num_clients: int, samples: int, input_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Write x.npy and y.npy chunk by chunk; returns (offsets, n_train)."""
    total = num_clients * samples
    offsets = np.zeros(num_clients + 1, np.int64)
    n_train = np.zeros(num_clients, np.int64)
    with (
        _npy_writer(tmp / "x.npy", np.float32, (total, *input_shape)) as fx,
        _npy_writer(tmp / "y.npy", np.int64, (total,)) as fy,
    ):
        for chunk in _chunks(num_clients, samples * (4 * math.prod(input_shape) + 8)):
            for cid, c in zip(chunk, generate(chunk), strict=True):
                n = len(c.y_train) + len(c.y_test)
                if c.cid != cid or n != samples or tuple(c.x_train.shape[1:]) != input_shape:
                    raise CacheError(
                        f"asked for client {cid}, got client {c.cid} with {n} samples of shape "
                        f"{tuple(c.x_train.shape[1:])}; the cache expects {samples} of {input_shape}"
                    )
                fx.write(_bytes(torch.cat([c.x_train, c.x_test]), torch.float32))
                fy.write(_bytes(torch.cat([c.y_train, c.y_test]), torch.int64))
                offsets[c.cid + 1], n_train[c.cid] = offsets[c.cid] + n, len(c.y_train)
    return offsets, n_train


def _chunks(num_clients: int, client_bytes: int) -> Iterator[list[int]]:
    size = max(1, min(MAX_CHUNK, CHUNK_BYTES // client_bytes))
    for lo in range(0, num_clients, size):
        yield list(range(lo, min(lo + size, num_clients)))


def _bytes(t: torch.Tensor, dtype: torch.dtype) -> memoryview:
    if t.dtype != dtype:
        raise CacheError(f"the source returned {t.dtype}; the cache holds {dtype}")
    return memoryview(t.contiguous().numpy()).cast("B")


@contextlib.contextmanager
def _npy_writer(path: Path, dtype: type, shape: tuple[int, ...]) -> Iterator:
    """An .npy file opened for appending its data in order; checks that exactly `shape` was written
    and syncs it to disk before the build may be renamed into place."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f,
            {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape},
        )
        start = f.tell()
        yield f
        if f.tell() - start != math.prod(shape) * np.dtype(dtype).itemsize:
            raise CacheError(f"{path.name}: wrote {f.tell() - start} bytes for shape {shape}")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _lock(parent: Path, name: str) -> Iterator[bool]:
    """Hold an exclusive lock on `name` in `parent`, so racing processes build once: the others wait
    and then map. Yields whether the lock is held (not on filesystems without flock)."""
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f".{name}.lock", "a") as f:
        try:
            if fcntl is None:
                raise OSError("no fcntl")
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _discard(folder: Path) -> None:
    """Move a damaged cache folder out of the way (a rename, so its name frees at once), then delete it."""
    if not folder.exists():
        return
    trash = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".discard-{folder.name}-"))
    os.rename(folder, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _sweep_builds(parent: Path, name: str) -> None:
    """Remove temporary folders of this cache left by builders that died. Only called with the lock
    held: no live builder of this cache can own one then."""
    for leftover in parent.glob(f".building-{name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """One warning per process: every dataset a worker builds would repeat it otherwise."""
    if not _warned:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    _warned.add(message)
