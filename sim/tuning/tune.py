"""Federated hyperparameter optimization with Ray Tune (`fedmeta tune`).

Each trial continues the federation from a global checkpoint under its own hyperparameters for a
few rounds, on its own actor pool (workers + aggregator inside the trial's placement group), and
reports after every round the tuning metric: the evaluation panel's acc(D_I) aggregated by the
aggregator from per-worker sums (with DP noise when DP is on), never from any client's raw data.
The searcher is Optuna's TPE through Tune's `OptunaSearch` (a Bayesian optimizer) or random
search, with a concurrency limit; ASHA stops weak trials early. The best trial's model is written
as a member checkpoint with a model card, a *candidate* that `serve` can shadow-test.

With `tune.objectives` the search is multi-objective (quality, inference latency of the trial's
model, membership-inference leakage, epsilon; Optuna's multi-objective TPE or NSGA-II): the result
is the Pareto front of the trials (`pareto.csv`), and every front member is written as a candidate.

Under DP every trial round and metric report spends budget on the same users: a `PrivacyBudget`
actor composes them with what the run had spent (`epsilon_tuning`, `epsilon_total`) and refuses
rounds that would take the total past `privacy.target_epsilon`.

The experiment directory is a normal Tune experiment; `fedmeta tune --resume DIR` (`resume_tune`)
finishes an interrupted one with its privacy budget continued from the ledger the budget writes there.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from fedmeta.actors.privacy import PrivacyBudget, make_accountant
from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.artifacts.durable import write_atomic
from fedmeta.sim.artifacts.usercode import artifact_config
from fedmeta.sim.config import ConfigError, ExperimentConfig, TuneParam, from_dict
from fedmeta.sim.engine.cluster import init_ray, worker_resources
from fedmeta.sim.engine.federation import Federation
from fedmeta.sim.engine.plan import FederationPlan, input_profile
from fedmeta.sim.metrics import pareto_front
from fedmeta.sim.models import build_model, inference_ms
from fedmeta.sim.run.card_stats import exact_statistics
from fedmeta.sim.seeding import Secrets

METRIC_KEYS = ("acc_personalized_DI", "acc_global_DI")

# the budget's thin actor: it only composes accountant histories
BudgetActor = ray.remote(num_cpus=0)(PrivacyBudget)
SEARCH_FILE = "search.json"  # in the experiment directory: what `fedmeta tune --resume` needs
# each sitting's budget entries, written at every reservation and settlement: one file per sitting,
# as Tune copies the experiment directory it restores and writes that copy back over it
LEDGER = "privacy_ledger-{}.json"
TRIAL_STATE = "trial.json"  # in each trial checkpoint: rounds done and the trial's own accountant


def search_space(params: list[TuneParam]) -> dict:
    """Tune's search space from the config's parameter list (key path -> distribution)."""
    space = {}
    for p in params:
        if p.integer:
            space[p.key] = tune.randint(int(p.low), int(p.high) + 1)
        elif p.log:
            space[p.key] = tune.loguniform(p.low, p.high)
        else:
            space[p.key] = tune.uniform(p.low, p.high)
    return space


def apply_params(raw: dict, params: dict) -> dict:
    """A copy of the raw experiment config with dotted keys (e.g. 'algorithm.lr', or
    'model.hidden.0' for a list entry) set."""
    raw = copy.deepcopy(raw)
    for dotted, value in params.items():
        node = raw
        *path, last = dotted.split(".")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        value = int(value) if isinstance(value, (np.integer,)) else value
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return raw


class TuningBudgetSpent(RuntimeError):
    """No trial could run a round: privacy.target_epsilon leaves no budget for tuning."""


def worst_round_noise(plan: FederationPlan) -> float:
    """The smallest noise multiplier a round of this plan can release with: in the distributed
    mode only the survivors' shares reach the sum, at worst the secure-aggregation threshold."""
    dp = plan.dp
    if dp.mode == "distributed" and plan.secagg is not None:
        return dp.round_noise(min(plan.secagg.threshold, dp.expected_clients))
    return dp.noise_multiplier


