"""The federation's plan: decided from the config and the data alone (no Ray), with errors that name
their key before any actor starts."""

import numpy as np
import pytest

from fedmeta.actors.privacy import noise_for
from fedmeta.sim.config import ConfigError, from_dict
from fedmeta.sim.engine.plan import FederationPlan
from fedmeta.sim.models import build_model, init_params, num_params
from fedmeta.sim.seeding import torch_gen
from tests.conftest import tiny_raw


def plan_of(**sections) -> FederationPlan:
    return FederationPlan.from_config(from_dict(tiny_raw(**sections)))


def test_the_plan_holds_what_the_actors_start_from():
    p = plan_of()
    cfg = p.cfg
    model = build_model(cfg.model, (1, 8, 8), 10)
    assert p.num_clients == 40 and p.input_shape == (1, 8, 8) and p.num_classes == 10
    assert p.n_params == num_params(model) == len(p.init_params)
    np.testing.assert_array_equal(p.init_params, init_params(model, torch_gen(cfg.seed, "init")).numpy())
    assert p.compute == "vmap" and p.secagg is None and not p.dp.enabled and not p.dp.bound_updates
    assert p.sample_rate == 10 / 40 and len(p.eval_ids) == 8 and sum(p.global_sizes) > 0
    assert len(p.input_profile["mean"]) == 64


def test_the_noise_is_resolved_once_from_the_target_epsilon():
    p = plan_of(privacy={"mode": "central", "target_epsilon": 30.0})
    assert p.dp.noise_multiplier == pytest.approx(noise_for(30.0, 0.25, 4, 1e-5))
    assert p.dp.expected_clients == 10 and p.dp.bound_updates


@pytest.mark.parametrize(
    "sections, key",
    [
        (
            {"privacy": {"mode": "central", "target_epsilon": 1e-6}},
            "privacy.target_epsilon: 1e-06 is out of reach",
        ),
        ({"secagg": {"enabled": True, "neighbors": 4, "threshold": 9}}, "secagg.threshold: must be in"),
        (
            {"secagg": {"enabled": True}, "federation": {"clients_per_round": 1}},
            "federation.clients_per_round: secure aggregation needs at least 2",
        ),
        (
            {
                "secagg": {"enabled": True, "quant_bits": 30},
                "privacy": {"mode": "distributed", "noise_multiplier": 1e12},
            },
            "secagg.quant_bits: ",
        ),  # the noise headroom would wrap the modulus
        (
            {
                "data": {
                    "kind": "synthetic",
                    "num_clients": 40,
                    "global_clients": 4,
                    "drift": {"at_round": 2, "rotation": 30.0},
                }
            },
            "data.drift.rotation: rotates images (channels, h, w); this data's inputs have shape (60,)",
        ),
    ],
)
def test_plan_errors_name_their_key(sections, key, tmp_path):
    raw = tiny_raw(**sections)
    with pytest.raises(ConfigError) as e:
        FederationPlan.from_config(from_dict(raw))
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_a_cohort_larger_than_the_data_is_refused_before_any_actor(tmp_path):
    # FEMNIST decides its number of clients from the files, so only the plan can check this
    from tests.sim.data.test_femnist import USERS, write_leaf

    write_leaf(tmp_path / "all_data.json", USERS, 10)  # 6 users: 4 form D_G, 2 federate
    raw = tiny_raw(data={"kind": "femnist", "femnist": {"path": str(tmp_path / "all_data.json")}})
    with pytest.raises(
        ConfigError, match="federation.clients_per_round: 10 exceeds the 2 clients in the data"
    ):
        FederationPlan.from_config(from_dict(raw))


def test_new_hyperparameters_keep_the_noise_and_refresh_secure_aggregation():
    """After tuning: z, q and the data stay; clipping and the secure-aggregation encoding follow the
    new clip norm (a stale quantization range would overflow or waste bits)."""
    p = plan_of(
        secagg={"enabled": True, "neighbors": 4}, privacy={"mode": "distributed", "noise_multiplier": 1.3}
    )
    raw = p.cfg.model_dump(mode="json")
    raw["privacy"]["clip_norm"] = 0.25
    raw["algorithm"]["lr"] = 0.3
    q = p.with_config(from_dict(raw))
    assert q.dp.noise_multiplier == 1.3 and q.dp.sample_rate == p.dp.sample_rate and q.data is p.data
    assert q.dp.clip_norm == 0.25 and q.secagg.clip == 0.25 and q.secagg.step == 0.25 / 2**16
    assert q.secagg.noise_multiplier == 1.3 and q.cfg.algorithm.lr == 0.3
    np.testing.assert_array_equal(q.init_params, p.init_params)


def test_the_secure_metric_sums_the_panel():
    p = plan_of(secagg={"enabled": True, "neighbors": 4})
    m = p.metric_secagg()
    assert m.clip == 1.0 and m.cohort == len(p.eval_ids) and m.noise_multiplier == 0.0
    tiny_panel = plan_of(secagg={"enabled": True}, eval={"num_individuals": 1})
    with pytest.raises(ConfigError, match="^eval.num_individuals: "):
        tiny_panel.metric_secagg()
