"""`fedmeta table CONFIG`: the shape of Schneider & Vlachos' Table I on the federated writers data.

For each method row of `personalization.methods` and each evaluated individual, one model is trained
(sim/personalize/personalization.py), then acc(D_I) and acc(D_G) are summarized as mean / sd / min / max over
individuals, ranked within the shaping and the grouping block, and each row gets a paired t-test
against its block's baseline on acc(D_I).

Where things run: the server's work (the model trained on D_G for TL, the auto-encoder) and every
method's shards are Ray tasks on the local pool; the devices' work (encoding their own data) is a
task per shard of individuals, whose class-mean latents go into the encrypted profile store actor
(actors/profile_store/) under each user's own token; IG reads candidates back only through the
store's consent gate.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from fedmeta.actors.profile_store import ProfileStoreActor
from fedmeta.sim.algorithms.grouping import (
    class_mean_latents,
    encode,
    individual_group,
    single_sample_group,
    train_autoencoder,
)
from fedmeta.sim.artifacts.statedir import store_key_path
from fedmeta.sim.config import ConfigError, ExperimentConfig, MethodSpec, from_dict, to_yaml
from fedmeta.sim.data import build_dataset
from fedmeta.sim.engine.cluster import init_ray
from fedmeta.sim.engine.plan import FederationPlan
from fedmeta.sim.models import build_model
from fedmeta.sim.personalize.personalization import Job, personalize, split_global, train_on_global
from fedmeta.sim.sampling import eval_individuals, split_even
from fedmeta.sim.seeding import np_rng, torch_gen

LATENTS = "class_mean_latents"


@functools.lru_cache(maxsize=2)
def _world(raw_json: str):
    """Config, data, D_G split and model of a task's process, built once per process."""
    cfg = from_dict(json.loads(raw_json))
    data = build_dataset(cfg.data, cfg.seed)
    dg = split_global(data, cfg.personalization.global_test_fraction, cfg.seed)
    return cfg, data, dg, build_model(cfg.model, data.input_shape, data.num_classes)


@ray.remote(num_cpus=1)
def _personalize_task(raw_json: str, spec_raw: dict, jobs: list[Job], start: torch.Tensor) -> dict:
    torch.set_num_threads(1)
    cfg, data, dg, model = _world(raw_json)
    return personalize(model, MethodSpec(**spec_raw), cfg.personalization, jobs, data, dg, start, cfg.seed)


@ray.remote(num_cpus=1)
def _autoencoder_task(raw_json: str):
    """Server: the auto-encoder on D_G train."""
    torch.set_num_threads(1)
    cfg, _, dg, _ = _world(raw_json)
    p = cfg.personalization
    return train_autoencoder(
        dg.x_train, p.latent_dim, p.ae_epochs, p.ae_lr, 128, torch_gen(cfg.seed, "table-ae")
    )


@ray.remote(num_cpus=1)
def _global_model_task(raw_json: str, start: torch.Tensor) -> torch.Tensor:
    """Server: the model trained on D_G alone, where TL starts."""
    torch.set_num_threads(1)
    cfg, _, dg, model = _world(raw_json)
    return train_on_global(model, cfg.personalization, dg, start, cfg.seed)


