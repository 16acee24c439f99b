"""The driver: a pool of ClientWorker actors + an Aggregator actor, and the round loop around them.

One round: sample a cohort (seeded by (seed, round)), drop some clients (simulated dropout),
split the survivors evenly over the workers, put the global model in the object store once,
and let every worker train its shard; the workers' messages go straight to the aggregator,
which returns the new global model. The driver only ever holds the global model and metrics.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from ray.exceptions import RayTaskError

from actors.aggregator import AggregatorActor, SecAggRoundAborted
from actors.client_worker import LOSS_KEYS, ClientWorkerActor, peak_rss_mib
from actors.profile_store import ProfileStoreActor
from actors.privacy import (LocalDPLedger, PrivacyAccountant, budget_spent, effective_noise_multiplier, mia_auc,
                            noise_for)
from actors.secagg.session import secagg_params
from sim import checkpoint as ckpt
from sim.checkpoint import MODEL_CARD_FORMAT
from sim.config import DEFAULT_NOISE_MULTIPLIER, ConfigError, ExperimentConfig, PrivacyConfig, from_dict, to_yaml
from sim.data import FederatedDataset, build_dataset
from sim.metrics import MetricsLog, describe, finite_or_none
from sim.models import build_model, init_params, num_params
from sim.sampling import apply_dropout, eval_individuals, sample_cohort, split_even
from sim.seeding import np_rng, torch_gen


def init_ray(address: str | None) -> bool:
    """Connect to `address` (an existing cluster) or start local Ray. True if we started it.

    On an existing cluster the `sim` and `actors` packages travel with the job (Ray's
    `py_modules`), so the cluster's nodes need fedmeta's dependencies but not fedmeta itself."""
    if ray.is_initialized():
        return False
    kwargs: dict = dict(address=address, logging_level="ERROR", log_to_driver=True)
    if address:
        import actors
        import sim

        kwargs["runtime_env"] = {"py_modules": [sim, actors]}
    else:
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    return True


def resolve_noise(p: PrivacyConfig, sample_rate: float, rounds: int) -> float:
    """The noise multiplier z of a run: 0 without DP, the configured z, or the smallest z whose
    epsilon after all `rounds` stays within `target_epsilon` (Opacus' search)."""
    if p.mode == "off":
        return 0.0
    if p.target_epsilon is None:
        return p.noise_multiplier if p.noise_multiplier is not None else DEFAULT_NOISE_MULTIPLIER
    try:
        return noise_for(p.target_epsilon, sample_rate, rounds, p.delta, p.accountant)
    except ValueError as e:
        raise ConfigError(f"privacy.target_epsilon: {p.target_epsilon} is out of reach in {rounds} rounds "
                          f"at sample rate {sample_rate:.4g} ({e})") from None


def worker_resources(cfg: ExperimentConfig) -> tuple[float, float]:
    """(num_cpus, num_gpus) per worker actor; refuse pools the cluster can never place."""
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    n = cfg.ray.num_workers
    want_cpu = cfg.ray.num_cpus_per_worker
    if n * want_cpu > cpus + 1e-9:
        raise ConfigError(f"ray.num_cpus_per_worker: {n} workers x {want_cpu:g} CPUs needs {n * want_cpu:g} CPUs but "
                          f"the Ray cluster has {cpus:g}; use fractional CPUs (e.g. {cpus / n:g}) or fewer workers")
    want_gpu = cfg.ray.num_gpus_per_worker
    if want_gpu is None:  # use the GPUs when present, shared evenly
        want_gpu = min(1.0, gpus / n) if gpus > 0 else 0.0
    if n * want_gpu > gpus + 1e-9:
        raise ConfigError(f"ray.num_gpus_per_worker: {n} workers x {want_gpu} GPUs needs more than the {gpus:g} available")
    return want_cpu, want_gpu


@dataclass
class RoundResult:
    global_params: np.ndarray
    clients: int
    dropped: int
    seconds: float
    metrics: dict
    trained: list[int] = field(default_factory=list)   # the clients whose updates went in


class Federation:
    """The actor pool for one experiment config."""

    def __init__(self, cfg: ExperimentConfig, data: FederatedDataset | None = None, run_dir: Path | None = None):
        self.cfg = cfg
        # Probe the data on the driver first: bad paths fail before any actor starts; the shapes
        # and the number of clients (FEMNIST decides it) come from here.
        data = data or build_dataset(cfg.data, cfg.seed)
        self.data = data
        self._spawn_workers(cfg)
        self.num_clients = data.num_clients
        self.input_shape, self.num_classes = tuple(data.input_shape), data.num_classes
        self.input_profile = input_profile(data, cfg.seed)
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        self.n_params = num_params(model)
        self.init_params = init_params(model, torch_gen(cfg.seed, "init")).numpy()
        # DP: rate at which a user takes part in a round (fixed-size cohorts, accounted as Poisson
        # sampling at q = cohort / population) and the noise multiplier, resolved once per run
        self.sample_rate = cfg.federation.clients_per_round / self.num_clients
        self.noise_multiplier = resolve_noise(cfg.privacy, self.sample_rate, cfg.federation.rounds)
        self.secagg = None
        if cfg.secagg.enabled:
            sa = cfg.secagg
            try:
                z_shares = self.noise_multiplier if cfg.privacy.mode == "distributed" else 0.0
                self.secagg = secagg_params(sa.neighbors, sa.threshold, cfg.privacy.clip_norm, sa.quant_bits,
                                            cfg.federation.clients_per_round, z_shares)
            except ValueError as e:   # messages that name no key come from the overflow check
                named = re.match(r"^[a-z_]+\.[a-z_]+: ", str(e))
                raise ConfigError(str(e) if named else f"secagg.quant_bits: {e}") from None
        self._spawn_aggregator(cfg)
        self.global_sizes = data.global_sizes()
        self.eval_ids = eval_individuals(cfg.seed, self.num_clients, cfg.eval.num_individuals)
        if cfg.federation.clients_per_round > self.num_clients:
            raise ConfigError(f"federation.clients_per_round: {cfg.federation.clients_per_round} exceeds the "
                              f"{self.num_clients} clients in the data")
        self.profiles, self._tokens = None, {}
        if cfg.profiles.enabled:
            self._open_profiles(run_dir)

    def _spawn_workers(self, cfg: ExperimentConfig) -> None:
        cpus, gpus = worker_resources(cfg)
        raw = cfg.model_dump(mode="json")
        threads = max(1, int(cpus))
        self.workers = [ClientWorkerActor.options(num_cpus=cpus, num_gpus=gpus).remote(raw, i, threads)
                        for i in range(cfg.ray.num_workers)]

    def _spawn_aggregator(self, cfg: ExperimentConfig) -> None:
        self.aggregator = AggregatorActor.remote(cfg.algorithm.model_dump(), self.n_params, cfg.privacy.model_dump(),
                                                 self.noise_multiplier, cfg.federation.clients_per_round, cfg.seed,
                                                 self.secagg)
        self.infos = ray.get([w.info.remote() for w in self.workers])  # fail fast if an actor cannot start

    def release(self) -> None:
        """Stop the workers and the aggregator (their CPUs go back to the cluster, e.g. to Tune trials)."""
        for a in (*self.workers, self.aggregator):
            ray.kill(a)

    def restart(self, cfg: ExperimentConfig) -> None:
        """Continue under new hyperparameters (after tuning): fresh workers and aggregator with
        `cfg`; the data, the consent store and the privacy parameters of the run stay."""
        self.release()
        self.cfg = cfg
        self._spawn_workers(cfg)
        self._spawn_aggregator(cfg)

    # ------------------------------------------------------------ consent (the profile store)
    def _open_profiles(self, run_dir: Path | None) -> None:
        """Every client signs up; a seeded share grants 'personalization'. The driver keeps each
        user's token as that user's device would (it acts for them in `revoke`)."""
        p = self.cfg.profiles
        path = Path(p.path) if p.path else (run_dir or Path(self.cfg.run.out_dir)) / "profiles.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.profiles = ProfileStoreActor.remote(path, key_file=path.with_suffix(".key"))
        grants = np_rng(self.cfg.seed, "profiles-consent").random(self.num_clients) < p.consent_rate
        ids = np.arange(self.num_clients)
        self._tokens = ray.get(self.profiles.register_many.remote(ids[grants].tolist(), ["personalization"]))
        self._tokens |= ray.get(self.profiles.register_many.remote(ids[~grants].tolist()))

    def revoke(self, cid: int, purpose: str | None = None) -> None:
        """User `cid` withdraws consent (None: all purposes); they are out of the next round."""
        ray.get(self.profiles.revoke.remote(cid, self._tokens[cid], purpose))

    def _consenting(self, cohort: np.ndarray) -> np.ndarray:
        if self.profiles is None:
            return cohort
        return np.array(ray.get(self.profiles.eligible.remote("personalization", cohort.tolist())), dtype=np.int64)

    def train_round(self, rnd: int, global_params: np.ndarray) -> RoundResult:
        t0 = time.perf_counter()
        sampled = sample_cohort(self.cfg.seed, rnd, self.num_clients, self.cfg.federation.clients_per_round)
        cohort = self._consenting(sampled)      # users without consent never hear of the round
        alive, dropped = apply_dropout(self.cfg.seed, rnd, cohort, self.cfg.federation.dropout)
        g_ref = ray.put(global_params)
        if self.secagg is not None:
            try:
                new, metrics = self._secure_round(rnd, g_ref, cohort, alive)
            except RayTaskError as e:
                cause = e.as_instanceof_cause()
                if not isinstance(cause, SecAggRoundAborted):
                    raise
                # too many dropouts for the threshold: nothing is released, the model stays
                new, metrics = global_params, {"skipped": True, "aborted": str(cause.args[0] if cause.args else cause)}
        else:
            shards = split_even(alive, len(self.workers))
            msgs = [w.train.remote(rnd, g_ref, shard) for w, shard in zip(self.workers, shards)]
            new, metrics = ray.get(self.aggregator.aggregate.remote(rnd, g_ref, *msgs))
        metrics["not_consenting"] = len(sampled) - len(cohort)
        return RoundResult(new, len(alive), len(dropped), time.perf_counter() - t0, metrics, alive.tolist())

    def _secure_round(self, rnd: int, g_ref, cohort: np.ndarray, alive: np.ndarray) -> tuple[np.ndarray, dict]:
        """The four phases of secure aggregation, with Ray as the network between the clients
        (hosted by the workers) and the server (the aggregator). The whole cohort takes part in
        key set-up; the clients that drop out do so after sharing their keys, before sending a
        masked input, so the server must recover their pairwise masks (the hard case).

        Clients are placed on workers in contiguous stretches of the server's Harary ring, so
        most neighbours share a worker, where their pair masks cancel in the worker's sum and
        are never expanded. Every phase is submitted at once, chained by object refs: no
        round trip through the driver between phases."""
        ring = np.array(ray.get(self.aggregator.secagg_plan.remote(rnd, cohort.tolist())))
        shards = split_even(ring, len(self.workers))
        adverts = [w.secagg_advertise.remote(rnd, shard, self.secagg) for w, shard in zip(self.workers, shards)]
        keys = self.aggregator.secagg_begin.remote(rnd, *adverts)
        inbox = self.aggregator.secagg_route.remote(rnd, *[w.secagg_share.remote(rnd, keys) for w in self.workers])
        live = set(alive.tolist())
        # a client trains on the worker that holds its protocol state; the dropped ones send nothing
        msgs = [w.train.remote(rnd, g_ref, [c for c in shard if c in live], inbox)
                for w, shard in zip(self.workers, shards)]
        request = self.aggregator.secagg_collect.remote(rnd, *msgs)
        reveals = [w.secagg_unmask.remote(rnd, request) for w in self.workers]
        return ray.get(self.aggregator.aggregate_secure.remote(rnd, g_ref, *reveals))

    def evaluate(self, rnd: int, global_params: np.ndarray, export: bool = False) -> dict:
        g_ref = ray.put(global_params)
        n = len(self.workers)
        shards = split_even(self.eval_ids, n)
        ind = [w.evaluate.remote(g_ref, s, rnd, export) for w, s in zip(self.workers, shards)]
        hits = np.concatenate(ray.get([w.evaluate_global.remote(g_ref, i, n) for i, w in enumerate(self.workers)]))
        parts = ray.get(ind)
        # D_G is laid out one block per individual: accuracy per D_G individual (the fairness view)
        blocks = np.split(hits, np.cumsum(self.global_sizes)[:-1])
        out = {"acc_DG": np.array([b.mean() if len(b) else np.nan for b in blocks]),
               "client_ids": [c for p in parts for c in p["client_ids"]]}
        for key in ("acc_global_DI", "acc_personalized_DI", *LOSS_KEYS, *(["personalized"] if export else [])):
            out[key] = np.concatenate([p[key] for p in parts])
        if self.cfg.privacy.mia_audit:
            # members: the individuals' train splits (seen in training / fine-tuning); non-members: test splits
            out["mia_auc_global"] = mia_auc(out["loss_global_train"], out["loss_global_test"])
            out["mia_auc_personalized"] = mia_auc(out["loss_personalized_train"], out["loss_personalized_test"])
        return out

    def private_metric(self, rnd: int, global_params: np.ndarray) -> dict:
        """acc(D_I) of the global and personalized models over the evaluation panel, aggregated by
        the aggregator from per-worker sums (with DP noise when DP is on); under secure
        aggregation the sums are masked per individual and the aggregator sees only their total."""
        if self.secagg is not None:
            return self._secure_metric(rnd, global_params)
        g_ref = ray.put(global_params)
        parts = [w.evaluate_sums.remote(g_ref, s, rnd) for w, s in zip(self.workers, split_even(self.eval_ids, len(self.workers)))]
        return ray.get(self.aggregator.aggregate_metric.remote(rnd, *parts))

    def _secure_metric(self, rnd: int, global_params: np.ndarray) -> dict:
        sa = self.cfg.secagg
        # accuracies lie in [0, 1]: a clip of 1 and the panel as the cohort size the modulus for
        params = secagg_params(sa.neighbors, sa.threshold, 1.0, sa.quant_bits, len(self.eval_ids))
        protocol_round = METRIC_ROUND_BASE + rnd          # never the id of a training round
        g_ref = ray.put(global_params)
        ring = np.array(ray.get(self.aggregator.metric_plan.remote(protocol_round, self.eval_ids.tolist(), params)))
        shards = split_even(ring, len(self.workers))
        adverts = [w.secagg_advertise.remote(protocol_round, s, params) for w, s in zip(self.workers, shards)]
        keys = self.aggregator.secagg_begin.remote(protocol_round, *adverts)
        inbox = self.aggregator.secagg_route.remote(protocol_round, *[w.secagg_share.remote(protocol_round, keys)
                                                                      for w in self.workers])
        masked = [w.secagg_metric.remote(protocol_round, g_ref, s, inbox, rnd) for w, s in zip(self.workers, shards)]
        request = self.aggregator.metric_collect.remote(protocol_round, *masked)
        reveals = [w.secagg_unmask.remote(protocol_round, request) for w in self.workers]
        return ray.get(self.aggregator.metric_finish.remote(protocol_round, *reveals))

    def peak_rss_mib(self) -> float:
        """Sum of the peak RSS of the driver and of every actor (workers and aggregator): an upper
        bound on the simulation's memory. Ray's own daemons (raylet, GCS) are not counted."""
        actors = ray.get([a.peak_rss_mib.remote() for a in (*self.workers, self.aggregator)])
        return peak_rss_mib() + sum(actors)

    def shutdown(self) -> None:
        if self.profiles is not None:
            ray.get(self.profiles.close.remote())
        for a in (*self.workers, self.aggregator, *([self.profiles] if self.profiles is not None else [])):
            ray.kill(a)


METRIC_ROUND_BASE = 1_000_000      # protocol round ids of secure metric rounds


def input_profile(data: FederatedDataset, seed: int, clients: int = 64) -> dict:
    """Per-feature mean and variance of the federation's training inputs, from a seeded sample of
    clients: what a serving router compares live inputs with. (In a deployment these are sums of
    x and x^2 over clients, which secure aggregation can release without any client's data.)"""
    ids = np_rng(seed, "input-profile").choice(data.num_clients, size=min(clients, data.num_clients), replace=False)
    x = np.concatenate([c.x_train.reshape(len(c.x_train), -1).numpy() for c in data.clients(sorted(ids.tolist()))])
    return {"mean": x.mean(0).tolist(), "var": x.var(0).tolist(), "n": int(len(x))}


def export_personalized(run_dir: Path, ids: list[int], flats: np.ndarray) -> Path:
    """personalized/<client id>.npy: each evaluated individual's fine-tuned parameters, for serving."""
    out = run_dir / "personalized"
    out.mkdir(exist_ok=True)
    for cid, flat in zip(ids, flats):
        tmp = out / f".{cid}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(flat, dtype=np.float32))
        tmp.replace(out / f"{cid}.npy")
    return out


# ---------------------------------------------------------------- run directories
def new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


def model_card(cfg: ExperimentConfig, fed: Federation, rounds_done: int = 0,
               accountant: PrivacyAccountant | None = None, ledger: LocalDPLedger | None = None,
               quality: dict | None = None) -> dict:
    """What a serving or tuning process needs to use a checkpoint without the experiment config:
    how to rebuild the model, the data it expects, how to adapt it to a user, and the privacy spent
    to produce it. Refreshed at every checkpoint."""
    a, e, p = cfg.algorithm, cfg.eval, cfg.privacy
    dp = accountant is not None
    return {
        "format": MODEL_CARD_FORMAT,
        "supports_federated_meta_learning": True,
        "algorithm": a.name,
        "model": {"config": cfg.model.model_dump(mode="json"), "n_params": fed.n_params},
        "data_schema": {"kind": cfg.data.kind, "input_shape": list(fed.input_shape), "num_classes": fed.num_classes,
                        "dtype": "float32", "layout": "NCHW" if len(fed.input_shape) == 3 else "features",
                        "value_range": [0.0, 1.0] if cfg.data.kind == "writers" else None},
        "input_profile": fed.input_profile,
        "quality": quality or {},
        "adaptation": {"method": "sgd_finetune", "lr": e.finetune_lr, "steps": e.finetune_steps,
                       "batch_size": e.batch_size, "local_lr": a.lr, "inner_lr": a.inner_lr, "server_lr": a.server_lr,
                       "local_epochs": a.local_epochs, "local_steps": a.local_steps, "local_batch_size": a.batch_size,
                       "privacy_lambda": a.privacy_lambda},
        "privacy": {"mode": p.mode, "differential_privacy": dp,
                    "epsilon": accountant.epsilon(p.delta) if dp and rounds_done else (0.0 if dp else None),
                    "delta": p.delta if dp else None, "noise_multiplier": fed.noise_multiplier if dp else None,
                    "clip_norm": p.clip_norm if dp else None, "accountant": p.accountant if dp else None,
                    "sample_rate": fed.sample_rate,
                    "secure_aggregation": fed.secagg is not None,
                    "secagg_neighbors": (fed.secagg.neighbors or "complete") if fed.secagg else None,
                    "secagg_threshold": fed.secagg.threshold if fed.secagg else None,
                    "local_dp": ({"clip": p.local_clip, "noise_multiplier": p.local_noise_multiplier,
                                  "epsilon": ledger.epsilon(p.delta)} if ledger else None)},
        "training": {"rounds_completed": rounds_done, "rounds_planned": cfg.federation.rounds, "seed": cfg.seed,
                     "clients_per_round": cfg.federation.clients_per_round, "num_clients": fed.num_clients},
    }


ProgressFn = Callable[[int, int, dict], None]


def run_experiment(cfg: ExperimentConfig, run_dir: Path | None = None, resume: bool = False,
                   progress: ProgressFn | None = None) -> tuple[Path, dict]:
    """Run (or resume) an experiment; returns (run_dir, summary). Ctrl-C or a failing round saves a
    checkpoint of the last completed round and re-raises."""
    data = build_dataset(cfg.data, cfg.seed)  # errors in the data config surface before any side effect
    if resume:
        if run_dir is None:
            raise ValueError("resume needs a run directory")
        state = ckpt.load(run_dir)
    else:
        run_dir = run_dir or new_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        state = None

    started = init_ray(cfg.ray.address)
    try:
        fed = Federation(cfg, data, run_dir)
        try:
            return run_dir, _loop(cfg, fed, run_dir, state, progress)
        finally:
            fed.shutdown()
    finally:
        if started:
            ray.shutdown()


def _loop(cfg: ExperimentConfig, fed: Federation, run_dir: Path, state: ckpt.Checkpoint | None,
          progress: ProgressFn | None) -> dict:
    card = model_card(cfg, fed)
    if state is None:
        state = ckpt.Checkpoint(round=0, global_params=fed.init_params, model_card=card)
    log = MetricsLog(state.metrics_rows, state.individuals_rows)
    g = state.global_params
    done, clients, secs, dropouts = state.round, state.train_clients, state.train_seconds, state.dropouts
    rounds, every = cfg.federation.rounds, cfg.eval.every
    priv = cfg.privacy
    accountant = PrivacyAccountant(priv.accountant) if priv.mode != "off" else None
    if accountant and state.accountant:
        accountant.load_state_dict(state.accountant)
    dp_round = (fed.noise_multiplier, fed.sample_rate)
    ledger = LocalDPLedger(priv.local_noise_multiplier, priv.accountant) if priv.local_dp else None
    if ledger and state.local_dp:
        ledger.load_state_dict(state.local_dp)
    stopped = None
    auto = None
    if cfg.tune.auto:
        from sim.autotune import AutoTune

        auto = AutoTune(cfg, fed.data, run_dir)

    def checkpoint() -> None:
        ev = log.latest_eval()
        quality = {k: ev[k]["mean"] for k in ("acc_global_DI", "acc_personalized_DI", "acc_global_DG") if k in ev}
        card = model_card(cfg, fed, done, accountant, ledger, quality)
        ckpt.save(run_dir, ckpt.Checkpoint(done, g, log.rows, log.individuals, clients, secs, dropouts, card,
                                           accountant.state_dict() if accountant else None,
                                           ledger.state_dict() if ledger else None))
        log.save(run_dir)

    try:
        while done < rounds:
            if (accountant and priv.target_epsilon is not None
                    and budget_spent(accountant, priv.target_epsilon, priv.delta, next_round=dp_round)):
                stopped = f"privacy budget: one more round would exceed epsilon {priv.target_epsilon}"
                break
            res = fed.train_round(done, g)
            g, done = res.global_params, done + 1          # the model advances only on success
            clients, secs, dropouts = clients + res.clients, secs + res.seconds, dropouts + res.dropped
            if accountant and not res.metrics.get("skipped"):   # a skipped round released nothing
                z, q = dp_round
                if priv.mode == "distributed":   # only the survivors' noise shares reached the sum
                    z = effective_noise_multiplier(z, cfg.federation.clients_per_round, res.metrics["secagg_survivors"])
                accountant.step(z, q)
            if ledger and not res.metrics.get("skipped"):
                for cid, steps, n_train in res.metrics.get("local_dp_steps", []):
                    ledger.record(cid, steps, min(1.0, cfg.algorithm.batch_size / n_train))
            cps = res.clients / res.seconds if res.seconds > 0 else float("nan")
            log.add_many(done, {"aborted": 1.0 if "aborted" in res.metrics else 0.0,
                                "train_loss": res.metrics.get("train_loss", float("nan")),
                                "update_norm": res.metrics.get("update_norm", 0.0), "clients": res.clients,
                                "dropped": res.dropped, "round_s": res.seconds, "clients_per_s": cps,
                                **({"epsilon": accountant.epsilon(priv.delta)} if accountant else {}),
                                **({"local_epsilon": ledger.epsilon(priv.delta)} if ledger else {})})
            shown = {"clients_per_s": cps}
            if done % every == 0 or done == rounds:
                ev = fed.evaluate(done, g, export=done == rounds)
                if "personalized" in ev:
                    export_personalized(run_dir, ev["client_ids"], ev["personalized"])
                stats = log.add_eval(done, describe(ev["acc_DG"]), ev["client_ids"],
                                     ev["acc_global_DI"], ev["acc_personalized_DI"])
                log.add_many(done, {k: ev[k] for k in ("mia_auc_global", "mia_auc_personalized") if k in ev})
                shown.update({k: v["mean"] for k, v in stats.items()})
            if done % cfg.run.checkpoint_every == 0 or done == rounds:
                checkpoint()
            if auto is not None and done < rounds:
                tuned = auto.after_round(done, checkpoint, fed.release)
                if tuned is not None:      # drift alarm: continue under the best configuration found
                    fed.restart(tuned)
            if progress:
                progress(done, rounds, shown)
    except BaseException:
        # Ctrl-C or a failed round (e.g. the aggregator refused non-finite updates): keep what is
        # good. g is the model after the last *completed* round, so `--resume` continues from there.
        checkpoint()
        raise
    if stopped:
        checkpoint()

    summary = build_summary(cfg, fed, log, done, clients, secs, dropouts, run_dir)
    summary.update(privacy_summary(cfg, fed, log, accountant, stopped))
    summary["local_epsilon"] = ledger.epsilon(priv.delta) if ledger else None
    if auto is not None:
        summary.update(auto.summary())
    summary["local_dp"] = ({"clip": priv.local_clip, "noise_multiplier": priv.local_noise_multiplier}
                           if ledger else None)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    from sim.plots import plot_run  # matplotlib only when a run finishes
    plot_run(log, run_dir)
    return summary


def privacy_summary(cfg: ExperimentConfig, fed: Federation, log: MetricsLog,
                    accountant: PrivacyAccountant | None, stopped: str | None) -> dict:
    """The formal guarantee next to the measured leakage (loss-threshold MIA AUC, 0.5 = none)."""
    p = cfg.privacy
    df = log.frame()
    last = lambda m: finite_or_none(float(df[df.metric == m].value.iloc[-1])) if (df.metric == m).any() else None  # noqa: E731
    dp = accountant is not None
    return {"privacy_mode": p.mode,
            "epsilon": accountant.epsilon(p.delta) if dp else None,
            "delta": p.delta if dp else None,
            "noise_multiplier": fed.noise_multiplier if dp else None,
            "clip_norm": p.clip_norm if dp else None,
            "sample_rate": fed.sample_rate,
            "accountant": p.accountant if dp else None,
            "secagg_neighbors": (fed.secagg.neighbors or "complete") if fed.secagg else None,
            "secagg_threshold": fed.secagg.threshold if fed.secagg else None,
            "secagg_bits": fed.secagg.bits if fed.secagg else None,
            "secagg_aborted_rounds": int(df[df.metric == "aborted"].value.sum()) if fed.secagg else None,
            "mia_auc": last("mia_auc_global"), "mia_auc_personalized": last("mia_auc_personalized"),
            "stopped_early": stopped}


def build_summary(cfg: ExperimentConfig, fed: Federation, log: MetricsLog, rounds: int, clients: int,
                  secs: float, dropouts: int, run_dir: Path) -> dict:
    ev = log.latest_eval()
    clean = lambda d: {k: finite_or_none(v) for k, v in d.items()}  # noqa: E731
    pers, glob = ev.get("acc_personalized_DI", {}), ev.get("acc_global_DI", {})
    return {
        "rounds": rounds,
        "num_clients": fed.num_clients,
        "clients_per_round": cfg.federation.clients_per_round,
        "algorithm": cfg.algorithm.name,
        "model": cfg.model.kind,
        "data": cfg.data.kind,
        "seed": cfg.seed,
        "path": fed.infos[0]["path"],
        "num_workers": cfg.ray.num_workers,
        "acc_global_DG": clean(ev.get("acc_global_DG", describe([]))),
        "acc_global_DI": clean(glob or describe([])),
        "acc_personalized_DI": clean(pers or describe([])),
        "personalization_gain": finite_or_none(pers.get("mean", math.nan) - glob.get("mean", math.nan)),
        "eval_individuals": len(fed.eval_ids),
        "dropouts": dropouts,
        "clients_per_s": clients / secs if secs > 0 else None,
        "s_per_round": secs / rounds if rounds else None,
        "peak_rss_mib": fed.peak_rss_mib(),
        "run_dir": str(run_dir),
    }


def resume_config(run_dir: Path) -> ExperimentConfig:
    """The config a run was started with (its run dir's config.yaml)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return from_dict(yaml.safe_load(path.read_text()), source=str(path))
