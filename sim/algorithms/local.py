"""Local training of a cohort of clients on parameter dicts, two ways with identical maths.

* `train_vmap`: all clients at once. Each client's train set is padded to the cohort's largest,
  batches are index tensors (clients, steps, batch) with a 0/1 mask, and one
  `vmap(grad(loss))` call per step trains every client. A padded (all-zero-mask) batch has zero
  gradient, so a client with fewer batches simply stops moving: results equal the loop's.
* `train_loop`: one client after the other through the same step function, with exact-size
  batches and plain autograd on one shared module (cheaper than torch.func transforms for
  convolutions, which vmap turns into slow grouped convolutions on CPU).

Both return the same thing: the clients' parameters after local training, flattened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedmeta.sim.algorithms.penalty import negative_entropy
from fedmeta.sim.models import Params, flatten, param_shapes, unflatten
from fedmeta.sim.seeding import gaussian_noise

GradFn = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], tuple[Params, torch.Tensor]]
DescendFn = Callable[[Params, Params, float], Params]


@dataclass(frozen=True)
class Ops:
    """What a step function may do to parameters. `grad(params, x, y, mask) -> (grads, loss)`;
    `descend(params, grads, lr)` is the step's final SGD update, which may reuse `params`' storage
    (the loop path updates in place; under vmap it is functional)."""

    grad: GradFn
    descend: DescendFn


# A step takes (ops, params, [(x, y, mask), ...]) and returns (new params, loss of the step).
StepFn = Callable[
    [Ops, Params, Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], tuple[Params, torch.Tensor]
]


# ---------------------------------------------------------------- batch schedules
def batch_schedule(
    n: int, batch_size: int, gen: np.random.Generator, *, epochs: int | None = None, steps: int | None = None
) -> list[np.ndarray]:
    """Index batches over a set of n samples: `epochs` full passes, or the first `steps` batches of
    repeated passes. Each pass is a fresh permutation; batches never straddle passes (as a
    DataLoader with shuffle=True, drop_last=False)."""
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    if n < 1:
        raise ValueError("a client needs at least one training sample")
    per_pass = -(-n // batch_size)
    passes = epochs if epochs is not None else -(-steps // per_pass)
    out: list[np.ndarray] = []
    for _ in range(passes):
        perm = gen.permutation(n)
        out += [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return out if steps is None else out[:steps]


def pad_schedules(
    schedules: Sequence[Sequence[np.ndarray]], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-client schedules -> idx (clients, steps, batch) int64 and mask (clients, steps, batch)."""
    c, s = len(schedules), max(len(x) for x in schedules)
    idx = np.zeros((c, s, batch_size), dtype=np.int64)
    mask = np.zeros((c, s, batch_size), dtype=np.float32)
    for i, sched in enumerate(schedules):
        for j, b in enumerate(sched):
            idx[i, j, : len(b)] = b
            mask[i, j, : len(b)] = 1.0
    return torch.from_numpy(idx), torch.from_numpy(mask)


# ---------------------------------------------------------------- loss and grads
def masked_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    """Mean over the unmasked samples (0 for an all-masked batch) of cross-entropy, plus
    `lam` x the output-confidence privacy penalty (the privacy-regularized local objective)."""
    per_sample = F.cross_entropy(logits, y, reduction="none")
    if lam:
        per_sample = per_sample + lam * negative_entropy(logits)
    return (per_sample * mask).sum() / mask.sum().clamp_min(1.0)


def func_grad(model: nn.Module, lam: float = 0.0) -> GradFn:
    """torch.func gradient: composable with vmap."""
    return grad_and_value(lambda p, x, y, m: masked_loss(functional_call(model, p, (x,)), y, m, lam))


def module_grad(model: nn.Module, lam: float = 0.0) -> GradFn:
    """Plain-autograd gradient for the per-client loop: the given tensors are swapped into the one
    module as its parameters' storage (no copy), so a single model serves every client of an actor
    and PyTorch's fast eager kernels (channels_last convolutions) are used as-is."""
    plist = list(model.parameters())

    def g(params: Params, x, y, m):
        for p, t in zip(plist, params.values()):
            p.data = t
        loss = masked_loss(model(x), y, m, lam)
        grads = torch.autograd.grad(loss, plist)
        return dict(zip(params, grads)), loss.detach()

    return g


