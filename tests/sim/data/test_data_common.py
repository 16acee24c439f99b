"""Contract every generated dataset honours: determinism, independence, shapes, splits, id checks."""

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.sim.config import DataConfig
from fedmeta.sim.data import ClientData, FederatedDataset, build_dataset
from fedmeta.sim.data.base import check_cids, train_size
from fedmeta.sim.data.prototypes import PrototypesDataset
from fedmeta.sim.data.synthetic import SyntheticDataset
from fedmeta.sim.data.writers import WritersDataset

KINDS = ["writers", "synthetic", "prototypes"]
EXPECTED = {
    "writers": (WritersDataset, 10, (1, 8, 8)),
    "synthetic": (SyntheticDataset, 10, (60,)),
    "prototypes": (PrototypesDataset, 62, (1, 28, 28)),
}


def make(kind: str, seed: int = 0, **data) -> FederatedDataset:
    data = {"num_clients": 50, "samples_per_client": 20, "global_clients": 4, **data}
    return build_dataset(DataConfig(kind=kind, **data), seed)


def same(a: ClientData, b: ClientData) -> bool:
    return a.cid == b.cid and all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("x_train", "y_train", "x_test", "y_test")
    )


@pytest.mark.parametrize("kind", KINDS)
def test_build_dataset_dispatches_on_kind(kind):
    cls, classes, shape = EXPECTED[kind]
    ds = make(kind)
    assert isinstance(ds, cls)
    assert (ds.num_clients, ds.num_classes, ds.input_shape) == (50, classes, shape)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtypes_labels_and_70_30_split(kind):
    ds = make(kind, samples_per_client=64)
    for c in ds.clients([0, 13, 49]):
        assert c.x_train.shape == (45, *ds.input_shape) and c.x_test.shape == (19, *ds.input_shape)
        assert c.y_train.shape == (45,) and c.y_test.shape == (19,)
        assert c.x_train.dtype == c.x_test.dtype == torch.float32
        assert c.y_train.dtype == c.y_test.dtype == torch.int64
        labels = torch.cat([c.y_train, c.y_test])
        assert labels.min() >= 0 and labels.max() < ds.num_classes
        assert torch.isfinite(c.x_train).all()


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_data_different_seed_different(kind):
    a, b, other = make(kind, seed=3), make(kind, seed=3), make(kind, seed=4)
    for x, y in zip(a.clients(range(5)), b.clients(range(5)), strict=True):
        assert same(x, y)
    assert not torch.equal(a.client(0).x_train, other.client(0).x_train)
    assert torch.equal(a.global_data()[0], b.global_data()[0])
    assert not torch.equal(a.global_data()[0], other.global_data()[0])


@pytest.mark.parametrize("kind", KINDS)
def test_client_data_does_not_depend_on_the_rest_of_the_request(kind):
    ds = make(kind)
    alone = ds.client(7)
    assert same(alone, ds.clients([3, 7, 9])[1])
    assert same(alone, ds.clients([49, 0, 7, 7])[2])
    assert same(alone, make(kind).clients(list(range(50)))[7])  # a fresh object, a full batch
    assert [c.cid for c in ds.clients([5, 2, 5])] == [5, 2, 5]
    assert ds.clients([]) == []


@pytest.mark.parametrize("kind", KINDS)
def test_repeated_calls_are_identical(kind):
    ds = make(kind)
    for x, y in zip(ds.clients(range(10)), ds.clients(range(10)), strict=True):
        assert same(x, y)


@pytest.mark.parametrize("kind", KINDS)
def test_clients_own_their_storage(kind):
    # pickling one client must not ship the whole batch it was generated in: at most its own 30 samples
    ds = make(kind, samples_per_client=30)
    c = ds.clients(range(10))[4]
    for x in (c.x_train, c.x_test):
        assert x.untyped_storage().nbytes() <= 30 * math.prod(ds.input_shape) * 4
    for y in (c.y_train, c.y_test):
        assert y.untyped_storage().nbytes() <= 30 * 8


