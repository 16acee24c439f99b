"""The closed loop end to end: drifted traffic to Serve -> alarm -> Tune -> shadow candidate ->
decision, on local Ray over real HTTP."""

import socket

import pytest
import requests
import torch

from fedmeta.sim.config import from_dict
from fedmeta.sim.data import build_dataset
from fedmeta.sim.data.drift import rotate
from tests.conftest import tiny_raw

pytestmark = pytest.mark.slow


@pytest.fixture
def serve_url(ray_session):
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    for app in list(serve.status().applications):
        serve.delete(app)
    serve.shutdown()


def traffic(data, ids, degrees=0.0):
    clients = data.clients(ids)
    x = torch.cat([c.x_train for c in clients])
    y = torch.cat([c.y_train for c in clients])
    if degrees:
        x = rotate(x, degrees)
    return x.flatten(1).numpy(), y.numpy()


def send(url, x, y, feedback=False):
    for i in range(0, len(x), 16):
        r = requests.post(url + "/predict", json={"inputs": x[i : i + 16].tolist()}, timeout=60)
        assert r.status_code == 200, r.text
        if feedback:
            requests.post(
                url + "/feedback",
                json={"request_id": r.json()["request_id"], "labels": y[i : i + 16].tolist()},
                timeout=60,
            )


def test_drift_alarm_tunes_and_shadow_tests_a_candidate(serve_url, tmp_path):
    from fedmeta.serve.client import Deployment
    from fedmeta.sim.run.experiment import run_experiment
    from fedmeta.sim.tuning.closed_loop import ClosedLoop

    raw = tiny_raw(
        tmp_path,
        data={"num_clients": 60, "samples_per_client": 40},
        federation={"rounds": 2, "clients_per_round": 10},
    )
    run_dir, _ = run_experiment(from_dict(raw))
    dep = Deployment({"fed": str(run_dir)}, reweight_s=0.0)
    dep.deploy()
    # the federation the trials continue: its clients' data rotated from round 2 on
    tuned = from_dict(
        {
            **raw,
            "data": {**raw["data"], "drift": {"at_round": 2, "rotation": 60.0}},
            "tune": {"num_samples": 2, "max_concurrent": 2, "rounds_per_trial": 1, "grace_period": 1},
            "ray": {"num_workers": 1, "num_cpus_per_worker": 0.5},
        }
    )
    loop = ClosedLoop(
        dep, tuned, str(run_dir), start_round=2, reference_rows=400, batch=32, trial_options={"max_pairs": 60}
    )
    data = build_dataset(from_dict(raw).data, 3)

    x, y = traffic(data, range(0, 15))  # reference traffic: no drift
    send(serve_url, x, y)
    loop.step()
    assert loop.monitor is not None and not dep.candidates  # calibrated, no alarm
    x, y = traffic(data, range(15, 30), degrees=60.0)  # drifted traffic
    send(serve_url, x, y)
    loop.step()
    kinds = [e["event"] for e in loop.events]
    assert "drift_alarm" in kinds and "candidate" in kinds and "tuned-1" in dep.candidates
    for _ in range(6):  # labelled drifted traffic until the test decides
        x, y = traffic(data, range(30, 60), degrees=60.0)
        send(serve_url, x, y, feedback=True)
        loop.step()
        if any(e["event"] in ("promoted", "rejected") for e in loop.events):
            break
    decided = [e for e in loop.events if e["event"] in ("promoted", "rejected")]
    assert decided and decided[0]["member"] == "tuned-1"
    assert not dep.candidates  # promoted into members, or released
