"""End-to-end runs on the actor pool (tiny data, seconds each)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.config import from_dict
from fedmeta.sim.run.experiment import run_experiment
from fedmeta.sim.seeding import Secrets
from fedmeta.sim.tuning.autotune import run_experiment as autotune_run
from tests.conftest import tiny_raw

pytestmark = pytest.mark.slow


def with_card(z: float, q: float, rounds: int, sampling=None) -> float:
    """Epsilon of `rounds` rounds plus what a finished DP run adds, the model card's two releases
    (sim/run/card_stats.py): the input profile (z, or z/2 for fixed cohorts) and the panel quality (z/sqrt 2)."""
    import math

    from fedmeta.actors.privacy import make_accountant

    acc = make_accountant("rdp", sampling)
    for _ in range(rounds):
        acc.step(z, q)
    acc.release(z if sampling is None or sampling.kind == "poisson" else z / 2)
    acc.release(z / math.sqrt(2))
    return acc.epsilon(1e-5)


def test_run_writes_everything(ray_session, tmp_path):
    cfg = from_dict(tiny_raw(tmp_path, federation={"dropout": 0.2}))
    run_dir, summary = run_experiment(cfg)
    for f in (
        "summary.json",
        "metrics.parquet",
        "metrics.csv",
        "individuals.parquet",
        "checkpoint.pt",
        "accuracy.png",
        "individuals.png",
        "config.yaml",
    ):
        assert (run_dir / f).is_file(), f
    s = json.loads((run_dir / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    assert s["rounds"] == 4 and s["num_clients"] == 40 and s["clients_per_s"] > 0
    for k in ("acc_global_DG", "acc_global_DI", "acc_personalized_DI"):
        assert set(s[k]) == {"mean", "sd", "min", "max"} and 0 <= s[k]["mean"] <= 1
    assert s["dropouts"] > 0
    df = pd.read_parquet(run_dir / "metrics.parquet")
    assert set(df.columns) == {"round", "metric", "stat", "value"}
    assert sorted(df[df.metric == "acc_personalized_DI"]["round"].unique()) == [2, 4]
    ind = pd.read_parquet(run_dir / "individuals.parquet")
    assert len(ind) == 2 * 8  # 8 individuals x 2 evaluations


@pytest.mark.parametrize("algorithm", ["fomaml", "fedadam"])  # fedadam: its server moments are checkpointed
def test_resume_reaches_the_same_final_metrics(ray_session, tmp_path, algorithm):
    raw = tiny_raw(tmp_path, algorithm={"name": algorithm})
    _, full = run_experiment(from_dict(raw))

    def interrupt_at_2(done, total, shown):
        if done == 2:
            raise KeyboardInterrupt

    cfg = from_dict(raw)
    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, run_dir=run_dir, progress=interrupt_at_2)
    assert ckpt.load(run_dir).round == 2
    _, resumed = run_experiment(cfg, run_dir=run_dir, resume=True)
    for k in ("acc_global_DG", "acc_global_DI", "acc_personalized_DI"):
        assert resumed[k] == full[k]
    a = ckpt.load(run_dir).global_params
    b = ckpt.load(Path(full["run_dir"])).global_params
    np.testing.assert_array_equal(a, b)


def test_runs_are_reproducible_and_seed_matters(ray_session, tmp_path):
    raw = tiny_raw(tmp_path, federation={"rounds": 2}, eval={"every": 2})
    _, a = run_experiment(from_dict(raw))
    _, b = run_experiment(from_dict(raw))
    raw["seed"] = 4
    _, c = run_experiment(from_dict(raw))
    assert a["acc_personalized_DI"] == b["acc_personalized_DI"]
    assert a["acc_personalized_DI"] != c["acc_personalized_DI"]


def test_impossible_pool_is_a_clear_error(ray_session, tmp_path):
    from fedmeta.sim.config import ConfigError

    cfg = from_dict(tiny_raw(tmp_path, ray={"num_workers": 4, "num_cpus_per_worker": 1.0}))
    with pytest.raises(ConfigError, match="ray.num_cpus_per_worker: 4 workers x 1 CPUs needs 4"):
        run_experiment(cfg)


def test_a_failing_round_leaves_the_last_good_checkpoint(ray_session, tmp_path):
    from ray.exceptions import RayTaskError

    from fedmeta.actors.aggregator import AggregationError

    raw = tiny_raw(tmp_path, algorithm={"lr": 1e30})  # diverges at once: non-finite updates
    cfg = from_dict(raw)
    run_dir = tmp_path / "diverged"
    with pytest.raises(RayTaskError) as e:
        run_experiment(cfg, run_dir=run_dir)
    assert isinstance(e.value.as_instanceof_cause(), AggregationError)
    ck = ckpt.load(run_dir)
    assert ck.round == 0 and np.isfinite(ck.global_params).all()


def test_ctrl_c_in_a_real_process_leaves_a_usable_checkpoint(tmp_path):
    """SIGINT to `fedmeta run` (its own local Ray): exit 130, a checkpoint of the last full round."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    raw = tiny_raw(tmp_path, federation={"rounds": 100000}, eval={"every": 100000})
    cfg = tmp_path / "long.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmeta", "run", str(cfg), "--no-progress"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob("t-*/checkpoint.pt")):
            assert proc.poll() is None and time.time() < deadline, "run ended or never checkpointed"
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    run_dir = next(tmp_path.glob("t-*"))
    ck = ckpt.load(run_dir)
    assert 1 <= ck.round < 100000 and np.isfinite(ck.global_params).all()
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["round"].max() == ck.round  # metrics saved with, and only up to, the checkpoint