# Which cohort engine trains a model kind when `ray.compute` is auto. Measured on the 2-core dev
# machine (README, `fedmeta bench`): vmap trains an MLP cohort several times faster than a loop,
# while for a CNN on CPU vmap becomes grouped convolutions and loses.
AUTO_COMPUTE = {"mlp": "vmap", "cnn": "loop"}


def resolve_compute(
    compute: str,
    model_kind: str,
    local_dp: bool = False,
    model: nn.Module | None = None,
    input_shape: tuple[int, ...] = (),
) -> Literal["vmap", "loop"]:
    """The cohort engine a run uses: `ray.compute`, or for auto the measured choice per model kind;
    a custom model gets vmap when `torch.func` can run it (`vmap_works`), else the loop. Local
    DP-SGD needs per-sample gradients with per-client noise streams: the loop."""
    if local_dp:
        return "loop"
    if compute != "auto":
        return compute  # type: ignore[return-value]
    if model_kind == "custom":
        return "vmap" if model is not None and vmap_works(model, input_shape) else "loop"
    return AUTO_COMPUTE[model_kind]  # type: ignore[return-value]


def vmap_works(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether vmap(grad(loss)) over a stack of parameter copies runs this model (in-place ops,
    data-dependent control flow or .item() calls in forward make torch.func refuse it)."""
    params = {k: v.detach().expand(2, *v.shape).clone() for k, v in model.named_parameters()}
    device = next(iter(params.values())).device
    x = torch.zeros(2, 3, *input_shape, device=device)
    y = torch.zeros(2, 3, dtype=torch.long, device=device)

    def loss(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    try:
        vmap(torch.func.grad(loss))(params, x, y)
        return True
    except Exception:  # whatever torch.func cannot transform: the loop runs any module
        return False


@dataclass(frozen=True)
class LocalDP:
    """Sample-level DP-SGD inside a client (Abadi et al. 2016): every local step clips each
    per-sample gradient to L2 norm `clip` and adds N(0, (noise_multiplier * clip)^2) to their sum."""

    clip: float
    noise_multiplier: float


def dp_sgd_grad(
    gsm: nn.Module, dp: LocalDP, gen, lam: float = 0.0, on_release: Callable[[], None] | None = None
) -> GradFn:
    """DP-SGD gradient of one client on the loop path. `gsm` is Opacus' GradSampleModule around a
    private copy of the model (loss_reduction="sum"): its hooks turn each layer's activations and
    backprops into per-sample gradients (`p.grad_sample`). Each is clipped to `dp.clip`, they are
    summed, Gaussian noise from the client's own source is added (`fedmeta.sim.seeding.gaussian_noise`: a
    `SecureGaussian` on the client's key, or a seeded torch generator), and the sum is divided by the
    batch size. The client's parameters are swapped into the module's storage as in `module_grad`.
    `on_release` is called once per noisy gradient: what the client's privacy ledger counts (an
    algorithm may take several gradients per local step, e.g. FO-MAML two)."""
    plist = list(gsm.parameters())

    def g(params: Params, x, y, m):
        for p, t in zip(plist, params.values()):
            p.data = t
            p.grad_sample = None
        logits = gsm(x)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        if lam:
            per_sample = per_sample + lam * negative_entropy(logits)
        torch.autograd.grad((per_sample * m).sum(), plist)  # fills p.grad_sample: (batch, ...)
        norms = torch.sqrt(sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in plist))  # (batch,)
        scale = (dp.clip / (norms + 1e-12)).clamp(max=1.0) * m  # (batch,) 0 on padding
        size = m.sum().clamp_min(1.0)
        out = {}
        for k, p in zip(params, plist):
            noise = gaussian_noise(p.shape, gen, device=p.device) * (dp.noise_multiplier * dp.clip)
            out[k] = (torch.tensordot(scale, p.grad_sample, dims=1) + noise) / size
        if on_release is not None:
            on_release()
        return out, (per_sample.detach() * m).sum() / size

    return g


def grad_sample_module(model: nn.Module) -> nn.Module:
    """Opacus' per-sample-gradient wrapper around a copy of `model` (its hooks stay off the original)."""
    import copy
    import warnings

    from opacus import GradSampleModule

    # the input batch needs no gradient, so PyTorch notes that the hooks fire on module outputs
    # only, which is all Opacus uses
    warnings.filterwarnings(
        "ignore",
        message="Full backward hook is firing when gradients are computed with respect to module outputs",
    )
    return GradSampleModule(copy.deepcopy(model), loss_reduction="sum")


