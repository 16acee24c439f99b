"""Accountants: how the privacy loss of many rounds composes into one (epsilon, delta).

``Sampling`` says how a round's cohort is drawn, which picks the accountant and the adjacency the
guarantee is stated for (``make_accountant``): Poisson cohorts are composed by Opacus' RDP
(Mironov 2017; Mironov, Talwar & Zhang 2019) or PRV (Gopi, Lee & Wutschitz 2021) accountant
(``PrivacyAccountant``), fixed-size cohorts drawn without replacement by dp-accounting's RDP under
replace-one adjacency (Wang, Balle & Kasiviswanathan 2019; ``FixedCohortAccountant``), and
``epsilon_for`` is either after T identical rounds. ``LocalDPLedger`` keeps each client's local
DP-SGD steps, and ``KnownParticipation`` what an aggregator that knows every cohort learns of each
user, composed without amplification as Gaussian DP (Dong, Roth & Su 2019). No RDP or PRV math is
re-implemented here, and the accounting libraries are imported on first use.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from fedmeta.actors.privacy.checks import (
    AccountantName,
    _check_accountant,
    _check_delta,
    _check_sample_rate,
    _positive,
)


def _opacus_accountant(name: str):
    # Opacus is imported on first use: it costs ~120 MB of RSS, and the worker processes, which
    # import this module for clipping, never account.
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"rdp": RDPAccountant, "prv": PRVAccountant}[name]()


# ---------------------------------------------------------------- how cohorts are drawn
@dataclass(frozen=True)
class Sampling:
    """How a round's cohort is drawn, which decides the accounting and the adjacency the guarantee
    is stated for. Poisson: each of `population` users joins independently with rate
    cohort / population (a variable cohort, `cohort` in expectation); neighbouring federations
    differ by adding or removing one user. Fixed: exactly `cohort` users drawn without
    replacement; the bound is for replacing one user (adding one would change the population)."""

    kind: Literal["poisson", "fixed"] = "poisson"
    population: int = 1
    cohort: int = 1

    def __post_init__(self):
        if self.kind not in ("poisson", "fixed"):
            raise ValueError(f"sampling: expected poisson or fixed, got {self.kind!r}")
        if not 1 <= self.cohort <= self.population:
            raise ValueError(f"cohort: must be in [1, population = {self.population}], got {self.cohort}")

    @property
    def rate(self) -> float:
        return self.cohort / self.population

    @property
    def adjacency(self) -> str:
        return "add/remove one user" if self.kind == "poisson" else "replace one user"


# ---------------------------------------------------------------- accounting (Opacus)
class PrivacyAccountant:
    """Composes rounds of the subsampled Gaussian mechanism with an Opacus accountant.

    One ``step`` is one round: users sampled at rate q, noise multiplier z on the sum. Opacus keeps
    its whole state in ``history``, a list of ``(noise_multiplier, sample_rate, num_steps)`` runs
    (consecutive identical steps are merged), which ``state_dict`` exposes as plain lists so a
    checkpoint (or JSON) can carry it.
    """

    def __init__(self, accountant: AccountantName = "rdp"):
        _check_accountant(accountant)
        self.accountant = accountant
        self._opacus = _opacus_accountant(accountant)
        self.releases = 0  # unsampled Gaussian releases in the history (`release`)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        _positive("noise_multiplier", noise_multiplier)
        _check_sample_rate(sample_rate)
        self._opacus.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))

    def release(self, noise_multiplier: float) -> None:
        """One Gaussian release over every user, not subsampled (e.g. a private metric of a fixed
        panel): noise std / L2 sensitivity = `noise_multiplier`. Opacus composes it with the rounds
        (a step at sample rate 1); `steps` still counts rounds only."""
        self.step(noise_multiplier, 1.0)
        self.releases += 1

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._opacus.history) - self.releases

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first round)."""
        _check_delta(delta)
        if not self._opacus.history:
            return 0.0
        with np.errstate(divide="ignore"):  # PRV at sample rate 1 (a `release`) takes log(1 - q) = -inf
            return float(self._opacus.get_epsilon(delta=delta))

    def state_dict(self) -> dict:
        history = [[float(z), float(q), int(n)] for z, q, n in self._opacus.history]
        return {"accountant": self.accountant, "history": history, "releases": self.releases}

    def load_state_dict(self, state: dict) -> None:
        if state.get("accountant") != self.accountant:
            raise ValueError(
                f"accountant: state is for {state.get('accountant')!r}, this is {self.accountant!r}"
            )
        # Opacus compares the last run with == and rebuilds tuples, so restore tuples of the same types.
        self._opacus.history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]
        self.releases = int(state.get("releases", 0))

    @classmethod
    def from_state_dict(cls, state: dict) -> PrivacyAccountant:
        acc = cls(state["accountant"])
        acc.load_state_dict(state)
        return acc


