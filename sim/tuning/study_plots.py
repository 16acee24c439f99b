"""PNG plots of a scaling study, plain functions of its table (study.parquet: one row per cell and
seed; the grid keys are the columns before `seed`). No Ray here: `fedmeta study report DIR`
re-plots a finished study anywhere.

Which plots come out depends on the keys that vary:
* `ray.num_workers`: throughput against workers (strong scaling) with the ideal linear line;
* `federation.clients_per_round`: accuracy, and bytes per client, against the cohort size;
* `secagg.neighbors`: the secure aggregation's cost (s/round, bytes up per client) against k;
* any other varied key: each main metric against it.
Each line is one combination of the other varied keys; with several seeds per cell the points are
the mean over seeds and the error bars one sd.
"""

from __future__ import annotations

import math
from pathlib import Path

# Agg canvases on plain Figures, not pyplot: files only, and no global backend switch under the
# caller (a notebook importing sim.study keeps its inline plots)
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedmeta.sim.config import ConfigError

ID_COLUMNS = ("seed", "run_dir")
METRICS = (
    "clients_per_s",
    "s_per_round",
    "peak_rss_mib",
    "bytes_up_per_client",
    "bytes_down_per_client",
    "sim_time_s",
    "time_to_target_s",
    "acc_personalized_DI",
    "acc_global_DI",
    "acc_global_DG",
    "epsilon",
    "mia_auc",
    "mia_auc_personalized",
    "mia_auc_individual",
    "privacy_weight",
)
LABELS = {
    "clients_per_s": "clients / s",
    "s_per_round": "s / round",
    "peak_rss_mib": "peak RSS (MiB)",
    "bytes_up_per_client": "bytes up / client",
    "bytes_down_per_client": "bytes down / client",
    "sim_time_s": "simulated time (s)",
    "time_to_target_s": "simulated time to target (s)",
    "acc_personalized_DI": "acc(D_I), personalized",
    "acc_global_DI": "acc(D_I), global model",
    "acc_global_DG": "acc(D_G), global model",
    "epsilon": "DP epsilon",
    "mia_auc": "membership-inference AUC",
    "mia_auc_personalized": "membership-inference AUC, personalized",
    "mia_auc_individual": "membership-inference AUC per individual, personalized",
    "privacy_weight": "privacy weight lambda",
}
MAIN = (
    "clients_per_s",
    "s_per_round",
    "acc_personalized_DI",
    "acc_global_DI",
    "bytes_up_per_client",
    "sim_time_s",
    "time_to_target_s",
    "epsilon",
    "mia_auc",
)
SPECIAL = ("ray.num_workers", "federation.clients_per_round", "secagg.neighbors")
AXES = {
    "ray.num_workers": "worker actors (ray.num_workers)",
    "federation.clients_per_round": "clients per round",
    "secagg.neighbors": "secagg.neighbors k (null: complete graph)",
}


def grid_keys(df: pd.DataFrame) -> list[str]:
    """The grid's dotted keys: the table's columns before `seed`."""
    return list(df.columns[: list(df.columns).index("seed")])


def varied_keys(df: pd.DataFrame) -> list[str]:
    return [k for k in grid_keys(df) if df[k].nunique(dropna=False) > 1]


def seeds_per_cell(df: pd.DataFrame) -> int:
    keys = grid_keys(df)
    return int(df.groupby(keys, dropna=False, sort=False).size().max()) if keys and len(df) else 1


def has_data(df: pd.DataFrame, metric: str) -> bool:
    return metric in df and df[metric].notna().any()


def plot_study(df: pd.DataFrame, out: Path) -> list[Path]:
    """Every plot the varied keys call for, written into `out`; returns their paths."""
    varied = varied_keys(df)
    paths = []
    if "ray.num_workers" in varied and has_data(df, "clients_per_s"):
        paths.append(strong_scaling(df, out / "strong_scaling.png"))
    if "federation.clients_per_round" in varied:
        paths.append(
            panels(
                df,
                "federation.clients_per_round",
                ("acc_personalized_DI", "acc_global_DI"),
                out / "accuracy_vs_clients_per_round.png",
                "Accuracy against cohort size",
            )
        )
        paths.append(
            panels(
                df,
                "federation.clients_per_round",
                ("bytes_up_per_client", "bytes_down_per_client"),
                out / "bytes_vs_clients_per_round.png",
                "Communication per client against cohort size",
            )
        )
    if "secagg.neighbors" in varied:
        paths.append(
            panels(
                df,
                "secagg.neighbors",
                ("s_per_round", "bytes_up_per_client"),
                out / "secagg_overhead.png",
                "Secure aggregation's cost against neighbours k",
            )
        )
    for key in varied:
        if key not in SPECIAL:
            paths.append(panels(df, key, MAIN, out / f"metrics_vs_{key}.png", f"Metrics against {key}"))
    return [p for p in paths if p is not None]


