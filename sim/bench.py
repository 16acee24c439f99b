"""`fedmeta bench`: throughput of the actor pool on fixed workloads (numbers, not timed tests).

W1 (FEMNIST-shaped): LEAF's CNN on 1x28x28 inputs, 62 classes, 1,000 clients x 64 samples,
    100 clients per round, 1 local epoch, batch 16, SGD lr 0.05, weighted FedAvg.
W2 (many small clients): MLP 64-128-30 on the writers data, 10,000 clients x 64 samples,
    1,000 clients per round, same local training.
One warm-up round, then timed rounds; training runs on the same Federation (actor pool +
aggregator) as `fedmeta run`, evaluation is off.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray

from sim.config import ExperimentConfig, default_config_path, from_dict, load
from sim.data import build_dataset
from sim.runner import Federation, init_ray

WORKLOADS = {"w1": "bench_w1.yaml", "w2": "bench_w2.yaml"}


def workload_config(workload: str, overrides: list[str]) -> ExperimentConfig:
    return load(default_config_path(WORKLOADS[workload]), overrides)


def run_bench(cfg: ExperimentConfig, rounds: int = 5, warmup: int = 1, workload: str = "") -> dict:
    data = build_dataset(cfg.data, cfg.seed)
    started = init_ray(cfg.ray.address)
    fed = None
    try:
        fed = Federation(cfg, data)
        g = fed.init_params
        for r in range(warmup):
            g = fed.train_round(r, g).global_params
        times, clients = [], 0
        t0 = time.perf_counter()
        for r in range(warmup, warmup + rounds):
            res = fed.train_round(r, g)
            g = res.global_params
            times.append(res.seconds)
            clients += res.clients
        total = time.perf_counter() - t0
        return {"workload": workload, "path": fed.infos[0]["path"], "device": fed.infos[0]["device"],
                "num_workers": cfg.ray.num_workers, "clients_per_round": cfg.federation.clients_per_round,
                "rounds": rounds, "s_per_round": float(np.mean(times)), "s_per_round_min": float(np.min(times)),
                "clients_per_s": clients / total, "peak_rss_mib": fed.peak_rss_mib(),
                "n_params": fed.n_params, "cluster_cpus": ray.cluster_resources().get("CPU", 0.0)}
    finally:
        if fed is not None:
            fed.shutdown()
        if started:
            ray.shutdown()


SECAGG_CASES = {"k20": {"secagg.neighbors": 20}, "complete": {"secagg.neighbors": None},
                "k20_dropout10": {"secagg.neighbors": 20, "federation.dropout": 0.1}}


def _with(cfg: ExperimentConfig, changes: dict) -> ExperimentConfig:
    raw = cfg.model_dump(mode="json")
    for key, value in changes.items():
        section, field = key.split(".")
        raw[section][field] = value
    return from_dict(raw)


def run_secagg_bench(cfg: ExperimentConfig, rounds: int, workload: str, repeats: int = 3) -> dict:
    """Plain vs secure aggregation on the same workload: k = 20, the complete graph, and k = 20
    with 10% of the cohort dropping after key sharing. Plain and k = 20 alternate `repeats`
    times and the medians are compared (a shared VM drifts by tens of percent from minute to
    minute): `secagg_overhead` = median k=20 s/round / median plain s/round."""
    secure = {name: _with(cfg, {"secagg.enabled": True, **changes}) for name, changes in SECAGG_CASES.items()}
    plain, k20 = [], []
    for _ in range(repeats):
        plain.append(run_bench(cfg, rounds=rounds, workload=workload))
        k20.append(run_bench(secure["k20"], rounds=rounds, workload=workload))
    keep = ("s_per_round", "clients_per_s", "peak_rss_mib")

    def median_run(runs: list[dict]) -> dict:
        return sorted(runs, key=lambda r: r["s_per_round"])[len(runs) // 2]

    res = median_run(plain) | {"repeats": repeats, "plain_s_per_round_all": [r["s_per_round"] for r in plain]}
    res["secagg"] = {"k20": {k: median_run(k20)[k] for k in keep} | {"s_per_round_all": [r["s_per_round"] for r in k20]}}
    for name in ("complete", "k20_dropout10"):
        r = run_bench(secure[name], rounds=rounds, workload=workload)
        res["secagg"][name] = {k: r[k] for k in keep}
    res["secagg_overhead"] = res["secagg"]["k20"]["s_per_round"] / res["s_per_round"]
    return res
