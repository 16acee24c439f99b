"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): clients run local SGD epochs; the server takes the sample-weighted mean of
their updates (scaled by a server learning rate, 1 = plain FedAvg)."""

from fedmeta.sim.algorithms.base import SGDClient


class FedAvg(SGDClient):
    name = "fedavg"
    weighted_default = True
