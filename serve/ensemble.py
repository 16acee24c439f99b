"""The ingress: the FastAPI app `api` and the `Ensemble` deployment that serves it, and
`ensemble_app`, which binds it to its `Router` and `PersonalModels`. A request's inputs go to the
top-k active members by routing weight (in parallel; concurrent requests share the calls, `Coalesce`)
and the answer is their weighted average (serve/routing.py `combine`); a user's personalized model
answers instead where one exists, and a candidate under test answers a stable fraction of requests
as shadow or as an A/B arm. What answered reaches the Router in batches, off the request's path.
Every endpoint but /health checks the caller's bearer token and scope (serve/auth.py).
"""

# No `from __future__ import annotations`: FastAPI must see the request models as real classes
# on the ingress methods (Serve rebinds them), not as strings.
import asyncio
import logging
import math
import time
import uuid
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse
from ray import serve

from fedmeta.serve.auth import Caller, RateLimit, authenticate
from fedmeta.serve.batching import SHUTDOWN, Coalesce, split_answers
from fedmeta.serve.members import PersonalModels, member_app_name, member_info
from fedmeta.serve.router import Router, router_entry
from fedmeta.serve.routing import combine
from fedmeta.serve.schemas import (
    FeedbackRequest,
    MemberWeight,
    PredictRequest,
    PredictResponse,
    PromoteRequest,
    batch,
    finite_answer,
    guard,
    personal_id,
    replica_reason,
)
from fedmeta.serve.shadow import ab_arm, in_shadow

