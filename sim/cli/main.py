"""The `fedmeta` command line: run, report, bench."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmeta.sim.config import ConfigError, load
from fedmeta.sim.cli.privacy import privacy_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Simulate privacy-preserving federations with meta-learning on Ray.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _version(show: bool) -> None:
    if show:
        from importlib import metadata

        try:
            version = metadata.version("fedmeta")
        except metadata.PackageNotFoundError:      # a checkout that was never installed
            version = "0+unknown"
        out.print(f"fedmeta {version}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Simulate privacy-preserving federations with meta-learning on Ray."""

# `fedmeta privacy epsilon|noise`: DP accounting with Opacus (actors/privacy.py)
app.add_typer(privacy_app, name="privacy", help="Differential-privacy accounting (Opacus RDP/PRV).")

SetOpt = Annotated[list[str], typer.Option("--set", help="override a config key: --set federation.rounds=3")]
TrustOpt = Annotated[bool, typer.Option("--trust-code", help="let the artifact (a run directory's config or model card, a Tune "
                                                              "experiment's search.json) name a custom model or algorithm, "
                                                              "imported from the working directory and PYTHONPATH: it runs "
                                                              "that code")]


def summary_table(summary: dict) -> Table:
    t = Table(title=f"fedmeta: {summary.get('algorithm')} on {summary.get('data')} "
                    f"({summary.get('num_clients')} clients, {summary.get('rounds')} rounds)")
    t.add_column("metric")
    for s in ("mean", "sd", "min", "max"):
        t.add_column(s, justify="right")
    labels = {"acc_global_DG": "acc(D_G), global model", "acc_global_DI": "acc(D_I), global model",
              "acc_personalized_DI": "acc(D_I), personalized"}
    for key, label in labels.items():
        stats = summary.get(key) or {}
        t.add_row(label, *(_fmt(stats.get(s)) for s in ("mean", "sd", "min", "max")))
    return t


def summary_line(summary: dict) -> str:
    gain, cps = summary.get("personalization_gain"), summary.get("clients_per_s")
    line = (f"personalization gain {_fmt(gain, '+.4f')} | {_fmt(cps, '.1f')} clients/s | "
            f"peak RSS {_fmt(summary.get('peak_rss_mib'), '.0f')} MiB | dropouts {summary.get('dropouts')}")
    lost = (summary.get("worker_failures") or 0) + (summary.get("aggregator_failures") or 0)
    if lost:
        line += (f" | actors lost {lost} (workers {summary['worker_failures']}, aggregator "
                 f"{summary['aggregator_failures']}), shards retried {summary.get('retried_shards')}, "
                 f"rounds retried {summary.get('retried_rounds')}, workers dropped {summary.get('workers_dropped')}")
    privacy = []
    if summary.get("epsilon") is not None:
        privacy.append(f"DP epsilon {summary['epsilon']:.3g} at delta {summary['delta']:g} "
                       f"(z={summary['noise_multiplier']:.3g}, C={summary['clip_norm']:g}, "
                       f"{summary.get('sampling')} sampling, {summary.get('adjacency')})")
        privacy += party_lines(summary.get("epsilon_by_party"))
    if summary.get("local_epsilon") is not None:
        ld = summary["local_dp"]
        privacy.append(f"local DP-SGD epsilon {summary['local_epsilon']:.3g} for the most-sampled client "
                       f"(z={ld['noise_multiplier']:.3g}, per-sample clip {ld['clip']:g})")
    if summary.get("secagg_threshold") is not None:
        privacy.append(f"secure aggregation: neighbors {summary['secagg_neighbors']}, threshold "
                       f"{summary['secagg_threshold']}, mod 2^{summary['secagg_bits']}, "
                       f"aborted rounds {summary['secagg_aborted_rounds']}")
    if summary.get("mia_auc") is not None:
        privacy.append(f"membership-inference AUC {summary['mia_auc']:.3f} global, "
                       f"{_fmt(summary.get('mia_auc_personalized'), '.3f')} personalized (0.5 = no leakage); "
                       f"{_fmt(summary.get('mia_auc_individual'), '.3f')} per individual")
    j = summary.get("joiners")
    if j and j["rounds"]:
        last, before = -1, max((i for i, r in enumerate(j["rounds"]) if r <= j["at_round"]), default=None)
        was = "" if before is None else (f" (round {j['rounds'][before]}, before they joined: "
                                         f"{_fmt(j['acc_global_DI_joiners'][before], '.3f')})")
        privacy.append(f"joiners ({j['in_panel']} in the panel, joined at round {j['at_round']}): acc(D_I) of the "
                       f"global model {_fmt(j['acc_global_DI_joiners'][last], '.3f')} vs "
                       f"{_fmt(j['acc_global_DI_others'][last], '.3f')} for the others at round {j['rounds'][last]}{was}")
    lc = summary.get("leakage_control")
    if lc:
        privacy.append(f"privacy weight lambda learned: {lc['privacy_weight']:.3g} after {lc['releases']} "
                       f"leakage releases (target AUC {lc['target_auc']:g} per individual)")
    if summary.get("audit_epsilon_lower") is not None:
        privacy.append(f"canary audit ({summary['audit_canaries']} canaries): epsilon >= "
                       f"{summary['audit_epsilon_lower']:.3g} with {summary.get('audit_confidence', 0.95):.0%} "
                       f"confidence, TPR {_fmt(summary.get('audit_tpr_at_1pct_fpr'), '.2f')} at 1% FPR")
    if summary.get("stopped_early"):
        privacy.append(f"stopped early: {summary['stopped_early']}")
    return "\n".join([line, *privacy])


