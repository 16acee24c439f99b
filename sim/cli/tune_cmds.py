"""`fedmeta tune`, `study` and `drift eval`: searching, sweeping and drift detection.

`tune` searches the federation's hyperparameters with Ray Tune (or finishes an interrupted search
with `--resume`) and prints the best trial, any Pareto front and the privacy the search spent;
`study` runs a scaling study (one Tune trial per grid cell) or re-plots one (`study report DIR`)
and prints its table; the `drift` group's `eval` measures the drift detectors' delay and false
alarms on streams with a known change point.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fedmeta.sim.cli.common import SetOpt, TrustOpt, epsilon_warning, err, out, stop_code, stopped
from fedmeta.sim.config import ConfigError, load


def tune_cmd(
    config: Annotated[
        Optional[Path], typer.Argument(help="experiment YAML with a tune: section (default: quickstart)")
    ] = None,
    set_: SetOpt = [],  # noqa: B006
    start: Annotated[
        Optional[Path], typer.Option(help="run directory whose checkpoint the trials continue from")
    ] = None,
    name: Annotated[
        str, typer.Option(help="Tune experiment name (a directory under run.out_dir/tune)")
    ] = "tune",
    resume: Annotated[
        Optional[Path],
        typer.Option(help="a Tune experiment directory to finish (its own config, start and privacy ledger)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="also one JSON line with the result")] = False,
    trust_code: TrustOpt = False,
) -> None:
    """Search the federation's hyperparameters with Ray Tune (Optuna TPE or random, ASHA); the best
    model becomes a candidate member. Last line: the candidate's directory."""
    from fedmeta.sim.checkpoint import load as load_ckpt
    from fedmeta.sim.tuning.tune import resume_tune, run_tune, searched_config

    if resume is not None and (config is not None or set_ or start is not None):
        raise ConfigError(
            "--resume: the experiment keeps its own config and start; give no CONFIG, --set or --start"
        )
    cfg = load(config, list(set_)) if resume is None else searched_config(resume, trust_code)
    if start is not None and not (start / "checkpoint.pt").is_file():
        raise ConfigError(f"--start: {start} has no checkpoint.pt")
    start_round = load_ckpt(start).round if start is not None else 0
    try:
        if resume is not None:
            res = resume_tune(resume, trust_code)
        else:
            res = run_tune(
                cfg, start=str(start.resolve()) if start else None, start_round=start_round, name=name
            )
    except KeyboardInterrupt as e:
        where = resume or Path(cfg.run.out_dir) / "tune" / name
        err.print(
            f"[yellow]{stopped(e)}[/]: the Tune experiment keeps its trials (finish it with "
            f"`fedmeta tune --resume {where}`)"
        )
        raise typer.Exit(stop_code(e)) from None
    _print_tune(res, cfg, as_json)


def _print_tune(res: dict, cfg, as_json: bool) -> None:
    """The search's result: the best trial, the Pareto front, the privacy spent; last, the candidate."""
    print(
        f"{res['trials']} trials ({cfg.tune.searcher}), best {res['metric']} {res['best_metric']:.4f} with "
        + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res["best_config"].items()
        )
    )
    for m in res.get("pareto", []):
        print(
            "  pareto: "
            + ", ".join(f"{o['metric']} {m[o['metric']]:.4g}" for o in res["objectives"])
            + "  ("
            + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m["config"].items()
            )
            + f")  {m['candidate']}"
        )
    if res.get("epsilon_tuning") is not None:
        print(
            f"privacy: the search spent epsilon {res['epsilon_tuning']:.3f}; with the run before it "
            f"{res['epsilon_total']:.3f} (delta {cfg.privacy.delta:g})"
        )
    if res.get("privacy_weight") is not None:
        print(
            f"personalization: the trials used the run's learned privacy weight lambda {res['privacy_weight']:.3g}"
        )
    print(
        f"Tune experiment: {res['experiment']} (an interrupted one finishes with `fedmeta tune --resume DIR`)"
    )
    if as_json:
        print(json.dumps({k: v for k, v in res.items() if k not in ("curves", "privacy_state")}, default=str))
    epsilon_warning(res.get("epsilon_total"), "this search with the run before it")
    print(res["candidate"])