def test_dp_run_accounts_every_round_and_audits(ray_session, tmp_path):
    from fedmeta.actors.privacy import epsilon_for

    raw = tiny_raw(tmp_path, privacy={"mode": "central", "noise_multiplier": 1.1, "clip_norm": 0.5})
    _, s = run_experiment(from_dict(raw))
    q = 10 / 40
    assert s["sample_rate"] == q and s["noise_multiplier"] == 1.1 and s["clip_norm"] == 0.5
    assert s["epsilon"] == pytest.approx(with_card(1.1, q, 4), rel=1e-9) and s["epsilon"] > epsilon_for(
        1.1, q, 4, 1e-5
    )
    assert 0.0 <= s["mia_auc"] <= 1.0 and 0.0 <= s["mia_auc_personalized"] <= 1.0
    assert s["privacy_mode"] == "central" and s["stopped_early"] is None
    assert s["sampling"] == "poisson" and s["adjacency"] == "add/remove one user"  # the default under DP


def test_dp_target_epsilon_is_met_and_budget_stops_training(ray_session, tmp_path):
    from fedmeta.actors.privacy import noise_for

    raw = tiny_raw(tmp_path, privacy={"mode": "central", "target_epsilon": 30.0})
    _, s = run_experiment(from_dict(raw))
    assert s["noise_multiplier"] == pytest.approx(noise_for(30.0, 0.25, 4, 1e-5))
    assert s["epsilon"] <= 30.0 and s["rounds"] == 4
    # resuming the finished run for more rounds would overshoot: training stops cleanly instead
    run_dir = Path(s["run_dir"])
    raw["federation"]["rounds"] = 8
    _, more = run_experiment(from_dict(raw), run_dir=run_dir, resume=True)
    assert more["rounds"] < 8 and more["epsilon"] <= 30.0 and "privacy budget" in more["stopped_early"]


