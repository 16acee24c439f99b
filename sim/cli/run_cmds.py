"""`fedmeta run`, `table`, `config` and `report`: running experiments and reading their results.

`run` trains a federation (or, with `--resume`, finishes one from its last checkpoint) behind a
progress bar and prints the summary table, the headline and privacy lines and, last, the run
directory; `report` prints the same for a finished run, `config` the validated config in full, and
`table` runs the personalization study (Table I). `summary_table` and `summary_line` are the
report format the other commands reuse.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmeta.sim.cli.common import SetOpt, TrustOpt, epsilon_warning, err, fmt, out, stop_code, stopped
from fedmeta.sim.config import ConfigError, load


def summary_table(summary: dict) -> Table:
    t = Table(
        title=f"fedmeta: {summary.get('algorithm')} on {summary.get('data')} "
        f"({summary.get('num_clients')} clients, {summary.get('rounds')} rounds)"
    )
    t.add_column("metric")
    for s in ("mean", "sd", "min", "max"):
        t.add_column(s, justify="right")
    labels = {
        "acc_global_DG": "acc(D_G), global model",
        "acc_global_DI": "acc(D_I), global model",
        "acc_personalized_DI": "acc(D_I), personalized",
    }
    for key, label in labels.items():
        stats = summary.get(key) or {}
        t.add_row(label, *(fmt(stats.get(s)) for s in ("mean", "sd", "min", "max")))
    return t


def summary_line(summary: dict) -> str:
    """The headline (personalization gain, throughput, memory, dropouts, lost actors), then one line
    per privacy measure the run has."""
    gain, cps = summary.get("personalization_gain"), summary.get("clients_per_s")
    line = (
        f"personalization gain {fmt(gain, '+.4f')} | {fmt(cps, '.1f')} clients/s | "
        f"peak RSS {fmt(summary.get('peak_rss_mib'), '.0f')} MiB | dropouts {summary.get('dropouts')}"
    )
    lost = (summary.get("worker_failures") or 0) + (summary.get("aggregator_failures") or 0)
    if lost:
        line += (
            f" | actors lost {lost} (workers {summary['worker_failures']}, aggregator "
            f"{summary['aggregator_failures']}), shards retried {summary.get('retried_shards')}, "
            f"rounds retried {summary.get('retried_rounds')}, workers dropped {summary.get('workers_dropped')}"
        )
    return "\n".join([line, *_privacy_lines(summary)])


def _privacy_lines(summary: dict) -> list[str]:
    privacy = []
    if summary.get("epsilon") is not None:
        privacy.append(
            f"DP epsilon {summary['epsilon']:.3g} at delta {summary['delta']:g} "
            f"(z={summary['noise_multiplier']:.3g}, C={summary['clip_norm']:g}, "
            f"{summary.get('sampling')} sampling, {summary.get('adjacency')})"
        )
        privacy += party_lines(summary.get("epsilon_by_party"))
    if summary.get("local_epsilon") is not None:
        ld = summary["local_dp"]
        privacy.append(
            f"local DP-SGD epsilon {summary['local_epsilon']:.3g} for the most-sampled client "
            f"(z={ld['noise_multiplier']:.3g}, per-sample clip {ld['clip']:g})"
        )
    if summary.get("secagg_threshold") is not None:
        privacy.append(
            f"secure aggregation: neighbors {summary['secagg_neighbors']}, threshold "
            f"{summary['secagg_threshold']}, mod 2^{summary['secagg_bits']}, "
            f"aborted rounds {summary['secagg_aborted_rounds']}"
        )
    if summary.get("mia_auc") is not None:
        privacy.append(
            f"membership-inference AUC {summary['mia_auc']:.3f} global, "
            f"{fmt(summary.get('mia_auc_personalized'), '.3f')} personalized (0.5 = no leakage); "
            f"{fmt(summary.get('mia_auc_individual'), '.3f')} per individual"
        )
    j = summary.get("joiners")
    if j and j["rounds"]:
        last, before = -1, max((i for i, r in enumerate(j["rounds"]) if r <= j["at_round"]), default=None)
        was = (
            ""
            if before is None
            else (
                f" (round {j['rounds'][before]}, before they joined: "
                f"{fmt(j['acc_global_DI_joiners'][before], '.3f')})"
            )
        )
        privacy.append(
            f"joiners ({j['in_panel']} in the panel, joined at round {j['at_round']}): acc(D_I) of the "
            f"global model {fmt(j['acc_global_DI_joiners'][last], '.3f')} vs "
            f"{fmt(j['acc_global_DI_others'][last], '.3f')} for the others at round {j['rounds'][last]}{was}"
        )
    lc = summary.get("leakage_control")
    if lc:
        privacy.append(
            f"privacy weight lambda learned: {lc['privacy_weight']:.3g} after {lc['releases']} "
            f"leakage releases (target AUC {lc['target_auc']:g} per individual)"
        )
    if summary.get("audit_epsilon_lower") is not None:
        privacy.append(
            f"canary audit ({summary['audit_canaries']} canaries): epsilon >= "
            f"{summary['audit_epsilon_lower']:.3g} with {summary.get('audit_confidence', 0.95):.0%} "
            f"confidence, TPR {fmt(summary.get('audit_tpr_at_1pct_fpr'), '.2f')} at 1% FPR"
        )
    if summary.get("stopped_early"):
        privacy.append(f"stopped early: {summary['stopped_early']}")
    return privacy


def party_lines(parties: dict | None) -> list[str]:
    """What epsilon means to each party (`epsilon_by_party`), one line each."""
    if not parties:
        return []
    lines = [
        f"  released model: epsilon {parties['released_model']['epsilon']:.3g}, amplified by secret sampling: "
        f"holds against {parties['released_model']['holds_against']}"
    ]
    agg = parties["aggregator"]
    if agg.get("trusted"):
        lines.append("  aggregator: trusted (central DP adds the noise at the aggregator)")
    else:
        lines.append(
            f"  aggregator (knows who took part): epsilon {agg['epsilon']:.3g} for the worst-off user "
            f"({agg['rounds_max']} rounds), {agg['epsilon_median']:.3g} for the median user "
            f"({agg['rounds_median']:g} rounds)" + (f"; {agg['note']}" if agg.get("note") else "")
        )
    return lines


class _Bar:
    """Rich progress bar on stderr: round, accuracy, clients/s."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.p = Progress(
            TextColumn("round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=err,
            disable=not enabled,
        )
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


