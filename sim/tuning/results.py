"""What a search leaves behind: its summary (best trial, epsilon spent), the Pareto front of a
multi-objective search (pareto.csv), and each chosen trial's model as a candidate member checkpoint
with a model card, which `fedmeta serve` can shadow-test."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.config import ExperimentConfig, from_dict
from fedmeta.sim.engine.plan import input_profile
from fedmeta.sim.metrics import pareto_front
from fedmeta.sim.run.card_stats import exact_statistics
from fedmeta.sim.tuning.trial import (
    METRIC_KEYS,
    TuningBudgetSpent,
    apply_params,
)


def summarize(
    cfg: ExperimentConfig, results, experiment: Path, spent: dict | None, weight: float | None = None
) -> dict:
    """The best trial by `tune.metric` (or by the first objective) as the candidate; the Pareto
    front of a multi-objective search; the privacy the search spent."""
    t = cfg.tune
    rank_by, rank_mode = (
        (t.objectives[0].metric, t.objectives[0].direction) if t.objectives else (t.metric, "max")
    )
    done = [
        r
        for r in results
        if r.checkpoint is not None and r.metrics and np.isfinite(r.metrics.get(rank_by, np.nan))
    ]
    if not done and spent and not spent["reserved_rounds"]:
        raise TuningBudgetSpent(
            f"tune: privacy.target_epsilon {cfg.privacy.target_epsilon} leaves no budget for a "
            f"single trial round (spent so far: epsilon {spent['epsilon_total']:.3f})"
        )
    if not done:
        raise RuntimeError(f"tune: no trial reported a result; first error: {results.errors[:1]}")
    best = (max if rank_mode == "max" else min)(done, key=lambda r: r.metrics[rank_by])
    total = spent["epsilon_total"] if spent else None  # the run's, training and tuning: on every card
    candidate = _candidate(cfg, best, experiment / "candidate", weight, total)
    curves = [
        [float(v) for v in r.metrics_dataframe[t.metric]]
        for r in results
        if r.metrics_dataframe is not None and t.metric in r.metrics_dataframe
    ]
    summary = {
        "experiment": str(experiment),
        "best_config": best.config,
        "best_metric": float(best.metrics[t.metric]),
        "metric": t.metric,
        "trials": len(results),
        "candidate": str(candidate),
        "curves": curves,
        "epsilon_tuning": spent["epsilon_tuning"] if spent else None,
        "epsilon_total": spent["epsilon_total"] if spent else None,
        "privacy_state": spent["accountant_state"] if spent else None,
        "privacy_weight": weight,
    }
    if t.objectives:
        summary.update(
            objectives=[{"metric": o.metric, "mode": o.direction} for o in t.objectives],
            pareto=write_pareto(cfg, done, experiment, weight, total),
        )
    return summary


def write_pareto(
    cfg: ExperimentConfig,
    done: list,
    experiment: Path,
    weight: float | None = None,
    epsilon_total: float | None = None,
) -> list[dict]:
    """The non-dominated trials (their configs, objective values and candidate members), also as
    `pareto.csv` in the experiment directory."""
    objectives = cfg.tune.objectives
    points = np.array([[r.metrics.get(o.metric, np.nan) for o in objectives] for r in done], dtype=np.float64)
    front = []
    for i in pareto_front(points, [o.direction for o in objectives]):
        r = done[i]
        member = _candidate(cfg, r, experiment / "pareto" / Path(r.path).name, weight, epsilon_total)
        front.append(
            {
                "trial": Path(r.path).name,
                **{o.metric: float(r.metrics[o.metric]) for o in objectives},
                "config": r.config,
                "candidate": str(member),
            }
        )
    keys = sorted({k for row in front for k in row["config"]})
    with open(experiment / "pareto.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", *[o.metric for o in objectives], *keys, "candidate"])
        for row in front:
            w.writerow(
                [
                    row["trial"],
                    *[row[o.metric] for o in objectives],
                    *[row["config"].get(k) for k in keys],
                    row["candidate"],
                ]
            )
    return front


def _candidate(
    cfg: ExperimentConfig, result, out: Path, weight: float | None = None, epsilon_total: float | None = None
) -> Path:
    params = np.load(Path(result.checkpoint.path) / "global.npy")
    tuned = from_dict(apply_params(cfg.model_dump(mode="json"), result.config))
    metrics = {**result.metrics, **({"epsilon_total": epsilon_total} if epsilon_total is not None else {})}
    return write_candidate(tuned, params, out, metrics, result.config, weight)


CANDIDATE_STATISTICS = (
    "input_profile: exact statistics of the profile clients' training inputs, outside epsilon; "
    "quality: the trial's reported metrics (under DP the tuning's noised, accounted releases)"
)


def write_candidate(
    cfg: ExperimentConfig,
    params: np.ndarray,
    out: Path,
    metrics: dict,
    config: dict,
    weight: float | None = None,
) -> Path:
    """The tuned model as a member checkpoint whose card records the tuned hyperparameters and how
    to personalize it (`weight`: the learned privacy weight the trials used, else the algorithm's)."""
    from fedmeta.sim.data import build_dataset

    data = build_dataset(cfg.data, cfg.seed)
    shape, classes = list(data.input_shape), data.num_classes
    # epsilon: the trial's own rounds and reports; epsilon_total: the whole run's, training and tuning
    quality = {
        k: float(metrics[k])
        for k in (*METRIC_KEYS, "latency_ms", "mia_auc", "epsilon", "epsilon_total")
        if k in metrics
    }
    return ckpt.save_member(
        out,
        cfg.model.model_dump(mode="json"),
        params,
        shape,
        classes,
        input_profile(data, cfg.seed),
        quality,
        tuned=config,
        statistics_privacy=exact_statistics(CANDIDATE_STATISTICS),
        adaptation={
            "lr": cfg.eval.finetune_lr,
            "steps": cfg.eval.finetune_steps,
            "local_lr": cfg.algorithm.lr,
            "privacy_weight": build_algorithm(cfg.algorithm).privacy_weight if weight is None else weight,
        },
    ).parent