def test_secagg_and_dp_run_end_to_end(ray_session, tmp_path):
    raw = tiny_raw(
        tmp_path,
        secagg={"enabled": True, "neighbors": 4},
        privacy={"mode": "central"},
        federation={"dropout": 0.1},
    )
    run_dir, s = run_experiment(from_dict(raw))
    assert s["secagg_neighbors"] == 4 and s["secagg_threshold"] == 3 and s["secagg_bits"] >= 20
    assert s["epsilon"] > 0 and 0 <= s["mia_auc"] <= 1
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    aborted = metrics[metrics.metric == "aborted"].value
    assert len(aborted) == 4 and s["secagg_aborted_rounds"] == int(aborted.sum())
    for k in ("acc_global_DI", "acc_personalized_DI"):
        assert 0 <= s[k]["mean"] <= 1
    # an aborted round releases nothing: the accountant counts only the rounds that went through

    done = 4 - s["secagg_aborted_rounds"]
    assert done >= 1 and s["epsilon"] == pytest.approx(with_card(1.0, 0.25, done), rel=1e-9)
    # the checkpoint's model card alone rebuilds the model and tells what it cost
    import torch

    from fedmeta.sim.checkpoint import load as load_ckpt
    from fedmeta.sim.checkpoint import load_model

    model, card = load_model(run_dir)
    assert card["supports_federated_meta_learning"] and card["training"]["rounds_completed"] == 4
    assert card["privacy"]["epsilon"] == pytest.approx(s["epsilon"]) and card["privacy"]["secure_aggregation"]
    assert card["privacy"]["secagg_neighbors"] == 4 and card["privacy"]["clip_norm"] == 1.0
    assert card["data_schema"]["input_shape"] == [1, 8, 8] and card["data_schema"]["num_classes"] == 10
    assert card["adaptation"]["lr"] == 0.05 and card["adaptation"]["steps"] == 5
    from fedmeta.sim.models import build_model, param_shapes, unflatten

    reference = build_model(from_dict(raw).model, (1, 8, 8), 10)
    params = unflatten(torch.as_tensor(load_ckpt(run_dir).global_params), param_shapes(reference))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.func.functional_call(reference, params, (x,)))


def test_fixed_size_cohorts_are_accounted_without_replacement(ray_session, tmp_path):
    from fedmeta.actors.privacy import Sampling, epsilon_for

    raw = tiny_raw(
        tmp_path,
        privacy={"mode": "central", "noise_multiplier": 1.1},
        federation={"sampling": "fixed"},
        eval={"every": 4},
    )
    _, s = run_experiment(from_dict(raw))
    assert s["sampling"] == "fixed" and s["adjacency"] == "replace one user"
    fixed = epsilon_for(1.1, 0.25, 4, 1e-5, sampling=Sampling("fixed", 40, 10))
    assert s["epsilon"] == pytest.approx(with_card(1.1, 0.25, 4, Sampling("fixed", 40, 10)), rel=1e-9)
    assert fixed > epsilon_for(1.1, 0.25, 4, 1e-5)


def test_distributed_dp_accounts_with_the_surviving_shares(ray_session, tmp_path):
    """Each client's Skellam share carries 1/M of the planned variance, so a Poisson cohort of k
    clients (no dropout) adds k/M of it: every round is accounted at z * sqrt(k / M)."""
    from fedmeta.actors.privacy import PrivacyAccountant, effective_noise_multiplier
    from fedmeta.sim.sampling import sample_poisson

    raw = tiny_raw(
        tmp_path,
        secagg={"enabled": True, "neighbors": 4},
        privacy={"mode": "distributed", "noise_multiplier": 1.2},
        federation={"dropout": 0.0},
        run={"seeded_secrets": True},
    )  # the test recomputes the cohorts from the seed
    run_dir, s = run_experiment(from_dict(raw))
    assert s["privacy_mode"] == "distributed" and s["sampling"] == "poisson"
    aborted = pd.read_parquet(run_dir / "metrics.parquet").query("metric == 'aborted'").value.tolist()
    expected = PrivacyAccountant("rdp")
    for r, was_aborted in enumerate(aborted):
        k = len(sample_poisson(Secrets.seeded(3), r, 40, 0.25))
        if not was_aborted:  # an aborted round released nothing
            expected.step(effective_noise_multiplier(1.2, 10, k), 0.25)
    expected.release(1.2)  # the model card's input profile and panel quality (sim/run/card_stats.py)
    expected.release(1.2 / np.sqrt(2))
    assert expected.steps >= 1 and s["epsilon"] == pytest.approx(expected.epsilon(1e-5), rel=1e-9)


def test_secagg_config_problems_are_config_errors(ray_session, tmp_path):
    from fedmeta.sim.config import ConfigError

    for sections, match in (
        ({"federation": {"clients_per_round": 1}}, "federation.clients_per_round: secure"),
        ({"secagg": {"enabled": True, "neighbors": 4, "threshold": 9}}, "secagg.threshold"),
    ):
        raw = tiny_raw(tmp_path, **sections)
        raw["secagg"] = {**raw.get("secagg", {}), "enabled": True}
        with pytest.raises(ConfigError, match=match):
            run_experiment(from_dict(raw))


