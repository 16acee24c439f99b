import numpy as np
import pytest

from fedmeta.actors.aggregator import AggregationError, Aggregator
from fedmeta.actors.messages import MaskedUpdate, PlainUpdate
from fedmeta.actors.privacy import UserLevelDP
from fedmeta.sim.config import AlgorithmConfig
from fedmeta.sim.seeding import Secrets


def msg(rnd, worker, vec, weight, ids):
    return PlainUpdate(rnd, worker, np.asarray(vec, dtype=np.float32), weight, tuple(ids))


def test_weighted_mean_and_server_lr():
    agg = Aggregator(AlgorithmConfig(server_lr=0.5), 3)
    g = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    # worker 0: two clients, weights 1 and 3, updates (1,1,1) and (2,0,0) -> sum (7,1,1), weight 4
    new, met = agg.aggregate(0, g, msg(0, 0, [7, 1, 1], 4.0, [0, 1]), msg(0, 1, [1, 3, 3], 4.0, [5]))
    np.testing.assert_allclose(new, g + 0.5 * np.array([8, 4, 4]) / 8.0, rtol=1e-6)
    assert (
        met["clients"] == 3 and not met["skipped"] and "train_loss" not in met
    )  # losses stay with the driver


def test_no_survivors_keeps_model():
    agg = Aggregator(AlgorithmConfig(), 2)
    g = np.array([1.0, -1.0], dtype=np.float32)
    new, met = agg.aggregate(3, g)
    assert met["skipped"] and np.array_equal(new, g)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: msg(1, 0, [0, 0], 1.0, [0]), "is for round 1"),
        (lambda: msg(0, 0, [0, 0, 0], 1.0, [0]), "sent 3 parameters, expected 2"),
        (lambda: msg(0, 0, [np.nan, 0], 1.0, [0]), "non-finite"),
    ],
)
def test_bad_messages_abort_without_change(bad, match):
    agg = Aggregator(AlgorithmConfig(), 2)
    with pytest.raises(AggregationError, match=match):
        agg.aggregate(0, np.zeros(2, np.float32), bad())
    assert agg.rounds_done == 0


def test_plain_and_masked_messages_are_refused_where_they_do_not_belong():
    masked = MaskedUpdate(0, 0, np.zeros(2, np.uint64), (1,))
    with pytest.raises(AggregationError, match="masked sum outside"):
        Aggregator(AlgorithmConfig(), 2).aggregate(0, np.zeros(2, np.float32), masked)
    with pytest.raises(AggregationError, match="unmasked update under secure aggregation"):
        Aggregator(AlgorithmConfig(), 2, secure=True).aggregate(
            0, np.zeros(2, np.float32), msg(0, 0, [0, 0], 1.0, [1])
        )


def test_duplicate_clients_rejected():
    agg = Aggregator(AlgorithmConfig(), 1)
    with pytest.raises(AggregationError, match="reported twice"):
        agg.aggregate(0, np.zeros(1, np.float32), msg(0, 0, [1], 1.0, [4]), msg(0, 1, [1], 1.0, [4]))


def test_central_dp_noise_and_fixed_denominator():
    dp = UserLevelDP("central", clip_norm=2.0, noise_multiplier=0.5, expected_clients=10)
    g = np.zeros(4000, np.float32)
    m = msg(0, 0, np.ones(4000), 3.0, [1, 2, 3])
    a = Aggregator(AlgorithmConfig(), 4000, dp, seed=1)
    new, met = a.aggregate(0, g, m)
    # mean = (sum + N(0, (zC)^2)) / expected cohort: noise std 1.0 / 10 around 1 / 10
    assert abs(new.mean() - 0.1) < 0.01 and abs(new.std() - 0.1) < 0.01 and met["noise_std"] == 1.0
    other, _ = Aggregator(AlgorithmConfig(), 4000, dp, seed=1).aggregate(0, g, m)
    assert not np.array_equal(new, other)  # secret noise: the seed does not determine it
    seeded = [
        Aggregator(AlgorithmConfig(), 4000, dp, seed=1, secrets=Secrets.seeded(1)).aggregate(0, g, m)[0]
        for _ in range(2)
    ]
    np.testing.assert_array_equal(*seeded)  # run.seeded_secrets: the stream is (seed, round)


def test_central_dp_releases_noise_even_for_an_empty_cohort():
    """A Poisson cohort can be empty; skipping the round would reveal it, so the noise goes out."""
    dp = UserLevelDP("central", clip_norm=1.0, noise_multiplier=1.0, expected_clients=10)
    g = np.zeros(50, np.float32)
    new, met = Aggregator(AlgorithmConfig(), 50, dp, seed=2).aggregate(0, g)
    assert not met["skipped"] and met["noise_std"] == 1.0 and np.abs(new).max() > 0
    kept, met = Aggregator(AlgorithmConfig(), 50).aggregate(0, g)  # without DP nothing is released
    assert met["skipped"] and np.array_equal(kept, g)


def test_a_panel_metric_is_a_noisy_sum_over_the_planned_panel_under_dp():
    """Without DP: the plain means over those who reported. With DP: Gaussian noise of the given
    multiplier on each sum (an individual adds at most 1), divided by the planned panel size, so
    whether one individual reported is not in the count."""
    parts = ({"mia_auc_DI": 3.0, "count": 5}, {"mia_auc_DI": 2.5, "count": 4})
    plain = Aggregator(AlgorithmConfig(), 2).aggregate_metric(7, *parts, panel=10)
    assert plain == {"count": 9, "mia_auc_DI": pytest.approx(5.5 / 9)}
    dp = UserLevelDP("central", clip_norm=1.0, noise_multiplier=1.0, expected_clients=10)
    released = [
        Aggregator(AlgorithmConfig(), 2, dp=dp, secrets=Secrets.fresh(s)).aggregate_metric(
            7, *parts, noise=3.0, panel=10
        )
        for s in range(400)
    ]
    assert {r["count"] for r in released} == {10}
    values = np.array([r["mia_auc_DI"] for r in released]) * 10 - 5.5  # the noise on the sum
    assert abs(values.mean()) < 3 * 3.0 / np.sqrt(400) and values.std() == pytest.approx(3.0, rel=0.15)
