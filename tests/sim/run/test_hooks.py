"""The round loop over hooks, without Ray: a stand-in federation whose rounds add 1 to the model."""

import numpy as np
import pytest

from fedmeta.actors.privacy import RunAccounting, Sampling, UserLevelDP
from fedmeta.sim.engine.federation import RoundResult
from fedmeta.sim.run.experiment import run_rounds
from fedmeta.sim.run.hooks import Accounting, Hook, RoundLog
from fedmeta.sim.run.run_state import RunState


class CountingFederation:
    def __init__(self, fail_at: int | None = None):
        self.rounds: list[int] = []
        self.fail_at = fail_at

    def train_round(self, round_index: int, g: np.ndarray) -> RoundResult:
        if round_index == self.fail_at:
            raise RuntimeError("the aggregator refused the round")
        self.rounds.append(round_index)
        return RoundResult(
            g + 1, clients=10, dropped=1, seconds=0.5, metrics={"train_loss": 0.1 * round_index}
        )


class Recorder(Hook):
    def __init__(self, name: str, calls: list, stop_after: int | None = None):
        self.name, self.calls, self.stop_after = name, calls, stop_after

    def after_round(self, state, res):
        self.calls.append((self.name, state.rounds_done))
        return "enough" if state.rounds_done == self.stop_after else None


def fresh(dp: UserLevelDP | None = None) -> RunState:
    return RunState(0, np.zeros(3, np.float32), RunAccounting(dp or UserLevelDP()))


def test_hooks_run_in_order_after_every_round_and_the_state_advances():
    calls: list = []
    state, fed = fresh(), CountingFederation()
    run_rounds(fed, state, [Recorder("a", calls), Recorder("b", calls)], rounds=3)
    assert fed.rounds == [0, 1, 2] and state.rounds_done == 3 and state.stopped is None
    assert calls == [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]
    np.testing.assert_array_equal(state.global_params, np.full(3, 3.0))
    assert (state.train_clients, state.train_seconds, state.dropouts) == (30, 1.5, 3)


def test_a_hook_stops_the_run_after_the_others_saw_the_round():
    calls: list = []
    state = fresh()
    run_rounds(
        CountingFederation(), state, [Recorder("a", calls, stop_after=2), Recorder("b", calls)], rounds=5
    )
    assert state.rounds_done == 2 and state.stopped == "enough" and calls[-1] == ("b", 2)


def test_the_privacy_budget_stops_before_the_round_that_would_overshoot():
    from fedmeta.actors.privacy import epsilon_for

    dp = UserLevelDP(
        "central", noise_multiplier=1.0, sampling=Sampling("poisson", 40, 10), target_epsilon=3.0
    )
    state = fresh(dp)
    run_rounds(CountingFederation(), state, [Accounting(), RoundLog()], rounds=1000)
    assert state.stopped.startswith("privacy budget") and state.accounting.epsilon() <= 3.0
    assert epsilon_for(1.0, 0.25, state.rounds_done + 1, 1e-5) > 3.0
    eps = state.log.frame().query("metric == 'epsilon'").value.tolist()
    assert len(eps) == state.rounds_done and eps == sorted(eps)


def test_a_failed_round_leaves_the_state_at_the_last_completed_round():
    state = fresh()
    with pytest.raises(RuntimeError, match="refused"):
        run_rounds(CountingFederation(fail_at=2), state, [RoundLog()], rounds=5)
    assert state.rounds_done == 2 and np.array_equal(state.global_params, np.full(3, 2.0))
    assert state.log.frame()["round"].max() == 2
