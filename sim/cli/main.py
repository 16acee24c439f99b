"""The `fedmeta` command line: the one typer `app`, its `--version` callback and `main`.

The commands live in modules by group (run_cmds: run, table, config, report; serve_cmd: serve,
specialize; tune_cmds: tune, study, drift; bench_cmd: bench; privacy: the privacy group) and are
registered here, in the order `fedmeta --help` lists them. `main` turns a `ConfigError` into a
one-line message and exit status 2, and makes SIGTERM stop a command the way Ctrl-C does.
"""

from __future__ import annotations

import os
import sys

import typer

from fedmeta.sim.cli.bench_cmd import bench
from fedmeta.sim.cli.common import EPSILON_WARN, SetOpt, TrustOpt, epsilon_warning, err, out
from fedmeta.sim.cli.privacy import privacy_app
from fedmeta.sim.cli.run_cmds import (
    party_lines,
    report,
    run,
    show_config,
    summary_line,
    summary_table,
    table_cmd,
)
from fedmeta.sim.cli.serve_cmd import serve_cmd, specialize
from fedmeta.sim.cli.tune_cmds import drift_app, study_cmd, study_table, tune_cmd
from fedmeta.sim.config import ConfigError

# `app` and `main` are the entry points; the rest is what this module held before the commands
# moved out, still importable from here
__all__ = [
    "app",
    "main",
    "out",
    "err",
    "SetOpt",
    "TrustOpt",
    "EPSILON_WARN",
    "epsilon_warning",
    "party_lines",
    "summary_line",
    "summary_table",
    "study_table",
    "drift_app",
    "privacy_app",
    "run",
    "table_cmd",
    "serve_cmd",
    "specialize",
    "tune_cmd",
    "study_cmd",
    "show_config",
    "report",
    "bench",
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Simulate privacy-preserving federations with meta-learning on Ray.",
)


def _version(show: bool) -> None:
    if show:
        from importlib import metadata

        try:
            version = metadata.version("fedmeta")
        except metadata.PackageNotFoundError:  # a checkout that was never installed
            version = "0+unknown"
        out.print(f"fedmeta {version}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Simulate privacy-preserving federations with meta-learning on Ray."""


# `fedmeta privacy epsilon|noise`: DP accounting with Opacus (actors/privacy/)
app.add_typer(privacy_app, name="privacy", help="Differential-privacy accounting (Opacus RDP/PRV).")

app.command()(run)
app.command("table")(table_cmd)
app.command("serve")(serve_cmd)
app.command()(specialize)
app.command("tune")(tune_cmd)
app.command("study")(study_cmd)
app.add_typer(drift_app, name="drift")
app.command("config")(show_config)
app.command()(report)
app.command()(bench)


def main() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from fedmeta.sim.engine.signals import take_sigterm

    take_sigterm()  # SIGTERM stops a command the way Ctrl-C does
    try:
        app()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
