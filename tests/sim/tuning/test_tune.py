"""Ray Tune over the federation: a small search end to end on local Ray (2 CPUs)."""

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from fedmeta.sim.cli.main import app
from fedmeta.sim.config import ConfigError, from_dict
from fedmeta.sim.tuning.trial import apply_params
from fedmeta.sim.tuning.tune import search_space
from tests.conftest import tiny_raw


def test_apply_params_and_space():
    raw = tiny_raw()
    out = apply_params(raw, {"algorithm.lr": 0.3, "algorithm.local_epochs": np.int64(4)})
    assert (
        out["algorithm"]["lr"] == 0.3
        and out["algorithm"]["local_epochs"] == 4
        and raw["algorithm"]["lr"] == 0.1
    )
    cfg = from_dict(out)
    assert set(search_space(cfg.tune.params)) == {
        "algorithm.lr",
        "algorithm.local_epochs",
        "eval.finetune_lr",
    }
    with pytest.raises(ConfigError, match="tune.params.0.key: 'algorithm.nope' is not a numeric key"):
        from_dict(tiny_raw(tune={"params": [{"key": "algorithm.nope", "low": 0.1, "high": 1.0}]}))
    with pytest.raises(ConfigError, match="tune.params.0.low: a log-scale range needs low > 0"):
        from_dict(tiny_raw(tune={"params": [{"key": "algorithm.lr", "low": 0.0, "high": 1.0, "log": True}]}))


@pytest.mark.slow
def test_tune_search_end_to_end(ray_session, tmp_path):
    """Optuna TPE + ASHA on a tiny federation, continued from a run's checkpoint; the candidate
    is a servable member and the experiment restores with Tuner.restore. The run learned its
    privacy weight (leakage control): the trials and the candidate personalize with that lambda."""
    from ray import tune

    from fedmeta.sim.checkpoint import load, load_model
    from fedmeta.sim.run.experiment import run_experiment

    control = {"leakage_control": {"target_auc": 0.51}, "audit_canaries": 0}
    run_dir, _ = run_experiment(from_dict(tiny_raw(tmp_path, federation={"rounds": 2}, privacy=control)))
    learned = load(run_dir).model_card["adaptation"]["privacy_weight"]
    assert learned > 0
    yaml_path = tmp_path / "t.yaml"
    raw = tiny_raw(
        tmp_path,
        tune={"num_samples": 3, "max_concurrent": 2, "rounds_per_trial": 2, "grace_period": 1},
        ray={"num_workers": 1, "num_cpus_per_worker": 0.5},
        privacy=control,
    )
    import yaml

    yaml_path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["tune", str(yaml_path), "--start", str(run_dir), "--json", "--name", "t1"])
    assert res.exit_code == 0, res.output
    # Ray forwards the trials' own log lines ("(federation_trial pid=...) ..."): not the CLI's output
    lines = [line for line in res.stdout.strip().splitlines() if not re.match(r"^(\x1b\[[0-9;]*m)?\(", line)]
    out = json.loads(lines[-2])
    assert out["trials"] == 3 and 0 <= out["best_metric"] <= 1
    assert set(out["best_config"]) == {"algorithm.lr", "algorithm.local_epochs", "eval.finetune_lr"}
    model, card = load_model(lines[-1])
    assert card["tuned"] == out["best_config"] and card["data_schema"]["input_shape"] == [1, 8, 8]
    assert out["privacy_weight"] == card["adaptation"]["privacy_weight"] == learned
    from fedmeta.sim.tuning.trial import make_trainable

    trainable = make_trainable(from_dict(raw), str(run_dir), 2, weight=learned)
    restored = tune.Tuner.restore(out["experiment"], trainable=trainable)
    assert len(restored.get_results()) == 3