@pytest.mark.parametrize("algorithm, grads_per_step", [("fedavg", 1), ("reptile", 1), ("fomaml", 2)])
def test_local_dp_sgd_run_reports_each_clients_budget(ray_session, tmp_path, algorithm, grads_per_step):
    """Sample-level DP-SGD inside clients: the summary carries the worst client's epsilon, which the
    ledger recomputes from the rounds' cohorts. Every noisy gradient counts: a client here takes 3
    local steps (batches of 8 of its 21 samples), each one noisy gradient, or two for FO-MAML."""
    from fedmeta.actors.privacy import epsilon_for
    from fedmeta.sim.sampling import apply_dropout, sample_cohort

    raw = tiny_raw(
        tmp_path,
        privacy={"local_dp": True, "local_clip": 1.0, "local_noise_multiplier": 0.8},
        algorithm={"name": algorithm},
        run={"seeded_secrets": True},
    )  # cohorts from the seed
    run_dir, s = run_experiment(from_dict(raw))
    assert s["compute"] == "loop" and s["local_dp"] == {"clip": 1.0, "noise_multiplier": 0.8}
    counts: dict[int, int] = {}
    for r in range(4):
        alive, _ = apply_dropout(Secrets.seeded(3), r, sample_cohort(Secrets.seeded(3), r, 40, 10), 0.0)
        for c in alive.tolist():
            counts[c] = counts.get(c, 0) + 1
    releases = 3 * grads_per_step * max(counts.values())
    assert s["local_epsilon"] == pytest.approx(epsilon_for(0.8, 8 / 21, releases, 1e-5), rel=1e-9)
    assert 0 <= s["acc_personalized_DI"]["mean"] <= 1


def test_consent_gates_the_cohort_and_revocation_takes_effect_next_round(ray_session, tmp_path):
    """With the profile store on, only users consenting to 'personalization' train; a user who
    revokes is out of the very next round."""
    from fedmeta.sim.engine.federation import Federation
    from fedmeta.sim.engine.plan import FederationPlan
    from fedmeta.sim.sampling import sample_cohort

    cfg = from_dict(
        tiny_raw(tmp_path, profiles={"enabled": True, "consent_rate": 0.5}, run={"seeded_secrets": True})
    )
    fed = Federation(FederationPlan.from_config(cfg), run_dir=tmp_path)  # seeded: the test recomputes cohorts
    try:
        consenting = set(ray_get_eligible(fed, range(40)))
        assert 10 < len(consenting) < 30  # about half signed up with consent
        g = fed.plan.init_params
        res = fed.train_round(0, g)
        assert set(res.trained) == set(sample_cohort(Secrets.seeded(3), 0, 40, 10).tolist()) & consenting
        assert res.metrics["not_consenting"] == 10 - len(res.trained)
        nxt = [c for c in sample_cohort(Secrets.seeded(3), 1, 40, 10).tolist() if c in consenting]
        fed.revoke(nxt[0])
        res = fed.train_round(1, res.global_params)
        assert nxt[0] not in res.trained and set(res.trained) == set(nxt[1:])
    finally:
        fed.shutdown()
    from fedmeta.sim.artifacts.statedir import run_secrets_dir

    key = run_secrets_dir(tmp_path, create=False) / "profiles.key"  # the state directory, not the run's
    assert (tmp_path / "profiles.sqlite").is_file() and not list(tmp_path.glob("*.key"))
    assert key.stat().st_mode & 0o077 == 0 and key.parent.stat().st_mode & 0o077 == 0


def ray_get_eligible(fed, ids):
    import ray

    return ray.get(fed.consent.store.eligible.remote("personalization", list(ids)))


