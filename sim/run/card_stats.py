"""The model card's statistics about users: the training inputs' profile and the panel's quality.

Without DP the card ships them exact (the plan's `input_profile`, the last evaluation's means) and
says they are not private. Under DP each is one Gaussian release composed into the run's epsilon,
made once, with the final evaluation (every release spends budget, so intermediate checkpoints'
cards carry neither), and only if the budget (`privacy.target_epsilon`) has room for it:

* input_profile: each profile client (sim/engine/plan.py `profile_ids`) contributes one vector, its
  per-feature means of x and of x^2, clipped to L2 norm C (`privacy.profile_clip`; default
  sqrt(2 d), which never clips inputs in [0, 1]). The sum gets N(0, (z C)^2) per coordinate from
  the run's secret noise (z: the run's noise multiplier) and is divided by the number of clients
  (public). mean = S1 / k and var = S2 / k - mean^2: the profile of the clients' mixture, every
  client weighing the same (a client's sample count would otherwise set its sensitivity). One user
  moves the sum by at most C (added or removed) or 2C (replaced: fixed-size cohorts' adjacency),
  so the release is accounted at noise multiplier z or z / 2. In a deployment the clipped vectors
  would be summed under secure aggregation; here the driver plays the devices.
* quality: the panel's mean acc(D_I) of the global and personalized models as the aggregator
  releases them (`Federation.private_metric`: noise of std z on each sum, masked per individual
  under secure aggregation), accounted as Tune's metric is (`metric_release_noise`). acc(D_G) is
  the released model measured on the server's own D_G (no federation user's data): post-processing,
  shipped as measured.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from fedmeta.actors.privacy import RunAccounting, UserLevelDP
from fedmeta.sim.data import FederatedDataset
from fedmeta.sim.engine.plan import FederationPlan, profile_ids
from fedmeta.sim.seeding import gaussian_noise

# A released variance can come out <= 0; serving needs it > 0, and its router floors fitted
# profiles at the same value (serve/routing.py VAR_FLOOR).
PROFILE_VAR_FLOOR = 1e-3
PANEL_KEYS = ("acc_global_DI", "acc_personalized_DI")  # what the aggregator releases; acc_global_DG is D_G's


# ---------------------------------------------------------------- the input profile (pure)
def client_moments(data: FederatedDataset, ids: list[int]) -> np.ndarray:
    """(clients, 2 d): each client's per-feature mean of x and of x^2 over its train split (what
    its device would contribute; zeros for a client without train data)."""
    rows = []
    for c in data.clients(ids):
        x = c.x_train.reshape(len(c.x_train), -1).to(torch.float64).numpy()
        rows.append(np.concatenate([x.mean(0), (x**2).mean(0)]) if len(x) else np.zeros(2 * x.shape[1]))
    return np.stack(rows)


def clip_rows(rows: np.ndarray, clip: float) -> np.ndarray:
    """Each row scaled down to L2 norm at most `clip` (the sum then has sensitivity `clip`)."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


def profile_from_means(means: np.ndarray, clients: int) -> dict:
    """The profile dict serving reads from the clients' mean of [x, x^2]: `n` is the client count."""
    d = len(means) // 2
    mean = means[:d]
    var = np.maximum(means[d:] - mean**2, PROFILE_VAR_FLOOR)
    return {"mean": mean.tolist(), "var": var.tolist(), "n": int(clients)}


def noisy_profile(moments: np.ndarray, clip: float, noise_multiplier: float, source) -> dict:
    """The Gaussian release of the clipped moments' sum (std z C per coordinate, drawn from `source`,
    a `Secrets.noise` source), divided by the (public) number of clients."""
    total = clip_rows(moments, clip).sum(0)
    noise = gaussian_noise((moments.shape[1],), source, dtype=torch.float64).numpy()
    return profile_from_means((total + noise_multiplier * clip * noise) / len(moments), len(moments))


def profile_clip(configured: float | None, features: int) -> float:
    """C: `privacy.profile_clip`, or sqrt(2 d), the largest norm of [mean x, mean x^2] for x in [0, 1]^d."""
    return float(configured) if configured is not None else math.sqrt(2 * features)


def profile_release_noise(dp: UserLevelDP) -> float:
    """Noise std over sensitivity of the profile release: z when neighbours add or remove a user
    (sensitivity C), z / 2 when they replace one (2C)."""
    return dp.noise_multiplier if dp.sampling.kind == "poisson" else dp.noise_multiplier / 2


