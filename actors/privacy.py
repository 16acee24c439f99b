"""User-level differential privacy for federated rounds: clip, noise, account, audit.

The stage has a client half and a server half, each a pure function returning ``(result, metrics)``:

* client: ``clip_update`` / ``clip_updates`` bound each user's contribution to L2 norm C, and in the
  distributed mode ``distributed_noise_share`` adds the client's share of integer noise before its
  quantized update is masked;
* server: ``central_noise`` adds N(0, (z C)^2) per coordinate to the unmasked sum (central mode).

This is DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent
Language Models"): with per-user clipping to C the sum of updates has sensitivity C to adding or
removing one user, so Gaussian noise of std z*C on the sum, with users Poisson-sampled at rate q,
is the subsampled Gaussian mechanism that the accountants below compose over rounds.

The distributed noise is Skellam (Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for
Differentially Private Federated Learning"): integer noise fits the integer vectors secure
aggregation sums modulo 2^b, and a sum of independent Skellams is again Skellam, so the noise in the
unmasked sum has an exactly known distribution whatever the number of contributors.

Accounting never re-implements RDP or PRV math: it wraps Opacus' accountants (RDP: Mironov 2017,
Mironov, Talwar & Zhang 2019; PRV: Gopi, Lee & Wutschitz 2021) and Opacus' noise search.

The empirical audit is the loss-threshold membership-inference attack of Yeom, Giacomelli,
Fredrikson & Jha 2018 ("Privacy Risk in Machine Learning: Analyzing the Connection to
Overfitting"). The privacy term of the local objective that this audit motivates lives with the
algorithms (``sim/algorithms/penalty.py``).

No global RNG is used: randomness comes only from the generator passed in (see ``fedmeta.sim.seeding``).
"""
from __future__ import annotations

import copy
import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from fedmeta.sim.seeding import gaussian_noise, noise_sampler

AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS = ("rdp", "prv")


def _opacus_accountant(name: str):
    # Opacus is imported on first use: it costs ~120 MB of RSS, and the worker processes, which
    # import this module for clipping, never account.
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"rdp": RDPAccountant, "prv": PRVAccountant}[name]()


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


