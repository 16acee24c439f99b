"""The Ray Serve application: a routed, dynamically weighted ensemble of federation checkpoints.

    app "fedmeta":  Ensemble (FastAPI ingress) ──► Router (one replica: serve/state.py RouterState)
                        │                      └─► PersonalModels (per-user models: multiplexing + LRU)
                        └──► app "fedmeta-member-<name>": Member (one deployment per ensemble member)

Each member (and each candidate) is its own Serve application holding one `Member` deployment, so
a member can join (a new candidate) or leave (pruned, rejected) without redeploying anything else:
deleting its application releases its replicas. The ingress reaches members through deployment
handles looked up by application name.

A request's inputs go to the top-k active members by routing weight (in parallel) and the answer is
their weighted average (serve/routing.py `combine`); the response names the members and weights.
Concurrent requests share member calls and forward passes (`Coalesce` at the ingress, `fedmeta.serve.batch`
at a member: see BATCH_REQUESTS), and what answered reaches the Router off the request's path.
With a user id whose personalized model exists, that model answers instead (`personal_id`: only the
canonical ASCII decimal spelling of an id selects a model; any other id is answered by the ensemble).
A candidate under test answers a stable fraction of requests as *shadow* (logged and scored, never
returned) or as an *A/B arm* (by hashing the user id). Inputs and what answered reach the Router in batches; labelled
feedback (`/feedback`) is scored there. The Router recomputes weights every `reweight_s` seconds
and pushes the routing state to every running ingress replica's `reconfigure` (a broadcast: no
redeploy, no restart); replicas that start later pull it on their first request.

Hostile input never gets a 5xx: every rejected request gets a 4xx whose JSON `detail` is one line
naming the field and what was expected (schema errors included, `one_line`); request bodies over
MAX_BODY_BYTES get a 413 before they are read (`BodyLimit`); numbers must be finite float32 values
and the answer finite (a JSON body cannot carry NaN).
"""
# No `from __future__ import annotations`: FastAPI must see the request models as real classes
# on the ingress methods (Serve rebinds them), not as strings.
import asyncio
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import ray.exceptions
import ray.serve.exceptions
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedmeta.serve.auth import Caller, RateLimit, authenticate
from fedmeta.serve.routing import combine
from fedmeta.serve.shadow import ab_arm, in_shadow
from fedmeta.serve.state import RouterSettings, RouterState
from fedmeta.sim.checkpoint import load_model

# no open docs: the schema is served to operators only (/openapi.json below)
api = FastAPI(title="fedmeta ensemble", docs_url=None, redoc_url=None, openapi_url=None)
MAX_USER_MODELS = 8        # personalized models kept per PersonalModels replica (LRU)
MAX_BATCH = 1024           # inputs per request
# The largest request body accepted, in bytes: a full batch of MAX_BATCH inputs of the 8 x 8 default
# written at full float64 precision (~21 bytes a number with its separator) takes 1.4 MiB, of 28 x 28
# images with 4 decimals 6.4 MiB; bigger inputs come in smaller batches. The bound matters: parsed,
# a body takes up to ~10 times its size in Python objects.
MAX_BODY_BYTES = 8 * 1024 * 1024
FLOAT32_MAX = float(np.finfo(np.float32).max)
logger = logging.getLogger("ray.serve")    # Serve writes this logger to the replica's log file


# ---------------------------------------------------------------- schemas
class _Request(BaseModel):
    """What every request body shares. strict: "1.5" or true is not a number, 1.5 not a label.
    allow_inf_nan=False: NaN and Infinity (which Python's JSON parser accepts) are refused with their
    position. Lists stop at their first bad item (fail_fast): pydantic would otherwise report every
    item, and a body of a million bad numbers would take seconds and gigabytes to refuse."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: object) -> object:
        # one error for any number of unknown fields (extra="forbid" reports each one)
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(f"unknown field '{_printable(unknown[0])}'; the fields are {sorted(cls.model_fields)}")
        return data


# the models compute in float32: a larger number would become inf there
Number = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
Row = Annotated[list[Number], Field(fail_fast=True)]


class PredictRequest(_Request):
    # the limits on each branch (on the union they would bound a flat input to MAX_BATCH numbers, and
    # the OpenAPI schema would not show them)
    inputs: Annotated[list[Row], Field(min_length=1, max_length=MAX_BATCH, fail_fast=True)] \
        | Annotated[list[Number], Field(min_length=1, fail_fast=True)] = Field(
            description="one input (a flat list) or a batch of inputs, each flattened to the model's input size")
    user_id: str | None = Field(None, min_length=1, max_length=128,
                                description="selects a personalized model in canonical decimal form (\"42\"), "
                                            "and an A/B arm; an id without a model gets the ensemble")


class MemberWeight(BaseModel):
    name: str
    weight: float


class PredictResponse(BaseModel):
    request_id: str
    predictions: list[int]
    probabilities: list[list[float]]
    members: list[MemberWeight]
    answered_by: str = Field(description="ensemble | candidate | personal")


class FeedbackRequest(_Request):
    request_id: str = Field(min_length=1, max_length=64)
    labels: list[int] = Field(min_length=1, max_length=MAX_BATCH, fail_fast=True,
                              description="the true label of each input of the request, in order")


class PromoteRequest(_Request):
    name: str = Field(min_length=1, max_length=64, description="the candidate under trial")


class CandidateRequest(_Request):
    name: str = Field(min_length=1, max_length=64)
    mode: str = Field(pattern="^(shadow|ab)$")
    fraction: float = Field(gt=0, le=1)


# ---------------------------------------------------------------- hostile input
def _printable(value: object, limit: int = 100) -> str:
    """Safe in a one-line JSON answer: a key sent by the client may hold a lone surrogate (legal in
    JSON, not encodable as UTF-8: the response would fail) or a newline."""
    text = str(value)[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _where(loc: tuple | list) -> str:
    """pydantic's error location as `inputs[3][0]`. The request models are flat, so a string after
    the field name is pydantic's tag of a union branch (e.g. "list[float]"): left out."""
    parts = list(loc)
    parts = parts[1:] if parts[:1] == ["body"] else parts
    text = "".join(f"[{p}]" if isinstance(p, int) else _printable(p) if i == 0 else "" for i, p in enumerate(parts))
    return text or "body"


