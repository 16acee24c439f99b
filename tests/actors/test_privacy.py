"""DP stage: clipping, central and distributed noise, Opacus accounting, MIA audit, privacy penalty."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmeta.actors.privacy import (
    PrivacyAccountant,
    budget_spent,
    central_noise,
    clip_update,
    clip_updates,
    distributed_noise_share,
    effective_noise_multiplier,
    epsilon_for,
    mia_auc,
    noise_for,
)
from fedmeta.sim.seeding import np_rng, torch_gen

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
vectors = arrays(np.float32, st.integers(1, 64), elements=finite)
clip_norms = st.floats(1e-2, 1e2)
ROUNDING = 1 + 1e-5  # float32 scaling may land a few ulps outside the ball


# ---------------------------------------------------------------- clipping
@settings(max_examples=200, deadline=None)
@given(vectors, clip_norms)
def test_clip_norm_bounded_and_direction_kept(v, c):
    u = torch.from_numpy(v)
    out, m = clip_update(u, c)
    assert float(torch.linalg.vector_norm(out)) <= c * ROUNDING
    norm = float(torch.linalg.vector_norm(u))
    assert m["norm"] == pytest.approx(norm, rel=1e-6)
    if abs(norm - c) > 1e-6 * c:  # at the boundary float32 vs float64 comparisons may disagree
        assert m["clipped"] == (norm > c)
    # direction kept: out is a non-negative multiple of u
    scale = min(1.0, c / norm) if norm > 0 else 1.0
    torch.testing.assert_close(out, u * scale, rtol=1e-5, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(vectors, clip_norms)
def test_clip_unchanged_inside_ball(v, c):
    u = torch.from_numpy(v)
    norm = float(torch.linalg.vector_norm(u))
    inside = u * (0.99 * c / norm) if norm > c else u
    out, m = clip_update(inside, c)
    assert torch.equal(out, inside)
    assert not m["clipped"]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8), st.integers(1, 16), clip_norms, st.integers(0, 2**31 - 1))
def test_clip_updates_matches_rowwise(clients, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(clients, n, generator=g) * torch.rand(clients, 1, generator=g) * 3 * c
    out, m = clip_updates(u, c)
    for i in range(clients):
        row, mi = clip_update(u[i], c)
        torch.testing.assert_close(out[i], row)
        assert m["norms"][i] == pytest.approx(mi["norm"], rel=1e-6)
    assert (torch.linalg.vector_norm(out, dim=1) <= c * ROUNDING).all()
    assert m["clipped_fraction"] == pytest.approx(np.mean([x > c for x in m["norms"]]))


def test_clip_rejects_bad_norm():
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(torch.ones(3), 0.0)


# ---------------------------------------------------------------- central noise
def test_central_noise_std_matches_z_c():
    z, c, n = 1.3, 0.7, 200_000
    noised, m = central_noise(torch.zeros(n, dtype=torch.float64), c, z, torch_gen(0, "noise"))
    assert m["noise_std"] == pytest.approx(z * c)
    # sample std of 2e5 normals is within ~0.3% (1 sd); allow 1.5%
    assert float(noised.std()) == pytest.approx(z * c, rel=0.015)
    assert abs(float(noised.mean())) < 5 * z * c / n**0.5


def test_central_noise_deterministic_from_generator():
    s = torch.arange(10, dtype=torch.float32)
    a, _ = central_noise(s, 1.0, 1.0, torch_gen(7, "round", 3))
    b, _ = central_noise(s, 1.0, 1.0, torch_gen(7, "round", 3))
    c, _ = central_noise(s, 1.0, 1.0, torch_gen(7, "round", 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- distributed Skellam noise
def test_distributed_shares_sum_to_target_variance():
    z, c, step, k, n = 1.1, 1.0, 0.05, 20, 20_000
    shares = [distributed_noise_share(n, c, z, k, step, np_rng(1, "client", i)) for i in range(k)]
    assert all(s.dtype == np.int64 and s.shape == (n,) for s in shares)
    total = np.sum(shares, axis=0)
    target = (z * c / step) ** 2  # 484 steps^2
    assert total.var() == pytest.approx(target, rel=0.04)
    assert abs(total.mean()) < 5 * target**0.5 / n**0.5


def test_distributed_share_deterministic_from_generator():
    a = distributed_noise_share(100, 1.0, 1.0, 10, 0.01, np_rng(5, "client", 2))
    b = distributed_noise_share(100, 1.0, 1.0, 10, 0.01, np_rng(5, "client", 2))
    c = distributed_noise_share(100, 1.0, 1.0, 10, 0.01, np_rng(5, "client", 3))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_effective_noise_multiplier_uses_survivors():
    assert effective_noise_multiplier(1.0, 100, 100) == pytest.approx(1.0)
    assert effective_noise_multiplier(1.0, 100, 81) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="survivors"):
        effective_noise_multiplier(1.0, 100, 0)


# ---------------------------------------------------------------- accounting
@pytest.mark.parametrize(
    "name, opacus_cls, steps", [("rdp", RDPAccountant, 2250), ("prv", PRVAccountant, 200)]
)
def test_epsilon_reproduces_opacus(name, opacus_cls, steps):
    z, q, delta = 1.5, 0.04, 1e-5
    ref = opacus_cls()
    ours = PrivacyAccountant(name)
    for _ in range(steps):
        ref.step(noise_multiplier=z, sample_rate=q)
        ours.step(z, q)
    expected = ref.get_epsilon(delta=delta)
    assert ours.steps == steps
    assert ours.epsilon(delta) == pytest.approx(expected, rel=1e-6)
    assert epsilon_for(z, q, steps, delta, name) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_for_inverts_epsilon_for(accountant):
    z, q, steps, delta = 1.2, 0.05, 100, 1e-5
    eps = epsilon_for(z, q, steps, delta, accountant)
    found = noise_for(eps, q, steps, delta, accountant)
    assert found == pytest.approx(z, rel=0.02)
    # Opacus returns the safe end of its bracket: never over budget
    assert epsilon_for(found, q, steps, delta, accountant) <= eps


def test_budget_spent_flips_when_exceeded():
    z, q, delta = 1.0, 0.1, 1e-5
    target = epsilon_for(z, q, 10, delta)
    acc = PrivacyAccountant()
    assert acc.epsilon(delta) == 0.0 and not budget_spent(acc, target, delta)
    for _ in range(10):
        acc.step(z, q)
    assert not budget_spent(acc, target, delta)
    acc.step(z, q)
    assert budget_spent(acc, target, delta)


def test_budget_spent_next_round_stops_before_overshoot():
    z, q, delta = 1.0, 0.1, 1e-5
    target = epsilon_for(z, q, 10, delta)
    acc = PrivacyAccountant()
    for _ in range(9):
        acc.step(z, q)
    assert not budget_spent(acc, target, delta, next_round=(z, q))
    acc.step(z, q)
    assert budget_spent(acc, target, delta, next_round=(z, q))
    assert acc.steps == 10  # the look-ahead did not step the real accountant


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_state_dict_round_trip_continues_identically(accountant):
    a = PrivacyAccountant(accountant)
    for z in (1.0, 1.0, 1.5):
        a.step(z, 0.05)
    state = a.state_dict()
    b = PrivacyAccountant(accountant)
    b.load_state_dict(state)
    assert b.state_dict() == state and b.steps == 3
    for acc in (a, b):
        acc.step(1.5, 0.05)
        acc.step(2.0, 0.1)
    assert a.state_dict() == b.state_dict()
    assert a.epsilon(1e-5) == b.epsilon(1e-5)


def test_state_dict_is_plain_and_checked():
    import json

    a = PrivacyAccountant("rdp")
    a.step(1.0, 0.1)
    assert json.loads(json.dumps(a.state_dict())) == a.state_dict()
    with pytest.raises(ValueError, match="accountant"):
        PrivacyAccountant("prv").load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="accountant"):
        PrivacyAccountant("gdp")  # type: ignore[arg-type]


# ---------------------------------------------------------------- membership inference
def test_mia_auc_half_on_identical_distributions():
    rng = np_rng(0, "mia")
    auc = mia_auc(rng.exponential(1.0, 5000), rng.exponential(1.0, 5000))
    assert auc == pytest.approx(0.5, abs=0.03)


def test_mia_auc_near_one_when_members_fit_better():
    rng = np_rng(1, "mia")
    auc = mia_auc(rng.exponential(0.01, 1000), 1.0 + rng.exponential(1.0, 1000))
    assert auc > 0.99


def test_local_ledger_reports_the_worst_client():
    from fedmeta.actors.privacy import LocalDPLedger

    ledger = LocalDPLedger(1.1)
    assert ledger.epsilon(1e-5) == 0.0
    for _ in range(3):
        ledger.record(7, 10, 0.25)  # client 7: 3 participations of 10 steps at q = 0.25
    ledger.record(8, 10, 0.25)
    ledger.record(9, 40, 0.05)  # a bigger client: lower rate, more steps
    worst = max(epsilon_for(1.1, 0.25, 30, 1e-5), epsilon_for(1.1, 0.05, 40, 1e-5))
    assert ledger.epsilon(1e-5) == pytest.approx(worst, rel=1e-12)
    again = LocalDPLedger(1.1)
    again.load_state_dict(ledger.state_dict())
    assert again.epsilon(1e-5) == ledger.epsilon(1e-5)
    with pytest.raises(ValueError, match="sample_rate"):
        ledger.record(1, 1, 1.5)


# ---------------------------------------------------------------- the run's DP object and its accounting
def test_client_half_clips_and_equalizes_only_when_bounded():
    from fedmeta.actors.privacy import UserLevelDP

    u = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    same, w = UserLevelDP().client_half(u, [5.0, 7.0])
    assert torch.equal(same, u) and w.tolist() == [5.0, 7.0]
    for dp in (
        UserLevelDP("central", clip_norm=1.0, bound_updates=True),
        UserLevelDP(clip_norm=1.0, bound_updates=True),
    ):
        clipped, w = dp.client_half(u, [5.0, 7.0])  # DP, or secure aggregation's fixed-point range
        torch.testing.assert_close(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
        assert w.tolist() == [1.0, 1.0]


def test_server_half_noise_and_denominator_by_mode():
    from fedmeta.actors.privacy import UserLevelDP

    total = torch.zeros(20000)
    mean, met = UserLevelDP().server_half(total + 6.0, 3.0, torch_gen(0, "x"))
    assert torch.equal(mean, torch.full((20000,), 2.0)) and met == {}  # off: divided by the weight
    central = UserLevelDP("central", clip_norm=2.0, noise_multiplier=0.5, expected_clients=10)
    mean, met = central.server_half(total, 3.0, torch_gen(0, "x"))
    assert met["noise_std"] == 1.0 and float(mean.std()) == pytest.approx(0.1, rel=0.05)  # z C / cohort
    distributed = UserLevelDP("distributed", clip_norm=2.0, noise_multiplier=0.5, expected_clients=10)
    mean, met = distributed.server_half(total + 5.0, 3.0, torch_gen(0, "x"))
    assert met == {} and torch.equal(mean, torch.full((20000,), 0.5))  # the shares are already in the sum


def test_noise_shares_and_round_noise_only_in_the_distributed_mode():
    from fedmeta.actors.privacy import UserLevelDP

    central = UserLevelDP("central", noise_multiplier=1.2, expected_clients=10)
    assert central.noise_share(5, 0.01, np_rng(0, "s")) is None and central.round_noise(7) == 1.2
    dist = UserLevelDP("distributed", noise_multiplier=1.2, expected_clients=10)
    assert dist.noise_share(5, 0.01, np_rng(0, "s")).dtype == np.int64
    assert dist.round_noise(7) == pytest.approx(effective_noise_multiplier(1.2, 10, 7))


def test_run_accounting_steps_released_rounds_and_stops_before_the_budget():
    from fedmeta.actors.privacy import RunAccounting, Sampling, UserLevelDP

    dp = UserLevelDP(
        "central", noise_multiplier=1.0, sampling=Sampling("poisson", 40, 10), target_epsilon=5.0
    )
    acc = RunAccounting(dp)
    acc.record_round({"skipped": True})  # an aborted round released nothing
    assert acc.epsilon() == 0.0 and acc.budget_stop() is None
    rounds = 0
    while acc.budget_stop() is None:
        acc.record_round({"skipped": False})
        rounds += 1
    assert acc.epsilon() == pytest.approx(epsilon_for(1.0, 0.25, rounds, 1e-5)) and acc.epsilon() <= 5.0
    assert epsilon_for(1.0, 0.25, rounds + 1, 1e-5) > 5.0 and "epsilon 5.0" in acc.budget_stop()
    again = RunAccounting(dp)
    again.load_state_dict(acc.state_dict())
    assert again.epsilon() == acc.epsilon()


def test_accounting_facts_are_what_summary_and_card_report():
    from fedmeta.actors.privacy import RunAccounting, SampleLevelDP, Sampling, UserLevelDP

    off = RunAccounting(UserLevelDP(sampling=Sampling("fixed", 100, 10))).facts()
    assert off == {
        "mode": "off",
        "differential_privacy": False,
        "epsilon": None,
        "delta": None,
        "noise_multiplier": None,
        "clip_norm": None,
        "accountant": None,
        "sample_rate": 0.1,
        "sampling": "fixed",
        "adjacency": None,
        "local_dp": None,
        "epsilon_by_party": None,
        "noise_sampler": None,
    }
    acc = RunAccounting(
        UserLevelDP(sampling=Sampling("fixed", 100, 10)),
        SampleLevelDP(clip=1.0, noise_multiplier=0.8, batch_size=8),
    )
    acc.record_round({"local_dp_releases": [(3, 4, 16), (5, 4, 16)]})
    assert acc.facts()["local_dp"] == {
        "clip": 1.0,
        "noise_multiplier": 0.8,
        "epsilon": pytest.approx(epsilon_for(0.8, 0.5, 4, 1e-5)),
    }


# ---------------------------------------------------------------- sampling and its accounting
def test_the_dp_quickstart_under_each_sampling():
    """Population 2,000, cohort 100, z = 1, 300 rounds, delta 1e-5: Poisson sampling is what
    Opacus accounts (6.46); fixed-size cohorts without replacement, replace-one, are far weaker."""
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    from fedmeta.actors.privacy import Sampling

    assert epsilon_for(1.0, 0.05, 300, 1e-5) == pytest.approx(6.46, abs=0.01)
    fixed = epsilon_for(1.0, 0.05, 300, 1e-5, sampling=Sampling("fixed", 2000, 100))
    reference = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    reference.compose(
        dpa.SelfComposedDpEvent(
            dpa.SampledWithoutReplacementDpEvent(2000, 100, dpa.GaussianDpEvent(0.5)), 300
        )
    )  # sensitivity 2C
    assert fixed == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9) and fixed == pytest.approx(
        82.5, abs=0.1
    )


def test_fixed_cohort_accountant_composes_varying_rounds_and_checkpoints():
    from fedmeta.actors.privacy import FixedCohortAccountant, Sampling, make_accountant

    s = Sampling("fixed", 500, 50)
    acc = make_accountant("rdp", s)
    assert isinstance(acc, FixedCohortAccountant) and acc.epsilon(1e-5) == 0.0
    for z in (1.0, 1.0, 0.8, 1.0):  # e.g. distributed noise with dropouts: z varies per round
        acc.step(z, s.rate)
    assert acc.steps == 4 and [h[2] for h in acc.history] == [2, 1, 1]
    one_by_one = [epsilon_for(z, s.rate, 1, 1e-5, sampling=s) for z in (1.0, 0.8)]
    assert acc.epsilon(1e-5) > max(one_by_one)
    again = make_accountant("rdp", s)
    again.load_state_dict(acc.state_dict())
    assert again.epsilon(1e-5) == acc.epsilon(1e-5)
    with pytest.raises(ValueError, match="sampling: state is for"):
        make_accountant("rdp", Sampling("fixed", 500, 60)).load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match="^privacy.accountant: 'prv' accounts Poisson sampling only"):
        make_accountant("prv", s)


def test_noise_for_fixed_cohorts_meets_the_target_from_below():
    from fedmeta.actors.privacy import Sampling

    s = Sampling("fixed", 2000, 100)
    z = noise_for(8.0, s.rate, 300, 1e-5, sampling=s)
    eps = epsilon_for(z, s.rate, 300, 1e-5, sampling=s)
    assert 8.0 - 0.01 <= eps <= 8.0 and z > noise_for(8.0, s.rate, 300, 1e-5)  # fixed needs more noise


def test_sampling_is_validated():
    from fedmeta.actors.privacy import Sampling

    with pytest.raises(ValueError, match="cohort: must be in"):
        Sampling("fixed", 10, 11)
    with pytest.raises(ValueError, match="sampling: expected poisson or fixed"):
        Sampling("uniform", 10, 5)
    assert Sampling("poisson", 40, 10).adjacency == "add/remove one user"
    assert Sampling("fixed", 40, 10).adjacency == "replace one user"


def test_releases_compose_with_rounds_and_checkpoint():
    """A tuning metric release is an unsampled Gaussian step; `steps` counts rounds only; the
    state round-trips, for Poisson (Opacus) and fixed-size cohorts (dp-accounting) alike."""
    from fedmeta.actors.privacy import FixedCohortAccountant, PrivacyAccountant, Sampling, epsilon_for

    acc = PrivacyAccountant("rdp")
    for _ in range(5):
        acc.step(1.0, 0.1)
    before = acc.epsilon(1e-5)
    acc.release(2.0)
    assert acc.steps == 5 and acc.epsilon(1e-5) > before
    assert acc.epsilon(1e-5) > epsilon_for(2.0, 1.0, 1, 1e-5)  # more than the release alone
    again = PrivacyAccountant.from_state_dict(acc.state_dict())
    assert again.steps == 5 and again.epsilon(1e-5) == pytest.approx(acc.epsilon(1e-5))
    fixed = FixedCohortAccountant(Sampling("fixed", 100, 10))
    fixed.step(1.0)
    e1 = fixed.epsilon(1e-5)
    fixed.release(2.0)
    fixed.release(2.0)
    assert fixed.releases == [[2.0, 2]] and fixed.epsilon(1e-5) > e1 and fixed.steps == 1
    copy_ = FixedCohortAccountant(Sampling("fixed", 100, 10))
    copy_.load_state_dict(fixed.state_dict())
    assert copy_.epsilon(1e-5) == pytest.approx(fixed.epsilon(1e-5))


@pytest.mark.parametrize("kind, accountant", [("poisson", "rdp"), ("fixed", "rdp"), ("poisson", "prv")])
def test_privacy_budget_refuses_what_would_overshoot(kind, accountant):
    from fedmeta.actors.privacy import PrivacyBudget, Sampling, UserLevelDP, make_accountant

    dp = UserLevelDP("central", 1.0, 4.0, 10, Sampling(kind, 100, 10), 1e-5, accountant)
    base = make_accountant(accountant, dp.sampling)
    for _ in range(3):
        base.step(1.0, 0.1)
    spent_before = base.epsilon(1e-5)
    target = spent_before + 2.0
    budget = PrivacyBudget(dp, base.state_dict(), target)
    granted = []
    while (rid := budget.reserve(4.0, dp.metric_release_noise)) is not None:
        granted.append(rid)
        assert len(granted) < 1000
    out = budget.epsilon()
    assert granted and out["epsilon_total"] <= target < out["epsilon_total"] + 10
    assert out["reserved_rounds"] == len(granted) and out["epsilon_tuning"] < out["epsilon_total"]
    # the same composition built by hand: the base rounds, then each granted round and release
    ref = make_accountant(accountant, dp.sampling)
    ref.load_state_dict(base.state_dict())
    for _ in granted:
        ref.step(4.0, 0.1)
        ref.release(4.0 / 2**0.5)
    assert out["epsilon_total"] == pytest.approx(ref.epsilon(1e-5))
    # settling a round that released no model (e.g. a skipped round) leaves only its metric release
    budget.settle(granted[0], 0.0, dp.metric_release_noise)
    assert budget.epsilon()["epsilon_total"] < out["epsilon_total"]
    with pytest.raises(KeyError, match="reservation 9999: unknown"):
        budget.settle(9999, 1.0, 1.0)
    # no target: every reservation is granted
    assert PrivacyBudget(dp).reserve(1.0, 1.0) == 0


def test_privacy_budget_counts_a_round_without_a_report_as_the_round_alone():
    """release_z 0: a trial round that reports nothing (tune.report_every) spends its subsampled
    round only; a release-only reservation (round_z 0) spends its report only."""
    from fedmeta.actors.privacy import PrivacyBudget, Sampling, UserLevelDP, make_accountant

    dp = UserLevelDP("central", 1.0, 2.0, 10, Sampling("poisson", 100, 10), 1e-5, "rdp")
    budget = PrivacyBudget(dp)
    budget.reserve(2.0, 0.0)
    budget.reserve(2.0, 0.0)
    budget.reserve(0.0, 3.0)
    ref = make_accountant("rdp", dp.sampling)
    ref.step(2.0, 0.1)
    ref.step(2.0, 0.1)
    ref.release(3.0)
    out = budget.epsilon()
    assert (
        out["epsilon_total"] == pytest.approx(ref.epsilon(1e-5)) and out["accountant_state"]["releases"] == 1
    )


def test_metric_noise_is_its_own_multiplier():
    """privacy.metric_noise_multiplier sets the panel releases' noise (accuracies, leakage, the
    card's quality) apart from the model's z; unset, it is z."""
    from fedmeta.actors.privacy import Sampling, UserLevelDP
    from fedmeta.sim.config import ConfigError, from_dict
    from fedmeta.sim.engine.plan import FederationPlan
    from tests.conftest import tiny_raw

    dp = UserLevelDP("central", 1.0, 2.0, 10, Sampling("poisson", 100, 10))
    assert dp.metric_noise == 2.0 and dp.metric_release_noise == pytest.approx(2.0 / 2**0.5)
    raw = tiny_raw(
        privacy={
            "mode": "central",
            "noise_multiplier": 2.0,
            "metric_noise_multiplier": 8.0,
            "audit_canaries": 0,
        }
    )
    dp = FederationPlan.from_config(from_dict(raw)).dp
    assert dp.noise_multiplier == 2.0 and dp.metric_noise == 8.0
    draws = torch.stack(
        [dp.noisy_sum(torch.zeros((), dtype=torch.float64), torch_gen(0, i)) for i in range(4000)]
    )
    assert float(draws.std()) == pytest.approx(8.0, rel=0.05)  # 4000 draws: the std's sd is ~1.1%
    with pytest.raises(ConfigError, match="privacy.metric_noise_multiplier"):
        from_dict(tiny_raw(privacy={"metric_noise_multiplier": -1.0}))


def test_privacy_budget_ledger_carries_a_search_into_its_next_sitting(tmp_path):
    """Each reservation and settlement is on disk at once; a budget started with an earlier
    sitting's entries as `prior` spends on top of them and against the same target."""
    import json

    from fedmeta.actors.privacy import PrivacyBudget, Sampling, UserLevelDP

    dp = UserLevelDP("central", 1.0, 4.0, 10, Sampling("poisson", 100, 10), 1e-5, "rdp")
    first = PrivacyBudget(dp, None, 8.0, tmp_path / "privacy_ledger-0.json")
    rid = first.reserve(4.0, 2.0)
    assert json.loads((tmp_path / "privacy_ledger-0.json").read_text())["entries"] == [[4.0, 2.0]]
    first.reserve(4.0, 2.0)
    first.settle(rid, 0.0, 2.0)  # a round that released no model
    saved = json.loads((tmp_path / "privacy_ledger-0.json").read_text())["entries"]
    assert saved == [[0.0, 2.0], [4.0, 2.0]]
    second = PrivacyBudget(dp, None, 8.0, tmp_path / "privacy_ledger-1.json", prior=saved)
    assert second.epsilon()["epsilon_tuning"] == pytest.approx(first.epsilon()["epsilon_tuning"])
    assert second.epsilon()["reserved_rounds"] == 2
    granted = 0
    while second.reserve(4.0, 2.0) is not None:
        granted += 1
    fresh = PrivacyBudget(dp, None, 8.0)
    alone = 0
    while fresh.reserve(4.0, 2.0) is not None:
        alone += 1
    assert granted < alone and second.epsilon()["epsilon_tuning"] <= 8.0  # the prior sitting used part of it
    assert len(json.loads((tmp_path / "privacy_ledger-1.json").read_text())["entries"]) == granted