@functools.lru_cache(maxsize=512)
def _without_replacement_step_rdp(population: int, cohort: int, noise_multiplier: float) -> tuple:
    """RDP (over dp-accounting's default orders) of one round: a fixed-size cohort drawn without
    replacement, Gaussian noise z*C on a sum whose replace-one sensitivity is 2C, i.e. noise
    multiplier z/2 (Wang, Balle & Kasiviswanathan 2019, as implemented in `dp-accounting`)."""
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(
        dpa.SampledWithoutReplacementDpEvent(population, cohort, dpa.GaussianDpEvent(noise_multiplier / 2))
    )
    return tuple(acc._orders), tuple(acc._rdp)  # one step's RDP: composing T steps multiplies it by T


@functools.lru_cache(maxsize=512)
def _gaussian_rdp(noise_multiplier: float) -> tuple:
    """RDP of one Gaussian mechanism (no subsampling) over the same orders as the rounds."""
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.GaussianDpEvent(noise_multiplier))
    return tuple(acc._orders), tuple(acc._rdp)


class FixedCohortAccountant:
    """Composes rounds of fixed-size cohorts (sampling without replacement) under replace-one
    adjacency: RDP adds up over rounds, then converts to (epsilon, delta). The same interface and
    checkpointable `history` of (z, q, steps) runs as `PrivacyAccountant`."""

    accountant = "rdp"

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.history: list[list] = []
        self.releases: list[list] = []  # [z, count]: Gaussian releases over every user (`release`)

    def step(self, noise_multiplier: float, sample_rate: float | None = None) -> None:
        _positive("noise_multiplier", noise_multiplier)
        z, q = float(noise_multiplier), self.sampling.rate
        if self.history and self.history[-1][:2] == [z, q]:
            self.history[-1][2] += 1
        else:
            self.history.append([z, q, 1])

    def release(self, noise_multiplier: float) -> None:
        """One Gaussian release over every user, not subsampled: noise std / L2 sensitivity =
        `noise_multiplier` (the caller states the sensitivity under replace-one)."""
        _positive("noise_multiplier", noise_multiplier)
        z = float(noise_multiplier)
        if self.releases and self.releases[-1][0] == z:
            self.releases[-1][1] += 1
        else:
            self.releases.append([z, 1])

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        from dp_accounting.rdp import compute_epsilon

        _check_delta(delta)
        if not self.history and not self.releases:
            return 0.0
        total, orders = 0.0, None
        for z, _, n in self.history:
            orders, rdp = _without_replacement_step_rdp(self.sampling.population, self.sampling.cohort, z)
            total = total + n * np.asarray(rdp)
        for z, n in self.releases:
            orders, rdp = _gaussian_rdp(z)
            total = total + n * np.asarray(rdp)
        return float(compute_epsilon(orders, total, delta)[0])

    def state_dict(self) -> dict:
        s = self.sampling
        return {
            "accountant": "rdp",
            "history": [list(h) for h in self.history],
            "releases": [list(r) for r in self.releases],
            "sampling": {"kind": s.kind, "population": s.population, "cohort": s.cohort},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampling") != self.state_dict()["sampling"]:
            raise ValueError(
                f"sampling: state is for {state.get('sampling')}, this accountant is for "
                f"{self.state_dict()['sampling']}"
            )
        self.history = [[float(z), float(q), int(n)] for z, q, n in state["history"]]
        self.releases = [[float(z), int(n)] for z, n in state.get("releases", [])]


def make_accountant(accountant: AccountantName, sampling: Sampling | None = None):
    """The accountant for how cohorts are drawn: Opacus' (RDP or PRV) for Poisson sampling,
    dp-accounting's without-replacement RDP for fixed-size cohorts."""
    if sampling is None or sampling.kind == "poisson":
        return PrivacyAccountant(accountant)
    if accountant != "rdp":
        raise ValueError(
            f"privacy.accountant: {accountant!r} accounts Poisson sampling only; fixed-size cohorts "
            "(federation.sampling: fixed) are accounted with 'rdp'"
        )
    return FixedCohortAccountant(sampling)


def epsilon_for(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = "rdp",
    sampling: Sampling | None = None,
) -> float:
    """Epsilon after ``steps`` rounds at fixed (z, q): identical to stepping an accountant T times.
    With a fixed-size `sampling`, its population and cohort define the rounds (q is theirs)."""
    _positive("noise_multiplier", noise_multiplier)
    _check_sample_rate(sample_rate)
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    if sampling is not None and sampling.kind == "fixed":
        acc = make_accountant(accountant, sampling)
        acc.history = [[float(noise_multiplier), sampling.rate, int(steps)]]
        return acc.epsilon(delta)
    # One merged history run is exactly what T identical Opacus steps leave behind.
    acc = PrivacyAccountant(accountant)
    acc.load_state_dict({"accountant": accountant, "history": [[noise_multiplier, sample_rate, steps]]})
    return acc.epsilon(delta)


class LocalDPLedger:
    """Each client's own budget for sample-level DP-SGD (privacy.local_dp): every noisy gradient a
    client releases is one sampled Gaussian mechanism at rate batch / n_train on its data (FedAvg
    and Reptile release one per local step, FO-MAML two), so a client's epsilon depends on its
    total releases and its rate. `epsilon` is the worst client's, a bound that holds for every
    individual in the federation. Plain counts (kept as `steps`: releases), checkpointable."""

    def __init__(self, noise_multiplier: float, accountant: AccountantName = "rdp"):
        _positive("noise_multiplier", noise_multiplier)
        self.noise_multiplier = noise_multiplier
        self.accountant = accountant
        self.steps: dict[int, int] = {}
        self.rates: dict[int, float] = {}

    def record(self, cid: int, releases: int, sample_rate: float) -> None:
        _check_sample_rate(sample_rate)
        self.steps[cid] = self.steps.get(cid, 0) + int(releases)
        self.rates[cid] = sample_rate

    def epsilon(self, delta: float) -> float:
        """The largest epsilon of any client so far (0 before any local step)."""
        worst: dict[float, int] = {}  # per sampling rate, the most steps any client took
        for cid, steps in self.steps.items():
            q = self.rates[cid]
            worst[q] = max(worst.get(q, 0), steps)
        return max(
            (
                epsilon_for(self.noise_multiplier, q, t, delta, self.accountant)
                for q, t in worst.items()
                if t > 0
            ),
            default=0.0,
        )

    def state_dict(self) -> dict:
        return {"steps": dict(self.steps), "rates": dict(self.rates)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = {int(k): int(v) for k, v in state["steps"].items()}
        self.rates = {int(k): float(v) for k, v in state["rates"].items()}


class KnownParticipation:
    """Privacy against a party that knows who took part in every round: the aggregator of
    distributed DP, which builds the cohort's secure sum and so learns its members. For it
    amplification by subsampling never applies; a user is exposed only in the rounds they were in,
    each a Gaussian mechanism on the sum (noise z_r, sensitivity Delta: C under add/remove, 2C under
    replace-one). Gaussian mechanisms compose exactly into one with mu^2 = sum_r (Delta / z_r C)^2
    (Dong, Roth & Su 2019, "Gaussian Differential Privacy"), so one number per user holds that user's
    whole exposure, and the run's accountant turns it into epsilon at delta as one release at q = 1.
    Metric releases over the panel (their noise shares come from the panel's clients) are composed
    for every user, a bound for the panel's members and more than the others spend."""

    def __init__(self, population: int, replace_one: bool = False):
        self.mu2 = np.zeros(population, dtype=np.float64)
        self.rounds = np.zeros(population, dtype=np.int32)
        self.sensitivity = 2.0 if replace_one else 1.0
        self.releases_mu2 = 0.0  # metric releases, composed for everyone

    def record_round(self, participants: Sequence[int], noise_multiplier: float) -> None:
        ids = np.asarray(participants, dtype=np.int64)
        if len(ids):
            self.mu2[ids] += (self.sensitivity / noise_multiplier) ** 2
            self.rounds[ids] += 1

    def record_release(self, noise_multiplier: float) -> None:
        """A Gaussian release over every user (noise std / sensitivity = `noise_multiplier`)."""
        self.releases_mu2 += 1.0 / noise_multiplier**2

    def epsilon(self, mu2: float, delta: float, accountant: AccountantName) -> float:
        if mu2 <= 0:
            return 0.0
        return epsilon_for(1.0 / math.sqrt(mu2), 1.0, 1, delta, accountant)

    def facts(self, delta: float, accountant: AccountantName) -> dict:
        """The worst-off and the median user of the population (epsilon, rounds taken part in)."""
        worst = float(self.mu2.max()) if len(self.mu2) else 0.0
        med = float(np.median(self.mu2)) if len(self.mu2) else 0.0
        return {
            "epsilon": self.epsilon(worst + self.releases_mu2, delta, accountant),
            "epsilon_median": self.epsilon(med + self.releases_mu2, delta, accountant),
            "rounds_max": int(self.rounds.max()) if len(self.rounds) else 0,
            "rounds_median": float(np.median(self.rounds)) if len(self.rounds) else 0.0,
            "amplified": False,
        }

    def state_dict(self) -> dict:
        return {"mu2": self.mu2.copy(), "rounds": self.rounds.copy(), "releases_mu2": self.releases_mu2}

    def load_state_dict(self, state: dict) -> None:
        mu2, rounds = np.asarray(state["mu2"], dtype=np.float64), np.asarray(state["rounds"], dtype=np.int32)
        if mu2.shape != self.mu2.shape or rounds.shape != self.rounds.shape:
            raise ValueError(
                f"participation: the checkpoint's population is {len(mu2)}, the run's {len(self.mu2)}"
            )
        self.mu2, self.rounds, self.releases_mu2 = mu2, rounds, float(state.get("releases_mu2", 0.0))
