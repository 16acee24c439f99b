"""One tuning trial (sim/tuning/tune.py runs the search): it continues the federation from the
search's checkpoint under its own hyperparameters for a few rounds on its own actor pool, and reports
the tuning metric (the panel's accuracy, aggregated and, under DP, noised and accounted by the
search's PrivacyBudget actor) every `tune.report_every` rounds."""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune

from fedmeta.actors.privacy import make_accountant
from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.config import ConfigError, ExperimentConfig, from_dict
from fedmeta.sim.engine.cluster import worker_resources
from fedmeta.sim.engine.federation import Federation
from fedmeta.sim.engine.plan import FederationPlan
from fedmeta.sim.models import build_model, inference_ms
from fedmeta.sim.seeding import Secrets

METRIC_KEYS = ("acc_personalized_DI", "acc_global_DI")


TRIAL_STATE = "trial.json"  # in each trial checkpoint: rounds done and the trial's own accountant


def apply_params(raw: dict, params: dict) -> dict:
    """A copy of the raw experiment config with dotted keys (e.g. 'algorithm.lr', or
    'model.hidden.0' for a list entry) set."""
    raw = copy.deepcopy(raw)
    for dotted, value in params.items():
        node = raw
        *path, last = dotted.split(".")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        value = int(value) if isinstance(value, (np.integer,)) else value
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return raw


class TuningBudgetSpent(RuntimeError):
    """No trial could run a round: privacy.target_epsilon leaves no budget for tuning."""


def worst_round_noise(plan: FederationPlan) -> float:
    """The smallest noise multiplier a round of this plan can release with: in the distributed
    mode only the survivors' shares reach the sum, at worst the secure-aggregation threshold."""
    dp = plan.dp
    if dp.mode == "distributed" and plan.secagg is not None:
        return dp.round_noise(min(plan.secagg.threshold, dp.expected_clients))
    return dp.noise_multiplier


def trial_objectives(
    fed: Federation, objectives: set[str], rounds_done: int, g: np.ndarray, weight: float | None = None
) -> dict:
    """The objectives that are not the private accuracies, for the trial's model after a round:
    its inference time per batch and the membership-inference AUC. Under DP the AUC is computed
    from users' data, so it is a release like the accuracies: the panel's mean per-individual AUC
    of the personalized models, noised by the aggregator's `private_metric` (noise `metric_noise`, an individual
    adds at most 1) and accounted in `trial_release_noise`. Without DP, the audit's exact AUC (the
    larger of the global and the personalized models': the attacker picks)."""
    cfg, out, dp = fed.cfg, {}, fed.plan.dp
    model = build_model(cfg.model, fed.plan.input_shape, fed.plan.num_classes)
    out["latency_ms"] = inference_ms(
        model, torch.tensor(g), tuple(fed.plan.input_shape), cfg.tune.latency_batch
    )
    if "mia_auc" in objectives and dp.enabled:
        out["mia_auc"] = fed.private_metric(rounds_done, g, "leakage", weight, dp.metric_noise)["mia_auc_DI"]
    elif "mia_auc" in objectives:
        ev = fed.evaluate(rounds_done, g, weight=weight)
        out["mia_auc"] = max(ev["mia_auc_global"], ev["mia_auc_personalized"])
    return out


def trial_release_noise(dp, objectives: set[str]) -> float:
    """The noise multiplier of one trial round's reports as one Gaussian release: the two private
    accuracies (`metric_release_noise`) and, with the `mia_auc` objective, the private leakage at
    noise `metric_noise`. Gaussian releases compose exactly into one whose 1/z^2 is the sum of theirs (GDP)."""
    if "mia_auc" not in objectives:
        return dp.metric_release_noise
    return 1.0 / math.sqrt(dp.metric_release_noise**-2 + dp.metric_noise**-2)


