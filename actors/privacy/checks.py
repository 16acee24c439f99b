"""Argument checks shared by the privacy modules, and the accountants a run may name.

Every mechanism, accountant and calibration refuses a non-finite or out-of-range noise multiplier,
sample rate, delta or accountant name with a ValueError that names it, before Opacus or
dp-accounting sees the value; ``AccountantName`` / ``ACCOUNTANTS`` are Opacus' RDP and PRV
accountants, the two a privacy config may choose.
"""

from __future__ import annotations

import math
from typing import Literal

AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS = ("rdp", "prv")


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be a finite number > 0, got {value}")


def _check_sample_rate(q: float) -> None:
    if not 0 < q <= 1:
        raise ValueError(f"sample_rate: must be in (0, 1], got {q}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta: must be in (0, 1), got {delta}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant: expected one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
