"""PNG plots of a run: accuracy over rounds, and the spread of per-individual accuracy."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from fedmeta.sim.metrics import MetricsLog  # noqa: E402

CURVES = {
    "acc_global_DG": "global model on D_G",
    "acc_global_DI": "global model on D_I",
    "acc_personalized_DI": "personalized on D_I",
}


def plot_run(log: MetricsLog, run_dir: Path) -> list[Path]:
    df = log.frame()
    out = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric, label in CURVES.items():
        d = df[df.metric == metric].pivot(index="round", columns="stat", values="value")
        if d.empty:
            continue
        ax.plot(d.index, d["mean"], marker="o", label=label)
        ax.fill_between(d.index, d["mean"] - d["sd"], d["mean"] + d["sd"], alpha=0.15)
    ax.set(xlabel="round", ylabel="accuracy", title="Accuracy over rounds (band: ±1 sd across individuals)")
    ax.legend()
    ax.grid(alpha=0.3)
    out.append(_save(fig, run_dir / "accuracy.png"))

    ind = log.individuals_frame()
    if not ind.empty:
        last = ind[ind["round"] == ind["round"].max()]
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = [i / 20 for i in range(21)]
        ax.hist(last["acc_global_DI"].dropna(), bins=bins, alpha=0.6, label="global model")
        ax.hist(last["acc_personalized_DI"].dropna(), bins=bins, alpha=0.6, label="personalized")
        ax.set(
            xlabel="accuracy on the individual's test data",
            ylabel="individuals",
            title=f"Per-individual accuracy, round {int(last['round'].iloc[0])}",
        )
        ax.legend()
        out.append(_save(fig, run_dir / "individuals.png"))
    return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
