"""The privacy-regularized local objective's penalty term."""

import pytest
import torch

from fedmeta.sim.algorithms.penalty import privacy_penalty, regularized_loss
from fedmeta.sim.seeding import torch_gen


def test_privacy_penalty_per_sample_grads_under_vmap():
    d, k, b = 5, 4, 6
    g = torch_gen(0, "penalty")
    w = torch.randn(d, k, generator=g)
    x, y = torch.randn(b, d, generator=g), torch.randint(0, k, (b,), generator=g)

    def loss(w, xi, yi):
        logits = xi @ w
        return regularized_loss(torch.nn.functional.cross_entropy(logits, yi), logits, 0.5)

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


def test_regularized_loss_is_task_plus_lambda_penalty():
    logits = torch.tensor([[2.0, 0.0]])
    task = torch.tensor(0.3)
    assert regularized_loss(task, logits, 0.0) == task
    torch.testing.assert_close(regularized_loss(task, logits, 2.0), task + 2 * privacy_penalty(logits))
    with pytest.raises(ValueError, match="lam"):
        regularized_loss(task, logits, -1.0)