def sgd(params: Params, grads: Params, lr: float) -> Params:
    """Functional SGD (new tensors): for intermediate points such as FO-MAML's adapted weights."""
    # one fused op per tensor, no lr * g temporary
    return {k: torch.add(p, grads[k], alpha=-lr) for k, p in params.items()}


@torch.no_grad()
def sgd_(params: Params, grads: Params, lr: float) -> Params:
    """In-place SGD, the last update of a step. No fresh parameter tensors per step: under vmap this
    writes straight into the (clients, ...) stacks (~20% faster for an MLP cohort than `sgd`)."""
    for k, p in params.items():
        p.add_(grads[k], alpha=-lr)
    return params


# ---------------------------------------------------------------- cohort trainers
def train_vmap(
    model: nn.Module,
    step: StepFn,
    global_flat: torch.Tensor,
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    schedules: Sequence[Sequence[Sequence[np.ndarray]]],
    batch_size: int,
    lam: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train a cohort in lockstep. `schedules[k][i]` is client i's k-th schedule (a step function
    uses one batch from each of its k schedules). Returns (params (clients, n_params), mean loss (clients,))."""
    device = global_flat.device
    c = len(xs)
    x_pad, y_pad = _pad_data(xs, ys, device)  # (clients, n_max, *in), (clients, n_max)
    padded = [pad_schedules(s, batch_size) for s in schedules]
    idx = [p[0].to(device) for p in padded]  # each (clients, steps, batch)
    mask = [p[1].to(device) for p in padded]
    n_steps = idx[0].shape[1]
    rows = torch.arange(c, device=device)[:, None]  # (clients, 1)

    shapes = param_shapes(model)
    params = {k: v.expand(c, *v.shape).clone() for k, v in unflatten(global_flat, shapes).items()}
    ops = Ops(func_grad(model, lam), sgd_)
    vstep = vmap(lambda p, *b: step(ops, p, [b[i : i + 3] for i in range(0, len(b), 3)]))
    loss_sum = torch.zeros(c, device=device)
    live_steps = torch.zeros(c, device=device)
    for s in range(n_steps):
        batches = []
        for k in range(len(schedules)):
            bi = idx[k][:, s]  # (clients, batch)
            batches += [x_pad[rows, bi], y_pad[rows, bi], mask[k][:, s]]
        params, loss = vstep(params, *batches)
        live = (mask[0][:, s].sum(1) > 0).float()  # clients still training at step s
        loss_sum += loss * live
        live_steps += live
    return flatten(params, batch_dims=1).detach(), loss_sum / live_steps.clamp_min(1)


def train_loop(
    model: nn.Module,
    step: StepFn,
    global_flat: torch.Tensor,
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    schedules: Sequence[Sequence[Sequence[np.ndarray]]],
    batch_size: int,
    lam: float = 0.0,
    local_dp: LocalDP | None = None,
    noise_gens: Sequence[torch.Generator] | None = None,
    releases: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `train_vmap`, one client at a time with exact-size batches. With
    `local_dp`, every gradient is a DP-SGD gradient drawing noise from the client's `noise_gens[i]`,
    and `releases` (if given) receives each client's number of noisy gradients."""
    device = global_flat.device
    shapes = param_shapes(model)
    ops = Ops(module_grad(model, lam), sgd_)
    gsm = grad_sample_module(model) if local_dp is not None else None
    out, losses = [], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if local_dp is not None:
            count = [0]

            def released(count=count) -> None:
                count[0] += 1

            ops = Ops(dp_sgd_grad(gsm, local_dp, noise_gens[i], lam, released), sgd_)
        x, y = _fast_layout(x.to(device)), y.to(device)
        params = {
            k: v.clone(memory_format=_fast_format(v)) for k, v in unflatten(global_flat, shapes).items()
        }
        total, steps = torch.zeros((), device=device), 0
        for batch_idx in zip(*(sched[i] for sched in schedules)):
            batches = []
            for b in batch_idx:
                bt = torch.from_numpy(b).to(device)
                batches.append((x[bt], y[bt], torch.ones(len(b), device=device)))
            params, loss = step(ops, params, batches)
            total += loss  # stays on the device: no sync per step
            steps += 1
        out.append(flatten(params).detach())
        losses.append(total / max(steps, 1))
        if local_dp is not None and releases is not None:
            releases.append(count[0])
    return torch.stack(out), torch.stack(losses)


