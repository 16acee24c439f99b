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

import json
import warnings
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from fedmeta.actors.privacy import PrivacyBudget
from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.artifacts.durable import write_atomic
from fedmeta.sim.artifacts.usercode import artifact_config
from fedmeta.sim.config import ConfigError, ExperimentConfig, TuneParam, from_dict
from fedmeta.sim.engine.cluster import init_ray
from fedmeta.sim.engine.plan import FederationPlan
from fedmeta.sim.tuning.results import (
    summarize,
)
from fedmeta.sim.tuning.trial import (
    check_fits,
    make_trainable,
)

# the budget's thin actor: it only composes accountant histories
BudgetActor = ray.remote(num_cpus=0)(PrivacyBudget)
SEARCH_FILE = "search.json"  # in the experiment directory: what `fedmeta tune --resume` needs
# each sitting's budget entries, written at every reservation and settlement: one file per sitting,
# as Tune copies the experiment directory it restores and writes that copy back over it
LEDGER = "privacy_ledger-{}.json"


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
