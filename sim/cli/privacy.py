"""`fedmeta privacy`: privacy-budget arithmetic, without running anything.

`epsilon` composes T rounds of the subsampled Gaussian mechanism (user-level DP-FedAvg, McMahan et
al. 2018) and prints epsilon at delta; `noise` inverts it. `--sampling poisson` (the default) is
Opacus' accountant for Poisson sampling at q (`--sample-rate`, or `--cohort` / `--population`);
`--sampling fixed` is dp-accounting's RDP bound for fixed-size cohorts drawn without replacement
(`--population N --cohort M`), under replace-one adjacency, as `fedmeta run` accounts them.
Both print a description first and the number alone as the last line, so scripts can take
`tail -n 1`. Bad values raise `ConfigError` naming the option (the main CLI turns it into
`error: ...` and exit status 2).
"""

from __future__ import annotations

import math
from typing import Annotated, Optional

import typer

from fedmeta.sim.config import ConfigError

privacy_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Privacy budget: epsilon for a noise multiplier, or the noise for an epsilon.",
)

SampleRate = Annotated[Optional[float], typer.Option("--sample-rate", help="Poisson: client sampling rate q")]
Steps = Annotated[int, typer.Option("--steps", help="rounds T")]
Delta = Annotated[float, typer.Option("--delta", help="target delta")]
Accountant = Annotated[str, typer.Option("--accountant", help="rdp or prv (prv: Poisson only)")]
SamplingOpt = Annotated[
    str, typer.Option("--sampling", help="poisson (rate q) or fixed (cohort of M without replacement)")
]
Population = Annotated[Optional[int], typer.Option("--population", help="clients N")]
Cohort = Annotated[
    Optional[int], typer.Option("--cohort", help="clients per round M (Poisson: expected; q = M / N)")
]


def _sampling(kind: str, sample_rate: float | None, population: int | None, cohort: int | None):
    """(q, Sampling or None for plain Poisson at q) from the options; ConfigError naming the option."""
    from fedmeta.actors.privacy import Sampling

    if kind not in ("poisson", "fixed"):
        raise ConfigError(f"--sampling: expected poisson or fixed, got {kind!r}")
    sized = population is not None or cohort is not None
    if sized:
        if population is None or cohort is None:
            raise ConfigError(
                f"--{'population' if population is None else 'cohort'}: give both --population and --cohort"
            )
        if not 1 <= cohort <= population:
            raise ConfigError(f"--cohort: must be in [1, --population = {population}], got {cohort}")
        if sample_rate is not None:
            raise ConfigError(
                "--sample-rate: give either --sample-rate or --population and --cohort, not both"
            )
        return cohort / population, Sampling(kind, population, cohort)
    if kind == "fixed":
        raise ConfigError("--population: fixed-size cohorts need --population N and --cohort M")
    if sample_rate is None:
        raise ConfigError("--sample-rate: give --sample-rate q, or --population N and --cohort M")
    return sample_rate, None


def _check_common(sample_rate: float, steps: int, delta: float, accountant: str, sampling=None) -> None:
    # Validated here rather than with typer's min/max so every bad value is a ConfigError
    # with the option's name, like the rest of fedmeta.
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"--sample-rate: must be in (0, 1], got {sample_rate}")
    if sampling is not None and sampling.kind == "fixed" and accountant != "rdp":
        raise ConfigError(
            f"--accountant: {accountant!r} accounts Poisson sampling only; fixed cohorts use rdp"
        )
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
def epsilon(
    noise_multiplier: Annotated[float, typer.Option("--noise-multiplier", help="noise multiplier z")],
    steps: Steps,
    delta: Delta,
    sample_rate: SampleRate = None,
    accountant: Accountant = "rdp",
    sampling: SamplingOpt = "poisson",
    population: Population = None,
    cohort: Cohort = None,
) -> None:
    """Epsilon spent after T rounds with noise multiplier z and the cohort sampling; last line: epsilon."""
    from fedmeta.actors.privacy import epsilon_for

    _check_positive("--noise-multiplier", noise_multiplier)
    q, how = _sampling(sampling, sample_rate, population, cohort)
    _check_common(q, steps, delta, accountant, how)
    eps = epsilon_for(noise_multiplier, q, steps, delta, accountant, sampling=how)
    print(
        f"{accountant} accountant, {_describe(q, how)}: z={noise_multiplier:g}, T={steps}, delta={delta:g} "
        "-> epsilon"
    )
    print(repr(eps))  # repr round-trips the float exactly


def _describe(q: float, how) -> str:
    if how is None:
        return f"Poisson sampling q={q:g}"
    return f"{how.kind} sampling of {how.cohort} of {how.population} (q={q:g}, {how.adjacency})"


@privacy_app.command()
def noise(
    target_epsilon: Annotated[float, typer.Option("--epsilon", help="target epsilon")],
    steps: Steps,
    delta: Delta,
    sample_rate: SampleRate = None,
    accountant: Accountant = "rdp",
    sampling: SamplingOpt = "poisson",
    population: Population = None,
    cohort: Cohort = None,
) -> None:
    """Noise multiplier that keeps T rounds within (epsilon, delta); last line: the noise multiplier."""
    from fedmeta.actors.privacy import noise_for

    _check_positive("--epsilon", target_epsilon)
    q, how = _sampling(sampling, sample_rate, population, cohort)
    _check_common(q, steps, delta, accountant, how)
    try:
        z = noise_for(target_epsilon, q, steps, delta, accountant, sampling=how)
    except ValueError as e:
        # the search gives up when no noise multiplier below its ceiling reaches the target
        raise ConfigError(
            f"--epsilon: {target_epsilon:g} is unreachable with q={q:g}, T={steps} ({e})"
        ) from e
    print(
        f"{accountant} accountant, {_describe(q, how)}: epsilon={target_epsilon:g}, T={steps}, delta={delta:g} "
        "-> noise multiplier"
    )
    print(repr(z))