def test_list_entries_architecture_and_start_check(tmp_path):
    """A list entry is searched by its index; a trial with another width gets its own seeded
    initial model; an architecture search cannot continue a checkpoint."""
    import torch

    from fedmeta.sim.engine.plan import FederationPlan
    from fedmeta.sim.models import build_model, inference_ms
    from fedmeta.sim.tuning.tune import check_start

    raw = tiny_raw(
        tmp_path, tune={"params": [{"key": "model.hidden.0", "low": 8, "high": 64, "integer": True}]}
    )
    out = apply_params(raw, {"model.hidden.0": np.int64(16)})
    assert out["model"]["hidden"] == [16] and raw["model"]["hidden"] == [32]
    plan = FederationPlan.from_config(from_dict(raw))
    wide, narrow = plan.with_config(from_dict(out)), plan.with_config(from_dict(raw))
    assert narrow.n_params == plan.n_params and np.array_equal(narrow.init_params, plan.init_params)
    assert wide.n_params < plan.n_params and wide.init_params.shape == (wide.n_params,)
    assert np.array_equal(wide.init_params, plan.with_config(from_dict(out)).init_params)  # seeded
    with pytest.raises(ConfigError, match="tune.params: model.hidden.0 changes the model's architecture"):
        check_start(from_dict(raw), str(tmp_path))
    check_start(from_dict(raw), None)
    model = build_model(from_dict(out).model, plan.input_shape, plan.num_classes)
    assert inference_ms(model, torch.tensor(wide.init_params), plan.input_shape, batch=8, repeats=3) > 0


def test_noise_and_target_together_fix_z_and_cap_the_budget():
    from fedmeta.sim.engine.plan import FederationPlan

    plan = FederationPlan.from_config(
        from_dict(
            tiny_raw(
                privacy={
                    "mode": "central",
                    "noise_multiplier": 3.0,
                    "target_epsilon": 5.0,
                    "audit_canaries": 0,
                }
            )
        )
    )
    assert plan.dp.noise_multiplier == 3.0 and plan.dp.target_epsilon == 5.0


@pytest.mark.slow
def test_multi_objective_search_under_a_privacy_budget(ray_session, tmp_path):
    """Two objectives (quality, latency) over the hidden width: the front is non-dominated and on
    disk (pareto.csv, each member a servable candidate); the search's rounds and metric releases
    are accounted, stay within privacy.target_epsilon, and the budget ends the search early."""
    import csv

    import yaml

    from fedmeta.sim.checkpoint import load_model
    from fedmeta.sim.metrics import pareto_front

    raw = tiny_raw(
        tmp_path,
        privacy={"mode": "central", "noise_multiplier": 4.0, "target_epsilon": 6.0, "audit_canaries": 0},
        tune={
            "num_samples": 4,
            "max_concurrent": 2,
            "rounds_per_trial": 3,
            "objectives": [{"metric": "acc_personalized_DI"}, {"metric": "latency_ms"}],
            "params": [
                {"key": "model.hidden.0", "low": 4, "high": 256, "integer": True, "log": True},
                {"key": "algorithm.lr", "low": 0.05, "high": 0.3, "log": True},
            ],
        },
        ray={"num_workers": 1, "num_cpus_per_worker": 0.5},
    )
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["tune", str(path), "--json", "--name", "mo"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.strip().splitlines() if not re.match(r"^(\x1b\[[0-9;]*m)?\(", line)]
    out = json.loads(lines[-2])
    assert [o["metric"] for o in out["objectives"]] == ["acc_personalized_DI", "latency_ms"]
    assert 0 < out["epsilon_tuning"] <= 6.0 and out["epsilon_total"] == pytest.approx(out["epsilon_tuning"])
    front = out["pareto"]
    points = np.array([[m["acc_personalized_DI"], m["latency_ms"]] for m in front])
    assert front and len(pareto_front(points, ["max", "min"])) == len(front)
    rows = list(csv.DictReader(open(f"{out['experiment']}/pareto.csv")))
    assert [r["trial"] for r in rows] == [m["trial"] for m in front]
    model, card = load_model(front[0]["candidate"])
    assert card["tuned"] == front[0]["config"] and card["model"]["n_params"] == sum(
        p.numel() for p in model.parameters()
    )
    # the budget: 4 trials x 3 rounds would be 12 rounds and 12 releases; far fewer fit in epsilon 6
    summary = json.loads(open(f"{out['experiment']}/summary.json").read())
    assert summary["privacy_state"]["releases"] < 12