def trial_objectives(
    fed: Federation, objectives: set[str], rounds_done: int, g: np.ndarray, weight: float | None = None
) -> dict:
    """The objectives that are not the private accuracies, for the trial's model after a round:
    its inference time per batch and the membership-inference AUC. Under DP the AUC is computed
    from users' data, so it is a release like the accuracies: the panel's mean per-individual AUC
    of the personalized models, noised by the aggregator's `private_metric` (noise `metric_noise`, an individual
    adds at most 1) and accounted in `trial_release_noise`. Without DP, the audit's exact AUC (the
    larger of the global and the personalized models': the attacker picks)."""
    cfg, out, dp = fed.cfg, {}, fed.plan.dp
    model = build_model(cfg.model, fed.plan.input_shape, fed.plan.num_classes)
    out["latency_ms"] = inference_ms(
        model, torch.tensor(g), tuple(fed.plan.input_shape), cfg.tune.latency_batch
    )
    if "mia_auc" in objectives and dp.enabled:
        out["mia_auc"] = fed.private_metric(rounds_done, g, "leakage", weight, dp.metric_noise)["mia_auc_DI"]
    elif "mia_auc" in objectives:
        ev = fed.evaluate(rounds_done, g, weight=weight)
        out["mia_auc"] = max(ev["mia_auc_global"], ev["mia_auc_personalized"])
    return out


def trial_release_noise(dp, objectives: set[str]) -> float:
    """The noise multiplier of one trial round's reports as one Gaussian release: the two private
    accuracies (`metric_release_noise`) and, with the `mia_auc` objective, the private leakage at
    noise `metric_noise`. Gaussian releases compose exactly into one whose 1/z^2 is the sum of theirs (GDP)."""
    if "mia_auc" not in objectives:
        return dp.metric_release_noise
    return 1.0 / math.sqrt(dp.metric_release_noise**-2 + dp.metric_noise**-2)


def federation_trial(
    params: dict,
    plan: FederationPlan,
    start: str | None,
    rounds: int,
    start_round: int,
    budget=None,
    weight: float | None = None,
) -> None:
    """Tune's function trainable: a few rounds of the federation under `params`, from the base
    plan (data, initial model and noise decided once on the driver). Under DP each round is
    reserved with the tuning's `budget` first: a refused round ends the trial (the privacy
    budget is spent), and the trial reports the epsilon its own rounds and reports spent.
    `weight`: the personalization's privacy weight the run had learned (None: the algorithm's own)."""
    cfg = from_dict(apply_params(plan.cfg.model_dump(mode="json"), params))
    # Each trial draws its cohorts, keys and noise from its own secrets: trials sample independently,
    # which is what composing their rounds as separate subsampled releases assumes (a fresh run
    # secret; seeded, the seed's streams under the trial's id)
    seed = plan.cfg.seed
    base = Secrets.seeded(seed) if cfg.run.seeded_secrets else Secrets.fresh(seed)
    secrets = base.for_trial(tune.get_context().get_trial_id() or "trial")
    fed = Federation(plan.with_config(cfg), secrets=secrets)
    dp = fed.plan.dp
    own = make_accountant(dp.accountant, dp.sampling) if dp.enabled else None  # this trial's own spending
    objectives = {o.metric for o in cfg.tune.objectives}
    release_z = trial_release_noise(dp, objectives) if dp.enabled else 0.0
    try:
        first, resumed = 0, tune.get_checkpoint()
        if resumed is not None:  # a restored search: this trial continues after its last report
            with resumed.as_directory() as d:
                g, done = np.load(Path(d) / "global.npy"), json.loads((Path(d) / TRIAL_STATE).read_text())
            first = done["round"]
            if own is not None:
                own.load_state_dict(done["own"])
        else:
            g = ckpt.load(Path(start)).global_params if start else fed.plan.init_params
        every, pending, reported = cfg.tune.report_every, False, first > 0
        for r in range(first, rounds):
            reports = (r + 1) % every == 0 or r + 1 == rounds  # a round that ends with a (released) report
            rid = None
            if budget is not None:
                rid = ray.get(
                    budget.reserve.remote(worst_round_noise(fed.plan), release_z if reports else 0.0)
                )
                # refused: one more round would take the run past privacy.target_epsilon. Rounds trained
                # since the last report are reported now if the budget still has room for the release
                if rid is None:
                    last = ray.get(budget.reserve.remote(0.0, release_z)) if pending else None
                    if last is not None:
                        _report(fed, own, budget, last, release_z, objectives, start_round, r, g, weight, 0.0)
                    elif not reported:  # Tune wants the metrics once: NaN marks a trial that never reported
                        tune.report(
                            {k: float("nan") for k in (*METRIC_KEYS, *objectives)}
                            | {"round": r, "budget_stopped": True}
                        )
                    break
            res = fed.train_round(start_round + r, g)
            g = res.global_params
            released = 0.0
            if dp.enabled:
                released = (
                    0.0 if res.metrics.get("skipped") else dp.round_noise(res.metrics.get("secagg_survivors"))
                )
                if released > 0:
                    own.step(released, dp.sample_rate)
            if reports:
                _report(fed, own, budget, rid, release_z, objectives, start_round, r + 1, g, weight, released)
                pending, reported = False, True
            else:
                pending = True
                if rid is not None:
                    ray.get(budget.settle.remote(rid, released, 0.0))
    finally:
        fed.shutdown()


