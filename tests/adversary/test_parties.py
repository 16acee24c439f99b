"""What each party named by the privacy claims can do, tried as that party would (issue 26).

- a curious analyst holds the model card (hence the seed) and tries to recompute who was in each
  round's cohort;
- a curious aggregator (distributed DP) knows who took part and composes each user's rounds;
- a curious worker looks through everything its actor holds for the run secret or the
  aggregator's key.
The `seeded_secrets` runs are the tests' power check: there the same attack must succeed.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fedmeta.sim.config import from_dict
from fedmeta.sim.seeding import Secrets
from tests.conftest import tiny_raw

pytestmark = pytest.mark.adversary


def _federation(tmp_path, seeded: bool, **sections):
    from fedmeta.sim.engine.federation import Federation
    from fedmeta.sim.engine.plan import FederationPlan

    sections["privacy"] = {"mode": "central", "noise_multiplier": 1.0, **sections.get("privacy", {})}
    raw = tiny_raw(tmp_path, **sections)
    raw["run"]["seeded_secrets"] = seeded
    return Federation(FederationPlan.from_config(from_dict(raw)))


@pytest.mark.parametrize("seeded", [False, True])
def test_an_analyst_with_the_seed_cannot_recompute_the_cohorts(ray_session, tmp_path, seeded):
    """The analyst reruns the sampler with the published seed and calls 'member' whoever it draws.
    With secret cohorts the guess overlaps the real cohorts no more than any other draw at rate q
    would (expected q = 0.25 of them); with seeded secrets it is exact."""
    from fedmeta.sim.sampling import draw_cohort

    fed = _federation(tmp_path, seeded, federation={"rounds": 6})
    try:
        g, hits, members, sizes = fed.plan.init_params, 0, 0, []
        for r in range(6):
            res = fed.train_round(r, g)
            guess = set(draw_cohort(Secrets.seeded(fed.cfg.seed), r, fed.plan.sampling).tolist())
            hits += len(guess & set(res.trained))
            members += len(res.trained)
            sizes.append((len(guess), res.clients))
        assert members > 20
        if seeded:
            assert hits == members and all(a == b for a, b in sizes)
        else:
            # Binomial(members, 0.25): 0.6 is more than 4 standard deviations above the mean
            assert hits / members < 0.6
    finally:
        fed.shutdown()


def _metrics(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "metrics.parquet")


@pytest.mark.slow
def test_two_runs_with_one_seed_draw_different_cohorts_unless_seeded(ray_session, tmp_path):
    """Done-when of issue 26: two DP runs with one seed differ in their per-round cohort sizes
    (`clients` in the metrics); with run.seeded_secrets they are identical."""
    from fedmeta.sim.run.experiment import run_experiment

    def sizes(seeded: bool, name: str) -> list[float]:
        raw = tiny_raw(
            tmp_path / name,
            privacy={"mode": "central", "noise_multiplier": 1.0},
            federation={"rounds": 8},
            eval={"every": 8},
        )
        raw["run"]["seeded_secrets"] = seeded
        run_dir, _ = run_experiment(from_dict(raw))
        df = _metrics(run_dir)
        return df[df.metric == "clients"].sort_values("round").value.tolist()

    assert sizes(True, "a") == sizes(True, "b")
    assert sizes(False, "c") != sizes(False, "d")  # 8 Poisson(10) sizes: equal with chance < 1e-4


@pytest.mark.slow
def test_a_curious_aggregator_composes_each_users_rounds_without_amplification(ray_session, tmp_path):
    """Distributed DP: the aggregator unmasks each round's noisy sum knowing its participants. The
    test recomputes the seeded cohorts, composes each user's rounds as Opacus' RDP of a Gaussian at
    q = 1 (one term per round, at the round's achieved z), and finds the summary's
    `epsilon_by_party.aggregator` for the worst-off user, at least the released model's amplified
    epsilon. The panel metric releases compose for everyone: their noise comes from the panel's
    own shares, so the aggregator never sees a metric without it."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedmeta.actors.privacy import effective_noise_multiplier
    from fedmeta.sim.run.experiment import run_experiment
    from fedmeta.sim.sampling import sample_poisson

    raw = tiny_raw(
        tmp_path,
        secagg={"enabled": True, "neighbors": 4},
        privacy={"mode": "distributed", "noise_multiplier": 1.2},
        federation={"dropout": 0.0},
    )
    raw["run"]["seeded_secrets"] = True
    run_dir, s = run_experiment(from_dict(raw))
    parties = s["epsilon_by_party"]
    assert parties["aggregator"]["amplified"] is False and parties["aggregator"].get("trusted") is None
    aborted = _metrics(run_dir).query("metric == 'aborted'").sort_values("round").value.tolist()
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = np.zeros((40, len(orders)))
    rounds = np.zeros(40, dtype=int)
    for r, was_aborted in enumerate(aborted):
        cohort = sample_poisson(Secrets.seeded(3), r, 40, 0.25)
        if was_aborted or not len(cohort):
            continue
        z = effective_noise_multiplier(1.2, 10, len(cohort))
        rdp[cohort] += compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=orders)
        rounds[cohort] += 1
    # the run's metric releases over the panel (steps at rate 1 in its accountant) count for every user
    from fedmeta.sim import checkpoint as ckpt

    for z, q, n in ckpt.load(run_dir).accountant["history"]:
        if q == 1.0:
            rdp += compute_rdp(q=1.0, noise_multiplier=z, steps=n, orders=orders)
    eps = np.array(
        [get_privacy_spent(orders=orders, rdp=row, delta=1e-5)[0] if row.any() else 0.0 for row in rdp]
    )
    agg = parties["aggregator"]
    assert agg["rounds_max"] == rounds.max() and agg["rounds_median"] == np.median(rounds)
    assert agg["epsilon"] == pytest.approx(eps.max(), rel=1e-3)
    assert agg["epsilon"] >= parties["released_model"]["epsilon"] > 0
    assert agg["epsilon_median"] <= agg["epsilon"]


