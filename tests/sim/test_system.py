"""Simulated device time: seeded devices, durations, and who reports under a deadline or quota."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.sim.config import SystemConfig
from fedmeta.sim.seeding import Secrets
from fedmeta.sim.system import choose, device, duration, online


def test_a_device_is_the_same_every_time_and_medians_without_spread():
    system = SystemConfig(enabled=True, speed_sigma=0.8, bandwidth_sigma=0.5)
    assert device(3, 17, system) == device(3, 17, system) != device(3, 18, system)
    flat = device(3, 17, SystemConfig(enabled=True, down_mbps=8.0, up_mbps=4.0))
    assert (flat.speed, flat.down_bps, flat.up_bps) == (1.0, 1e6, 5e5)
    # 1 MB down at 1 MB/s, 10 batches of 0.05 s, 0.5 MB up at 0.5 MB/s
    assert duration(flat, 10, 10**6, 5 * 10**5, 0.05) == pytest.approx(1.0 + 0.5 + 1.0)


def test_devices_are_online_with_the_configured_probability():
    ids = np.arange(20000)
    mask = online(Secrets.seeded(5), 2, ids, 0.3)
    assert abs(mask.mean() - 0.3) < 0.02 and (online(Secrets.seeded(5), 2, ids, 0.3) == mask).all()
    assert (online(Secrets.seeded(5), 3, ids, 0.3) != mask).any() and online(
        Secrets.seeded(5), 2, ids, 1.0
    ).all()


def test_speeds_are_log_normal_around_the_median():
    system = SystemConfig(enabled=True, speed_sigma=0.5)
    logs = np.log([device(0, c, system).speed for c in range(4000)])
    assert abs(logs.mean()) < 0.03 and logs.std() == pytest.approx(0.5, rel=0.05)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.01, 100.0), min_size=1, max_size=30),
    st.one_of(st.none(), st.integers(0, 30)),
    st.one_of(st.none(), st.floats(0.01, 100.0)),
)
def test_choose_keeps_the_fastest_within_the_deadline(durations, quota, deadline):
    d = np.array(durations)
    keep, lasts = choose(d, quota, deadline)
    within = d <= deadline if deadline is not None else np.ones(len(d), bool)
    assert not (keep & ~within).any()  # nobody past the deadline
    assert keep.sum() == min(within.sum(), quota if quota is not None else len(d))
    if keep.any() and (~keep & within).any():  # left out only slower ones
        assert d[keep].max() <= d[~keep & within].min()
    filled = quota is not None and keep.sum() == quota
    if deadline is not None and (d > deadline).any() and not filled:
        assert lasts == deadline  # the server waited for the deadline
    else:
        assert lasts == (d[keep].max() if keep.any() else 0.0)


@pytest.mark.slow
def test_a_run_on_simulated_devices_reports_its_time_and_time_to_target(ray_session, tmp_path):
    import fedmeta
    from tests.conftest import tiny_raw
    from tests.sim.engine.test_faults import round_metrics

    system = {"enabled": True, "speed_sigma": 1.0, "bandwidth_sigma": 0.5, "step_s": 0.1}
    raw = tiny_raw(
        tmp_path,
        federation={"system": system, "over_selection": 1.3, "deadline_s": 30.0},
        eval={"every": 1, "target": 0.05},
    )
    runs = [fedmeta.run(raw, overrides=["federation.rounds=3", f"run.name=s{i}"]) for i in (0, 1)]
    s = runs[0].summary
    rounds = round_metrics(runs[0].run_dir)
    assert s["sim_time_s"] == pytest.approx(sum(r["sim_round_s"] for r in rounds.values()))
    assert all(0 < r["sim_round_s"] <= 30.0 and r["clients"] <= 10 for r in rounds.values())
    assert s["rounds_to_target"] == 1 and s["time_to_target_s"] == pytest.approx(rounds[1]["sim_round_s"])
    assert runs[1].summary["sim_time_s"] == s["sim_time_s"]  # seeded: no wall clock in it
    assert runs[1].summary["acc_global_DI"] == s["acc_global_DI"]
    away = dict(system, availability=0.8)
    offline = fedmeta.run(
        tiny_raw(tmp_path, federation={"system": away}, secagg={"enabled": True, "neighbors": None}),
        overrides=["federation.rounds=2", "eval.every=2", "run.name=away"],
    )
    for r in round_metrics(offline.run_dir).values():  # offline devices never answer, not even key set-up
        assert r["offline"] >= 1 and r["clients"] + r["dropped"] == 10 and r["aborted"] == 0
    plain = fedmeta.run(tiny_raw(tmp_path), overrides=["federation.rounds=1", "run.name=plain"]).summary
    assert plain["sim_time_s"] is None and plain["time_to_target_s"] is None