def _meant(errors: list[dict], body: object) -> list[dict]:
    """pydantic reports `inputs` (one input or a batch: a union) once per branch; keep the branch the
    client meant: a batch when the first input is a list."""
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or not inputs:
        return errors
    batch_meant = isinstance(inputs[0], list)
    return [e for e in errors if _branch(e.get("loc", ())) in (None, batch_meant)] or errors


def _branch(loc: tuple | list) -> bool | None:
    """Whether an error is in the batch branch of `inputs` (tagged "list[list[...]]"), None if in no branch."""
    tag = next((p for p in loc if isinstance(p, str) and p.startswith("list[")), None)
    return None if tag is None else tag.startswith("list[list[")


_BOUNDS = {"le": "<=", "ge": ">=", "lt": "<", "gt": ">"}


def one_line(errors: list[dict], body: object = None) -> str:
    """One line for a request the schema refused (`body`: as parsed): which field (and position) and
    what was expected. Of several errors the deepest is the most specific."""
    errors = _meant(errors, body)
    if not errors:
        return "body: invalid request"
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    if error.get("type") == "json_invalid":
        return f"body: invalid JSON ({_printable(error.get('ctx', {}).get('error', 'cannot parse'))})"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")     # pydantic's prefix
    bound = {k: v for k, v in error.get("ctx", {}).items() if k in _BOUNDS and isinstance(v, (int, float))}
    if bound:      # pydantic writes float bounds in full: 340282346638528860000000000000000000000
        (key, value), = bound.items()
        message = f"Input should be {_BOUNDS[key]} {value:.7g}"
    return f"{_where(error.get('loc', ()))}: {_printable(message, 300)}"


def _count_refusal(scope: dict) -> None:
    """Count a /predict refused before the endpoint ran (schema error, undecodable or too large body)
    among the errors. Kept on the app, not in a global: Serve's ingress holds a pickled copy of `api`
    (with copies of whatever its handlers reference); the /metrics endpoint reads it back there."""
    app = scope.get("app")
    if app is not None and scope.get("path", "").endswith("/predict"):
        app.state.refused_predictions = getattr(app.state, "refused_predictions", 0) + 1


