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
from collections.abc import Sequence
from pathlib import Path

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
            variants = {
                "sync": {},
                "fedbuff": {
                    "federation.mode": "fedbuff",
                    "federation.clients_per_round": buffer,
                    "federation.rounds": round(fed.rounds * scale),
                    "eval.every": round(cfg.eval.every * scale),
                },
            }
            for name, changes in variants.items():
                run_cfg = _with(cfg, {"seed": seed, "run.out_dir": out, "run.progress": False, **changes})
                _, summary = run_experiment(run_cfg)
                runs[name].append(
                    {k: summary[k] for k in ("time_to_target_s", "rounds_to_target", "sim_time_s")}
                    | {"acc_global_DI": summary["acc_global_DI"]["mean"], "seed": seed}
                )

    def median(name: str, key: str):
        values = [r[key] for r in runs[name] if r[key] is not None]
        return float(np.median(values)) if len(values) == len(runs[name]) else None  # None: some seed missed

    res = {
        "workload": "heterogeneous",
        "target": cfg.eval.target,
        "target_metric": cfg.eval.target_metric,
        "seeds": seeds,
        "fedbuff_buffer": buffer,
        "fedbuff_concurrency": fed.fedbuff.concurrency,
        "sync_time_to_target_s": median("sync", "time_to_target_s"),
        "fedbuff_time_to_target_s": median("fedbuff", "time_to_target_s"),
        "runs": runs,
    }
    both = res["sync_time_to_target_s"], res["fedbuff_time_to_target_s"]
    res["fedbuff_speedup"] = both[0] / both[1] if None not in both else None
    return res


# ---------------------------------------------------------------- serving
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, body: dict, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients on loopback, each sending the next request when its last one returns."""
    import asyncio

    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(session) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=body) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors,
        "requests": len(latencies),
    }


def _noop_app():
    """Serve's own ceiling: an ingress that reads the request body and answers a constant JSON object,
    without parsing, models or handles (the proxy and one replica: what every request pays)."""
    from ray import serve

    @serve.deployment(name="Noop", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    class Noop:
        async def __call__(self, request) -> dict:
            await request.body()
            return {"predictions": [0], "answered_by": "noop"}

    return Noop.bind()


def _serve_members(tmp: Path, members: int) -> dict[str, str]:
    """`members` checkpoints of the quickstart's MLP (64-128-30) with seeded weights: serving cost
    does not depend on what the weights learned."""
    import torch

    from fedmeta.sim.checkpoint import save_member
    from fedmeta.sim.config import ModelConfig
    from fedmeta.sim.models import build_model, init_params

    cfg = ModelConfig(kind="mlp", hidden=[128])
    paths = {}
    for i in range(members):
        flat = init_params(build_model(cfg, (1, 8, 8), 30), torch.Generator().manual_seed(i)).numpy()
        paths[f"m{i}"] = str(
            save_member(
                tmp / f"m{i}",
                cfg.model_dump(),
                flat,
                [1, 8, 8],
                30,
                {"mean": [0.3] * 64, "var": [0.05] * 64, "n": 1000},
            ).parent
        )
    return paths


# no per-request access log, in the proxy and every replica: under load writing it and shipping it to
# the driver costs as much as a model's forward pass
QUIET_SERVE = {"enable_access_log": False, "log_level": "WARNING"}


def _deploy_serve_target(label: str, paths: dict[str, str]) -> None:
    """Replace whatever runs with the target: the no-op app, one member, or the routed ensemble."""
    from ray import serve

    from fedmeta.serve.app import Deployment

    for app in list(serve.status().applications):
        serve.delete(app)
    if label == "noop":
        serve.run(_noop_app(), name="noop", route_prefix="/", logging_config=QUIET_SERVE)
    else:
        chosen = {"m0": paths["m0"]} if label == "single" else paths
        Deployment(dict(chosen), reweight_s=2.0, logging_config=QUIET_SERVE).deploy()


SERVE_TARGETS = ("noop", "single", "ensemble")


def _fan_outs(base_url: str) -> tuple[float, float]:
    """(requests answered, member fan-outs) so far, from the ingress's /metrics."""
    from urllib.request import urlopen

    with urlopen(f"{base_url}/metrics", timeout=30) as r:
        counts = dict(
            line.split()[:2] for line in r.read().decode().splitlines() if line.startswith("fedmeta_")
        )
    return float(counts["fedmeta_requests_total"]), float(counts["fedmeta_ensemble_batches_total"])


