"""FedProx against a hand-written proximal SGD loop; mu = 0 is FedAvg; both cohort paths agree."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.algorithms.local import batch_schedule
from fedmeta.sim.config import AlgorithmConfig
from fedmeta.sim.models import flatten, param_shapes, unflatten
from tests.sim.algorithms.test_local import cohort


def reference_fedprox(model, g0, x, y, sched, lr, mu):
    """Textbook: loss + mu/2 ||w - w0||^2 with autograd and torch.optim.SGD."""
    m = copy.deepcopy(model)
    anchor = [v.clone() for v in unflatten(g0, param_shapes(model)).values()]
    with torch.no_grad():
        for p, v in zip(m.parameters(), anchor):
            p.copy_(v)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for b in sched:
        opt.zero_grad()
        idx = torch.from_numpy(b)
        prox = sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))
        (F.cross_entropy(m(x[idx]), y[idx]) + mu / 2 * prox).backward()
        opt.step()
    return flatten(dict(m.named_parameters())).detach() - g0


@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_fedprox_matches_the_proximal_reference_loop(path):
    sizes = [13, 7, 20]
    model, g0, xs, ys = cohort("mlp", sizes, (1, 4, 4), 5)
    alg = build_algorithm(
        AlgorithmConfig(name="fedprox", batch_size=4, lr=0.1, local_epochs=3, proximal_mu=0.5)
    )
    upd, _ = alg.client_update(model, g0, xs, ys, [np.random.default_rng(i) for i in range(3)], path)
    for i in range(3):
        sched = batch_schedule(sizes[i], 4, np.random.default_rng(i), epochs=3)
        torch.testing.assert_close(
            upd[i], reference_fedprox(model, g0, xs[i], ys[i], sched, 0.1, 0.5), atol=2e-6, rtol=1e-4
        )


def test_mu_zero_is_fedavg_and_mu_pulls_towards_the_global_model():
    model, g0, xs, ys = cohort("mlp", [16, 9], (6,), 4, seed=1)
    gens = lambda: [np.random.default_rng(3 + i) for i in range(2)]  # noqa: E731
    run = lambda name, mu: build_algorithm(
        AlgorithmConfig(
            name=name,
            batch_size=4,
            lr=0.2,
            local_epochs=4,  # noqa: E731
            proximal_mu=mu,
        )
    ).client_update(model, g0, xs, ys, gens(), "vmap")[0]
    torch.testing.assert_close(run("fedprox", 0.0), run("fedavg", 0.0))
    assert run("fedprox", 1.0).norm(dim=1).lt(run("fedavg", 0.0).norm(dim=1)).all()