logger = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's log file
# no open docs: the schema is served to operators only (/openapi.json below)
api = FastAPI(title="fedmeta ensemble", docs_url=None, redoc_url=None, openapi_url=None)
guard(api)  # one-line 4xx refusals and the body limit (serve/schemas.py)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, **SHUTDOWN)
@serve.ingress(api)
class Ensemble:
    def __init__(
        self,
        members: list[str],
        router,
        personal=None,
        input_size: int = 0,
        app_name: str = "fedmeta",
        flush_every: int = 32,
        auth: dict | None = None,
        rate: tuple[float, float] | None = None,
    ):
        self._handles: dict = {}  # member name -> DeploymentHandle, looked up by app name
        # auth: token digest -> scopes (serve/auth.py); None: an open API, for tests and a trusted network
        self.auth = auth
        self.limit = RateLimit(*rate) if rate else RateLimit()
        self.router = router
        self.personal = personal
        self.input_size, self.app_name = input_size, app_name
        self.flush_every = flush_every
        self.routing: dict = {
            "weights": {},
            "active": list(members),
            "top_k": 2,
            "candidate": None,
            "version": 0,
        }
        self._inputs: list[np.ndarray] = []
        self._records: list[tuple[str, dict]] = []
        self._sending: set[asyncio.Task] = set()  # buffers on their way to the Router
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
            self._handles[name] = serve.get_deployment_handle(
                "Member", app_name=member_app_name(name, self.app_name)
            )
        return self._handles[name]

    async def _current(self) -> dict:
        if self.routing.get("version", 0) == 0:  # a replica started after the last push asks once
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
        per_member = [split_answers(p, xs) for p in outs]
        return [
            (weights, len(top), {m: parts[i] for m, parts in zip(top, per_member)}) for i in range(len(xs))
        ]

    async def _ensemble(self, x: np.ndarray) -> tuple[np.ndarray, list[tuple[str, float]], dict]:
        weights, k, outs = await self._coalesce(x)
        probs = {m: finite_answer(p) for m, p in outs.items()}  # `combine` refuses NaN
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
            raise HTTPException(
                401,
                "authorization: a bearer token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not caller.may(scope):
            raise HTTPException(403, f"authorization: this token lacks the {scope!r} scope")
        if not self.limit.allow(caller.id):
            self.counters["rate_limited"] = self.counters.get("rate_limited", 0) + 1
            raise HTTPException(429, "rate limit: too many requests for this token; retry later")
        return caller

    async def _answer(
        self, x: np.ndarray, user_id: str | None, request_id: str, personal: bool = True
    ) -> tuple:
        """Who answers and what: (probabilities, members used with weights, each member's labels, the
        arm, the log entry for feedback). A user's personalized model, else the candidate for users in
        its A/B arm, else the ensemble (with the candidate in the shadow for a fraction of requests)."""
        cand = (await self._current()).get("candidate")
        entry = {"trial": None, "candidate": None}
        uid = personal_id(user_id) if personal else None  # without the scope: never a user's model
        # `known` first, in its own call: routing an id without a model by multiplexed_model_id would
        # leave the id in Serve's routing table for good (a table as large as the ids clients make up)
        if uid is not None and self.personal is not None and await self.personal.known.remote(uid):
            probs = await self.personal.options(multiplexed_model_id=uid).predict.remote(x)
            return probs, [("personal", 1.0)], {}, "personal", entry
        ab = cand and cand["mode"] == "ab" and user_id is not None
        if ab and ab_arm(user_id, cand["fraction"], cand["salt"]) == "candidate":
            entry["trial"] = cand["name"]
            return (
                await self.member(cand["name"]).predict.remote(x),
                [(cand["name"], 1.0)],
                {},
                "candidate",
                entry,
            )
        shadow = cand and cand["mode"] == "shadow" and in_shadow(request_id, cand["fraction"], cand["salt"])
        if shadow:  # the candidate answers the same inputs; its answer is logged, never returned
            shadow_ref = self.member(cand["name"]).predict.remote(x)
        probs, used, member_preds = await self._ensemble(x)
        if shadow:
            entry.update(trial=cand["name"], candidate=(await shadow_ref).argmax(-1).tolist())
        elif ab:
            entry["trial"] = cand["name"]  # the production arm of the A/B test
        return probs, used, member_preds, "ensemble", entry

    @api.post("/predict", response_model=PredictResponse)
    async def predict(self, req: PredictRequest, request: Request) -> PredictResponse:
        caller = self._caller(request, "predict")
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        try:
            x = self._check(req)
            probs, used, member_preds, answered_by, entry = await self._answer(
                x, req.user_id, request_id, caller.may("personal")
            )
            finite_answer(probs)
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
        return PredictResponse(
            request_id=request_id,
            predictions=preds.tolist(),
            probabilities=probs.tolist(),
            members=[MemberWeight(name=m, weight=w) for m, w in used],
            answered_by=answered_by,
        )

    @api.post("/feedback")
    async def feedback(self, req: FeedbackRequest, request: Request) -> dict:
        """Score a request's answer against its true labels. A wrong label count is refused (422) and
        the request stays open for a corrected retry; an unknown or expired request id is a 404."""
        caller = self._caller(request, "feedback")
        await self._flush(force=True)  # the request may still sit in this replica's buffer
        try:
            # per token: one token's labels steer at most its share (RouterSettings.feedback_share)
            return await self.router.feedback.remote(
                req.request_id, req.labels, None if self.auth is None else caller.id
            )
        except KeyError as e:  # Ray's wrapper of the router's error is also an instance of it
            raise HTTPException(404, replica_reason(e)) from None
        except ValueError as e:
            raise HTTPException(422, replica_reason(e)) from None

    @api.get("/routing")
    async def routing_weights(self, request: Request) -> dict:
        self._caller(request, "operator")
        snap = await self.router.snapshot.remote()
        return {"pushed_version": self.routing.get("version", 0), **snap}

    @api.get("/members")
    async def list_members(self, request: Request) -> dict:
        self._caller(request, "operator")
        snap = await self.router.snapshot.remote()
        return {
            "active": snap["active"],
            "weights": snap["weights"],
            "pruned": snap["pruned"],
            "trial": snap["trial"],
            "history": snap["history"],
        }

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
            raise HTTPException(409, replica_reason(e)) from None
        return {"promoted": req.name, "active": routing["active"], "version": routing["version"]}

    @api.get("/openapi.json")
    async def openapi_schema(self, request: Request) -> dict:
        self._caller(request, "operator")
        return api.openapi()

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self, request: Request) -> str:
        self._caller(request, "operator")
        refused = getattr(request.app.state, "refused_predictions", 0)  # before `predict` ran
        # ensemble_batches: member fan-outs (one call per member each); requests / batches = batch size
        counts = {
            **self.counters,
            "errors": self.counters["errors"] + refused,
            "ensemble_batches": self._coalesce.calls,
        }
        lines = [f"# TYPE fedmeta_{k}_total counter\nfedmeta_{k}_total {v}" for k, v in counts.items()]
        mean = self.latency_sum / max(self.counters["requests"], 1)
        lines.append(f"# TYPE fedmeta_latency_seconds_mean gauge\nfedmeta_latency_seconds_mean {mean:.6f}")
        for m, w in self._active_weights().items():
            lines.append(f'fedmeta_routing_weight{{member="{m}"}} {w:.6f}')
        return "\n".join(lines) + "\n"


def ensemble_app(
    members: dict[str, str],
    personalized: str | None = None,
    settings: dict | None = None,
    reweight_s: float = 2.0,
    app_name: str = "fedmeta",
    trust_code: bool = False,
    auth: dict | None = None,
) -> serve.Application:
    """The ingress application for members (name -> checkpoint) deployed as their own apps."""
    infos = {name: member_info(path, trust_code) for name, path in members.items()}
    shapes = {tuple(i["input_shape"]) for i in infos.values()}
    classes = {i["num_classes"] for i in infos.values()}
    if len(shapes) != 1 or len(classes) != 1:
        raise ValueError(
            f"members: every member must share one input shape and class count, got shapes "
            f"{sorted(shapes)} and classes {sorted(classes)}"
        )
    router = Router.bind({n: router_entry(i) for n, i in infos.items()}, settings or {}, app_name, reweight_s)
    personal = None
    if personalized:
        personal = PersonalModels.bind(
            str(personalized), str(Path(personalized) / "personalized"), trust_code
        )
    return Ensemble.bind(list(members), router, personal, math.prod(shapes.pop()), app_name, auth=auth)
