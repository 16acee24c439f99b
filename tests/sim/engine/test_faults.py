"""Lost actors: a run whose worker or aggregator process is killed mid-run ends exactly where an
undisturbed run of the same seed ends, and says what it survived."""

import os
import signal
import threading

import numpy as np
import pytest
from ray.exceptions import ActorDiedError, RayTaskError

import fedmeta
from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.engine.faults import FaultLog, RoundFailed, lost_actor
from fedmeta.sim.engine.federation import Federation
from tests.conftest import tiny_raw

METRICS = ("acc_global_DI", "acc_personalized_DI", "acc_global_DG")


def test_the_fault_log_fails_a_round_past_its_limit_with_one_line():
    log = FaultLog(limit=1)
    log.begin_round()
    log.lost(3, "worker 0", ActorDiedError())
    with pytest.raises(RoundFailed) as e:
        log.lost(3, "aggregator", "gone\nfor good")
    assert str(e.value).startswith("round 3: 2 actor losses, more than ray.max_failures_per_round (1)")
    assert (
        "\n" not in str(e.value) and log.counts["worker_failures"] == log.counts["aggregator_failures"] == 1
    )
    log.begin_round()
    log.lost(4, "worker 1", "again")  # the limit is per round
    assert log.total() == 3


def test_what_counts_as_a_lost_actor():
    assert lost_actor(ActorDiedError()) and not lost_actor(ValueError("x"))
    assert lost_actor(RayTaskError("f", "tb", ActorDiedError()))
    assert not lost_actor(RayTaskError("f", "tb", ValueError("x")))


def killing(monkeypatch, at_round: int, who: str, delay: float = 0.0):
    """Kill -9 the process of worker 0 or of the aggregator `delay` seconds into round `at_round`."""
    original = Federation.train_round

    def train_round(self, round_index, global_params):
        if round_index == at_round:
            pid = self.infos[0]["pid"] if who == "worker" else self._aggregator_pid
            threading.Timer(delay, os.kill, (pid, signal.SIGKILL)).start()
        return original(self, round_index, global_params)

    monkeypatch.setattr(Federation, "train_round", train_round)


def run(tmp_path, name, **sections):
    raw = tiny_raw(tmp_path / name, **sections)
    raw["run"]["seeded_secrets"] = True  # both runs draw the same noise and masks
    result = fedmeta.run(raw, overrides=["federation.rounds=5", "eval.every=5"])
    return result.summary, ckpt.load(result.run_dir).global_params


@pytest.mark.slow
@pytest.mark.parametrize("case", ["worker_between_rounds", "worker_mid_round", "aggregator_fedadam"])
def test_a_killed_actor_costs_nothing_but_time(ray_session, tmp_path, monkeypatch, case):
    sections = {}
    if case == "aggregator_fedadam":
        sections["algorithm"] = {"name": "fedadam", "server_lr": 0.01}  # server moments must survive
    calm, calm_model = run(tmp_path, "calm", **sections)
    who = "aggregator" if case.startswith("aggregator") else "worker"
    killing(monkeypatch, at_round=2, who=who, delay=0.0 if case == "worker_between_rounds" else 0.05)
    hit, hit_model = run(tmp_path, "hit", **sections)
    np.testing.assert_array_equal(hit_model, calm_model)  # bit for bit
    for key in METRICS:
        assert hit[key] == calm[key], key
    assert hit[f"{who}_failures"] >= 1 and calm["worker_failures"] == calm["aggregator_failures"] == 0
    assert hit["retried_shards"] + hit["retried_rounds"] >= 1 and hit["workers_dropped"] == 0


DYING = '''
import os
from fedmeta.sim.algorithms.fedavg import FedAvg

class DyingFedAvg(FedAvg):
    """FedAvg whose worker process dies while training, once, when the test arms it."""
    def client_update(self, *args, **kwargs):
        try:
            os.remove({arm!r})       # exactly one process wins the removal, and dies
        except FileNotFoundError:
            return super().client_update(*args, **kwargs)
        os._exit(1)
'''


def round_metrics(run_dir) -> dict[int, dict[str, float]]:
    import pandas as pd

    df = pd.read_csv(run_dir / "metrics.csv")
    df = df[df.stat == "value"]
    return {int(r): dict(zip(g.metric, g.value)) for r, g in df.groupby("round")}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [4, 2])
def test_a_worker_lost_inside_a_secure_sum_is_a_dropout_of_its_clients(
    ray_session, tmp_path, monkeypatch, workers
):
    """Killed while its clients compute their masked inputs, a worker's clients drop out: with 4
    workers the survivors' shares recover their masks and the round completes without them; with
    2, half the cohort is gone, below the threshold, and the round aborts with the model untouched.
    Either way no protocol round runs twice, and the restarted worker takes part again."""
    arm = tmp_path / "arm"
    (tmp_path / "dying.py").write_text(DYING.format(arm=str(arm)))
    # the complete graph of the 10-client cohort with t = 5 (what k = 20 gave before `auto`): losing half
    # the cohort falls below t (auto's k = 6, t = 2 is sized to survive a third dropping, and would)
    raw = tiny_raw(
        tmp_path / "run",
        algorithm={"name": "dying:DyingFedAvg"},
        secagg={"enabled": True, "neighbors": None},
        ray={"num_workers": workers, "num_cpus_per_worker": 0.5},
    )
    raw["run"]["code_paths"] = [str(tmp_path)]
    original = Federation.train_round

    def train_round(self, round_index, global_params):
        if round_index == 2:
            arm.touch()
        return original(self, round_index, global_params)

    monkeypatch.setattr(Federation, "train_round", train_round)
    result = fedmeta.run(raw, overrides=["federation.rounds=4", "eval.every=4"])
    s, rounds = result.summary, round_metrics(result.run_dir)
    assert not arm.exists() and s["worker_failures"] == 1 and s["retried_rounds"] == 0
    assert np.isfinite(
        s["acc_global_DI"]["mean"] if isinstance(s["acc_global_DI"], dict) else s["acc_global_DI"]
    )
    hit = rounds[3]  # round index 2 is logged as rounds_done 3
    if workers == 4:
        assert hit["aborted"] == 0 and 1 <= hit["lost_clients"] <= 3
        assert hit["clients"] + hit["dropped"] == 10 and hit["clients"] <= 10 - hit["lost_clients"]
    else:
        assert hit["aborted"] == 1
    assert all(
        rounds[r]["aborted"] == 0 and rounds[r]["clients"] + rounds[r]["dropped"] == 10 for r in (1, 2, 4)
    )
    assert "lost_clients" not in rounds[4]
