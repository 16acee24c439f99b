"""Metrics the paper's way (Schneider & Vlachos, "Personalization of Deep Learning", Sec. IV):
accuracy of the global model on the general data D_G, and on each individual's own test data D_I
before and after personalization, reported as mean, sd, min and max across individuals (the
fairness view: a good model is good for everyone, not only on average).

Everything is kept in long format (one row per round x metric x stat) so a run's history is one
tidy table for pandas, and per-individual accuracies in a second table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from fedmeta.sim.artifacts.durable import fsync_file, replace_durably

STATS = ("mean", "sd", "min", "max")


def describe(values: Iterable[float]) -> dict[str, float]:
    """mean / sd (sample, ddof=1) / min / max, ignoring NaN (an individual without test data)."""
    a = np.asarray(list(values), dtype=np.float64)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return {s: float("nan") for s in STATS}
    return {
        "mean": float(a.mean()),
        "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }


class MetricsLog:
    """Round metrics (long format) and per-individual evaluation results."""

    def __init__(self, rows: list[dict] | None = None, individuals: list[dict] | None = None):
        self.rows: list[dict] = list(rows or [])
        self.individuals: list[dict] = list(individuals or [])

    def add(self, rnd: int, metric: str, value: float, stat: str = "value") -> None:
        self.rows.append({"round": rnd, "metric": metric, "stat": stat, "value": float(value)})

    def add_many(self, rnd: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
                self.add(rnd, k, float(v))

    def add_eval(
        self,
        rnd: int,
        acc_dg: dict[str, float],
        client_ids: list[int],
        acc_global: np.ndarray,
        acc_pers: np.ndarray,
    ) -> dict[str, dict[str, float]]:
        out = {
            "acc_global_DG": acc_dg,
            "acc_global_DI": describe(acc_global),
            "acc_personalized_DI": describe(acc_pers),
        }
        for metric, stats in out.items():
            for s, v in stats.items():
                self.add(rnd, metric, v, s)
        self.individuals += [
            {"round": rnd, "client_id": int(c), "acc_global_DI": float(g), "acc_personalized_DI": float(p)}
            for c, g, p in zip(client_ids, acc_global, acc_pers)
        ]
        return out

    def last(self, metric: str) -> float | None:
        """The latest logged value of `metric`, or None."""
        return next((r["value"] for r in reversed(self.rows) if r["metric"] == metric), None)

    def truncate(self, last_round: int) -> "MetricsLog":
        """Rows up to and including `last_round` (what a checkpoint of that round saw)."""
        return MetricsLog(
            [r for r in self.rows if r["round"] <= last_round],
            [r for r in self.individuals if r["round"] <= last_round],
        )

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["round", "metric", "stat", "value"])

    def individuals_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            self.individuals, columns=["round", "client_id", "acc_global_DI", "acc_personalized_DI"]
        )

    def latest_eval(self) -> dict[str, dict[str, float]]:
        """The last evaluation's {metric: {stat: value}}."""
        df = self.frame()
        ev = df[df.metric.isin(["acc_global_DG", "acc_global_DI", "acc_personalized_DI"])]
        if ev.empty:
            return {}
        last = ev[ev["round"] == ev["round"].max()]
        return {m: {r.stat: r.value for r in g.itertuples()} for m, g in last.groupby("metric")}

    def save(self, run_dir: Path) -> None:
        """metrics.{parquet,csv} and individuals.{parquet,csv}, each written atomically."""
        for name, df in (("metrics", self.frame()), ("individuals", self.individuals_frame())):
            for ext in ("parquet", "csv"):
                tmp = run_dir / f".{name}.{ext}.tmp"
                df.to_parquet(tmp, index=False) if ext == "parquet" else df.to_csv(tmp, index=False)
                fsync_file(tmp)
                replace_durably(tmp, run_dir / f"{name}.{ext}")


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: write null instead."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def pareto_front(points: np.ndarray, directions: Iterable[str]) -> np.ndarray:
    """Indices of the non-dominated rows of `points` (trials x objectives); `directions[j]` is
    "max" or "min" for objective j. A row is dominated when another is at least as good in every
    objective and better in one; equal rows are all kept. Rows with a NaN never enter the front."""
    p = np.asarray(points, dtype=np.float64)
    sign = np.array([1.0 if d == "max" else -1.0 for d in directions])
    if p.ndim != 2 or p.shape[1] != len(sign):
        raise ValueError(f"pareto_front: points must be (trials, {len(sign)}), got shape {p.shape}")
    g = p * sign  # every objective maximized
    ok = ~np.isnan(g).any(axis=1)
    others = g[ok]
    front = []
    for i in np.flatnonzero(ok):
        dominated = ((others >= g[i]).all(axis=1) & (others > g[i]).any(axis=1)).any()
        if not dominated:
            front.append(int(i))
    return np.array(front, dtype=int)
