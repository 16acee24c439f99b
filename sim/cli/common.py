"""What the command modules share: the consoles, the common options and the stop and epsilon notes.

`out` (stdout) and `err` (stderr, where progress bars go) are the one pair of rich consoles every
command prints through; `SetOpt` and `TrustOpt` are the `--set` and `--trust-code` options several
commands take; `stopped`/`stop_code` name how a command was stopped (Ctrl-C or SIGTERM) and the
exit status that says so; `epsilon_warning` flags a privacy budget too large to mean much.
Importing this module is cheap: it loads neither Ray nor torch.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

SetOpt = Annotated[list[str], typer.Option("--set", help="override a config key: --set federation.rounds=3")]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="let the artifact (a run directory's config or model card, a Tune "
        "experiment's search.json) name a custom model or algorithm, "
        "imported from the working directory and PYTHONPATH: it runs "
        "that code",
    ),
]

EPSILON_WARN = 10.0  # beyond it a guarantee says little (a likelihood ratio above e^10 = 22,026)


def epsilon_warning(epsilon: float | None, what: str) -> None:
    """One line on stderr when the total epsilon is past EPSILON_WARN."""
    if epsilon is not None and epsilon > EPSILON_WARN:
        print(
            f"warning: {what} spent epsilon {epsilon:.3g}, more than {EPSILON_WARN:g}: the guarantee says little "
            f"at that level (set privacy.target_epsilon to cap it)",
            file=sys.stderr,
        )


def fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def stopped(e: KeyboardInterrupt) -> str:
    from fedmeta.sim.engine.signals import TERMINATED, Terminated

    return "terminated" if isinstance(e, Terminated) or TERMINATED else "interrupted"


def stop_code(e: KeyboardInterrupt) -> int:
    """128 + the signal: 143 for SIGTERM, 130 for Ctrl-C."""
    return 143 if stopped(e) == "terminated" else 130
