"""Client rule + server rule per algorithm (pure torch; no Ray)."""

from fedmeta.sim.algorithms.base import Algorithm, SGDClient
from fedmeta.sim.algorithms.ditto import Ditto
from fedmeta.sim.algorithms.fedavg import FedAvg
from fedmeta.sim.algorithms.fedopt import FedAdagrad, FedAdam, FedYogi
from fedmeta.sim.algorithms.fedprox import FedProx
from fedmeta.sim.algorithms.fomaml import FOMAML
from fedmeta.sim.algorithms.reptile import Reptile
from fedmeta.sim.artifacts.usercode import import_target
from fedmeta.sim.config import AlgorithmConfig, ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {
    a.name: a for a in (FedAvg, Reptile, FOMAML, FedProx, FedAdam, FedYogi, FedAdagrad, Ditto)
}


def build_algorithm(cfg: AlgorithmConfig) -> Algorithm:
    """A built-in algorithm by name, or a user's `package.module:Class` (a subclass of Algorithm)."""
    return (ALGORITHMS.get(cfg.name) or import_algorithm(cfg.name))(cfg)


def import_algorithm(target: str) -> type[Algorithm]:
    """A user's `package.module:Class`; ConfigError naming `algorithm.name` when it cannot be
    imported or is not an Algorithm."""
    cls = import_target(target, "algorithm.name")
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ConfigError(f"algorithm.name: {target!r} is not a subclass of fedmeta.Algorithm")
    return cls


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Ditto",
    "FOMAML",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "Reptile",
    "SGDClient",
    "build_algorithm",
    "import_algorithm",
]