@api.exception_handler(RequestValidationError)
async def _refused(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default answer echoes every input (a whole batch) and can hold unencodable strings
    _count_refusal(request.scope)
    return JSONResponse({"detail": one_line(exc.errors(), exc.body)}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's 400 for a body it could not decode (not UTF-8, nested too deeply) says only "There was
    # an error parsing the body": name what was expected. Our own refusals are raised `from None`.
    if exc.status_code != 400 or exc.__cause__ is None:
        return await http_exception_handler(request, exc)
    _count_refusal(request.scope)
    return JSONResponse({"detail": f"body: expected a JSON object in UTF-8 ({type(exc.__cause__).__name__})"},
                        status_code=400)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None      # the HTTP server refuses a malformed one
    return None


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 with a JSON `detail`, and is never
    parsed. A declared Content-Length is checked before anything is read; a body streamed without one
    (chunked) is read only up to the limit. The app gets the body once it is known to fit (FastAPI
    reads a whole body before validating it anyway)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope.get("headers", []))
        messages = None if declared is not None and declared > self.limit else await self._read(receive)
        if messages is None:
            return await self._too_large(scope, receive, send)
        await self.app(scope, _replay(messages, receive), send)

    async def _read(self, receive) -> list[dict] | None:
        """The body's messages, or None once they pass the limit (the rest is never read)."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":       # the client left: the app learns it as usual
                return messages
            size += len(message.get("body", b""))
            if size > self.limit:
                return None
            if not message.get("more_body", False):
                return messages

    async def _too_large(self, scope, receive, send) -> None:
        _count_refusal(scope)
        detail = f"request body: larger than the limit of {self.limit} bytes ({self.limit / 2**20:g} MiB)"
        # close: the unread rest of the body must not be taken for the next request on this connection
        response = JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(messages: list[dict], receive):
    """A `receive` that hands out the messages already read, then reads on (a disconnect, later)."""
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()
    return replayed


api.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)


def batch(inputs: list, size: int) -> np.ndarray:
    """`inputs` (one flat input or a list of them, as the schema allows) as float32 rows of `size`
    numbers; anything else is a ValueError with one line naming the field and what was expected."""
    rows = inputs if inputs and isinstance(inputs[0], list) else [inputs]
    widths = sorted({len(r) for r in rows})
    if widths != [size]:       # checked before numpy sees ragged rows (it would refuse them with a 500)
        got = f"rows of {widths} numbers" if len(widths) > 1 else str(widths[0])
        raise ValueError(f"inputs: each input must have {size} numbers (the flattened model input), got {got}")
    x = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("inputs: numbers must be finite (no NaN or Infinity)")
    if np.abs(x).max() > FLOAT32_MAX:     # would become inf in float32
        raise ValueError(f"inputs: numbers must be within +-{FLOAT32_MAX:.4g} (the models compute in float32)")
    return x.astype(np.float32)


_DECIMAL = re.compile(r"0|[1-9][0-9]*")     # ASCII only: \d would take any script's digits


def personal_id(user_id: str | None) -> str | None:
    """The id of the user's personalized model, or None. Only the canonical ASCII decimal spelling
    selects one ("0", "42"; not "042", "+42", " 42", "٤٢" or "²", which `str.isdigit` or `int`
    accept), so that no other spelling reaches a model, least of all another user's. Any other id
    is an ordinary id: it still picks an A/B arm, and the ensemble answers it as it answers a user
    without a model (no error: ids are opaque to clients)."""
    return user_id if user_id is not None and _DECIMAL.fullmatch(user_id) else None


def _finite_answer(probs: np.ndarray) -> np.ndarray:
    """Finite inputs can still overflow a model (e.g. 1e38 times a weight): that is the inputs'
    fault, and a NaN could not be written as JSON."""
    if not np.isfinite(probs).all():
        raise HTTPException(422, "inputs: the model's output is not finite for these inputs (values too large)")
    return probs


# ---------------------------------------------------------------- member models
def _probabilities(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.tensor(x, dtype=torch.float32)), -1).numpy()   # a copy: x may be read-only


def _forward(model: torch.nn.Module, x: np.ndarray, shape: tuple) -> np.ndarray:
    """Probabilities for rows `x`, at most MAX_BATCH rows a forward pass: a batch of requests holds up
    to BATCH_REQUESTS x MAX_BATCH rows, and a convolutional model's activations grow with the rows."""
    x = x.reshape(-1, *shape)
    return np.concatenate([_probabilities(model, x[i:i + MAX_BATCH]) for i in range(0, len(x), MAX_BATCH)])


def _split(probs: np.ndarray, xs: list[np.ndarray]) -> list[np.ndarray]:
    """The answer to a batch of requests, back as one answer per request (`xs`: their inputs)."""
    return np.split(probs, np.cumsum([len(x) for x in xs])[:-1])


def member_info(checkpoint: str | Path, trust_code: bool = False) -> dict:
    """What the router needs to know about a member, from its model card alone (a custom model the
    card names is refused unless `trust_code`: sim/artifacts/usercode.py)."""
    _, card = load_model(Path(checkpoint), trust_code)
    quality = card.get("quality", {})
    if card.get("input_profile") is None:   # under DP a card ships it only once released (sim/run/card_stats.py)
        why = card.get("statistics_privacy", {}).get("input_profile", {}).get("reason", "not in the card")
        raise ValueError(f"{checkpoint}: the model card has no input_profile to route by ({why})")
    return {"profile": card["input_profile"], "input_shape": card["data_schema"]["input_shape"],
            "num_classes": card["data_schema"]["num_classes"],
            "reference_quality": float(quality.get("acc_global_DI", 0.5)), "card": card}


# Replicas leave as soon as their in-flight requests are done (checked every 0.2 s, at most 10 s):
# by then the routing no longer sends them anything.
SHUTDOWN = {"graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": 10.0}

# Batching. A member call costs ~5 ms of CPU in the member and ~1.5 ms in the ingress (Serve's
# routing, tracing, metrics and serialization; measured on a busy 2-core machine), a small model's
# forward pass a fraction of a ms: calls, not models, bound throughput, and an ensemble makes top_k
# calls where a single model makes one. So concurrent requests share calls: the ingress sends the
# inputs of all requests waiting for the ensemble in one call per member (`Coalesce`), and a member
# answers the calls that queued up meanwhile in one forward pass (`fedmeta.serve.batch`).
# At most BATCH_REQUESTS requests a call: more than are in flight at the bench's concurrency of 8,
# so one call can carry them all; more would buy little (the calls are already few) and hold more
# memory (BATCH_REQUESTS x MAX_BATCH rows, forwarded in slices of MAX_BATCH rows).
BATCH_REQUESTS = 16
# Nothing waits for company: a lone request goes at once (no latency added at low load) and the
# requests that arrive while a call is busy go together in the next. A timer does not batch at these
# rates: requests reach the ingress ~10-16 ms apart, and with a 2 ms window the ingress sent 1.1
# requests a call at concurrency 8; waiting for what is in flight, it sends ~3.
BATCH_WAIT_S = 0.0
# Member calls in flight per ingress replica and member. One makes the largest batches; with a member
# scaled to several replicas, more would let them work at once.
FAN_OUTS_IN_FLIGHT = 1


# max_ongoing_requests: at least a batch (Serve's default of 5 would cap batches at 5)
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2 * BATCH_REQUESTS, **SHUTDOWN)
class Member:
    """One ensemble member: a checkpoint's global model, rebuilt from its model card."""

    def __init__(self, name: str, checkpoint: str, trust_code: bool = False):
        torch.set_num_threads(1)
        self.name = name
        self.model, self.card = load_model(Path(checkpoint), trust_code)
        self.shape = tuple(self.card["data_schema"]["input_shape"])

    @serve.batch(max_batch_size=BATCH_REQUESTS, batch_wait_timeout_s=BATCH_WAIT_S)
    async def predict(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Called with one array of rows; Serve hands the calls that queued during the last forward
        pass over as a list (from several ingress replicas, shadow and A/B calls), answered with one."""
        return _split(_forward(self.model, np.concatenate(xs), self.shape), xs)


@serve.deployment(ray_actor_options={"num_cpus": 0}, **SHUTDOWN)
class PersonalModels:
    """Per-user personalized models (run_dir/personalized/<user id>.npy, the individual's adapted
    parameters) on the architecture of `checkpoint`, loaded on demand with model multiplexing: each
    replica keeps at most MAX_USER_MODELS users (least recently used evicted)."""

    def __init__(self, checkpoint: str, directory: str, trust_code: bool = False):
        torch.set_num_threads(1)
        self.base, self.card = load_model(Path(checkpoint), trust_code)
        self.directory = Path(directory)
        self.shape = tuple(self.card["data_schema"]["input_shape"])
        self.loads = 0

    def _path(self, user_id: str) -> Path:
        if personal_id(user_id) != user_id:       # never a path from another spelling of an id
            raise KeyError(f"user_id: {user_id!r} is not a canonical decimal id")
        return self.directory / f"{user_id}.npy"

    def known(self, user_id: str) -> bool:
        return personal_id(user_id) == user_id and self._path(user_id).is_file()

    @serve.multiplexed(max_num_models_per_replica=MAX_USER_MODELS)
    async def get_model(self, user_id: str) -> torch.nn.Module:
        import copy

        from fedmeta.sim.models import param_shapes, unflatten

        flat = torch.as_tensor(np.load(self._path(user_id)))
        model = copy.deepcopy(self.base)
        model.load_state_dict(unflatten(flat, param_shapes(model)))
        self.loads += 1
        return model.eval()

    def stats(self) -> dict:
        return {"loads": self.loads}

    async def predict(self, x: np.ndarray) -> np.ndarray:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return _probabilities(model, x.reshape(-1, *self.shape))


# What a push meets while ingress replicas stop: the actor is gone or unreachable, or Serve has no
# replica (left) to send to.
PUSH_TRANSIENT = (ray.exceptions.RayActorError, ray.serve.exceptions.DeploymentUnavailableError,
                  ray.serve.exceptions.ReplicaUnavailableError, ray.serve.exceptions.RequestCancelledError)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, **SHUTDOWN)
class Router:
    """The one replica holding the ensemble's routing state (serve/state.py) and its schedule."""

    def __init__(self, members: dict, settings: dict, app_name: str = "fedmeta", reweight_s: float = 2.0):
        self.state = RouterState(members, RouterSettings(**settings))
        self.app_name, self.reweight_s = app_name, reweight_s
        self._schedule: asyncio.Task | None = None

    def _ensure_schedule(self) -> None:
        if self.reweight_s > 0 and self._schedule is None:
            self._schedule = asyncio.get_running_loop().create_task(self._every())

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.reweight_s)
            await self.scheduled_push()

    async def scheduled_push(self) -> None:
        """One push of the schedule: no failure ends the schedule. Replicas going away (the app
        being deleted or scaled down) is expected and logged at debug level; the next push reaches
        the replicas that run then. Anything else is a bug and logged with its traceback."""
        try:
            await self.push()
        except PUSH_TRANSIENT as e:
            logger.debug("routing push skipped, replicas going away: %r", e)
        except Exception:  # noqa: BLE001 -- see the docstring: logged, and the schedule goes on
            logger.exception("routing push failed")

    async def push(self) -> dict:
        """Collect the replicas' buffered inputs and records, recompute, then push the routing
        state to every running ingress replica."""
        self._ensure_schedule()
        ingress = serve.get_deployment_handle("Ensemble", app_name=self.app_name)
        await ingress.broadcast("flush_now").results_async()
        routing = self.state.recompute()
        await self._broadcast(routing)
        return routing

    async def _broadcast(self, routing: dict) -> None:
        ingress = serve.get_deployment_handle("Ensemble", app_name=self.app_name)
        await ingress.broadcast("reconfigure", routing).results_async()

    async def observe(self, inputs: np.ndarray, records: list[tuple[str, dict]]) -> None:
        self._ensure_schedule()
        if len(inputs):
            self.state.observe(inputs)
        for request_id, entry in records:
            self.state.record(request_id, entry)

    async def feedback(self, request_id: str, labels: list[int], caller: str | None = None) -> dict:
        return self.state.feedback(request_id, np.asarray(labels), caller)

    async def start_trial(self, name: str, info: dict, mode: str, fraction: float, test_options: dict | None = None) -> dict:
        self.state.set_candidate(name, info["profile"], info["reference_quality"], mode, fraction, **(test_options or {}))
        routing = self.state.routing()
        await self._broadcast(routing)
        return routing

    async def routing(self) -> dict:
        self._ensure_schedule()
        return self.state.routing()

    async def promote(self, name: str) -> dict:
        routing = self.state.promote(name)
        await self._broadcast(routing)
        return routing

    async def snapshot(self) -> dict:
        return self.state.snapshot()

    async def take_inputs(self) -> np.ndarray:
        ingress = serve.get_deployment_handle("Ensemble", app_name=self.app_name)
        await ingress.broadcast("flush_now").results_async()     # what replicas still buffer
        return self.state.take_inputs()


