"""What a run reports: the summary (summary.json) and the model card in every checkpoint. Both
read the same facts: the plan, the run's state, and the privacy accounting's `facts()`."""

from __future__ import annotations

import math
from pathlib import Path

from fedmeta.actors.privacy import RunAccounting
from fedmeta.actors.secagg.policy import secagg_guarantee
from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.checkpoint import MODEL_CARD_FORMAT
from fedmeta.sim.config import ExperimentConfig
from fedmeta.sim.engine.faults import FAULT_KEYS
from fedmeta.sim.engine.plan import FederationPlan
from fedmeta.sim.metrics import MetricsLog, describe, finite_or_none
from fedmeta.sim.run.card_stats import card_statistics


def secagg_facts(plan: FederationPlan) -> dict:
    off = {
        "secure_aggregation": False,
        "secagg_neighbors": None,
        "secagg_threshold": None,
        "secagg_bits": None,
    }
    return plan.secagg.facts() if plan.secagg else off


def secagg_targets_facts(plan: FederationPlan) -> dict | None:
    """The targets secure aggregation's graph is held to (secagg.dropout_rate, adversarial_fraction,
    security_bits, correctness_bits) and what the resolved k and t achieve, in bits."""
    if plan.secagg is None:
        return None
    got = secagg_guarantee(plan.cfg, plan.secagg)
    return {
        "neighbors_setting": plan.cfg.secagg.neighbors,
        "cohort": got.n,
        "complete_graph": got.complete,
        **got.summary(),
    }


def secrets_facts(cfg: ExperimentConfig) -> dict:
    """Where the keys, masks and noise came from, and what that means for the guarantee."""
    if cfg.run.seeded_secrets:
        return {
            "secrets": "seeded",
            "secrets_note": "run.seeded_secrets: cohorts, keys, masks and noise follow from the seed, so this run's "
            "privacy holds only against parties that do not know the seed",
        }
    return {"secrets": "csprng", "secrets_note": None}


def model_card(
    plan: FederationPlan,
    rounds_done: int,
    accounting: RunAccounting,
    log: MetricsLog,
    released: dict | None = None,
) -> dict:
    """What a serving or tuning process needs to use a checkpoint without the experiment config:
    how to rebuild the model, the data it expects, how to adapt it to a user, and the privacy spent
    to produce it. Refreshed at every checkpoint. `released`: under DP, the input profile and panel
    quality as released (sim/run/card_stats.py); only those ship, never the exact ones."""
    cfg = plan.cfg
    ev = log.latest_eval()
    stats = card_statistics(plan, ev, released)
    facts, sa = accounting.facts(), secagg_facts(plan)
    learned = log.last("privacy_weight")
    return {
        "format": MODEL_CARD_FORMAT,
        "supports_federated_meta_learning": True,
        "algorithm": cfg.algorithm.name,
        "model": {"config": cfg.model.model_dump(mode="json"), "n_params": plan.n_params},
        "data_schema": _data_schema(plan),
        "input_profile": stats["input_profile"],
        "quality": stats["quality"],
        "statistics_privacy": stats["statistics_privacy"],
        "adaptation": _adaptation(cfg, learned),
        "privacy": {
            **{k: v for k, v in facts.items() if k != "local_dp"},
            **{k: v for k, v in sa.items() if k != "secagg_bits"},
            "local_dp": facts["local_dp"],
            **secrets_facts(cfg),
        },
        "training": {
            "rounds_completed": rounds_done,
            "rounds_planned": cfg.federation.rounds,
            "seed": cfg.seed,
            "clients_per_round": cfg.federation.clients_per_round,
            "num_clients": plan.num_clients,
        },
    }


def _data_schema(plan: FederationPlan) -> dict:
    """The model card's description of the inputs the model expects."""
    cfg = plan.cfg
    return {
        "kind": cfg.data.kind,
        "input_shape": list(plan.input_shape),
        "num_classes": plan.num_classes,
        "dtype": "float32",
        "layout": "NCHW" if len(plan.input_shape) == 3 else "features",
        "value_range": [0.0, 1.0] if cfg.data.kind == "writers" else None,
    }