def test_searchers_are_seeded_and_warm_started():
    """TPE starts from the config's own values (clipped into the ranges) after which it models
    from `startup_trials` trials on; random search is seeded."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from fedmeta.sim.tuning.tune import current_values, searcher

    cfg = from_dict(
        tiny_raw(
            algorithm={"lr": 2.0, "local_epochs": 3},
            tune={
                "startup_trials": 2,
                "ei_candidates": 100,
                "params": [
                    {"key": "algorithm.lr", "low": 0.01, "high": 0.5, "log": True},
                    {"key": "algorithm.local_epochs", "low": 1, "high": 10, "integer": True},
                    {"key": "model.hidden.0", "low": 8, "high": 64, "integer": True},
                ],
            },
        )
    )
    assert current_values(cfg) == {"algorithm.lr": 0.5, "algorithm.local_epochs": 3, "model.hidden.0": 32}
    tpe = searcher(cfg).searcher
    assert tpe._points_to_evaluate == [current_values(cfg)] and tpe._sampler._n_startup_trials == 2
    assert tpe._sampler._n_ei_candidates == 100
    cold = from_dict(tiny_raw(tune={"warm_start": False}))
    assert not searcher(cold).searcher._points_to_evaluate
    draws = [
        searcher(from_dict(tiny_raw(tune={"searcher": "random"})))._random_state.random() for _ in range(2)
    ]
    assert (
        draws[0] == draws[1] == BasicVariantGenerator(random_state=3)._random_state.random()
    )  # the run's seed
    gp = searcher(from_dict(tiny_raw(tune={"sampler": "gp", "startup_trials": 2}))).searcher._sampler
    assert type(gp).__name__ == "GPSampler" and gp._n_startup_trials == 2 and gp._deterministic


def test_a_known_warm_result_is_told_to_the_searcher_not_rerun():
    """`warm_result`: the config's own values enter the Optuna study as a finished trial with that
    value, so the first trial Tune runs is already the searcher's own proposal."""
    from fedmeta.sim.tuning.tune import current_values, search_space, searcher

    cfg = from_dict(tiny_raw(tune={"sampler": "gp", "startup_trials": 2}))
    told = searcher(cfg, warm_result=0.25).searcher
    space = search_space(cfg.tune.params)
    assert told.set_search_properties("acc_personalized_DI", "max", space)
    done = told._ot_study.trials
    assert [t.value for t in done] == [0.25] and done[0].params == current_values(cfg)
    first = told.suggest("trial-1")
    assert first != current_values(cfg) and set(first) == set(current_values(cfg))
    rerun = searcher(cfg).searcher  # not told: the first trial runs the config's own values
    assert rerun.set_search_properties("acc_personalized_DI", "max", space)
    assert rerun.suggest("trial-1") == current_values(cfg) and not rerun._ot_study.trials[:-1]


def test_tune_bench_reports_across_seeds(monkeypatch):
    """`bench --tune --seeds N` aggregates one whole comparison per seed (stubbed here)."""
    import fedmeta.sim.cli.bench_tune as B

    def fake(cfg, **kwargs):
        s = cfg.seed
        return {
            "metric": "acc_personalized_DI",
            "tuned_acc": 0.3 + s / 100,
            "untuned_acc": 0.2,
            "bo_trials_to_95": None if s == 1 else 2 + s,
        }

    monkeypatch.setattr(B, "tune_bench_seed", fake)
    out = B.run_tune_bench(from_dict(tiny_raw()), seeds=range(3))
    assert (
        out["seeds"] == [0, 1, 2]
        and out["bo_trials_to_95_seeds"] == [2, None, 4]
        and out["bo_reached_95"] == 2
    )
    assert out["tuned_acc_mean"] == pytest.approx(0.31) and out["tuned_acc_sd"] == pytest.approx(0.01)
    assert out["tuned_beats_untuned"] and out["tuned_minus_untuned"] == pytest.approx([0.1, 0.11, 0.12])


