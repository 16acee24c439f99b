"""`secagg.neighbors: auto` and the security targets (issue 15): the plan picks k and t with the
SecAgg+ parameter finder (actors/secagg/params.py) for the cohort, checks explicit ones against
the same targets (a warning when they fall short), and the summary reports both. No Ray."""

import math
import warnings

import pytest

from fedmeta.actors.secagg.params import SecAggTargetWarning, evaluate_harary_params, poisson_cohort_sizes
from fedmeta.actors.secagg.policy import _round_facts, secagg_round_facts, secagg_targets
from fedmeta.sim.config import ConfigError, ExperimentConfig, from_dict
from fedmeta.sim.engine.plan import FederationPlan
from fedmeta.sim.run.report import secagg_targets_facts
from tests.conftest import tiny_raw


def plan_of(**sections) -> FederationPlan:
    return FederationPlan.from_config(from_dict(tiny_raw(**sections)))


def quiet_plan(**sections) -> FederationPlan:
    with warnings.catch_warnings():
        warnings.simplefilter("error", SecAggTargetWarning)  # auto never falls short
        return plan_of(**sections)


def test_auto_is_the_default_with_bell_et_al_s_targets():
    sa = ExperimentConfig().secagg
    assert (sa.neighbors, sa.threshold, sa.dropout_rate, sa.adversarial_fraction) == (
        "auto",
        None,
        None,
        0.05,
    )
    assert (sa.security_bits, sa.correctness_bits) == (40, 20)
    for bad, msg in (
        ({"neighbors": "many"}, "secagg.neighbors: expected an even integer >= 2, 'auto' or null"),
        ({"neighbors": 0}, "secagg.neighbors: expected an even integer"),
        ({"neighbors": 7}, "secagg.neighbors: must be even"),
        ({"adversarial_fraction": 1.0}, "secagg.adversarial_fraction"),
        ({"security_bits": 0}, "secagg.security_bits"),
    ):
        with pytest.raises(ConfigError, match=msg):
            from_dict({"secagg": bad})


def test_the_dropout_target_follows_the_federation():
    """null: a bound the planned dropout stays under in all but 2^-correctness_bits of rounds, not
    its mean (a mean bound refuses about half the rounds at the survivor floor)."""
    from math import comb

    def delta(num_clients=400, **fed):
        return secagg_targets(from_dict(tiny_raw(data={"num_clients": num_clients}, federation=fed)))[
            "dropout"
        ]

    def lower_quantile(n, p, bits=20):  # the smallest survivor count s with P(survivors <= s) >= 2^-bits
        cdf = 0.0
        for s in range(n + 1):
            cdf += comb(n, s) * (1 - p) ** s * p ** (n - s)
            if cdf >= 2.0**-bits:
                return s

    assert delta() == 0.33  # nothing planned: the floor
    assert delta(over_selection=2.0) == pytest.approx(0.5)  # half the sample is left behind, always
    assert delta(dropout=0.05, clients_per_round=100) == 0.33  # the tail of 5% of 100 stays under the floor
    assert delta(dropout=0.33, clients_per_round=100) == pytest.approx(1 - lower_quantile(100, 0.33) / 100)
    assert delta(dropout=0.33, clients_per_round=100) > 0.5  # the mean (0.33) would abort half the rounds
    assert delta(dropout=0.2, over_selection=2.0) == pytest.approx(1 - min(lower_quantile(20, 0.2), 10) / 20)
    with pytest.raises(
        ValueError,
        match="secagg.dropout_rate: null, but with federation.dropout 0.5 a cohort of "
        "10 can lose every client",
    ):
        delta(dropout=0.5)
    assert secagg_targets(from_dict(tiny_raw(secagg={"dropout_rate": 0.1})))["dropout"] == 0.1
    assert secagg_targets(ExperimentConfig())["adversary"] == "semi_honest"


HONEST, MALICIOUS = {}, {"adversary": "semi_malicious"}