# ---------------------------------------------------------------- client half: clipping
def _clip_scale(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    # Scale only vectors that are outside the ball: those inside stay bit-for-bit unchanged
    # (Opacus' C / (norm + 1e-6) would shrink every vector slightly).
    safe = torch.where(norms > clip_norm, norms, torch.ones_like(norms))
    return torch.where(norms > clip_norm, clip_norm / safe, torch.ones_like(norms))


def clip_update(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, dict]:
    """One client's update scaled onto the L2 ball of radius ``clip_norm`` (direction kept).

    ``||result|| <= clip_norm`` up to floating-point rounding of the scaling.
    """
    _positive("clip_norm", clip_norm)
    norm = torch.linalg.vector_norm(update)
    clipped = update * _clip_scale(norm, clip_norm).to(update.dtype)
    return clipped, {"norm": float(norm), "clipped": bool(norm > clip_norm)}


def clip_updates(updates: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, dict]:
    """Row-wise ``clip_update`` of a (clients, n) batch in one pass.

    Metrics: ``norms`` (each client's norm before clipping, a list of floats) and
    ``clipped_fraction`` (share of clients that were scaled down), which is what one tunes C by.
    """
    _positive("clip_norm", clip_norm)
    if updates.dim() != 2:
        raise ValueError(f"updates: expected shape (clients, n), got {tuple(updates.shape)}")
    norms = torch.linalg.vector_norm(updates, dim=1)
    clipped = updates * _clip_scale(norms, clip_norm).to(updates.dtype).unsqueeze(1)
    fraction = float((norms > clip_norm).float().mean()) if len(norms) else 0.0
    return clipped, {"norms": norms.tolist(), "clipped_fraction": fraction}


# ---------------------------------------------------------------- server half: central noise
def central_noise(sum_vec: torch.Tensor, clip_norm: float, noise_multiplier: float,
                  gen) -> tuple[torch.Tensor, dict]:
    """``sum_vec`` plus i.i.d. N(0, (z C)^2) per coordinate, drawn from ``gen`` (a
    `fedmeta.sim.seeding.Secrets.noise` source: the attack-safe `SecureGaussian` unless secrets are seeded).

    The sum of C-clipped updates has L2 sensitivity C to one user, so std z*C makes this the
    Gaussian mechanism with noise multiplier z (the quantity the accountant is stepped with).
    """
    _positive("clip_norm", clip_norm)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier: must be a finite number >= 0, got {noise_multiplier}")
    std = noise_multiplier * clip_norm
    noise = gaussian_noise(sum_vec.shape, gen, dtype=sum_vec.dtype, device=sum_vec.device) * std
    return sum_vec + noise, {"noise_std": std, "noise_norm": float(torch.linalg.vector_norm(noise))}


# ---------------------------------------------------------------- client half: distributed noise
def skellam_mu(clip_norm: float, noise_multiplier: float, expected_clients: int, step: float) -> float:
    """Per-client Poisson rate mu: each share is Poisson(mu) - Poisson(mu), variance 2 mu.

    Chosen so the shares of ``expected_clients`` clients sum to variance (z C / step)^2, i.e. the
    central noise z C expressed in quantization steps.
    """
    _positive("clip_norm", clip_norm)
    _positive("noise_multiplier", noise_multiplier)
    _positive("step", step)
    if expected_clients < 1:
        raise ValueError(f"expected_clients: must be >= 1, got {expected_clients}")
    return (noise_multiplier * clip_norm / step) ** 2 / (2 * expected_clients)


def distributed_noise_share(n: int, clip_norm: float, noise_multiplier: float, expected_clients: int,
                            step: float, rng: np.random.Generator) -> np.ndarray:
    """One client's integer noise share (int64, in units of the quantization ``step``), length n.

    Each client adds Skellam(mu, mu) noise to its quantized update before masking, so the
    aggregator only ever unmasks an already-noised sum (Agarwal, Kairouz & Liu 2021). Sums of
    independent Skellams are Skellam, so with all ``expected_clients`` clients surviving the sum
    carries Skellam noise of variance exactly (z C / step)^2.

    Accounting: only survivors' shares reach the sum, so a round with dropouts adds less noise than
    planned; step the accountant with ``effective_noise_multiplier(z, expected_clients, survivors)``,
    never with the nominal z. The accountant treats the Skellam noise as the Gaussian of the same
    variance; Agarwal et al. show the Skellam RDP equals the Gaussian term plus a correction that
    vanishes as the variance in step units grows, so keep (z C / step)^2 large (fine quantization).
    """
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    mu = skellam_mu(clip_norm, noise_multiplier, expected_clients, step)
    return (rng.poisson(mu, n) - rng.poisson(mu, n)).astype(np.int64)


def effective_noise_multiplier(noise_multiplier: float, expected_clients: int, survivors: int) -> float:
    """The z actually achieved when only ``survivors`` of ``expected_clients`` shares were added.

    Noise variance scales with the number of shares: survivors/expected of (z C)^2, hence
    z * sqrt(survivors / expected). A round with no survivors releases nothing and must be aborted
    rather than accounted.
    """
    _positive("noise_multiplier", noise_multiplier)
    if expected_clients < 1:
        raise ValueError(f"expected_clients: must be >= 1, got {expected_clients}")
    if survivors < 1:
        raise ValueError(f"survivors: must be >= 1 (abort the round instead), got {survivors}")
    return noise_multiplier * math.sqrt(survivors / expected_clients)


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
        self.releases = 0     # unsampled Gaussian releases in the history (`release`)

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
        with np.errstate(divide="ignore"):     # PRV at sample rate 1 (a `release`) takes log(1 - q) = -inf
            return float(self._opacus.get_epsilon(delta=delta))

    def state_dict(self) -> dict:
        history = [[float(z), float(q), int(n)] for z, q, n in self._opacus.history]
        return {"accountant": self.accountant, "history": history, "releases": self.releases}

    def load_state_dict(self, state: dict) -> None:
        if state.get("accountant") != self.accountant:
            raise ValueError(f"accountant: state is for {state.get('accountant')!r}, this is {self.accountant!r}")
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
    acc.compose(dpa.SampledWithoutReplacementDpEvent(population, cohort, dpa.GaussianDpEvent(noise_multiplier / 2)))
    return tuple(acc._orders), tuple(acc._rdp)   # one step's RDP: composing T steps multiplies it by T


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
        self.releases: list[list] = []     # [z, count]: Gaussian releases over every user (`release`)

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
        return {"accountant": "rdp", "history": [list(h) for h in self.history],
                "releases": [list(r) for r in self.releases],
                "sampling": {"kind": s.kind, "population": s.population, "cohort": s.cohort}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampling") != self.state_dict()["sampling"]:
            raise ValueError(f"sampling: state is for {state.get('sampling')}, this accountant is for "
                             f"{self.state_dict()['sampling']}")
        self.history = [[float(z), float(q), int(n)] for z, q, n in state["history"]]
        self.releases = [[float(z), int(n)] for z, n in state.get("releases", [])]


def make_accountant(accountant: AccountantName, sampling: Sampling | None = None):
    """The accountant for how cohorts are drawn: Opacus' (RDP or PRV) for Poisson sampling,
    dp-accounting's without-replacement RDP for fixed-size cohorts."""
    if sampling is None or sampling.kind == "poisson":
        return PrivacyAccountant(accountant)
    if accountant != "rdp":
        raise ValueError(f"privacy.accountant: {accountant!r} accounts Poisson sampling only; fixed-size cohorts "
                         "(federation.sampling: fixed) are accounted with 'rdp'")
    return FixedCohortAccountant(sampling)


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: AccountantName = "rdp", sampling: Sampling | None = None) -> float:
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
        worst: dict[float, int] = {}   # per sampling rate, the most steps any client took
        for cid, steps in self.steps.items():
            q = self.rates[cid]
            worst[q] = max(worst.get(q, 0), steps)
        return max((epsilon_for(self.noise_multiplier, q, t, delta, self.accountant)
                    for q, t in worst.items() if t > 0), default=0.0)

    def state_dict(self) -> dict:
        return {"steps": dict(self.steps), "rates": dict(self.rates)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = {int(k): int(v) for k, v in state["steps"].items()}
        self.rates = {int(k): float(v) for k, v in state["rates"].items()}


def noise_for(target_epsilon: float, sample_rate: float, steps: int, delta: float,
              accountant: AccountantName = "rdp", epsilon_tolerance: float = 0.01,
              sampling: Sampling | None = None) -> float:
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
        return _bisect_noise(lambda z: epsilon_for(z, sampling.rate, steps, delta, accountant, sampling),
                             target_epsilon, epsilon_tolerance)
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The bisection probes very large sigmas whose tiny epsilon is best at the largest RDP order;
        # Opacus warns about that bound at each probe, which says nothing about the answer.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=epsilon_tolerance))


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


def budget_spent(accountant: PrivacyAccountant, target_epsilon: float, delta: float,
                 next_round: tuple[float, float] | None = None) -> bool:
    """True once the spent epsilon exceeds ``target_epsilon``.

    With ``next_round=(z, q)`` it asks whether running one more such round would exceed it, so a
    training loop can stop *before* overshooting rather than after.
    """
    _positive("target_epsilon", target_epsilon)
    if next_round is not None:
        accountant = copy.deepcopy(accountant)
        accountant.step(*next_round)
    return accountant.epsilon(delta) > target_epsilon


class PrivacyBudget:
    """What a search over hyperparameters spends on the same users (Ray Tune trials). Every trial
    round is a subsampled Gaussian release of the model and every tuning-metric report a Gaussian
    release over the evaluation panel; both compose with what the run had spent before tuning
    (`base`: an accountant's `state_dict`, e.g. from the checkpoint tuning starts from).

    A trial `reserve`s a round before running it, at the worst noise the round can end with (the
    distributed mode's z at the secure-aggregation threshold), and `settle`s it with the noise it
    achieved. A reservation that would take the total past `target_epsilon` is refused, so
    concurrent trials can never overshoot the target together: what is reserved is an upper bound
    of what was released (a failed round keeps its reservation).

    `ledger`: a file this budget's entries are written to at every change; `prior`: the entries of
    earlier sittings of the same search (a resumed search: its earlier trials' rounds stay spent,
    and a reservation that was never settled counts at its reserved noise)."""

    def __init__(self, dp: UserLevelDP, base: dict | None = None, target_epsilon: float | None = None,
                 ledger: str | Path | None = None, prior: Sequence[Sequence[float]] = ()):
        self.dp, self.base, self.target = dp, base, target_epsilon
        self.entries: dict[int, tuple[float, float]] = {}   # id -> (round z or 0: none, release z)
        self.prior = [(float(a), float(b)) for a, b in prior]
        self._next = 0
        self.ledger = Path(ledger) if ledger is not None else None

    def _save(self) -> None:
        if self.ledger is None:
            return
        from fedmeta.sim.artifacts.durable import write_atomic     # whole or not at all: a crash keeps the last one

        write_atomic(self.ledger, json.dumps({"entries": [list(e) for e in self.entries.values()]}))

    def _accountant(self, with_base: bool):
        acc = make_accountant(self.dp.accountant, self.dp.sampling)
        if with_base and self.base:
            acc.load_state_dict(self.base)
        # composition does not depend on the order: like steps in a row, so the history stays short
        spent = [*self.prior, *self.entries.values()]
        for round_z in sorted(z for z, _ in spent if z > 0):
            acc.step(round_z, self.dp.sample_rate)
        for release_z in sorted(z for _, z in spent if z > 0):
            acc.release(release_z)
        return acc

    def reserve(self, round_z: float, release_z: float) -> int | None:
        """An id for one more round (noise `round_z`; 0: it releases no model) and metric release
        (`release_z`; 0: it reports nothing), or None when it would exceed the target."""
        rid, self._next = self._next, self._next + 1
        self.entries[rid] = (float(round_z), float(release_z))
        if self.target is not None and self._accountant(True).epsilon(self.dp.delta) > self.target:
            del self.entries[rid]
            return None
        self._save()
        return rid

    def settle(self, rid: int, round_z: float, release_z: float) -> None:
        """What reservation `rid` released: `round_z` 0 for a round that released no model,
        `release_z` 0 for one that reported nothing."""
        if rid not in self.entries:
            raise KeyError(f"reservation {rid}: unknown")
        self.entries[rid] = (float(round_z), float(release_z))
        self._save()

    def epsilon(self) -> dict:
        """Epsilon of the tuning alone and of the run with it, and the accountant state of the
        latter (what the run continues from)."""
        total = self._accountant(True)
        return {"epsilon_tuning": self._accountant(False).epsilon(self.dp.delta),
                "epsilon_total": total.epsilon(self.dp.delta),
                "reserved_rounds": len(self.prior) + len(self.entries),
                "accountant_state": total.state_dict()}


# ---------------------------------------------------------------- empirical audit
def mia_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of the loss-threshold membership-inference attack (Yeom et al. 2018).

    The attacker scores each example by -loss (members are fit better, so lower loss means "member");
    the AUC over all thresholds is 0.5 with no leakage and 1.0 when losses separate members perfectly.
    """
    from sklearn.metrics import roc_auc_score  # sklearn is only needed by the audit

    members = np.asarray(member_losses, dtype=np.float64).ravel()
    others = np.asarray(nonmember_losses, dtype=np.float64).ravel()
    if len(members) == 0 or len(others) == 0:
        raise ValueError("mia_auc: needs at least one member and one non-member loss")
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(others))])
    return float(roc_auc_score(labels, -np.concatenate([members, others])))


def individual_mia_auc(member_losses: Sequence, nonmember_losses: Sequence) -> np.ndarray:
    """Each individual's own loss-threshold AUC: its train examples (members) against its test
    examples (non-members), both under its own model; nan where either set is empty. Unlike the
    pooled audit, an individual's easy or hard data does not blur it."""
    return np.array([mia_auc(m, o) if len(m) and len(o) else np.nan
                     for m, o in zip(member_losses, nonmember_losses)], dtype=np.float64)


# ---------------------------------------------------------------- the run's DP, as one object
@dataclass(frozen=True)
class UserLevelDP:
    """User-level DP of a run (DP-FedAvg), resolved once from the privacy config: the only place
    that knows the privacy mode. Workers call the client half, the aggregator the server half,
    the experiment's accounting steps with `round_noise`; the summary and the model card report
    `RunAccounting.facts`. Immutable and small, so it travels to the actors as it is.

    `bound_updates` is also on without DP under secure aggregation, whose fixed-point encoding
    needs every update inside the C-ball (and equal weights, as a sample-count weight would
    change the sensitivity the noise is calibrated to)."""

    mode: Literal["off", "central", "distributed"] = "off"
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0     # z, resolved from the config or from target_epsilon
    expected_clients: int = 1         # the planned cohort: DP-FedAvg's fixed denominator
    sampling: Sampling = Sampling()   # how cohorts are drawn: what the accountant composes
    delta: float = 1e-5
    accountant: AccountantName = "rdp"
    target_epsilon: float | None = None
    bound_updates: bool = False
    metric_noise_multiplier: float | None = None   # panel metric releases (None: z)

    @classmethod
    def from_config(cls, p, sampling: Sampling, rounds: int, secure: bool = False,
                    reporting: int | None = None) -> UserLevelDP:
        """`p` is a `fedmeta.sim.config.PrivacyConfig`; `reporting`: the clients expected to report when
        more are sampled (over-selection; default: the cohort). Raises ValueError naming the key
        when a target epsilon cannot be met in `rounds` rounds, or the accountant cannot account
        the sampling."""
        if p.mode != "off":
            make_accountant(p.accountant, sampling)      # refuses PRV for fixed-size cohorts
        expected = min(reporting or sampling.cohort, sampling.cohort)
        return cls(p.mode, p.clip_norm, _resolve_noise(p, sampling, rounds), expected, sampling,
                   p.delta, p.accountant, p.target_epsilon, bound_updates=p.mode != "off" or secure,
                   metric_noise_multiplier=p.metric_noise_multiplier)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def sample_rate(self) -> float:
        return self.sampling.rate

    @property
    def metric_noise(self) -> float:
        """Noise std of a panel metric release over its sensitivity 1 (`privacy.metric_noise_multiplier`,
        else z): a panel mean's noise is this over the panel's size, so a larger panel buys the same
        precision with more noise and less epsilon."""
        return self.noise_multiplier if self.metric_noise_multiplier is None else self.metric_noise_multiplier

    # ------------------------------------------------------------ client half
    def client_half(self, updates: torch.Tensor, natural_weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """(updates, weights) a worker sums: clipped to C with equal weights when bounded,
        otherwise as the algorithm weighs them."""
        if not self.bound_updates:
            return updates, torch.tensor(natural_weights, device=updates.device)
        clipped, _ = clip_updates(updates, self.clip_norm)
        return clipped, torch.ones(len(updates), device=updates.device)

    @property
    def share_noise_multiplier(self) -> float:
        """z carried by the clients' Skellam shares (distributed mode), 0 otherwise."""
        return self.noise_multiplier if self.mode == "distributed" else 0.0

    def noise_share(self, n: int, step: float, rng: np.random.Generator) -> np.ndarray | None:
        """A client's integer noise share in quantization steps (distributed mode), else None."""
        if self.share_noise_multiplier <= 0:
            return None
        return distributed_noise_share(n, self.clip_norm, self.noise_multiplier, self.expected_clients, step, rng)

    def metric_share(self, n: int, step: float, noise: float | None, panel: int,
                     rng: np.random.Generator) -> np.ndarray | None:
        """A panel member's integer noise share of a metric release (distributed mode), else None:
        the shares of the `panel` carry the release's Gaussian of std `noise` (default `metric_noise`) on each
        sum of values in [0, 1], so the aggregator never sees a metric without its noise."""
        if self.mode != "distributed":
            return None
        z = self.metric_noise if noise is None else noise
        return distributed_noise_share(n, 1.0, z, max(panel, 1), step, rng) if z > 0 else None

    # ------------------------------------------------------------ server half
    @property
    def noise_without_clients(self) -> bool:
        """Central DP releases its noise even when nobody was sampled (a Poisson cohort can be
        empty): skipping the round would reveal that no one took part."""
        return self.mode == "central"

    def server_half(self, total: torch.Tensor, weight: float, gen) -> tuple[torch.Tensor, dict]:
        """The mean update from the sum: central noise z*C added (central mode), divided by the
        planned cohort size under DP (not the data-dependent weight that reported)."""
        metrics: dict = {}
        if self.mode == "central":
            total, metrics = central_noise(total, self.clip_norm, self.noise_multiplier, gen)
        return total / (self.expected_clients if self.enabled else weight), metrics

    def noisy_sum(self, total: torch.Tensor, gen, noise: float | None = None) -> torch.Tensor:
        """A released sum of values in [0, 1] (e.g. accuracies): Gaussian noise of std
        `metric_noise` (or `noise`) under DP."""
        z = self.metric_noise if noise is None else noise
        return total + z * gaussian_noise((), gen, dtype=total.dtype) if self.enabled else total

    @property
    def metric_release_noise(self) -> float:
        """The noise multiplier of one tuning-metric release: two `noisy_sum`s (global and
        personalized accuracy) to which an individual adds at most 1 each, i.e. L2 sensitivity
        sqrt(2) under adding, removing or replacing one individual."""
        return self.metric_noise / math.sqrt(2)

    # ------------------------------------------------------------ accounting
    def round_noise(self, survivors: int | None) -> float:
        """The z a released round achieved: in the distributed mode only the survivors' shares
        reached the sum."""
        if self.mode == "distributed":
            return effective_noise_multiplier(self.noise_multiplier, self.expected_clients, survivors)
        return self.noise_multiplier


def _resolve_noise(p, sampling: Sampling, rounds: int) -> float:
    """0 without DP, the configured z, or (a target epsilon alone) the smallest z whose epsilon
    after all `rounds` stays within `target_epsilon` (Opacus' search for Poisson sampling, a
    bisection for fixed cohorts)."""
    from fedmeta.sim.config import DEFAULT_NOISE_MULTIPLIER

    if p.mode == "off":
        return 0.0
    if p.noise_multiplier is not None:      # with a target too, the target is only where training stops
        return p.noise_multiplier
    if p.target_epsilon is None:
        return DEFAULT_NOISE_MULTIPLIER
    try:
        return noise_for(p.target_epsilon, sampling.rate, rounds, p.delta, p.accountant, sampling=sampling)
    except ValueError as e:
        raise ValueError(f"privacy.target_epsilon: {p.target_epsilon} is out of reach in {rounds} rounds "
                         f"at sample rate {sampling.rate:.4g} ({sampling.kind} sampling; {e})") from None


@dataclass(frozen=True)
class SampleLevelDP:
    """Local DP-SGD inside clients (privacy.local_dp): what its accounting needs."""

    clip: float
    noise_multiplier: float
    batch_size: int                   # local batch: the per-step sampling rate is batch / n_train


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
        self.releases_mu2 = 0.0        # metric releases, composed for everyone

    def record_round(self, participants: Sequence[int], noise_multiplier: float) -> None:
        ids = np.asarray(participants, dtype=np.int64)
        if len(ids):
            self.mu2[ids] += (self.sensitivity / noise_multiplier) ** 2
            self.rounds[ids] += 1

    def record_release(self, noise_multiplier: float) -> None:
        """A Gaussian release over every user (noise std / sensitivity = `noise_multiplier`)."""
        self.releases_mu2 += 1.0 / noise_multiplier ** 2

    def epsilon(self, mu2: float, delta: float, accountant: AccountantName) -> float:
        if mu2 <= 0:
            return 0.0
        return epsilon_for(1.0 / math.sqrt(mu2), 1.0, 1, delta, accountant)

    def facts(self, delta: float, accountant: AccountantName) -> dict:
        """The worst-off and the median user of the population (epsilon, rounds taken part in)."""
        worst = float(self.mu2.max()) if len(self.mu2) else 0.0
        med = float(np.median(self.mu2)) if len(self.mu2) else 0.0
        return {"epsilon": self.epsilon(worst + self.releases_mu2, delta, accountant),
                "epsilon_median": self.epsilon(med + self.releases_mu2, delta, accountant),
                "rounds_max": int(self.rounds.max()) if len(self.rounds) else 0,
                "rounds_median": float(np.median(self.rounds)) if len(self.rounds) else 0.0,
                "amplified": False}

    def state_dict(self) -> dict:
        return {"mu2": self.mu2.copy(), "rounds": self.rounds.copy(), "releases_mu2": self.releases_mu2}

    def load_state_dict(self, state: dict) -> None:
        mu2, rounds = np.asarray(state["mu2"], dtype=np.float64), np.asarray(state["rounds"], dtype=np.int32)
        if mu2.shape != self.mu2.shape or rounds.shape != self.rounds.shape:
            raise ValueError(f"participation: the checkpoint's population is {len(mu2)}, the run's {len(self.mu2)}")
        self.mu2, self.rounds, self.releases_mu2 = mu2, rounds, float(state.get("releases_mu2", 0.0))


CENTRAL_TRUST = ("central DP: the aggregator adds the noise to the sum it computes, so it sees the cohort's exact "
                 "clipped updates and is trusted; distributed DP (privacy.mode: distributed) does not trust it")


class RunAccounting:
    """The privacy a run has spent: user-level rounds in an Opacus accountant, and each client's
    local DP-SGD steps in a ledger; under distributed DP also what the aggregator, who knows each
    round's participants, learns of each user (`KnownParticipation`). Stepped once per released
    round; checkpointable. `seeded`: the run's secrets (cohorts included) follow the seed
    (`run.seeded_secrets`), so amplification holds only against parties without the seed."""

    def __init__(self, dp: UserLevelDP, local: SampleLevelDP | None = None, seeded: bool = False):
        self.dp, self.local, self.seeded = dp, local, seeded
        self.accountant = make_accountant(dp.accountant, dp.sampling) if dp.enabled else None
        self.ledger = LocalDPLedger(local.noise_multiplier, dp.accountant) if local else None
        self.known = (KnownParticipation(dp.sampling.population, replace_one=dp.sampling.kind == "fixed")
                      if dp.mode == "distributed" else None)

    def budget_stop(self) -> str | None:
        """Why the next round must not run (it would overshoot target_epsilon), or None."""
        dp = self.dp
        if (self.accountant and dp.target_epsilon is not None
                and budget_spent(self.accountant, dp.target_epsilon, dp.delta,
                                 next_round=(dp.noise_multiplier, dp.sample_rate))):
            return f"privacy budget: one more round would exceed epsilon {dp.target_epsilon}"
        return None

    def record_round(self, metrics: dict, participants: Sequence[int] = ()) -> None:
        """Account a finished round from the aggregator's metrics and the clients whose updates
        went in (`participants`); a skipped round released nothing."""
        if metrics.get("skipped"):
            return
        if self.accountant:
            z = self.dp.round_noise(metrics.get("secagg_survivors"))
            self.accountant.step(z, self.dp.sample_rate)
            if self.known is not None:
                self.known.record_round(participants, z)
        if self.ledger:
            for cid, releases, n_train in metrics.get("local_dp_releases", []):
                self.ledger.record(cid, releases, min(1.0, self.local.batch_size / n_train))

    def release_stop(self, noise_multiplier: float) -> str | None:
        """Why one more Gaussian release over every user (noise std / sensitivity =
        `noise_multiplier`, e.g. a private panel metric) must not happen, or None."""
        dp = self.dp
        if self.accountant and dp.target_epsilon is not None:
            after = copy.deepcopy(self.accountant)
            after.release(noise_multiplier)
            if after.epsilon(dp.delta) > dp.target_epsilon:
                return f"privacy budget: one more metric release would exceed epsilon {dp.target_epsilon}"
        return None

    def record_release(self, noise_multiplier: float) -> None:
        """Account a Gaussian release over every user (composed with the rounds; under distributed
        DP its noise comes from the panel's shares, so it counts against the aggregator too)."""
        if self.accountant:
            self.accountant.release(noise_multiplier)
        if self.known is not None:
            self.known.record_release(noise_multiplier)

    def epsilon(self) -> float | None:
        return self.accountant.epsilon(self.dp.delta) if self.accountant else None

    def local_epsilon(self) -> float | None:
        return self.ledger.epsilon(self.dp.delta) if self.ledger else None

    def by_party(self) -> dict | None:
        """epsilon per party: `released_model` (an observer of the model and its card: amplified by
        the secret sampling) and `aggregator` (what it learns of each user, or why it is trusted)."""
        dp = self.dp
        if not dp.enabled:
            return None
        against = ("parties without the seed: run.seeded_secrets makes cohorts, keys and noise follow from it"
                   if self.seeded else "anyone without the run secret, from which the cohorts are drawn")
        released = {"epsilon": self.epsilon(), "amplified": True, "holds_against": against}
        if self.known is None:
            return {"released_model": released, "aggregator": {"trusted": True, "epsilon": None, "reason": CENTRAL_TRUST}}
        agg = self.known.facts(dp.delta, dp.accountant)
        agg["reason"] = ("distributed DP: the aggregator learns each round's participants, so each user's rounds "
                         "compose without amplification (worst-off and median user; metric releases count for all)")
        return {"released_model": released, "aggregator": agg}

    def facts(self) -> dict:
        """What the run's privacy is, for the summary and the model card alike."""
        dp, on = self.dp, self.dp.enabled
        local = self.local
        return {"mode": dp.mode, "differential_privacy": on, "epsilon": self.epsilon(),
                "epsilon_by_party": self.by_party(),
                "noise_sampler": noise_sampler(self.seeded) if on or local else None,
                "delta": dp.delta if on else None, "noise_multiplier": dp.noise_multiplier if on else None,
                "clip_norm": dp.clip_norm if on else None, "accountant": dp.accountant if on else None,
                "sample_rate": dp.sample_rate, "sampling": dp.sampling.kind,
                "adjacency": dp.sampling.adjacency if on else None,
                "local_dp": ({"clip": local.clip, "noise_multiplier": local.noise_multiplier,
                              "epsilon": self.local_epsilon()} if local else None)}

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict() if self.accountant else None,
                "local_dp": self.ledger.state_dict() if self.ledger else None,
                "participation": self.known.state_dict() if self.known is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.accountant and state.get("accountant"):
            self.accountant.load_state_dict(state["accountant"])
        if self.ledger and state.get("local_dp"):
            self.ledger.load_state_dict(state["local_dp"])
        if self.known is not None and state.get("participation"):
            self.known.load_state_dict(state["participation"])
