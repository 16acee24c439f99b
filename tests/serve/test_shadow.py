"""Traffic splits, sequential tests (shadow SPRT, A/B mixture SPRT), candidate trials and pruning."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.serve.shadow import (
    CandidateTrial,
    Decision,
    PairedSPRT,
    PruningTracker,
    TwoSampleTest,
    ab_arm,
    in_shadow,
    stable_fraction,
)

# --------------------------------------------------------------------------------- simulation helpers


def run_paired(
    acc_candidate: float, acc_production: float, seed: int, max_pairs: int = 3000
) -> tuple[str, int]:
    """Shadow mode: both models answer every request, correctness independent per request."""
    rng = np.random.default_rng(seed)
    cand = (rng.random(max_pairs) < acc_candidate).tolist()
    prod = (rng.random(max_pairs) < acc_production).tolist()
    test = PairedSPRT(max_pairs=max_pairs)
    for i in range(max_pairs):
        if test.update(cand[i], prod[i]) != "continue":
            return test.decision, i + 1
    raise AssertionError("max_pairs must end every run")


def run_ab(
    acc_candidate: float, acc_production: float, seed: int, max_samples: int = 4000
) -> tuple[str, int]:
    """A/B mode: each request goes to one arm (50/50), outcomes independent."""
    rng = np.random.default_rng(seed)
    to_cand = rng.random(max_samples) < 0.5
    ok = (rng.random(max_samples) < np.where(to_cand, acc_candidate, acc_production)).tolist()
    arms = np.where(to_cand, "candidate", "production").tolist()
    test = TwoSampleTest(max_samples=max_samples)
    for i in range(max_samples):
        if test.update(arms[i], ok[i]) != "continue":
            return test.decision, i + 1
    raise AssertionError("max_samples must end every run")


# ------------------------------------------------------------------------------------- stable hashing


def test_stable_fraction_is_deterministic_and_in_unit_interval():
    values = [stable_fraction(k, "s") for k in ["a", "b", 0, 1, 10**30]]
    assert values == [stable_fraction(k, "s") for k in ["a", "b", 0, 1, 10**30]]
    assert all(0.0 <= v < 1.0 for v in values)
    assert stable_fraction("user-1", "ab") == stable_fraction("user-1", "ab")
    assert stable_fraction(7, "x") == stable_fraction(
        "7", "x"
    )  # same text, same bucket (documented f-string)


def test_ab_arm_is_stable_and_matches_fraction():
    users = [f"user-{i}" for i in range(20_000)]
    arms = [ab_arm(u, 0.2) for u in users]
    assert arms == [ab_arm(u, 0.2) for u in users]
    share = arms.count("candidate") / len(users)
    assert abs(share - 0.2) < 0.015
    assert set(arms) == {"candidate", "production"}
    # growing the fraction only moves users into the candidate arm (nobody flips back)
    assert all(ab_arm(u, 0.3) == "candidate" for u, a in zip(users[:2000], arms) if a == "candidate")


def test_in_shadow_matches_fraction_and_edges():
    keys = range(20_000)
    share = sum(in_shadow(k, 0.05) for k in keys) / 20_000
    assert abs(share - 0.05) < 0.015
    assert not any(in_shadow(k, 0.0) for k in range(500))
    assert all(in_shadow(k, 1.0) for k in range(500))
    assert all(ab_arm(k, 1.0) == "candidate" for k in range(500))


def test_salt_changes_assignment():
    users = [f"u{i}" for i in range(2000)]
    a = [ab_arm(u, 0.5, salt="ab") for u in users]
    b = [ab_arm(u, 0.5, salt="ab-v2") for u in users]
    assert a != b
    assert 0.35 < sum(x != y for x, y in zip(a, b)) / len(users) < 0.65  # independent splits disagree ~half


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), "0.5", None, True])
def test_bad_fraction_raises(fraction):
    with pytest.raises(ValueError, match="fraction"):
        ab_arm("u", fraction)
    with pytest.raises(ValueError, match="fraction"):
        in_shadow("r", fraction)


def test_bad_key_raises():
    with pytest.raises(TypeError, match="key"):
        stable_fraction(None, "s")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ PairedSPRT


def test_paired_sprt_promotes_better_candidate():
    results = [run_paired(0.9, 0.75, seed) for seed in range(200)]
    fast_promotions = sum(d == "promote" and n < 600 for d, n in results)
    assert fast_promotions >= 0.95 * len(results)


def test_paired_sprt_rejects_worse_candidate():
    results = [run_paired(0.7, 0.85, seed) for seed in range(200)]
    assert sum(d == "reject" and n < 600 for d, n in results) >= 0.95 * len(results)
    assert not any(d == "promote" for d, _ in results)


def test_paired_sprt_false_promotion_rate_under_equality():
    results = [run_paired(0.8, 0.8, 10_000 + seed, max_pairs=1500) for seed in range(300)]
    counts = Counter(d for d, _ in results)
    assert counts["continue"] == 0
    assert counts["promote"] / len(results) <= 0.05 + 0.03


def test_paired_sprt_counters_and_ratios():
    t = PairedSPRT(alpha=0.05, beta=0.1, delta=0.15)
    t.update(True, False)
    t.update(False, True)
    t.update(True, True)
    t.update(False, False)
    assert (t.pairs, t.wins, t.losses, t.ties) == (4, 1, 1, 2)
    llr = t.log_likelihood_ratios
    expected = np.log(0.65 / 0.5) + np.log(0.35 / 0.5)  # one win and one loss, in both tests
    assert llr["better"] == pytest.approx(expected)
    assert llr["worse"] == pytest.approx(expected)
    assert t.decision == Decision.CONTINUE and t.reason is None


def test_paired_sprt_decision_is_sticky():
    t = PairedSPRT()
    while t.update(True, False) == "continue":
        pass
    assert t.decision == "promote" and t.reason == "better"
    before = (t.pairs, t.log_likelihood_ratios)
    for _ in range(200):
        assert t.update(False, True) == "promote"
    assert (t.pairs, t.log_likelihood_ratios) == before
    assert t.late_updates == 200


def test_paired_sprt_max_pairs_rejects_when_not_shown_better():
    t = PairedSPRT(max_pairs=10)
    decisions = [t.update(True, True) for _ in range(10)]  # ties only: no information at all
    assert decisions[:-1] == ["continue"] * 9 and decisions[-1] == "reject"
    assert t.reason == "max_pairs"


def test_paired_sprt_accepts_bool_like_feedback():
    t = PairedSPRT()
    t.update(np.True_, 0)
    assert t.wins == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": 1.2}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"alpha": 0.6, "beta": 0.5}, "alpha"),
        ({"delta": 0}, "delta"),
        ({"delta": 0.5}, "delta"),
        ({"max_pairs": 0}, "max_pairs"),
        ({"max_pairs": 2.5}, "max_pairs"),
    ],
)
def test_paired_sprt_bad_parameters(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PairedSPRT(**kwargs)


def test_paired_sprt_bad_feedback():
    t = PairedSPRT()
    with pytest.raises(ValueError, match="candidate_correct"):
        t.update(None, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="production_correct"):
        t.update(True, "yes")  # type: ignore[arg-type]
    assert t.pairs == 0


# ---------------------------------------------------------------------------------------- TwoSampleTest


def test_two_sample_promotes_better_candidate():
    results = [run_ab(0.9, 0.75, seed) for seed in range(200)]
    assert sum(d == "promote" and n < 1500 for d, n in results) >= 0.95 * len(results)


def test_two_sample_rejects_worse_candidate():
    results = [run_ab(0.7, 0.85, seed) for seed in range(200)]
    assert sum(d == "reject" and n < 1500 for d, n in results) >= 0.95 * len(results)
    assert not any(d == "promote" for d, _ in results)


def test_two_sample_false_promotion_rate_under_equality():
    results = [run_ab(0.8, 0.8, 20_000 + seed) for seed in range(300)]
    counts = Counter(d for d, _ in results)
    assert counts["continue"] == 0
    assert counts["promote"] / len(results) <= 0.05 + 0.03


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["candidate", "production"]), st.booleans()), max_size=400),
    st.integers(min_value=1, max_value=30),
)
def test_two_sample_p_value_non_increasing(outcomes, min_samples):
    t = TwoSampleTest(alpha=1e-12, min_samples=min_samples)  # tiny alpha: keep testing, watch the p-value
    previous = t.p_value
    assert previous == 1.0
    for arm, ok in outcomes:
        t.update(arm, ok)
        assert 0.0 <= t.p_value <= previous
        previous = t.p_value


def test_two_sample_waits_for_min_samples_in_both_arms():
    t = TwoSampleTest(min_samples=50)
    for _ in range(500):
        t.update("candidate", True)
    for _ in range(49):
        t.update("production", False)
    assert t.p_value == 1.0 and t.decision == "continue"
    assert t.update("production", False) == "promote"  # 500/500 vs 0/50: overwhelming once allowed
    assert t.rate("candidate") == 1.0 and t.rate("production") == 0.0


def test_two_sample_decision_is_sticky_and_max_samples_rejects():
    t = TwoSampleTest(min_samples=5, max_samples=20)
    for i in range(20):
        t.update("candidate" if i % 2 else "production", True)
    assert t.decision == "reject" and t.reason == "max_samples"
    for _ in range(50):
        assert t.update("candidate", True) == "reject"
    assert sum(t.n.values()) == 20 and t.late_updates == 50


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"alpha": 0}, "alpha"),
        ({"tau": 0}, "tau"),
        ({"tau": float("inf")}, "tau"),
        ({"min_samples": 0}, "min_samples"),
        ({"max_samples": 10}, "max_samples"),
    ],
)
def test_two_sample_bad_parameters(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TwoSampleTest(**kwargs)


def test_two_sample_bad_feedback():
    t = TwoSampleTest()
    with pytest.raises(ValueError, match="arm"):
        t.update("control", True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="correct"):
        t.update("candidate", 0.5)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- CandidateTrial


def test_shadow_trial_routes_counts_and_decides():
    trial = CandidateTrial.shadow("m2", 0.5, max_pairs=1000)
    routed = [trial.route(f"req-{i}") for i in range(1000)]
    assert trial.requests == 1000 and trial.answers == sum(routed)
    assert routed == [in_shadow(f"req-{i}", 0.5) for i in range(1000)]
    while trial.record_feedback(candidate_correct=True, production_correct=False) == "continue":
        pass
    assert trial.decision == "promote"
    assert not trial.route("req-late")  # a finished trial stops spending traffic
    d = trial.to_dict()
    json.dumps(d)
    assert d["decision"] == "promote" and d["mode"] == "shadow" and d["feedback"] == trial.feedback
    assert d["test"]["wins"] == trial.feedback


def test_ab_trial_feedback_goes_to_the_answering_arm():
    trial = CandidateTrial.ab("m3", 0.25, min_samples=5)
    assert trial.route("alice") == (ab_arm("alice", 0.25) == "candidate")
    trial.record_feedback(candidate_correct=True)
    trial.record_feedback(production_correct=False)
    assert trial.test.n == {"candidate": 1, "production": 1}
    assert trial.test.successes == {"candidate": 1, "production": 0}
    assert trial.feedback == 2
    json.dumps(trial.to_dict())


def test_trial_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        CandidateTrial("m", "canary", 0.1, PairedSPRT())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fraction"):
        CandidateTrial.shadow("m", 2.0)
    with pytest.raises(TypeError, match="test"):
        CandidateTrial("m", "ab", 0.1, PairedSPRT())
    with pytest.raises(ValueError, match="production_correct"):
        CandidateTrial.shadow("m", 0.1).record_feedback(candidate_correct=True)
    ab = CandidateTrial.ab("m", 0.1)
    with pytest.raises(ValueError, match="exactly one"):
        ab.record_feedback(candidate_correct=True, production_correct=True)
    with pytest.raises(ValueError, match="exactly one"):
        ab.record_feedback()
    assert ab.feedback == 0


# -------------------------------------------------------------------------------------- PruningTracker


def test_pruned_exactly_after_window_low_observations():
    tracker = PruningTracker(threshold=0.1, window=3)
    assert tracker.observe({"a": 0.6, "b": 0.35, "c": 0.05}) == []
    assert tracker.observe({"a": 0.6, "b": 0.35, "c": 0.05}) == []
    assert tracker.observe({"a": 0.6, "b": 0.35, "c": 0.05}) == ["c"]
    assert tracker.observe({"a": 0.6, "b": 0.35, "c": 0.05}) == []  # returned once only


def test_recovery_resets_streak():
    tracker = PruningTracker(threshold=0.1, window=3)
    seq = [0.05, 0.05, 0.2, 0.05, 0.05]  # recovers on the third observation
    assert [tracker.observe({"a": 0.9, "c": w}) for w in seq] == [[]] * 5
    assert tracker.observe({"a": 0.9, "c": 0.05}) == ["c"]
    assert tracker.observe({"a": 0.9, "c": 0.1}) == []  # at the threshold is not below it


def test_never_prunes_every_member():
    tracker = PruningTracker(threshold=0.5, window=2)
    tracker.observe({"a": 0.3, "b": 0.2, "c": 0.1})
    assert tracker.observe({"a": 0.3, "b": 0.2, "c": 0.1}) == ["b", "c"]  # "a", the best, stays
    assert tracker.observe({"a": 0.3, "b": 0.2, "c": 0.1}) == []
    assert tracker.observe({"a": 0.3}) == []  # the last member is never pruned
    # once a healthy member exists the long-low one goes at once
    assert tracker.observe({"a": 0.3, "d": 0.7}) == ["a"]

    single = PruningTracker(threshold=0.5, window=1)
    assert [single.observe({"only": 0.0}) for _ in range(5)] == [[]] * 5


def test_disappearing_members_are_forgotten():
    tracker = PruningTracker(threshold=0.1, window=2)
    tracker.observe({"a": 0.9, "c": 0.05})
    tracker.observe({"a": 0.9})  # c gone: streak dropped
    assert tracker.observe({"a": 0.9, "c": 0.05}) == []  # back: starts from one low observation
    assert tracker.observe({"a": 0.9, "c": 0.05}) == ["c"]
    tracker.observe({"a": 0.9})  # c removed by the ensemble, then re-added later: tracked afresh
    tracker.observe({"a": 0.9, "c": 0.05})
    assert tracker.observe({"a": 0.9, "c": 0.05}) == ["c"]
    assert "c" in tracker.streaks and set(tracker.streaks) == {"a", "c"}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"threshold": -0.1, "window": 2}, "threshold"),
        ({"threshold": float("nan"), "window": 2}, "threshold"),
        ({"threshold": 0.1, "window": 0}, "window"),
        ({"threshold": 0.1, "window": 1.5}, "window"),
    ],
)
def test_pruning_bad_parameters(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PruningTracker(**kwargs)


def test_pruning_bad_weights():
    tracker = PruningTracker(threshold=0.1, window=2)
    with pytest.raises(ValueError, match="weights"):
        tracker.observe({"a": float("nan")})
    with pytest.raises(ValueError, match="weights"):
        tracker.observe({"a": -1.0})
