"""Calibration: the noise multiplier that meets a target epsilon.

``noise_for`` is the smallest z whose epsilon after T rounds stays within the target: Opacus'
``get_noise_multiplier`` for Poisson sampling, and for fixed-size cohorts the same bisection rule
(the upper end of the bracket, within a tolerance below the target) over ``epsilon_for``. The
run's z is resolved from its privacy config by ``_resolve_noise`` (0 without DP, the configured z,
``fedmeta.sim.config``'s default, or the z for ``privacy.target_epsilon``); it imports the config
module only when called.
"""

from __future__ import annotations

import warnings

from fedmeta.actors.privacy.accountants import Sampling, epsilon_for
from fedmeta.actors.privacy.checks import (
    AccountantName,
    _check_accountant,
    _check_delta,
    _check_sample_rate,
    _positive,
)


def noise_for(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = "rdp",
    epsilon_tolerance: float = 0.01,
    sampling: Sampling | None = None,
) -> float:
    """Smallest z (to Opacus' bisection tolerance) whose epsilon after ``steps`` rounds is <= target.

    Opacus' ``get_noise_multiplier`` returns the upper end of its bracket, so the budget is never
    exceeded; its epsilon lies within ``epsilon_tolerance`` below the target.
    """
    _positive("target_epsilon", target_epsilon)
    _check_sample_rate(sample_rate)
    _check_delta(delta)
    _check_accountant(accountant)
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    if sampling is not None and sampling.kind == "fixed":
        return _bisect_noise(
            lambda z: epsilon_for(z, sampling.rate, steps, delta, accountant, sampling),
            target_epsilon,
            epsilon_tolerance,
        )
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The bisection probes very large sigmas whose tiny epsilon is best at the largest RDP order;
        # Opacus warns about that bound at each probe, which says nothing about the answer.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
        )


def _bisect_noise(eps_of, target: float, tolerance: float, z_max: float = 1e3) -> float:
    """The upper end of a bisection bracket on z with eps_of(z) <= target, narrowed until its
    epsilon lies within `tolerance` below the target (Opacus' rule for its own search)."""
    lo, hi = 0.0, 1.0
    while eps_of(hi) > target:
        lo, hi = hi, 2 * hi
        if hi > z_max:
            raise ValueError(f"no noise multiplier up to {z_max:g} reaches epsilon {target}")
    while True:
        mid = (lo + hi) / 2
        eps = eps_of(mid)
        if eps <= target:
            hi = mid
            if target - eps <= tolerance:
                return hi
        else:
            lo = mid
        if hi - lo < 1e-9:
            return hi


def _resolve_noise(p, sampling: Sampling, rounds: int) -> float:
    """0 without DP, the configured z, or (a target epsilon alone) the smallest z whose epsilon
    after all `rounds` stays within `target_epsilon` (Opacus' search for Poisson sampling, a
    bisection for fixed cohorts)."""
    from fedmeta.sim.config import DEFAULT_NOISE_MULTIPLIER

    if p.mode == "off":
        return 0.0
    if p.noise_multiplier is not None:  # with a target too, the target is only where training stops
        return p.noise_multiplier
    if p.target_epsilon is None:
        return DEFAULT_NOISE_MULTIPLIER
    try:
        return noise_for(p.target_epsilon, sampling.rate, rounds, p.delta, p.accountant, sampling=sampling)
    except ValueError as e:
        raise ValueError(
            f"privacy.target_epsilon: {p.target_epsilon} is out of reach in {rounds} rounds "
            f"at sample rate {sampling.rate:.4g} ({sampling.kind} sampling; {e})"
        ) from None