def run_serve_bench(
    concurrency: tuple[int, ...] = (1, 8, 32), seconds: float = 5.0, members: int = 3, warmup_s: float = 1.0
) -> dict:
    """Throughput and latency of the routed ensemble (`members` members, default top-k) against a
    single-model deployment of the same model and a no-op Serve app (Serve's ceiling on this
    machine), on loopback, with the same request body, load generator and concurrency levels."""
    import asyncio
    import tempfile

    from ray import serve

    paths = _serve_members(Path(tempfile.mkdtemp(prefix="fedmeta-bench-serve-")), members)
    started = init_ray(None)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET_SERVE)
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/predict"
    body = {"inputs": np.random.default_rng(0).random((1, 64)).round(4).tolist()}
    out: dict = {"members": members, "seconds": seconds, **{label: {} for label in SERVE_TARGETS}}
    try:
        for label in SERVE_TARGETS:
            _deploy_serve_target(label, paths)
            asyncio.run(_load(url, body, 4, warmup_s))
            for c in concurrency:
                before = None if label == "noop" else _fan_outs(base)
                out[label][c] = asyncio.run(_load(url, body, c, seconds))
                if before is not None:  # how many requests shared a member call (ingress batching)
                    (r0, f0), (r1, f1) = before, _fan_outs(base)
                    out[label][c]["requests_per_fan_out"] = (r1 - r0) / max(f1 - f0, 1)
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    c8 = 8 if 8 in concurrency else concurrency[len(concurrency) // 2]
    at = {label: out[label][c8] for label in SERVE_TARGETS}
    out.update({f"{label}_rps": at[label]["rps"] for label in SERVE_TARGETS})
    out.update({f"{label}_p99_ms": at[label]["p99_ms"] for label in SERVE_TARGETS})
    out.update(
        errors=sum(r["errors"] for label in SERVE_TARGETS for r in out[label].values()),
        throughput_ratio=_ratio(at["ensemble"]["rps"], at["single"]["rps"]),
        single_to_noop=_ratio(at["single"]["rps"], at["noop"]["rps"]),
        at_concurrency=c8,
    )
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None  # None, not a ZeroDivisionError, when nothing was answered


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
    import copy
    import tempfile

    from fedmeta.sim.tuning.tune import build_tuner

    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="fedmeta-bench-tune-"))
    metric = base.tune.metric
    started = init_ray(base.ray.address, base.ray.connect_timeout_s)
    try:
        # before the drift: a federation trained with the base hyperparameters, checkpointed
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
        # after the drift, untuned: the same hyperparameters continue
        fed = Federation(FederationPlan.from_config(base))
        untuned, gu = [], g
        for r in range(pre_rounds, pre_rounds + post_rounds):
            gu = fed.train_round(r, gu).global_params
            untuned.append(fed.private_metric(r + 1, gu)[metric])
        fed.shutdown()
        tuned_cfg = copy.deepcopy(base.model_dump(mode="json"))
        # the Bayesian search proposes one trial at a time (each proposal sees every result so far),
        # and is told what the pre-drift values reach (the untuned curve) instead of rerunning them
        tuned_cfg["tune"].update(
            rounds_per_trial=post_rounds, num_samples=bo_trials, searcher="optuna", max_concurrent=1
        )
        bo = build_tuner(
            from_dict(tuned_cfg), out_dir, "bo", str(start_dir), pre_rounds, warm_result=untuned[-1]
        ).fit()
        tuned_cfg["tune"].update(
            num_samples=4 * bo_trials, searcher="random", max_concurrent=base.tune.max_concurrent
        )
        rnd = build_tuner(from_dict(tuned_cfg), out_dir, "random", str(start_dir), pre_rounds).fit()
    finally:
        if started:
            ray.shutdown()
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