def _adaptation(cfg: ExperimentConfig, learned: float | None) -> dict:
    """How to adapt the model to a user: the evaluation's fine-tuning and the algorithm's local
    training, with the privacy weight `learned` over the run (None: the algorithm's own)."""
    a, e = cfg.algorithm, cfg.eval
    return {
        "method": "sgd_finetune",
        "lr": e.finetune_lr,
        "steps": e.finetune_steps,
        "batch_size": e.batch_size,
        "local_lr": a.lr,
        "inner_lr": a.inner_lr,
        "server_lr": a.server_lr,
        "local_epochs": a.local_epochs,
        "local_steps": a.local_steps,
        "local_batch_size": a.batch_size,
        "privacy_lambda": a.privacy_lambda,
        # the personalization's proximal privacy weight: learned (sim/run/leakage.py) or the algorithm's own
        "privacy_weight": learned if learned is not None else build_algorithm(a).privacy_weight,
    }


def run_summary(plan: FederationPlan, state, run_dir: Path, peak_rss: float) -> dict:
    """summary.json: the fairness statistics of the last evaluation, throughput, and privacy."""
    cfg = plan.cfg
    log = state.log
    ev = log.latest_eval()
    clean = lambda d: {k: finite_or_none(v) for k, v in d.items()}  # noqa: E731
    pers, glob = ev.get("acc_personalized_DI", {}), ev.get("acc_global_DI", {})
    rounds, secs = state.rounds_done, state.train_seconds
    return {
        "rounds": rounds,
        "num_clients": plan.num_clients,
        "clients_per_round": cfg.federation.clients_per_round,
        "algorithm": cfg.algorithm.name,
        "personalization": build_algorithm(cfg.algorithm).describe_personalization(),
        # the personalization's privacy weight at the end (learned, sim/run/leakage.py, or the algorithm's own)
        "privacy_weight": (
            state.privacy_weight
            if state.privacy_weight is not None
            else build_algorithm(cfg.algorithm).privacy_weight
        ),
        "model": cfg.model.kind,
        "data": cfg.data.kind,
        "seed": cfg.seed,
        "compute": plan.compute,
        "path": plan.compute,  # the compute mode's former name, kept for readers of older summaries
        "num_workers": cfg.ray.num_workers,
        "acc_global_DG": clean(ev.get("acc_global_DG", describe([]))),
        "acc_global_DI": clean(glob or describe([])),
        "acc_personalized_DI": clean(pers or describe([])),
        "personalization_gain": finite_or_none(pers.get("mean", math.nan) - glob.get("mean", math.nan)),
        "eval_individuals": len(plan.eval_ids),
        "dropouts": state.dropouts,
        "rejected_updates": rejected_updates(log),
        **{k: state.faults.get(k, 0) for k in FAULT_KEYS},
        "clients_per_s": state.train_clients / secs if secs > 0 else None,
        "s_per_round": secs / rounds if rounds else None,
        "peak_rss_mib": peak_rss,
        **communication_summary(log),
        **time_summary(log, cfg.eval),
        **joiners_summary(plan, log),
        "run_dir": str(run_dir),
        **privacy_summary(plan, state),
    }


def rejected_updates(log) -> int:
    """Clients' updates the admission check refused over the run (NaN, inf, or above max_update_norm)."""
    df = log.frame()
    rows = df[(df.metric == "rejected_updates") & (df.stat == "value")]
    return int(rows.value.sum()) if len(rows) else 0


def communication_summary(log) -> dict:
    """Bytes over the run (every client's messages, as built) and per reporting client and round."""
    df = log.frame()
    per_round = df[df.stat == "value"].pivot_table(
        index="round", columns="metric", values="value", aggfunc="last"
    )
    if "bytes_up" not in per_round:
        return {
            k: None
            for k in ("bytes_up_per_client", "bytes_down_per_client", "bytes_up_total", "bytes_down_total")
        }
    rounds = per_round.dropna(subset=["bytes_up"])
    clients = rounds["clients"].sum()
    return {
        "bytes_up_per_client": float((rounds.bytes_up_per_client * rounds.clients).sum() / clients)
        if clients
        else None,
        "bytes_down_per_client": float((rounds.bytes_down_per_client * rounds.clients).sum() / clients)
        if clients
        else None,
        "bytes_up_total": int(rounds.bytes_up.sum()),
        "bytes_down_total": int(rounds.bytes_down.sum()),
    }


