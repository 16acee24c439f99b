"""Hostile input to the Serve app: fuzzed from its OpenAPI schema (schemathesis), and the bugs it and
review found, each pinned by a test. No request may get a 5xx, and every refusal is one line naming
the field and what was expected.

The HTTP tests share one deployment per variant (module scope: deploying takes seconds): "plain" (two
members and a shadow candidate) and "personalized" (per-user models and an A/B candidate, so user ids
reach both `personal_id` and the A/B hashing)."""

import asyncio
import json
import socket
import types

import numpy as np
import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from fedmeta.serve.ensemble import api as serve_api
from fedmeta.serve.router_state import RouterSettings, RouterState
from fedmeta.sim.checkpoint import load_model, save_member
from fedmeta.sim.config import ModelConfig
from fedmeta.sim.models import build_model, init_params

MLP = {"kind": "mlp", "hidden": [8]}
PERSONAL_USER, PERSONAL_CLASS = 42, 4


def member(path, seed=0):
    model = build_model(ModelConfig(**MLP), (1, 8, 8), 10)
    flat = init_params(model, torch.Generator().manual_seed(seed))
    save_member(
        path,
        MLP,
        flat.numpy(),
        [1, 8, 8],
        10,
        {"mean": [0.3] * 64, "var": [0.02] * 64, "n": 100},
        {"acc_global_DI": 0.5},
    )
    return str(path)


def with_personal_model(run):
    """Give user PERSONAL_USER a model that always answers PERSONAL_CLASS."""
    _, card = load_model(run)
    params = np.zeros(card["model"]["n_params"], np.float32)
    params[-10 + PERSONAL_CLASS] = 10.0  # the output bias
    (run / "personalized").mkdir()
    np.save(run / "personalized" / f"{PERSONAL_USER}.npy", params)
    # a file no canonical id names: "042" must not reach it, nor any other spelling
    np.save(run / "personalized" / f"0{PERSONAL_USER}.npy", params)


@pytest.fixture(scope="module", params=["plain", "personalized"])
def app(request, serve_url, tmp_path_factory):
    from ray import serve

    from fedmeta.serve.client import Deployment

    tmp = tmp_path_factory.mktemp(request.param)
    members = {"a": member(tmp / "a", seed=1), "b": member(tmp / "b", seed=2)}
    personalized = None
    if request.param == "personalized":
        with_personal_model(tmp / "a")
        personalized = members["a"]
    # reweight_s > 0: the Router's schedule runs (and meets the apps' deletion at the end)
    dep = Deployment(members, personalized=personalized, reweight_s=1.0, settings={"top_k": 2})
    dep.deploy()
    dep.add_candidate("c", member(tmp / "c", seed=3), "ab" if personalized else "shadow", 0.5)
    yield types.SimpleNamespace(url=serve_url, kind=request.param, dep=dep)
    for name in list(serve.status().applications):
        serve.delete(name)


# ---------------------------------------------------------------- fuzzing from the OpenAPI schema
def deployed_schema(openapi: dict, input_size: int) -> dict:
    """The app's schema with what this deployment adds: inputs of `input_size` numbers (so most
    schema-valid requests reach the models) and user ids that have a personalized model."""
    openapi = json.loads(json.dumps(openapi))
    inputs = openapi["components"]["schemas"]["PredictRequest"]["properties"]["inputs"]
    batch_of, one = inputs["anyOf"]
    for numbers in (batch_of["items"], one):
        numbers.update(minItems=input_size, maxItems=input_size)
    batch_of["maxItems"] = 8  # short batches: more examples in the time
    user_id = openapi["components"]["schemas"]["PredictRequest"]["properties"]["user_id"]
    user_id["examples"] = [str(PERSONAL_USER), f"0{PERSONAL_USER}", "\u0664\u0662", "\u00b2"]
    return openapi


# The schema comes from the app's FastAPI object (no server is needed to collect the tests); requests
# go to the deployment of the `app` fixture. (schemathesis' `from_fixture` loader is not used: it
# sets `Node._nodeid`, which pytest 9 no longer has.)
schema = schemathesis.openapi.from_dict(deployed_schema(serve_api.openapi(), 64))
schema.config.generation.update(modes=list(GenerationMode))  # schema-valid and schema-invalid data


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_no_request_gets_a_server_error(case, app):
    """Every operation, 60 generated requests each (plus schemathesis' boundary cases): wrong types,
    missing and unknown fields, bodies that are not JSON or not UTF-8, other methods, unknown user and
    request ids. Never a 5xx."""
    case.call_and_validate(base_url=app.url, checks=[not_a_server_error], timeout=60)


