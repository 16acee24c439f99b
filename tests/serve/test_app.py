"""The Serve application end to end over real HTTP on loopback (a free port, never 8000)."""

import importlib
import threading
import time

import numpy as np
import pytest
import requests
import torch

from fedmeta.serve.routing import update_routing_weights
from fedmeta.sim.checkpoint import load_model, save_member
from fedmeta.sim.config import ModelConfig
from fedmeta.sim.models import build_model, init_params, param_shapes, unflatten

pytestmark = pytest.mark.slow
MLP = {"kind": "mlp", "hidden": [8]}


def member(path, seed=0, mean=0.3, constant=None):
    """A checkpoint with a model card; `constant`: the model always answers that class."""
    model = build_model(ModelConfig(**MLP), (1, 8, 8), 10)
    flat = init_params(model, torch.Generator().manual_seed(seed))
    if constant is not None:
        params = {k: torch.zeros_like(v) for k, v in unflatten(flat, param_shapes(model)).items()}
        params["3.bias"][constant] = 10.0
        flat = torch.cat([v.flatten() for v in params.values()])
    save_member(
        path,
        MLP,
        flat.numpy(),
        [1, 8, 8],
        10,
        {"mean": [mean] * 64, "var": [0.02] * 64, "n": 100},
        {"acc_global_DI": 0.5},
    )
    return str(path)


@pytest.fixture(autouse=True)
def clean_apps(serve_url):
    """Each test deploys its own apps; delete them all afterwards (replicas are processes)."""
    from ray import serve

    yield
    for app in list(serve.status().applications):
        serve.delete(app)


def deploy(tmp_path, members, reweight_s=0.0, **settings):
    from fedmeta.serve.client import Deployment

    settings.setdefault("auto_promote", True)  # these tests check the test's decisions, not the operator's
    dep = Deployment(
        {n: member(tmp_path / n, **kw) for n, kw in members.items()}, settings=settings, reweight_s=reweight_s
    )
    dep.deploy()
    return dep


def predict(url, x, user=None):
    body = {"inputs": np.asarray(x).reshape(len(x), -1).tolist(), **({"user_id": user} if user else {})}
    r = requests.post(url + "/predict", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_predictions_match_the_models_run_directly(serve_url, tmp_path):
    dep = deploy(tmp_path, {"a": {"seed": 1}, "b": {"seed": 2}, "c": {"seed": 3}}, top_k=3)
    x = np.random.default_rng(0).random((5, 64)).astype(np.float32)
    out = predict(serve_url, x)
    weights = {m["name"]: m["weight"] for m in out["members"]}
    assert set(weights) == {"a", "b", "c"} and sum(weights.values()) == pytest.approx(1.0)
    expected = 0
    for name, w in weights.items():
        model, _ = load_model(dep.members[name])
        with torch.no_grad():
            expected = expected + w * torch.softmax(model(torch.as_tensor(x).view(5, 1, 8, 8)), -1).numpy()
    np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-5, atol=1e-6)
    assert out["predictions"] == expected.argmax(-1).tolist() and out["answered_by"] == "ensemble"
    single = requests.post(serve_url + "/predict", json={"inputs": x[0].tolist()}, timeout=30).json()
    np.testing.assert_allclose(single["probabilities"], expected[:1], rtol=1e-5, atol=1e-6)


def test_concurrent_requests_batched_together_get_their_own_answers(serve_url, tmp_path):
    """Concurrent requests share member calls and forward passes (`fedmeta.serve.batch` at the ingress and at
    the members): each still gets the answer to its own inputs, whatever their row counts, and a
    request the models cannot answer (non-finite output) fails alone."""
    from concurrent.futures import ThreadPoolExecutor

    dep = deploy(tmp_path, {"a": {"seed": 1}, "b": {"seed": 2}}, top_k=2)
    models = {n: load_model(p)[0] for n, p in dep.members.items()}
    rng = np.random.default_rng(5)
    xs = [rng.random((1 + i % 4, 64)).astype(np.float32) * (i + 1) for i in range(24)]
    # the last overflows member a: its first hidden unit sums 64 products of 3e38 with one sign
    overflow = 3e38 * np.sign(dict(models["a"].named_parameters())["1.weight"][0].detach().numpy())
    bodies = [{"inputs": x.tolist()} for x in xs] + [{"inputs": overflow.tolist()}]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda b: requests.post(serve_url + "/predict", json=b, timeout=60), bodies))
    assert answers[-1].status_code == 422 and "not finite" in answers[-1].text
    for x, r in zip(xs, answers):
        assert r.status_code == 200, r.text
        out = r.json()
        expected = 0
        for m in out["members"]:
            with torch.no_grad():
                probs = torch.softmax(models[m["name"]](torch.as_tensor(x).view(len(x), 1, 8, 8)), -1).numpy()
            expected = expected + m["weight"] * probs
        np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-5, atol=1e-6)