class Coalesce:
    """`await coalesce(item)` from concurrent requests, answered by calls of `batch_call(items)` (one
    result per item, in order): while `limit` calls are in flight, new items wait and go together in
    the next one (at most `max_items`). No timer: a lone item goes at once, and batches grow with the
    load. A failed call fails each of its items with the same exception. (`fedmeta.serve.batch` forms a batch
    by a timer, not by what is in flight.)"""

    def __init__(self, batch_call, limit: int = FAN_OUTS_IN_FLIGHT, max_items: int = BATCH_REQUESTS):
        self.batch_call, self.limit, self.max_items = batch_call, limit, max_items
        self._waiting: list[tuple[object, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()       # referenced: the loop keeps only weak ones
        self.in_flight = 0
        self.calls = 0

    async def __call__(self, item):
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self.in_flight < self.limit:
            self._next()
        return await future

    def _next(self) -> None:
        batch, self._waiting = self._waiting[: self.max_items], self._waiting[self.max_items:]
        self.in_flight += 1
        self.calls += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[object, asyncio.Future]]) -> None:
        try:
            results = await self.batch_call([item for item, _ in batch])
            for (_, future), result in zip(batch, results):
                if not future.done():          # a cancelled request (the client left)
                    future.set_result(result)
        except asyncio.CancelledError:         # the replica is stopping
            for _, future in batch:
                future.cancel()
            raise
        except Exception as e:  # noqa: BLE001 -- handed to each waiting request, which raises it
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
        finally:
            self.in_flight -= 1
            if self._waiting:
                self._next()


