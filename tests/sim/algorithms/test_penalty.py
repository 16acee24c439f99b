"""The privacy-regularized local objective's penalty term."""

import torch

from fedmeta.sim.algorithms.penalty import privacy_penalty
from fedmeta.sim.seeding import torch_gen


def test_privacy_penalty_per_sample_grads_under_vmap():
    d, k, b = 5, 4, 6
    g = torch_gen(0, "penalty")
    w = torch.randn(d, k, generator=g)
    x, y = torch.randn(b, d, generator=g), torch.randint(0, k, (b,), generator=g)

    def loss(w, xi, yi):
        logits = xi @ w
        return torch.nn.functional.cross_entropy(logits, yi) + 0.5 * privacy_penalty(logits)

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x, y)
    looped = torch.stack([torch.func.grad(loss)(w, x[i], y[i]) for i in range(b)])
    torch.testing.assert_close(per_sample, looped)


def test_minimizing_privacy_penalty_lowers_confidence():
    logits = torch.tensor([[4.0, 0.0, -1.0], [0.5, 3.0, 0.0]], requires_grad=True)
    before = torch.softmax(logits, -1).max(-1).values.detach()
    opt = torch.optim.SGD([logits], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        privacy_penalty(logits).backward()
        opt.step()
    after = torch.softmax(logits, -1).max(-1).values.detach()
    assert (after < before).all()
    # argmax is kept: the penalty softens predictions rather than changing them
    assert torch.equal(logits.argmax(-1), torch.tensor([0, 1]))
