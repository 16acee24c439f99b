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
With a user id whose personalized model exists, that model answers instead. A candidate under test
answers a stable fraction of requests as *shadow* (logged and scored, never returned) or as an
*A/B arm* (by hashing the user id). Inputs and what answered reach the Router in batches; labelled
feedback (`/feedback`) is scored there. The Router recomputes weights every `reweight_s` seconds
and pushes the routing state to every running ingress replica's `reconfigure` (a broadcast: no
redeploy, no restart); replicas that start later pull it on their first request.
"""
# No `from __future__ import annotations`: FastAPI must see the request models as real classes
# on the ingress methods (Serve rebinds them), not as strings.
import asyncio
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serve.routing import combine
from serve.shadow import ab_arm, in_shadow
from serve.state import RouterSettings, RouterState
from sim.checkpoint import load_model

api = FastAPI(title="fedmeta ensemble")
MAX_USER_MODELS = 8        # personalized models kept per PersonalModels replica (LRU)


# ---------------------------------------------------------------- schemas
class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[list[float]] | list[float] = Field(
        min_length=1, max_length=1024,
        description="one input (a flat list) or a batch of inputs, each flattened to the model's input size")
    user_id: str | None = Field(None, min_length=1, max_length=128)


class MemberWeight(BaseModel):
    name: str
    weight: float


class PredictResponse(BaseModel):
    request_id: str
    predictions: list[int]
    probabilities: list[list[float]]
    members: list[MemberWeight]
    answered_by: str = Field(description="ensemble | candidate | personal")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=64)
    labels: list[int] = Field(min_length=1, max_length=1024)


class CandidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    mode: str = Field(pattern="^(shadow|ab)$")
    fraction: float = Field(gt=0, le=1)


# ---------------------------------------------------------------- member models
def _probabilities(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.tensor(x, dtype=torch.float32)), -1).numpy()   # a copy: x may be read-only


def member_info(checkpoint: str | Path) -> dict:
    """What the router needs to know about a member, from its model card alone."""
    _, card = load_model(Path(checkpoint))
    quality = card.get("quality", {})
    return {"profile": card["input_profile"], "input_shape": card["data_schema"]["input_shape"],
            "num_classes": card["data_schema"]["num_classes"],
            "reference_quality": float(quality.get("acc_global_DI", 0.5)), "card": card}


# Replicas leave as soon as their in-flight requests are done (checked every 0.2 s, at most 10 s):
# by then the routing no longer sends them anything.
SHUTDOWN = {"graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": 10.0}


@serve.deployment(ray_actor_options={"num_cpus": 0}, **SHUTDOWN)
class Member:
    """One ensemble member: a checkpoint's global model, rebuilt from its model card."""

    def __init__(self, name: str, checkpoint: str):
        torch.set_num_threads(1)
        self.name = name
        self.model, self.card = load_model(Path(checkpoint))
        self.shape = tuple(self.card["data_schema"]["input_shape"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return _probabilities(self.model, x.reshape(-1, *self.shape))


@serve.deployment(ray_actor_options={"num_cpus": 0}, **SHUTDOWN)
class PersonalModels:
    """Per-user personalized models (run_dir/personalized/<user id>.npy, the individual's adapted
    parameters) on the architecture of `checkpoint`, loaded on demand with model multiplexing: each
    replica keeps at most MAX_USER_MODELS users (least recently used evicted)."""

    def __init__(self, checkpoint: str, directory: str):
        torch.set_num_threads(1)
        self.base, self.card = load_model(Path(checkpoint))
        self.directory = Path(directory)
        self.shape = tuple(self.card["data_schema"]["input_shape"])
        self.loads = 0

    def known(self, user_id: str) -> bool:
        return user_id.isdigit() and (self.directory / f"{int(user_id)}.npy").is_file()

    @serve.multiplexed(max_num_models_per_replica=MAX_USER_MODELS)
    async def get_model(self, user_id: str) -> torch.nn.Module:
        import copy

        from sim.models import param_shapes, unflatten

        flat = torch.as_tensor(np.load(self.directory / f"{int(user_id)}.npy"))
        model = copy.deepcopy(self.base)
        model.load_state_dict(unflatten(flat, param_shapes(model)))
        self.loads += 1
        return model.eval()

    def stats(self) -> dict:
        return {"loads": self.loads}

    async def predict(self, x: np.ndarray) -> np.ndarray:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return _probabilities(model, x.reshape(-1, *self.shape))


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
            try:
                await self.push()
            except Exception as e:  # noqa: BLE001 -- a failed push must not end the schedule (e.g. the app is being deleted)
                if "Unavailable" not in type(e).__name__:
                    print(f"routing push failed: {e!r}")

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

    async def feedback(self, request_id: str, labels: list[int]) -> dict:
        return self.state.feedback(request_id, np.asarray(labels))

    async def start_trial(self, name: str, info: dict, mode: str, fraction: float, test_options: dict | None = None) -> dict:
        self.state.set_candidate(name, info["profile"], info["reference_quality"], mode, fraction, **(test_options or {}))
        routing = self.state.routing()
        await self._broadcast(routing)
        return routing

    async def routing(self) -> dict:
        self._ensure_schedule()
        return self.state.routing()

    async def snapshot(self) -> dict:
        return self.state.snapshot()

    async def take_inputs(self) -> np.ndarray:
        ingress = serve.get_deployment_handle("Ensemble", app_name=self.app_name)
        await ingress.broadcast("flush_now").results_async()     # what replicas still buffer
        return self.state.take_inputs()


# ---------------------------------------------------------------- ingress
# (module-level helpers the ingress uses are defined above it: `serve.ingress` captures the class
# when this module is imported)
def member_app_name(name: str, app: str = "fedmeta") -> str:
    return f"{app}-member-{name}"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    for line in reversed(text):      # Ray wraps the cause; its message is the last line
        if line.strip():
            return line.strip()[:500]
    return type(e).__name__


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, **SHUTDOWN)
@serve.ingress(api)
class Ensemble:
    def __init__(self, members: list[str], router, personal=None, input_size: int = 0, app_name: str = "fedmeta",
                 flush_every: int = 32):
        self._handles: dict = {}                # member name -> DeploymentHandle, looked up by app name
        self.router = router
        self.personal = personal
        self.input_size, self.app_name = input_size, app_name
        self.flush_every = flush_every
        self.routing: dict = {"weights": {}, "active": list(members), "top_k": 2, "candidate": None, "version": 0}
        self._inputs: list[np.ndarray] = []
        self._records: list[tuple[str, dict]] = []
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
        rows = req.inputs
        if isinstance(rows[0], list) and len({len(r) for r in rows}) > 1:   # ragged: no array to make
            raise HTTPException(422, f"inputs: each input must have {self.input_size} numbers (the flattened "
                                     f"model input), got rows of {sorted({len(r) for r in rows})} numbers")
        x = np.asarray(rows, dtype=np.float32)
        if x.ndim == 1 and len(x) == self.input_size:     # a single input
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise HTTPException(422, f"inputs: each input must have {self.input_size} numbers "
                                     f"(the flattened model input), got {x.shape[1] if x.ndim == 2 else 'ragged rows'}")
        if not np.isfinite(x).all():
            raise HTTPException(422, "inputs: contains NaN or infinite values")
        return x

    def _active_weights(self) -> dict[str, float]:
        r = self.routing
        weights = {m: w for m, w in r["weights"].items() if m in r["active"]}
        return weights or {m: 1.0 for m in r["active"]}

    async def _ensemble(self, x: np.ndarray) -> tuple[np.ndarray, list[tuple[str, float]], dict]:
        weights = self._active_weights()
        top = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))[: self.routing.get("top_k", 2)]
        outs = await asyncio.gather(*(self.member(m).predict.remote(x) for m, _ in top))
        probs = dict(zip([m for m, _ in top], outs))
        answer, used = combine(probs, weights, len(top))
        return answer, used, {m: p.argmax(-1).tolist() for m, p in probs.items()}

    async def flush_now(self) -> None:
        await self._flush(force=True)

    async def _flush(self, force: bool = False) -> None:
        if self._records and (force or len(self._records) >= self.flush_every):
            inputs, records = np.concatenate(self._inputs), self._records
            self._inputs, self._records = [], []
            await self.router.observe.remote(inputs, records)

    # ------------------------------------------------ endpoints
    @api.post("/predict", response_model=PredictResponse)
    async def predict(self, req: PredictRequest) -> PredictResponse:
        t0 = time.perf_counter()
        try:
            x = self._check(req)
        except HTTPException:
            self.counters["errors"] += 1
            raise
        request_id = uuid.uuid4().hex
        cand = (await self._current()).get("candidate")
        answered_by, entry = "ensemble", {"trial": None, "candidate": None}
        if req.user_id is not None and self.personal is not None and await self.personal.known.remote(req.user_id):
            probs = await self.personal.options(multiplexed_model_id=req.user_id).predict.remote(x)
            used, member_preds, answered_by = [("personal", 1.0)], {}, "personal"
        elif cand and cand["mode"] == "ab" and req.user_id is not None \
                and ab_arm(req.user_id, cand["fraction"], cand["salt"]) == "candidate":
            probs = await self.member(cand["name"]).predict.remote(x)
            used, member_preds, answered_by = [(cand["name"], 1.0)], {}, "candidate"
            entry["trial"] = cand["name"]
        else:
            shadow = cand and cand["mode"] == "shadow" and in_shadow(request_id, cand["fraction"], cand["salt"])
            if shadow:   # the candidate answers the same inputs; its answer is logged, never returned
                shadow_ref = self.member(cand["name"]).predict.remote(x)
            probs, used, member_preds = await self._ensemble(x)
            if shadow:
                entry.update(trial=cand["name"], candidate=(await shadow_ref).argmax(-1).tolist())
                self.counters["shadow"] += 1
            elif cand and cand["mode"] == "ab" and req.user_id is not None:
                entry["trial"] = cand["name"]          # the production arm of the A/B test
        preds = probs.argmax(-1)
        entry.update(members=member_preds, answer=preds.tolist(), arm=answered_by)
        self._inputs.append(x)
        self._records.append((request_id, entry))
        await self._flush()
        self.counters["requests"] += 1
        self.counters[answered_by] = self.counters.get(answered_by, 0) + 1
        self.latency_sum += time.perf_counter() - t0
        return PredictResponse(request_id=request_id, predictions=preds.tolist(), probabilities=probs.tolist(),
                               members=[MemberWeight(name=m, weight=w) for m, w in used], answered_by=answered_by)

    @api.post("/feedback")
    async def feedback(self, req: FeedbackRequest) -> dict:
        await self._flush(force=True)      # the request may still sit in this replica's buffer
        try:
            return await self.router.feedback.remote(req.request_id, req.labels)
        except Exception as e:  # noqa: BLE001 -- Ray wraps the cause; the router refuses only bad input: an unknown id, a wrong label count
            message = _first_line(e)
            raise HTTPException(404 if "unknown" in message else 422, message) from None

    @api.get("/routing")
    async def routing_weights(self) -> dict:
        snap = await self.router.snapshot.remote()
        return {"pushed_version": self.routing.get("version", 0), **snap}

    @api.get("/members")
    async def list_members(self) -> dict:
        snap = await self.router.snapshot.remote()
        return {"active": snap["active"], "weights": snap["weights"], "pruned": snap["pruned"],
                "trial": snap["trial"], "history": snap["history"]}

    @api.get("/health")
    async def health(self) -> dict:
        routing = await self._current()
        return {"status": "ok", "members": len(self._active_weights()), "version": routing.get("version", 0)}

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> str:
        lines = [f"# TYPE fedmeta_{k}_total counter\nfedmeta_{k}_total {v}" for k, v in self.counters.items()]
        mean = self.latency_sum / max(self.counters["requests"], 1)
        lines.append(f"# TYPE fedmeta_latency_seconds_mean gauge\nfedmeta_latency_seconds_mean {mean:.6f}")
        for m, w in self._active_weights().items():
            lines.append(f'fedmeta_routing_weight{{member="{m}"}} {w:.6f}')
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- building the apps
def member_app(name: str, checkpoint: str) -> serve.Application:
    return Member.bind(name, str(checkpoint))


