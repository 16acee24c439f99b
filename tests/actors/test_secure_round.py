"""Secure aggregation through the real worker and aggregator classes (no Ray): the four phases
as the runner drives them, checked against the plain clipped mean."""

import numpy as np
import pytest
import torch

from fedmeta.actors.aggregator import Aggregator, SecAggRoundAborted
from fedmeta.actors.client_worker import ClientWorker
from fedmeta.actors.messages import MaskedUpdate
from fedmeta.actors.privacy import clip_updates
from fedmeta.sim.config import from_dict
from fedmeta.sim.engine.plan import FederationPlan
from fedmeta.sim.sampling import split_even
from fedmeta.sim.seeding import np_rng
from tests.conftest import tiny_raw


def setup(neighbors=None, z=0.0):
    privacy = {"clip_norm": 0.5, **({"mode": "distributed", "noise_multiplier": z} if z else {})}
    cfg = from_dict(tiny_raw(secagg={"enabled": True, "neighbors": neighbors}, privacy=privacy))
    plan = FederationPlan.from_config(cfg)
    workers = [ClientWorker(cfg, 0, plan.dp), ClientWorker(cfg, 1, plan.dp)]
    agg = Aggregator(cfg.algorithm, plan.n_params, plan.dp, cfg.seed, secure=True)
    return cfg, plan.secagg, workers, agg


def secure_round(workers, agg, p, g, rnd, cohort, alive):
    """The secure-sum flow of a training round, as Federation._secure_sum drives it over Ray."""
    ring = agg.secure_open(rnd, list(cohort), p, len(g))
    assert sorted(ring) == sorted(cohort)
    pairs = list(zip(workers, split_even(np.array(ring), 2)))
    keys = agg.secure_keys(rnd, *[w.secure_advertise(rnd, sh, p) for w, sh in pairs])
    inbox = agg.secure_route(rnd, *[w.secure_share(rnd, keys) for w, sh in pairs])
    msgs = [w.train(rnd, g, [c for c in sh if c in alive], inbox)[0] for w, sh in pairs]
    request = agg.secure_collect(rnd, *msgs)
    summed = agg.secure_unmask(rnd, *[w.secure_unmask(rnd, request) for w, _ in pairs])
    new, metrics = agg.apply_sum(rnd, g, summed)
    return new, metrics, msgs


def reference(cfg, w, g, rnd, alive):
    """g + the mean of the survivors' clipped updates (FedAvg, server_lr 1), computed one by one."""
    ups = []
    for c in sorted(alive):
        d = w.data.client(c)
        u, _ = w.algorithm.client_update(
            w.model,
            torch.tensor(g),
            [d.x_train],
            [d.y_train],
            [np_rng(cfg.seed, "local-batches", rnd, c)],
            w.compute,
        )
        ups.append(clip_updates(u, 0.5)[0][0])
    return g + torch.stack(ups).mean(0).numpy()


@pytest.mark.parametrize("neighbors, dropped", [(None, {12, 17}), (4, {12})])  # survivable for t = k // 2 + 1
def test_secure_round_equals_the_plain_clipped_mean(neighbors, dropped):
    cfg, p, workers, agg = setup(neighbors)
    g = np.random.default_rng(0).normal(0, 0.05, workers[0].n_params).astype(np.float32)
    cohort = list(range(10, 20))
    alive = set(cohort) - dropped  # they drop after sharing their keys
    new, metrics, msgs = secure_round(workers, agg, p, g, 3, cohort, alive)
    assert metrics["secagg_survivors"] == len(alive) and metrics["secagg_dropped"] == len(dropped)
    expected = reference(cfg, workers[0], g, 3, alive)
    np.testing.assert_allclose(new, expected, atol=2 * p.step)  # quantization: < one step per coordinate
    for m in msgs:  # what left the workers: masked sums only, no plain updates
        assert isinstance(m, MaskedUpdate) and m.masked_sum.dtype == np.uint64