# ---------------------------------------------------------------- hostile input over HTTP
def post(app, path, body=None, raw=None, headers=None):
    if raw is None:
        return requests.post(app.url + path, json=body, headers=headers, timeout=60)
    return requests.post(
        app.url + path, data=raw, headers={"Content-Type": "application/json", **(headers or {})}, timeout=60
    )


def refused(r, status=422, *texts):
    """A refusal with one line of JSON `detail` containing `texts`."""
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail, detail
    for text in texts:
        assert text in detail, (text, detail)
    return detail


def errors_total(app) -> float:
    metrics = requests.get(app.url + "/metrics", timeout=30).text
    return float(
        next(line.split()[1] for line in metrics.splitlines() if line.startswith("fedmeta_errors_total"))
    )


@pytest.mark.slow
def test_ragged_rows_and_wrong_widths_are_refused_and_counted(app):
    before = errors_total(app)
    refused(
        post(app, "/predict", {"inputs": [[1.0, 2.0], [1.0]]}), 422, "inputs", "64 numbers", "rows of [1, 2]"
    )
    refused(post(app, "/predict", {"inputs": [[0.5] * 63]}), 422, "inputs", "64 numbers", "got 63")
    refused(post(app, "/predict", {"inputs": [0.5] * 65}), 422, "inputs", "64 numbers", "got 65")
    refused(post(app, "/predict", {"inputs": [[0.5] * 64, 0.5]}), 422, "inputs[1]", "list")
    # the schema refuses the last one before `predict` runs: counted all the same
    assert errors_total(app) == before + 4


@pytest.mark.slow
def test_nan_infinity_and_overflow_are_refused(app):
    """Python's JSON parser takes NaN and Infinity; numbers beyond float32 become inf in the model;
    finite inputs can overflow the model's output. All are the inputs' fault, and none may turn into
    a NaN in the answer (which JSON cannot carry)."""
    row = ", ".join(["0.5"] * 63)
    for token in ("NaN", "Infinity", "-Infinity", "1e400"):
        refused(post(app, "/predict", raw=f'{{"inputs": [[{token}, {row}]]}}'), 422, "inputs[0][0]", "finite")
    refused(post(app, "/predict", raw=f'{{"inputs": [{row}, NaN]}}'), 422, "inputs[63]", "finite")
    refused(post(app, "/predict", {"inputs": [[0.5] * 63 + [1e39]]}), 422, "inputs[0][63]", "<= 3.402823e+38")
    # the largest float32 numbers: a finite answer, or a 422 if the models' output overflows
    statuses = set()
    for row in ([3e38] * 64, [-3e38] * 64, [3e38, -3e38] * 32, [1e4] * 64):
        r = post(app, "/predict", {"inputs": [row]})
        statuses.add(r.status_code)
        if r.status_code == 200:
            assert np.isfinite(r.json()["probabilities"]).all()
        else:
            refused(r, 422, "inputs", "not finite")
    # never a 500 (it was one); whether these models overflow on any of them depends on the CPU's
    # float kernels (tests/serve/test_app.py overflows a member for certain and expects the 422)
    assert statuses <= {200, 422}


@pytest.mark.slow
def test_wrong_content_types_and_undecodable_bodies_are_4xx(app):
    body = json.dumps({"inputs": [[0.5] * 64]})
    for content_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/json; charset=latin-1",
    ):
        r = requests.post(app.url + "/predict", data=body, headers={"Content-Type": content_type}, timeout=60)
        assert r.status_code in (200, 400, 415, 422), (content_type, r.status_code, r.text)
        assert isinstance(r.json()["detail" if r.status_code != 200 else "request_id"], str)
    refused(post(app, "/predict", raw=b"\xff\xfe{"), 400, "body", "UTF-8")
    refused(post(app, "/predict", raw="[" * 100_000 + "]" * 100_000), 400, "body")  # too deep to parse
    refused(post(app, "/predict", raw="{not json"), 422, "body", "JSON")
    refused(post(app, "/predict", raw="[1, 2]"), 422, "body")
    refused(post(app, "/feedback", raw="null"), 422, "body")


@pytest.mark.slow
def test_unknown_fields_are_one_error_however_many(app):
    many = {"inputs": [[0.5] * 64], **{f"k{i}": 0 for i in range(100_000)}}
    refused(post(app, "/predict", many), 422, "unknown field 'k0'")
    # a lone surrogate is valid JSON but not UTF-8: the answer must still encode
    refused(post(app, "/predict", raw='{"inputs": [0.5], "\\ud800": 1}'), 422, "unknown field", "ud800")
    # a million bad numbers: refused at the first, not one error each (seconds and gigabytes)
    refused(post(app, "/predict", {"inputs": [["x"] * 1_000_000]}), 422, "inputs[0][0]", "number")


