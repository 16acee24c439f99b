"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith 2020, "Federated Optimization in
Heterogeneous Networks"): each client minimizes its loss plus (mu/2) ||w - w_global||^2, so local
SGD adds mu (w - w_global) to every gradient and heterogeneous clients drift less from the global
model; the server averages as FedAvg does. mu = 0 is FedAvg."""

from fedmeta.sim.algorithms.base import ProximalSGDClient


class FedProx(ProximalSGDClient):
    name = "fedprox"
    weighted_default = True