def test_malformed_requests_get_4xx(serve_url, tmp_path):
    deploy(tmp_path, {"a": {}})
    url = serve_url
    bad = [
        ({"inputs": [[0.1] * 63]}, "64 numbers"),
        ({"inputs": []}, None),
        ({"input": [[0.1] * 64]}, None),
        ({"inputs": [[0.1] * 64], "extra": 1}, None),
        ({"inputs": [["x"] * 64]}, None),
        ({"inputs": [[0.1] * 64], "user_id": ""}, None),
        ({"inputs": [[0.1] * 64, [0.1] * 63]}, "got rows of [63, 64] numbers"),
    ]  # ragged rows
    for body, text in bad:
        r = requests.post(url + "/predict", json=body, timeout=30)
        assert 400 <= r.status_code < 500, (body, r.status_code)
        if text:
            assert text in r.text
    assert 400 <= requests.post(url + "/predict", data=b"{not json", timeout=30).status_code < 500
    r = requests.post(url + "/feedback", json={"request_id": "nope", "labels": [1]}, timeout=30)
    assert r.status_code == 404 and "unknown" in r.text
    rid = predict(url, [[0.1] * 64])["request_id"]
    r = requests.post(url + "/feedback", json={"request_id": rid, "labels": [1, 2]}, timeout=30)
    assert r.status_code == 422 and "labels" in r.text
    assert requests.get(url + "/health", timeout=30).json()["status"] == "ok"
    metrics = requests.get(url + "/metrics", timeout=30).text
    counts = dict(
        line.split() for line in metrics.splitlines() if line.startswith("fedmeta_") and "{" not in line
    )
    assert float(counts["fedmeta_requests_total"]) >= 1 and float(counts["fedmeta_errors_total"]) >= 1


def test_weights_follow_feedback_and_drift(serve_url, tmp_path):
    """Feedback sets the historical weights (the formula holds on the pushed state); a window of
    inputs like member b's training data moves weight to b."""
    dep = deploy(
        tmp_path,
        {"a": {"mean": 0.1, "constant": 0}, "b": {"mean": 0.7, "constant": 1}},
        top_k=2,
        min_feedback=1000,
    )
    x = np.full((4, 64), 0.1, np.float32)
    for _ in range(5):  # a is always right, b always wrong
        out = predict(serve_url, x)
        requests.post(
            serve_url + "/feedback", json={"request_id": out["request_id"], "labels": [0] * 4}, timeout=30
        )
    routing = dep.push()
    snap = requests.get(serve_url + "/routing", timeout=30).json()
    parts = snap["parts"]
    formula = update_routing_weights(
        {m: p["historical"] for m, p in parts.items()},
        {m: p["alignment"] for m, p in parts.items()},
        {m: p["compensation"] for m, p in parts.items()},
    )
    assert routing["weights"] == pytest.approx(formula) and snap["weights"]["a"] > snap["weights"]["b"]
    assert snap["pushed_version"] == routing["version"]  # the ingress replica got the push
    before = snap["weights"]["b"]
    for _ in range(10):  # drift: inputs now look like b's training data
        predict(
            serve_url, np.full((8, 64), 0.7, np.float32) + 0.05 * np.random.default_rng(1).random((8, 64))
        )
    after = dep.push()["weights"]["b"]
    assert after > before


def test_shadow_answers_are_never_returned_and_a_better_candidate_is_promoted(serve_url, tmp_path):
    dep = deploy(tmp_path, {"a": {"constant": 0}, "b": {"constant": 0}})
    dep.add_candidate("c", member(tmp_path / "c", constant=7), "shadow", 1.0)
    for _ in range(40):
        out = predict(serve_url, np.full((3, 64), 0.3, np.float32))
        assert out["answered_by"] == "ensemble" and 7 not in out["predictions"]
        assert {m["name"] for m in out["members"]} <= {"a", "b"}
        # the truth is 7: the candidate is right, production wrong
        fb = requests.post(
            serve_url + "/feedback", json={"request_id": out["request_id"], "labels": [7, 7, 7]}, timeout=30
        )
        assert fb.status_code == 200
    dep.push()
    members = requests.get(serve_url + "/members", timeout=30).json()
    assert members["history"][-1]["event"] == "promoted" and "c" in members["active"]
    # every request was shadowed (fraction 1) until the test decided
    assert "c" in dep.members and not dep.candidates and members["history"][-1]["trial"]["answers"] > 0


