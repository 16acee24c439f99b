"""Federated hyperparameter optimization with Ray Tune (`fedmeta tune`).

Each trial continues the federation from a global checkpoint under its own hyperparameters for a
few rounds, on its own actor pool (workers + aggregator inside the trial's placement group), and
reports after every round the tuning metric: the evaluation panel's acc(D_I) aggregated by the
aggregator from per-worker sums (with DP noise when DP is on), never from any client's raw data.
The searcher is Optuna's TPE through Tune's `OptunaSearch` (a Bayesian optimizer) or random
search, with a concurrency limit; ASHA stops weak trials early. The best trial's model is written
as a member checkpoint with a model card, a *candidate* that `serve` can shadow-test.

The experiment directory is a normal Tune experiment (`tune.Tuner.restore` works on it).
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from sim import checkpoint as ckpt
from sim.cluster import init_ray, worker_resources
from sim.config import ExperimentConfig, TuneParam, from_dict
from sim.federation import Federation
from sim.plan import FederationPlan, input_profile

METRIC_KEYS = ("acc_personalized_DI", "acc_global_DI")


def search_space(params: list[TuneParam]) -> dict:
    """Tune's search space from the config's parameter list (key path -> distribution)."""
    space = {}
    for p in params:
        if p.integer:
            space[p.key] = tune.randint(int(p.low), int(p.high) + 1)
        elif p.log:
            space[p.key] = tune.loguniform(p.low, p.high)
        else:
            space[p.key] = tune.uniform(p.low, p.high)
    return space


def apply_params(raw: dict, params: dict) -> dict:
    """A copy of the raw experiment config with dotted keys (e.g. 'algorithm.lr') set."""
    raw = copy.deepcopy(raw)
    for dotted, value in params.items():
        node = raw
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = int(value) if isinstance(value, (np.integer,)) else value
    return raw


def federation_trial(params: dict, plan: FederationPlan, start: str | None, rounds: int, start_round: int) -> None:
    """Tune's function trainable: a few rounds of the federation under `params`, from the base
    plan (data, initial model and noise decided once on the driver)."""
    cfg = from_dict(apply_params(plan.cfg.model_dump(mode="json"), params))
    fed = Federation(plan.with_config(cfg))
    try:
        g = ckpt.load(Path(start)).global_params if start else fed.plan.init_params
        for r in range(rounds):
            res = fed.train_round(start_round + r, g)
            g = res.global_params
            metric = fed.private_metric(start_round + r + 1, g)
            with tempfile.TemporaryDirectory() as d:
                np.save(Path(d) / "global.npy", g)
                tune.report({**{k: metric[k] for k in METRIC_KEYS}, "round": r + 1},
                            checkpoint=tune.Checkpoint.from_directory(d))
    finally:
        fed.shutdown()


def trial_resources(cfg: ExperimentConfig) -> tune.PlacementGroupFactory:
    """The trial function (a sliver of CPU) plus one bundle per worker actor of its federation;
    the aggregator needs no CPU."""
    cpus, gpus = worker_resources(cfg)
    worker = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return tune.PlacementGroupFactory([{"CPU": 0.01}] + [worker] * cfg.ray.num_workers)


def make_trainable(cfg: ExperimentConfig, start: str | None = None, start_round: int = 0):
    """The trial function with its fixed arguments and resources (also what `Tuner.restore` needs)."""
    trainable = tune.with_parameters(federation_trial, plan=FederationPlan.from_config(cfg), start=start,
                                     rounds=cfg.tune.rounds_per_trial, start_round=start_round)
    return tune.with_resources(trainable, trial_resources(cfg))


def build_tuner(cfg: ExperimentConfig, storage: Path, name: str, start: str | None = None,
                start_round: int = 0) -> tune.Tuner:
    t = cfg.tune
    searcher = None
    if t.searcher == "optuna":
        searcher = ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=t.max_concurrent)
    scheduler = ASHAScheduler(time_attr="round", max_t=t.rounds_per_trial, grace_period=min(t.grace_period, t.rounds_per_trial),
                              reduction_factor=t.reduction_factor)
    return tune.Tuner(
        make_trainable(cfg, start, start_round),
        param_space=search_space(t.params),
        tune_config=tune.TuneConfig(metric=t.metric, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=t.num_samples, max_concurrent_trials=t.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(storage.resolve()), verbose=0),
    )


def run_tune(cfg: ExperimentConfig, start: str | None = None, start_round: int = 0,
             out_dir: Path | None = None, name: str = "tune") -> dict:
    """Search, then write the best trial's model as a candidate member. Returns a summary."""
    storage = Path(out_dir or Path(cfg.run.out_dir) / "tune")
    started = init_ray(cfg.ray.address, cfg.ray.connect_timeout_s)
    try:
        results = build_tuner(cfg, storage, name, start, start_round).fit()
    finally:
        if started:
            ray.shutdown()
    best = results.get_best_result(metric=cfg.tune.metric, mode="max")
    if best.checkpoint is None:
        raise RuntimeError(f"tune: no trial reported a result; first error: {results.errors[:1]}")
    params = np.load(Path(best.checkpoint.path) / "global.npy")
    tuned = from_dict(apply_params(cfg.model_dump(mode="json"), best.config))
    candidate = write_candidate(tuned, params, storage / name / "candidate", best.metrics, best.config)
    curves = [[float(v) for v in r.metrics_dataframe[cfg.tune.metric]] for r in results if r.metrics_dataframe is not None]
    summary = {"experiment": str(storage / name), "best_config": best.config,
               "best_metric": float(best.metrics[cfg.tune.metric]), "metric": cfg.tune.metric,
               "trials": len(results), "candidate": str(candidate), "curves": curves}
    (storage / name / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def write_candidate(cfg: ExperimentConfig, params: np.ndarray, out: Path, metrics: dict, config: dict) -> Path:
    """The tuned model as a member checkpoint whose card records the tuned hyperparameters."""
    from sim.data import build_dataset

    data = build_dataset(cfg.data, cfg.seed)
    shape, classes = list(data.input_shape), data.num_classes
    quality = {k: float(metrics[k]) for k in METRIC_KEYS if k in metrics}
    return ckpt.save_member(out, cfg.model.model_dump(mode="json"), params, shape, classes,
                            input_profile(data, cfg.seed), quality, tuned=config,
                            adaptation={"lr": cfg.eval.finetune_lr, "steps": cfg.eval.finetune_steps,
                                        "local_lr": cfg.algorithm.lr}).parent