@pytest.mark.slow
def test_feedback_with_a_wrong_label_count_can_be_retried(app):
    out = post(app, "/predict", {"inputs": [[0.5] * 64, [0.25] * 64]}).json()
    refused(
        post(app, "/feedback", {"request_id": out["request_id"], "labels": [1]}), 422, "labels", "2 inputs"
    )
    r = post(app, "/feedback", {"request_id": out["request_id"], "labels": [1, 2]})
    assert r.status_code == 200, r.text
    refused(post(app, "/feedback", {"request_id": out["request_id"], "labels": [1, 2]}), 404, "unknown")
    refused(post(app, "/feedback", {"request_id": "\ud800", "labels": [1]}), 422, "request_id")  # not UTF-8
    refused(post(app, "/feedback", {"request_id": "x", "labels": [1.0]}), 422, "labels[0]", "integer")


@pytest.mark.slow
@pytest.mark.parametrize("app", ["personalized"], indirect=True)
def test_only_the_canonical_user_id_reaches_a_personal_model(app):
    x = {"inputs": [[0.5] * 64] * 3}
    out = post(app, "/predict", {**x, "user_id": str(PERSONAL_USER)}).json()
    assert out["answered_by"] == "personal" and out["predictions"] == [PERSONAL_CLASS] * 3
    # "042" has a model file of its own on disk; "٤٢" and "²" pass str.isdigit; none is user 42
    for user in (
        f"0{PERSONAL_USER}",
        "\u0664\u0662",
        "\u00b2",
        f"+{PERSONAL_USER}",
        f" {PERSONAL_USER}",
        f"{PERSONAL_USER}\n",
        "-0",
        "7",
    ):
        r = post(app, "/predict", {**x, "user_id": user})
        assert r.status_code == 200, (user, r.text)
        assert r.json()["answered_by"] in ("ensemble", "candidate"), user
    # a lone surrogate is valid JSON but no text: refused by the schema, never a 500
    refused(post(app, "/predict", {**x, "user_id": "\ud800"}), 422, "user_id")