def test_a_worse_candidate_is_rejected_and_released(serve_url, tmp_path):
    from ray import serve

    dep = deploy(tmp_path, {"a": {"constant": 0}})
    dep.add_candidate("w", member(tmp_path / "w", constant=5), "shadow", 1.0)
    for _ in range(40):
        out = predict(serve_url, np.full((3, 64), 0.3, np.float32))
        requests.post(
            serve_url + "/feedback", json={"request_id": out["request_id"], "labels": [0, 0, 0]}, timeout=30
        )
    assert dep.push()["released"] == ["w"]  # rejected, and its application deleted
    assert requests.get(serve_url + "/members", timeout=30).json()["history"][-1]["event"] == "rejected"
    assert "fedmeta-member-w" not in serve.status().applications and not dep.candidates


def test_pruned_member_stops_receiving_traffic(serve_url, tmp_path):
    from ray import serve

    dep = deploy(
        tmp_path,
        {"good": {"constant": 1}, "bad": {"constant": 2}},
        top_k=2,
        prune_threshold=0.3,
        prune_window=2,
        min_feedback=1000,
    )
    released = []
    for _ in range(3):
        for _ in range(10):
            out = predict(serve_url, np.full((2, 64), 0.3, np.float32))
            requests.post(
                serve_url + "/feedback", json={"request_id": out["request_id"], "labels": [1, 1]}, timeout=30
            )
        released += dep.push()["released"]
    assert "bad" in requests.get(serve_url + "/members", timeout=30).json()["pruned"] and released == ["bad"]
    for _ in range(10):
        assert [m["name"] for m in predict(serve_url, np.full((1, 64), 0.3))["members"]] == ["good"]
    assert "fedmeta-member-bad" not in serve.status().applications


def test_no_request_fails_while_weights_are_pushed_and_a_candidate_is_promoted(serve_url, tmp_path):
    dep = deploy(tmp_path, {"a": {"constant": 0}, "b": {"constant": 0, "seed": 4}})
    failures, done = [], threading.Event()

    def load():
        while not done.is_set():
            try:
                r = requests.post(serve_url + "/predict", json={"inputs": [[0.3] * 64]}, timeout=30)
                if r.status_code != 200:
                    failures.append(r.status_code)
                else:
                    requests.post(
                        serve_url + "/feedback",
                        json={"request_id": r.json()["request_id"], "labels": [7]},
                        timeout=30,
                    )
            except requests.RequestException as e:
                failures.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        dep.add_candidate("c", member(tmp_path / "c", constant=7), "shadow", 1.0)
        for _ in range(8):
            time.sleep(0.5)
            dep.push()
        dep.collect()
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not failures
    assert "c" in requests.get(serve_url + "/members", timeout=30).json()["active"]


def test_per_user_models_with_fallback(serve_url, tmp_path):
    from fedmeta.serve.client import Deployment

    run = tmp_path / "run"
    member(run, seed=1)
    (run / "personalized").mkdir()
    model, card = load_model(run)
    personal = np.zeros(card["model"]["n_params"], np.float32)
    personal[-10 + 4] = 10.0  # the user's model always answers 4
    np.save(run / "personalized" / "42.npy", personal)
    dep = Deployment({"g": str(run)}, personalized=str(run), reweight_s=0.0)
    dep.deploy()
    x = np.random.default_rng(2).random((3, 64))
    out = predict(serve_url, x, user="42")
    assert out["answered_by"] == "personal" and out["predictions"] == [4, 4, 4]
    other = predict(serve_url, x, user="7")  # unknown user: the ensemble answers
    assert other["answered_by"] == "ensemble"
    with torch.no_grad():
        expected = torch.softmax(model(torch.as_tensor(x, dtype=torch.float32).view(3, 1, 8, 8)), -1).argmax(
            -1
        )
    assert other["predictions"] == expected.tolist()