EPSILON_WARN = 10.0     # beyond it a guarantee says little (a likelihood ratio above e^10 = 22,026)


def epsilon_warning(epsilon: float | None, what: str) -> None:
    """One line on stderr when the total epsilon is past EPSILON_WARN."""
    if epsilon is not None and epsilon > EPSILON_WARN:
        print(f"warning: {what} spent epsilon {epsilon:.3g}, more than {EPSILON_WARN:g}: the guarantee says little "
              f"at that level (set privacy.target_epsilon to cap it)", file=sys.stderr)


def party_lines(parties: dict | None) -> list[str]:
    """What epsilon means to each party (`epsilon_by_party`), one line each."""
    if not parties:
        return []
    lines = [f"  released model: epsilon {parties['released_model']['epsilon']:.3g}, amplified by secret sampling: "
             f"holds against {parties['released_model']['holds_against']}"]
    agg = parties["aggregator"]
    if agg.get("trusted"):
        lines.append("  aggregator: trusted (central DP adds the noise at the aggregator)")
    else:
        lines.append(f"  aggregator (knows who took part): epsilon {agg['epsilon']:.3g} for the worst-off user "
                     f"({agg['rounds_max']} rounds), {agg['epsilon_median']:.3g} for the median user "
                     f"({agg['rounds_median']:g} rounds)" + (f"; {agg['note']}" if agg.get("note") else ""))
    return lines


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


