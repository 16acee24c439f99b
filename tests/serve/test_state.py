"""RouterState: feedback scoring against the request log, trials settled on recompute, pruning."""
import numpy as np
import pytest

from serve.state import RouterSettings, RouterState

PROFILE = {"mean": [0.0, 0.0], "var": [1.0, 1.0], "n": 10}


def state(**settings):
    members = {m: {"profile": PROFILE, "reference_quality": 0.8} for m in ("a", "b")}
    return RouterState(members, RouterSettings(**settings))


def test_feedback_scores_each_member_that_answered():
    s = state()
    s.record("r1", {"members": {"a": [1, 1], "b": [1, 0]}, "answer": [1, 1], "arm": "ensemble", "trial": None})
    out = s.feedback("r1", np.array([1, 0]))
    assert out == {"accuracy": 0.5, "members": {"a": 0.5, "b": 1.0}}
    assert s.controller.trackers["b"].accuracy > s.controller.trackers["a"].accuracy
    with pytest.raises(KeyError, match="unknown"):
        s.feedback("r1", np.array([1, 0]))               # consumed
    s.record("r2", {"members": {}, "answer": [1], "arm": "personal", "trial": None})
    with pytest.raises(ValueError, match="labels: request 'r2' had 1 inputs, got 2"):
        s.feedback("r2", np.array([1, 0]))


def test_request_log_is_bounded():
    s = state(log_requests=3)
    for i in range(5):
        s.record(f"r{i}", {"members": {}, "answer": [0], "arm": "ensemble", "trial": None})
    with pytest.raises(KeyError):
        s.feedback("r0", np.array([0]))
    assert s.feedback("r4", np.array([0]))["accuracy"] == 1.0


def test_shadow_trial_promotes_on_recompute():
    s = state()
    s.set_candidate("c", PROFILE, 0.9, "shadow", 1.0)
    assert s.routing()["candidate"]["name"] == "c"
    for i in range(30):
        s.record(f"r{i}", {"members": {"a": [0], "b": [0]}, "answer": [0], "arm": "ensemble", "trial": "c",
                           "candidate": [1]})
        s.feedback(f"r{i}", np.array([1]))                # the candidate is right, production wrong
    routing = s.recompute()
    assert routing["events"][-1]["event"] == "promoted" and "c" in routing["active"]
    assert routing["candidate"] is None and s.snapshot()["history"][-1]["member"] == "c"


def test_weak_member_is_pruned_but_never_the_last():
    s = state(prune_threshold=0.3, prune_window=2, min_feedback=1000)
    for i in range(20):
        s.record(f"r{i}", {"members": {"a": [1], "b": [0]}, "answer": [1], "arm": "ensemble", "trial": None})
        s.feedback(f"r{i}", np.array([1]))
    pruned = [e["member"] for _ in range(3) for e in s.recompute()["events"] if e["event"] == "pruned"]
    assert pruned == ["b"] and s.routing()["active"] == ["a"] and s.routing()["pruned"] == ["b"]
    for _ in range(3):
        s.recompute()
    assert s.routing()["active"] == ["a"]