@ray.remote(num_cpus=1)
def _encode_task(raw_json: str, ae, cids: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Devices: each individual encodes its own train split -> (per-sample latents, class-mean latents)."""
    torch.set_num_threads(1)
    _, data, _, _ = _world(raw_json)
    out = {}
    for c in data.clients(cids):
        z = encode(ae, c.x_train)
        out[c.cid] = (z, class_mean_latents(z, c.y_train, data.num_classes))
    return out


def _pool(cfg: ExperimentConfig, individuals: np.ndarray) -> list[int]:
    """The evaluated individuals plus `ig_pool` other federation members (IG candidates)."""
    others = np.setdiff1d(np.arange(cfg.data.num_clients), individuals)
    extra = np_rng(cfg.seed, "table-pool").permutation(others)[
        : max(0, cfg.personalization.ig_pool - len(individuals))
    ]
    return sorted(set(individuals.tolist()) | set(extra.tolist()))


def _store_latents(
    store, cfg: ExperimentConfig, individuals: np.ndarray, latents: dict
) -> dict[int, torch.Tensor]:
    """Each pool member registers, consents (the evaluated individuals always; others at
    `consent_rate`) and uploads its class-mean latents; IG candidates come back through the
    store's consent gate only."""
    coin = np_rng(cfg.seed, "table-consent")
    evaluated = set(individuals.tolist())
    calls = []
    for cid, (_, means) in latents.items():
        token = ray.get(store.register.remote(cid))
        consents = cid in evaluated or coin.random() < cfg.personalization.consent_rate
        calls.append(store.set_consent.remote(cid, token, "grouping", consents))
        calls.append(store.put_vector.remote(cid, token, LATENTS, means.numpy()))
    ray.get(calls)
    return {c: torch.tensor(v) for c, v in ray.get(store.vectors_for.remote("grouping", LATENTS)).items()}


def _jobs(
    spec: MethodSpec,
    cfg: ExperimentConfig,
    individuals: np.ndarray,
    latents: dict,
    candidates: dict[int, torch.Tensor],
    z_global: torch.Tensor | None,
    n_global: int,
) -> list[Job]:
    ids = individuals.tolist()
    if spec.method == "baseline":  # another individual's data stands in for the evaluated one's
        return [Job(i, other=ids[(k + 1) % len(ids)]) for k, i in enumerate(ids)]
    if spec.method == "random":
        return [
            Job(i, extra=np_rng(cfg.seed, "table-random", spec.label, i).permutation(n_global)[: int(spec.n)])
            for i in ids
        ]
    if spec.method == "sg":
        return [Job(i, extra=single_sample_group(latents[i][0], z_global, int(spec.n))) for i in ids]
    if spec.method == "ig":
        return [
            Job(i, group=individual_group(candidates[i], candidates, int(spec.n), exclude=i)) for i in ids
        ]
    return [Job(i) for i in ids]


def _check_sizes(cfg: ExperimentConfig, n_global: int, candidates: int) -> None:
    for k, spec in enumerate(cfg.personalization.methods):
        if spec.method in ("random", "sg") and spec.n > n_global:
            raise ConfigError(
                f"personalization.methods.{k}.n: {spec.label} adds {int(spec.n)} samples but D_G "
                f"train has {n_global}; lower n or raise data.global_clients"
            )
        if spec.method == "ig" and spec.n > candidates - 1:
            raise ConfigError(
                f"personalization.methods.{k}.n: {spec.label} needs {int(spec.n)} consenting "
                f"candidates, the store has {candidates - 1}; raise ig_pool or consent_rate"
            )


def run_table(
    cfg: ExperimentConfig, run_dir: Path | None = None, progress: Callable[[int, int], None] | None = None
) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """Train and evaluate every (method, individual); returns (run_dir, table, per-individual rows)."""
    p = cfg.personalization
    plan = FederationPlan.from_config(cfg)  # the federation's data and initial model; config errors first
    data = plan.data
    if p.individuals > data.num_clients:
        raise ConfigError(
            f"personalization.individuals: {p.individuals} exceeds data.num_clients ({data.num_clients})"
        )
    run_dir = _make_run_dir(cfg, run_dir)
    raw_json = json.dumps(cfg.model_dump(mode="json"))
    dg = split_global(data, p.global_test_fraction, cfg.seed)
    start = torch.from_numpy(plan.init_params)
    individuals = eval_individuals(cfg.seed, data.num_clients, p.individuals)

    started = init_ray(cfg.ray.address, cfg.ray.connect_timeout_s)
    store = None
    try:
        # server: the auto-encoder and the D_G-only model TL starts from, in parallel
        ae_ref = _autoencoder_task.remote(raw_json)
        dg_ref = _global_model_task.remote(raw_json, start)
        latents = _encode_pool(raw_json, ae_ref, cfg, individuals)
        store = _profile_store(run_dir)
        candidates = _store_latents(store, cfg, individuals, latents)
        _check_sizes(cfg, len(dg.y_train), len(candidates))
        z_global = encode(ray.get(ae_ref), dg.x_train) if any(s.method == "sg" for s in p.methods) else None
        tl_start = ray.get(dg_ref)
        refs = _submit_methods(
            raw_json, cfg, individuals, latents, candidates, z_global, len(dg.y_train), start, tl_start
        )
        rows = _collect_rows(refs, progress)
    finally:
        if store is not None:
            ray.get(store.close.remote())
            ray.kill(store)
        if started:
            ray.shutdown()
    per_individual = pd.DataFrame(rows)
    table = summarize(per_individual, [s.label for s in p.methods])
    per_individual.to_csv(run_dir / "individuals.csv", index=False)
    table.to_csv(run_dir / "table.csv", index=False)
    (run_dir / "table.md").write_text(to_markdown(table))
    return run_dir, table, per_individual


def _make_run_dir(cfg: ExperimentConfig, run_dir: Path | None) -> Path:
    """The run's folder (a new timestamped one under run.out_dir unless given), with its config."""
    run_dir = run_dir or Path(cfg.run.out_dir) / f"table-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def _encode_pool(raw_json: str, ae_ref, cfg: ExperimentConfig, individuals: np.ndarray) -> dict:
    """Devices: the pool's (per-sample latents, class-mean latents) by client id, a task per shard."""
    shards = split_even(np.array(_pool(cfg, individuals)), cfg.ray.num_workers)
    return {
        k: v
        for part in ray.get([_encode_task.remote(raw_json, ae_ref, s) for s in shards])
        for k, v in part.items()
    }


def _profile_store(run_dir: Path):
    """The encrypted profile store actor of the run, its key kept in the run's state folder."""
    return ProfileStoreActor.remote(
        run_dir / "profiles.sqlite", key_file=store_key_path(run_dir / "profiles.sqlite", run_dir)
    )


def _submit_methods(
    raw_json: str,
    cfg: ExperimentConfig,
    individuals: np.ndarray,
    latents: dict,
    candidates: dict[int, torch.Tensor],
    z_global: torch.Tensor | None,
    n_global: int,
    start: torch.Tensor,
    tl_start: torch.Tensor,
) -> list[tuple[MethodSpec, dict[int, Job], ray.ObjectRef]]:
    """Every method's jobs, a task per shard of them: (spec, its jobs by individual, the task's ref)."""
    refs = []
    for spec in cfg.personalization.methods:
        jobs = _jobs(spec, cfg, individuals, latents, candidates, z_global, n_global)
        begin = tl_start if spec.method == "tl" else start
        by_id = {j.individual: j for j in jobs}
        for shard in split_even(np.arange(len(jobs)), cfg.ray.num_workers):
            shard_jobs = [jobs[i] for i in shard]
            refs.append(
                (spec, by_id, _personalize_task.remote(raw_json, spec.model_dump(), shard_jobs, begin))
            )
    return refs


def _collect_rows(refs: list, progress: Callable[[int, int], None] | None) -> list[dict]:
    """The tasks' results in submission order, one row per (method, individual)."""
    rows = []
    for done, (spec, by_id, ref) in enumerate(refs, 1):
        res = ray.get(ref)
        if progress:
            progress(done, len(refs))
        for i, ind in enumerate(res["individual"]):
            job = by_id[ind]
            rows.append(
                {
                    "group": spec.group,
                    "method": spec.label,
                    "individual": ind,
                    "acc_DI": float(res["acc_DI"][i]),
                    "acc_DG": float(res["acc_DG"][i]),
                    "transfers": res["transfers"][i],
                    "added_samples": 0 if job.extra is None else len(job.extra),
                    "group_members": " ".join(map(str, job.group)),
                }
            )
    return rows


TABLE_COLUMNS = [
    "group",
    "method",
    "acc_DI",
    "rank_acc_DI",
    "sd_acc_DI",
    "min_acc_DI",
    "max_acc_DI",
    "acc_DG",
    "rank_acc_DG",
    "sd_acc_DG",
    "min_acc_DG",
    "max_acc_DG",
    "p_DI_vs_baseline",
    "transfers",
]


def summarize(rows: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """One line per method: acc(D_I) and acc(D_G) as mean (rank within the block) / sd / min / max,
    the paired t-test p-value of acc(D_I) against the block's first baseline, and model transfers."""
    out = [
        _method_line(group, method, g) for (group, method), g in rows.groupby(["group", "method"], sort=False)
    ]
    table = pd.DataFrame(out)
    table["order"] = table["method"].map({m: i for i, m in enumerate(order)})
    table = table.sort_values(["order"]).drop(columns="order").reset_index(drop=True)
    for m in ("acc_DI", "acc_DG"):
        table[f"rank_{m}"] = table.groupby("group")[m].rank(ascending=False, method="min").astype(int)
    table["p_DI_vs_baseline"] = _p_values(table, rows)
    return table[TABLE_COLUMNS]


def _method_line(group: str, method: str, g: pd.DataFrame) -> dict:
    """A method's acc(D_I) and acc(D_G) over its individuals (mean, sd, min, max) and mean transfers."""
    g = g.sort_values("individual")
    line = {"group": group, "method": method}
    for m in ("acc_DI", "acc_DG"):
        v = g[m].to_numpy()
        line.update(
            {
                m: v.mean(),
                f"sd_{m}": v.std(ddof=1) if len(v) > 1 else 0.0,
                f"min_{m}": v.min(),
                f"max_{m}": v.max(),
            }
        )
    line["transfers"] = float(g["transfers"].mean())
    return line


def _p_values(table: pd.DataFrame, rows: pd.DataFrame) -> list[float]:
    """Each line's paired t-test p-value of acc(D_I) against its block's first baseline (NaN for the
    baseline itself, or where the two are alike)."""
    from scipy.stats import ttest_rel

    p_values = []
    for _, line in table.iterrows():
        base = table[(table.group == line.group) & table.method.str.startswith("BaseLine")].iloc[0]
        a = rows[(rows.method == line.method) & (rows.group == line.group)].sort_values("individual").acc_DI
        b = rows[(rows.method == base.method) & (rows.group == line.group)].sort_values("individual").acc_DI
        same = line.method == base.method or np.allclose(a.to_numpy(), b.to_numpy())
        p_values.append(math.nan if same else float(ttest_rel(a.to_numpy(), b.to_numpy()).pvalue))
    return p_values


def to_markdown(table: pd.DataFrame) -> str:
    """Table I's layout: personalization (acc on D_I, rank, fairness sd/min/max), then task (D_G)."""
    head = [
        "Method",
        "",
        "Acc. on D_I",
        "Rank",
        "sd",
        "min",
        "max",
        "Acc. on D_G",
        "Rank",
        "sd",
        "min",
        "max",
        "p (D_I vs baseline)",
        "transfers",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shown = {"shaping": "Shaping", "grouping": "Data Group."}
    last = None
    for _, r in table.iterrows():
        block = shown[r.group] if r.group != last else ""
        last = r.group
        p = "" if math.isnan(r.p_DI_vs_baseline) else f"{r.p_DI_vs_baseline:.3g}"
        cells = [
            block,
            r.method,
            f"{r.acc_DI:.3f}",
            str(r.rank_acc_DI),
            f"{r.sd_acc_DI:.3f}",
            f"{r.min_acc_DI:.3f}",
            f"{r.max_acc_DI:.3f}",
            f"{r.acc_DG:.3f}",
            str(r.rank_acc_DG),
            f"{r.sd_acc_DG:.3f}",
            f"{r.min_acc_DG:.3f}",
            f"{r.max_acc_DG:.3f}",
            p,
            f"{r.transfers:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