class _Bar:
    """Rich progress bar on stderr: round, accuracy, clients/s."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.p = Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                          TimeElapsedColumn(), console=err, disable=not enabled)
        self.task = self.p.add_task("train", total=total, completed=start, info="")
        self.last: dict = {}

    def __call__(self, done: int, total: int, shown: dict) -> None:
        self.last.update(shown)
        parts = [f"{self.last['clients_per_s']:.0f} clients/s"]
        if self.last.get("actor_failures"):
            parts.append(f"{self.last['actor_failures']} actors lost and recovered")
        for k, label in (("acc_global_DG", "acc D_G"), ("acc_personalized_DI", "pers D_I")):
            if k in self.last:
                parts.insert(0, f"{label} {self.last[k]:.3f}")
        self.p.update(self.task, completed=done, info=" | ".join(parts))


@app.command()
def run(config: Annotated[Optional[Path], typer.Argument(help="experiment YAML or a preset name, e.g. quickstart (the default)")] = None,
        set_: SetOpt = [],  # noqa: B006 (typer reads the default)
        resume: Annotated[Optional[Path], typer.Option(help="resume the run in this directory")] = None,
        address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: start local Ray)")] = None,
        dp: Annotated[bool, typer.Option("--dp", help="user-level DP-FedAvg with central noise (= --set privacy.mode=central)")] = False,
        secagg: Annotated[bool, typer.Option("--secagg", help="masked secure aggregation (= --set secagg.enabled=true)")] = False,
        progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
        trust_code: TrustOpt = False) -> None:
    """Run an experiment; prints a summary table and, last, the run directory."""
    from ray.exceptions import RayTaskError

    from fedmeta.actors.aggregator import AggregationError
    from fedmeta.sim.tuning.autotune import run_experiment
    from fedmeta.sim.engine.faults import RoundFailed
    from fedmeta.sim.artifacts.rundir import resume_config

    if resume is not None:
        if config is not None or set_ or dp or secagg:
            raise ConfigError("--resume: takes the run directory's own config; drop CONFIG, --set, --dp and --secagg")
        cfg = resume_config(resume, trust_code)
        if not (resume / "checkpoint.pt").is_file():
            raise ConfigError(f"--resume: {resume} has no checkpoint.pt (the run never finished a checkpoint)")
    else:
        flags = (["privacy.mode=central"] if dp else []) + (["secagg.enabled=true"] if secagg else [])
        cfg = load(config, flags + list(set_))
    if address:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
    start = 0
    if resume is not None:
        from fedmeta.sim.checkpoint import load as load_ckpt

        start = load_ckpt(resume).round
    bar = _Bar(cfg.federation.rounds, start, progress and cfg.run.progress)
    try:
        with bar.p:
            run_dir, summary = run_experiment(cfg, run_dir=resume, resume=resume is not None, progress=bar)
    except KeyboardInterrupt as e:
        err.print(f"[yellow]{_stopped(e)}[/]: the last completed round is checkpointed; "
                  "continue with `fedmeta run --resume RUN_DIR`")
        raise typer.Exit(_stop_code(e)) from None
    except RayTaskError as e:
        cause = e.as_instanceof_cause()
        if not isinstance(cause, AggregationError):
            raise
        print(f"error: {cause.args[0] if cause.args else cause}; the global model was not changed and the last "
              "completed round is checkpointed", file=sys.stderr)
        raise typer.Exit(1) from None
    except RoundFailed as e:
        print(f"error: {e}; the last completed round is checkpointed (continue with `fedmeta run --resume RUN_DIR`)",
              file=sys.stderr)
        raise typer.Exit(1) from None
    out.print(summary_table(summary))
    print(summary_line(summary))
    epsilon_warning(summary.get("epsilon"), "this run")
    print(run_dir)


@app.command("table")
def table_cmd(config: Annotated[Optional[Path], typer.Argument(help="experiment YAML or a preset name (default: table)")] = None,
              set_: SetOpt = [],  # noqa: B006
              as_json: Annotated[bool, typer.Option("--json", help="also one JSON line with every row")] = False) -> None:
    """Table I of "Personalization of Deep Learning" (shaping and data grouping, one model per
    individual and method) on the federated writers data; prints the markdown table, then the
    output directory (table.md, table.csv, individuals.csv, the encrypted profile store)."""
    from fedmeta.sim.config import default_config_path
    from fedmeta.sim.personalize.table import run_table, to_markdown

    cfg = load(config or default_config_path("table.yaml"), list(set_))
    bar = Progress(TextColumn("table shards"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(), console=err,
                   disable=not cfg.run.progress)
    task = bar.add_task("table", total=None)
    try:
        with bar:
            run_dir, table, _ = run_table(cfg, progress=lambda done, total: bar.update(task, completed=done,
                                                                                      total=total))
    except KeyboardInterrupt as e:
        err.print(f"[yellow]{_stopped(e)}[/]: no table written (the profile store keeps what it holds)")
        raise typer.Exit(_stop_code(e)) from None
    print(to_markdown(table), end="")
    if as_json:
        print(json.dumps(table.to_dict(orient="records")))
    print(run_dir)


@app.command("serve")
def serve_cmd(run_dirs: Annotated[list[Path], typer.Argument(help="run directories (or member checkpoints): one ensemble member each")],
              port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port on --host")] = 8000,
              host: Annotated[str, typer.Option(help="HTTP host")] = "127.0.0.1",
              personalized: Annotated[Optional[Path], typer.Option(help="run directory whose personalized/ models serve users by id")] = None,
              top_k: Annotated[int, typer.Option(min=1, help="members combined per answer")] = 2,
              reweight_s: Annotated[float, typer.Option(min=0.1, help="seconds between routing recomputations")] = 2.0,
              write_config: Annotated[Optional[Path], typer.Option(help="write a Serve config file for `serve deploy` and exit")] = None,
              address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: start local Ray)")] = None,
              trust_code: TrustOpt = False,
              auth: Annotated[Optional[Path], typer.Option(help="JSON file mapping each bearer token to its scopes "
                                                                "(predict, personal, feedback, operator); default: "
                                                                "fresh tokens, one per scope, in a 0600 file in the "
                                                                "state directory (loopback hosts only)")] = None,
              request_timeout_s: Annotated[float, typer.Option(min=0.1, help="HTTP request timeout")] = 30.0) -> None:
    """Serve federation checkpoints as a routed, weighted ensemble (Ray Serve) until Ctrl-C."""
    import ipaddress
    import time

    from fedmeta.serve.app import Deployment, member_info
    from fedmeta.serve.auth import AuthError, load_tokens, new_token_file
    from fedmeta.sim.artifacts.statedir import state_dir

    names: dict[str, str] = {}
    for d in run_dirs:
        if not (d / "checkpoint.pt").is_file():
            raise ConfigError(f"RUN_DIRS: {d} has no checkpoint.pt")
        try:
            member_info(d, trust_code)     # a damaged or foreign checkpoint, or a card with no profile, fails here, before Ray starts
        except ValueError as e:
            raise ConfigError(f"RUN_DIRS: {e}") from None
        name = "".join(ch if ch.isalnum() else "-" for ch in d.resolve().name)[:40] or "member"
        while name in names:
            name += "-2"
        names[name] = str(d.resolve())
    if personalized is not None and not (personalized / "personalized").is_dir():
        raise ConfigError(f"--personalized: {personalized} has no personalized/ directory (a finished fedmeta run)")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if auth is None and not loopback:
        raise ConfigError(f"--host {host}: a host other hosts can reach needs --auth FILE (bearer tokens and their "
                          "scopes); without it only a loopback host is served, with generated tokens")
    token_file = None
    try:
        if auth is not None:
            tokens = load_tokens(auth)
        else:
            token_file = state_dir() / "serve" / f"tokens-{port}.json"
            tokens = load_tokens(token_file) if token_file.is_file() else None
            if tokens is None or write_config is None:     # a fresh set for each server started
                new_token_file(token_file)
                tokens = load_tokens(token_file)
    except AuthError as e:
        raise ConfigError(str(e)) from None
    dep = Deployment(names, personalized=str(personalized.resolve()) if personalized else None,
                     settings={"top_k": top_k}, reweight_s=reweight_s, trust_code=trust_code, auth=tokens)
    if write_config is not None:
        import yaml

        config = dep.config(host, port)
        config["http_options"]["request_timeout_s"] = request_timeout_s
        write_config.write_text(yaml.safe_dump(config, sort_keys=False))
        if token_file is not None:
            print(f"bearer tokens (one per scope): {token_file}")
        print(write_config)
        return
    import ray
    from ray import serve

    ray.init(address=address) if address else ray.init()
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    dep.deploy()
    print(f"serving {', '.join(names)} at http://{host}:{port} (predict, feedback, routing, members, health, "
          f"metrics); Ctrl-C stops")
    if token_file is not None:
        print(f"bearer tokens (one per scope): {token_file}")
    try:
        while True:
            time.sleep(reweight_s)
            released = dep.collect()
            if released:
                print(f"released: {', '.join(released)}")
    except KeyboardInterrupt:
        serve.shutdown()


@app.command()
def specialize(run_dir: Annotated[Path, typer.Argument(help="a finished run directory (with personalized/)")],
               groups: Annotated[int, typer.Option(min=1, help="members to make: groups of similar individuals")] = 3,
               out_dir: Annotated[Optional[Path], typer.Option("--out", help="where to write them (default RUN_DIR/members)")] = None,
               trust_code: TrustOpt = False) -> None:
    """Export specialized ensemble members, one per group of similar individuals, for `fedmeta serve`."""
    from fedmeta.sim.personalize.specialize import specialize as export

    try:
        for path in export(run_dir, groups, out_dir, trust_code):
            print(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


@app.command("tune")
def tune_cmd(config: Annotated[Optional[Path], typer.Argument(help="experiment YAML with a tune: section (default: quickstart)")] = None,
             set_: SetOpt = [],  # noqa: B006
             start: Annotated[Optional[Path], typer.Option(help="run directory whose checkpoint the trials continue from")] = None,
             name: Annotated[str, typer.Option(help="Tune experiment name (a directory under run.out_dir/tune)")] = "tune",
             resume: Annotated[Optional[Path], typer.Option(help="a Tune experiment directory to finish (its own "
                                                                 "config, start and privacy ledger)")] = None,
             as_json: Annotated[bool, typer.Option("--json", help="also one JSON line with the result")] = False,
             trust_code: TrustOpt = False) -> None:
    """Search the federation's hyperparameters with Ray Tune (Optuna TPE or random, ASHA); the best
    model becomes a candidate member. Last line: the candidate's directory."""
    from fedmeta.sim.checkpoint import load as load_ckpt
    from fedmeta.sim.tuning.tune import resume_tune, run_tune, searched_config

    if resume is not None and (config is not None or set_ or start is not None):
        raise ConfigError("--resume: the experiment keeps its own config and start; give no CONFIG, --set or --start")
    cfg = load(config, list(set_)) if resume is None else searched_config(resume, trust_code)
    if start is not None and not (start / "checkpoint.pt").is_file():
        raise ConfigError(f"--start: {start} has no checkpoint.pt")
    start_round = load_ckpt(start).round if start is not None else 0
    try:
        if resume is not None:
            res = resume_tune(resume, trust_code)
        else:
            res = run_tune(cfg, start=str(start.resolve()) if start else None, start_round=start_round, name=name)
    except KeyboardInterrupt as e:
        where = resume or Path(cfg.run.out_dir) / "tune" / name
        err.print(f"[yellow]{_stopped(e)}[/]: the Tune experiment keeps its trials (finish it with "
                  f"`fedmeta tune --resume {where}`)")
        raise typer.Exit(_stop_code(e)) from None
    print(f"{res['trials']} trials ({cfg.tune.searcher}), best {res['metric']} {res['best_metric']:.4f} with "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res["best_config"].items()))
    for m in res.get("pareto", []):
        print("  pareto: " + ", ".join(f"{o['metric']} {m[o['metric']]:.4g}" for o in res["objectives"])
              + "  (" + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m["config"].items())
              + f")  {m['candidate']}")
    if res.get("epsilon_tuning") is not None:
        print(f"privacy: the search spent epsilon {res['epsilon_tuning']:.3f}; with the run before it "
              f"{res['epsilon_total']:.3f} (delta {cfg.privacy.delta:g})")
    if res.get("privacy_weight") is not None:
        print(f"personalization: the trials used the run's learned privacy weight lambda {res['privacy_weight']:.3g}")
    print(f"Tune experiment: {res['experiment']} (an interrupted one finishes with `fedmeta tune --resume DIR`)")
    if as_json:
        print(json.dumps({k: v for k, v in res.items() if k not in ("curves", "privacy_state")}, default=str))
    epsilon_warning(res.get("epsilon_total"), "this search with the run before it")
    print(res["candidate"])