def test_central_dp_names_the_aggregator_as_trusted():
    from fedmeta.actors.privacy import RunAccounting, Sampling, UserLevelDP

    acc = RunAccounting(UserLevelDP("central", 1.0, 1.0, 10, Sampling("poisson", 100, 10)))
    acc.record_round({}, [1, 2, 3])
    parties = acc.facts()["epsilon_by_party"]
    assert parties["aggregator"]["trusted"] is True and "central DP" in parties["aggregator"]["reason"]
    assert parties["released_model"]["epsilon"] == acc.epsilon() and parties["released_model"]["amplified"]


def test_the_aggregators_epsilon_is_the_exact_gaussian_composition_per_user():
    """Three rounds at z = 1 for user 0, one for user 1: mu^2 = 3 and 1, i.e. one Gaussian release
    at z = 1/sqrt(3) and at z = 1; the aggregator-side epsilon survives a checkpoint round trip."""
    from fedmeta.actors.privacy import RunAccounting, Sampling, UserLevelDP, epsilon_for

    dp = UserLevelDP("distributed", 1.0, 1.0, 10, Sampling("poisson", 5, 2))
    acc = RunAccounting(dp)
    for ids in ([0, 1], [0], [0]):
        acc.record_round({"secagg_survivors": 10}, ids)
    agg = acc.facts()["epsilon_by_party"]["aggregator"]
    assert agg["epsilon"] == pytest.approx(epsilon_for(1 / math.sqrt(3), 1.0, 1, 1e-5))
    assert agg["rounds_max"] == 3 and agg["rounds_median"] == 0 and agg["epsilon_median"] == 0.0
    again = RunAccounting(dp)
    again.load_state_dict(acc.state_dict())
    assert again.facts()["epsilon_by_party"] == acc.facts()["epsilon_by_party"]
    acc.record_release(2.0)  # a panel metric, noised by the panel's shares: composed for all
    agg = acc.facts()["epsilon_by_party"]["aggregator"]
    assert agg["epsilon"] == pytest.approx(epsilon_for(1 / math.sqrt(3 + 0.25), 1.0, 1, 1e-5))
    assert agg["epsilon_median"] == pytest.approx(epsilon_for(2.0, 1.0, 1, 1e-5))


