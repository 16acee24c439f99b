"""Issue 26, item 8: the model card's input profile and panel quality are, under DP, Gaussian
releases composed into the run's epsilon; without DP they are exact and marked not private."""

import math

import numpy as np
import pytest

from fedmeta.actors.privacy import PrivacyAccountant, RunAccounting, Sampling, UserLevelDP
from fedmeta.sim.config import from_dict
from fedmeta.sim.engine.plan import FederationPlan, profile_ids
from fedmeta.sim.run.card_stats import (
    card_statistics,
    client_moments,
    clip_rows,
    noisy_profile,
    profile_release_noise,
    release_card_statistics,
)
from fedmeta.sim.seeding import torch_gen
from tests.conftest import tiny_raw

DP = {"mode": "central", "noise_multiplier": 1.0, "audit_canaries": 0}


def test_each_client_is_clipped_and_without_noise_the_profile_is_the_clients_mixture():
    rows = np.array([[3.0, 4.0, 0.0, 0.0], [0.3, 0.4, 0.25, 0.5]])
    assert np.allclose(np.linalg.norm(clip_rows(rows, 1.0), axis=1), [1.0, np.linalg.norm(rows[1])])
    p = noisy_profile(rows[1:], clip=10.0, noise_multiplier=0.0, source=torch_gen(0, "t"))
    assert p["mean"] == pytest.approx([0.3, 0.4]) and p["var"] == pytest.approx([0.25 - 0.09, 0.5 - 0.16])
    assert p["n"] == 1  # n counts clients, not their samples


def test_the_profile_noise_is_z_c_on_the_sum_and_accounted_by_the_adjacency():
    moments = np.full((64, 400), 0.5)
    p = noisy_profile(moments, clip=2.0, noise_multiplier=1.5, source=torch_gen(0, "t"))
    residual = (np.array(p["mean"]) - 0.5) * 64  # the noise on the sum of the first half
    assert np.std(residual) == pytest.approx(1.5 * 2.0, rel=0.15)
    poisson, fixed = Sampling("poisson", 40, 10), Sampling("fixed", 40, 10)
    assert profile_release_noise(UserLevelDP("central", noise_multiplier=1.5, sampling=poisson)) == 1.5
    assert profile_release_noise(UserLevelDP("central", noise_multiplier=1.5, sampling=fixed)) == 0.75  # 2C


def test_without_dp_the_card_ships_the_exact_statistics_marked_not_private(tmp_path):
    plan = FederationPlan.from_config(from_dict(tiny_raw(tmp_path)))
    ev = {
        "acc_global_DI": {"mean": 0.4},
        "acc_personalized_DI": {"mean": 0.6},
        "acc_global_DG": {"mean": 0.3},
    }
    card = card_statistics(plan, ev, None)
    assert card["input_profile"] == plan.input_profile
    assert card["quality"] == {"acc_global_DI": 0.4, "acc_personalized_DI": 0.6, "acc_global_DG": 0.3}
    assert card["statistics_privacy"]["private"] is False


@pytest.mark.adversary
def test_with_no_budget_left_nothing_exact_ships_and_nothing_more_is_spent(tmp_path):
    plan = FederationPlan.from_config(from_dict(tiny_raw(tmp_path, privacy={**DP, "target_epsilon": 1.0})))
    accounting = RunAccounting(plan.dp)
    while accounting.budget_stop() is None:  # the rounds spend the whole budget
        accounting.record_round({})
    spent = accounting.epsilon()
    released = release_card_statistics(
        plan, accounting, torch_gen(0, "t"), lambda: pytest.fail("released"), 4
    )
    assert accounting.epsilon() == spent
    ev = {"acc_global_DI": {"mean": 0.4}, "acc_personalized_DI": {"mean": 0.6}}
    card = card_statistics(plan, ev, released)
    assert card["input_profile"] is None and card["quality"] == {}
    assert "privacy budget" in card["statistics_privacy"]["input_profile"]["reason"]
    # before the final evaluation a DP card carries neither
    assert (
        card_statistics(plan, ev, None)["input_profile"] is None
        and card_statistics(plan, ev, None)["quality"] == {}
    )


@pytest.mark.slow
@pytest.mark.adversary
def test_under_dp_the_card_is_noised_at_the_accounted_scale_and_epsilon_includes_it(ray_session, tmp_path):
    from fedmeta.sim.checkpoint import load_model
    from fedmeta.sim.run.experiment import run_experiment

    cfg = from_dict(tiny_raw(tmp_path, privacy=DP, run={"seeded_secrets": True}))
    run_dir, s = run_experiment(cfg)
    _, card = load_model(run_dir)
    plan = FederationPlan.from_config(cfg)
    stats = card["statistics_privacy"]
    assert stats["private"] and stats["input_profile"]["released"] and stats["quality"]["released"]

    # the attacker's view: the exact statistic next to what shipped
    exact = client_moments(plan.data, profile_ids(plan.num_clients, cfg.seed))
    k, d = exact.shape[0], exact.shape[1] // 2
    clip = math.sqrt(2 * d)  # the default: inputs in [0, 1] are never clipped
    assert np.linalg.norm(exact, axis=1).max() <= clip
    residual = np.array(card["input_profile"]["mean"]) - exact[:, :d].mean(0)
    assert card["input_profile"]["mean"] != plan.input_profile["mean"]
    assert np.std(residual) == pytest.approx(1.0 * clip / k, rel=0.3)  # noise std z C on the sum of k clients
    assert (
        stats["input_profile"]["noise_std"] == pytest.approx(clip) and stats["input_profile"]["clients"] == k
    )

    # the un-noised panel means are not what ships: the released ones are, within the noise
    for key in ("acc_global_DI", "acc_personalized_DI"):
        exact_mean, shipped = s[key]["mean"], card["quality"][key]
        assert shipped != exact_mean and abs(shipped - exact_mean) < 6 * 1.0 / s["eval_individuals"]

    # epsilon: the rounds and both releases, composed; more than the rounds alone
    rounds = PrivacyAccountant()
    for _ in range(s["rounds"]):
        rounds.step(1.0, plan.dp.sample_rate)
    alone = rounds.epsilon(plan.dp.delta)
    rounds.release(1.0)  # the profile: sensitivity C, noise z C
    rounds.release(1.0 / math.sqrt(2))  # the two panel sums: the tuning metric's release
    assert s["epsilon"] == pytest.approx(rounds.epsilon(plan.dp.delta), rel=1e-9) and s["epsilon"] > alone
    assert card["privacy"]["epsilon"] == pytest.approx(s["epsilon"], rel=1e-9)
