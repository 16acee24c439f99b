"""`fedmeta bench`: the benchmark command, printing what sim/cli/bench.py measures.

By default it times the actor pool on a fixed workload (w1, w2, w3; `--secagg` adds secure
aggregation's overhead); `--async` compares synchronous FedAvg with FedBuff on simulated devices,
`--tune` tuned with untuned recovery after a drift, `--serve` the routed ensemble against a single
model and a no-op Serve app. Each mode prints its lines and, with `--json`, one JSON object last.
The measuring code (and Ray with it) is imported only when a benchmark runs.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from fedmeta.sim.cli.common import SetOpt, out
from fedmeta.sim.config import ConfigError


def bench(
    workload: Annotated[
        str,
        typer.Option(
            help="w1 (CNN, FEMNIST-shaped), w2 (MLP, 10k clients) or w3 (MLP, 1M clients, 10k per round)"
        ),
    ] = "w1",
    compute: Annotated[
        str,
        typer.Option(
            "--compute", "--path", help="cohort engine: vmap, loop or auto (--path: deprecated name)"
        ),
    ] = "auto",
    rounds: Annotated[int, typer.Option(min=1, help="timed rounds (after one warm-up round)")] = 5,
    workers: Annotated[
        Optional[int], typer.Option(min=1, help="worker actors (default: the workload's)")
    ] = None,
    set_: SetOpt = [],  # noqa: B006
    secagg: Annotated[
        bool, typer.Option("--secagg", help="also secure aggregation: k=20, complete graph, 10% dropout")
    ] = False,
    repeats: Annotated[
        int, typer.Option(min=1, help="--secagg: plain/k=20 alternations (medians compared)")
    ] = 3,
    serve_: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="load-test the routed ensemble (3 members) against a single model and a no-op Serve app",
        ),
    ] = False,
    tune_: Annotated[
        bool,
        typer.Option("--tune", help="after a drift: tuned vs untuned recovery, Bayesian vs 4x random search"),
    ] = False,
    seconds: Annotated[float, typer.Option(min=0.5, help="--serve: seconds per concurrency level")] = 5.0,
    async_: Annotated[
        bool,
        typer.Option(
            "--async",
            help="synchronous FedAvg vs FedBuff to eval.target on simulated heterogeneous devices (configs/heterogeneous.yaml)",
        ),
    ] = False,
    seeds: Annotated[
        int,
        typer.Option(
            min=1,
            help="--async: seeds, each run both ways (medians compared); "
            "--tune: seeds S..S+N-1 (S: the config's seed, e.g. "
            "--set seed=3), each a whole comparison",
        ),
    ] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
) -> None:
    """Throughput of the actor pool on a fixed workload (or, with --serve, of the Serve app)."""
    if async_:
        _bench_async(list(set_), seeds, as_json)
    elif tune_:
        _bench_tune(list(set_), seeds, as_json)
    elif serve_:
        _bench_serve(seconds, as_json)
    else:
        _bench_throughput(workload, compute, rounds, workers, list(set_), secagg, repeats, as_json)


def _bench_async(set_: list[str], seeds: int, as_json: bool) -> None:
    """--async: simulated time to eval.target, synchronous FedAvg vs FedBuff, over seeds."""
    from fedmeta.sim.cli.bench import run_async_bench, workload_config

    res = run_async_bench(workload_config("heterogeneous", set_), seeds=seeds)
    for name in ("sync", "fedbuff"):
        for r in res["runs"][name]:
            print(
                f"seed {r['seed']} {name:7s}: {res['target_metric']} >= {res['target']} after "
                f"{r['time_to_target_s'] if r['time_to_target_s'] is None else round(r['time_to_target_s'], 1)} "
                f"simulated s (round {r['rounds_to_target']}); final {r['acc_global_DI']:.3f} at "
                f"{r['sim_time_s']:.1f} s"
            )
    fmt = lambda x: "not reached by every seed" if x is None else f"{x:.1f} s"  # noqa: E731
    print(
        f"median simulated time to target: sync {fmt(res['sync_time_to_target_s'])}, FedBuff "
        f"{fmt(res['fedbuff_time_to_target_s'])}"
        + (f" ({res['fedbuff_speedup']:.1f}x faster)" if res["fedbuff_speedup"] else "")
    )
    if as_json:
        print(json.dumps(res))


def _bench_tune(set_: list[str], seeds: int, as_json: bool) -> None:
    """--tune: recovery after a drift, tuned vs untuned, and Bayesian vs random search, per seed."""
    from fedmeta.sim.cli.bench import workload_config
    from fedmeta.sim.cli.bench_tune import run_tune_bench

    base = workload_config("tune", set_)
    res = run_tune_bench(base, seeds=range(base.seed, base.seed + seeds))  # --set seed=S: seeds S, S+1, ...
    bo = base.tune.sampler.upper()
    for r in res["runs"]:
        print(f"seed {r['seed']}, after the drift ({r['metric']}, {r['post_rounds']} rounds):")
        print("  untuned: " + " ".join(f"{v:.3f}" for v in r["untuned_curve"]))
        print("  tuned:   " + " ".join(f"{v:.3f}" for v in r["tuned_curve"]) + f"  ({r['best_config']})")
        print(
            f"  Bayesian ({bo}) trials to reach 95% of the best of {r['random_trials']} random trials "
            f"({r['random_best']:.3f}): {r['bo_trials_to_95']} of {r['bo_trials']}"
        )
    print(
        f"over {len(res['seeds'])} seeds: tuned {res['tuned_acc_mean']:.3f} +- {res['tuned_acc_sd']:.3f}, untuned "
        f"{res['untuned_acc_mean']:.3f} +- {res['untuned_acc_sd']:.3f}; {bo} reached 95% of random search's best "
        f"in {res['bo_reached_95']} of {len(res['seeds'])} seeds ({res['bo_trials_to_95_seeds']})"
    )
    if as_json:
        keys = (
            "tuned_acc",
            "untuned_acc",
            "bo_trials_to_95",
            "random_trials",
            "bo_trials",
            "random_best",
            "untuned_curve",
            "tuned_curve",
            "bo_trial_bests",
            "best_config",
            "seed",
        )
        print(
            json.dumps(
                {
                    **{k: v for k, v in res.items() if k != "runs"},
                    "sampler": base.tune.sampler,
                    "runs": [{k: r[k] for k in keys} for r in res["runs"]],
                }
            )
        )


def _bench_serve(seconds: float, as_json: bool) -> None:
    """--serve: throughput and latency of the ensemble, a single model and a no-op app."""
    from fedmeta.sim.cli.bench_serve import SERVE_TARGETS, run_serve_bench

    res = run_serve_bench(seconds=seconds)
    for label in SERVE_TARGETS:
        for c, r in res[label].items():
            shared = (
                f"  {r['requests_per_fan_out']:.1f} requests a member call"
                if "requests_per_fan_out" in r
                else ""
            )
            print(
                f"{label:8s} concurrency {c:3d}: {r['rps']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                f"p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}{shared}"
            )
    ratio = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    print(
        f"at concurrency {res['at_concurrency']}: "
        + ", ".join(
            f"{label} {res[f'{label}_rps']:.1f} req/s (p99 {res[f'{label}_p99_ms']:.1f} ms)"
            for label in SERVE_TARGETS
        )
    )
    print(
        f"ensemble / single throughput: {ratio(res['throughput_ratio'])}; single / no-op (Serve's ceiling): "
        f"{ratio(res['single_to_noop'])}; errors {res['errors']}"
    )
    if as_json:
        print(json.dumps(res))


def _bench_throughput(
    workload: str,
    compute: str,
    rounds: int,
    workers: Optional[int],
    set_: list[str],
    secagg: bool,
    repeats: int,
    as_json: bool,
) -> None:
    """The default: seconds per round and clients per second of a fixed workload (with --secagg,
    plain vs secure aggregation)."""
    from fedmeta.sim.cli.bench import WORKLOADS, run_bench, run_secagg_bench, workload_config

    if workload not in WORKLOADS:
        raise ConfigError(f"--workload: expected one of {', '.join(WORKLOADS)}, got {workload!r}")
    if compute not in ("vmap", "loop", "auto"):
        raise ConfigError(f"--compute: expected vmap, loop or auto, got {compute!r}")
    extra = [f"ray.compute={compute}"] + ([f"ray.num_workers={workers}"] if workers else []) + set_
    cfg = workload_config(workload, extra)
    res = (
        run_secagg_bench(cfg, rounds, workload, repeats)
        if secagg
        else run_bench(cfg, rounds=rounds, workload=workload)
    )
    if as_json:
        print(json.dumps(res))
    else:
        t = Table(title=f"fedmeta bench {workload} ({res['compute']}, {res['num_workers']} workers)")
        t.add_column("s/round", justify="right")
        t.add_column("clients/s", justify="right")
        t.add_column("peak RSS MiB", justify="right")
        t.add_column("GFLOP/s (sgemm)", justify="right")
        t.add_row(
            f"{res['s_per_round']:.3f}",
            f"{res['clients_per_s']:.1f}",
            f"{res['peak_rss_mib']:.0f}",
            f"{res['gflops']:.1f} ({res['sgemm_gflops']:.0f}: {res['gflops'] / res['sgemm_gflops']:.0%})",
        )
        out.print(t)
        for name, r in res.get("secagg", {}).items():
            print(f"secagg {name}: {r['s_per_round']:.3f} s/round, {r['clients_per_s']:.1f} clients/s")
        if "secagg_overhead" in res:
            print(f"secagg_overhead (k=20 / plain): {res['secagg_overhead']:.2f}x")
