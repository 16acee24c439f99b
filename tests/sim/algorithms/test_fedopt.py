"""FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2) against the update rules written
out by hand, over several rounds; the server state round-trips."""

import numpy as np
import pytest
import torch

from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.config import AlgorithmConfig


def reference(name, deltas, x0, lr, b1, b2, tau):
    x, m, v = x0.copy(), np.zeros_like(x0), np.full_like(x0, tau**2)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d * d
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_server_optimizers_follow_reddi_et_al(name):
    rng = np.random.default_rng(1)
    deltas = [rng.normal(0, 0.1, 20) for _ in range(5)]
    x0 = rng.normal(0, 1, 20)
    cfg = AlgorithmConfig(name=name, server_lr=0.05, beta1=0.8, beta2=0.95, tau=0.01)
    alg = build_algorithm(cfg)
    x = torch.tensor(x0)
    for d in deltas[:3]:
        x, met = alg.server_update(x, torch.tensor(d))
    resumed = build_algorithm(cfg)  # a resumed run continues from the checkpointed moments
    resumed.load_state_dict(alg.state_dict())
    for d in deltas[3:]:
        x, met = resumed.server_update(x, torch.tensor(d))
    np.testing.assert_allclose(x.numpy(), reference(name, deltas, x0, 0.05, 0.8, 0.95, 0.01), rtol=1e-10)
    assert met["server_step_norm"] > 0


def test_stateless_server_rules_refuse_a_state():
    fedavg = build_algorithm(AlgorithmConfig())
    assert fedavg.state_dict() == {}
    with pytest.raises(ValueError, match="fedavg: has no server state"):
        fedavg.load_state_dict({"m": torch.zeros(2)})