@pytest.mark.parametrize("kind", KINDS)
def test_train_fraction_one_leaves_an_empty_test_set(kind):
    ds = make(kind, train_fraction=1.0)
    c = ds.client(0)
    assert c.x_train.shape == (20, *ds.input_shape)
    assert c.x_test.shape == (0, *ds.input_shape) and c.y_test.shape == (0,)


@pytest.mark.parametrize("kind", KINDS)
def test_global_data_is_cached_and_has_every_sample(kind):
    ds = make(kind)
    x, y = ds.global_data()
    assert x.shape == (4 * 20, *ds.input_shape) and y.shape == (80,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert ds.global_data()[0] is x


@pytest.mark.parametrize("kind", KINDS)
def test_global_data_comes_from_individuals_outside_the_federation(kind):
    ds = make(kind, train_fraction=1.0)
    gx, _ = ds.global_data()
    fed = torch.cat([c.x_train for c in ds.clients(range(ds.num_clients))])
    # no D_G sample coincides with a federation sample
    dists = torch.cdist(gx.flatten(1), fed.flatten(1))
    assert dists.min() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_bad_client_ids_are_rejected_with_the_valid_range(kind):
    ds = make(kind)
    with pytest.raises(ValueError, match=r"client id 50 out of range: valid ids are 0\.\.49"):
        ds.clients([1, 50])
    with pytest.raises(ValueError, match=r"client id -1 out of range"):
        ds.client(-1)
    with pytest.raises(TypeError, match="not an integer"):
        ds.clients([1.0])


def test_numpy_integer_ids_are_accepted():
    ds = make("prototypes")
    assert same(ds.client(np.int64(3)), ds.client(3))


def test_large_federations_are_generated_on_demand():
    ds = make("writers", num_clients=1_000_000)
    c = ds.client(999_999)
    assert c.cid == 999_999 and c.x_train.shape == (14, 1, 8, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_generation_leaves_the_global_rngs_alone(kind):
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    ds = make(kind)
    ds.clients(range(3))
    ds.global_data()
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_data_package_does_not_import_ray():
    # workers import sim.data without a Ray runtime: only the stdlib, numeric libraries and
    # sim.config / sim.seeding may be imported (a static check; a fresh interpreter costs seconds)
    package = Path(__file__).parents[3] / "sim" / "data"
    imported = set()
    for f in package.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module)
    assert not {m for m in imported if m.split(".")[0] == "ray"}
    outside = {m for m in imported if m.startswith("sim.") and not m.startswith("fedmeta.sim.data")}
    assert outside <= {"fedmeta.sim.config", "fedmeta.sim.seeding"}


@given(n=st.integers(1, 10_000), fraction=st.floats(0.001, 1.0))
def test_train_size_is_rounded_and_clamped(n, fraction):
    k = train_size(n, fraction)
    assert 1 <= k <= n
    assert k == min(max(round(n * fraction), 1), n)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 40), fraction=st.floats(0.05, 1.0))
def test_split_sizes_follow_train_fraction(n, fraction):
    ds = make("prototypes", samples_per_client=n, train_fraction=fraction, num_clients=3)
    c = ds.client(2)
    assert len(c.y_train) == train_size(n, fraction) and len(c.y_train) + len(c.y_test) == n


def test_check_cids_returns_plain_ints():
    assert check_cids(range(3), 3) == [0, 1, 2]
    assert all(type(i) is int for i in check_cids(np.arange(3), 3))


@pytest.mark.parametrize("kind", ["writers", "synthetic", "prototypes"])
def test_global_sizes_cover_global_data_one_block_per_individual(kind):
    from fedmeta.sim.config import DataConfig
    from fedmeta.sim.data import build_dataset

    d = build_dataset(DataConfig(kind=kind, num_clients=5, samples_per_client=12, global_clients=3), seed=1)
    assert d.global_sizes() == [12, 12, 12] and len(d.global_data()[1]) == 36