def test_too_many_dropouts_abort_the_round_only():
    cfg, p, workers, agg = setup(4)  # k=4, t=3
    g = np.zeros(workers[0].n_params, np.float32)
    cohort = list(range(10))
    with pytest.raises(SecAggRoundAborted, match="threshold"):
        secure_round(workers, agg, p, g, 0, cohort, alive={0, 1})
    # the next round works again on fresh state
    new, metrics, _ = secure_round(workers, agg, p, g, 1, cohort, alive=set(cohort))
    assert metrics["secagg_survivors"] == 10 and np.isfinite(new).all()


@pytest.mark.adversary
def test_survivors_below_the_floor_are_refused_and_the_model_is_untouched():
    """The complete graph of 10 with t = 5, sized for a third dropping: 6 survivors are enough
    shares for t, but below ceil(10 (1 - 0.33)) = 7, so the aggregator refuses to unmask; no
    survivor is asked for a share, the server rule never runs, and the next round goes on."""
    cfg, p, workers, agg = setup(None)
    assert (p.threshold, p.dropout) == (5, 0.33)
    g = np.random.default_rng(4).normal(0, 0.05, workers[0].n_params).astype(np.float32)
    before, cohort = g.copy(), list(range(10))
    ring = agg.secure_open(0, cohort, p, len(g))
    pairs = list(zip(workers, split_even(np.array(ring), 2)))
    keys = agg.secure_keys(0, *[w.secure_advertise(0, sh, p) for w, sh in pairs])
    inbox = agg.secure_route(0, *[w.secure_share(0, keys) for w, sh in pairs])
    msgs = [w.train(0, g, [c for c in sh if c in set(range(6))], inbox)[0] for w, sh in pairs]
    with pytest.raises(
        SecAggRoundAborted,
        match=r"6 of the 10 clients survived, below the survivor floor .* = 7 .*"
        r"unmasking refused \(secagg.dropout_rate: at most 0.33",
    ):
        agg.secure_collect(0, *msgs)
    with pytest.raises(SecAggRoundAborted, match="no secure-aggregation session"):  # nothing left to unmask
        agg.secure_unmask(0, [])
    assert agg.rounds_done == 0 and np.array_equal(g, before)
    new, metrics, _ = secure_round(
        workers, agg, p, g, 1, cohort, alive=set(range(7))
    )  # at the floor: released
    assert metrics["secagg_survivors"] == 7 and agg.rounds_done == 1


@pytest.mark.adversary
def test_a_cohort_larger_than_the_graph_is_sized_for_is_refused():
    import dataclasses

    cfg, p, workers, agg = setup(None)
    small = dataclasses.replace(p, cohort_range=(8, 9))
    with pytest.raises(SecAggRoundAborted, match="10 clients exceed the 9 the neighbour graph is sized for"):
        agg.secure_open(0, list(range(10)), small, workers[0].n_params)


def test_distributed_noise_arrives_in_the_unmasked_sum():
    cfg, p, workers, agg = setup(None, z=1.0)
    g = np.zeros(workers[0].n_params, np.float32)
    cohort = list(range(10))
    new, _, _ = secure_round(workers, agg, p, g, 0, cohort, set(cohort))
    noise = new - reference(cfg, workers[0], g, 0, set(cohort))
    # the 10 Skellam shares sum to std z*C = 0.5 per coordinate; divided by the cohort of 10
    assert abs(noise.mean()) < 0.005 and noise.std() == pytest.approx(0.05, rel=0.1)