def _report(
    fed: Federation,
    own,
    budget,
    rid: int | None,
    release_z: float,
    objectives: set[str],
    start_round: int,
    done: int,
    g: np.ndarray,
    weight: float | None,
    released: float,
) -> None:
    """Release the trial's metrics after its `done`-th round (the panel's noised accuracies and the
    other objectives), settle reservation `rid` with what the round (`released`: its z, 0 for
    none) and the report spent, and report them to Tune with the model as the trial's checkpoint."""
    rounds_done = start_round + done
    metric = fed.private_metric(rounds_done, g, weight=weight)
    report = {
        **{k: metric[k] for k in METRIC_KEYS},
        "round": done,
        **trial_objectives(fed, objectives, rounds_done, g, weight),
    }
    if own is not None:
        own.release(release_z)
        if rid is not None:
            ray.get(budget.settle.remote(rid, released, release_z))
        report["epsilon"] = own.epsilon(fed.plan.dp.delta)
    with tempfile.TemporaryDirectory() as d:
        np.save(Path(d) / "global.npy", g)
        (Path(d) / TRIAL_STATE).write_text(
            json.dumps({"round": done, "own": own.state_dict() if own else None})
        )
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))


def trial_resources(cfg: ExperimentConfig) -> tune.PlacementGroupFactory:
    """The trial function (a sliver of CPU) plus one bundle per worker actor of its federation;
    the aggregator needs no CPU."""
    cpus, gpus = worker_resources(cfg)
    worker = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return tune.PlacementGroupFactory([{"CPU": 0.01}] + [worker] * cfg.ray.num_workers)


def check_fits(
    cfg: ExperimentConfig, pgf: tune.PlacementGroupFactory | None = None
) -> tune.PlacementGroupFactory:
    """The trial's placement group, or a ConfigError when this Ray cluster can never place it
    (Tune would wait for it forever)."""
    pgf = pgf or trial_resources(cfg)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    need = sum(b.get("CPU", 0.0) for b in pgf.bundles)
    if need > cpus + 1e-9:
        raise ConfigError(
            f"ray.num_cpus_per_worker: a trial needs {need:g} CPUs ({cfg.ray.num_workers} workers x "
            f"{cfg.ray.num_cpus_per_worker:g} + 0.01 for the trial) but the Ray cluster has {cpus:g}; "
            f"use fractional CPUs per worker"
        )
    return pgf


def make_trainable(
    cfg: ExperimentConfig,
    start: str | None = None,
    start_round: int = 0,
    budget=None,
    plan: FederationPlan | None = None,
    weight: float | None = None,
):
    """The trial function with its fixed arguments and resources (also what `Tuner.restore` needs:
    `resume_tune` passes a budget that continues the experiment's ledger). `plan`: the config's
    plan when the caller has built it already; `weight`: the learned privacy weight."""
    trainable = tune.with_parameters(
        federation_trial,
        plan=plan or FederationPlan.from_config(cfg),
        start=start,
        rounds=cfg.tune.rounds_per_trial,
        start_round=start_round,
        budget=budget,
        weight=weight,
    )
    return tune.with_resources(trainable, trial_resources(cfg))