def time_summary(log, ev) -> dict:
    """Simulated time (federation.system) over the run, and the rounds and simulated time until
    the evaluation mean of `eval.target_metric` first reached `eval.target`."""
    df = log.frame()
    rounds = df[(df.metric == "sim_round_s") & (df.stat == "value")].set_index("round").value
    out = {
        "sim_time_s": float(rounds.sum()) if len(rounds) else None,
        "rounds_to_target": None,
        "time_to_target_s": None,
    }
    if ev.target is None:
        return out
    means = df[(df.metric == ev.target_metric) & (df.stat == "mean")].sort_values("round")
    reached = means[means.value >= ev.target]
    if len(reached):
        r = int(reached["round"].iloc[0])
        out["rounds_to_target"] = r
        out["time_to_target_s"] = float(rounds[rounds.index <= r].sum()) if len(rounds) else None
    return out


def joiners_summary(plan: FederationPlan, log: MetricsLog) -> dict:
    """With `data.drift.joiners`: at each evaluation, the panel's newcomers against everyone else
    (mean acc(D_I) of the global and personalized models), so one sees the model serve people it
    had not seen, then learn them once they join."""
    if not plan.cfg.data.drift.joiners or not log.individuals:
        return {}
    import pandas as pd

    ind = pd.DataFrame(log.individuals)
    ind["joiner"] = ind.client_id.isin(plan.joiner_ids)
    means = (
        ind.groupby(["round", "joiner"])[["acc_global_DI", "acc_personalized_DI"]].mean().unstack("joiner")
    )
    out = {
        "at_round": plan.cfg.data.drift.at_round,
        "in_panel": int(ind[ind["round"] == ind["round"].max()].joiner.sum()),
        "rounds": [int(r) for r in means.index],
    }
    for metric in ("acc_global_DI", "acc_personalized_DI"):
        for who, flag in (("joiners", True), ("others", False)):
            col = means[metric][flag] if flag in means[metric] else pd.Series(math.nan, index=means.index)
            out[f"{metric}_{who}"] = [finite_or_none(float(v)) for v in col]
    return {"joiners": out}


def privacy_summary(plan: FederationPlan, state) -> dict:
    """The formal guarantee next to the measured leakage (loss-threshold MIA AUC, 0.5 = none)."""
    df = state.log.frame()
    last = lambda m: (
        finite_or_none(float(df[df.metric == m].value.iloc[-1])) if (df.metric == m).any() else None
    )  # noqa: E731
    facts, sa = state.accounting.facts(), secagg_facts(plan)
    local = facts["local_dp"]
    return {
        "privacy_mode": facts["mode"],
        **{
            k: facts[k]
            for k in (
                "epsilon",
                "delta",
                "noise_multiplier",
                "clip_norm",
                "sample_rate",
                "sampling",
                "adjacency",
                "accountant",
                "epsilon_by_party",
                "noise_sampler",
            )
        },
        **{k: sa[k] for k in ("secagg_neighbors", "secagg_threshold", "secagg_bits")},
        "secagg_targets": secagg_targets_facts(plan),
        "secagg_aborted_rounds": int(df[df.metric == "aborted"].value.sum()) if plan.secagg else None,
        "mia_auc": last("mia_auc_global"),
        "mia_auc_personalized": last("mia_auc_personalized"),
        "mia_auc_individual": last("mia_auc_individual"),
        "stopped_early": state.stopped,
        **secrets_facts(plan.cfg),
        "local_epsilon": local["epsilon"] if local else None,
        "local_dp": {k: local[k] for k in ("clip", "noise_multiplier")} if local else None,
    }
