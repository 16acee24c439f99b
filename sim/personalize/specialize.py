"""Specialized ensemble members from a finished run: one per group of similar individuals.

The run's last evaluation left each evaluated individual's personalized parameters in
`personalized/<id>.npy`. Each individual also summarizes its own training inputs as per-feature
mean and variance (aggregated statistics, not data). The individuals are grouped by those means
(k-means, scikit-learn), and each group becomes a member: the average of its individuals'
personalized parameters (federated averaging within the group), with the group's pooled input
profile and mean personalized accuracy in its model card, ready for `fedmeta serve`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from fedmeta.sim.artifacts.rundir import resume_config
from fedmeta.sim.checkpoint import load, save_member
from fedmeta.sim.data import build_dataset
from fedmeta.sim.run.card_stats import exact_statistics

GROUP_STATISTICS = (
    "input_profile and quality: the exact pooled input statistics and mean personalized accuracy "
    "of the group's individuals, outside epsilon (the run's own card releases them under DP)"
)


def input_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """What a device shares about its inputs: per-feature mean and variance, and the count."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    return flat.mean(0), flat.var(0), len(flat)


def pooled_profile(stats: list[tuple[np.ndarray, np.ndarray, int]]) -> dict:
    """Mean and variance of the union of several individuals' inputs, from their statistics alone
    (law of total variance)."""
    n = np.array([s[2] for s in stats], dtype=np.float64)
    means = np.stack([s[0] for s in stats])  # (individuals, features)
    variances = np.stack([s[1] for s in stats])
    mean = (n[:, None] * means).sum(0) / n.sum()
    var = (n[:, None] * (variances + (means - mean) ** 2)).sum(0) / n.sum()
    return {"mean": mean.tolist(), "var": var.tolist(), "n": int(n.sum())}


def group_individuals(means: np.ndarray, groups: int, seed: int) -> np.ndarray:
    """Group label per individual from their input means (k-means with a fixed seed)."""
    if not 1 <= groups <= len(means):
        raise ValueError(
            f"--groups: must be in 1..{len(means)} (the individuals with personalized models), got {groups}"
        )
    return KMeans(n_clusters=groups, n_init=10, random_state=seed).fit_predict(means)


def specialize(
    run_dir: Path, groups: int, out_dir: Path | None = None, trust_code: bool = False
) -> list[Path]:
    """Write one member checkpoint per group under `out_dir` (default RUN_DIR/members). The run
    directory is data: a custom model or algorithm its config names is refused unless `trust_code`."""
    run_dir = Path(run_dir)
    files = sorted((run_dir / "personalized").glob("*.npy"), key=lambda f: int(f.stem))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no personalized/*.npy (a finished fedmeta run exports them)")
    cfg = resume_config(run_dir, trust_code)
    card = load(run_dir).model_card
    data = build_dataset(cfg.data, cfg.seed)
    ids = [int(f.stem) for f in files]
    stats = [input_stats(c.x_train.numpy()) for c in data.clients(ids)]  # each device's own summary
    labels = group_individuals(np.stack([s[0] for s in stats]), groups, cfg.seed)
    ind = pd.read_parquet(run_dir / "individuals.parquet")
    last = ind[ind["round"] == ind["round"].max()].set_index("client_id")["acc_personalized_DI"]
    out_dir = Path(out_dir) if out_dir else run_dir / "members"
    written = []
    for g in range(groups):
        members = [i for i, lab in zip(range(len(ids)), labels) if lab == g]
        params = np.mean([np.load(files[i]) for i in members], axis=0)  # averaging within the group
        quality = float(last.reindex([ids[i] for i in members]).mean())
        path = save_member(
            out_dir / f"group-{g}",
            card["model"]["config"],
            params,
            card["data_schema"]["input_shape"],
            card["data_schema"]["num_classes"],
            pooled_profile([stats[i] for i in members]),
            {"acc_global_DI": quality, "acc_personalized_DI": quality},
            group={"individuals": [ids[i] for i in members], "source_run": str(run_dir)},
            adaptation=card.get("adaptation"),
            privacy=card.get("privacy"),
            statistics_privacy=exact_statistics(GROUP_STATISTICS),
        )
        written.append(path.parent)
    return written