@pytest.mark.parametrize(
    "secagg, cohort, k, t",
    [
        # a server that follows the protocol (the default; Bell et al.'s tables): t may be <= k/2
        (HONEST, 10, 6, 2),
        (HONEST, 100, 28, 6),  # 5% corrupt, a third dropping
        ({"dropout_rate": 0.05}, 100, 12, 6),
        ({"adversarial_fraction": 0.2}, 10, 6, 3),
        # a server that may lie about who dropped: t > k/2
        (MALICIOUS, 10, 8, 5),
        (MALICIOUS, 100, 72, 39),
        ({**MALICIOUS, "dropout_rate": 0.05}, 100, 16, 11),
        (
            {**MALICIOUS, "adversarial_fraction": 0.2},
            10,
            10,
            6,
        ),  # the complete graph, passed as an even k >= n - 1
        ({**MALICIOUS, "threshold": 5}, 10, 8, 5),  # an explicit threshold is used (here: the finder's own)
    ],
)
def test_auto_resolves_k_and_t_for_the_cohort(secagg, cohort, k, t):
    p = quiet_plan(
        secagg={"enabled": True, **secagg},
        data={"num_clients": 120},
        federation={"clients_per_round": cohort},
    )
    assert (p.secagg.neighbors, p.secagg.threshold, p.secagg.cohort) == (k, t, cohort)
    majority = 2 * p.secagg.threshold > min(k, cohort - 1)  # the protocol's default t > k/2
    assert p.secagg.allow_low_threshold == (not majority) and (majority or secagg.get("adversary") is None)
    facts = secagg_targets_facts(p)
    assert facts["neighbors_setting"] == "auto" and facts["meets_targets"] and facts["cohort"] == cohort
    assert facts["complete_graph"] == (k >= cohort - 1)


def test_a_complete_graph_whose_t_is_not_a_majority_of_an_even_k_stays_complete():
    # 4 clients, a third dropping: k = 3 (complete), t = 2; k = 4 would need t = 3, which misses correctness
    p = quiet_plan(secagg={"enabled": True, **MALICIOUS}, federation={"clients_per_round": 4})
    assert (p.secagg.neighbors, p.secagg.threshold) == (None, 2)
    p = quiet_plan(
        secagg={"enabled": True}, federation={"clients_per_round": 4}
    )  # semi-honest: t <= k/2 is fine
    assert (p.secagg.neighbors, p.secagg.threshold, p.secagg.allow_low_threshold) == (4, 2, True)


@pytest.mark.adversary
@pytest.mark.parametrize("population", [120, 200])
def test_a_poisson_cohort_is_sized_for_every_size_it_takes(population):
    """The finding: sized for the expected 100, k = 28, t = 6 had 6.3 security bits at n = 120. Now
    the graph holds at every size up to the 1 - 2^-20 quantile (and down to the 2^-20 one); a
    larger cohort is refused (SecureSum)."""
    p = quiet_plan(
        secagg={"enabled": True},
        privacy={"mode": "distributed", "noise_multiplier": 1.0},
        data={"num_clients": population},
        federation={"clients_per_round": 100},
    )
    s, sa = p.dp.sampling, p.secagg
    assert (
        s.kind == "poisson" and sa.cohort == 100 and sa.max_clients > 100
    )  # the noise is still split 100 ways
    lo, hi = sa.cohort_range
    assert (lo, hi) == poisson_cohort_sizes(population, 100 / population) and lo < 100 < hi <= sa.max_clients
    assert (sa.neighbors, sa.threshold) != (28, 6)
    for n in range(lo, hi + 1):
        got = evaluate_harary_params(n, sa.neighbors, sa.threshold, **secagg_targets(p.cfg))
        assert got.meets_security and (got.meets_targets or n < 100), n
    if hi >= 120:
        assert not evaluate_harary_params(120, 28, 6, **secagg_targets(p.cfg)).meets_security
    facts = secagg_targets_facts(p)  # reported at the weakest size of the range
    assert facts["meets_targets"] and lo <= facts["cohort"] <= hi


def test_a_fixed_cohort_keeps_its_exact_size():
    p = quiet_plan(secagg={"enabled": True}, data={"num_clients": 120}, federation={"clients_per_round": 100})
    assert p.dp.sampling.kind == "fixed" and p.secagg.cohort_range == (100, 100)
    assert (p.secagg.neighbors, p.secagg.threshold, p.secagg.dropout) == (28, 6, 0.33)


