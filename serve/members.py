"""The member models behind the ingress: `Member`, one ensemble member's global model (each member
and each candidate is its own Serve application, named by `member_app_name`, so that it can join or
leave without redeploying anything else), and `PersonalModels`, the per-user personalized models
loaded on demand with model multiplexing. `member_info` reads what the router needs to know about a
member from its model card alone. Both deployments are looked up by name ("Member", "PersonalModels").
"""

from pathlib import Path

import numpy as np
import torch
from ray import serve

from fedmeta.serve.batching import BATCH_REQUESTS, BATCH_WAIT_S, SHUTDOWN, split_answers
from fedmeta.serve.schemas import MAX_BATCH, personal_id
from fedmeta.sim.checkpoint import load_model

MAX_USER_MODELS = 8  # personalized models kept per PersonalModels replica (LRU)


def _probabilities(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(
            model(torch.tensor(x, dtype=torch.float32)), -1
        ).numpy()  # a copy: x may be read-only


def _forward(model: torch.nn.Module, x: np.ndarray, shape: tuple) -> np.ndarray:
    """Probabilities for rows `x`, at most MAX_BATCH rows a forward pass: a batch of requests holds up
    to BATCH_REQUESTS x MAX_BATCH rows, and a convolutional model's activations grow with the rows."""
    x = x.reshape(-1, *shape)
    return np.concatenate([_probabilities(model, x[i : i + MAX_BATCH]) for i in range(0, len(x), MAX_BATCH)])


def member_info(checkpoint: str | Path, trust_code: bool = False) -> dict:
    """What the router needs to know about a member, from its model card alone (a custom model the
    card names is refused unless `trust_code`: sim/artifacts/usercode.py)."""
    _, card = load_model(Path(checkpoint), trust_code)
    quality = card.get("quality", {})
    if (
        card.get("input_profile") is None
    ):  # under DP a card ships it only once released (sim/run/card_stats.py)
        why = card.get("statistics_privacy", {}).get("input_profile", {}).get("reason", "not in the card")
        raise ValueError(f"{checkpoint}: the model card has no input_profile to route by ({why})")
    return {
        "profile": card["input_profile"],
        "input_shape": card["data_schema"]["input_shape"],
        "num_classes": card["data_schema"]["num_classes"],
        "reference_quality": float(quality.get("acc_global_DI", 0.5)),
        "card": card,
    }


def member_app_name(name: str, app: str = "fedmeta") -> str:
    return f"{app}-member-{name}"


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
        return split_answers(_forward(self.model, np.concatenate(xs), self.shape), xs)


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
        if personal_id(user_id) != user_id:  # never a path from another spelling of an id
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


def member_app(name: str, checkpoint: str, trust_code: bool = False) -> serve.Application:
    return Member.bind(name, str(checkpoint), trust_code)
