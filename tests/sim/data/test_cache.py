"""The shared cache of generated federations (sim/data/cache.py): bit-identical to generating on
demand, built once across racing processes, never read when partial or damaged, bounded in size."""

import hashlib
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.sim.config import DataConfig, load
from fedmeta.sim.data import CachedWritersDataset, ClientData, WritersDataset, build_dataset
from fedmeta.sim.data import cache as C
from fedmeta.sim.data.drift import DriftedDataset

ROOT = Path(__file__).resolve().parents[3]
FIELDS = ("x_train", "y_train", "x_test", "y_test")
# every generated kind, and the split both ways: a test part (odd sizes, so rounding matters) and none
CONFIGS = {
    "writers": dict(
        kind="writers", num_clients=60, samples_per_client=23, writers={"alpha": 0.5, "flips": True}
    ),
    "writers-all-train": dict(kind="writers", num_clients=60, samples_per_client=16, train_fraction=1.0),
    "synthetic": dict(kind="synthetic", num_clients=60, samples_per_client=21, train_fraction=0.55),
    "prototypes": dict(
        kind="prototypes",
        num_clients=60,
        samples_per_client=19,
        train_fraction=0.8,
        prototypes={"input_shape": [1, 12, 12], "num_classes": 7},
    ),
}


def data_cfg(**over) -> DataConfig:
    return DataConfig(**{"global_clients": 3, "cache": True, **over})  # on: what these tests are about


def same(a, b) -> bool:
    return a.cid == b.cid and all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def folders(root: Path) -> list[Path]:
    return sorted((root / "clients").iterdir()) if (root / "clients").is_dir() else []


