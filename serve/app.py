"""The Ray Serve application: a routed, dynamically weighted ensemble of federation checkpoints.

    app "fedmeta":  Ensemble (FastAPI ingress) ──► Router (one replica: serve/router_state.py RouterState)
                        │                      └─► PersonalModels (per-user models: multiplexing + LRU)
                        └──► app "fedmeta-member-<name>": Member (one deployment per ensemble member)

Each member (and each candidate) is its own Serve application holding one `Member` deployment, so
a member can join (a new candidate) or leave (pruned, rejected) without redeploying anything else:
deleting its application releases its replicas. The ingress reaches members through deployment
handles looked up by application name.

A request's inputs go to the top-k active members by routing weight (in parallel) and the answer is
their weighted average (serve/routing.py `combine`); the response names the members and weights.
Concurrent requests share member calls and forward passes (`Coalesce` at the ingress, Ray's `serve.batch`
at a member: see BATCH_REQUESTS), and what answered reaches the Router off the request's path.
With a user id whose personalized model exists, that model answers instead (`personal_id`: only the
canonical ASCII decimal spelling of an id selects a model; any other id is answered by the ensemble).
A candidate under test answers a stable fraction of requests as *shadow* (logged and scored, never
returned) or as an *A/B arm* (by hashing the user id). Inputs and what answered reach the Router in batches; labelled
feedback (`/feedback`) is scored there. The Router recomputes weights every `reweight_s` seconds
and pushes the routing state to every running ingress replica's `reconfigure` (a broadcast: no
redeploy, no restart); replicas that start later pull it on their first request.

Hostile input never gets a 5xx: every rejected request gets a 4xx whose JSON `detail` is one line
naming the field and what was expected (serve/schemas.py).

Where each part lives: serve/schemas.py (the HTTP models, input checks, refusals and body limit),
serve/batching.py (`Coalesce`, batch sizes, shutdown options), serve/members.py (`Member`,
`PersonalModels`), serve/router.py (`Router`), serve/ensemble.py (the FastAPI app, the `Ensemble`
ingress, `ensemble_app`), serve/client.py (`Deployment`, driving it all from the driver). This
module keeps the builders that Serve config files name (`import_path: fedmeta.serve.app:member_builder`
and `:ensemble_builder`, written by `Deployment.config`) and re-exports what callers outside serve/
import from here.
"""

from ray import serve

from fedmeta.serve.client import Deployment
from fedmeta.serve.ensemble import ensemble_app
from fedmeta.serve.members import PersonalModels, member_app, member_info

__all__ = ["Deployment", "PersonalModels", "ensemble_builder", "member_builder", "member_info"]


def member_builder(args: dict) -> serve.Application:
    """For Serve config files: `import_path: fedmeta.serve.app:member_builder`, args {name, checkpoint,
    trust_code}."""
    return member_app(args["name"], args["checkpoint"], args.get("trust_code") is True)


def ensemble_builder(args: dict) -> serve.Application:
    """For Serve config files: `import_path: fedmeta.serve.app:ensemble_builder`, args {members: {name:
    checkpoint}, personalized, settings, reweight_s, app_name, trust_code, auth}."""
    return ensemble_app(
        dict(args["members"]),
        args.get("personalized"),
        args.get("settings"),
        float(args.get("reweight_s", 2.0)),
        args.get("app_name", "fedmeta"),
        args.get("trust_code") is True,
        args.get("auth"),
    )