def study_cmd(
    study: Annotated[
        str,
        typer.Argument(
            metavar="STUDY.yaml|report", help="a study file, or `report` followed by a study directory"
        ),
    ],
    directory: Annotated[
        Optional[Path], typer.Argument(metavar="[DIR]", help="with `report`: the study directory to re-plot")
    ] = None,
    resume: Annotated[
        Optional[Path], typer.Option(help="finish the study in this directory (its Tune experiment)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="also one JSON line with every row")] = False,
) -> None:
    """A scaling study: the base experiment over a grid of config values (and seeds), one Ray Tune
    trial per cell; writes study.parquet, study.csv and plots. Last line: the study directory.
    `fedmeta study report DIR` re-plots a study directory."""
    if study == "report":
        from fedmeta.sim.tuning.study_plots import report as replot

        if directory is None or resume is not None:
            raise ConfigError(
                "study report: expected `fedmeta study report DIR` (a study directory, no --resume)"
            )
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
        err.print(f"[yellow]{stopped(e)}[/]: finish the study with `fedmeta study STUDY.yaml --resume DIR`")
        raise typer.Exit(stop_code(e)) from None
    except StudyIncomplete as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(stop_code(KeyboardInterrupt()) if e.interrupted else 1) from None
    import pandas as pd

    table = pd.read_parquet(study_dir / "study.parquet")
    out.print(study_table(table))
    if as_json:
        print(
            json.dumps(
                {
                    "study_dir": str(study_dir),
                    "cells": len(table),
                    "rows": json.loads(table.to_json(orient="records")),
                }
            )
        )
    if "epsilon" in table:
        epsilon_warning(float(table["epsilon"].max()), "a cell of this study")
    print(study_dir)


def study_table(table) -> Table:
    """The study's rows: grid keys, seed and the headline metrics (those some run has)."""
    shown = {
        "clients_per_s": "clients/s",
        "s_per_round": "s/round",
        "acc_personalized_DI": "pers D_I",
        "acc_global_DI": "glob D_I",
        "bytes_up_per_client": "B up/client",
        "epsilon": "epsilon",
        "mia_auc_personalized": "MIA pers",
        "mia_auc_individual": "MIA indiv",
        "privacy_weight": "lambda",
    }
    shown = {m: label for m, label in shown.items() if m in table and table[m].notna().any()}
    keys = list(table.columns[: list(table.columns).index("seed") + 1])
    t = Table(title=f"fedmeta study: {len(table)} runs")
    for col in keys + list(shown.values()):
        t.add_column(col, justify="right")
    for values in table.to_dict(orient="records"):
        t.add_row(
            *(str(values[k]) for k in keys),
            *("-" if values[m] != values[m] else f"{values[m]:.4g}" for m in shown),
        )  # NaN: missing
    return t


drift_app = typer.Typer(help="Drift analyzer: detectors on streams with known change points.")


@drift_app.command("eval")
def drift_eval(
    kind: Annotated[str, typer.Option(help="rotation, new_writers, label_shift or joiners")] = "rotation",
    strength: Annotated[float, typer.Option(min=0.0, help="scales the drift")] = 1.0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    seeds: Annotated[
        int,
        typer.Option(
            min=1, help="repeat over seeds seed..seed+N-1 (fresh writers, calibration and streams each)"
        ),
    ] = 1,
    false_alarm_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="calibration target")] = 0.05,
    as_json: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
) -> None:
    """Detection delay and false alarms of each detector (auto-encoder, isolation forest, KS test)
    on writers streams: one drifting at a known batch, one that never drifts (1,000 batches); over
    several seeds, the false-alarm rate's mean with its 95% interval against the target."""
    import torch

    from fedmeta.sim.detector_eval import DRIFT_KINDS, evaluate_seeds

    if kind not in DRIFT_KINDS:
        raise ConfigError(
            f"--kind: expected {', '.join(DRIFT_KINDS[:-1])} or {DRIFT_KINDS[-1]}, got {kind!r}"
        )
    if not 0 < false_alarm_rate < 1:
        raise ConfigError(f"--false-alarm-rate: must be in (0, 1), got {false_alarm_rate}")
    torch.set_num_threads(1)  # the detectors are small; threads only contend on 2 cores
    res = evaluate_seeds(kind, strength, range(seed, seed + seeds), false_alarm_rate)
    t = Table(
        title=f"drift eval: {kind} x{strength:g}, {seeds} seed(s) (batches of 64; change at batch 20 of 40)"
    )
    for col in (
        "detector",
        "detection delay (batches)",
        "false alarms before change",
        "false-alarm rate (no drift)",
        "95% interval",
        "target",
    ):
        t.add_column(col, justify="right")
    for name, r in res.items():
        fa = r["false_alarm_rate"]
        interval = fa["interval"] or fa["pooled_interval"]
        t.add_row(
            name,
            " ".join("never" if d is None else str(d) for d in r["detection_delay"]),
            " ".join(str(v) for v in r["false_alarms_before_change"]),
            f"{fa['mean']:.3f}",
            f"{interval[0]:.3f}-{interval[1]:.3f}",
            f"{fa['target']:g}",
        )
    out.print(t)
    if as_json:
        print(
            json.dumps(
                {
                    "kind": kind,
                    "strength": strength,
                    "seeds": list(range(seed, seed + seeds)),
                    "detectors": res,
                }
            )
        )
