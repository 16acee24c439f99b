"""FedBuff on the simulated clock: the event queue, the config rules, and the engine against a
hand-written event loop (one client at a time, the way the paper states the algorithm)."""

import math

import numpy as np
import pytest
import torch

import fedmeta
from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.config import ConfigError
from fedmeta.sim.engine.fedbuff import BufferClock, staleness_weight
from fedmeta.sim.seeding import Secrets, np_rng
from tests.conftest import tiny_raw
from tests.sim.engine.test_faults import round_metrics


def fedbuff_raw(tmp_path, **federation):
    return tiny_raw(
        tmp_path,
        federation={
            "mode": "fedbuff",
            "clients_per_round": 4,
            "fedbuff": {"concurrency": 8},
            "system": {"enabled": True, "speed_sigma": 1.0, "step_s": 0.1},
            **federation,
        },
        ray={"compute": "loop"},
    )


def test_the_clock_pops_completions_in_time_order_and_draws_only_idle_clients():
    clock = BufferClock(Secrets.seeded(1), population=20)
    first = clock.draw(8)
    assert len(set(first)) == 8 and all(0 <= c < 20 for c in first)
    clock.start(first, [5.0, 1.0, 3.0, 1.0, 9.0, 2.0, 7.0, 4.0], version=0)
    done = clock.pop(3)
    assert [a.finish for a in done] == [1.0, 1.0, 2.0] and [a.cid for a in done[:2]] == [first[1], first[3]]
    assert clock.now == 2.0 and len(clock.in_flight) == 5
    again = clock.draw(3)
    assert not set(again) & clock.in_flight  # never a client already training
    assert BufferClock(Secrets.seeded(1), 20).draw(8) == first  # seeded
    assert staleness_weight(3, "sqrt") == 0.5 and staleness_weight(3, "constant") == 1.0


def test_fedbuff_config_rules_name_their_key(tmp_path):
    with pytest.raises(ConfigError, match="federation.mode: fedbuff runs on the simulated clock"):
        fedmeta.load_config(tiny_raw(tmp_path, federation={"mode": "fedbuff"}))
    with pytest.raises(ConfigError, match="federation.mode: fedbuff is not combined with secure aggregation"):
        fedmeta.load_config({**fedbuff_raw(tmp_path), "secagg": {"enabled": True}})
    with pytest.raises(ConfigError, match="federation.fedbuff.concurrency: must be >= clients_per_round"):
        fedmeta.load_config(fedbuff_raw(tmp_path, fedbuff={"concurrency": 2}))


def reference_fedbuff(raw: dict, steps: int) -> np.ndarray:
    """FedBuff as the paper states it, one client at a time: a sorted list of completion events,
    each update trained from the model its client started with, weighted 1/sqrt(1 + staleness)."""
    from fedmeta.actors.client_worker import ClientWorker
    from fedmeta.sim.engine.plan import FederationPlan

    cfg = fedmeta.load_config(raw)
    plan = FederationPlan.from_config(cfg)
    worker = ClientWorker(cfg, 0, plan.dp)
    alg, fb = worker.algorithm, cfg.federation
    drawer = BufferClock(Secrets.seeded(cfg.seed), plan.num_clients)  # who starts: the engine's seeded draw
    events, now, seq, models = [], 0.0, 0, {0: torch.tensor(plan.init_params)}

    def start(n, version):
        nonlocal seq
        cids = drawer.draw(n)
        for c, d in zip(cids, worker.device_seconds(version, cids)):
            events.append((now + d, seq, c, version))
            seq += 1
            drawer.in_flight.add(c)

    start(fb.fedbuff.concurrency, 0)
    for step in range(steps):
        events.sort()
        arrived, events[:] = events[: fb.clients_per_round], events[fb.clients_per_round :]
        now = arrived[-1][0]
        drawer.in_flight -= {c for _, _, c, _ in arrived}
        total, weight = torch.zeros(worker.n_params, dtype=torch.float64), 0.0
        for _, _, c, v in arrived:
            d = worker.data.client(c)
            u, _ = alg.client_update(
                worker.model,
                models[v],
                [d.x_train],
                [d.y_train],
                [np_rng(cfg.seed, "local-batches", v, c)],
                "loop",
            )
            w = alg.client_weight(len(d.y_train))
            total += w / math.sqrt(1 + step - v) * u[0].double()
            weight += w
        models[step + 1] = models[step] + alg.cfg.server_lr * (total / weight).float()
        start(fb.clients_per_round, step + 1)
    return models[steps].numpy()


@pytest.mark.slow
def test_the_engine_matches_a_hand_written_event_loop(ray_session, tmp_path):
    raw = fedbuff_raw(tmp_path)
    result = fedmeta.run(raw, overrides=["federation.rounds=6", "eval.every=6"])
    engine = ckpt.load(result.run_dir).global_params
    np.testing.assert_allclose(engine, reference_fedbuff(raw, 6), atol=2e-5)
    s = result.summary
    assert s["rounds"] == 6 and s["sim_time_s"] > 0 and s["epsilon"] is None
    rounds = round_metrics(result.run_dir)
    assert max(r["staleness_max"] for r in rounds.values()) >= 1  # stale updates were weighted
    again = fedmeta.run(raw, overrides=["federation.rounds=6", "eval.every=6", "run.name=again"])
    np.testing.assert_array_equal(ckpt.load(again.run_dir).global_params, engine)  # seeded, reproducible


@pytest.mark.slow
def test_dp_fedbuff_is_accounted_without_sampling_amplification(ray_session, tmp_path):
    import math

    from fedmeta.actors.privacy import epsilon_for, make_accountant

    raw = fedbuff_raw(tmp_path)
    raw["privacy"] = {"mode": "central", "noise_multiplier": 2.0, "clip_norm": 0.5, "audit_canaries": 0}
    s = fedmeta.run(raw, overrides=["federation.rounds=3", "eval.every=3"]).summary
    assert s["sample_rate"] == 1.0
    assert s["epsilon"] > epsilon_for(2.0, 1.0, 3, s["delta"])
    rounds = make_accountant("rdp")  # the rounds at q = 1, then the model card's two releases
    for _ in range(3):
        rounds.step(2.0, 1.0)
    rounds.release(2.0)
    rounds.release(2.0 / math.sqrt(2))
    assert s["epsilon"] == pytest.approx(rounds.epsilon(s["delta"]), rel=1e-6)


@pytest.mark.slow
def test_the_async_bench_compares_time_to_target_over_seeds(ray_session, tmp_path):
    from fedmeta.sim.cli.bench import run_async_bench

    raw = tiny_raw(
        tmp_path,
        federation={
            "clients_per_round": 8,
            "rounds": 4,
            "system": {"enabled": True, "speed_sigma": 1.0},
            "fedbuff": {"concurrency": 8},
        },
        eval={"every": 2, "target": 0.05},
    )
    res = run_async_bench(fedmeta.load_config(raw), seeds=2, steps_per_round=4)
    assert res["fedbuff_buffer"] == 2 and [r["seed"] for r in res["runs"]["sync"]] == [3, 4]
    assert all(r["rounds_to_target"] in (8, 16) for r in res["runs"]["fedbuff"])  # evaluated every 16 updates
    assert all(r["rounds_to_target"] in (2, 4) for r in res["runs"]["sync"])  # as the sync rounds are
    assert res["sync_time_to_target_s"] > 0 and res["fedbuff_time_to_target_s"] > 0
    assert res["fedbuff_speedup"] == pytest.approx(
        res["sync_time_to_target_s"] / res["fedbuff_time_to_target_s"]
    )