def test_the_api_needs_a_token_with_the_scope(serve_url, tmp_path):
    """Issue 27: every endpoint but /health needs a bearer token with its scope; a user_id without
    the `personal` scope gets the ensemble, and /routing shows no salt."""
    from fedmeta.serve.auth import parse_tokens
    from fedmeta.serve.client import Deployment

    run = tmp_path / "run"
    member(run, seed=1)
    (run / "personalized").mkdir()
    _, card = load_model(run)
    personal = np.zeros(card["model"]["n_params"], np.float32)
    personal[-10 + 4] = 10.0
    np.save(run / "personalized" / "42.npy", personal)
    tokens = {
        "p" * 32: ["predict"],
        "u" * 32: ["predict", "personal"],
        "f" * 32: ["feedback"],
        "o" * 32: ["operator"],
    }
    dep = Deployment({"g": str(run)}, personalized=str(run), reweight_s=0.0, auth=parse_tokens(tokens))
    dep.deploy()
    dep.add_candidate("c", member(tmp_path / "c", constant=3), "ab", 0.5)
    bearer = {
        scope: {"Authorization": f"Bearer {t}"}
        for t, (scope, *_) in zip(tokens, [["predict"], ["personal"], ["feedback"], ["operator"]])
    }
    body = {"inputs": [[0.3] * 64], "user_id": "42"}
    assert requests.post(serve_url + "/predict", json=body, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer " + "x" * 32}
    assert requests.post(serve_url + "/predict", json=body, headers=wrong, timeout=30).status_code == 401
    plain = requests.post(serve_url + "/predict", json=body, headers=bearer["predict"], timeout=30)
    assert plain.status_code == 200 and plain.json()["answered_by"] != "personal"
    own = requests.post(serve_url + "/predict", json=body, headers=bearer["personal"], timeout=30).json()
    assert own["answered_by"] == "personal" and own["predictions"] == [4]
    fb = {"request_id": plain.json()["request_id"], "labels": [1]}
    assert (
        requests.post(serve_url + "/feedback", json=fb, headers=bearer["predict"], timeout=30).status_code
        == 403
    )
    assert (
        requests.post(serve_url + "/feedback", json=fb, headers=bearer["feedback"], timeout=30).status_code
        == 200
    )
    for path in ("/routing", "/members", "/metrics", "/openapi.json"):
        assert requests.get(serve_url + path, timeout=30).status_code == 401
        assert requests.get(serve_url + path, headers=bearer["predict"], timeout=30).status_code == 403
        assert requests.get(serve_url + path, headers=bearer["operator"], timeout=30).status_code == 200
    routing = requests.get(serve_url + "/routing", headers=bearer["operator"], timeout=30).json()
    assert routing["candidate"]["name"] == "c" and "salt" not in routing["candidate"]
    promote = {"name": "c"}
    assert (
        requests.post(serve_url + "/promote", json=promote, headers=bearer["predict"], timeout=30).status_code
        == 403
    )
    undecided = requests.post(serve_url + "/promote", json=promote, headers=bearer["operator"], timeout=30)
    assert undecided.status_code == 409 and "has not decided" in undecided.json()["detail"]
    assert requests.get(serve_url + "/docs", timeout=30).status_code == 404
    assert requests.get(serve_url + "/health", timeout=30).status_code == 200


def test_ab_arm_by_user_and_drift_compensation(serve_url, tmp_path):
    """A/B: a stable set of users gets the candidate's answers (the rest production's); feedback
    on both arms promotes the better one. A member whose feedback accuracy falls far below its
    reference quality loses the drift-compensation share."""
    dep = deploy(tmp_path, {"a": {"constant": 0}, "b": {"constant": 0, "seed": 5}}, min_feedback=5)
    dep.add_candidate("c", member(tmp_path / "c", constant=3), "ab", 0.5)
    users = [f"user{i}" for i in range(40)]
    arms: dict[str, str] = {}  # the arms follow a secret salt: stable per user, about half each
    for rnd in range(6):
        for u in users:
            out = predict(serve_url, np.full((2, 64), 0.3, np.float32), user=u)
            arm = arms.setdefault(u, out["answered_by"])
            assert out["answered_by"] == arm in ("candidate", "ensemble")
            assert (3 in out["predictions"]) == (arm == "candidate")
            requests.post(
                serve_url + "/feedback", json={"request_id": out["request_id"], "labels": [3, 3]}, timeout=30
            )
    routing = dep.push()
    members = requests.get(serve_url + "/members", timeout=30).json()
    assert members["history"][-1]["event"] == "promoted" and "c" in routing["active"]
    parts = requests.get(serve_url + "/routing", timeout=30).json()["parts"]
    # a and b were always wrong (reference quality 0.5): compensation at its floor
    assert parts["a"]["compensation"] == pytest.approx(0.05) and parts["b"]["compensation"] == pytest.approx(
        0.05
    )


def test_serve_config_builders(serve_url, tmp_path):
    """What `fedmeta serve --write-config` writes runs through the builders Serve config files name."""
    from ray import serve

    from fedmeta.serve.app import ensemble_builder, member_builder
    from fedmeta.serve.client import Deployment

    dep = Deployment({"a": member(tmp_path / "a", seed=1)}, reweight_s=0.0)
    config = dep.config(port=1234)
    assert config["http_options"]["port"] == 1234 and len(config["applications"]) == 2
    for app in config["applications"]:
        builder = member_builder if app["import_path"].endswith("member_builder") else ensemble_builder
        module, _, name = app["import_path"].partition(":")  # what `serve run CONFIG` imports
        assert getattr(importlib.import_module(module), name) is builder
        serve.run(builder(app["args"]), name=app["name"], route_prefix=app["route_prefix"])
    out = predict(serve_url, np.random.default_rng(3).random((2, 64)))
    assert [m["name"] for m in out["members"]] == ["a"]
