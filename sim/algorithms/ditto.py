"""Ditto (Li, Hu, Beirami & Smith 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML): the global model w is trained as FedAvg trains it, and each individual k
keeps a personalized model v_k solving

    min_v  F_k(v) + lambda/2 ||v - w||^2,

so `ditto_lambda` slides between purely local models (0) and the global model (large). Here the
personal problem is solved when an individual is evaluated, from the global model of that round:
`eval.finetune_steps` proximal SGD steps at `eval.finetune_lr` starting at w (Algorithm 1's personal
update with w as anchor). Virtual clients keep no state between rounds, so v_k is not carried from
one evaluation to the next; its anchor, the current global model, is."""

from fedmeta.sim.algorithms.fedavg import FedAvg
from fedmeta.sim.config import AlgorithmConfig


class Ditto(FedAvg):
    name = "ditto"

    def __init__(self, cfg: AlgorithmConfig):
        super().__init__(cfg)
        # its personal objective is the base class's proximal personalization, with mu = lambda
        self.privacy_weight = cfg.ditto_lambda

    def describe_personalization(self) -> str:
        return f"ditto (lambda={self.cfg.ditto_lambda:g})"