def test_individual_mia_auc_is_each_individuals_own_attack():
    from fedmeta.actors.privacy import individual_mia_auc

    rng = np_rng(2, "mia-individual")
    members = [rng.exponential(0.1, 12), rng.exponential(1.0, 9), np.zeros(0), rng.exponential(1.0, 4)]
    others = [1.0 + rng.exponential(1.0, 5), rng.exponential(1.0, 7), rng.exponential(1.0, 3), np.zeros(0)]
    got = individual_mia_auc(members, others)
    for i, (m, o) in enumerate(zip(members, others)):
        if len(m) and len(o):  # the reference: P(member loss < non-member loss), ties count half
            ref = np.mean([(a < b) + 0.5 * (a == b) for a in m for b in o])
            assert got[i] == pytest.approx(ref)
        else:
            assert np.isnan(got[i])
    assert got[0] == 1.0


def test_a_metric_release_the_budget_has_no_room_for_is_refused_and_not_accounted():
    from fedmeta.actors.privacy import RunAccounting, Sampling, UserLevelDP

    sampling = Sampling("poisson", 100, 10)
    one_round = epsilon_for(1.0, 0.1, 1, 1e-5, sampling=sampling)
    dp = UserLevelDP("central", 1.0, 1.0, 10, sampling, target_epsilon=one_round * 1.01)
    acc = RunAccounting(dp)
    acc.record_round({})
    assert "metric release would exceed epsilon" in acc.release_stop(1.0)
    assert acc.epsilon() == pytest.approx(one_round)  # asking spent nothing
    roomy = RunAccounting(UserLevelDP("central", 1.0, 1.0, 10, sampling, target_epsilon=100.0))
    assert roomy.release_stop(1.0) is None
    roomy.record_release(1.0)
    assert roomy.accountant.releases == 1
    assert RunAccounting(UserLevelDP()).release_stop(1.0) is None  # no DP: nothing to spend
