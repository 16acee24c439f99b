"""Adaptive server optimizers: FedAdagrad, FedAdam and FedYogi (Reddi, Charles, Zaheer, Garrett,
Rush, Konecny, Kumar & McMahan 2021, "Adaptive Federated Optimization", Algorithm 2). Clients run
local SGD as in FedAvg; the server treats the cohort's mean update Delta as a pseudo-gradient:

    m = beta1 m + (1 - beta1) Delta
    v = v + Delta^2                                    (FedAdagrad)
    v = beta2 v + (1 - beta2) Delta^2                  (FedAdam)
    v = v - (1 - beta2) Delta^2 sign(v - Delta^2)      (FedYogi)
    x = x + server_lr * m / (sqrt(v) + tau)

with v starting at tau^2. The moments are the server's state: kept by the aggregator, checkpointed
with the run, carried over when the run restarts under tuned hyperparameters.
"""

from abc import abstractmethod

import torch

from fedmeta.sim.algorithms.base import SGDClient


class _ServerOptimizer(SGDClient):
    weighted_default = True

    def __init__(self, cfg, lr=None):
        super().__init__(cfg, lr)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @abstractmethod
    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """The second-moment update from the squared mean update `d2`: what tells the three apart."""

    def server_update(
        self, global_flat: torch.Tensor, mean_update: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        if self.m is None:
            self.m = torch.zeros_like(mean_update)
            self.v = torch.full_like(mean_update, c.tau**2)
        self.m = c.beta1 * self.m + (1 - c.beta1) * mean_update
        self.v = self.second_moment(self.v, mean_update * mean_update)
        step = c.server_lr * self.m / (self.v.sqrt() + c.tau)
        return global_flat + step, {
            "update_norm": float(mean_update.norm()),
            "server_step_norm": float(step.norm()),
        }

    def state_dict(self) -> dict:
        return {} if self.m is None else {"m": self.m.clone(), "v": self.v.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v = (state["m"].clone(), state["v"].clone()) if state else (None, None)


class FedAdagrad(_ServerOptimizer):
    name = "fedadagrad"

    def second_moment(self, v, d2):
        return v + d2


class FedAdam(_ServerOptimizer):
    name = "fedadam"

    def second_moment(self, v, d2):
        return self.cfg.beta2 * v + (1 - self.cfg.beta2) * d2


class FedYogi(_ServerOptimizer):
    name = "fedyogi"

    def second_moment(self, v, d2):
        return v - (1 - self.cfg.beta2) * d2 * torch.sign(v - d2)