def test_last_evaluation_exports_personalized_models(ray_session, tmp_path):
    """personalized/<id>.npy: each evaluated individual's fine-tuned parameters; the model card
    carries the input profile and the last evaluation's quality."""
    from fedmeta.sim.checkpoint import load_model

    run_dir, s = run_experiment(from_dict(tiny_raw(tmp_path, federation={"rounds": 2})))
    files = sorted((run_dir / "personalized").glob("*.npy"))
    assert len(files) == 8
    ind = pd.read_parquet(run_dir / "individuals.parquet")
    assert {int(f.stem) for f in files} == set(ind.client_id)
    _, card = load_model(run_dir)
    assert len(card["input_profile"]["mean"]) == 64 and card["input_profile"]["n"] > 0
    assert card["quality"]["acc_personalized_DI"] == pytest.approx(s["acc_personalized_DI"]["mean"])
    flat = np.load(files[0])
    assert flat.shape == (card["model"]["n_params"],) and np.isfinite(flat).all()


@pytest.mark.slow
def test_newcomers_joining_raise_the_alarm_and_the_run_tunes_within_its_epsilon(ray_session, tmp_path):
    """data.drift.joiners: 20 of 60 writers with rotated images join at round 4. The watcher
    (calibrated on rounds 1-2) sees only those in the federation, so nothing moves before round 4;
    the newcomers' inputs raise the alarm right after, Tune searches from that checkpoint and the run
    finishes under the best configuration. Under DP the trials' rounds and metric reports are in the
    run's epsilon. (The everyone-rotates drift raises its alarm in the test after this one.)"""
    from fedmeta.actors.privacy import epsilon_for
    from fedmeta.sim.engine.plan import FederationPlan

    raw = tiny_raw(
        tmp_path,
        data={
            "num_clients": 60,
            "samples_per_client": 40,
            "drift": {"at_round": 4, "rotation": 90.0, "joiners": 20},
        },
        federation={"rounds": 6},
        eval={"every": 2},
        privacy={"mode": "central", "noise_multiplier": 3.0, "audit_canaries": 0},
        tune={
            "auto": True,
            "reference_rounds": 2,
            "watch_individuals": 40,
            "num_samples": 2,
            "max_concurrent": 2,
            "rounds_per_trial": 1,
            "grace_period": 1,
        },
        ray={"num_workers": 1},
    )  # one worker actor per federation and trial: faster starts
    run_dir, s = autotune_run(from_dict(raw))
    assert s["rounds"] == 6 and s["drift_alarm_round"] == 5
    assert set(s["tuned_config"]) == {"algorithm.lr", "algorithm.local_epochs", "eval.finetune_lr"}
    assert Path(s["tune_experiment"]).is_dir() and (run_dir / "tune").is_dir()
    j = s["joiners"]
    assert j["at_round"] == 4 and j["rounds"] == [2, 4, 6] and j["in_panel"] > 0
    # 6 rounds at z = 3 alone spend less than the run did with its 2 trial rounds and 2 reports
    dp = FederationPlan.from_config(from_dict(raw)).dp
    alone = epsilon_for(3.0, dp.sample_rate, 6, dp.delta, sampling=dp.sampling)
    assert 0 < s["epsilon_tuning"] <= s["epsilon"] and s["epsilon"] > alone


@pytest.mark.slow
def test_auto_tuning_without_budget_goes_on_untuned(ray_session, tmp_path):
    """privacy.target_epsilon leaves room for one more training round after the alarm but not for a
    trial's round and metric report: no trial runs, the run records why, continues under its own
    configuration and stops at the budget, never past it. With no room even for that round, the
    run stops at the alarm and says the search never started."""
    from fedmeta.actors.privacy import epsilon_for
    from fedmeta.sim.engine.plan import FederationPlan

    privacy = {"mode": "central", "noise_multiplier": 3.0, "audit_canaries": 0}
    raw = tiny_raw(
        tmp_path,
        data={"num_clients": 60, "samples_per_client": 40, "drift": {"at_round": 4, "rotation": 90.0}},
        federation={"rounds": 7},
        eval={"every": 7},
        privacy=privacy,
        tune={
            "auto": True,
            "reference_rounds": 3,
            "watch_individuals": 40,
            "num_samples": 2,
            "max_concurrent": 2,
            "rounds_per_trial": 1,
            "grace_period": 1,
        },
        ray={"num_workers": 1},
    )
    dp = FederationPlan.from_config(from_dict(raw)).dp
    five, six = (epsilon_for(3.0, dp.sample_rate, n, dp.delta, sampling=dp.sampling) for n in (5, 6))
    raw["privacy"]["target_epsilon"] = six * 1.001
    run_dir, s = autotune_run(from_dict(raw))
    assert s["drift_alarm_round"] == 5 and s["tuned_config"] is None and "no budget" in s["tune_skipped"]
    assert s["rounds"] == 6 and s["epsilon"] == pytest.approx(six) and s["epsilon_tuning"] == 0.0
    raw["privacy"]["target_epsilon"] = five * 1.001
    run_dir, s = autotune_run(from_dict(raw))
    assert s["drift_alarm_round"] == 5 and s["tuned_config"] is None and s["rounds"] == 5
    assert "stopped before the search" in s["tune_skipped"] and "privacy budget" in s["tune_skipped"]
    assert s["epsilon"] == pytest.approx(five) and s["epsilon_tuning"] is None