def run(
    config: Annotated[
        Optional[Path], typer.Argument(help="experiment YAML or a preset name, e.g. quickstart (the default)")
    ] = None,
    set_: SetOpt = [],  # noqa: B006 (typer reads the default)
    resume: Annotated[Optional[Path], typer.Option(help="resume the run in this directory")] = None,
    address: Annotated[
        Optional[str], typer.Option(help="Ray cluster address (default: start local Ray)")
    ] = None,
    dp: Annotated[
        bool,
        typer.Option("--dp", help="user-level DP-FedAvg with central noise (= --set privacy.mode=central)"),
    ] = False,
    secagg: Annotated[
        bool, typer.Option("--secagg", help="masked secure aggregation (= --set secagg.enabled=true)")
    ] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    trust_code: TrustOpt = False,
) -> None:
    """Run an experiment; prints a summary table and, last, the run directory."""
    from ray.exceptions import RayTaskError

    from fedmeta.actors.aggregator import AggregationError
    from fedmeta.sim.engine.faults import RoundFailed
    from fedmeta.sim.tuning.autotune import run_experiment

    cfg = _run_config(config, set_, resume, dp, secagg, address, trust_code)
    start = 0
    if resume is not None:
        from fedmeta.sim.checkpoint import load as load_ckpt

        start = load_ckpt(resume).round
    bar = _Bar(cfg.federation.rounds, start, progress and cfg.run.progress)
    try:
        with bar.p:
            run_dir, summary = run_experiment(cfg, run_dir=resume, resume=resume is not None, progress=bar)
    except KeyboardInterrupt as e:
        err.print(
            f"[yellow]{stopped(e)}[/]: the last completed round is checkpointed; "
            "continue with `fedmeta run --resume RUN_DIR`"
        )
        raise typer.Exit(stop_code(e)) from None
    except RayTaskError as e:
        cause = e.as_instanceof_cause()
        if not isinstance(cause, AggregationError):
            raise
        print(
            f"error: {cause.args[0] if cause.args else cause}; the global model was not changed and the last "
            "completed round is checkpointed",
            file=sys.stderr,
        )
        raise typer.Exit(1) from None
    except RoundFailed as e:
        print(
            f"error: {e}; the last completed round is checkpointed (continue with `fedmeta run --resume RUN_DIR`)",
            file=sys.stderr,
        )
        raise typer.Exit(1) from None
    out.print(summary_table(summary))
    print(summary_line(summary))
    epsilon_warning(summary.get("epsilon"), "this run")
    print(run_dir)