def test_a_deadline_inside_a_secure_round_drops_the_late_clients_exactly(monkeypatch):
    """A worker cut off by its deadline sends the masked sum of the clients it finished; the pair
    masks between them and its late clients must not cancel, so the unmasked sum is exactly the
    reporting clients' clipped mean."""
    import fedmeta.actors.client_worker as cw

    cfg = from_dict(
        tiny_raw(
            secagg={"enabled": True, "neighbors": None}, privacy={"clip_norm": 0.5}, ray={"compute": "loop"}
        )
    )
    plan = FederationPlan.from_config(cfg)
    workers = [ClientWorker(cfg, 0, plan.dp), ClientWorker(cfg, 1, plan.dp)]
    agg = Aggregator(cfg.algorithm, plan.n_params, plan.dp, cfg.seed, secure=True)
    p, rnd, g = (
        plan.secagg,
        4,
        np.random.default_rng(1).normal(0, 0.05, workers[0].n_params).astype(np.float32),
    )
    cohort = list(range(10, 20))
    ring = agg.secure_open(rnd, cohort, p, len(g))
    pairs = list(zip(workers, split_even(np.array(ring), 2)))
    keys = agg.secure_keys(rnd, *[w.secure_advertise(rnd, sh, p) for w, sh in pairs])
    inbox = agg.secure_route(rnd, *[w.secure_share(rnd, keys) for w, sh in pairs])
    clock = iter(range(100))
    monkeypatch.setattr(cw, "_now", lambda: next(clock))
    (w0, sh0), (w1, sh1) = pairs
    cut, _ = w0.train(rnd, g, sh0, inbox, deadline=1.5)  # two of its five clients finish
    whole, _ = w1.train(rnd, g, sh1, inbox)
    assert cut.client_ids == tuple(sh0[:2])
    request = agg.secure_collect(rnd, cut, whole)
    summed = agg.secure_unmask(rnd, *[w.secure_unmask(rnd, request) for w, _ in pairs])
    new, metrics = agg.apply_sum(rnd, g, summed)
    reported = set(sh0[:2]) | set(sh1)
    assert metrics["secagg_survivors"] == len(reported) and metrics["secagg_dropped"] == 3
    np.testing.assert_allclose(new, reference(cfg, w0, g, rnd, reported), atol=2e-4)


def test_bytes_are_the_sizes_of_the_messages_each_client_sent_and_received():
    """Communication accounting against the messages themselves: each survivor's keys, encrypted
    shares, masked vector and unmask shares up; its neighbours' keys, its routed shares, the
    unmask request and the model down."""
    import pickle
    from collections import Counter

    from fedmeta.actors.secagg.protocol import MaskedInput

    cfg, p, workers, agg = setup(4)
    g = np.random.default_rng(2).normal(0, 0.05, workers[0].n_params).astype(np.float32)
    cohort, rnd = list(range(10, 20)), 6
    alive = set(cohort) - {13}
    size = lambda m: len(pickle.dumps(m, protocol=5))  # noqa: E731
    up, down = Counter(), Counter()
    ring = agg.secure_open(rnd, cohort, p, len(g))
    pairs = list(zip(workers, split_even(np.array(ring), 2)))
    adverts = [a for w, sh in pairs for a in w.secure_advertise(rnd, sh, p)]
    up.update({a.client: size(a) for a in adverts})
    keys = agg.secure_keys(rnd, adverts)
    down.update({c: size(k) for c, k in keys.items()})
    shares = [s for w, _ in pairs for s in w.secure_share(rnd, keys)]
    up.update({s.sender: size(s) for s in shares})
    inbox = agg.secure_route(rnd, shares)
    down.update({c: size(x) for c, x in inbox.items()})
    msgs = [w.train(rnd, g, [c for c in sh if c in alive], inbox)[0] for w, sh in pairs]
    for c in alive:  # what each client would send alone: its masked vector (uint64, the model's length)
        up[c] += size(MaskedInput(c, np.zeros(len(g), np.uint64)))
    request = agg.secure_collect(rnd, *msgs)
    reveals = [u for w, _ in pairs for u in w.secure_unmask(rnd, request)]
    up.update({u.client: size(u) for u in reveals})
    for c in alive:
        down[c] += size(request) + size(g)
    _, metrics = agg.apply_sum(rnd, g, agg.secure_unmask(rnd, reveals))
    assert metrics["bytes_up"] == sum(up.values())
    assert metrics["bytes_up_per_client"] == pytest.approx(sum(up[c] for c in alive) / len(alive))
    assert metrics["bytes_down_per_client"] == pytest.approx(sum(down[c] for c in alive) / len(alive))
    assert metrics["bytes_down"] == sum(down.values())
