"""The learned privacy weight (sim/run/leakage.py): the dual-ascent step, and runs that adapt lambda."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.config import ConfigError, from_dict
from fedmeta.sim.run.leakage import dual_ascent
from tests.conftest import tiny_raw

unit = st.floats(0, 1)


@given(st.floats(0, 50), unit, st.floats(0.5, 0.99), st.floats(0.01, 100), st.floats(0.1, 50))
def test_dual_ascent_stays_in_range_and_moves_against_the_excess(weight, leakage, target, step, max_weight):
    weight = min(weight, max_weight)
    new = dual_ascent(weight, leakage, target, step, max_weight)
    assert 0.0 <= new <= max_weight
    if leakage > target:
        assert new >= weight  # leaking more than the target: pull harder
    elif leakage < target:
        assert new <= weight  # less: give accuracy back
    else:
        assert new == weight
    assert new == pytest.approx(min(max(weight + step * (leakage - target), 0.0), max_weight))


def test_dual_ascent_learns_nothing_from_an_empty_panel():
    assert dual_ascent(1.5, math.nan, 0.55, 20.0, 10.0) == 1.5


def test_target_needs_personalization_and_an_auc_above_chance():
    with pytest.raises(
        ConfigError,
        match="privacy.leakage_control.target_auc: the privacy weight acts on "
        "personalization; needs eval.finetune_steps > 0",
    ):
        from_dict(tiny_raw(eval={"finetune_steps": 0}, privacy={"leakage_control": {"target_auc": 0.6}}))
    with pytest.raises(ConfigError, match="privacy.leakage_control.target_auc"):
        from_dict(tiny_raw(privacy={"leakage_control": {"target_auc": 0.5}}))
    with pytest.raises(ConfigError, match="privacy.leakage_control.stepp"):
        from_dict(tiny_raw(privacy={"leakage_control": {"target_auc": 0.6, "stepp": 1}}))


def _controlled(tmp_path, **privacy):
    lc = {"target_auc": 0.51, "every": 1, "step": 20.0, **privacy.pop("leakage_control", {})}
    return tiny_raw(
        tmp_path,
        algorithm={"name": "ditto", "ditto_lambda": 0.0, "batch_size": 8, "lr": 0.1},
        eval={"every": 2, "num_individuals": 8, "finetune_steps": 10, "finetune_lr": 0.2},
        privacy={"audit_canaries": 0, "leakage_control": lc, **privacy},
        ray={"num_workers": 1},
    )


def _weights(run_dir: Path) -> pd.Series:
    df = pd.read_parquet(run_dir / "metrics.parquet")
    return df[df.metric == "privacy_weight"].set_index("round").value


@pytest.mark.slow
def test_a_run_learns_lambda_from_private_releases_and_accounts_them(ray_session, tmp_path):
    """Once per round lambda takes the dual-ascent step on the released leakage (rising first: plain
    fine-tuning leaks more than 0.51), the releases compose with the rounds in the run's epsilon,
    and the summary says what was learned."""
    from fedmeta.actors.privacy import make_accountant
    from fedmeta.sim.engine.plan import FederationPlan
    from fedmeta.sim.run.experiment import run_experiment

    raw = _controlled(
        tmp_path, mode="central", noise_multiplier=2.0, leakage_control={"noise_multiplier": 0.1}
    )
    # the release's noise is fresh each run (a drawn secret): sd 0.1/8 on a panel of 8 is far below the
    # ~0.09 by which round 1's models leak above 0.51, so lambda rises first in every run
    run_dir, s = run_experiment(from_dict(raw))
    w = _weights(run_dir)
    df = pd.read_parquet(run_dir / "metrics.parquet")
    released = df[df.metric == "leakage_released"].set_index("round").value
    assert list(w.index) == list(released.index) == [1, 2, 3, 4]
    assert w.iloc[0] > 0
    for before, leak, after in zip(np.r_[0.0, w.values[:-1]], released.values, w.values):
        assert after == pytest.approx(dual_ascent(before, leak, 0.51, 20.0, 100.0))
    lc = s["leakage_control"]
    assert lc["releases"] == 4 and lc["privacy_weight"] == pytest.approx(w.iloc[-1]) == s["privacy_weight"]
    dp = FederationPlan.from_config(from_dict(raw)).dp
    hand = make_accountant(dp.accountant, dp.sampling)
    for _ in range(4):
        hand.step(2.0, dp.sample_rate)
        hand.release(0.1)
    hand.release(2.0)  # the model card's input profile and panel quality (sim/run/card_stats.py)
    hand.release(dp.metric_release_noise)
    assert s["epsilon"] == pytest.approx(hand.epsilon(dp.delta))
    # the evaluations after an update personalize with the new lambda: their per-individual AUC is logged
    assert sorted(df[df.metric == "mia_auc_individual"]["round"]) == [2, 4]


@pytest.mark.slow
def test_lambda_goes_down_when_the_models_leak_less_than_the_target(ray_session, tmp_path):
    from fedmeta.sim.run.experiment import run_experiment

    raw = _controlled(tmp_path, leakage_control={"target_auc": 0.99, "step": 1.0})
    raw["algorithm"]["ditto_lambda"] = 3.0
    run_dir, s = run_experiment(from_dict(raw))
    w = _weights(run_dir)
    assert (np.diff(np.r_[3.0, w.values]) < 0).all() and s["epsilon"] is None


@pytest.mark.slow
def test_a_resumed_run_continues_from_the_learned_lambda(ray_session, tmp_path):
    from fedmeta.sim.run.experiment import run_experiment

    raw = _controlled(tmp_path)
    full_dir, full = run_experiment(from_dict(raw))

    def interrupt_at_2(done, total, shown):
        if done == 2:
            raise KeyboardInterrupt

    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(from_dict(raw), run_dir=run_dir, progress=interrupt_at_2)
    assert ckpt.load(run_dir).round == 2
    _, resumed = run_experiment(from_dict(raw), run_dir=run_dir, resume=True)
    pd.testing.assert_series_equal(_weights(run_dir), _weights(full_dir))
    assert resumed["leakage_control"] == full["leakage_control"]
    assert resumed["acc_personalized_DI"] == full["acc_personalized_DI"]


@pytest.mark.slow
def test_the_leakage_release_under_secure_aggregation_equals_the_plain_mean(ray_session, tmp_path):
    """Masked per individual, the panel's leakage sums to the plain mean of each individual's own
    AUC (to quantization), and to what the evaluation's audit computes at the same weight."""
    from fedmeta.sim.engine.federation import Federation
    from fedmeta.sim.engine.plan import FederationPlan

    raw = _controlled(tmp_path)
    plain_fed = Federation(FederationPlan.from_config(from_dict(raw)))
    try:
        g = plain_fed.train_round(0, plain_fed.plan.init_params).global_params
        plain = plain_fed.private_metric(1, g, "leakage", 2.0)
        ev = plain_fed.evaluate(1, g, weight=2.0)
        loose = plain_fed.private_metric(1, g, "leakage", 0.0)
    finally:
        plain_fed.shutdown()
    secure_fed = Federation(
        FederationPlan.from_config(from_dict({**raw, "secagg": {"enabled": True, "neighbors": 4}}))
    )
    try:
        secure = secure_fed.private_metric(1, g, "leakage", 2.0)
    finally:
        secure_fed.shutdown()
    assert plain["count"] == secure["count"] == 8
    assert plain["mia_auc_DI"] == pytest.approx(float(np.mean(ev["mia_auc_DI"])))
    assert secure["mia_auc_DI"] == pytest.approx(plain["mia_auc_DI"], abs=1e-4)
    assert loose["mia_auc_DI"] > plain["mia_auc_DI"]  # the pull towards w leaks less
