"""An algorithm = a client rule (what a client does with the global model and its data) plus a
server rule (what the server does with the aggregate). Each stage returns `(result, metrics)`.

The client rule is written for ONE client on a parameter dict (`step`); `client_update` runs it
over a whole cohort, vectorized with `torch.func.vmap` or as a loop, and returns only updates
(local minus global parameters), never data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn

from fedmeta.sim.algorithms.local import LocalDP, Ops, batch_schedule, train_loop, train_vmap
from fedmeta.sim.config import AlgorithmConfig, EvalConfig
from fedmeta.sim.models import Params, param_shapes, unflatten

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x, y, mask)


class Algorithm(ABC):
    """The base class of every algorithm, built-in or yours: a client rule plus a server rule.

    Client rule (what one client does with the global model and its data):

    - `step(ops, params, batches) -> (params, loss)` (required): ONE local step of ONE client.
      `params` is a dict of tensors (the model's parameters), `batches` holds `batches_per_step`
      tuples `(x, y, mask)` (the mask zeroes padded rows of a batch), and `ops` is what a step may
      do: `ops.grad(params, x, y, mask) -> (grads, loss)` and `ops.descend(params, grads, lr)`,
      the final SGD update. Written with these alone and without Python control flow on tensor
      values, a step is pure, so `client_update` runs it over a whole cohort under `torch.func.vmap`
      (or as a per-client loop, with the same maths).
    - `batches_per_step` (default 1): how many batch streams a step consumes (first-order MAML
      takes a support and a query batch); `schedules(n_train, gen)` draws them: `local_epochs`
      passes, or `local_steps` batches, of `batch_size`.
    - `client_weight(n_train)`: the client's weight in the mean (its train size when `weighted`).
    - `client_update(...) -> (updates, metrics)`: the cohort's updates (local minus global; only
      these leave a client). Override it only to set per-cohort state (as FedProx's anchor).

    Server rule (what the server does with the aggregate):

    - `server_update(global_flat, mean_update) -> (new_global, metrics)`: default
      `global + server_lr * mean_update` (FedAvg; Reptile's outer step); FedOpt keeps moments,
      checkpointed through `state_dict` / `load_state_dict`.
    - `personalizer(ev, weight)`: what an evaluated individual runs to personalize (fine-tuning,
      or Ditto's proximal objective with a privacy weight).

    In Flower terms the client rule is a ClientApp's `fit` and the server rule a Strategy's
    `aggregate_fit` after the weighted mean; in pfl-research's, `simulate_one_user` and
    `process_aggregated_statistics`. Name your subclass in the config as
    `algorithm.name: "package.module:ClassName"`. McMahan et al. 2017 (FedAvg) is the default rule.
    """

    name = "base"
    weighted_default = True
    batches_per_step = 1  # how many batch streams one local step consumes

    def __init__(self, cfg: AlgorithmConfig):
        self.cfg = cfg
        self.weighted = cfg.weighted if cfg.weighted is not None else self.weighted_default

    # ------------------------------------------------------------ client rule
    @abstractmethod
    def step(self, ops: Ops, params: Params, batches: Sequence[Batch]) -> tuple[Params, torch.Tensor]:
        """One local step of one client; pure, so it can run under vmap."""

    def schedules(self, n_train: int, gen: np.random.Generator) -> list[list[np.ndarray]]:
        kw = {"steps": self.cfg.local_steps} if self.cfg.local_steps else {"epochs": self.cfg.local_epochs}
        return [batch_schedule(n_train, self.cfg.batch_size, gen, **kw) for _ in range(self.batches_per_step)]

    def client_weight(self, n_train: int) -> float:
        return float(n_train) if self.weighted else 1.0

    def client_update(
        self,
        model: nn.Module,
        global_flat: torch.Tensor,
        xs: Sequence[torch.Tensor],
        ys: Sequence[torch.Tensor],
        gens: Sequence[np.random.Generator],
        path: Literal["vmap", "loop"],
        local_dp: LocalDP | None = None,
        noise_gens: Sequence[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Updates (clients, n_params) = local - global for a cohort, and metrics. With `local_dp`
        every local gradient is a DP-SGD one (loop path; its noise comes from each client's stream)
        and `local_releases` counts each client's noisy gradients. `noise_gens`: the clients' secret
        noise streams (by default each client's noise follows its batch stream `gens`)."""
        per_client = [self.schedules(len(y), g) for y, g in zip(ys, gens)]
        streams = [[pc[k] for pc in per_client] for k in range(self.batches_per_step)]
        if local_dp is not None:
            if path != "loop":
                raise ValueError("local DP-SGD runs on the loop path")
            noise = noise_gens or [
                torch.Generator(global_flat.device).manual_seed(int(g.integers(2**63))) for g in gens
            ]
            releases: list[int] = []
            local, loss = train_loop(
                model,
                self.step,
                global_flat,
                xs,
                ys,
                streams,
                self.cfg.batch_size,
                self.cfg.privacy_lambda,
                local_dp,
                noise,
                releases,
            )
            metrics = {"local_releases": torch.tensor(releases)}
        else:
            train = train_vmap if path == "vmap" else train_loop
            local, loss = train(
                model, self.step, global_flat, xs, ys, streams, self.cfg.batch_size, self.cfg.privacy_lambda
            )
            metrics = {}
        steps = torch.tensor([len(s) for s in streams[0]])
        return local - global_flat, {"train_loss": loss, "local_steps": steps, **metrics}

    # ------------------------------------------------------------ server rule
    def server_update(
        self, global_flat: torch.Tensor, mean_update: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        """New global model from the (weighted) mean update of the cohort."""
        new = global_flat + self.cfg.server_lr * mean_update
        return new, {"update_norm": float(mean_update.norm())}

    # ------------------------------------------------------------ personalization rule
    # the privacy weight lambda of the personalization: a proximal pull lambda/2 ||v - w||^2 of the
    # personalized model v towards the global model w (0: plain fine-tuning; Ditto: its lambda)
    privacy_weight = 0.0

    def personalizer(self, ev: EvalConfig, weight: float | None = None) -> Algorithm:
        """What an evaluated individual runs on its train split, starting from the global model,
        to get its personalized model: `eval.finetune_steps` steps of SGD on its loss plus
        `weight`/2 ||v - w||^2 (Ditto's personal objective; default `privacy_weight`). At 0 that is
        plain fine-tuning. The pull bounds how far v moves to fit the individual's own examples,
        which is what the loss-threshold membership attack reads (sim/run/leakage.py adapts it)."""
        mu = self.privacy_weight if weight is None else weight
        if not mu:
            return SGDClient(
                AlgorithmConfig(
                    local_steps=max(ev.finetune_steps, 1), lr=ev.finetune_lr, batch_size=ev.batch_size
                )
            )
        return ProximalSGDClient(
            AlgorithmConfig(
                local_steps=max(ev.finetune_steps, 1),
                lr=ev.finetune_lr,
                batch_size=ev.batch_size,
                proximal_mu=mu,
            )
        )

    def describe_personalization(self) -> str:
        return "fine-tuning"

    def state_dict(self) -> dict:
        """The server rule's state across rounds (e.g. an adaptive optimizer's moments): tensors in
        a dict, checkpointed with the run. Stateless rules keep none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self.name}: has no server state to load, got keys {sorted(state)}")


class SGDClient(Algorithm):
    """Local SGD: one gradient step per batch."""

    def __init__(self, cfg: AlgorithmConfig, lr: float | None = None):
        super().__init__(cfg)
        self.lr = cfg.lr if lr is None else lr

    def step(self, ops, params, batches):
        ((x, y, m),) = batches
        g, loss = ops.grad(params, x, y, m)
        return ops.descend(params, g, self.lr), loss


class ProximalSGDClient(SGDClient):
    """Local SGD on the loss plus (mu/2) ||w - w_global||^2: each gradient gains mu (w - w_global),
    anchored at the global parameters the cohort starts from (FedProx's client rule, Ditto's
    personal objective). mu = `cfg.proximal_mu`; 0 is plain SGD."""

    def client_update(self, model, global_flat, *args, **kwargs):
        # the proximal anchor: the global parameters, shared by every client of the cohort
        self._anchor = unflatten(global_flat, param_shapes(model))
        return super().client_update(model, global_flat, *args, **kwargs)

    def step(self, ops, params, batches):
        ((x, y, m),) = batches
        g, loss = ops.grad(params, x, y, m)
        # a padded (all-masked) batch of the vmap path is no step: no proximal pull either
        mu = self.cfg.proximal_mu * (m.sum() > 0).to(x.dtype)
        g = {k: g[k] + mu * (params[k] - self._anchor[k]) for k in g}
        return ops.descend(params, g, self.lr), loss