# ---------------------------------------------------------------- ingress
# (module-level helpers the ingress uses are defined above it: `serve.ingress` captures the class
# when this module is imported)
def member_app_name(name: str, app: str = "fedmeta") -> str:
    return f"{app}-member-{name}"


def _reason(e: Exception) -> str:
    """What the router said, one line: Ray wraps the exception a replica raised (`cause`)."""
    cause = getattr(e, "cause", None) or e
    return _printable(cause.args[0] if cause.args else type(cause).__name__, 500)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, **SHUTDOWN)
@serve.ingress(api)
class Ensemble:
    def __init__(self, members: list[str], router, personal=None, input_size: int = 0, app_name: str = "fedmeta",
                 flush_every: int = 32, auth: dict | None = None, rate: tuple[float, float] | None = None):
        self._handles: dict = {}                # member name -> DeploymentHandle, looked up by app name
        # auth: token digest -> scopes (serve/auth.py); None: an open API, for tests and a trusted network
        self.auth = auth
        self.limit = RateLimit(*rate) if rate else RateLimit()
        self.router = router
        self.personal = personal
        self.input_size, self.app_name = input_size, app_name
        self.flush_every = flush_every
        self.routing: dict = {"weights": {}, "active": list(members), "top_k": 2, "candidate": None, "version": 0}
        self._inputs: list[np.ndarray] = []
        self._records: list[tuple[str, dict]] = []
        self._sending: set[asyncio.Task] = set()      # buffers on their way to the Router
        self._coalesce = Coalesce(self._fan_out)
        self.counters = {"requests": 0, "errors": 0, "personal": 0, "candidate": 0, "shadow": 0}
        self.latency_sum = 0.0

    def reconfigure(self, config: dict) -> None:
        """New routing state, broadcast by the Router to every running replica: applied in place."""
        if config:
            self.routing = config

    # ------------------------------------------------ helpers
    def member(self, name: str):
        if name not in self._handles:
            self._handles[name] = serve.get_deployment_handle("Member", app_name=member_app_name(name, self.app_name))
        return self._handles[name]

    async def _current(self) -> dict:
        if self.routing.get("version", 0) == 0:   # a replica started after the last push asks once
            self.routing = await self.router.routing.remote()
        return self.routing

    def _check(self, req: PredictRequest) -> np.ndarray:
        try:
            return batch(req.inputs, self.input_size)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    def _active_weights(self) -> dict[str, float]:
        r = self.routing
        weights = {m: w for m, w in r["weights"].items() if m in r["active"]}
        return weights or {m: 1.0 for m in r["active"]}

    async def _fan_out(self, xs: list[np.ndarray]) -> list[tuple[dict, int, dict[str, np.ndarray]]]:
        """The inputs of concurrent requests (`self._coalesce`), sent to each of the top-k members in
        one call (the members in parallel). Each request gets (weights, k, member -> its probabilities)."""
        weights = self._active_weights()
        top = sorted(weights, key=lambda m: (-weights[m], m))[: self.routing.get("top_k", 2)]
        x = np.concatenate(xs)
        outs = await asyncio.gather(*(self.member(m).predict.remote(x) for m in top))
        per_member = [_split(p, xs) for p in outs]
        return [(weights, len(top), {m: parts[i] for m, parts in zip(top, per_member)}) for i in range(len(xs))]

    async def _ensemble(self, x: np.ndarray) -> tuple[np.ndarray, list[tuple[str, float]], dict]:
        weights, k, outs = await self._coalesce(x)
        probs = {m: _finite_answer(p) for m, p in outs.items()}      # `combine` refuses NaN
        answer, used = combine(probs, weights, k)
        return answer, used, {m: p.argmax(-1).tolist() for m, p in probs.items()}

    async def flush_now(self) -> None:
        await self._flush(force=True)

    async def _flush(self, force: bool = False) -> None:
        """Send the buffered inputs and records to the Router: in the background when the buffer is
        full (no request waits for it), and waited for (with all sends still on their way) when
        forced: feedback and the Router's push must find every answered request there."""
        if self._records and (force or len(self._records) >= self.flush_every):
            inputs, records = np.concatenate(self._inputs), self._records
            self._inputs, self._records = [], []
            task = asyncio.get_running_loop().create_task(self._observe(inputs, records))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        if force and self._sending:
            await asyncio.gather(*self._sending)

    async def _observe(self, inputs: np.ndarray, records: list[tuple[str, dict]]) -> None:
        try:
            await self.router.observe.remote(inputs, records)
        except Exception:  # noqa: BLE001 -- a lost batch of log entries must not fail a request
            logger.exception("sending %d request records to the router failed", len(records))

    # ------------------------------------------------ endpoints
    def _caller(self, request: Request, scope: str) -> Caller:
        """The authenticated caller with `scope`: 401 without a known bearer token, 403 without the
        scope, 429 past the token's rate."""
        if self.auth is None:
            return Caller("open", frozenset({"predict", "personal", "feedback", "operator"}))
        caller = authenticate(request.headers.get("authorization"), self.auth)
        if caller is None:
            self.counters["unauthorized"] = self.counters.get("unauthorized", 0) + 1
            raise HTTPException(401, "authorization: a bearer token is required (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        if not caller.may(scope):
            raise HTTPException(403, f"authorization: this token lacks the {scope!r} scope")
        if not self.limit.allow(caller.id):
            self.counters["rate_limited"] = self.counters.get("rate_limited", 0) + 1
            raise HTTPException(429, "rate limit: too many requests for this token; retry later")
        return caller

    async def _answer(self, x: np.ndarray, user_id: str | None, request_id: str, personal: bool = True) -> tuple:
        """Who answers and what: (probabilities, members used with weights, each member's labels, the
        arm, the log entry for feedback). A user's personalized model, else the candidate for users in
        its A/B arm, else the ensemble (with the candidate in the shadow for a fraction of requests)."""
        cand = (await self._current()).get("candidate")
        entry = {"trial": None, "candidate": None}
        uid = personal_id(user_id) if personal else None     # without the scope: never a user's model
        # `known` first, in its own call: routing an id without a model by multiplexed_model_id would
        # leave the id in Serve's routing table for good (a table as large as the ids clients make up)
        if uid is not None and self.personal is not None and await self.personal.known.remote(uid):
            probs = await self.personal.options(multiplexed_model_id=uid).predict.remote(x)
            return probs, [("personal", 1.0)], {}, "personal", entry
        ab = cand and cand["mode"] == "ab" and user_id is not None
        if ab and ab_arm(user_id, cand["fraction"], cand["salt"]) == "candidate":
            entry["trial"] = cand["name"]
            return await self.member(cand["name"]).predict.remote(x), [(cand["name"], 1.0)], {}, "candidate", entry
        shadow = cand and cand["mode"] == "shadow" and in_shadow(request_id, cand["fraction"], cand["salt"])
        if shadow:   # the candidate answers the same inputs; its answer is logged, never returned
            shadow_ref = self.member(cand["name"]).predict.remote(x)
        probs, used, member_preds = await self._ensemble(x)
        if shadow:
            entry.update(trial=cand["name"], candidate=(await shadow_ref).argmax(-1).tolist())
        elif ab:
            entry["trial"] = cand["name"]          # the production arm of the A/B test
        return probs, used, member_preds, "ensemble", entry

    @api.post("/predict", response_model=PredictResponse)
    async def predict(self, req: PredictRequest, request: Request) -> PredictResponse:
        caller = self._caller(request, "predict")
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        try:
            x = self._check(req)
            probs, used, member_preds, answered_by, entry = await self._answer(x, req.user_id, request_id,
                                                                                caller.may("personal"))
            _finite_answer(probs)
        except HTTPException:
            self.counters["errors"] += 1
            raise
        preds = probs.argmax(-1)
        entry.update(members=member_preds, answer=preds.tolist(), arm=answered_by)
        self._inputs.append(x)
        self._records.append((request_id, entry))
        await self._flush()
        self.counters["requests"] += 1
        self.counters[answered_by] = self.counters.get(answered_by, 0) + 1
        self.counters["shadow"] += entry["candidate"] is not None
        self.latency_sum += time.perf_counter() - t0
        return PredictResponse(request_id=request_id, predictions=preds.tolist(), probabilities=probs.tolist(),
                               members=[MemberWeight(name=m, weight=w) for m, w in used], answered_by=answered_by)

    @api.post("/feedback")
    async def feedback(self, req: FeedbackRequest, request: Request) -> dict:
        """Score a request's answer against its true labels. A wrong label count is refused (422) and
        the request stays open for a corrected retry; an unknown or expired request id is a 404."""
        caller = self._caller(request, "feedback")
        await self._flush(force=True)      # the request may still sit in this replica's buffer
        try:
            # per token: one token's labels steer at most its share (RouterSettings.feedback_share)
            return await self.router.feedback.remote(req.request_id, req.labels,
                                                     None if self.auth is None else caller.id)
        except KeyError as e:      # Ray's wrapper of the router's error is also an instance of it
            raise HTTPException(404, _reason(e)) from None
        except ValueError as e:
            raise HTTPException(422, _reason(e)) from None

    @api.get("/routing")
    async def routing_weights(self, request: Request) -> dict:
        self._caller(request, "operator")
        snap = await self.router.snapshot.remote()
        return {"pushed_version": self.routing.get("version", 0), **snap}

    @api.get("/members")
    async def list_members(self, request: Request) -> dict:
        self._caller(request, "operator")
        snap = await self.router.snapshot.remote()
        return {"active": snap["active"], "weights": snap["weights"], "pruned": snap["pruned"],
                "trial": snap["trial"], "history": snap["history"]}

    @api.get("/health")
    async def health(self) -> dict:
        routing = await self._current()
        return {"status": "ok", "members": len(self._active_weights()), "version": routing.get("version", 0)}

    @api.post("/promote")
    async def promote(self, req: PromoteRequest, request: Request) -> dict:
        """An operator promotes the candidate whose trial decided for it (serve.auto_promote off)."""
        self._caller(request, "operator")
        try:
            routing = await self.router.promote.remote(req.name)
        except ValueError as e:
            raise HTTPException(409, _reason(e)) from None
        return {"promoted": req.name, "active": routing["active"], "version": routing["version"]}

    @api.get("/openapi.json")
    async def openapi_schema(self, request: Request) -> dict:
        self._caller(request, "operator")
        return api.openapi()

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self, request: Request) -> str:
        self._caller(request, "operator")
        refused = getattr(request.app.state, "refused_predictions", 0)     # before `predict` ran
        # ensemble_batches: member fan-outs (one call per member each); requests / batches = batch size
        counts = {**self.counters, "errors": self.counters["errors"] + refused, "ensemble_batches": self._coalesce.calls}
        lines = [f"# TYPE fedmeta_{k}_total counter\nfedmeta_{k}_total {v}" for k, v in counts.items()]
        mean = self.latency_sum / max(self.counters["requests"], 1)
        lines.append(f"# TYPE fedmeta_latency_seconds_mean gauge\nfedmeta_latency_seconds_mean {mean:.6f}")
        for m, w in self._active_weights().items():
            lines.append(f'fedmeta_routing_weight{{member="{m}"}} {w:.6f}')
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- building the apps
def member_app(name: str, checkpoint: str, trust_code: bool = False) -> serve.Application:
    return Member.bind(name, str(checkpoint), trust_code)