# ---------------------------------------------------------------- releases, accounted
def withheld(stop: str) -> dict:
    """A statistic the budget has no room for: nothing ships, and the card says how to make room."""
    return {
        "released": False,
        "reason": f"{stop}; privacy.target_epsilon leaves no room for the card's statistics",
    }


def release_profile(plan: FederationPlan, accounting: RunAccounting, source) -> dict:
    """The input profile's release (or why it is withheld) and how it was made; accounted."""
    dp, ids = plan.dp, profile_ids(plan.num_clients, plan.cfg.seed)
    z, clip = (
        profile_release_noise(dp),
        profile_clip(plan.cfg.privacy.profile_clip, math.prod(plan.input_shape)),
    )
    stop = accounting.release_stop(z)
    if stop:
        return withheld(stop)
    value = noisy_profile(client_moments(plan.data, ids), clip, dp.noise_multiplier, source)
    accounting.record_release(z)
    return {
        "released": True,
        "value": value,
        "mechanism": "gaussian",
        "clients": len(ids),
        "clip": clip,
        "noise_std": dp.noise_multiplier * clip,
        "noise_multiplier": z,
    }


def release_quality(dp: UserLevelDP, accounting: RunAccounting, panel_metric: Callable[[], dict]) -> dict:
    """The panel's accuracies as the aggregator releases them (`panel_metric()`, noised under DP),
    clipped to [0, 1] (post-processing), or why they are withheld; accounted."""
    z = dp.metric_release_noise
    stop = accounting.release_stop(z)
    if stop:
        return withheld(stop)
    metric = panel_metric()
    accounting.record_release(z)
    value = {k: min(max(float(metric[k]), 0.0), 1.0) for k in PANEL_KEYS}
    return {
        "released": True,
        "value": value,
        "mechanism": "gaussian (aggregator, Federation.private_metric)",
        "panel": int(metric["count"]),
        "noise_multiplier": z,
    }


def release_card_statistics(
    plan: FederationPlan,
    accounting: RunAccounting,
    source,
    panel_metric: Callable[[], dict],
    rounds_done: int,
) -> dict:
    """Under DP: the card's input profile, then its panel quality, each released once if the
    budget has room (the profile first: serving routes by it)."""
    return {
        "round": rounds_done,
        "input_profile": release_profile(plan, accounting, source),
        "quality": release_quality(plan.dp, accounting, panel_metric),
    }


# ---------------------------------------------------------------- what the card ships
PENDING = {"released": False, "reason": "released once, with the final evaluation"}
NOT_PRIVATE = (
    "exact statistics of users' data (DP is off): outside any privacy guarantee; under DP they "
    "ship as Gaussian releases composed into epsilon"
)


DG_NOTE = (
    "exact: the released model measured on the server's own D_G, post-processing that costs federation "
    "users nothing"
)


def exact_statistics(note: str) -> dict:
    """`statistics_privacy` of a card built from exact statistics (a tuned candidate, a specialized
    member): not private, outside epsilon whatever the card's `privacy` says of the model."""
    return {"private": False, "in_epsilon": False, "note": note}


def card_statistics(plan: FederationPlan, latest_eval: dict, released: dict | None) -> dict:
    """The card's `input_profile`, `quality` and `statistics_privacy`: exact and marked not private
    without DP; under DP only released values (none before the release, null when withheld)."""
    dg = {"acc_global_DG": latest_eval["acc_global_DG"]["mean"]} if "acc_global_DG" in latest_eval else {}
    if not plan.dp.enabled:
        quality = {k: latest_eval[k]["mean"] for k in (*PANEL_KEYS, "acc_global_DG") if k in latest_eval}
        return {
            "input_profile": plan.input_profile,
            "quality": quality,
            "statistics_privacy": {"private": False, "in_epsilon": False, "note": NOT_PRIVATE},
        }
    released = released or {"input_profile": PENDING, "quality": PENDING}
    profile, quality = released["input_profile"], released["quality"]
    facts = {k: {x: v for x, v in r.items() if x != "value"} for k, r in released.items() if k != "round"}
    return {
        "input_profile": profile.get("value"),
        "quality": {**quality.get("value", {}), **dg},
        "statistics_privacy": {
            "private": True,
            "in_epsilon": True,
            "released_at_round": released.get("round"),
            **facts,
            "acc_global_DG": DG_NOTE,
        },
    }
