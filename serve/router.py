"""The `Router` deployment: the one replica holding the ensemble's routing state (a `RouterState`,
serve/router_state.py, which does the arithmetic) and its schedule. Ingress replicas send it their
buffered inputs and what answered; labelled feedback is scored here; every `reweight_s` seconds it
recomputes the weights and pushes the routing state to every running ingress replica's `reconfigure`
(a broadcast: no redeploy, no restart). It reaches the ingress by deployment name ("Ensemble").
"""

import asyncio
import logging

import numpy as np
import ray.exceptions
import ray.serve.exceptions
from ray import serve

from fedmeta.serve.batching import SHUTDOWN
from fedmeta.serve.router_state import RouterSettings, RouterState

logger = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's log file


# What a push meets while ingress replicas stop: the actor is gone or unreachable, or Serve has no
# replica (left) to send to.
PUSH_TRANSIENT = (
    ray.exceptions.RayActorError,
    ray.serve.exceptions.DeploymentUnavailableError,
    ray.serve.exceptions.ReplicaUnavailableError,
    ray.serve.exceptions.RequestCancelledError,
)


def router_entry(info: dict) -> dict:
    """What the router keeps of a member's `member_info` (serve/members.py)."""
    return {"profile": info["profile"], "reference_quality": info["reference_quality"]}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, **SHUTDOWN)
class Router:
    """The one replica holding the ensemble's routing state (serve/router_state.py) and its schedule."""

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

    async def start_trial(
        self, name: str, info: dict, mode: str, fraction: float, test_options: dict | None = None
    ) -> dict:
        self.state.set_candidate(
            name, info["profile"], info["reference_quality"], mode, fraction, **(test_options or {})
        )
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
        await ingress.broadcast("flush_now").results_async()  # what replicas still buffer
        return self.state.take_inputs()
