"""Table loader (Parquet/CSV, one row per sample) on small tables written by the tests."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.sim.config import ConfigError, TableConfig, from_dict
from fedmeta.sim.data import build_dataset
from fedmeta.sim.data import tabular as T
from fedmeta.sim.data.base import train_size
from fedmeta.sim.data.tabular import (
    TableDataset,
    cache_key,
    cached_table,
    features,
    labels,
    partition_rows,
    shares_to_counts,
)

FEATURES = ["rid", "f1", "f2", "f3", "f4"]  # rid: the row's index in the table (a feature like any other)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMETA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def user_table(n_users: int = 30, seed: int = 0) -> pd.DataFrame:
    """4..12 rows per user, rows of different users interleaved; features on different scales."""
    rng = np.random.default_rng(seed)
    users = np.repeat([f"u{i:02d}" for i in range(n_users)], rng.integers(4, 13, n_users))
    n = len(users)
    return pd.DataFrame(
        {
            "user": rng.permutation(users),
            "rid": np.arange(n, dtype=np.float64),
            "f1": rng.normal(10, 3, n),
            "f2": rng.normal(-5, 0.5, n),
            "f3": rng.uniform(0, 100, n),
            "f4": rng.integers(0, 7, n).astype(np.float64),
            "label": rng.integers(0, 4, n),
        }
    )


def central_table(n: int = 400, classes: int = 4, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "label": np.arange(n) % classes})


def write(df: pd.DataFrame, path):
    if str(path).endswith(".csv"):
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


def data_cfg(path, data: dict | None = None, **table):
    table = {"path": str(path), "client_column": "user", **table}
    if table["client_column"] is None:
        del table["client_column"]
    raw = {"kind": "table", "num_clients": 100, "global_clients": 3, **(data or {}), "table": table}
    small = {
        "federation": {"clients_per_round": 1},
        "eval": {"num_individuals": 1},
    }  # small federations validate
    return from_dict({"data": raw, **small}).data


def build(path, seed: int = 0, data: dict | None = None, **table) -> TableDataset:
    return build_dataset(data_cfg(path, data, **table), seed)


def error(path, seed: int = 0, data: dict | None = None, **table) -> str:
    with pytest.raises(ConfigError) as e:
        build(path, seed, data, **table)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        from_dict({"data": raw})
    assert "\n" not in str(e.value)
    return str(e.value)


def everything(ds: TableDataset) -> list:
    """Every client's four tensors, then D_G's two."""
    out = [t for c in ds.clients(range(ds.num_clients)) for t in (c.x_train, c.y_train, c.x_test, c.y_test)]
    return out + list(ds.global_data())


def same(a: TableDataset, b: TableDataset) -> bool:
    ea, eb = everything(a), everything(b)
    return len(ea) == len(eb) and all(torch.equal(x, y) for x, y in zip(ea, eb, strict=True))


def rids(x: torch.Tensor) -> list[int]:
    return x[:, 0].round().long().tolist()


# ---------------------------------------------------------------- clients, D_G, rows, splits
def test_parquet_and_csv_give_the_same_dataset(tmp_path):
    df = user_table()
    pq, csv = write(df, tmp_path / "t.parquet"), write(df, tmp_path / "t.csv")
    a, b = build(pq), build(csv)
    assert isinstance(a, TableDataset) and same(a, b)
    assert a.client_names == b.client_names and a.classes == b.classes == [0, 1, 2, 3]


def test_federation_is_the_users_not_held_out_and_d_g_the_rest(tmp_path):
    path = write(user_table(), tmp_path / "t.parquet")
    ds = build(path, standardize=False)
    assert (ds.num_clients, ds.global_clients, ds.num_classes, ds.input_shape) == (27, 3, 4, (5,))
    assert sorted(ds.client_names) == [f"u{i:02d}" for i in range(30)]
    assert ds.client_names[:27] == sorted(ds.client_names[:27])  # the federation in id order
    gx, gy = ds.global_data()
    sizes = ds.global_sizes()
    assert len(sizes) == 3 and sum(sizes) == len(gy) == len(gx) and min(sizes) >= 4


def test_num_clients_caps_the_federation(tmp_path):
    path = write(user_table(), tmp_path / "t.parquet")
    full, capped = build(path), build(path, data={"num_clients": 10})
    assert capped.num_clients == 10 and capped.client_names[:10] == full.client_names[:10]
    assert capped.client_names[10:] == full.client_names[27:]  # the same D_G
    with pytest.raises(ValueError, match="out of range"):
        capped.client(10)


def test_every_row_once_with_its_user_label_and_features(tmp_path):
    df = user_table()
    ds = build(write(df, tmp_path / "t.parquet"), standardize=False)
    seen = []
    for c in ds.clients(range(ds.num_clients)):
        n = len(c.y_train) + len(c.y_test)
        assert len(c.y_train) == train_size(n, 0.7) == min(max(round(n * 0.7), 1), n)
        x, y = torch.cat([c.x_train, c.x_test]), torch.cat([c.y_train, c.y_test])
        r = rids(x)
        assert (df.user[r] == ds.client_names[c.cid]).all() and n == (df.user == ds.client_names[c.cid]).sum()
        assert np.array_equal(y.numpy(), df.label[r].to_numpy())
        assert np.allclose(x.numpy(), df[FEATURES].to_numpy()[r])  # standardize: false keeps raw values
        seen += r
    gx, gy = ds.global_data()
    g = rids(gx)
    assert set(df.user[g]) == set(ds.client_names[ds.num_clients :])
    assert np.array_equal(gy.numpy(), df.label[g].to_numpy())
    # D_G's individuals in global_sizes() blocks, in client_names order
    blocks = np.split(np.array(g), np.cumsum(ds.global_sizes())[:-1])
    assert [set(df.user[b]) for b in blocks] == [{u} for u in ds.client_names[ds.num_clients :]]
    assert sorted(seen + g) == list(range(len(df)))


def test_train_fraction_one_leaves_empty_test_sets(tmp_path):
    ds = build(write(user_table(), tmp_path / "t.parquet"), data={"train_fraction": 1.0})
    for c in ds.clients([0, 5, 26]):
        assert len(c.y_test) == 0 and c.x_test.shape == (0, 5) and len(c.y_train) >= 4


def test_clients_own_their_storage_and_dtypes(tmp_path):
    ds = build(write(user_table(), tmp_path / "t.parquet"))
    a, b = ds.clients([3, 3])
    fresh = ds.clients([3])[0]
    for c in (a, b):
        assert c.x_train.dtype == c.x_test.dtype == torch.float32
        assert c.y_train.dtype == c.y_test.dtype == torch.int64
    kept = fresh.x_train.clone(), fresh.y_test.clone()
    a.x_train.add_(100.0)  # in place: ClientData is frozen, its tensors are not
    a.y_test.fill_(-1)
    for c in (b, fresh, ds.client(3)):
        assert torch.equal(c.x_train, kept[0]) and torch.equal(c.y_test, kept[1])
    n = len(fresh.y_train) + len(fresh.y_test)
    assert fresh.x_train.untyped_storage().nbytes() <= n * 5 * 4  # its own rows, not the whole table
    gx, gy = ds.global_data()
    assert gx.dtype == torch.float32 and gy.dtype == torch.int64


# ---------------------------------------------------------------- seeds and the cache
def test_same_seed_same_data_other_seed_other_split_and_d_g(tmp_path):
    path = write(user_table(), tmp_path / "t.parquet")
    a, b, other = build(path, seed=1), build(path, seed=1), build(path, seed=2)
    assert same(a, b) and a.client_names == b.client_names
    assert not same(a, other)
    assert a.client_names[27:] != other.client_names[27:]  # another held-out set
    common = sorted(set(a.client_names[:27]) & set(other.client_names[:27]))
    split_a = {u: a.client(a.client_names.index(u)).y_train for u in common}
    split_o = {u: other.client(other.client_names.index(u)).y_train for u in common}
    assert any(not torch.equal(split_a[u], split_o[u]) for u in common)  # another train/test split


def test_the_cache_is_memory_mapped_and_reused(tmp_path, cache_dir, monkeypatch):
    path = write(user_table(), tmp_path / "t.parquet")
    cfg = data_cfg(path)
    first = build_dataset(cfg, 0)
    assert [p.name for p in (cache_dir / "tables").iterdir()] == [cache_key(cfg, 0)]
    monkeypatch.setattr(T, "build_arrays", lambda *a: pytest.fail("the cache was rebuilt"))
    arrays = cached_table(cfg, 0)
    assert isinstance(arrays["x"], np.memmap) and isinstance(arrays["y"], np.memmap)
    assert same(build_dataset(cfg, 0), first)
    assert cache_key(cfg, 1) != cache_key(cfg, 0)
    assert cache_key(data_cfg(path, standardize=False), 0) != cache_key(cfg, 0)
    assert cache_key(data_cfg(path, data={"train_fraction": 0.5}), 0) != cache_key(cfg, 0)


def test_changing_the_file_invalidates_the_cache(tmp_path):
    path = write(user_table(seed=0), tmp_path / "t.parquet")
    cfg = data_cfg(path, standardize=False)
    before, key = build_dataset(cfg, 0), cache_key(cfg, 0)
    df = user_table(seed=5)
    write(df, path)
    assert cache_key(cfg, 0) != key
    after = build_dataset(cfg, 0)
    assert not same(before, after)
    c = after.client(0)
    assert (df.user[rids(torch.cat([c.x_train, c.x_test]))] == after.client_names[0]).all()


def test_an_unwritable_cache_keeps_the_arrays_in_memory(tmp_path, monkeypatch):
    path = write(user_table(), tmp_path / "t.parquet")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FEDMETA_CACHE_DIR", str(tmp_path / "file"))  # a file: no folder can be made under it
    ds = build(path)
    assert not isinstance(ds.x, np.memmap) and ds.num_clients == 27


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    assert T.cache_root() == tmp_path / "cache"
    monkeypatch.delenv("FEDMETA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert T.cache_root() == tmp_path / "xdg" / "fedmeta"


# ---------------------------------------------------------------- standardisation
def test_standardised_with_the_federations_train_rows(tmp_path):
    ds = build(write(user_table(), tmp_path / "t.parquet"))
    train = torch.cat([c.x_train for c in ds.clients(range(ds.num_clients))]).double()
    assert torch.allclose(train.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(train.std(0, unbiased=False), torch.ones(5, dtype=torch.float64), atol=1e-4)
    test = torch.cat([c.x_test for c in ds.clients(range(ds.num_clients))] + [ds.global_data()[0]])
    assert not torch.allclose(
        torch.cat([train, test.double()]).mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-3
    )


@pytest.mark.parametrize("where", ["test", "global"])
def test_test_and_d_g_rows_do_not_shape_the_train_inputs(tmp_path, where):
    df = user_table()
    raw = build(write(df, tmp_path / "t.parquet"), standardize=False)
    if where == "test":
        changed = sum((rids(c.x_test) for c in raw.clients(range(raw.num_clients))), [])
    else:
        changed = rids(raw.global_data()[0])
    edited = df.copy()
    edited.loc[changed, ["f1", "f2", "f3", "f4"]] *= 1000.0
    a = build(tmp_path / "t.parquet")
    b = build(write(edited, tmp_path / "edited.parquet"))
    for ca, cb in zip(a.clients(range(a.num_clients)), b.clients(range(b.num_clients)), strict=True):
        assert torch.equal(ca.x_train, cb.x_train) and torch.equal(ca.y_train, cb.y_train)
    after = (
        torch.cat([c.x_test for c in b.clients(range(b.num_clients))])
        if where == "test"
        else b.global_data()[0]
    )
    before = (
        torch.cat([c.x_test for c in a.clients(range(a.num_clients))])
        if where == "test"
        else a.global_data()[0]
    )
    assert not torch.equal(after, before)  # the edit did reach the dataset


def test_a_constant_feature_stays_finite(tmp_path):
    df = user_table().assign(f4=3.0)
    ds = build(write(df, tmp_path / "t.parquet"))
    x = torch.cat([c.x_train for c in ds.clients(range(ds.num_clients))])
    assert torch.isfinite(x).all() and torch.equal(x[:, 4], torch.zeros(len(x)))


# ---------------------------------------------------------------- labels
def label_cfg(**kw) -> TableConfig:
    return TableConfig(path="t.csv", **kw)


def test_string_labels_are_numbered_in_sorted_order():
    y, classes = labels(pd.DataFrame({"label": ["dog", "ant", "cat", "ant"]}), label_cfg())
    assert classes == ["ant", "cat", "dog"] and y.tolist() == [2, 0, 1, 0] and y.dtype == np.int64


def test_non_negative_integer_labels_keep_their_values():
    y, classes = labels(pd.DataFrame({"label": [5, 2, 2, 0]}), label_cfg())
    assert y.tolist() == [5, 2, 2, 0] and classes == [0, 1, 2, 3, 4, 5]


def test_negative_and_float_labels_are_numbered():
    y, classes = labels(pd.DataFrame({"label": [-1, 3, -1]}), label_cfg())
    assert y.tolist() == [0, 1, 0] and classes == [-1, 3]
    y, classes = labels(pd.DataFrame({"label": [0.5, 0.25, 0.5]}), label_cfg())
    assert y.tolist() == [1, 0, 1] and classes == [0.25, 0.5]


def test_string_labels_through_the_dataset(tmp_path):
    df = user_table()
    df["label"] = np.array(["zebra", "ant", "mole", "cat"])[df.label]
    ds = build(write(df, tmp_path / "t.csv"), standardize=False)
    assert ds.num_classes == 4 and ds.classes == ["ant", "cat", "mole", "zebra"]
    c = ds.client(0)
    assert list(np.array(ds.classes)[c.y_train.numpy()]) == df.label[rids(c.x_train)].tolist()


def test_integer_labels_set_num_classes_to_max_plus_one(tmp_path):
    df = user_table().assign(label=lambda d: np.where(d.label == 3, 9, d.label))
    assert build(write(df, tmp_path / "t.parquet")).num_classes == 10


def test_a_single_class_is_an_error(tmp_path):
    msg = error(write(user_table().assign(label=1), tmp_path / "t.parquet"))
    assert msg.startswith("data.table.label_column:") and "single class" in msg


# ---------------------------------------------------------------- features and columns
def test_features_default_to_the_other_numeric_columns():
    df = pd.DataFrame({"user": ["a", "b"], "w": [1, 2], "note": ["x", "y"], "label": [0, 1], "v": [0.5, 1.5]})
    x, names = features(df, label_cfg(client_column="user"))
    assert names == ["w", "v"] and x.dtype == np.float32 and x.tolist() == [[1, 0.5], [2, 1.5]]
    x, names = features(df, label_cfg(feature_columns=["v"]))
    assert names == ["v"] and x.shape == (2, 1)


@pytest.mark.parametrize(
    "column, says",
    [
        ("note", "'note' is not numeric"),
        ("nope", "no column 'nope'"),
        ("gap", "'gap' has 1 missing values"),
        ("inf", "'inf' has infinite"),
        ("label", "'label' is the label or client column"),
    ],
)
def test_bad_feature_columns(column, says):
    df = pd.DataFrame(
        {"note": ["x", "y"], "gap": [1.0, None], "inf": [1.0, np.inf], "w": [1, 2], "label": [0, 1]}
    )
    with pytest.raises(ConfigError) as e:
        features(df, label_cfg(feature_columns=["w", column]))
    assert str(e.value).startswith("data.table.feature_columns:") and says in str(e.value)


def test_bad_feature_columns_through_the_dataset(tmp_path):
    df = user_table().assign(note="text")
    df.loc[3, "f2"] = np.nan
    path = write(df, tmp_path / "t.parquet")
    for cols, says in (
        (["f1", "note"], "not numeric"),
        (["f1", "missing"], "no column 'missing'"),
        (["f1", "f2"], "missing values"),
    ):
        msg = error(path, feature_columns=cols)
        assert msg.startswith("data.table.feature_columns:") and says in msg
    msg = error(
        write(pd.DataFrame({"user": ["a", "a"], "label": [0, 1], "s": ["x", "y"]}), tmp_path / "s.csv")
    )
    assert msg.startswith("data.table.feature_columns: the table has no numeric column")


def test_missing_label_and_client_columns(tmp_path):
    path = write(user_table(), tmp_path / "t.parquet")
    msg = error(path, label_column="target")
    assert msg.startswith("data.table.label_column: no column 'target'") and "user, rid" in msg
    assert error(path, client_column="person").startswith("data.table.client_column: no column 'person'")
    df = user_table()
    df.loc[0, "user"] = None
    assert error(write(df, tmp_path / "gap.parquet")).startswith(
        "data.table.client_column: column 'user' has 1"
    )


def test_a_client_with_one_sample_is_an_error(tmp_path):
    df = user_table()
    df.loc[7, "user"] = "lonely"
    msg = error(write(df, tmp_path / "t.parquet"))
    assert msg.startswith("data.table.client_column: client 'lonely' has 1 sample(s)")


def test_integer_client_ids(tmp_path):
    df = user_table().assign(user=lambda d: d.user.str[1:].astype(int) * 10)
    ds = build(write(df, tmp_path / "t.csv"))
    assert sorted(ds.client_names) == list(range(0, 300, 10)) and ds.num_clients == 27


def test_file_errors_name_the_path(tmp_path):
    assert error(tmp_path / "nope.parquet") == f"data.table.path: no such file: {tmp_path / 'nope.parquet'}"
    txt = tmp_path / "t.txt"
    txt.write_text("user,label,x\n")
    msg = error(txt)
    assert msg.startswith("data.table.path:") and "neither Parquet" in msg
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not\na parquet file\n" * 10)
    assert error(bad).startswith(f"data.table.path: cannot read {bad} (")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert error(empty).startswith(f"data.table.path: cannot read {empty} (")


def test_compressed_csv_and_pq_suffix(tmp_path):
    df = user_table()
    a = build(write(df, tmp_path / "t.parquet"))
    df.to_csv(tmp_path / "t.csv.gz", index=False)
    df.to_parquet(tmp_path / "t.pq", index=False)
    assert same(a, build(tmp_path / "t.csv.gz")) and same(a, build(tmp_path / "t.pq"))


def test_too_few_clients_for_global_clients(tmp_path):
    msg = error(write(user_table(n_users=5), tmp_path / "t.parquet"), data={"global_clients": 5})
    assert msg.startswith("data.global_clients: 5 individuals are held out") and "need at least 6" in msg


def test_input_shape_reshapes_each_row(tmp_path):
    df = user_table().assign(f5=1.0)
    ds = build(write(df, tmp_path / "t.parquet"), input_shape=[1, 2, 3])
    c = ds.client(0)
    assert (
        ds.input_shape == (1, 2, 3) and c.x_train.shape[1:] == (1, 2, 3) and c.x_test.shape[1:] == (1, 2, 3)
    )
    assert ds.global_data()[0].shape[1:] == (1, 2, 3)
    flat = build(tmp_path / "t.parquet")
    assert torch.equal(c.x_train.flatten(1), flat.client(0).x_train)


@pytest.mark.parametrize(
    "shape, says", [([2, 2], "holds 4 values but there are 5"), ([5, 2], "holds 10 values")]
)
def test_input_shape_must_hold_the_features(tmp_path, shape, says):
    msg = error(write(user_table(), tmp_path / "t.parquet"), input_shape=shape)
    assert msg.startswith(f"data.table.input_shape: {shape}") and says in msg


@pytest.mark.parametrize("shape, index", [([-1, -5], 0), ([5, 0], 1)])
def test_input_shape_sizes_are_positive(shape, index):
    msg = config_error({"kind": "table", "table": {"path": "t.csv", "input_shape": shape}})
    assert msg.startswith(
        f"config: data.table.input_shape.{index}: Input should be greater than or equal to 1"
    )


def test_config_errors():
    msg = config_error({"kind": "table"})
    assert "data.table.path" in msg
    msg = config_error(
        {"kind": "table", "table": {"path": "t.csv", "client_column": "u", "partition": {"alpha": 1.0}}}
    )
    assert "data.table.partition" in msg
    assert "data.table.partition.alpha" in config_error(
        {"kind": "table", "table": {"path": "t.csv", "partition": {"alpha": 0}}}
    )


# ---------------------------------------------------------------- partitioning a centralised table
def class_shares(owner: np.ndarray, y: np.ndarray, n_clients: int) -> np.ndarray:
    counts = np.zeros((n_clients, y.max() + 1))
    np.add.at(counts, (owner, y), 1)
    return counts / counts.sum(1, keepdims=True)


def test_partition_gives_every_client_min_size_and_is_seeded():
    y = np.arange(300) % 3
    a = partition_rows(y, 10, 0.3, 0.3, np.random.default_rng(4))
    assert np.array_equal(a, partition_rows(y, 10, 0.3, 0.3, np.random.default_rng(4)))
    assert not np.array_equal(a, partition_rows(y, 10, 0.3, 0.3, np.random.default_rng(5)))
    assert a.dtype == np.int64 and np.bincount(a, minlength=10).min() >= 2 and set(a) == set(range(10))
    with pytest.raises(ValueError, match="cannot give 10 clients 2 samples each"):
        partition_rows(y[:19], 10, None, None, np.random.default_rng(0))


def test_small_alpha_skews_labels_and_none_or_large_follows_the_global_mix():
    y = np.arange(2000) % 4
    skewed = class_shares(partition_rows(y, 10, 0.05, None, np.random.default_rng(0)), y, 10)
    assert skewed.max(1).mean() > 0.7
    for alpha in (None, 1000.0):
        mixed = class_shares(partition_rows(y, 10, alpha, None, np.random.default_rng(0)), y, 10)
        assert np.abs(mixed - 0.25).max() < 0.12
        assert mixed.max(1).mean() < 0.35


def test_size_alpha_skews_sizes_and_none_gives_equal_sizes():
    y = np.arange(1003) % 4
    equal = np.bincount(partition_rows(y, 10, None, None, np.random.default_rng(1)), minlength=10)
    assert equal.sum() == 1003 and equal.max() - equal.min() <= 1
    sizes = np.bincount(partition_rows(y, 10, None, 0.3, np.random.default_rng(1)), minlength=10)
    assert sizes.sum() == 1003 and sizes.min() >= 2
    assert sizes.std() / sizes.mean() > 0.5 > 0.01 > equal.std() / equal.mean()


def test_tiny_alphas_still_give_a_partition():
    # Dirichlet(0.001) draws have exact zeros: a class's label shares times the client sizes can all underflow
    y = np.arange(40) % 4
    for seed in range(20):
        owner = partition_rows(y, 2, 0.001, 0.001, np.random.default_rng(seed))
        assert owner.min() >= 0 and owner.max() <= 1 and np.bincount(owner, minlength=2).min() >= 2


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(1, 3),
    st.integers(0, 60),
    st.integers(1, 5),
    st.sampled_from([None, 0.001, 0.05, 1.0, 100.0]),
    st.sampled_from([None, 0.001, 0.1, 1.0, 100.0]),
    st.integers(0, 2**32 - 1),
)
def test_partition_property(n_clients, min_size, extra, classes, alpha, size_alpha, seed):
    n = n_clients * min_size + extra
    y = np.random.default_rng(seed).integers(0, classes, n)
    owner = partition_rows(y, n_clients, alpha, size_alpha, np.random.default_rng(seed), min_size=min_size)
    assert owner.shape == (n,) and owner.min() >= 0 and owner.max() < n_clients
    assert np.bincount(owner, minlength=n_clients).min() >= min_size
    again = partition_rows(y, n_clients, alpha, size_alpha, np.random.default_rng(seed), min_size=min_size)
    assert np.array_equal(owner, again)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0, 1, allow_subnormal=False), min_size=1, max_size=20).filter(lambda s: sum(s) > 0),
    st.integers(0, 1000),
)
def test_shares_to_counts_property(shares, n):
    shares = np.array(shares)
    counts = shares_to_counts(shares, n)
    assert counts.sum() == n and counts.min() >= 0 and counts.dtype == np.int64
    assert np.abs(counts - shares / shares.sum() * n).max() < 1 + 1e-9


def test_shares_to_counts_largest_remainder():
    assert shares_to_counts(np.array([0.5, 0.3, 0.2]), 10).tolist() == [5, 3, 2]
    assert shares_to_counts(np.array([1.0, 1.0, 1.0]), 10).tolist() == [4, 3, 3]
    assert shares_to_counts(np.array([0.46, 0.44, 0.1]), 3).tolist() == [2, 1, 0]
    assert shares_to_counts(np.array([0.0, 2.0]), 5).tolist() == [0, 5]


def test_a_centralised_table_is_partitioned(tmp_path):
    df = central_table()
    path = write(df, tmp_path / "c.parquet")
    data = {"num_clients": 8, "global_clients": 2}
    ds = build(
        path, data=data, client_column=None, standardize=False, partition={"alpha": 0.5, "size_alpha": 1.0}
    )
    assert ds.num_clients == 8 and ds.client_names == [*sorted(ds.client_names[:8]), *ds.client_names[8:]]
    assert sorted(ds.client_names) == list(range(10)) and len(ds.global_sizes()) == 2
    assert min(ds.global_sizes()) >= 2
    rows = []
    for c in ds.clients(range(8)):
        n = len(c.y_train) + len(c.y_test)
        assert n >= 2 and len(c.y_train) == train_size(n, 0.7)
        rows.append(torch.cat([c.x_train, c.x_test]))
    gx, gy = ds.global_data()
    x = torch.cat([*rows, gx]).numpy()
    order = np.lexsort(x.T[::-1])
    assert np.allclose(
        x[order], df[["a", "b"]].to_numpy(np.float32)[np.lexsort(df[["a", "b"]].to_numpy().T[::-1])]
    )
    assert len(x) == 400 and sum(ds.global_sizes()) == len(gy)


def test_a_centralised_partition_is_seeded(tmp_path):
    path = write(central_table(), tmp_path / "c.csv")
    data = {"num_clients": 6, "global_clients": 1}
    a, b = build(path, 3, data, client_column=None), build(path, 3, data, client_column=None)
    other = build(path, 4, data, client_column=None)
    assert same(a, b) and not same(a, other)
    skewed = build(path, 3, data, client_column=None, partition={"alpha": 0.05})
    assert not same(a, skewed)


def test_too_small_a_centralised_table(tmp_path):
    path = write(central_table(n=10), tmp_path / "c.parquet")
    msg = error(path, data={"num_clients": 5, "global_clients": 1}, client_column=None)
    assert msg.startswith("data.num_clients: 10 rows cannot give 6 clients 2 samples each")
