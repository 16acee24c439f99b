"""`fedmeta bench --tune`: how many trials a searcher needs to reach a target accuracy, over
several seeds (the searchers compared on one workload; numbers, not timed tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray

from fedmeta.sim.config import ExperimentConfig, from_dict
from fedmeta.sim.engine.cluster import init_ray
from fedmeta.sim.engine.federation import Federation
from fedmeta.sim.engine.plan import FederationPlan


# ---------------------------------------------------------------- tuning after drift
def _trial_bests(results, metric: str) -> list[float]:
    """Each trial's best reported metric, in the order the trials started."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        if df is not None and len(df):
            rows.append((float(df["timestamp"].iloc[0]), float(df[metric].max())))
    return [best for _, best in sorted(rows)]


def trials_to_reach(bests: list[float], target: float) -> int | None:
    """1-based count of trials until the running best reaches `target` (None if never)."""
    running = -np.inf
    for i, b in enumerate(bests, 1):
        running = max(running, b)
        if running >= target:
            return i
    return None


def run_tune_bench(base: ExperimentConfig, seeds: Sequence[int] = (0,), **kwargs) -> dict:
    """`tune_bench_seed` for each seed (its own writers, searchers' seeds and noise), and the
    evidence across them: Bayesian trials to 95% of 4x random search's best per seed, and tuned
    vs untuned accuracy after the drift as mean and spread."""
    runs = []
    for seed in seeds:
        runs.append(tune_bench_seed(from_dict(base.model_dump(mode="json") | {"seed": int(seed)}), **kwargs))
        runs[-1]["seed"] = int(seed)
    tuned, untuned = np.array([r["tuned_acc"] for r in runs]), np.array([r["untuned_acc"] for r in runs])
    reached = [r["bo_trials_to_95"] for r in runs]
    sd = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0  # noqa: E731
    return {
        "metric": runs[0]["metric"],
        "seeds": [r["seed"] for r in runs],
        "runs": runs,
        "bo_trials_to_95_seeds": reached,
        "bo_reached_95": sum(x is not None for x in reached),
        "tuned_acc_mean": float(tuned.mean()),
        "tuned_acc_sd": sd(tuned),
        "untuned_acc_mean": float(untuned.mean()),
        "untuned_acc_sd": sd(untuned),
        "tuned_minus_untuned": [float(d) for d in tuned - untuned],
        "tuned_beats_untuned": bool(tuned.mean() > untuned.mean()),
    }


def tune_bench_seed(
    base: ExperimentConfig,
    pre_rounds: int = 10,
    post_rounds: int = 5,
    bo_trials: int = 6,
    out_dir: Path | None = None,
) -> dict:
    """After a drift: the federation continued with its old hyperparameters (untuned) against the
    best Tune trial (Optuna's `tune.sampler`, `bo_trials` trials, told what the old ones reach),
    plus random search with 4x the trials, and how many Bayesian trials reach 95% of random
    search's best."""
    import tempfile

    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="fedmeta-bench-tune-"))
    metric = base.tune.metric
    started = init_ray(base.ray.address, base.ray.connect_timeout_s)
    try:
        g, start_dir = _train_before_drift(base, pre_rounds, out_dir)
        untuned = _continue_untuned(base, g, pre_rounds, post_rounds, metric)
        bo, rnd = _search_after_drift(
            base, out_dir, start_dir, pre_rounds, post_rounds, bo_trials, untuned[-1]
        )
    finally:
        if started:
            ray.shutdown()
    return _tune_evidence(bo, rnd, metric, untuned, pre_rounds, post_rounds, out_dir)


def _train_before_drift(base: ExperimentConfig, pre_rounds: int, out_dir: Path) -> tuple[np.ndarray, Path]:
    """Before the drift: a federation trained with the base hyperparameters, checkpointed; returns
    its model and the checkpoint's folder."""
    pre = from_dict(
        base.model_dump(mode="json")
        | {"data": {**base.data.model_dump(mode="json"), "drift": {"at_round": None}}}
    )
    fed = Federation(FederationPlan.from_config(pre))
    g = fed.plan.init_params
    for r in range(pre_rounds):
        g = fed.train_round(r, g).global_params
    fed.shutdown()
    from fedmeta.sim import checkpoint as ckpt

    start_dir = out_dir / "pre-drift"
    start_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save(start_dir, ckpt.Checkpoint(round=pre_rounds, global_params=g))
    return g, start_dir


def _continue_untuned(
    base: ExperimentConfig, g: np.ndarray, pre_rounds: int, post_rounds: int, metric: str
) -> list[float]:
    """After the drift, untuned: the same hyperparameters continue; the metric after each round."""
    fed = Federation(FederationPlan.from_config(base))
    untuned, gu = [], g
    for r in range(pre_rounds, pre_rounds + post_rounds):
        gu = fed.train_round(r, gu).global_params
        untuned.append(fed.private_metric(r + 1, gu)[metric])
    fed.shutdown()
    return untuned


def _search_after_drift(
    base: ExperimentConfig,
    out_dir: Path,
    start_dir: Path,
    pre_rounds: int,
    post_rounds: int,
    bo_trials: int,
    warm_result: float,
):
    """The Bayesian search and random search with 4x its trials, both from the pre-drift checkpoint:
    their Tune results."""
    import copy

    from fedmeta.sim.tuning.tune import build_tuner

    tuned_cfg = copy.deepcopy(base.model_dump(mode="json"))
    # the Bayesian search proposes one trial at a time (each proposal sees every result so far),
    # and is told what the pre-drift values reach (the untuned curve) instead of rerunning them
    tuned_cfg["tune"].update(
        rounds_per_trial=post_rounds, num_samples=bo_trials, searcher="optuna", max_concurrent=1
    )
    bo = build_tuner(
        from_dict(tuned_cfg), out_dir, "bo", str(start_dir), pre_rounds, warm_result=warm_result
    ).fit()
    tuned_cfg["tune"].update(
        num_samples=4 * bo_trials, searcher="random", max_concurrent=base.tune.max_concurrent
    )
    rnd = build_tuner(from_dict(tuned_cfg), out_dir, "random", str(start_dir), pre_rounds).fit()
    return bo, rnd


def _tune_evidence(
    bo, rnd, metric: str, untuned: list[float], pre_rounds: int, post_rounds: int, out_dir: Path
) -> dict:
    """The untuned and best tuned curves, each trial's best, and the Bayesian trials to 95% of
    random search's best."""
    best = bo.get_best_result(metric=metric, mode="max")
    tuned_curve = [float(v) for v in best.metrics_dataframe[metric]]
    bo_bests, random_bests = _trial_bests(bo, metric), _trial_bests(rnd, metric)
    target = 0.95 * max(random_bests)
    return {
        "metric": metric,
        "pre_rounds": pre_rounds,
        "post_rounds": post_rounds,
        "untuned_curve": untuned,
        "tuned_curve": tuned_curve,
        "untuned_acc": untuned[-1],
        "tuned_acc": tuned_curve[-1],
        "best_config": best.config,
        "bo_trial_bests": bo_bests,
        "random_trial_bests": random_bests,
        "random_best": max(random_bests),
        "bo_trials_to_95": trials_to_reach(bo_bests, target),
        "bo_trials": len(bo_bests),
        "random_trials": len(random_bests),
        "experiment": str(out_dir),
    }
