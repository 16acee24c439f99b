"""Drift scenarios: the same individuals' data after a configured round, repeatable from the seed."""

import pytest
import torch

from fedmeta.sim.config import from_dict
from fedmeta.sim.data import build_dataset
from fedmeta.sim.data.drift import DriftedDataset, data_for_round, rotate
from tests.conftest import tiny_raw


def datasets(**drift):
    cfg = from_dict(tiny_raw(data={"drift": {"at_round": 3, **drift}}))
    base = build_dataset(cfg.data, cfg.seed)
    return cfg, base, DriftedDataset(cfg.data, cfg.seed, base)


def test_rotation_drift_starts_at_its_round_and_keeps_labels():
    cfg, base, drifted = datasets(rotation=90.0)
    before, after = data_for_round(cfg.data, base, drifted, 2), data_for_round(cfg.data, base, drifted, 3)
    assert before is base and after is drifted
    a, b = base.client(5), drifted.client(5)
    torch.testing.assert_close(rotate(a.x_train, 90.0), b.x_train)
    assert torch.equal(a.y_train, b.y_train) and torch.equal(a.y_test, b.y_test)
    assert torch.equal(base.global_data()[0], drifted.global_data()[0])  # D_G does not drift
    again = DriftedDataset(cfg.data, cfg.seed, base).client(5)
    assert torch.equal(again.x_train, b.x_train)  # repeatable


def test_style_and_label_mix_drift():
    cfg, base, drifted = datasets(style_strength=2.5)
    a, b = base.client(4), drifted.client(4)
    assert torch.equal(a.y_train, b.y_train) and not torch.allclose(a.x_train, b.x_train)
    cfg, base, drifted = datasets(alpha=0.05)
    labels_before = torch.cat([c.y_train for c in base.clients(range(20))])
    labels_after = torch.cat([c.y_train for c in drifted.clients(range(20))])
    assert not torch.equal(labels_before, labels_after)


@pytest.mark.parametrize(
    "drift, message",
    [
        ({"at_round": 3}, "data.drift.at_round: set what drifts too"),
        ({"at_round": 0, "rotation": 5.0}, "data.drift.at_round: Input should be greater than or equal to 1"),
    ],
)
def test_bad_drift_configs_name_the_key(drift, message):
    from fedmeta.sim.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        from_dict(tiny_raw(data={"drift": drift}))


def test_joiners_hold_the_drifted_data_and_everyone_else_keeps_theirs():
    from fedmeta.sim.data.drift import JoinedDataset, drift_data, joiner_ids

    cfg = from_dict(tiny_raw(data={"drift": {"at_round": 3, "style_strength": 3.0, "joiners": 6}}))
    base = build_dataset(cfg.data, cfg.seed)
    joined = drift_data(cfg.data, cfg.seed, base, canaries=4)
    assert isinstance(joined, JoinedDataset)
    assert joiner_ids(40, 4, 6).tolist() == list(range(30, 36))  # before the canaries (36..39)
    drifted = DriftedDataset(cfg.data, cfg.seed, base)
    cids = [31, 2, 35, 29, 30]  # any order, joiners mixed in
    for c, got in zip(cids, joined.clients(cids)):
        want = (drifted if 30 <= c < 36 else base).client(c)
        assert (
            got.cid == c and torch.equal(got.x_train, want.x_train) and torch.equal(got.y_test, want.y_test)
        )
    # joiners hold their own data from the start: they are only out of the federation before round 3
    assert data_for_round(cfg.data, base, joined, 0) is joined is data_for_round(cfg.data, base, joined, 3)
    assert torch.equal(joined.global_data()[0], base.global_data()[0])


@pytest.mark.parametrize(
    "drift, message",
    [
        ({"joiners": 5}, "data.drift.joiners: new individuals join at at_round; set data.drift.at_round"),
        ({"joiners": -1}, "data.drift.joiners: Input should be greater than or equal to 0"),
    ],
)
def test_bad_joiners_name_the_key(drift, message):
    from fedmeta.sim.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        from_dict(tiny_raw(data={"drift": drift}))


def test_joiners_must_leave_someone_in_the_federation():
    from fedmeta.sim.config import ConfigError
    from fedmeta.sim.engine.plan import FederationPlan

    cfg = from_dict(tiny_raw(data={"drift": {"at_round": 2, "style_strength": 3.0, "joiners": 40}}))
    with pytest.raises(ConfigError, match="data.drift.joiners: 40 leaves nobody in the federation"):
        FederationPlan.from_config(cfg)
    plan = FederationPlan.from_config(
        cfg.model_copy(
            update={
                "data": cfg.data.model_copy(
                    update={"drift": cfg.data.drift.model_copy(update={"joiners": 10})}
                )
            }
        )
    )
    assert plan.absent(1).tolist() == list(range(30, 40)) and plan.absent(2).size == 0