def _router_entry(info: dict) -> dict:
    return {"profile": info["profile"], "reference_quality": info["reference_quality"]}


def ensemble_app(members: dict[str, str], personalized: str | None = None, settings: dict | None = None,
                 reweight_s: float = 2.0, app_name: str = "fedmeta") -> serve.Application:
    """The ingress application for members (name -> checkpoint) deployed as their own apps."""
    infos = {name: member_info(path) for name, path in members.items()}
    shapes = {tuple(i["input_shape"]) for i in infos.values()}
    classes = {i["num_classes"] for i in infos.values()}
    if len(shapes) != 1 or len(classes) != 1:
        raise ValueError(f"members: every member must share one input shape and class count, got shapes "
                         f"{sorted(shapes)} and classes {sorted(classes)}")
    router = Router.bind({n: _router_entry(i) for n, i in infos.items()}, settings or {}, app_name, reweight_s)
    personal = None
    if personalized:
        personal = PersonalModels.bind(str(personalized), str(Path(personalized) / "personalized"))
    return Ensemble.bind(list(members), router, personal, math.prod(shapes.pop()), app_name)


def member_builder(args: dict) -> serve.Application:
    """For Serve config files: `import_path: serve.app:member_builder`, args {name, checkpoint}."""
    return member_app(args["name"], args["checkpoint"])


