"""secagg.prefetch: round r+1's key set-up is submitted while round r is unmasked. It must change
nothing but the time: the same models as without it, whatever happens between the rounds."""
import numpy as np
import pytest

from sim.config import from_dict
from sim.federation import Federation
from sim.plan import FederationPlan
from tests.conftest import tiny_raw


def federation(prefetch: bool) -> Federation:
    cfg = from_dict(tiny_raw(secagg={"enabled": True, "neighbors": 4, "prefetch": prefetch},
                             privacy={"clip_norm": 0.5}, run={"seeded_secrets": True}))
    return Federation(FederationPlan.from_config(cfg))


def rounds(fed: Federation, order: list[int], between=None) -> tuple[list[np.ndarray], list[bool]]:
    """Train the rounds in `order`; returns each round's model and whether it used a prefetched set-up."""
    g, models, used = fed.plan.init_params, [], []
    original = fed._prefetched_setup

    def spy(round_index, clients):
        run = original(round_index, clients)
        used.append(run is not None)
        return run
    fed._prefetched_setup = spy
    for r in order:
        g = fed.train_round(r, g).global_params
        models.append(g)
        if between is not None:
            between(fed, r)
    return models, used


@pytest.mark.slow
def test_prefetched_set_up_gives_the_same_models_and_is_redone_when_the_round_is_not_the_next(ray_session):
    on, off = federation(True), federation(False)
    try:
        # round 3 follows round 1: the set-up prefetched for round 2 is not used (and replaced)
        order = [0, 1, 3, 4]
        # a secure evaluation's own secure sum between rounds leaves the prefetched session alone
        evaluate = lambda fed, r: fed.evaluate(r + 1, fed.plan.init_params) if r == 0 else None  # noqa: E731
        m_on, used_on = rounds(on, order, evaluate)
        m_off, used_off = rounds(off, order, evaluate)
    finally:
        on.shutdown()
        off.shutdown()
    assert used_on == [False, True, False, True]
    assert used_off == [False] * 4
    for a, b in zip(m_on, m_off):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(m_on[0], m_on[1])


@pytest.mark.slow
def test_a_worker_lost_after_the_set_up_went_out_is_a_dropout_and_the_next_set_up_is_redone(ray_session):
    import ray
    fed = federation(True)
    try:
        def kill_worker(f, r):
            if r == 0:     # round 1's set-up is already queued; Ray restarts the worker without its state
                ray.kill(f.workers[0], no_restart=False)
        models, used = rounds(fed, [0, 1, 2], kill_worker)
        faults = fed.faults.total()
    finally:
        fed.shutdown()
    # round 1 ran on the set-up made before the loss (its clients on the lost worker drop out, as
    # in any secure sum that loses a worker); round 2's set-up went out before the loss was seen,
    # so it is redone
    assert used == [False, True, False]
    assert faults >= 1
    assert all(np.isfinite(m).all() for m in models)