def test_a_trial_the_cluster_can_never_place_is_a_config_error(ray_session, tmp_path):
    """2 workers x 1 CPU + the trial's sliver does not fit 2 CPUs: Tune would wait forever, so
    `fedmeta tune` and a `tune.auto` run refuse it up front, naming the key."""
    from fedmeta.sim.tuning.trial import check_fits

    raw = tiny_raw(tmp_path, ray={"num_workers": 2, "num_cpus_per_worker": 1.0})
    with pytest.raises(
        ConfigError, match=r"ray.num_cpus_per_worker: a trial needs 2.01 CPUs \(2 workers x 1 \+ 0.01"
    ):
        check_fits(from_dict(raw))
    raw["ray"]["num_cpus_per_worker"] = 0.95
    assert sum(b["CPU"] for b in check_fits(from_dict(raw)).bundles) == pytest.approx(1.91)


@pytest.mark.slow
def test_an_interrupted_search_resumes_with_its_privacy_spent(ray_session, tmp_path):
    """Ctrl-C to `fedmeta tune` (its own local Ray) exits 130, not with a partial result; `--resume`
    finishes the search: the interrupted trial continues after its last report, and the epsilon
    composes both sittings' ledgers (the rounds spent before the interruption stay spent)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    from fedmeta.actors.privacy import make_accountant
    from fedmeta.sim.config import from_dict as cfg_of
    from fedmeta.sim.engine.plan import FederationPlan

    raw = tiny_raw(
        tmp_path,
        privacy={"mode": "central", "noise_multiplier": 2.0, "audit_canaries": 0},
        tune={"num_samples": 2, "max_concurrent": 1, "rounds_per_trial": 4, "grace_period": 4},
        ray={"num_workers": 1, "num_cpus_per_worker": 0.5},
    )
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    experiment = tmp_path / "tune" / "x"
    ledger = experiment / "privacy_ledger-0.json"
    entries = lambda f: json.loads(f.read_text())["entries"] if f.is_file() else []  # noqa: E731
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmeta", "tune", str(path), "--name", "x"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while len(entries(ledger)) < 6:  # the first trial's 4 rounds, the second's first reported
            assert proc.poll() is None and time.time() < deadline, "the search ended or never spent"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        outp, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, outp + err
    assert f"fedmeta tune --resume {experiment}" in " ".join(err.split())
    before = entries(ledger)

    res = CliRunner().invoke(app, ["tune", "--resume", str(experiment), "--json"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.strip().splitlines() if not re.match(r"^(\x1b\[[0-9;]*m)?\(", line)]
    out = json.loads(lines[-2])
    assert out["trials"] == 2
    spent = before + entries(experiment / "privacy_ledger-1.json")
    # 8 rounds in all; a round the interruption cut off before its report runs again (a second
    # release, so it counts); a trial restarted from scratch would have made it 10 or more
    assert 8 <= len(spent) <= 9 and len(before) >= 6 and entries(ledger) == before
    dp = FederationPlan.from_config(cfg_of(raw)).dp
    acc = make_accountant(dp.accountant, dp.sampling)
    for round_z, release_z in spent:
        acc.step(round_z, dp.sample_rate)
        acc.release(release_z)
    assert out["epsilon_tuning"] == pytest.approx(acc.epsilon(dp.delta))


class _Context:
    def get_trial_id(self):
        return "trial-under-test"


def _run_trial(monkeypatch, raw, budget_target=None):
    """One trial run in this process (Tune's session calls faked): its reports, and what its
    budget accounted."""
    import ray

    from fedmeta.sim.engine.plan import FederationPlan
    from fedmeta.sim.tuning import trial
    from fedmeta.sim.tuning import tune as tuning

    reports = []
    monkeypatch.setattr(trial.tune, "report", lambda metrics, checkpoint=None: reports.append(dict(metrics)))
    monkeypatch.setattr(trial.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(trial.tune, "get_context", lambda: _Context())
    plan = FederationPlan.from_config(from_dict(raw))
    budget = tuning.BudgetActor.remote(plan.dp, None, budget_target)
    try:
        trial.federation_trial({}, plan, None, plan.cfg.tune.rounds_per_trial, 0, budget)
        return reports, ray.get(budget.epsilon.remote()), plan
    finally:
        ray.kill(budget)


def _trial_raw(metric_noise=6.0, **tune):
    return tiny_raw(
        privacy={
            "mode": "central",
            "noise_multiplier": 2.0,
            "metric_noise_multiplier": metric_noise,
            "mia_audit": False,
            "audit_canaries": 0,
        },
        tune={"rounds_per_trial": 3, "params": [{"key": "algorithm.lr", "low": 0.05, "high": 0.2}], **tune},
        ray={"num_workers": 1, "num_cpus_per_worker": 0.5},
    )


def test_a_trial_reports_every_few_rounds_and_spends_only_on_its_reports(ray_session, monkeypatch):
    """tune.report_every 2 over 3 rounds: reports after rounds 2 and 3 (the last), so the budget
    composes 3 subsampled rounds and 2 metric releases, at the metric noise, not 3."""
    from fedmeta.actors.privacy import make_accountant
    from fedmeta.sim.tuning.trial import trial_release_noise

    reports, spent, plan = _run_trial(monkeypatch, _trial_raw(report_every=2))
    assert [r["round"] for r in reports] == [2, 3]
    dp = plan.dp
    assert dp.metric_noise == 6.0 and dp.metric_release_noise == pytest.approx(6.0 / np.sqrt(2))
    state = spent["accountant_state"]
    assert state["releases"] == 2
    hand = make_accountant(dp.accountant, dp.sampling)
    for _ in range(3):
        hand.step(2.0, dp.sample_rate)
    for _ in range(2):
        hand.release(trial_release_noise(dp, set()))
    assert spent["epsilon_total"] == pytest.approx(hand.epsilon(dp.delta), rel=1e-9)
    assert reports[-1]["epsilon"] == pytest.approx(hand.epsilon(dp.delta), rel=1e-9)  # the trial's own


def test_a_trial_stopped_by_the_budget_reports_its_unreported_rounds(ray_session, monkeypatch):
    """A target with room for one round and one release but not two rounds: the trial trains round
    1 (no report due), is refused round 2, and releases round 1's model instead of losing it."""
    from fedmeta.actors.privacy import make_accountant
    from fedmeta.sim.engine.plan import FederationPlan
    from fedmeta.sim.tuning.trial import trial_release_noise

    raw = _trial_raw(metric_noise=12.0, report_every=3)
    dp = FederationPlan.from_config(from_dict(raw)).dp
    one = make_accountant(dp.accountant, dp.sampling)
    one.step(2.0, dp.sample_rate)
    one.release(trial_release_noise(dp, set()))
    two = make_accountant(dp.accountant, dp.sampling)
    two.load_state_dict(one.state_dict())
    two.step(2.0, dp.sample_rate)
    assert one.epsilon(dp.delta) < two.epsilon(
        dp.delta
    )  # the premise: a release is cheaper than a round here
    target = (one.epsilon(dp.delta) + two.epsilon(dp.delta)) / 2
    reports, spent, _ = _run_trial(monkeypatch, raw, target)
    assert [r["round"] for r in reports] == [1] and np.isfinite(reports[0]["acc_personalized_DI"])
    assert (
        spent["epsilon_total"] == pytest.approx(one.epsilon(dp.delta), rel=1e-9)
        and spent["epsilon_total"] <= target
    )