@app.command("study")
def study_cmd(study: Annotated[str, typer.Argument(metavar="STUDY.yaml|report",
                                                  help="a study file, or `report` followed by a study directory")],
              directory: Annotated[Optional[Path], typer.Argument(metavar="[DIR]", help="with `report`: the study directory to re-plot")] = None,
              resume: Annotated[Optional[Path], typer.Option(help="finish the study in this directory (its Tune experiment)")] = None,
              as_json: Annotated[bool, typer.Option("--json", help="also one JSON line with every row")] = False) -> None:
    """A scaling study: the base experiment over a grid of config values (and seeds), one Ray Tune
    trial per cell; writes study.parquet, study.csv and plots. Last line: the study directory.
    `fedmeta study report DIR` re-plots a study directory."""
    if study == "report":
        from fedmeta.sim.tuning.study_plots import report as replot

        if directory is None or resume is not None:
            raise ConfigError("study report: expected `fedmeta study report DIR` (a study directory, no --resume)")
        for path in replot(directory):
            print(path)
        print(directory)
        return
    if directory is not None:
        raise ConfigError(f"study: unexpected argument {directory} (to re-plot: `fedmeta study report DIR`)")
    from fedmeta.sim.tuning.study import StudyIncomplete, run_study

    try:
        study_dir = run_study(Path(study), resume=resume, progress=True)
    except KeyboardInterrupt as e:
        err.print(f"[yellow]{_stopped(e)}[/]: finish the study with `fedmeta study STUDY.yaml --resume DIR`")
        raise typer.Exit(_stop_code(e)) from None
    except StudyIncomplete as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(_stop_code(KeyboardInterrupt()) if e.interrupted else 1) from None
    import pandas as pd

    table = pd.read_parquet(study_dir / "study.parquet")
    out.print(study_table(table))
    if as_json:
        print(json.dumps({"study_dir": str(study_dir), "cells": len(table),
                          "rows": json.loads(table.to_json(orient="records"))}))
    if "epsilon" in table:
        epsilon_warning(float(table["epsilon"].max()), "a cell of this study")
    print(study_dir)