def _fast_format(t: torch.Tensor) -> torch.memory_format:
    # NHWC convolutions are ~1.3x faster than NCHW on CPU (oneDNN) for these small CNNs.
    return torch.channels_last if t.dim() == 4 else torch.contiguous_format


def _fast_layout(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=_fast_format(t))


def _pad_data(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], device
) -> tuple[torch.Tensor, torch.Tensor]:
    n_max = max(len(x) for x in xs)
    if all(len(x) == n_max for x in xs):
        return torch.stack(list(xs)).to(device), torch.stack(list(ys)).to(device)
    x_pad = xs[0].new_zeros((len(xs), n_max, *xs[0].shape[1:]))
    y_pad = ys[0].new_zeros((len(ys), n_max))
    for i, (x, y) in enumerate(zip(xs, ys)):
        x_pad[i, : len(x)] = x
        y_pad[i, : len(y)] = y
    return x_pad.to(device), y_pad.to(device)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def predictions_hit(
    model: nn.Module, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """(n,) bool: does the model with parameters `flat` classify each sample right? In chunks to bound memory."""
    params = unflatten(flat, param_shapes(model))
    hits = [
        functional_call(model, params, (x[i : i + chunk].to(flat.device),)).argmax(-1).cpu()
        == y[i : i + chunk]
        for i in range(0, len(y), chunk)
    ]
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def accuracy_flat(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the parameters `flat` on (x, y); NaN without samples."""
    return float(predictions_hit(model, flat, x, y).float().mean()) if len(y) else float("nan")


@torch.no_grad()
def accuracies_stacked(
    model: nn.Module,
    flats: torch.Tensor,
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    vectorized: bool,
) -> torch.Tensor:
    """Per-client accuracy of client-specific parameters flats (clients, n_params) on each client's data."""
    if not vectorized:
        return torch.tensor([accuracy_flat(model, f, x, y) for f, x, y in zip(flats, xs, ys)])
    device = flats.device
    x_pad, y_pad = _pad_data(xs, ys, device)
    n = torch.tensor([len(y) for y in ys], device=device)
    valid = torch.arange(x_pad.shape[1], device=device)[None, :] < n[:, None]  # (clients, n_max)
    params = unflatten(flats, param_shapes(model))
    logits = vmap(lambda p, x: functional_call(model, p, (x,)))(params, x_pad)  # (clients, n_max, classes)
    hits = ((logits.argmax(-1) == y_pad) & valid).sum(1).float()
    return (hits / n.clamp_min(1)).where(n > 0, torch.full_like(hits, float("nan"))).cpu()


@torch.no_grad()
def sample_losses(
    model: nn.Module, flats: torch.Tensor, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Per-sample cross-entropy of each client's parameters on its own data (for the MIA audit)."""
    shapes = param_shapes(model)
    return [
        F.cross_entropy(
            functional_call(model, unflatten(f, shapes), (x.to(f.device),)), y.to(f.device), reduction="none"
        ).cpu()
        for f, x, y in zip(flats, xs, ys)
    ]