def test_tuning_metric_under_secure_aggregation_equals_the_plain_mean(ray_session, tmp_path):
    """With secagg on, Tune's metric is a secure sum of the individuals' accuracies: the aggregator
    sees masked vectors and their total, which equals the plain mean (to quantization)."""
    from fedmeta.sim.engine.federation import Federation
    from fedmeta.sim.engine.plan import FederationPlan

    cfg = from_dict(tiny_raw(tmp_path, secagg={"enabled": True, "neighbors": 4}))
    fed = Federation(FederationPlan.from_config(cfg))
    try:
        g = fed.train_round(0, fed.plan.init_params).global_params
        secure = fed.private_metric(1, g)
        ev = fed.evaluate(1, g)
    finally:
        fed.shutdown()
    assert secure["count"] == len(ev["acc_personalized_DI"]) == 8
    for key in ("acc_global_DI", "acc_personalized_DI"):
        assert secure[key] == pytest.approx(float(np.mean(ev[key])), abs=1e-4)


def test_dp_noise_is_secret_unless_seeded_secrets_is_asked_for(ray_session, tmp_path):
    """Two DP runs of one seed release different noise; with run.seeded_secrets they are identical.
    The run secret stays in run_secret.key (owner-only) in the per-user state directory, never in the
    run directory (0700), its checkpoint, card or summary."""
    raw = tiny_raw(
        tmp_path,
        privacy={"mode": "central"},
        federation={"rounds": 2},
        eval={"every": 2},
        ray={"num_workers": 1},
    )
    a_dir, a = run_experiment(from_dict(raw))
    b_dir, _ = run_experiment(from_dict(raw))
    pa, pb = ckpt.load(a_dir).global_params, ckpt.load(b_dir).global_params
    assert not np.array_equal(pa, pb) and a["secrets"] == "csprng"
    from fedmeta.sim.artifacts.statedir import run_secrets_dir

    secret = run_secrets_dir(a_dir, create=False) / "run_secret.key"  # outside the run directory
    key = secret.read_bytes()
    assert len(key) == 32 and secret.stat().st_mode & 0o077 == 0 and secret.parent.stat().st_mode & 0o077 == 0
    assert not list(a_dir.rglob("*.key")) and a_dir.stat().st_mode & 0o777 == 0o700
    assert key not in b"".join(f.read_bytes() for f in a_dir.rglob("*") if f.is_file())
    assert (
        key not in (a_dir / "checkpoint.pt").read_bytes()
        and key.hex() not in (a_dir / "summary.json").read_text()
    )
    raw["run"]["seeded_secrets"] = True
    c_dir, c = run_experiment(from_dict(raw))
    d_dir, _ = run_experiment(from_dict(raw))
    np.testing.assert_array_equal(ckpt.load(c_dir).global_params, ckpt.load(d_dir).global_params)
    assert c["secrets"] == "seeded" and "do not know the seed" in c["secrets_note"]
    assert not (c_dir / "run_secret.key").exists()