@pytest.mark.adversary
def test_a_dropout_bound_below_the_planned_dropout_is_a_config_error():
    """`--set federation.dropout=0.6 --set secagg.dropout_rate=0.33`: every round would be refused at
    the survivor floor; the plan says so before any round runs."""
    with pytest.raises(
        ConfigError,
        match=r"^secagg.dropout_rate: 0.33, but 0.6 of each cohort drops by design.*"
        r"ceil\(n\(1 - 0.33\)\) survivors",
    ):
        plan_of(secagg={"enabled": True, "dropout_rate": 0.33}, federation={"dropout": 0.6})
    with pytest.raises(ConfigError, match="at least 0.5"):  # over-selection drops by design too
        plan_of(
            secagg={"enabled": True, "dropout_rate": 0.33},
            federation={"over_selection": 2.0},
            data={"num_clients": 40},
        )
    assert (
        quiet_plan(secagg={"enabled": True, "dropout_rate": 0.6}, federation={"dropout": 0.6}).secagg.dropout
        == 0.6
    )


def test_each_round_reports_its_floor_and_bits_for_its_size():
    p = quiet_plan(
        secagg={"enabled": True},
        privacy={"mode": "distributed", "noise_multiplier": 1.0},
        data={"num_clients": 120},
        federation={"clients_per_round": 100},
    )
    sa, targets = p.secagg, secagg_targets(p.cfg)
    _round_facts.cache_clear()
    for n in (90, 100, 116):
        got = secagg_round_facts(p.cfg, sa, n)
        want = evaluate_harary_params(n, sa.neighbors, sa.threshold, **targets)
        assert got["secagg_survivor_floor"] == math.ceil(n * 0.67 - 1e-9)
        assert (
            got["secagg_security_bits"] == pytest.approx(-want.security_log2, abs=0.01)
            and want.meets_security
        )
        assert (
            got["secagg_correctness_bits"] == pytest.approx(-want.abort_log2, abs=0.01)
            and want.meets_correctness
        )
    assert secagg_round_facts(p.cfg, sa, 100) == secagg_round_facts(p.cfg, sa, 100)
    assert _round_facts.cache_info().hits >= 2  # memoized: one evaluation per size
    # an event that cannot happen has infinite bits; a cohort too small to run has a floor only
    small = quiet_plan(secagg={"enabled": True})
    assert secagg_round_facts(small.cfg, small.secagg, 10)["secagg_security_bits"] == math.inf
    assert secagg_round_facts(small.cfg, small.secagg, 1) == {"secagg_survivor_floor": 1}


def test_explicit_k_and_t_that_fall_short_warn_at_plan_time():
    with pytest.warns(
        SecAggTargetWarning, match=r"k = 4, t = 3 for each round's cohort \(10 clients, 0.33 dropout"
    ):
        p = plan_of(secagg={"enabled": True, "neighbors": 4})
    assert (p.secagg.neighbors, p.secagg.threshold) == (4, 3)  # used as given
    facts = secagg_targets_facts(p)
    assert facts["neighbors_setting"] == 4 and not facts["meets_targets"]
    assert facts["correctness_bits_achieved"] < 20
    with pytest.warns(SecAggTargetWarning, match="abort probability"):
        plan_of(secagg={"enabled": True, "threshold": 6})  # auto's k = 6, a threshold too high
    # an explicit setting that meets them is quiet: the complete graph of 10 with t = 5
    assert quiet_plan(secagg={"enabled": True, "neighbors": None}).secagg.threshold == 5


def test_targets_no_graph_can_meet_are_config_errors():
    hard = {"enabled": True, "adversarial_fraction": 0.3, "dropout_rate": 0.4, **MALICIOUS}
    with pytest.raises(
        ConfigError, match=r"^secagg.neighbors: auto: no neighbour graph for 10 clients meets"
    ):
        plan_of(secagg=hard)
    # explicit values are still allowed (with the warning)
    with pytest.warns(SecAggTargetWarning):
        plan_of(secagg={**hard, "neighbors": None})


def test_the_secure_metric_panel_gets_its_own_graph():
    p = quiet_plan(secagg={"enabled": True})
    m = p.metric_secagg()
    assert (m.neighbors, m.threshold, m.cohort) == (4, 2, len(p.eval_ids)) == (4, 2, 8)


def test_no_secure_aggregation_no_targets():
    assert secagg_targets_facts(plan_of()) is None