def federation_trial(
    params: dict,
    plan: FederationPlan,
    start: str | None,
    rounds: int,
    start_round: int,
    budget=None,
    weight: float | None = None,
) -> None:
    """Tune's function trainable: a few rounds of the federation under `params`, from the base
    plan (data, initial model and noise decided once on the driver). Under DP each round is
    reserved with the tuning's `budget` first: a refused round ends the trial (the privacy
    budget is spent), and the trial reports the epsilon its own rounds and reports spent.
    `weight`: the personalization's privacy weight the run had learned (None: the algorithm's own)."""
    cfg = from_dict(apply_params(plan.cfg.model_dump(mode="json"), params))
    # Each trial draws its cohorts, keys and noise from its own secrets: trials sample independently,
    # which is what composing their rounds as separate subsampled releases assumes (a fresh run
    # secret; seeded, the seed's streams under the trial's id)
    seed = plan.cfg.seed
    base = Secrets.seeded(seed) if cfg.run.seeded_secrets else Secrets.fresh(seed)
    secrets = base.for_trial(tune.get_context().get_trial_id() or "trial")
    fed = Federation(plan.with_config(cfg), secrets=secrets)
    dp = fed.plan.dp
    own = make_accountant(dp.accountant, dp.sampling) if dp.enabled else None  # this trial's own spending
    objectives = {o.metric for o in cfg.tune.objectives}
    release_z = trial_release_noise(dp, objectives) if dp.enabled else 0.0
    try:
        g, first = _trial_start(fed, own, start)
        _trial_rounds(
            fed,
            own,
            budget,
            release_z,
            objectives,
            start_round,
            first,
            rounds,
            cfg.tune.report_every,
            g,
            weight,
        )
    finally:
        fed.shutdown()


def _trial_start(fed: Federation, own, start: str | None) -> tuple[np.ndarray, int]:
    """The model the trial starts from and its first round: where its last report left it when Tune
    restored the search (its own accountant restored too), else the search's checkpoint (or the
    plan's initial model) at round 0."""
    first, resumed = 0, tune.get_checkpoint()
    if resumed is not None:  # a restored search: this trial continues after its last report
        with resumed.as_directory() as d:
            g, done = np.load(Path(d) / "global.npy"), json.loads((Path(d) / TRIAL_STATE).read_text())
        first = done["round"]
        if own is not None:
            own.load_state_dict(done["own"])
    else:
        g = ckpt.load(Path(start)).global_params if start else fed.plan.init_params
    return g, first


def _trial_rounds(
    fed: Federation,
    own,
    budget,
    release_z: float,
    objectives: set[str],
    start_round: int,
    first: int,
    rounds: int,
    every: int,
    g: np.ndarray,
    weight: float | None,
) -> None:
    """The trial's rounds `first`..`rounds`-1 from model `g`, each reserved with the `budget` first
    (a refused one ends the trial), accounted in the trial's own accountant `own`, and reported
    every `every` rounds and after the last."""
    dp = fed.plan.dp
    pending, reported = False, first > 0
    for r in range(first, rounds):
        reports = (r + 1) % every == 0 or r + 1 == rounds  # a round that ends with a (released) report
        rid = None
        if budget is not None:
            rid = ray.get(budget.reserve.remote(worst_round_noise(fed.plan), release_z if reports else 0.0))
            # refused: one more round would take the run past privacy.target_epsilon. Rounds trained
            # since the last report are reported now if the budget still has room for the release
            if rid is None:
                last = ray.get(budget.reserve.remote(0.0, release_z)) if pending else None
                if last is not None:
                    _report(fed, own, budget, last, release_z, objectives, start_round, r, g, weight, 0.0)
                elif not reported:  # Tune wants the metrics once: NaN marks a trial that never reported
                    tune.report(
                        {k: float("nan") for k in (*METRIC_KEYS, *objectives)}
                        | {"round": r, "budget_stopped": True}
                    )
                break
        res = fed.train_round(start_round + r, g)
        g = res.global_params
        released = _round_release(dp, own, res.metrics)
        if reports:
            _report(fed, own, budget, rid, release_z, objectives, start_round, r + 1, g, weight, released)
            pending, reported = False, True
        else:
            pending = True
            if rid is not None:
                ray.get(budget.settle.remote(rid, released, 0.0))