def _router_entry(info: dict) -> dict:
    return {"profile": info["profile"], "reference_quality": info["reference_quality"]}


def ensemble_app(members: dict[str, str], personalized: str | None = None, settings: dict | None = None,
                 reweight_s: float = 2.0, app_name: str = "fedmeta", trust_code: bool = False,
                 auth: dict | None = None) -> serve.Application:
    """The ingress application for members (name -> checkpoint) deployed as their own apps."""
    infos = {name: member_info(path, trust_code) for name, path in members.items()}
    shapes = {tuple(i["input_shape"]) for i in infos.values()}
    classes = {i["num_classes"] for i in infos.values()}
    if len(shapes) != 1 or len(classes) != 1:
        raise ValueError(f"members: every member must share one input shape and class count, got shapes "
                         f"{sorted(shapes)} and classes {sorted(classes)}")
    router = Router.bind({n: _router_entry(i) for n, i in infos.items()}, settings or {}, app_name, reweight_s)
    personal = None
    if personalized:
        personal = PersonalModels.bind(str(personalized), str(Path(personalized) / "personalized"), trust_code)
    return Ensemble.bind(list(members), router, personal, math.prod(shapes.pop()), app_name, auth=auth)


def member_builder(args: dict) -> serve.Application:
    """For Serve config files: `import_path: serve.app:member_builder`, args {name, checkpoint,
    trust_code}."""
    return member_app(args["name"], args["checkpoint"], args.get("trust_code") is True)


