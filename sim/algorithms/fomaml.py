"""First-order MAML / Per-FedAvg (Finn et al. 2017; Fallah, Mokhtari & Ozdaglar 2020,
"Personalized Federated Learning with Theoretical Guarantees: A Model-Agnostic Meta-Learning
Approach", first-order variant). Each local step samples two independent batches D and D':
    tmp   = theta - alpha * grad L_D(theta)        (inner adaptation, alpha = inner_lr)
    theta = theta - beta  * grad L_D'(tmp)         (first-order meta step, beta = lr)
so the global model learns an initialisation that adapts well in one step; the server averages
updates as FedAvg does."""

from fedmeta.sim.algorithms.base import Algorithm
from fedmeta.sim.algorithms.local import sgd


class FOMAML(Algorithm):
    name = "fomaml"
    weighted_default = True
    batches_per_step = 2

    def step(self, ops, params, batches):
        (x1, y1, m1), (x2, y2, m2) = batches
        g_inner, _ = ops.grad(params, x1, y1, m1)
        adapted = sgd(params, g_inner, self.cfg.inner_lr)  # a copy: theta itself must not move yet
        g_outer, loss = ops.grad(adapted, x2, y2, m2)
        return ops.descend(params, g_outer, self.cfg.lr), loss