def study_table(table) -> Table:
    """The study's rows: grid keys, seed and the headline metrics (those some run has)."""
    shown = {"clients_per_s": "clients/s", "s_per_round": "s/round", "acc_personalized_DI": "pers D_I",
             "acc_global_DI": "glob D_I", "bytes_up_per_client": "B up/client", "epsilon": "epsilon",
             "mia_auc_personalized": "MIA pers", "mia_auc_individual": "MIA indiv", "privacy_weight": "lambda"}
    shown = {m: label for m, label in shown.items() if m in table and table[m].notna().any()}
    keys = list(table.columns[:list(table.columns).index("seed") + 1])
    t = Table(title=f"fedmeta study: {len(table)} runs")
    for col in keys + list(shown.values()):
        t.add_column(col, justify="right")
    for values in table.to_dict(orient="records"):
        t.add_row(*(str(values[k]) for k in keys),
                  *("-" if values[m] != values[m] else f"{values[m]:.4g}" for m in shown))    # NaN: missing
    return t


drift_app = typer.Typer(help="Drift analyzer: detectors on streams with known change points.")
app.add_typer(drift_app, name="drift")


@drift_app.command("eval")
def drift_eval(kind: Annotated[str, typer.Option(help="rotation, new_writers, label_shift or joiners")] = "rotation",
               strength: Annotated[float, typer.Option(min=0.0, help="scales the drift")] = 1.0,
               seed: Annotated[int, typer.Option(min=0)] = 0,
               seeds: Annotated[int, typer.Option(min=1, help="repeat over seeds seed..seed+N-1 (fresh writers, "
                                                              "calibration and streams each)")] = 1,
               false_alarm_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="calibration target")] = 0.05,
               as_json: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False) -> None:
    """Detection delay and false alarms of each detector (auto-encoder, isolation forest, KS test)
    on writers streams: one drifting at a known batch, one that never drifts (1,000 batches); over
    several seeds, the false-alarm rate's mean with its 95% interval against the target."""
    import torch

    from fedmeta.sim.detectors import DRIFT_KINDS, evaluate_seeds

    if kind not in DRIFT_KINDS:
        raise ConfigError(f"--kind: expected {', '.join(DRIFT_KINDS[:-1])} or {DRIFT_KINDS[-1]}, got {kind!r}")
    if not 0 < false_alarm_rate < 1:
        raise ConfigError(f"--false-alarm-rate: must be in (0, 1), got {false_alarm_rate}")
    torch.set_num_threads(1)    # the detectors are small; threads only contend on 2 cores
    res = evaluate_seeds(kind, strength, range(seed, seed + seeds), false_alarm_rate)
    t = Table(title=f"drift eval: {kind} x{strength:g}, {seeds} seed(s) (batches of 64; change at batch 20 of 40)")
    for col in ("detector", "detection delay (batches)", "false alarms before change", "false-alarm rate (no drift)",
                "95% interval", "target"):
        t.add_column(col, justify="right")
    for name, r in res.items():
        fa = r["false_alarm_rate"]
        interval = fa["interval"] or fa["pooled_interval"]
        t.add_row(name, " ".join("never" if d is None else str(d) for d in r["detection_delay"]),
                  " ".join(str(v) for v in r["false_alarms_before_change"]), f"{fa['mean']:.3f}",
                  f"{interval[0]:.3f}-{interval[1]:.3f}", f"{fa['target']:g}")
    out.print(t)
    if as_json:
        print(json.dumps({"kind": kind, "strength": strength, "seeds": list(range(seed, seed + seeds)),
                          "detectors": res}))