def _run_config(
    config: Optional[Path],
    set_: list[str],
    resume: Optional[Path],
    dp: bool,
    secagg: bool,
    address: Optional[str],
    trust_code: bool,
):
    """What `fedmeta run` runs: with --resume the run directory's own config, else CONFIG with the
    --dp/--secagg flags and --set overrides; --address replaces ray.address."""
    from fedmeta.sim.artifacts.rundir import resume_config

    if resume is not None:
        if config is not None or set_ or dp or secagg:
            raise ConfigError(
                "--resume: takes the run directory's own config; drop CONFIG, --set, --dp and --secagg"
            )
        cfg = resume_config(resume, trust_code)
        if not (resume / "checkpoint.pt").is_file():
            raise ConfigError(
                f"--resume: {resume} has no checkpoint.pt (the run never finished a checkpoint)"
            )
    else:
        flags = (["privacy.mode=central"] if dp else []) + (["secagg.enabled=true"] if secagg else [])
        cfg = load(config, flags + list(set_))
    if address:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
    return cfg


def table_cmd(
    config: Annotated[
        Optional[Path], typer.Argument(help="experiment YAML or a preset name (default: table)")
    ] = None,
    set_: SetOpt = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="also one JSON line with every row")] = False,
) -> None:
    """Table I of "Personalization of Deep Learning" (shaping and data grouping, one model per
    individual and method) on the federated writers data; prints the markdown table, then the
    output directory (table.md, table.csv, individuals.csv, the encrypted profile store)."""
    from fedmeta.sim.config import default_config_path
    from fedmeta.sim.personalize.table import run_table, to_markdown

    cfg = load(config or default_config_path("table.yaml"), list(set_))
    bar = Progress(
        TextColumn("table shards"),
        MofNCompleteColumn(),
        BarColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not cfg.run.progress,
    )
    task = bar.add_task("table", total=None)
    try:
        with bar:
            run_dir, table, _ = run_table(
                cfg, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
    except KeyboardInterrupt as e:
        err.print(f"[yellow]{stopped(e)}[/]: no table written (the profile store keeps what it holds)")
        raise typer.Exit(stop_code(e)) from None
    print(to_markdown(table), end="")
    if as_json:
        print(json.dumps(table.to_dict(orient="records")))
    print(run_dir)


def show_config(
    config: Annotated[Optional[Path], typer.Argument(help="experiment YAML (default: quickstart)")] = None,
    set_: SetOpt = [],
) -> None:  # noqa: B006
    """Validate a config and print it in full, defaults included (what `fedmeta run` would use)."""
    from fedmeta.sim.config import to_yaml

    print(to_yaml(load(config, set_)), end="")


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