def test_the_canary_audit_sees_leakage_without_dp_and_stays_below_epsilon_with_it(ray_session, tmp_path):
    """One-run audit (Steinke et al. 2023) with 40 canary clients: on a non-private run it shows
    leakage; under DP its lower bound stays below the accounted epsilon."""
    raw = tiny_raw(
        tmp_path,
        data={"num_clients": 120, "samples_per_client": 20},
        federation={"rounds": 30, "clients_per_round": 30},
        algorithm={"local_epochs": 5, "lr": 0.3},
        eval={"every": 30},
        privacy={"audit_canaries": 40},
        run={"seeded_secrets": True},
    )
    _, plain = run_experiment(from_dict(raw))
    assert plain["audit_canaries"] == 40 and plain["epsilon"] is None
    assert plain["audit_epsilon_lower"] > 0.5 and plain["audit_tpr_at_1pct_fpr"] > 0.3
    raw["privacy"]["mode"] = "central"
    _, private = run_experiment(from_dict(raw))
    assert 0 <= private["audit_epsilon_lower"] <= private["epsilon"]
    assert private["audit_tpr_at_1pct_fpr"] < plain["audit_tpr_at_1pct_fpr"]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_the_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    """SIGTERM to `fedmeta run` (its own local Ray) is Ctrl-C's twin: the last full round is
    checkpointed, exit 143; `--resume` then ends at the final metrics of a run never stopped."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    root = Path(__file__).resolve().parents[3]

    def cli(*args):
        return subprocess.Popen(
            [sys.executable, "-m", "fedmeta", *args, "--no-progress"],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    for name in ("stopped", "calm"):
        raw = tiny_raw(tmp_path / name, federation={"rounds": 60}, eval={"every": 60})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    proc = cli("run", str(tmp_path / "stopped.yaml"))
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "stopped").glob("t-*/checkpoint.pt")):
            assert proc.poll() is None and time.time() < deadline, "run ended or never checkpointed"
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "terminated" in err and "--resume" in err
    run_dir = next((tmp_path / "stopped").glob("t-*"))
    assert 1 <= ckpt.load(run_dir).round < 60
    resumed = cli("run", "--resume", str(run_dir))
    calm = cli("run", str(tmp_path / "calm.yaml"))
    for p in (resumed, calm):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    stopped = json.loads((run_dir / "summary.json").read_text())
    whole = json.loads(next((tmp_path / "calm").glob("t-*/summary.json")).read_text())
    for key in ("acc_global_DI", "acc_personalized_DI", "acc_global_DG"):
        assert stopped[key] == whole[key], key
    np.testing.assert_array_equal(
        ckpt.load(run_dir).global_params, ckpt.load(next((tmp_path / "calm").glob("t-*"))).global_params
    )


@pytest.mark.parametrize("mode", ["sync", "fedbuff"])
def test_joiners_train_only_from_the_drift_round_on(ray_session, tmp_path, mode):
    """`data.drift.joiners`: the newcomers are never in a cohort before `at_round` and are after it
    (with the drifted data the worker hands them)."""
    from fedmeta.sim.engine.federation import Federation
    from fedmeta.sim.engine.plan import FederationPlan

    federation = {"rounds": 6, "clients_per_round": 20}
    if mode == "fedbuff":
        federation.update(
            mode="fedbuff", clients_per_round=10, system={"enabled": True}, fedbuff={"concurrency": 20}
        )
    cfg = from_dict(
        tiny_raw(
            tmp_path,
            data={"drift": {"at_round": 3, "style_strength": 3.0, "joiners": 15}},
            federation=federation,
        )
    )
    fed = Federation(FederationPlan.from_config(cfg))
    try:
        joiners, g, trained = set(fed.plan.joiner_ids.tolist()), fed.plan.init_params, []
        for r in range(6):
            res = fed.train_round(r, g)
            g = res.global_params
            trained.append(set(res.trained))
    finally:
        fed.shutdown()
    assert joiners == set(range(25, 40))
    if mode == "sync":
        assert not (trained[0] | trained[1] | trained[2]) & joiners and all(t & joiners for t in trained[3:])
    else:  # clients started before the drift step may still arrive after it: none of them is a joiner
        assert not (trained[0] | trained[1]) & joiners and (trained[4] | trained[5]) & joiners


def test_the_run_layer_refuses_tune_auto_without_the_tuning_hook(tmp_path):
    """tune.auto needs the hook the tuning layer adds: the bare run refuses before any side effect."""
    raw = tiny_raw(tmp_path / "runs", tune={"auto": True})
    with pytest.raises(ValueError, match="tune.auto: the auto-tuning hook is missing"):
        run_experiment(from_dict(raw))
    assert not (tmp_path / "runs").exists()