@app.command("config")
def show_config(config: Annotated[Optional[Path], typer.Argument(help="experiment YAML (default: quickstart)")] = None,
                set_: SetOpt = []) -> None:  # noqa: B006
    """Validate a config and print it in full, defaults included (what `fedmeta run` would use)."""
    from fedmeta.sim.config import to_yaml

    print(to_yaml(load(config, set_)), end="")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Print the summary table of a finished run."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no summary.json (not a finished run directory)")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    out.print(summary_table(summary))
    print(summary_line(summary))


@app.command()
def bench(workload: Annotated[str, typer.Option(help="w1 (CNN, FEMNIST-shaped), w2 (MLP, 10k clients) or w3 (MLP, 1M clients, 10k per round)")] = "w1",
          compute: Annotated[str, typer.Option("--compute", "--path", help="cohort engine: vmap, loop or auto (--path: deprecated name)")] = "auto",
          rounds: Annotated[int, typer.Option(min=1, help="timed rounds (after one warm-up round)")] = 5,
          workers: Annotated[Optional[int], typer.Option(min=1, help="worker actors (default: the workload's)")] = None,
          set_: SetOpt = [],  # noqa: B006
          secagg: Annotated[bool, typer.Option("--secagg", help="also secure aggregation: k=20, complete graph, 10% dropout")] = False,
          repeats: Annotated[int, typer.Option(min=1, help="--secagg: plain/k=20 alternations (medians compared)")] = 3,
          serve_: Annotated[bool, typer.Option("--serve", help="load-test the routed ensemble (3 members) against a single model and a no-op Serve app")] = False,
          tune_: Annotated[bool, typer.Option("--tune", help="after a drift: tuned vs untuned recovery, Bayesian vs 4x random search")] = False,
          seconds: Annotated[float, typer.Option(min=0.5, help="--serve: seconds per concurrency level")] = 5.0,
          async_: Annotated[bool, typer.Option("--async", help="synchronous FedAvg vs FedBuff to eval.target on simulated heterogeneous devices (configs/heterogeneous.yaml)")] = False,
          seeds: Annotated[int, typer.Option(min=1, help="--async: seeds, each run both ways (medians compared); "
                                                         "--tune: seeds S..S+N-1 (S: the config's seed, e.g. "
                                                         "--set seed=3), each a whole comparison")] = 3,
          as_json: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False) -> None:
    """Throughput of the actor pool on a fixed workload (or, with --serve, of the Serve app)."""
    from fedmeta.sim.cli.bench import WORKLOADS, run_bench, run_secagg_bench, run_serve_bench, workload_config

    if async_:
        from fedmeta.sim.cli.bench import run_async_bench

        res = run_async_bench(workload_config("heterogeneous", list(set_)), seeds=seeds)
        for name in ("sync", "fedbuff"):
            for r in res["runs"][name]:
                print(f"seed {r['seed']} {name:7s}: {res['target_metric']} >= {res['target']} after "
                      f"{r['time_to_target_s'] if r['time_to_target_s'] is None else round(r['time_to_target_s'], 1)} "
                      f"simulated s (round {r['rounds_to_target']}); final {r['acc_global_DI']:.3f} at "
                      f"{r['sim_time_s']:.1f} s")
        fmt = lambda x: "not reached by every seed" if x is None else f"{x:.1f} s"  # noqa: E731
        print(f"median simulated time to target: sync {fmt(res['sync_time_to_target_s'])}, FedBuff "
              f"{fmt(res['fedbuff_time_to_target_s'])}"
              + (f" ({res['fedbuff_speedup']:.1f}x faster)" if res["fedbuff_speedup"] else ""))
        if as_json:
            print(json.dumps(res))
        return

    if tune_:
        from fedmeta.sim.cli.bench import run_tune_bench

        base = workload_config("tune", list(set_))
        res = run_tune_bench(base, seeds=range(base.seed, base.seed + seeds))     # --set seed=S: seeds S, S+1, ...
        bo = base.tune.sampler.upper()
        for r in res["runs"]:
            print(f"seed {r['seed']}, after the drift ({r['metric']}, {r['post_rounds']} rounds):")
            print("  untuned: " + " ".join(f"{v:.3f}" for v in r["untuned_curve"]))
            print("  tuned:   " + " ".join(f"{v:.3f}" for v in r["tuned_curve"]) + f"  ({r['best_config']})")
            print(f"  Bayesian ({bo}) trials to reach 95% of the best of {r['random_trials']} random trials "
                  f"({r['random_best']:.3f}): {r['bo_trials_to_95']} of {r['bo_trials']}")
        print(f"over {len(res['seeds'])} seeds: tuned {res['tuned_acc_mean']:.3f} +- {res['tuned_acc_sd']:.3f}, untuned "
              f"{res['untuned_acc_mean']:.3f} +- {res['untuned_acc_sd']:.3f}; {bo} reached 95% of random search's best "
              f"in {res['bo_reached_95']} of {len(res['seeds'])} seeds ({res['bo_trials_to_95_seeds']})")
        if as_json:
            keys = ("tuned_acc", "untuned_acc", "bo_trials_to_95", "random_trials", "bo_trials", "random_best",
                    "untuned_curve", "tuned_curve", "bo_trial_bests", "best_config", "seed")
            print(json.dumps({**{k: v for k, v in res.items() if k != "runs"}, "sampler": base.tune.sampler,
                              "runs": [{k: r[k] for k in keys} for r in res["runs"]]}))
        return
    if serve_:
        from fedmeta.sim.cli.bench import SERVE_TARGETS

        res = run_serve_bench(seconds=seconds)
        for label in SERVE_TARGETS:
            for c, r in res[label].items():
                shared = f"  {r['requests_per_fan_out']:.1f} requests a member call" if "requests_per_fan_out" in r else ""
                print(f"{label:8s} concurrency {c:3d}: {r['rps']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                      f"p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}{shared}")
        ratio = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
        print(f"at concurrency {res['at_concurrency']}: " + ", ".join(
            f"{label} {res[f'{label}_rps']:.1f} req/s (p99 {res[f'{label}_p99_ms']:.1f} ms)" for label in SERVE_TARGETS))
        print(f"ensemble / single throughput: {ratio(res['throughput_ratio'])}; single / no-op (Serve's ceiling): "
              f"{ratio(res['single_to_noop'])}; errors {res['errors']}")
        if as_json:
            print(json.dumps(res))
        return

    if workload not in WORKLOADS:
        raise ConfigError(f"--workload: expected one of {', '.join(WORKLOADS)}, got {workload!r}")
    if compute not in ("vmap", "loop", "auto"):
        raise ConfigError(f"--compute: expected vmap, loop or auto, got {compute!r}")
    extra = [f"ray.compute={compute}"] + ([f"ray.num_workers={workers}"] if workers else []) + list(set_)
    cfg = workload_config(workload, extra)
    res = run_secagg_bench(cfg, rounds, workload, repeats) if secagg else run_bench(cfg, rounds=rounds, workload=workload)
    if as_json:
        print(json.dumps(res))
    else:
        t = Table(title=f"fedmeta bench {workload} ({res['compute']}, {res['num_workers']} workers)")
        t.add_column("s/round", justify="right")
        t.add_column("clients/s", justify="right")
        t.add_column("peak RSS MiB", justify="right")
        t.add_column("GFLOP/s (sgemm)", justify="right")
        t.add_row(f"{res['s_per_round']:.3f}", f"{res['clients_per_s']:.1f}", f"{res['peak_rss_mib']:.0f}",
                  f"{res['gflops']:.1f} ({res['sgemm_gflops']:.0f}: {res['gflops'] / res['sgemm_gflops']:.0%})")
        out.print(t)
        for name, r in res.get("secagg", {}).items():
            print(f"secagg {name}: {r['s_per_round']:.3f} s/round, {r['clients_per_s']:.1f} clients/s")
        if "secagg_overhead" in res:
            print(f"secagg_overhead (k=20 / plain): {res['secagg_overhead']:.2f}x")


def _stopped(e: KeyboardInterrupt) -> str:
    from fedmeta.sim.engine.signals import TERMINATED, Terminated

    return "terminated" if isinstance(e, Terminated) or TERMINATED else "interrupted"


def _stop_code(e: KeyboardInterrupt) -> int:
    """128 + the signal: 143 for SIGTERM, 130 for Ctrl-C."""
    return 143 if _stopped(e) == "terminated" else 130


def main() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from fedmeta.sim.engine.signals import take_sigterm

    take_sigterm()                      # SIGTERM stops a command the way Ctrl-C does
    try:
        app()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
