"""Federated Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms";
in the federated form of Jiang et al. 2019): each client (a task) runs k SGD steps from the
global initialisation; the server moves the initialisation towards the adapted weights,
theta <- theta + eps * mean_i(phi_i - theta), with every task weighted equally."""

from fedmeta.sim.algorithms.base import SGDClient


class Reptile(SGDClient):
    name = "reptile"
    weighted_default = False