def builds(root: Path) -> list[Path]:
    """Finished cache folders (not lock files, not temporary folders)."""
    return [p for p in folders(root) if p.is_dir() and not p.name.startswith(".")]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDMETA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict:
    """(cached, generated) datasets of every config, the cached ones built in a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDMETA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        out = {}
        for name, over in CONFIGS.items():
            cfg = data_cfg(**over)
            out[name] = (build_dataset(cfg, 5), build_dataset(cfg.model_copy(update={"cache": False}), 5))
    assert all(cached.cached for cached, _ in out.values())
    return out


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(CONFIGS)), cids=st.lists(st.integers(0, 59), max_size=40))
def test_cached_clients_are_bit_identical_to_generated_ones(pairs, name, cids):
    cached, generated = pairs[name]
    got, want = cached.clients(cids), generated.clients(cids)
    assert len(got) == len(want) == len(cids)
    assert all(same(a, b) for a, b in zip(got, want, strict=True))
    assert all(a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64 for a in got)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_everything_but_clients_is_the_source_itself(pairs, name):
    cached, generated = pairs[name]
    assert isinstance(cached, type(generated)) and not getattr(generated, "cached", False)
    for attr in ("num_clients", "num_classes", "input_shape", "global_clients", "n_train", "samples"):
        assert getattr(cached, attr) == getattr(generated, attr)
    assert all(torch.equal(a, b) for a, b in zip(cached.global_data(), generated.global_data(), strict=True))
    assert cached.global_sizes() == generated.global_sizes()
    assert same(cached.client(59), generated.client(59))
    if name.startswith("writers"):
        assert np.array_equal(cached.styles([3, 1]), generated.styles([3, 1]))
        assert np.array_equal(cached.global_styles(), generated.global_styles())
    if name == "prototypes":
        assert torch.equal(cached.prototypes, generated.prototypes)
    with pytest.raises(ValueError, match=r"client id 60 out of range"):
        cached.clients([0, 60])


def test_a_drifted_federation_over_a_cached_one_matches_the_generated_drift(cache_dir):
    cfg = data_cfg(**CONFIGS["writers"], drift={"at_round": 2, "rotation": 30.0, "style_strength": 2.0})
    plain = cfg.model_copy(update={"cache": False})
    cached = DriftedDataset(cfg, 5, build_dataset(cfg, 5))
    generated = DriftedDataset(plain, 5, build_dataset(plain, 5))
    assert cached.inner.cached and cached.base.cached
    assert all(
        same(a, b) for a, b in zip(cached.clients([4, 0, 59]), generated.clients([4, 0, 59]), strict=True)
    )
    # the drift section is not part of the key: the base federation and the post-drift one, two folders
    assert len(builds(cache_dir)) == 2


def test_a_second_dataset_maps_the_first_ones_build(cache_dir, monkeypatch):
    cfg = data_cfg(**CONFIGS["synthetic"])
    first = build_dataset(cfg, 1)
    monkeypatch.setattr(C, "build", lambda *a, **k: pytest.fail("built twice"))
    second = build_dataset(cfg, 1)
    assert second.cached and same(first.client(7), second.client(7))
    assert len(builds(cache_dir)) == 1


def test_cached_tensors_are_writable_copies_on_write_and_never_reach_the_files(cache_dir):
    cfg = data_cfg(**CONFIGS["writers"])
    ds = build_dataset(cfg, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about views of read-only arrays
        c = ds.client(3)
    original = c.x_train.clone()
    c.x_train.add_(1.0)  # a private page of this process's map
    assert torch.equal(build_dataset(cfg, 2).client(3).x_train, original)
    assert all(not p.stat().st_mode & 0o222 for p in builds(cache_dir)[0].iterdir())


def test_a_client_owns_only_its_own_rows(cache_dir):
    cfg = data_cfg(**CONFIGS["writers"])
    c = build_dataset(cfg, 2).clients(range(10))[4]
    assert c.x_train.untyped_storage().nbytes() == 23 * 64 * 4  # not the whole map
    # pickled to another process, it ships what a generated client ships
    generated = build_dataset(cfg.model_copy(update={"cache": False}), 2).client(4)
    assert len(pickle.dumps(c)) == len(pickle.dumps(generated))


def test_a_pickled_dataset_reopens_its_maps_instead_of_copying_them(cache_dir):
    cfg = data_cfg(**CONFIGS["prototypes"])
    ds = build_dataset(cfg, 2)
    blob = pickle.dumps(ds)
    # the source's own state plus the folder's name, not the 600 KB of cached samples
    assert len(blob) - len(pickle.dumps(build_dataset(cfg.model_copy(update={"cache": False}), 2))) < 1000
    back = pickle.loads(blob)
    assert back.cached and same(back.client(11), ds.client(11))


# ---------------------------------------------------------------- keys
def test_the_key_follows_what_shapes_the_data_and_nothing_else():
    cfg = data_cfg(**CONFIGS["writers"])
    key = C.cache_key(C.identity(cfg, 0, WritersDataset))
    same_data = [
        cfg.model_copy(update={"drift": cfg.drift.model_copy(update={"rotation": 45.0})}),
        cfg.model_copy(update={"cache_max_mb": 7}),
        cfg.model_copy(update={"synthetic": cfg.synthetic.model_copy(update={"dim": 3})}),
    ]
    assert all(C.cache_key(C.identity(c, 0, WritersDataset)) == key for c in same_data)
    other_data = [
        cfg.model_copy(update={"train_fraction": 0.5}),
        cfg.model_copy(update={"num_clients": 61}),
        cfg.model_copy(update={"writers": cfg.writers.model_copy(update={"style_strength": 0.5})}),
    ]
    assert all(C.cache_key(C.identity(c, 0, WritersDataset)) != key for c in other_data)
    assert C.cache_key(C.identity(cfg, 1, WritersDataset)) != key


def test_a_change_to_the_generators_code_is_a_new_key(monkeypatch):
    cfg = data_cfg(**CONFIGS["writers"])
    key = C.cache_key(C.identity(cfg, 0, WritersDataset))
    writers_file = sys.modules["fedmeta.sim.data.writers"].__file__
    edited = hashlib.sha256(b"edited").hexdigest()[:16]
    real = C._code_hash
    monkeypatch.setattr(C, "_code_hash", lambda path: edited if path == writers_file else real(path))
    assert C.cache_key(C.identity(cfg, 0, WritersDataset)) != key


# ---------------------------------------------------------------- partial and damaged caches
def _break(folder: Path, damage: str) -> None:
    if damage == "missing x":
        (folder / "x.npy").unlink()
    elif damage == "truncated x":
        data = (folder / "x.npy").read_bytes()
        (folder / "x.npy").chmod(0o644)
        (folder / "x.npy").write_bytes(data[: len(data) // 2])
    elif damage == "no meta":  # a half-copied folder: meta.json marks a finished build
        (folder / "meta.json").unlink()
    elif damage == "garbled meta":
        (folder / "meta.json").chmod(0o644)
        (folder / "meta.json").write_text("{")
    elif damage == "offsets past the end":
        offsets = np.load(folder / "offsets.npy")
        offsets[-1] += 1
        (folder / "offsets.npy").unlink()
        np.save(folder / "offsets.npy", offsets)


@pytest.mark.parametrize(
    "damage", ["missing x", "truncated x", "no meta", "garbled meta", "offsets past the end"]
)
def test_a_damaged_cache_is_not_read_but_rebuilt(cache_dir, damage):
    cfg = data_cfg(**CONFIGS["synthetic"])
    want = build_dataset(cfg.model_copy(update={"cache": False}), 4).clients(range(60))
    build_dataset(cfg, 4)
    (folder,) = builds(cache_dir)
    _break(folder, damage)
    ds = build_dataset(cfg, 4)
    assert ds.cached and all(same(a, b) for a, b in zip(ds.clients(range(60)), want, strict=True))
    assert builds(cache_dir) == [folder] and C._try_load(folder, None) is not None
    assert not [p for p in folders(cache_dir) if p.name.startswith((".building-", ".discard-"))]


def test_a_cache_that_cannot_be_read_now_is_not_taken_for_a_damaged_one(cache_dir, monkeypatch):
    cfg = data_cfg(**CONFIGS["synthetic"])
    build_dataset(cfg, 4)
    (folder,) = builds(cache_dir)
    inode = (folder / "x.npy").stat().st_ino

    def no_handles(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(np, "load", no_handles)
    monkeypatch.setattr(C, "_warned", set())
    with pytest.warns(RuntimeWarning, match="Too many open files"):
        ds = build_dataset(cfg, 4)
    assert not ds.cached and (folder / "x.npy").stat().st_ino == inode  # left alone, not rebuilt
    assert same(ds.client(3), build_dataset(cfg.model_copy(update={"cache": False}), 4).client(3))


def test_clients_the_layout_cannot_hold_leave_the_data_uncached(cache_dir, monkeypatch):
    cfg = data_cfg(**CONFIGS["writers"])
    plain = build_dataset(cfg.model_copy(update={"cache": False}), 4)

    def uneven(cids):  # a source whose clients hold different numbers of samples
        return [
            ClientData(
                c.cid,
                c.x_train[: -(c.cid % 2) or None],
                c.y_train[: -(c.cid % 2) or None],
                c.x_test,
                c.y_test,
            )
            for c in plain.clients(cids)
        ]

    monkeypatch.setattr(C, "_warned", set())
    with pytest.warns(RuntimeWarning, match="CacheError"):
        assert C.open_cache(cfg, 4, WritersDataset, uneven, plain) is None
    assert not builds(cache_dir) and not [p for p in folders(cache_dir) if p.name.startswith(".building-")]


def test_a_dead_builders_leftover_is_never_read_and_is_swept(cache_dir):
    cfg = data_cfg(**CONFIGS["writers"])
    key = C.cache_key(C.identity(cfg, 4, WritersDataset))
    leftover = cache_dir / "clients" / f".building-{key}-dead"
    leftover.mkdir(parents=True)
    (leftover / "x.npy").write_bytes(b"half a file")
    ds = build_dataset(cfg, 4)
    assert ds.cached and ds._arrays.folder.name == key and not leftover.exists()
    assert same(ds.client(9), build_dataset(cfg.model_copy(update={"cache": False}), 4).client(9))


def test_a_builder_that_loses_the_race_keeps_the_winners_cache(cache_dir):
    cfg = data_cfg(**CONFIGS["synthetic"])
    ds = build_dataset(cfg, 4)
    folder, ident = ds._arrays.folder, C.identity(cfg, 4, ds._source())
    before = (folder / "x.npy").stat().st_ino
    C.build(folder, ds.clients, ds.num_clients, 21, ds.input_shape, ident)  # renames onto a finished cache
    assert (folder / "x.npy").stat().st_ino == before and builds(cache_dir) == [folder]
    assert not [p for p in folders(cache_dir) if p.name.startswith(".building-")]


RACER = """
import hashlib, sys, torch
from fedmeta.sim.config import DataConfig
from fedmeta.sim.data import build_dataset
ds = build_dataset(DataConfig(kind="writers", num_clients=800, samples_per_client=20, global_clients=2, cache=True), 9)
h = hashlib.sha256()
for c in ds.clients(range(ds.num_clients)):
    h.update(c.x_train.numpy().tobytes()); h.update(c.y_test.numpy().tobytes())