def ensemble_builder(args: dict) -> serve.Application:
    """For Serve config files: `import_path: serve.app:ensemble_builder`, args {members: {name:
    checkpoint}, personalized, settings, reweight_s}."""
    return ensemble_app(dict(args["members"]), args.get("personalized"), args.get("settings"),
                        float(args.get("reweight_s", 2.0)), args.get("app_name", "fedmeta"))


@dataclass
class Deployment:
    """Deploys and maintains the ensemble from the driver (what `fedmeta serve` runs)."""

    members: dict[str, str]                               # name -> checkpoint (run dir)
    personalized: str | None = None
    settings: dict = field(default_factory=dict)          # RouterSettings fields
    reweight_s: float = 2.0
    app_name: str = "fedmeta"
    candidates: dict[str, str] = field(default_factory=dict)

    def deploy(self) -> None:
        for name, path in self.members.items():
            serve.run(member_app(name, path), name=member_app_name(name, self.app_name), route_prefix=None)
        serve.run(ensemble_app(self.members, self.personalized, self.settings, self.reweight_s, self.app_name),
                  name=self.app_name, route_prefix="/")

    def router(self):
        return serve.get_deployment_handle("Router", app_name=self.app_name)

    def add_candidate(self, name: str, checkpoint: str, mode: str, fraction: float, **test_options) -> dict:
        """Deploy a candidate as its own app and start its trial (shadow or A/B); `test_options` go to
        the sequential test (e.g. max_pairs=200 to bound how long a trial can run)."""
        if name in self.members or name in self.candidates:
            raise ValueError(f"name: {name!r} is already deployed")
        info = member_info(checkpoint)
        serve.run(member_app(name, checkpoint), name=member_app_name(name, self.app_name), route_prefix=None)
        self.candidates[name] = str(checkpoint)
        return self.router().start_trial.remote(name, _router_entry(info), mode, fraction, test_options).result()

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
        apps = [{"name": member_app_name(n, self.app_name), "route_prefix": None, "import_path": "serve.app:member_builder",
                 "args": {"name": n, "checkpoint": str(p)}} for n, p in self.members.items()]
        apps.append({"name": self.app_name, "route_prefix": "/", "import_path": "serve.app:ensemble_builder",
                     "args": {"members": dict(self.members), "personalized": self.personalized,
                              "settings": self.settings, "reweight_s": self.reweight_s, "app_name": self.app_name}})
        return {"http_options": {"host": host, "port": port}, "applications": apps}