def _round_release(dp, own, metrics: dict) -> float:
    """The noise multiplier the round released with (0: none, and none without DP), stepped in the
    trial's own accountant."""
    released = 0.0
    if dp.enabled:
        released = 0.0 if metrics.get("skipped") else dp.round_noise(metrics.get("secagg_survivors"))
        if released > 0:
            own.step(released, dp.sample_rate)
    return released


def _report(
    fed: Federation,
    own,
    budget,
    rid: int | None,
    release_z: float,
    objectives: set[str],
    start_round: int,
    done: int,
    g: np.ndarray,
    weight: float | None,
    released: float,
) -> None:
    """Release the trial's metrics after its `done`-th round (the panel's noised accuracies and the
    other objectives), settle reservation `rid` with what the round (`released`: its z, 0 for
    none) and the report spent, and report them to Tune with the model as the trial's checkpoint."""
    rounds_done = start_round + done
    metric = fed.private_metric(rounds_done, g, weight=weight)
    report = {
        **{k: metric[k] for k in METRIC_KEYS},
        "round": done,
        **trial_objectives(fed, objectives, rounds_done, g, weight),
    }
    if own is not None:
        own.release(release_z)
        if rid is not None:
            ray.get(budget.settle.remote(rid, released, release_z))
        report["epsilon"] = own.epsilon(fed.plan.dp.delta)
    with tempfile.TemporaryDirectory() as d:
        np.save(Path(d) / "global.npy", g)
        (Path(d) / TRIAL_STATE).write_text(
            json.dumps({"round": done, "own": own.state_dict() if own else None})
        )
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))


def trial_resources(cfg: ExperimentConfig) -> tune.PlacementGroupFactory:
    """The trial function (a sliver of CPU) plus one bundle per worker actor of its federation;
    the aggregator needs no CPU."""
    cpus, gpus = worker_resources(cfg)
    worker = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return tune.PlacementGroupFactory([{"CPU": 0.01}] + [worker] * cfg.ray.num_workers)


def check_fits(
    cfg: ExperimentConfig, pgf: tune.PlacementGroupFactory | None = None
) -> tune.PlacementGroupFactory:
    """The trial's placement group, or a ConfigError when this Ray cluster can never place it
    (Tune would wait for it forever)."""
    pgf = pgf or trial_resources(cfg)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    need = sum(b.get("CPU", 0.0) for b in pgf.bundles)
    if need > cpus + 1e-9:
        raise ConfigError(
            f"ray.num_cpus_per_worker: a trial needs {need:g} CPUs ({cfg.ray.num_workers} workers x "
            f"{cfg.ray.num_cpus_per_worker:g} + 0.01 for the trial) but the Ray cluster has {cpus:g}; "
            f"use fractional CPUs per worker"
        )
    return pgf


def make_trainable(
    cfg: ExperimentConfig,
    start: str | None = None,
    start_round: int = 0,
    budget=None,
    plan: FederationPlan | None = None,
    weight: float | None = None,
):
    """The trial function with its fixed arguments and resources (also what `Tuner.restore` needs:
    `resume_tune` passes a budget that continues the experiment's ledger). `plan`: the config's
    plan when the caller has built it already; `weight`: the learned privacy weight."""
    trainable = tune.with_parameters(
        federation_trial,
        plan=plan or FederationPlan.from_config(cfg),
        start=start,
        rounds=cfg.tune.rounds_per_trial,
        start_round=start_round,
        budget=budget,
        weight=weight,
    )
    return tune.with_resources(trainable, trial_resources(cfg))
