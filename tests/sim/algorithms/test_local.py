import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.algorithms.local import batch_schedule
from fedmeta.sim.config import AlgorithmConfig, ModelConfig
from fedmeta.sim.models import build_model, flatten, init_params, param_shapes, unflatten


def cohort(kind, sizes, shape, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, *shape, generator=g) for n in sizes]
    ys = [torch.randint(0, classes, (n,), generator=g) for n in sizes]
    model = build_model(ModelConfig(kind=kind, hidden=[16], channels=[4, 8], cnn_hidden=16), shape, classes)
    return model, init_params(model, g), xs, ys


@given(n=st.integers(1, 200), b=st.integers(1, 64), epochs=st.integers(1, 3))
@settings(max_examples=60, deadline=None)
def test_epoch_schedule_covers_each_sample_once_per_epoch(n, b, epochs):
    sched = batch_schedule(n, b, np.random.default_rng(0), epochs=epochs)
    assert all(1 <= len(x) <= b for x in sched)
    counts = np.bincount(np.concatenate(sched), minlength=n)
    assert (counts == epochs).all()


def test_step_schedule_length():
    assert len(batch_schedule(10, 4, np.random.default_rng(0), steps=7)) == 7
    with pytest.raises(ValueError):
        batch_schedule(10, 4, np.random.default_rng(0))


