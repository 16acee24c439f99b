"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith 2020, "Federated Optimization in
Heterogeneous Networks"): each client minimizes its loss plus (mu/2) ||w - w_global||^2, so local
SGD adds mu (w - w_global) to every gradient and heterogeneous clients drift less from the global
model; the server averages as FedAvg does. mu = 0 is FedAvg."""
from sim.algorithms.base import SGDClient
from sim.models import param_shapes, unflatten


class FedProx(SGDClient):
    name = "fedprox"
    weighted_default = True

    def client_update(self, model, global_flat, *args, **kwargs):
        # the proximal anchor: the global parameters, shared by every client of the cohort
        self._anchor = unflatten(global_flat, param_shapes(model))
        return super().client_update(model, global_flat, *args, **kwargs)

    def step(self, ops, params, batches):
        (x, y, m), = batches
        g, loss = ops.grad(params, x, y, m)
        # a padded (all-masked) batch of the vmap path is no step: no proximal pull either
        mu = self.cfg.proximal_mu * (m.sum() > 0).to(x.dtype)
        g = {k: g[k] + mu * (params[k] - self._anchor[k]) for k in g}
        return ops.descend(params, g, self.lr), loss
