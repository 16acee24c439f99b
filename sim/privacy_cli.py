"""`fedmeta privacy`: privacy-budget arithmetic with Opacus' accountants, without running anything.

`epsilon` composes T rounds of the Poisson-subsampled Gaussian mechanism (user-level DP-FedAvg,
McMahan et al. 2018) and prints epsilon at delta; `noise` inverts it with Opacus' noise search.
Both print a description first and the number alone as the last line, so scripts can take
`tail -n 1`. Bad values raise `ConfigError` naming the option (the main CLI turns it into
`error: ...` and exit status 2).
"""
from __future__ import annotations

import math
from typing import Annotated

import typer

from sim.config import ConfigError

privacy_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Privacy budget: epsilon for a noise multiplier, or the noise for an epsilon.")

SampleRate = Annotated[float, typer.Option("--sample-rate", help="client sampling rate q = cohort / population")]
Steps = Annotated[int, typer.Option("--steps", help="rounds T")]
Delta = Annotated[float, typer.Option("--delta", help="target delta")]
Accountant = Annotated[str, typer.Option("--accountant", help="rdp or prv")]


def _check_common(sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    # Validated here rather than with typer's min/max so every bad value is a ConfigError
    # with the option's name, like the rest of fedmeta.
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"--sample-rate: must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {steps}")
    if not 0 < delta < 1:
        raise ConfigError(f"--delta: must be in (0, 1), got {delta}")
    if accountant not in ("rdp", "prv"):
        raise ConfigError(f"--accountant: expected rdp or prv, got {accountant!r}")


def _check_positive(option: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{option}: must be a finite number > 0, got {value}")


@privacy_app.command()
def epsilon(noise_multiplier: Annotated[float, typer.Option("--noise-multiplier", help="noise multiplier z")],
            sample_rate: SampleRate, steps: Steps, delta: Delta, accountant: Accountant = "rdp") -> None:
    """Epsilon spent after T rounds with noise multiplier z and sampling rate q; last line: epsilon."""
    from actors.privacy import epsilon_for

    _check_positive("--noise-multiplier", noise_multiplier)
    _check_common(sample_rate, steps, delta, accountant)
    eps = epsilon_for(noise_multiplier, sample_rate, steps, delta, accountant)
    print(f"{accountant} accountant: z={noise_multiplier:g}, q={sample_rate:g}, T={steps}, delta={delta:g} -> epsilon")
    print(repr(eps))  # repr round-trips the float exactly


@privacy_app.command()
def noise(target_epsilon: Annotated[float, typer.Option("--epsilon", help="target epsilon")],
          sample_rate: SampleRate, steps: Steps, delta: Delta, accountant: Accountant = "rdp") -> None:
    """Noise multiplier that keeps T rounds within (epsilon, delta); last line: the noise multiplier."""
    from actors.privacy import noise_for

    _check_positive("--epsilon", target_epsilon)
    _check_common(sample_rate, steps, delta, accountant)
    try:
        z = noise_for(target_epsilon, sample_rate, steps, delta, accountant)
    except ValueError as e:
        # Opacus gives up when no noise multiplier below its ceiling reaches the target.
        raise ConfigError(f"--epsilon: {target_epsilon:g} is unreachable with q={sample_rate:g}, "
                          f"T={steps} ({e})") from e
    print(f"{accountant} accountant: epsilon={target_epsilon:g}, q={sample_rate:g}, T={steps}, delta={delta:g} "
          "-> noise multiplier")
    print(repr(z))
