"""Secret randomness: a curious aggregator, holding everything it is given, cannot recompute a
client's keys, masks or noise share; the seeded opt-in makes them repeat (and so recomputable)."""

import pickle

import numpy as np
import pytest

from fedmeta.actors.aggregator import Aggregator
from fedmeta.actors.client_worker import ClientWorker
from fedmeta.actors.secagg.protocol import SecAggClient
from fedmeta.sim.config import from_dict
from fedmeta.sim.engine.plan import FederationPlan
from fedmeta.sim.seeding import Secrets
from tests.actors.test_secure_round import secure_round
from tests.conftest import tiny_raw


def federation(secrets: Secrets):
    cfg = from_dict(
        tiny_raw(
            secagg={"enabled": True, "neighbors": 4}, privacy={"mode": "distributed", "noise_multiplier": 1.0}
        )
    )
    plan = FederationPlan.from_config(cfg)
    workers = [ClientWorker(cfg, i, plan.dp, secrets=secrets) for i in (0, 1)]
    agg = Aggregator(
        cfg.algorithm, plan.n_params, plan.dp, cfg.seed, secure=True, secrets=secrets.derive("aggregator")
    )
    return cfg, plan, workers, agg


def advertised_keys(plan, workers, agg, rnd, cohort):
    """Run a whole secure round and return what the clients advertised (public keys, as the server sees them)."""
    keys = {}
    for w in workers:
        original = w.secure_advertise

        def spy(pid, cids, params, original=original):
            adverts = original(pid, cids, params)
            keys.update({a.client: a for a in adverts})
            return adverts

        w.secure_advertise = spy
    g = np.zeros(plan.n_params, np.float32)
    secure_round(workers, agg, plan.secagg, g, rnd, cohort, set(cohort))
    return keys


@pytest.mark.parametrize("seeded", [False, True])
def test_a_curious_aggregator_recomputes_client_secrets_only_from_a_seeded_run(seeded):
    run = Secrets.seeded(3) if seeded else Secrets.fresh(3)
    cfg, plan, workers, agg = federation(run)
    rnd, cohort = 2, list(range(10, 20))
    keys = advertised_keys(plan, workers, agg, rnd, cohort)
    p = plan.secagg
    # the aggregator's best guesses: the public seed (which it holds, and the model card prints) and its own key
    for guess in (Secrets.seeded(cfg.seed), agg.secrets):
        for c in cohort:
            forged = SecAggClient(
                c, rnd, p.bits, p.threshold, guess.np_rng("secagg-client", rnd, c)
            ).advertise()
            share = plan.dp.noise_share(16, p.step, guess.np_rng("dp-noise-share", rnd, c))
            truth = plan.dp.noise_share(16, p.step, run.np_rng("dp-noise-share", rnd, c))
            recomputed = (forged == keys[c], np.array_equal(share, truth))
            # seeded: the seed gives everything away (the opt-in's stated limit); otherwise nothing
            assert recomputed == ((True, True) if seeded and guess.is_seeded else (False, False))
    if not seeded:  # nothing the aggregator holds contains the run secret
        assert run.key not in pickle.dumps(agg.__dict__)


def test_fresh_secrets_differ_per_federation_and_streams_differ_per_protocol_round():
    a, b = Secrets.fresh(0), Secrets.fresh(0)
    assert a.key != b.key and len(a.key) == 32
    draw = lambda s, *k: s.np_rng(*k).integers(0, 2**63, 4).tolist()  # noqa: E731
    assert draw(a, "secagg-client", 5, 1) != draw(
        b, "secagg-client", 5, 1
    )  # two Tune trials replaying round 5
    assert draw(a, "secagg-client", 5, 1) != draw(a, "secagg-client", 6, 1)
    assert draw(a, "secagg-client", 5, 1) == draw(
        Secrets(a.key, 0), "secagg-client", 5, 1
    )  # resume: same key
    assert a.derive("aggregator").key != a.key
    assert draw(Secrets.seeded(0), "x", 1) == draw(Secrets.seeded(0), "x", 1)


def test_two_trials_replaying_one_round_get_unrelated_keys():
    """Tune trials start from one checkpoint and replay its round ids; each trial's federation has
    its own run secret, so the same round's keys (hence masks) are unrelated across trials."""
    cfg = from_dict(tiny_raw(secagg={"enabled": True, "neighbors": 4}))
    plan = FederationPlan.from_config(cfg)
    trials = [ClientWorker(cfg, 0, plan.dp), ClientWorker(cfg, 0, plan.dp)]  # each with a fresh secret
    keys = [
        {a.client: (a.c_pk, a.s_pk) for a in w.secure_advertise(7, [1, 2, 3], plan.secagg)} for w in trials
    ]
    assert all(keys[0][c] != keys[1][c] for c in (1, 2, 3))


def test_uniform_coins_are_the_seeded_stream_or_a_uniform_keystream_of_their_own():
    from scipy import stats

    from fedmeta.sim.seeding import np_rng

    seeded = Secrets.seeded(7)
    np.testing.assert_array_equal(
        seeded.uniform(1000, "quantize", 3, 5), np_rng(7, "quantize", 3, 5).random(1000)
    )
    s = Secrets.fresh(7)
    u = s.uniform(200_000, "quantize", 3, 5)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    np.testing.assert_array_equal(u, s.uniform(200_000, "quantize", 3, 5))  # a stream repeats under its key
    assert not np.array_equal(u[:100], s.uniform(100, "quantize", 3, 6))  # another client: another stream
    assert not np.array_equal(u[:100], Secrets.fresh(7).uniform(100, "quantize", 3, 5))  # another run secret
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    # neither the Generator stream of the same name nor the seed's stream
    assert not np.array_equal(u[:100], s.np_rng("quantize", 3, 5).random(100))
    assert not np.array_equal(u[:100], seeded.uniform(100, "quantize", 3, 5))