def current_values(cfg: ExperimentConfig) -> dict:
    """The config's own values of the searched keys, clipped into their ranges (a warm start)."""
    raw, out = cfg.model_dump(mode="json"), {}
    for p in cfg.tune.params:
        node = raw
        for part in p.key.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        value = min(max(node, p.low), p.high)
        out[p.key] = int(round(value)) if p.integer else float(value)
    return out


def searcher(cfg: ExperimentConfig, warm_result: float | None = None):
    """Optuna through Tune, seeded: TPE (multivariate, `tune.startup_trials` random trials first,
    `tune.ei_candidates` draws per proposal),
    Gaussian-process Bayesian optimization (`gp`, the same start-up) or NSGA-II for several
    objectives, warm-started from the config's own values; or seeded random search.
    `warm_result`: the metric the config's own values are already known to reach (e.g. the
    untuned federation after a drift): the searcher is told it instead of spending a trial on it."""
    import optuna
    from ray.tune.search.basic_variant import BasicVariantGenerator

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # multivariate TPE
    t = cfg.tune
    if t.searcher != "optuna":
        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=t.max_concurrent)
    if t.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=cfg.seed)
    elif t.sampler == "gp":  # a Gaussian-process model: the trials of a seeded run are deterministic
        sampler = optuna.samplers.GPSampler(
            seed=cfg.seed, n_startup_trials=t.startup_trials, deterministic_objective=True
        )
    else:
        sampler = optuna.samplers.TPESampler(
            seed=cfg.seed,
            n_startup_trials=t.startup_trials,
            multivariate=True,
            n_ei_candidates=t.ei_candidates,
        )
    objectives = (
        {"metric": [o.metric for o in t.objectives], "mode": [o.direction for o in t.objectives]}
        if t.objectives
        else {"metric": t.metric, "mode": "max"}
    )
    warm = [current_values(cfg)] if t.warm_start else None
    known = (
        {"evaluated_rewards": [warm_result]} if warm and warm_result is not None and not t.objectives else {}
    )
    search = OptunaSearch(sampler=sampler, points_to_evaluate=warm, **objectives, **known)
    return ConcurrencyLimiter(search, max_concurrent=t.max_concurrent)


def build_tuner(
    cfg: ExperimentConfig,
    storage: Path,
    name: str,
    start: str | None = None,
    start_round: int = 0,
    budget=None,
    plan: FederationPlan | None = None,
    warm_result: float | None = None,
    weight: float | None = None,
) -> tune.Tuner:
    t = cfg.tune
    if t.objectives:  # ASHA compares one metric; several objectives run every trial to the end
        scheduler, metric, mode = FIFOScheduler(), None, None
    else:
        scheduler = ASHAScheduler(
            time_attr="round",
            max_t=t.rounds_per_trial,
            grace_period=min(t.grace_period, t.rounds_per_trial),
            reduction_factor=t.reduction_factor,
        )
        metric, mode = t.metric, "max"
    return tune.Tuner(
        make_trainable(cfg, start, start_round, budget, plan, weight),
        param_space=search_space(t.params),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=searcher(cfg, warm_result),
            scheduler=scheduler,
            num_samples=t.num_samples,
            max_concurrent_trials=t.max_concurrent,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(storage.resolve()), verbose=0),
    )


def check_start(cfg: ExperimentConfig, start: str | None) -> None:
    """A search that changes the architecture cannot continue a run's model."""
    searched = [p.key for p in cfg.tune.params if p.key.startswith("model.")]
    if start is not None and searched:
        raise ConfigError(
            f"tune.params: {searched[0]} changes the model's architecture; a search from a checkpoint "
            "(--start, tune.auto) continues that model, so search no model.* key there"
        )


def run_tune(
    cfg: ExperimentConfig,
    start: str | None = None,
    start_round: int = 0,
    out_dir: Path | None = None,
    name: str = "tune",
) -> dict:
    """Search, then write the best trial's model (and with several objectives every Pareto-front
    member) as a candidate member. Returns a summary."""
    check_start(cfg, start)
    experiment = Path(out_dir or Path(cfg.run.out_dir) / "tune") / name
    experiment.mkdir(parents=True, exist_ok=True)
    for old in experiment.glob(LEDGER.format("*")):  # a new search under an old name spends afresh
        old.unlink()
    write_atomic(
        experiment / SEARCH_FILE,
        json.dumps(
            {"config": cfg.model_dump(mode="json"), "start": start, "start_round": start_round}, indent=2
        ),
    )
    return _search(cfg, start, start_round, experiment, restore=False)


