"""Client rule + server rule per algorithm (pure torch; no Ray)."""
from sim.algorithms.base import Algorithm, SGDClient
from sim.algorithms.fedavg import FedAvg
from sim.algorithms.fomaml import FOMAML
from sim.algorithms.reptile import Reptile
from sim.config import AlgorithmConfig

ALGORITHMS: dict[str, type[Algorithm]] = {a.name: a for a in (FedAvg, Reptile, FOMAML)}


def build_algorithm(cfg: AlgorithmConfig) -> Algorithm:
    return ALGORITHMS[cfg.name](cfg)


__all__ = ["ALGORITHMS", "Algorithm", "FOMAML", "FedAvg", "Reptile", "SGDClient", "build_algorithm"]