def report(directory: Path) -> list[Path]:
    """Re-plot a study directory from its study.parquet (`fedmeta study report DIR`)."""
    table = Path(directory) / "study.parquet"
    if not table.is_file():
        raise ConfigError(f"{directory}: no study.parquet (not a finished study directory)")
    return plot_study(pd.read_parquet(table), Path(directory))


def summarize(df: pd.DataFrame, x: str, metric: str) -> pd.DataFrame:
    """Mean and sd (over seeds) of `metric` per value of `x`, in the grid's order."""
    g = df.groupby(x, dropna=False, sort=False)[metric]
    return pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1), "n": g.count()}).reset_index()


def lines(df: pd.DataFrame, x: str) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per combination of the other varied keys (one line each)."""
    others = [k for k in varied_keys(df) if k != x]
    if not others:
        return [("", df)]
    groups = df.groupby(others, dropna=False, sort=False)
    return [
        (
            ", ".join(f"{k}={_show(v)}" for k, v in zip(others, key if isinstance(key, tuple) else (key,))),
            rows,
        )
        for key, rows in groups
    ]


def plot_metric(ax, df: pd.DataFrame, x: str, metric: str, style: str = "-o", prefix: str = "") -> None:
    """One line per combination of the other varied keys; error bars when a cell has several seeds."""
    numeric = _numeric(df[x])
    ticks = list(dict.fromkeys(_show(v) for v in df[x].tolist()))  # categorical axis: the grid's order
    for label, rows in lines(df, x):
        s = summarize(rows, x, metric)
        if numeric:
            s = s.sort_values(x)
        xs = s[x].astype(float) if numeric else [ticks.index(_show(v)) for v in s[x].tolist()]
        yerr = s["sd"] if (s["n"] > 1).any() else None
        ax.errorbar(
            xs, s["mean"], yerr=yerr, fmt=style, capsize=3, label=(prefix + label).strip(", ") or None
        )
    _ticks(ax, df[x], numeric, ticks)
    ax.set(xlabel=AXES.get(x, x), ylabel=LABELS.get(metric, metric))
    ax.grid(alpha=0.3)


def _ticks(ax, col: pd.Series, numeric: bool, names: list[str]) -> None:
    """Categories by name; a few numbers at exactly the grid's values (no 2.5 workers)."""
    if not numeric:
        ax.set_xticks(range(len(names)), names)
    elif col.nunique() <= 10:
        values = sorted(set(col.tolist()))
        ax.set_xticks(values, [_show(v) for v in values])


def panels(df: pd.DataFrame, x: str, metrics, path: Path, title: str) -> Path | None:
    """One panel per metric that has data; None (no file) when none has."""
    metrics = [m for m in metrics if has_data(df, m)]
    if not metrics:
        return None
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        plot_metric(ax, df, x, metric)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle(title + _bars_note(df), fontsize=10)
    return _save(fig, path)


def strong_scaling(df: pd.DataFrame, path: Path) -> Path:
    """Throughput against workers, with the ideal line: the fewest workers' throughput, scaled linearly."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    x = "ray.num_workers"
    for label, rows in lines(df, x):
        s = summarize(rows, x, "clients_per_s").sort_values(x)
        yerr = s["sd"] if (s["n"] > 1).any() else None
        line = ax.errorbar(s[x], s["mean"], yerr=yerr, fmt="-o", capsize=3, label=label or "measured")
        w0, t0 = float(s[x].iloc[0]), float(s["mean"].iloc[0])
        ax.plot(
            s[x],
            t0 * s[x].astype(float) / w0,
            "--",
            color=line[0].get_color(),
            alpha=0.6,
            label=f"ideal (linear){', ' + label if label else ''}",
        )
    _ticks(ax, df[x], True, [])
    ax.set(xlabel=AXES[x], ylabel=LABELS["clients_per_s"])
    ax.set_title("Strong scaling: throughput against workers" + _bars_note(df), fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _bars_note(df: pd.DataFrame) -> str:
    n = seeds_per_cell(df)
    return f"\n(mean ± sd over {n} seeds)" if n > 1 else ""


def _numeric(col: pd.Series) -> bool:
    """A number line for int/float values; booleans, text and null are categories."""
    return all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and not pd.isna(v) for v in col.tolist()
    )


def _show(v) -> str:
    """A grid value as the study file writes it (null, true, 20; not None, True, 20.0)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "null"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).lower() if isinstance(v, bool) else str(v)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
