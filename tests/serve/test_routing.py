"""Routing controller of the design note "Dynamic Model Specialization via Federated Hyperparameter Drift"."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.serve.routing import (
    FeedbackTracker,
    InputProfile,
    RoutingController,
    alignment,
    combine,
    drift_compensation,
    update_routing_weights,
)

# ------------------------------------------------------------------------------------ update formula


def test_weights_follow_the_formula_by_hand():
    hist = {"a": 0.5, "b": 0.3, "c": 0.2}
    align = {"a": 1.0, "b": 3.0, "c": 0.0}  # total 4
    comp = {"a": 1.0, "b": 1.0, "c": 2.0}  # total 4
    # a: .5 * (1 + 1/4 + 1/4) = .75; b: .3 * (1 + 3/4 + 1/4) = .6; c: .2 * (1 + 0 + 2/4) = .3; sum 1.65
    w = update_routing_weights(hist, align, comp)
    assert list(w) == ["a", "b", "c"]
    assert w["a"] == pytest.approx(0.75 / 1.65)
    assert w["b"] == pytest.approx(0.6 / 1.65)
    assert w["c"] == pytest.approx(0.3 / 1.65)


def test_zero_totals_contribute_nothing_and_zero_history_is_uniform():
    hist = {"a": 0.6, "b": 0.2}
    zeros = {"a": 0.0, "b": 0.0}
    assert update_routing_weights(hist, zeros, zeros) == pytest.approx({"a": 0.75, "b": 0.25})
    assert update_routing_weights(zeros, {"a": 1.0, "b": 5.0}, {"a": 1.0, "b": 1.0}) == {"a": 0.5, "b": 0.5}


_value = st.one_of(st.just(0.0), st.floats(1e-6, 1e3))


@st.composite
def _cases(draw):
    n = draw(st.integers(1, 6))
    names = [f"m{i}" for i in range(n)]
    parts = [dict(zip(names, draw(st.lists(_value, min_size=n, max_size=n)))) for _ in range(3)]
    return tuple(parts)


@given(case=_cases(), scale=st.floats(1e-3, 1e3))
@settings(max_examples=200, deadline=None)
def test_weights_are_a_distribution_invariant_to_alignment_scale(case, scale):
    hist, align, comp = case
    w = update_routing_weights(hist, align, comp)
    assert set(w) == set(hist)
    assert all(v >= 0 for v in w.values())
    assert math.fsum(w.values()) == pytest.approx(1.0)
    scaled = update_routing_weights(hist, {m: a * scale for m, a in align.items()}, comp)
    for m in w:
        assert scaled[m] == pytest.approx(w[m], rel=1e-9, abs=1e-12)


@given(case=_cases(), data=st.data())
@settings(max_examples=200, deadline=None)
def test_zero_history_stays_zero_unless_all_are_zero(case, data):
    hist, align, comp = case
    zeroed = data.draw(st.sampled_from(sorted(hist)))
    hist = {**hist, zeroed: 0.0}
    w = update_routing_weights(hist, align, comp)
    if any(hist.values()):
        assert w[zeroed] == 0.0
    else:
        assert w == pytest.approx({m: 1.0 / len(hist) for m in hist})


def test_update_rejects_bad_inputs_naming_member_and_field():
    ok = {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match=r"alignment.*missing \['b'\].*extra \['z'\]"):
        update_routing_weights(ok, {"a": 1.0, "z": 1.0}, ok)
    with pytest.raises(ValueError, match=r"compensation.*missing \['b'\]"):
        update_routing_weights(ok, ok, {"a": 1.0})
    with pytest.raises(ValueError, match=r"alignment\['b'\] = -1"):
        update_routing_weights(ok, {"a": 1.0, "b": -1.0}, ok)
    with pytest.raises(ValueError, match=r"historical\['a'\] = nan"):
        update_routing_weights({"a": float("nan"), "b": 1.0}, ok, ok)
    with pytest.raises(ValueError, match=r"compensation\['a'\] = inf"):
        update_routing_weights(ok, ok, {"a": math.inf, "b": 1.0})
    with pytest.raises(ValueError, match="at least one member"):
        update_routing_weights({}, {}, {})


# ----------------------------------------------------------------------------------------- alignment


def test_alignment_identical_is_one_and_window_prefers_its_own_distribution():
    rng = np.random.default_rng(0)
    xa = rng.normal(0.0, 1.0, size=(1000, 4))
    xb = rng.normal(3.0, 1.0, size=(1000, 4))
    pa, pb = InputProfile.fit(xa), InputProfile.fit(xb)
    assert alignment(xa, pa) == 1.0
    window = rng.normal(0.0, 1.0, size=(200, 4))
    assert 0.0 < alignment(window, pb) < alignment(window, pa) <= 1.0
    # Further away -> smaller, but never exactly 0 (exp underflow is clamped).
    assert alignment(window + 10.0, pa) < alignment(window + 1.0, pa)
    assert alignment(window + 1e6, pa) > 0.0


def test_profile_flattens_floors_variance_and_round_trips_json():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 2, 3))
    x[:, 0, 0] = 7.0  # a constant feature gets the floor, not zero variance
    p = InputProfile.fit(x)
    assert p.dim == 6 and p.n == 50 and p.var[0] > 0
    q = InputProfile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert np.array_equal(q.mean, p.mean) and np.array_equal(q.var, p.var) and q.n == 50


def test_alignment_and_profile_reject_bad_shapes():
    rng = np.random.default_rng(2)
    p = InputProfile.fit(rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="5 features.*3"):
        alignment(rng.normal(size=(10, 5)), p)
    with pytest.raises(ValueError, match="shape"):
        InputProfile.fit(np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        InputProfile.fit(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="mean"):
        InputProfile.from_dict({"mean": [0.0, 1.0], "var": [1.0], "n": 3})


# ---------------------------------------------------------------------------- quality and feedback


def test_drift_compensation_decreases_with_degradation_and_is_floored():
    assert drift_compensation(0.8, 0.9) == 1.0
    assert drift_compensation(0.8, 0.8) == 1.0
    assert drift_compensation(0.8, 0.6) == pytest.approx(0.75)  # 1 - 0.2/0.8
    values = [drift_compensation(0.8, r) for r in np.linspace(0.8, 0.0, 9)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert drift_compensation(0.8, 0.0) == 0.05
    assert drift_compensation(0.8, 0.0, floor=0.2) == 0.2
    assert drift_compensation(0.0, 0.0) == 1.0
    with pytest.raises(ValueError, match="recent_quality"):
        drift_compensation(0.8, 1.5)
    with pytest.raises(ValueError, match="reference_quality"):
        drift_compensation(-0.1, 0.5)


def test_feedback_tracker_posterior_mean_by_hand():
    t = FeedbackTracker(half_life=None)
    assert t.accuracy == 0.5 and t.count == 0
    for correct in [True] * 7 + [False] * 3:
        t.update(correct)
    assert t.accuracy == pytest.approx((1 + 7) / (2 + 10)) and t.count == 10
    t.update(4, 5)  # batched: 4 of 5 right
    assert t.accuracy == pytest.approx((1 + 11) / (2 + 15)) and t.count == 15
    d = FeedbackTracker(half_life=1.0)
    d.update(True)
    d.update(False)  # the success is one half-life old
    assert d.accuracy == pytest.approx((1 + 0.5) / (2 + 0.5 + 1))
    with pytest.raises(ValueError, match="correct"):
        t.update(3, 2)
    with pytest.raises(ValueError, match="half_life"):
        FeedbackTracker(half_life=0)


@given(
    old=st.lists(st.booleans(), max_size=50),
    recent=st.lists(st.booleans(), min_size=1, max_size=50),
    half_life=st.floats(1.0, 100.0),
)
@settings(max_examples=100, deadline=None)
def test_feedback_decay_fades_old_evidence(old, recent, half_life):
    both, only_old, only_recent = (FeedbackTracker(half_life) for _ in range(3))
    for c in old:
        both.update(c)
        only_old.update(c)
    for c in recent:
        both.update(c)
        only_recent.update(c)
    # Old evidence survives scaled by 0.5 ** (age in half-lives), on top of the recent evidence.
    fade = 0.5 ** (len(recent) / half_life)
    assert both.successes == pytest.approx(only_recent.successes + fade * only_old.successes, abs=1e-9)
    assert both.failures == pytest.approx(only_recent.failures + fade * only_old.failures, abs=1e-9)
    assert both.count == len(old) + len(recent)


def test_decay_favours_recent_evidence():
    decayed, kept = FeedbackTracker(20.0), FeedbackTracker(None)
    for c in [True] * 100 + [False] * 100:
        decayed.update(c)
        kept.update(c)
    assert kept.accuracy == pytest.approx(0.5)
    assert decayed.accuracy < 0.1


# ---------------------------------------------------------------------------------------- controller


def _controller(rng: np.random.Generator, **kw) -> RoutingController:
    profiles = {
        "clean": InputProfile.fit(rng.normal(0.0, 1.0, size=(2000, 5))),
        "shifted": InputProfile.fit(rng.normal(2.0, 1.0, size=(2000, 5))),
    }
    ctl = RoutingController(profiles, {"clean": 0.8, "shifted": 0.8}, **kw)
    for member in ("clean", "shifted"):  # equal feedback: only alignment can separate them
        ctl.feedback(member, 24, 30)
    return ctl


def test_drifted_window_moves_weight_to_the_matching_member():
    rng = np.random.default_rng(3)
    ctl = _controller(rng)
    w = ctl.recompute()  # empty window: alignment uniform, equal feedback -> equal weights
    assert w["clean"] == pytest.approx(w["shifted"])
    ctl.observe(rng.normal(2.0, 1.0, size=(256, 5)))
    w = ctl.recompute()
    assert w["shifted"] > w["clean"] and math.fsum(w.values()) == pytest.approx(1.0)
    assert ctl.last_parts["shifted"]["alignment"] > ctl.last_parts["clean"]["alignment"]
    assert ctl.last_parts["shifted"]["weight"] == w["shifted"]
    ctl.observe(rng.normal(0.0, 1.0, size=(256, 5)))  # fully replaces the bounded window
    assert ctl.window_rows == 256
    w = ctl.recompute()
    assert w["clean"] > w["shifted"]
    assert ctl.top_members(1) == [("clean", w["clean"])]


def test_controller_window_is_bounded_and_compensation_waits_for_feedback():
    rng = np.random.default_rng(4)
    ctl = _controller(rng, window=10, min_feedback=40)
    ctl.observe(rng.normal(size=(7, 5)))
    ctl.observe(rng.normal(size=(25, 5)))
    assert ctl.window_rows == 10
    ctl.recompute()
    assert ctl.last_parts["clean"]["compensation"] == 1.0  # 30 events < min_feedback
    for _ in range(20):
        ctl.feedback("clean", False)
    ctl.recompute()
    parts = ctl.last_parts["clean"]
    assert parts["compensation"] == pytest.approx(drift_compensation(0.8, parts["historical"]))
    assert parts["compensation"] < 1.0
    assert ctl.weights["clean"] < ctl.weights["shifted"]


def test_controller_membership_ranking_and_state_round_trip():
    rng = np.random.default_rng(5)
    ctl = _controller(rng)
    assert ctl.weights == {"clean": 0.5, "shifted": 0.5}
    assert ctl.top_members(5) == [("clean", 0.5), ("shifted", 0.5)]  # ties by name
    ctl.add_member("new", InputProfile.fit(rng.normal(size=(100, 5))), 0.7, weight=0.5)
    assert ctl.weights == pytest.approx({"clean": 0.25, "shifted": 0.25, "new": 0.5})
    ctl.observe(rng.normal(size=(30, 5)))
    ctl.recompute()
    state = json.loads(json.dumps(ctl.to_state(include_window=True)))
    copy = RoutingController.from_state(state)
    assert copy.weights == ctl.weights and copy.last_parts == ctl.last_parts
    assert copy.recompute() == pytest.approx(ctl.recompute())
    assert "recent" not in ctl.to_state()
    ctl.remove_member("new")
    assert set(ctl.weights) == {"clean", "shifted"} and math.fsum(ctl.weights.values()) == pytest.approx(1.0)
    ctl.remove_member("clean")
    with pytest.raises(ValueError, match="last member"):
        ctl.remove_member("shifted")


def test_controller_rejects_bad_inputs():
    rng = np.random.default_rng(6)
    ctl = _controller(rng)
    with pytest.raises(KeyError, match="zzz"):
        ctl.feedback("zzz", True)
    with pytest.raises(KeyError, match="zzz"):
        ctl.remove_member("zzz")
    with pytest.raises(ValueError, match="3 features"):
        ctl.observe(rng.normal(size=(4, 3)))
    with pytest.raises(ValueError, match="already exists"):
        ctl.add_member("clean", ctl.profiles["clean"], 0.5)
    with pytest.raises(ValueError, match=r"'odd' has 2 features"):
        ctl.add_member("odd", InputProfile.fit(rng.normal(size=(10, 2))), 0.5)
    with pytest.raises(ValueError, match=r"reference_quality\['b'\]"):
        RoutingController({"b": ctl.profiles["clean"]}, {"b": 1.5})
    with pytest.raises(ValueError, match=r"reference_quality.*missing \['b'\]"):
        RoutingController({"b": ctl.profiles["clean"]}, {})
    with pytest.raises(ValueError, match="k = 0"):
        ctl.top_members(0)


# ------------------------------------------------------------------------------------------- combine


def _probs(rng: np.random.Generator, batch: int = 4, classes: int = 3) -> np.ndarray:
    return rng.dirichlet(np.ones(classes), size=batch)


def test_combine_is_the_weighted_average_of_the_top_members():
    rng = np.random.default_rng(7)
    probs = {m: _probs(rng) for m in "abc"}
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    out, used = combine(probs, weights, top_k=3)
    assert np.allclose(out, 0.5 * probs["a"] + 0.3 * probs["b"] + 0.2 * probs["c"])
    assert np.allclose(out.sum(axis=1), 1.0)
    assert [m for m, _ in used] == ["a", "b", "c"]
    assert [w for _, w in used] == pytest.approx([0.5, 0.3, 0.2])  # pytest 9 compares numbers only
    out, used = combine(probs, weights, top_k=2)  # renormalized over a and b
    assert np.allclose(out, (0.5 * probs["a"] + 0.3 * probs["b"]) / 0.8)
    assert [m for m, _ in used] == ["a", "b"] and used[0][1] == pytest.approx(0.625)
    out, used = combine(probs, weights, top_k=1)
    assert np.allclose(out, probs["a"]) and used == [("a", 1.0)]


def test_combine_rejects_bad_inputs():
    rng = np.random.default_rng(8)
    weights = {"a": 0.6, "b": 0.4}
    with pytest.raises(ValueError, match=r"probs\['b'\] has shape \(4, 2\)"):
        combine({"a": _probs(rng), "b": _probs(rng, classes=2)}, weights, top_k=1)
    with pytest.raises(ValueError, match=r"probs\['a'\].*sum to 1"):
        combine({"a": np.full((2, 3), 0.5)}, weights, top_k=1)
    with pytest.raises(ValueError, match=r"probs\['a'\] must have shape"):
        combine({"a": np.ones(3) / 3}, weights, top_k=1)
    with pytest.raises(KeyError, match="zzz"):
        combine({"zzz": _probs(rng)}, weights, top_k=1)
    with pytest.raises(ValueError, match="k = 0"):
        combine({"a": _probs(rng)}, weights, top_k=0)