def ensemble_builder(args: dict) -> serve.Application:
    """For Serve config files: `import_path: serve.app:ensemble_builder`, args {members: {name:
    checkpoint}, personalized, settings, reweight_s, app_name, trust_code}."""
    return ensemble_app(dict(args["members"]), args.get("personalized"), args.get("settings"),
                        float(args.get("reweight_s", 2.0)), args.get("app_name", "fedmeta"),
                        args.get("trust_code") is True, args.get("auth"))


@dataclass
class Deployment:
    """Deploys and maintains the ensemble from the driver (what `fedmeta serve` runs)."""

    members: dict[str, str]                               # name -> checkpoint (run dir)
    personalized: str | None = None
    settings: dict = field(default_factory=dict)          # RouterSettings fields
    reweight_s: float = 2.0
    app_name: str = "fedmeta"
    candidates: dict[str, str] = field(default_factory=dict)
    # Serve's LoggingConfig of every replica, e.g. {"enable_access_log": False}: an access-log line
    # per request and replica is written, tailed and shipped to the driver (~1 ms of CPU a request)
    logging_config: dict | None = None
    trust_code: bool = False      # custom models named by the members' cards may be imported (--trust-code)
    auth: dict | None = None      # token digest -> scopes (serve/auth.py); None: an open API

    def _run(self, app: serve.Application, name: str, route_prefix: str | None) -> None:
        serve.run(app, name=name, route_prefix=route_prefix, logging_config=self.logging_config)

    def deploy(self) -> None:
        for name, path in self.members.items():
            self._run(member_app(name, path, self.trust_code), member_app_name(name, self.app_name), None)
        self._run(ensemble_app(self.members, self.personalized, self.settings, self.reweight_s, self.app_name,
                               self.trust_code, self.auth), self.app_name, "/")

    def router(self):
        return serve.get_deployment_handle("Router", app_name=self.app_name)

    def add_candidate(self, name: str, checkpoint: str, mode: str, fraction: float, **test_options) -> dict:
        """Deploy a candidate as its own app and start its trial (shadow or A/B); `test_options` go to
        the sequential test (e.g. max_pairs=200 to bound how long a trial can run)."""
        if name in self.members or name in self.candidates:
            raise ValueError(f"name: {name!r} is already deployed")
        info = member_info(checkpoint, self.trust_code)
        self._run(member_app(name, checkpoint, self.trust_code), member_app_name(name, self.app_name), None)
        self.candidates[name] = str(checkpoint)
        return self.router().start_trial.remote(name, _router_entry(info), mode, fraction, test_options).result()

    def promote(self, name: str) -> dict:
        """The operator's promotion of the candidate its trial decided for (auto_promote off)."""
        routing = self.router().promote.remote(name).result()
        return {**routing, "released": self.collect()}

    def push(self) -> dict:
        """One scheduled step now (recompute + push), then release what the router dropped."""
        routing = self.router().push.remote().result()
        return {**routing, "released": self.collect()}

    def collect(self) -> list[str]:
        """Delete the apps of pruned members and rejected candidates (releasing their replicas);
        a promoted candidate becomes a member."""
        snap = self.router().snapshot.remote().result()
        released = []
        for event in snap["history"]:
            name = event["member"]
            if event["event"] == "promoted" and name in self.candidates:
                self.members[name] = self.candidates.pop(name)
            elif event["event"] == "rejected" and name in self.candidates:
                self.candidates.pop(name)
                released.append(name)
        for name in snap["pruned"]:
            if self.members.pop(name, None) is not None:
                released.append(name)
        for name in released:
            serve.delete(member_app_name(name, self.app_name))
        return released

    def config(self, host: str = "127.0.0.1", port: int = 8000) -> dict:
        """A Serve config file for `serve deploy` / `serve run` (members as their own applications)."""
        logging = {"logging_config": self.logging_config} if self.logging_config else {}
        apps = [{"name": member_app_name(n, self.app_name), "route_prefix": None, "import_path": "fedmeta.serve.app:member_builder",
                 "args": {"name": n, "checkpoint": str(p), "trust_code": self.trust_code}, **logging}
                for n, p in self.members.items()]
        apps.append({"name": self.app_name, "route_prefix": "/", "import_path": "fedmeta.serve.app:ensemble_builder",
                     "args": {"members": dict(self.members), "personalized": self.personalized,
                              "settings": self.settings, "reweight_s": self.reweight_s, "app_name": self.app_name,
                              "trust_code": self.trust_code, "auth": self.auth},
                     **logging})
        return {"http_options": {"host": host, "port": port}, "applications": apps}