def _secrets_held(actor) -> list[bytes]:
    """Everything key-like a curious worker finds in its own actor: every `Secrets` key and every
    32-byte string in its attributes, one level into containers."""

    def look(self):
        from fedmeta.sim.seeding import Secrets

        found = []

        def visit(v, depth=0):
            if isinstance(v, Secrets) and v.key is not None:
                found.append(v.key)
            elif isinstance(v, (bytes, bytearray)) and len(v) == 32:
                found.append(bytes(v))
            elif depth < 3 and isinstance(v, dict):
                for x in v.values():
                    visit(x, depth + 1)
            elif depth < 3 and isinstance(v, (list, tuple, set, frozenset)):
                for x in v:
                    visit(x, depth + 1)

        for v in vars(self).values():
            visit(v)
        return found

    import ray

    return ray.get(actor.__ray_call__.remote(look))


def test_a_curious_worker_holds_neither_the_run_secret_nor_the_aggregators_key(ray_session, tmp_path):
    """After secure rounds with distributed noise, a worker has held only its clients' keys of a
    round: not the run secret (from which cohorts, every key and every noise stream follow), not
    the aggregator's key (its central and metric noise), and no client key of another round."""
    from fedmeta.sim.seeding import client_keys

    fed = _federation(
        tmp_path,
        False,
        secagg={"enabled": True, "neighbors": 4},
        privacy={"mode": "distributed", "noise_multiplier": 1.0},
        federation={"rounds": 2},
    )
    try:
        g = fed.plan.init_params
        for r in range(2):
            g = fed.train_round(r, g).global_params
        forbidden = {fed.secrets.key, fed.secrets.derive("aggregator").key}
        round0 = {k.key for k in client_keys(fed.secrets, 0, range(fed.plan.num_clients)).values()}
        for w in fed.workers:
            held = set(_secrets_held(w))
            assert not held & forbidden
            assert not held & round0  # the session of round 0 is forgotten with its keys
    finally:
        fed.shutdown()


def test_under_distributed_dp_the_panel_not_the_aggregator_noises_a_metric():
    """A curious aggregator of distributed DP never sees a panel metric without its noise: each
    panel member's Skellam share carries 1/panel of the release's variance (their sum: std `noise`
    on each sum of values in [0, 1]), and the aggregator adds nothing itself. Central DP: no
    shares, the (trusted) aggregator adds the noise."""
    from fedmeta.actors.aggregator import Aggregator
    from fedmeta.actors.privacy import Sampling, UserLevelDP
    from fedmeta.sim.config import AlgorithmConfig

    dp = UserLevelDP("distributed", 1.0, 2.0, 10, Sampling("poisson", 100, 10))
    step, panel, noise = 1e-3, 20, 1.5
    rng = np.random.default_rng(0)
    shares = np.stack([dp.metric_share(5000, step, noise, panel, rng) for _ in range(panel)])
    total = shares.sum(0) * step  # what the unmasked sum carries, in value units
    assert abs(total.std() - noise) < 0.05 and abs(total.mean()) < 0.05
    assert (
        UserLevelDP("central", 1.0, 2.0, 10, Sampling("poisson", 100, 10)).metric_share(
            5, step, noise, panel, rng
        )
        is None
    )
    agg = Aggregator(AlgorithmConfig(), 2, dp=dp, secrets=Secrets.fresh(0))
    from fedmeta.actors.messages import SummedUpdates

    summed = SummedUpdates(np.array([7.0, 9.0, 20.0]), 20.0)  # the unmasked (already noisy) sum
    out = agg.metric_from_sum(1_000_000, summed, "accuracy", noise, panel)
    assert out["acc_global_DI"] == 7.0 / 20 and out["acc_personalized_DI"] == 9.0 / 20
    central = Aggregator(
        AlgorithmConfig(),
        2,
        dp=UserLevelDP("central", 1.0, 2.0, 10, Sampling("poisson", 100, 10)),
        secrets=Secrets.fresh(0),
    ).metric_from_sum(1_000_000, summed, "accuracy", noise, panel)
    assert central["acc_global_DI"] != 7.0 / 20  # there the aggregator adds the noise
