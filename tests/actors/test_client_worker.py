import numpy as np
import pytest
import torch

from fedmeta.actors.client_worker import ClientWorker
from fedmeta.sim.config import from_dict
from fedmeta.sim.seeding import np_rng
from tests.conftest import tiny_raw


@pytest.fixture(scope="module")
def worker():
    return ClientWorker(from_dict(tiny_raw()))


def test_message_is_the_weighted_sum_of_client_updates(worker):
    g = torch.as_tensor(np.random.default_rng(0).normal(0, 0.1, worker.n_params), dtype=torch.float32)
    ids = [3, 11, 25]
    m, diag = worker.train(5, g.numpy(), ids)
    assert diag.clients == 3 and diag.train_loss_sum > 0 and diag.local_dp_releases is None
    assert m.round_id == 5 and m.client_ids == tuple(ids) and m.num_clients == 3
    expected = torch.zeros_like(g)
    weight = 0.0
    for c in ids:  # one client at a time, the way a reader would compute it
        d = worker.data.client(c)
        u, _ = worker.algorithm.client_update(
            worker.model,
            g,
            [d.x_train],
            [d.y_train],
            [np_rng(worker.cfg.seed, "local-batches", 5, c)],
            "loop",
        )
        w = worker.algorithm.client_weight(len(d.y_train))
        expected += w * u[0]
        weight += w
    np.testing.assert_allclose(m.weighted_sum, expected.numpy(), atol=1e-5)
    assert m.weight == weight


def test_vmap_and_loop_workers_agree():
    raw = tiny_raw()
    msgs = []
    for compute in ("vmap", "loop"):
        raw["ray"] = {**raw["ray"], "compute": compute}
        w = ClientWorker(from_dict(raw))
        assert w.compute == compute
        g = np.zeros(w.n_params, np.float32) + 0.01
        msgs.append(w.train(0, g, [0, 1, 2, 3, 4])[0])
    np.testing.assert_allclose(msgs[0].weighted_sum, msgs[1].weighted_sum, atol=1e-5)


def test_evaluate_and_global_shards(worker):
    g = np.zeros(worker.n_params, np.float32)
    ev = worker.evaluate(g, [1, 2, 3, 4])
    assert ev["client_ids"] == [1, 2, 3, 4]
    for k in ("acc_global_DI", "acc_personalized_DI"):
        assert ev[k].shape == (4,) and ((ev[k] >= 0) & (ev[k] <= 1)).all()
    whole = worker.evaluate_global(g)
    parts = [worker.evaluate_global(g, i, 3) for i in range(3)]
    assert whole.dtype == bool and len(whole) == len(worker.data.global_data()[1])
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert sum(worker.data.global_sizes()) == len(whole)


def test_a_dp_config_needs_the_runs_dp_object():
    with pytest.raises(ValueError, match="UserLevelDP"):
        ClientWorker(from_dict(tiny_raw(privacy={"mode": "central"})))


def test_a_quota_keeps_the_first_clients_and_a_deadline_stops_between_clients(monkeypatch):
    import fedmeta.actors.client_worker as cw

    raw = tiny_raw()
    raw["ray"] = {**raw["ray"], "compute": "loop"}  # under a deadline: one client per step
    w = ClientWorker(from_dict(raw))
    g = np.zeros(w.n_params, np.float32) + 0.01
    ids = [3, 11, 25, 30, 31]
    full, _ = w.train(1, g, ids[:2])
    m, diag = w.train(1, g, ids, quota=2)  # over-selection: the first 2 to finish report
    assert m.client_ids == (3, 11) and diag.clients == 2 and diag.late == 3
    np.testing.assert_allclose(m.weighted_sum, full.weighted_sum, atol=1e-6)
    clock = iter(range(100))
    monkeypatch.setattr(cw, "_now", lambda: next(clock))  # each step takes one second
    m, diag = w.train(1, g, ids, deadline=2.5)  # steps start at 0, 1, 2; not at 3
    assert m.client_ids == (3, 11, 25) and diag.late == 2
    m, diag = w.train(1, g, ids, deadline=-1.0)  # already late: nobody reports
    assert m.client_ids == () and diag.late == 5 and not m.weighted_sum.any()


def test_a_plain_round_counts_each_client_as_the_message_it_would_send_alone(worker):
    """bytes up per client = the size of a worker's message for one client; down = the model's."""
    import pickle

    from fedmeta.actors.aggregator import Aggregator

    g = np.zeros(worker.n_params, np.float32) + 0.01
    alone, _ = worker.train(2, g, [7])
    together = [worker.train(2, g, ids)[0] for ids in ([3, 11, 25], [30, 31])]
    _, metrics = Aggregator(worker.cfg.algorithm, worker.n_params).aggregate(2, g, *together)
    size = lambda m: len(pickle.dumps(m, protocol=5))  # noqa: E731
    assert metrics["bytes_up_per_client"] == size(alone) and metrics["bytes_up"] == 5 * size(alone)
    assert metrics["bytes_down_per_client"] == size(g) and metrics["bytes_down"] == 5 * size(g)


def test_simulated_devices_pick_who_reports_and_say_how_long_the_round_took():
    """With federation.system the fastest simulated devices report (over-selection), none past a
    deadline in simulated seconds, and the round lasts as long as its slowest reporting client."""
    import pickle

    from fedmeta.actors.messages import PlainUpdate
    from fedmeta.sim.system import device, duration

    raw = tiny_raw(federation={"system": {"enabled": True, "speed_sigma": 1.0, "step_s": 0.2}})
    w = ClientWorker(from_dict(raw))
    g = np.zeros(w.n_params, np.float32)
    ids = list(range(12))
    down = len(pickle.dumps(g, protocol=5))
    up = len(pickle.dumps(PlainUpdate(1, 0, g, 1.0, (0,)), protocol=5))
    seconds = {}
    for c, d in zip(ids, w.data.clients(ids)):
        plan = w.algorithm.schedules(len(d.y_train), np_rng(w.cfg.seed, "local-batches", 1, c))
        seconds[c] = duration(device(w.cfg.seed, c, w.system), sum(map(len, plan)), down, up, 0.2)
    fastest = sorted(ids, key=seconds.get)[:5]
    m, diag = w.train(1, g, ids, quota=5)
    assert m.client_ids == tuple(sorted(fastest)) and diag.late == 7
    assert diag.sim_s == pytest.approx(max(seconds[c] for c in fastest))
    limit = sorted(seconds.values())[8] - 1e-9  # 8 devices finish in time
    m, diag = w.train(1, g, ids, deadline=limit)
    assert len(m.client_ids) == 8 and diag.sim_s == limit and max(seconds[c] for c in m.client_ids) <= limit
