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

import numpy as np
import ray

from fedmeta.sim.config import ExperimentConfig, default_config_path, from_dict, load
from fedmeta.sim.engine.cluster import init_ray
from fedmeta.sim.engine.federation import Federation
from fedmeta.sim.engine.plan import FederationPlan

WORKLOADS = {
    "w1": "bench_w1.yaml",
    "w2": "bench_w2.yaml",
    "w3": "bench_w3.yaml",
    "tune": "bench_tune.yaml",
    "heterogeneous": "heterogeneous.yaml",
}


def workload_config(workload: str, overrides: list[str]) -> ExperimentConfig:
    return load(default_config_path(WORKLOADS[workload]), overrides)


def run_bench(cfg: ExperimentConfig, rounds: int = 5, warmup: int = 1, workload: str = "") -> dict:
    plan = FederationPlan.from_config(cfg)
    started = init_ray(cfg.ray.address, cfg.ray.connect_timeout_s)
    fed = None
    try:
        fed = Federation(plan)
        g = plan.init_params
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
        flops = train_flops_per_client(plan)
        sgemm = sgemm_gflops(threads=max(1, int(cfg.ray.num_workers * cfg.ray.num_cpus_per_worker)))
        return {
            "gflops": flops * clients / total / 1e9,
            "sgemm_gflops": sgemm,
            "train_mflop_per_client": flops / 1e6,
            "workload": workload,
            "compute": plan.compute,
            "path": plan.compute,
            "device": fed.infos[0]["device"],
            "num_workers": cfg.ray.num_workers,
            "clients_per_round": cfg.federation.clients_per_round,
            "rounds": rounds,
            "s_per_round": float(np.mean(times)),
            "s_per_round_min": float(np.min(times)),
            "clients_per_s": clients / total,
            "peak_rss_mib": fed.peak_rss_mib(),
            "n_params": plan.n_params,
            "cluster_cpus": ray.cluster_resources().get("CPU", 0.0),
        }
    finally:
        if fed is not None:
            fed.shutdown()
        if started:
            ray.shutdown()


def train_flops_per_client(plan: FederationPlan) -> float:
    """A typical client's local training FLOPs, counted by torch (FlopCounterMode, matmuls and
    convolutions, forward + backward) on one batch, times the batches the algorithm's schedule
    gives a client with the workload's mean train size. Elementwise work is not counted, as in
    the usual model-FLOPs convention."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fedmeta.sim.algorithms import build_algorithm
    from fedmeta.sim.models import build_model

    cfg = plan.cfg
    model = build_model(cfg.model, plan.input_shape, plan.num_classes)
    sizes = [len(plan.data.client(c).y_train) for c in range(min(plan.num_clients, 20))]
    n_train = int(round(float(np.mean(sizes))))
    batch = min(cfg.algorithm.batch_size, n_train)
    x = torch.randn(batch, *plan.input_shape)
    y = torch.randint(0, plan.num_classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    schedule = build_algorithm(cfg.algorithm).schedules(n_train, np.random.default_rng(0))
    return float(counter.get_total_flops()) * sum(len(s) for s in schedule)


def sgemm_gflops(threads: int, n: int = 1024, repeats: int = 7) -> float:
    """This machine's float32 matmul rate with `threads` threads (the median of `repeats`
    n x n x n products): the compute bound the bench's `gflops` is printed against."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up (allocations, thread pool)
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
        return float(np.median(rates))
    finally:
        torch.set_num_threads(before)


SECAGG_CASES = {
    "k20": {"secagg.neighbors": 20},
    "complete": {"secagg.neighbors": None},
    "k20_dropout10": {"secagg.neighbors": 20, "federation.dropout": 0.1},
}


def _with(cfg: ExperimentConfig, changes: dict) -> ExperimentConfig:
    raw = cfg.model_dump(mode="json")
    for key, value in changes.items():
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node[part]
        node[last] = value
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
    res["secagg"] = {
        "k20": {k: median_run(k20)[k] for k in keep} | {"s_per_round_all": [r["s_per_round"] for r in k20]}
    }
    for name in ("complete", "k20_dropout10"):
        r = run_bench(secure[name], rounds=rounds, workload=workload)
        res["secagg"][name] = {k: r[k] for k in keep}
    res["secagg_overhead"] = res["secagg"]["k20"]["s_per_round"] / res["s_per_round"]
    return res


# ---------------------------------------------------------------- synchronous vs buffered asynchronous
def run_async_bench(cfg: ExperimentConfig, seeds: int = 3, steps_per_round: int = 4) -> dict:
    """Synchronous FedAvg vs FedBuff on simulated heterogeneous devices (the workload's
    `federation.system`), each seed run both ways: the sync rounds as configured; FedBuff with
    `fedbuff.concurrency` clients in flight and a server step every clients_per_round /
    `steps_per_round` completions, for the same number of client updates, evaluated after the
    same numbers of updates. Compared: the simulated time until `eval.target` (medians over seeds,
    and every seed's figures)."""
    import tempfile

    from fedmeta.sim.tuning.autotune import run_experiment

    if cfg.eval.target is None or not cfg.federation.system.enabled:
        raise ValueError("bench --async: the workload needs eval.target and federation.system.enabled")
    fed = cfg.federation
    buffer = max(1, fed.clients_per_round // steps_per_round)
    scale = fed.clients_per_round / buffer
    runs = {"sync": [], "fedbuff": []}
    with tempfile.TemporaryDirectory() as out:
        for seed in range(cfg.seed, cfg.seed + seeds):
            for name, changes in _async_variants(cfg, buffer, scale).items():
                run_cfg = _with(cfg, {"seed": seed, "run.out_dir": out, "run.progress": False, **changes})
                _, summary = run_experiment(run_cfg)
                runs[name].append(_async_figures(summary, seed))
    res = {
        "workload": "heterogeneous",
        "target": cfg.eval.target,
        "target_metric": cfg.eval.target_metric,
        "seeds": seeds,
        "fedbuff_buffer": buffer,
        "fedbuff_concurrency": fed.fedbuff.concurrency,
        "sync_time_to_target_s": _seeds_median(runs["sync"], "time_to_target_s"),
        "fedbuff_time_to_target_s": _seeds_median(runs["fedbuff"], "time_to_target_s"),
        "runs": runs,
    }
    both = res["sync_time_to_target_s"], res["fedbuff_time_to_target_s"]
    res["fedbuff_speedup"] = both[0] / both[1] if None not in both else None
    return res


def _async_variants(cfg: ExperimentConfig, buffer: int, scale: float) -> dict[str, dict]:
    """The overrides of each way a seed runs: the sync rounds as configured, and FedBuff with a
    `buffer`-client buffer for the same client updates (`scale` steps per sync round)."""
    fed = cfg.federation
    return {
        "sync": {},
        "fedbuff": {
            "federation.mode": "fedbuff",
            "federation.clients_per_round": buffer,
            "federation.rounds": round(fed.rounds * scale),
            "eval.every": round(cfg.eval.every * scale),
        },
    }


def _async_figures(summary: dict, seed: int) -> dict:
    """What the async bench keeps of one run's summary."""
    return {k: summary[k] for k in ("time_to_target_s", "rounds_to_target", "sim_time_s")} | {
        "acc_global_DI": summary["acc_global_DI"]["mean"],
        "seed": seed,
    }


def _seeds_median(runs: list[dict], key: str) -> float | None:
    """The median of `key` over the seeds' runs."""
    values = [r[key] for r in runs if r[key] is not None]
    return float(np.median(values)) if len(values) == len(runs) else None  # None: some seed missed
