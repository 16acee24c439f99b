"""Tuning's privacy against an analyst who knows how the trials sample (issue 26, item 4).

The tuning budget composes every trial's rounds as independent subsampled releases. That holds
only if the trials do not share their cohorts: before, every trial redrew the run's cohorts from
(seed, round), so 8 trials were one sample used 8 times (accounted 11.25 rounds where 46.1 were
due for configs/tune_pareto.yaml)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmeta.actors.privacy import Sampling, UserLevelDP, epsilon_for
from fedmeta.sim.sampling import draw_cohort
from fedmeta.sim.seeding import Secrets

pytestmark = pytest.mark.adversary

SAMPLING = Sampling("poisson", 400, 40)


@pytest.mark.parametrize("seeded", [False, True])
def test_trials_draw_independent_cohorts(seeded):
    """Two trials replaying the same round indices overlap at the rate independent draws would
    (q = 0.1 of a cohort), never as one shared sample; each trial's own draws repeat."""
    trials = [(Secrets.seeded(0) if seeded else Secrets.fresh(0)).for_trial(t) for t in ("a", "b")]
    overlap, size = 0, 0
    for r in range(20):
        a, b = (set(draw_cohort(s, r, SAMPLING).tolist()) for s in trials)
        overlap, size = overlap + len(a & b), size + len(a)
        assert a == set(draw_cohort(trials[0], r, SAMPLING).tolist())  # its own cohorts are stable
    assert size > 600 and overlap / size < 0.2  # Binomial(~800, 0.1): 0.2 is ~9 sd above the mean
    run = set(draw_cohort(Secrets.seeded(0), 0, SAMPLING).tolist())
    assert run != set(draw_cohort(trials[0], 0, SAMPLING).tolist())  # nor the run's own (seeded) ones


def test_a_trial_rounds_reports_compose_as_one_gaussian_release():
    """With the mia_auc objective a trial round releases three noisy panel sums (two accuracies at
    sensitivity sqrt(2), the leakage at 1): the budget reserves them as one Gaussian release with
    1/z^2 = 2/z^2 + 1/z^2, which is exactly their composition (compare with RDP of the parts)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedmeta.sim.tuning.trial import trial_release_noise

    dp = UserLevelDP("central", 1.0, 1.5, 40, SAMPLING)
    z = trial_release_noise(dp, {"acc_personalized_DI", "mia_auc"})
    assert z == pytest.approx(1.5 / math.sqrt(3))
    assert trial_release_noise(dp, {"acc_personalized_DI"}) == dp.metric_release_noise
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    parts = compute_rdp(
        q=1.0, noise_multiplier=dp.metric_release_noise, steps=1, orders=orders
    ) + compute_rdp(q=1.0, noise_multiplier=1.5, steps=1, orders=orders)
    hand = get_privacy_spent(orders=orders, rdp=np.asarray(parts), delta=1e-5)[0]
    assert epsilon_for(z, 1.0, 1, 1e-5) == pytest.approx(hand, rel=1e-6)