print(ds.cached, h.hexdigest())
"""


def test_racing_processes_build_once_and_all_read_the_same_data(cache_dir):
    env = {**os.environ, "FEDMETA_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300)[0].split() for p in racers]
    assert all(p.returncode == 0 for p in racers)
    assert {tuple(o) for o in outs} == {("True", outs[0][1])}
    assert len(builds(cache_dir)) == 1
    assert not [p for p in folders(cache_dir) if p.name.startswith((".building-", ".discard-"))]


# ---------------------------------------------------------------- when the cache is not used
def test_caching_off_gives_the_plain_source_and_writes_nothing(cache_dir):
    ds = build_dataset(data_cfg(**CONFIGS["writers"], cache=False), 0)
    assert type(ds) is WritersDataset and not builds(cache_dir)


def test_a_federation_over_the_size_bound_is_generated_on_demand(cache_dir):
    cfg = data_cfg(**CONFIGS["writers"])
    size_mb = C.estimated_bytes(build_dataset(cfg.model_copy(update={"cache": False}), 0), 23) / 2**20
    assert 0.1 < size_mb < 1
    small = build_dataset(cfg.model_copy(update={"cache_max_mb": 0}), 0)
    assert isinstance(small, CachedWritersDataset) and not small.cached and not builds(cache_dir)
    assert build_dataset(cfg.model_copy(update={"cache_max_mb": 1}), 0).cached


def test_w3_is_too_big_to_cache_and_still_works(cache_dir):
    cfg = load(ROOT / "configs" / "bench_w3.yaml").data.model_copy(update={"cache": True})
    ds = build_dataset(cfg, 0)
    assert not ds.cached and not builds(cache_dir)
    assert ds.client(999_999).x_train.shape == (64, 1, 8, 8)


def test_w2_fits_the_default_bound():
    assert not DataConfig().cache  # off unless asked for: no files behind a user's back
    cfg = load(ROOT / "configs" / "bench_w2.yaml").data
    assert cfg.cache and load(ROOT / "configs" / "bench_w1.yaml").data.cache
    ds = build_dataset(cfg.model_copy(update={"cache": False}), 0)
    assert C.estimated_bytes(ds, cfg.samples_per_client) <= cfg.cache_max_mb << 20


def test_an_unwritable_cache_folder_means_generated_data_and_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FEDMETA_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(C, "_warned", set())
    cfg = data_cfg(**CONFIGS["prototypes"])
    with pytest.warns(RuntimeWarning, match="data cache unusable") as record:
        first, second = build_dataset(cfg, 0), build_dataset(cfg, 1)
    assert len(record) == 1 and not first.cached and not second.cached
    assert same(first.client(2), build_dataset(cfg.model_copy(update={"cache": False}), 0).client(2))


def test_the_cache_files_say_what_they_hold(cache_dir):
    cfg = data_cfg(**CONFIGS["writers-all-train"])
    ds = build_dataset(cfg, 0)
    meta = json.loads((ds._arrays.folder / "meta.json").read_text())
    assert meta["num_clients"] == 60 and meta["input_shape"] == [1, 8, 8]
    assert meta["ident"]["version"] == C.CACHE_VERSION and "drift" not in meta["ident"]["data"]
    assert set(meta["ident"]["code"]) == {
        "fedmeta.sim.data.writers",
        "fedmeta.sim.data.base",
        "fedmeta.sim.seeding",
    }
