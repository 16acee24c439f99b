"""Ditto's personalization rule against a hand-written loop of its personal objective
F_k(v) + lambda/2 ||v - w||^2; its global rule is FedAvg's."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.algorithms.local import batch_schedule
from fedmeta.sim.config import AlgorithmConfig, EvalConfig
from fedmeta.sim.models import flatten, param_shapes, unflatten
from tests.sim.algorithms.test_local import cohort


def reference_ditto_personal(model, w, x, y, sched, lr, lam):
    """Textbook Ditto personal update: SGD on the batch loss plus lam/2 ||v - w||^2, from v = w."""
    v = copy.deepcopy(model)
    anchor = [t.clone() for t in unflatten(w, param_shapes(model)).values()]
    with torch.no_grad():
        for p, a in zip(v.parameters(), anchor):
            p.copy_(a)
    for b in sched:
        idx = torch.from_numpy(b)
        loss = F.cross_entropy(v(x[idx]), y[idx])
        loss = loss + lam / 2 * sum(((p - a) ** 2).sum() for p, a in zip(v.parameters(), anchor))
        grads = torch.autograd.grad(loss, list(v.parameters()))
        with torch.no_grad():
            for p, g in zip(v.parameters(), grads):
                p -= lr * g
    return flatten(dict(v.named_parameters())).detach()


@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_ditto_personal_models_match_the_reference_loop(path):
    sizes = [11, 17, 6]
    model, w, xs, ys = cohort("mlp", sizes, (1, 4, 4), 5, seed=2)
    ev = EvalConfig(finetune_steps=7, finetune_lr=0.2, batch_size=4)
    ditto = build_algorithm(AlgorithmConfig(name="ditto", ditto_lambda=0.7))
    upd, _ = ditto.personalizer(ev).client_update(
        model, w, xs, ys, [np.random.default_rng(i) for i in range(3)], path
    )
    for i in range(3):
        sched = batch_schedule(sizes[i], 4, np.random.default_rng(i), steps=7)
        torch.testing.assert_close(
            w + upd[i],
            reference_ditto_personal(model, w, xs[i], ys[i], sched, 0.2, 0.7),
            atol=2e-6,
            rtol=1e-4,
        )


def test_lambda_slides_between_fine_tuning_and_the_global_model():
    model, w, xs, ys = cohort("mlp", [16, 9], (6,), 4, seed=1)
    ev = EvalConfig(finetune_steps=10, finetune_lr=0.2, batch_size=4)
    gens = lambda: [np.random.default_rng(5 + i) for i in range(2)]  # noqa: E731

    def personal(lam):
        alg = build_algorithm(AlgorithmConfig(name="ditto", ditto_lambda=lam))
        return alg.personalizer(ev).client_update(model, w, xs, ys, gens(), "vmap")[0]

    fine_tuned = (
        build_algorithm(AlgorithmConfig(name="fedavg"))
        .personalizer(ev)
        .client_update(model, w, xs, ys, gens(), "vmap")[0]
    )
    torch.testing.assert_close(personal(0.0), fine_tuned)  # lambda = 0: plain fine-tuning
    assert personal(2.0).norm(dim=1).lt(fine_tuned.norm(dim=1)).all()  # the pull keeps v nearer w


def test_the_global_rule_is_fedavg():
    model, w, xs, ys = cohort("mlp", [12, 8], (6,), 3, seed=4)
    run = lambda name: build_algorithm(
        AlgorithmConfig(name=name, batch_size=4, lr=0.1, local_epochs=2)
    ).client_update(  # noqa: E731
        model, w, xs, ys, [np.random.default_rng(i) for i in range(2)], "loop"
    )[0]
    torch.testing.assert_close(run("ditto"), run("fedavg"))
    assert (
        build_algorithm(AlgorithmConfig(name="ditto", ditto_lambda=0.5)).describe_personalization()
        == "ditto (lambda=0.5)"
    )


def test_any_algorithm_personalizes_with_a_given_privacy_weight():
    """The weight the leakage controller passes turns fine-tuning into Ditto's proximal personal
    objective (and overrides Ditto's own lambda); None keeps the algorithm's own."""
    model, w, xs, ys = cohort("mlp", [16, 9], (6,), 4, seed=3)
    ev = EvalConfig(finetune_steps=10, finetune_lr=0.2, batch_size=4)
    gens = lambda: [np.random.default_rng(7 + i) for i in range(2)]  # noqa: E731
    fedavg, ditto = (build_algorithm(AlgorithmConfig(name=n, ditto_lambda=0.7)) for n in ("fedavg", "ditto"))
    assert (fedavg.privacy_weight, ditto.privacy_weight) == (0.0, 0.7)

    def personal(alg, weight):
        return alg.personalizer(ev, weight).client_update(model, w, xs, ys, gens(), "vmap")[0]

    torch.testing.assert_close(personal(fedavg, 0.7), personal(ditto, None))
    torch.testing.assert_close(personal(ditto, 0.0), personal(fedavg, None))
    assert personal(fedavg, 5.0).norm(dim=1).lt(personal(fedavg, 0.0).norm(dim=1)).all()
