"""FEMNIST loader on small LEAF-format files written by the tests."""

import json
import re

import numpy as np
import pytest
import torch

from fedmeta.sim.config import ConfigError, DataConfig, FemnistConfig
from fedmeta.sim.data import build_dataset
from fedmeta.sim.data.femnist import FemnistDataset

USERS = ["f0003_11", "f0001_07", "f0002_42", "f0000_10", "f0005_3", "f0004_9"]  # sorted: 0000, 0001, ...


def user_samples(uid: str, n: int, start: int) -> dict:
    """n distinct images: pixel 0 encodes the user, pixel 1 the sample's index."""
    x = np.full((n, 784), 0.5, dtype=np.float32)
    x[:, 0] = USERS.index(uid) / 10
    x[:, 1] = np.arange(start, start + n) / 100
    return {"x": x.tolist(), "y": [(USERS.index(uid) + i) % 62 for i in range(start, start + n)]}


def write_leaf(path, users, n, start=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {u: user_samples(u, n, start) for u in users}
    path.write_text(json.dumps({"users": list(users), "num_samples": [n] * len(users), "user_data": data}))


@pytest.fixture
def leaf_dir(tmp_path):
    """LEAF layout: train/ and test/ hold different samples of the same users (10 + 4 each)."""
    write_leaf(tmp_path / "train" / "all_data_0_train.json", USERS[:3], 10)
    write_leaf(tmp_path / "train" / "all_data_1_train.json", USERS[3:], 10)
    write_leaf(tmp_path / "test" / "all_data_0_test.json", USERS, 4, start=10)
    (tmp_path / "README.txt").write_text("not json, ignored")
    return tmp_path


def femnist(path, seed=0, **data) -> FemnistDataset:
    data = {"num_clients": 100, "global_clients": 2, **data}
    return build_dataset(DataConfig(kind="femnist", femnist=FemnistConfig(path=str(path)), **data), seed)


def samples(c) -> tuple[np.ndarray, np.ndarray]:
    return torch.cat([c.x_train, c.x_test]).flatten(1).numpy(), torch.cat([c.y_train, c.y_test]).numpy()


def test_users_are_sorted_and_the_last_form_d_g(leaf_dir):
    ds = femnist(leaf_dir)
    ordered = sorted(USERS)
    assert ds.user_ids == ordered[:4] and ds.global_user_ids == ordered[4:]
    assert ds.num_clients == 4 and ds.num_classes == 62 and ds.input_shape == (1, 28, 28)
    gx, gy = ds.global_data()
    assert gx.shape == (2 * 14, 1, 28, 28) and gy.shape == (28,)
    owners = [round(v * 10) for v in gx[:, 0, 0, 0].tolist()]
    assert set(owners) == {USERS.index(u) for u in ordered[4:]}
    # global_sizes: one contiguous block per D_G user, in global_data() order
    sizes = ds.global_sizes()
    assert sum(sizes) == 28 and len(sizes) == 2
    assert len(set(owners[: sizes[0]])) == 1 and len(set(owners[sizes[0] :])) == 1


def test_a_users_samples_are_merged_across_files_then_split(leaf_dir):
    ds = femnist(leaf_dir)
    c = ds.client(1)
    assert (len(c.y_train), len(c.y_test)) == (10, 4)  # round(14 * 0.7) of the 10 + 4 samples
    x, y = samples(c)
    owner = USERS.index(ds.user_ids[1])
    assert np.allclose(x[:, 0], owner / 10)
    assert sorted(np.round(x[:, 1] * 100).astype(int)) == list(range(14))  # every sample once
    index = np.round(x[:, 1] * 100).astype(int)
    assert np.array_equal(y, (owner + index) % 62)  # labels stay with their images
    assert c.x_train.dtype == torch.float32 and c.y_train.dtype == torch.int64


def test_split_is_seeded(leaf_dir):
    a, b, other = femnist(leaf_dir, seed=1), femnist(leaf_dir, seed=1), femnist(leaf_dir, seed=2)
    assert torch.equal(a.client(0).x_train, b.client(0).x_train)
    assert torch.equal(a.clients([2, 0])[1].y_test, a.client(0).y_test)
    assert not torch.equal(a.client(0).x_train, other.client(0).x_train)


def test_num_clients_caps_the_federation(leaf_dir):
    ds = femnist(leaf_dir, num_clients=2)
    assert ds.num_clients == 2 and ds.user_ids == sorted(USERS)[:2]
    with pytest.raises(ValueError, match=r"client id 2 out of range: valid ids are 0\.\.1"):
        ds.client(2)


def test_a_single_file_and_large_labels(tmp_path):
    f = tmp_path / "one.json"
    write_leaf(f, USERS[:3], 5)
    data = json.loads(f.read_text())
    data["user_data"][USERS[0]]["y"][0] = 70
    f.write_text(json.dumps(data))
    ds = femnist(f, global_clients=1)
    assert ds.num_clients == 2 and ds.num_classes == 71


def error(path, **data) -> str:
    with pytest.raises(ConfigError) as e:
        femnist(path, **data)
    return str(e.value)


def test_missing_path(tmp_path):
    assert error(tmp_path / "nope") == f"data.femnist.path: no such file or directory: {tmp_path / 'nope'}"


def test_directory_without_json(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    assert error(tmp_path) == f"data.femnist.path: no LEAF JSON files under {tmp_path}"


def test_json_that_is_not_leaf(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"users": ["u"], "num_samples": [1]}))
    assert error(tmp_path) == f"data.femnist.path: {f} is not LEAF JSON (missing 'user_data')"


def test_invalid_json(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('{"user_data": ')
    assert re.fullmatch(
        rf"data\.femnist\.path: {re.escape(str(f))} is not valid JSON \(line 1, column \d+\)", error(f)
    )


def test_wrong_image_size(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"user_data": {"u": {"x": [[0.0] * 10], "y": [1]}}}))
    msg = error(f)
    assert msg.startswith(f"data.femnist.path: {f}: user 'u': images have shape (10,)") and "784" in msg


def test_images_and_labels_disagree(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"user_data": {"u": {"x": [[0.0] * 784] * 2, "y": [1]}}}))
    assert error(f) == f"data.femnist.path: {f}: user 'u': 2 images but 1 labels"


def test_too_few_users_for_global_clients(leaf_dir):
    msg = error(leaf_dir, global_clients=6)
    assert msg.startswith("data.global_clients: 6 users are held out for D_G")
    assert "only 6 users with samples; need at least 7" in msg