# ---------------------------------------------------------------- request body limit
def raw_request(app, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send a request by hand (to declare a length without sending it, or to stream it chunked)."""
    host, port = app.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head_out, _, payload = data.partition(b"\r\n\r\n")
    return int(head_out.split()[1]), json.loads(payload[: _length(data)] or b"{}")


def _length(response: bytes) -> int:
    for line in response.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.mark.slow
def test_bodies_over_the_limit_get_a_413(app):
    from fedmeta.serve.schemas import MAX_BODY_BYTES

    # declared too large: refused before a byte of the body is read (none is sent)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY_BYTES + 1}\r\n"
    )
    status, body = raw_request(app, head)
    assert status == 413 and "request body" in body["detail"] and str(MAX_BODY_BYTES) in body["detail"]
    # streamed without a length: refused once the limit is passed (the rest is never sent)
    chunk = b" " * (1 << 20)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY_BYTES // len(chunk) + 1))
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    status, body = raw_request(app, head, chunks)
    assert status == 413 and "request body" in body["detail"]
    # a body right at the limit is read and answered
    payload = json.dumps({"inputs": [[0.5] * 64]}).encode()
    r = post(app, "/predict", raw=payload + b" " * (MAX_BODY_BYTES - len(payload)))
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- the pure parts
def test_batch_takes_one_input_or_a_batch_of_the_right_width():
    from fedmeta.serve.schemas import batch

    assert batch([0.5] * 4, 4).shape == (1, 4) and batch([[0.5] * 4] * 3, 4).dtype == np.float32
    for inputs, text in (
        ([[1.0, 2.0], [1.0]], "got rows of [1, 2] numbers"),
        ([1.0] * 3, "got 3"),
        ([[]], "got 0"),
        ([[float("nan")] * 4], "finite"),
        ([[1e39] * 4], "float32"),
    ):
        with pytest.raises(ValueError, match="^inputs: ") as e:
            batch(inputs, 4)
        assert text in str(e.value)
        assert "each input must have 4 numbers" in str(e.value) or text in ("finite", "float32")


def test_a_non_finite_answer_is_the_inputs_fault():
    from fastapi import HTTPException

    from fedmeta.serve.schemas import finite_answer

    assert finite_answer(np.full((1, 3), 1 / 3)).shape == (1, 3)
    with pytest.raises(HTTPException) as e:
        finite_answer(np.array([[np.nan, 0.5]]))
    assert e.value.status_code == 422 and e.value.detail.startswith("inputs: ")


def test_personal_id_takes_only_canonical_ascii_decimals():
    from fedmeta.serve.schemas import personal_id

    assert [personal_id(u) for u in ("0", "42", "1234567890")] == ["0", "42", "1234567890"]
    for user in (
        "042",
        "00",
        "\u0664\u0662",
        "\u00b2",
        "+42",
        "-1",
        " 42",
        "42 ",
        "42\n",
        "4_2",
        "",
        "x",
        None,
    ):
        assert personal_id(user) is None, user


def test_schema_errors_are_one_line_naming_the_field():
    from pydantic import ValidationError

    from fedmeta.serve.schemas import PredictRequest, one_line

    def line(body):
        with pytest.raises(ValidationError) as e:
            PredictRequest.model_validate(body)
        return one_line(e.value.errors(), body)

    assert line({"inputs": [[0.5], ["x"]]}) == "inputs[1][0]: Input should be a valid number"
    assert line({"inputs": [0.5, float("nan")]}) == "inputs[1]: Input should be a finite number"
    assert line({"inputs": [[0.5], 0.5]}) == "inputs[1]: Input should be a valid list"
    assert line({"inputs": [True]}).startswith("inputs[0]: ")  # strict: no bools as numbers
    assert line({"inputs": ["1.5"]}).startswith("inputs[0]: ")  # nor strings
    assert line({"inputs": [[0.5]] * 1025}).startswith("inputs: List should have at most 1024")
    assert line({"inputs": [[0.5], [-1e39]]}) == "inputs[1][0]: Input should be >= -3.402823e+38"
    assert line({}) == "inputs: Field required"
    unknown = line({"inputs": [0.5], "\ud800\n": 1})  # printable, and encodable as UTF-8
    assert unknown == r"body: unknown field '\ud800\n'; the fields are ['inputs', 'user_id']"


def test_feedback_with_a_wrong_label_count_keeps_the_request():
    profile = {"mean": [0.0] * 4, "var": [1.0] * 4, "n": 10}
    state = RouterState({"a": {"profile": profile, "reference_quality": 0.5}}, RouterSettings())
    state.record(
        "r1",
        {"members": {"a": [1, 2]}, "answer": [1, 2], "arm": "ensemble", "trial": None, "candidate": None},
    )
    for labels in ([1], [1, 2, 3], [[1, 2]]):
        with pytest.raises(ValueError, match="labels: request 'r1' had 2 inputs"):
            state.feedback("r1", np.asarray(labels))
    assert state.feedback("r1", np.asarray([1, 0]))["accuracy"] == 0.5
    with pytest.raises(KeyError, match="unknown"):
        state.feedback("r1", np.asarray([1, 0]))  # consumed by the successful call


def test_traffic_split_takes_any_json_string():
    import hashlib

    from fedmeta.serve.shadow import stable_fraction

    # a lone surrogate (valid in JSON) is a key like any other, not a UnicodeEncodeError
    assert 0 <= stable_fraction("\ud800", "ab") < 1
    # ... and the encoding of every other key is unchanged: no user moves between arms
    digest = hashlib.sha256("ab:user-\u00e9\U0001f600".encode()).digest()
    assert (
        stable_fraction("user-\u00e9\U0001f600", "ab") == (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53
    )


def test_the_schedule_logs_failed_pushes_and_goes_on(monkeypatch):
    import ray.exceptions

    import fedmeta.serve.router as router_module

    logged = []
    monkeypatch.setattr(
        router_module,
        "logger",
        types.SimpleNamespace(
            debug=lambda *a: logged.append(("debug", a)), exception=lambda *a: logged.append(("exception", a))
        ),
    )
    profile = {"mean": [0.0] * 4, "var": [1.0] * 4, "n": 10}
    router = router_module.Router.func_or_class(
        {"a": {"profile": profile, "reference_quality": 0.5}}, {}, "x", 0.0
    )
    failures = [ray.exceptions.ActorUnavailableError("stopping", None), ValueError("a bug")]

    async def push():
        raise failures.pop(0)

    router.push = push
    asyncio.run(router.scheduled_push())  # replicas going away: expected, quiet
    asyncio.run(router.scheduled_push())  # anything else: logged with its traceback
    assert [level for level, _ in logged] == ["debug", "exception"]
    # the schedule itself survives both
    failures[:] = [ValueError("again")] * 3
    router.reweight_s = 0.001

    async def run_a_while():
        task = asyncio.get_running_loop().create_task(router._every())
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()

    asyncio.run(run_a_while())
    assert [level for level, _ in logged].count("exception") >= 2