def reference_fedavg(model, g0, x, y, sched, lr):
    """Textbook local training: a module, torch.optim.SGD, loss.backward()."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(m.parameters(), unflatten(g0, param_shapes(model)).values()):
            p.copy_(v)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for b in sched:
        opt.zero_grad()
        F.cross_entropy(m(x[torch.from_numpy(b)]), y[torch.from_numpy(b)]).backward()
        opt.step()
    return flatten(dict(m.named_parameters())).detach() - g0


@pytest.mark.parametrize("kind, shape", [("mlp", (1, 4, 4)), ("cnn", (1, 16, 16))])
@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_fedavg_matches_reference_loop(kind, shape, path):
    sizes = [13, 7, 20]  # unequal: exercises padding + masks in the vmap path
    model, g0, xs, ys = cohort(kind, sizes, shape, 5)
    alg = build_algorithm(AlgorithmConfig(name="fedavg", batch_size=4, lr=0.1, local_epochs=2))
    upd, met = alg.client_update(model, g0, xs, ys, [np.random.default_rng(i) for i in range(3)], path)
    assert upd.shape == (3, g0.numel()) and torch.isfinite(met["train_loss"]).all()
    for i in range(3):
        sched = batch_schedule(sizes[i], 4, np.random.default_rng(i), epochs=2)
        ref = reference_fedavg(model, g0, xs[i], ys[i], sched, 0.1)
        torch.testing.assert_close(upd[i], ref, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["fedavg", "reptile", "fomaml"])
def test_vmap_and_loop_give_the_same_updates(name):
    model, g0, xs, ys = cohort("mlp", [16, 9, 16, 3], (6,), 4, seed=1)
    alg = build_algorithm(AlgorithmConfig(name=name, batch_size=4, lr=0.1, inner_lr=0.05, local_epochs=2))
    gens = lambda: [np.random.default_rng(10 + i) for i in range(4)]  # noqa: E731
    u_v, l_v = alg.client_update(model, g0, xs, ys, gens(), "vmap")
    u_l, l_l = alg.client_update(model, g0, xs, ys, gens(), "loop")
    torch.testing.assert_close(u_v, u_l, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(l_v["train_loss"], l_l["train_loss"], atol=1e-5, rtol=1e-5)
    assert u_v.abs().sum() > 0


def test_fomaml_step_is_first_order_maml():
    model, g0, xs, ys = cohort("mlp", [8], (5,), 3, seed=2)
    cfg = AlgorithmConfig(name="fomaml", batch_size=4, lr=0.1, inner_lr=0.3, local_steps=1)
    alg = build_algorithm(cfg)
    upd, _ = alg.client_update(model, g0, xs, ys, [np.random.default_rng(0)], "loop")
    rng = np.random.default_rng(0)
    b1 = batch_schedule(8, 4, rng, steps=1)[0]
    b2 = batch_schedule(8, 4, rng, steps=1)[0]
    x, y = xs[0], ys[0]
    shapes = param_shapes(model)

    def grad_at(flat, b):
        p = {k: v.clone().requires_grad_(True) for k, v in unflatten(flat, shapes).items()}
        loss = F.cross_entropy(torch.func.functional_call(model, p, (x[b],)), y[b])
        return flatten(dict(zip(p, torch.autograd.grad(loss, list(p.values())))))

    adapted = g0 - 0.3 * grad_at(g0, torch.from_numpy(b1))
    expected = -0.1 * grad_at(adapted, torch.from_numpy(b2))
    torch.testing.assert_close(upd[0], expected, atol=1e-6, rtol=1e-5)


def test_server_rules():
    model, g0, *_ = cohort("mlp", [4], (3,), 2)
    fed = build_algorithm(AlgorithmConfig(name="fedavg", server_lr=0.5))
    new, met = fed.server_update(g0, torch.ones_like(g0))
    torch.testing.assert_close(new, g0 + 0.5)
    assert fed.client_weight(30) == 30.0
    assert build_algorithm(AlgorithmConfig(name="reptile")).client_weight(30) == 1.0
    assert build_algorithm(AlgorithmConfig(name="reptile", weighted=True)).client_weight(30) == 30.0


def test_privacy_penalty_in_both_paths():
    model, g0, xs, ys = cohort("mlp", [16, 9, 12], (6,), 4, seed=3)
    gens = lambda: [np.random.default_rng(20 + i) for i in range(3)]  # noqa: E731
    plain = build_algorithm(AlgorithmConfig(batch_size=4, lr=0.1))
    reg = build_algorithm(AlgorithmConfig(batch_size=4, lr=0.1, privacy_lambda=2.0))
    u_v, _ = reg.client_update(model, g0, xs, ys, gens(), "vmap")
    u_l, _ = reg.client_update(model, g0, xs, ys, gens(), "loop")
    torch.testing.assert_close(u_v, u_l, atol=1e-6, rtol=1e-5)
    u_0, _ = plain.client_update(model, g0, xs, ys, gens(), "vmap")
    assert (u_v - u_0).abs().max() > 1e-6  # the penalty changes the local objective


# ---------------------------------------------------------------- local DP-SGD
def _dp_setup():
    model = build_model(ModelConfig(kind="mlp", hidden=[16]), (1, 8, 8), 5)
    params = unflatten(init_params(model, torch.Generator().manual_seed(0)), param_shapes(model))
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    return model, params, x, y


def test_dp_sgd_grad_equals_a_loop_over_samples():
    """Per-sample clipping and the noise draw, reproduced one sample at a time."""
    from fedmeta.sim.algorithms.local import LocalDP, dp_sgd_grad, grad_sample_module

    model, params, x, y = _dp_setup()
    dp = LocalDP(clip=0.3, noise_multiplier=1.2)
    mask = torch.tensor([1.0, 1, 1, 1, 0, 0])  # the last two are padding
    g, _ = dp_sgd_grad(grad_sample_module(model), dp, torch.Generator().manual_seed(7))(params, x, y, mask)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(4):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        loss = F.cross_entropy(torch.func.functional_call(model, p, (x[i : i + 1],)), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(p.values()))
        norm = torch.sqrt(sum(t.pow(2).sum() for t in grads))
        for k, t in zip(p, grads):
            total[k] += t * min(1.0, dp.clip / float(norm))
    gen = torch.Generator().manual_seed(7)
    for k, v in total.items():
        noise = torch.randn(v.shape, generator=gen) * dp.noise_multiplier * dp.clip
        torch.testing.assert_close(g[k], (v + noise) / 4, rtol=1e-4, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(clip=st.floats(1e-3, 10.0))
def test_dp_sgd_noiseless_grad_is_bounded_by_the_clip(clip):
    """Each sample contributes at most `clip`: ||mean of clipped grads|| <= clip."""
    from fedmeta.sim.algorithms.local import LocalDP, dp_sgd_grad, grad_sample_module

    model, params, x, y = _dp_setup()
    g, _ = dp_sgd_grad(grad_sample_module(model), LocalDP(clip, 0.0), torch.Generator())(
        params, x, y, torch.ones(6)
    )
    assert float(flatten(g).norm()) <= clip * (1 + 1e-5)
