"""Per-individual personalization runs for `fedmeta table` (pure: no Ray, no files).

For one method and a shard of individuals this builds each individual's training data
[D_G train | D_I'] and plan (sim/algorithms/shaping.py), trains all of them in lockstep with
`train_vmap` (one model per individual), and evaluates each model on the individual's D_I test
split and on held-out D_G: the two axes of Schneider & Vlachos' Table I.

What D_I' is per method (the paper's Sec. IV set-up):
  baseline        another individual's train data (so the model never saw the evaluated one's);
  es, sw, tl      the individual's own train data;
  random, sg      own data plus n samples of D_G (random, or nearest in the auto-encoder space);
  ig              own data plus the train data of the n nearest individuals (their class-mean
                  latents come from the profile store, with consent).
Grouping methods train with SW at `grouping_periodicity` (the paper's n_I = 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedmeta.sim.algorithms.base import SGDClient
from fedmeta.sim.algorithms.local import accuracies_stacked, train_vmap
from fedmeta.sim.algorithms.shaping import (
    PartialSGD,
    Plan,
    baseline,
    early_shaping,
    last_layer_names,
    sample_weighing,
    transfer,
)
from fedmeta.sim.config import AlgorithmConfig, MethodSpec, PersonalizationConfig
from fedmeta.sim.data import FederatedDataset
from fedmeta.sim.models import param_shapes
from fedmeta.sim.seeding import np_rng


@dataclass(frozen=True)
class GlobalSplit:
    """D_G cut into the server's training part and a held-out part for acc(D_G)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def split_global(data: FederatedDataset, test_fraction: float, seed: int) -> GlobalSplit:
    x, y = data.global_data()
    order = torch.from_numpy(np_rng(seed, "table-global-split").permutation(len(y)))
    n_test = max(1, round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return GlobalSplit(x[train], y[train], x[test], y[test])


@dataclass(frozen=True)
class Job:
    """One individual under one method; `other`, `extra` and `group` only where the method uses them."""

    individual: int
    other: int | None = None  # baseline: whose data stands in for D_I
    extra: np.ndarray | None = None  # random / sg: indices into D_G train
    group: list[int] = field(default_factory=list)  # ig: individuals whose data joins D_I


def extended_data(
    spec: MethodSpec, job: Job, data: FederatedDataset, dg: GlobalSplit
) -> tuple[torch.Tensor, torch.Tensor]:
    """D_I' of the job: what the plan's device-side batches index (after D_G train)."""
    if spec.method == "baseline":
        other = data.client(job.other)
        return other.x_train, other.y_train
    own = data.client(job.individual)
    xs, ys = [own.x_train], [own.y_train]
    if spec.method in ("random", "sg"):
        idx = torch.as_tensor(np.array(job.extra))
        xs.append(dg.x_train[idx])
        ys.append(dg.y_train[idx])
    elif spec.method == "ig":
        for member in data.clients(job.group):
            xs.append(member.x_train)
            ys.append(member.y_train)
    return torch.cat(xs), torch.cat(ys)


def make_plan(
    spec: MethodSpec, p: PersonalizationConfig, n_g: int, n_ext: int, gen: np.random.Generator
) -> Plan:
    bs, epochs = p.batch_size, p.epochs
    if spec.method == "baseline":
        return baseline(n_g, n_ext, bs, epochs, gen)
    if spec.method == "es":
        return early_shaping(int(spec.n), n_g, n_ext, bs, epochs, gen)
    if spec.method == "sw":
        return sample_weighing(spec.n, n_g, n_ext, bs, epochs, gen)
    if spec.method == "tl":
        return transfer(int(spec.n), n_g, n_ext, bs, gen)
    return sample_weighing(p.grouping_periodicity, n_g, n_ext, bs, epochs, gen)  # random, sg, ig


def personalize(
    model: torch.nn.Module,
    spec: MethodSpec,
    p: PersonalizationConfig,
    jobs: list[Job],
    data: FederatedDataset,
    dg: GlobalSplit,
    start: torch.Tensor,
    seed: int,
) -> dict:
    """Train one model per job from `start` (flat parameters: the initial model, or for TL the model
    trained on D_G) and evaluate it. Returns per-individual arrays: acc_DI, acc_DG, transfers."""
    xs, ys, plans = [], [], []
    for job in jobs:
        x_ext, y_ext = extended_data(spec, job, data, dg)
        xs.append(torch.cat([dg.x_train, x_ext]))  # (n_G + n_ext, *input)
        ys.append(torch.cat([dg.y_train, y_ext]))
        plans.append(
            make_plan(
                spec, p, len(dg.y_train), len(y_ext), np_rng(seed, "table-plan", spec.label, job.individual)
            )
        )
    rule_cfg = AlgorithmConfig(lr=p.lr, batch_size=p.batch_size)
    rule = (
        PartialSGD(rule_cfg, last_layer_names(list(param_shapes(model)), spec.last_layers))
        if spec.last_layers
        else SGDClient(rule_cfg)
    )
    flats, _ = train_vmap(model, rule.step, start, xs, ys, [[plan.batches for plan in plans]], p.batch_size)
    tests = data.clients([j.individual for j in jobs])
    acc_di = accuracies_stacked(model, flats, [c.x_test for c in tests], [c.y_test for c in tests], True)
    acc_dg = accuracies_stacked(model, flats, [dg.x_test] * len(jobs), [dg.y_test] * len(jobs), True)
    return {
        "individual": [j.individual for j in jobs],
        "acc_DI": acc_di.numpy(),
        "acc_DG": acc_dg.numpy(),
        "transfers": [plan.transfers for plan in plans],
    }


def train_on_global(
    model: torch.nn.Module, p: PersonalizationConfig, dg: GlobalSplit, start: torch.Tensor, seed: int
) -> torch.Tensor:
    """The server's model: `epochs` over D_G train alone (TL's starting point), flat parameters."""
    plan = baseline(len(dg.y_train), 0, p.batch_size, p.epochs, np_rng(seed, "table-global-model"))
    rule = SGDClient(AlgorithmConfig(lr=p.lr, batch_size=p.batch_size))
    flats, _ = train_vmap(model, rule.step, start, [dg.x_train], [dg.y_train], [[plan.batches]], p.batch_size)
    return flats[0]
