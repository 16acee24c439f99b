"""The admission check: a client's NaN, infinite or oversized update is rejected and counted, and the
sum (so the model) is exactly what the honest clients alone give."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmeta.actors.aggregator import AggregationError, Aggregator
from fedmeta.actors.client_worker import ClientWorker
from fedmeta.actors.screening import screen, without_rejected
from fedmeta.sim.config import from_dict
from tests.conftest import tiny_raw

# big: above the bound; huge: a finite float whose norm overflows float32 (rejected with or without a bound)
POISON = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "big": 1e10, "huge": 1e30}
MAX_NORM = 1e3


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(1, 40), st.data())
def test_screen_rejects_exactly_the_bad_rows(rows, dim, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    updates = torch.tensor(rng.normal(0, 1, (rows, dim)), dtype=torch.float32)
    kinds = data.draw(st.lists(st.sampled_from([None, *POISON]), min_size=rows, max_size=rows))
    for i, kind in enumerate(kinds):
        if kind is not None:
            updates[i, data.draw(st.integers(0, dim - 1))] = POISON[kind]
    keep, counts = screen(updates, MAX_NORM)
    assert keep.tolist() == [k is None for k in kinds]
    assert counts == {
        "non_finite": sum(k in ("nan", "inf", "-inf") for k in kinds),
        "oversized": kinds.count("huge") + kinds.count("big"),
    }
    cleaned = without_rejected(updates, keep)
    assert torch.isfinite(cleaned).all() and (cleaned[~keep] == 0).all()
    assert torch.equal(cleaned[keep], updates[keep])
    # without a bound only non-finite updates are rejected (and "huge" ones where the norm overflows float)
    unbounded = screen(updates, None)[0].tolist()
    assert [u for u, k in zip(unbounded, kinds) if k != "huge"] == [
        k in (None, "big") for k in kinds if k != "huge"
    ]


@pytest.fixture(scope="module")
def worker():
    return ClientWorker(from_dict(tiny_raw(federation={"max_update_norm": MAX_NORM})))


def _poisoned(worker, monkeypatch, poison: dict[int, str]):
    """The worker's clients in `poison` send that kind of update (a broken or hostile device)."""
    original = worker.algorithm.client_update
    chunk_of = worker._clients
    current: list = []

    def clients(chunk, data_round):
        current[:] = list(chunk)
        return chunk_of(chunk, data_round)

    def client_update(*args, **kw):
        updates, met = original(*args, **kw)
        updates = updates.clone()
        for row, c in enumerate(current):
            if c in poison:
                updates[row, row % updates.shape[1]] = POISON[poison[c]]
        return updates, met

    monkeypatch.setattr(worker, "_clients", clients)
    monkeypatch.setattr(worker.algorithm, "client_update", client_update)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(st.integers(0, 39), st.sampled_from(sorted(POISON)), max_size=6),
    st.lists(st.integers(0, 39), min_size=1, max_size=12, unique=True),
    st.integers(0, 50),
)
def test_a_poisoned_cohort_aggregates_as_its_honest_clients(worker, poison, cohort, round_index):
    g = np.full(worker.n_params, 0.01, np.float32)
    poison = {c: k for c, k in poison.items() if c in cohort}
    honest = [c for c in cohort if c not in poison]
    with pytest.MonkeyPatch.context() as mp:
        _poisoned(worker, mp, poison)
        msg, diag = worker.train(round_index, g, cohort)
    assert diag.rejected == len(poison) and np.isfinite(msg.weighted_sum).all()
    agg = Aggregator(worker.cfg.algorithm, worker.n_params, seed=0)
    if honest:
        ref, _ = worker.train(round_index, g, honest)
        np.testing.assert_allclose(msg.weighted_sum, ref.weighted_sum, atol=1e-5)
        assert msg.weight == pytest.approx(ref.weight)
        new, _ = agg.aggregate(round_index, g, msg)
        expected, _ = Aggregator(worker.cfg.algorithm, worker.n_params, seed=0).aggregate(round_index, g, ref)
        np.testing.assert_allclose(new, expected, atol=1e-6)
        assert np.isfinite(new).all()
    else:  # nobody honest: that is the run's own training diverging, a loud error
        assert msg.weight == 0 and msg.rejected == len(cohort)
        with pytest.raises(AggregationError, match="every client's update"):
            agg.aggregate(round_index, g, msg)