def resume_tune(experiment: Path, trust_code: bool = False) -> dict:
    """Finish an interrupted search (`fedmeta tune --resume`): Tune restores its trials and its
    searcher, unfinished trials continue from their last report, and the privacy budget continues
    from the experiment's ledger (the rounds spent before the interruption stay spent)."""
    experiment = Path(experiment)
    meta = _search_file(experiment)
    if not tune.Tuner.can_restore(str(experiment.resolve())):
        raise ConfigError(f"--resume: {experiment} holds no Tune experiment state to resume")
    cfg = artifact_config(
        from_dict(meta["config"], source=str(experiment / SEARCH_FILE)),
        str(experiment / SEARCH_FILE),
        trust_code,
    )
    return _search(cfg, meta["start"], meta["start_round"], experiment, restore=True)


def _search_file(experiment: Path) -> dict:
    path = Path(experiment) / SEARCH_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: {experiment} is not a `fedmeta tune` experiment (no {SEARCH_FILE})")
    return json.loads(path.read_text())


def searched_config(experiment: Path, trust_code: bool = False) -> ExperimentConfig:
    """The config a `fedmeta tune` experiment was started with (its search.json), read as data
    (`fedmeta.sim.artifacts.usercode.artifact_config`)."""
    source = str(Path(experiment) / SEARCH_FILE)
    return artifact_config(from_dict(_search_file(experiment)["config"], source=source), source, trust_code)


def _search(
    cfg: ExperimentConfig, start: str | None, start_round: int, experiment: Path, restore: bool
) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started = init_ray(cfg.ray.address, cfg.ray.connect_timeout_s)
    budget = None
    try:
        check_fits(cfg)
        plan = FederationPlan.from_config(cfg)
        begun = ckpt.load(Path(start)) if start else None
        if plan.dp.enabled:  # on this node: it writes the ledger into the experiment directory
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            sittings = sorted(experiment.glob(LEDGER.format("*")))
            prior = [e for f in sittings for e in json.loads(f.read_text())["entries"]]
            budget = BudgetActor.options(scheduling_strategy=here).remote(
                plan.dp,
                begun.accountant if begun else None,
                cfg.privacy.target_epsilon,
                str((experiment / LEDGER.format(len(sittings))).resolve()),
                prior,
            )
        weight = learned_weight(cfg, begun)
        if restore:
            trainable = make_trainable(cfg, start, start_round, budget, plan, weight)
            tuner = tune.Tuner.restore(str(experiment.resolve()), trainable=trainable, resume_errored=True)
        else:
            tuner = build_tuner(
                cfg, experiment.parent, experiment.name, start, start_round, budget, plan, weight=weight
            )
        results = tuner.fit()
        spent = ray.get(budget.epsilon.remote()) if budget is not None else None
        finished = sum(r.error is not None or bool((r.metrics or {}).get("done")) for r in results)
        if finished < cfg.tune.num_samples:
            # Tune takes Ctrl-C itself and returns with trials unfinished (their last report not `done`,
            # unlike a trial ASHA stopped): that is no result to summarize
            raise KeyboardInterrupt(
                f"the search stopped with {finished} of {cfg.tune.num_samples} trials finished"
            )
    finally:
        if budget is not None:
            ray.kill(budget)
        if started:
            ray.shutdown()
    summary = summarize(cfg, results, experiment, spent, weight)
    write_atomic(experiment / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def learned_weight(cfg: ExperimentConfig, begun: ckpt.Checkpoint | None) -> float | None:
    """The privacy weight a run under leakage control had learned by its checkpoint (its model
    card's): trials continuing it personalize with that lambda, as the run would. None (the
    algorithm's own weight) for a fresh search or a run without leakage control."""
    if begun is None or cfg.privacy.leakage_control.target_auc is None:
        return None
    return begun.model_card.get("adaptation", {}).get("privacy_weight")


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
