"""Candidate trials for the serving ensemble: traffic splits, sequential tests and pruning (pure code).

The Ray Serve ensemble wraps these objects; nothing here imports Ray, touches files or uses a global
random generator, so every decision is reproducible from the inputs alone.

* Traffic splits: `stable_fraction` maps a key to [0, 1) with SHA-256 (never Python's `hash`, which is
  salted per process and would move users between arms on every restart). `ab_arm` puts a stable
  fraction of *users* in the candidate arm; `in_shadow` copies a stable fraction of *requests* to it.
* Shadow mode (`PairedSPRT`): both models answer the same request, so feedback is paired and only
  discordant pairs carry information (a sign test). Two one-sided sequential probability ratio tests
  (Wald 1945, "Sequential tests of statistical hypotheses", Ann. Math. Statist. 16) run side by side,
  H0 p = 1/2 against "better" p = 1/2 + delta and against "worse" p = 1/2 - delta, where p is the
  candidate's share of the discordant pairs; combined as in Sobel & Wald (1949) for three decisions.
* A/B mode (`TwoSampleTest`): the arms see different users, so outcomes are unpaired Bernoulli draws.
  The mixture SPRT with a normal approximation of the difference of success rates gives an
  always-valid p-value that may be checked after every outcome (Johari, Pekelis & Walsh 2017,
  "Always valid inference: continuous monitoring of A/B tests", arXiv:1512.04922).
* `CandidateTrial` is the state of one candidate (for a /members endpoint); `PruningTracker` names
  members whose routing weight stayed below a threshold for a window of recomputations.

Decisions are sticky: once a test says "promote" or "reject" it stops, later feedback is counted in
`late_updates` but ignored, because the error guarantees only hold for the stopping time that was used.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Literal

__all__ = [
    "Arm",
    "CandidateTrial",
    "Decision",
    "Mode",
    "PairedSPRT",
    "PruningTracker",
    "TwoSampleTest",
    "ab_arm",
    "in_shadow",
    "stable_fraction",
]

Arm = Literal["candidate", "production"]
Mode = Literal["shadow", "ab"]
_ARMS = ("candidate", "production")
_MODES = ("shadow", "ab")


class Decision(str, Enum):
    """Outcome of a candidate trial; compares equal to its plain string ("promote" == Decision.PROMOTE)."""

    PROMOTE = "promote"
    REJECT = "reject"
    CONTINUE = "continue"

    def __str__(self) -> str:  # the str mixin would print "Decision.PROMOTE" in f-strings and logs
        return self.value


# ----------------------------------------------------------------------------------------- validation


def _check_fraction(fraction: float, name: str = "fraction") -> float:
    # `not 0 <= x <= 1` is also true for NaN, which would otherwise route nothing silently
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {fraction!r}")
    return float(fraction)


def _check_open_unit(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def _check_count(value: int | None, name: str, minimum: int = 1, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}"
        )
    return value


def _as_bool(value: object, name: str) -> bool:
    # feedback often arrives as 0/1 or numpy booleans; anything else (None, "yes") is a caller bug
    if isinstance(value, (str, bytes)) or value is None or value not in (0, 1):
        raise ValueError(f"{name} must be a boolean (or 0/1), got {value!r}")
    return bool(value)


def _check_arm(arm: str) -> Arm:
    if arm not in _ARMS:
        raise ValueError(f"arm must be one of {_ARMS}, got {arm!r}")
    return arm  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- traffic splits


def stable_fraction(key: str | int, salt: str) -> float:
    """A number in [0, 1) fixed by (salt, key): the same on every process, host and restart."""
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        # None or objects would stringify to a shared or address-dependent value and collide
        raise TypeError(f"key must be a str or int, got {type(key).__name__}")
    if not isinstance(salt, str):
        raise TypeError(f"salt must be a str, got {type(salt).__name__}")
    # surrogatepass: a JSON string may hold a lone surrogate, which plain UTF-8 cannot encode; every
    # other string encodes as before, so no key moves
    digest = hashlib.sha256(f"{salt}:{key}".encode("utf-8", "surrogatepass")).digest()
    # keep 53 bits: a float holds them exactly, so the result can never round up to 1.0
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def ab_arm(user_id: str | int, fraction: float, salt: str = "ab") -> Arm:
    """The arm of a user: "candidate" for a stable `fraction` of users, else "production"."""
    fraction = _check_fraction(fraction)
    return "candidate" if stable_fraction(user_id, salt) < fraction else "production"


def in_shadow(request_key: str | int, fraction: float, salt: str = "shadow") -> bool:
    """Whether the candidate also answers this request (in the shadow; its answer is never returned)."""
    fraction = _check_fraction(fraction)
    return stable_fraction(request_key, salt) < fraction


# ---------------------------------------------------------------------------------- shadow: paired SPRT

_OPEN, _H0, _H1 = "open", "accept_h0", "accept_h1"


class _SequentialTest:
    """What both sequential tests share: a decision that, once reached, sticks, and why.
    Reasons: "better", "worse", "no_difference" (paired only), "max_pairs" / "max_samples"."""

    _decision: Decision = Decision.CONTINUE
    _reason: str | None = None

    @property
    def decision(self) -> Decision:
        return self._decision

    @property
    def reason(self) -> str | None:
        """Why the test stopped; None while running."""
        return self._reason

    def _stop(self, decision: Decision, reason: str) -> None:
        self._decision, self._reason = decision, reason


class PairedSPRT(_SequentialTest):
    """Sequential sign test on paired feedback (shadow mode), Wald 1945 / Sobel & Wald 1949.

    Among discordant pairs, a "win" is candidate right & production wrong, a "loss" the opposite;
    concordant pairs ("ties") say nothing about which model is better and leave the ratios unchanged.
    Test "better": H0 p = 0.5 vs H1 p = 0.5 + delta; test "worse": H0 vs p = 0.5 - delta, both with
    Wald's boundaries A = log((1 - beta) / alpha), B = log(beta / (1 - alpha)). Each test stops at its
    first boundary crossing and its log-likelihood ratio is frozen there.

    Decision: "promote" when "better" accepts H1 (false promotion rate <= alpha / (1 - beta) by Wald's
    inequality, about alpha in practice); "reject" when
    "worse" accepts H1, when both tests accept H0 (no difference of delta: not shown better), or when
    `max_pairs` paired outcomes (ties included: it bounds the labelled feedback spent) were seen
    without promotion; otherwise "continue". The decision is sticky (see module docstring).
    """

    def __init__(
        self, alpha: float = 0.05, beta: float = 0.1, delta: float = 0.15, max_pairs: int | None = None
    ) -> None:
        self.alpha = _check_open_unit(alpha, "alpha")
        self.beta = _check_open_unit(beta, "beta")
        if alpha + beta >= 1:  # Wald's boundaries would cross (A <= B): no test at all
            raise ValueError(f"alpha + beta must be < 1, got alpha={alpha}, beta={beta}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 0.5:
            raise ValueError(f"delta must be in (0, 0.5), got {delta!r}")
        self.delta = float(delta)
        self.max_pairs = _check_count(max_pairs, "max_pairs", optional=True)
        self.upper = math.log((1 - self.beta) / self.alpha)
        self.lower = math.log(self.beta / (1 - self.alpha))
        # a win multiplies the "better" ratio by (0.5 + delta) / 0.5 and the "worse" one by (0.5 - delta) / 0.5
        self._up, self._down = math.log1p(2 * self.delta), math.log1p(-2 * self.delta)
        self.pairs = self.wins = self.losses = self.ties = self.late_updates = 0
        self._llr = {"better": 0.0, "worse": 0.0}
        self._state = {"better": _OPEN, "worse": _OPEN}
        self._decision, self._reason = Decision.CONTINUE, None

    @property
    def log_likelihood_ratios(self) -> dict[str, float]:
        """Current (or frozen) log-likelihood ratios of the "better" and "worse" tests."""
        return dict(self._llr)

    def update(self, candidate_correct: bool, production_correct: bool) -> Decision:
        """Add one paired outcome; returns the decision after it."""
        cand = _as_bool(candidate_correct, "candidate_correct")
        prod = _as_bool(production_correct, "production_correct")
        if self._decision is not Decision.CONTINUE:
            self.late_updates += 1
            return self._decision
        self.pairs += 1
        if cand == prod:
            self.ties += 1
        else:
            win = cand
            self.wins += win
            self.losses += not win
            self._step("better", self._up if win else self._down)
            self._step("worse", self._down if win else self._up)
        self._decide()
        return self._decision

    def _step(self, test: str, increment: float) -> None:
        if self._state[test] != _OPEN:
            return
        self._llr[test] += increment
        if self._llr[test] >= self.upper:
            self._state[test] = _H1
        elif self._llr[test] <= self.lower:
            self._state[test] = _H0

    def _decide(self) -> None:
        if self._state["better"] == _H1:
            self._stop(Decision.PROMOTE, "better")
        elif self._state["worse"] == _H1:
            self._stop(Decision.REJECT, "worse")
        elif self._state["better"] == _H0 and self._state["worse"] == _H0:
            self._stop(Decision.REJECT, "no_difference")
        elif self.max_pairs is not None and self.pairs >= self.max_pairs:
            self._stop(Decision.REJECT, "max_pairs")

    def to_dict(self) -> dict[str, object]:
        return {
            "test": "paired_sprt",
            "decision": self._decision.value,
            "reason": self._reason,
            "pairs": self.pairs,
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "log_likelihood_ratios": self.log_likelihood_ratios,
            "alpha": self.alpha,
            "beta": self.beta,
            "delta": self.delta,
            "max_pairs": self.max_pairs,
            "late_updates": self.late_updates,
        }


# ------------------------------------------------------------------------------- A/B: mixture SPRT


class TwoSampleTest(_SequentialTest):
    """Always-valid two-sample test of success rates (A/B mode), Johari, Pekelis & Walsh 2017.

    With theta = rate(candidate) - rate(production), estimate theta_hat and its variance
    V = r_c (1 - r_c) / n_c + r_p (1 - r_p) / n_p; the normal mixture (theta ~ N(0, tau^2)) likelihood
    ratio against theta = 0 is Lambda = sqrt(V / (V + tau^2)) exp(tau^2 theta_hat^2 / (2 V (V + tau^2))),
    and the always-valid p-value is the running minimum of 1 / Lambda. tau is the typical effect size
    the test is tuned for (power is best for |theta| near tau).

    Nothing is computed until both arms have `min_samples` outcomes (the normal approximation is poor
    before). Decision: "promote" at the first p_value <= alpha with the candidate's observed rate
    higher, "reject" if it is lower, or when `max_samples` outcomes (both arms together) were seen
    without promotion; otherwise "continue". The decision is sticky (see module docstring).
    """

    def __init__(
        self, alpha: float = 0.05, tau: float = 0.05, min_samples: int = 50, max_samples: int | None = None
    ) -> None:
        self.alpha = _check_open_unit(alpha, "alpha")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau < math.inf:
            raise ValueError(f"tau must be a positive finite number, got {tau!r}")
        self.tau = float(tau)
        self.min_samples = _check_count(min_samples, "min_samples")
        # fewer than 2 * min_samples could never test anything: a rejection with no evidence at all
        self.max_samples = _check_count(
            max_samples, "max_samples", minimum=2 * self.min_samples, optional=True
        )
        self.n = {"candidate": 0, "production": 0}
        self.successes = {"candidate": 0, "production": 0}
        self.late_updates = 0
        self._p_value = 1.0
        self._decision, self._reason = Decision.CONTINUE, None

    @property
    def p_value(self) -> float:
        """Always-valid p-value for "no difference": non-increasing in the number of outcomes."""
        return self._p_value

    def rate(self, arm: Arm) -> float:
        """Observed success rate of an arm (nan before any outcome)."""
        arm = _check_arm(arm)
        return self.successes[arm] / self.n[arm] if self.n[arm] else math.nan

    def update(self, arm: Arm, correct: bool) -> Decision:
        """Add one outcome of `arm`; returns the decision after it."""
        arm = _check_arm(arm)
        ok = _as_bool(correct, "correct")
        if self._decision is not Decision.CONTINUE:
            self.late_updates += 1
            return self._decision
        self.n[arm] += 1
        self.successes[arm] += ok
        nc, npr = self.n["candidate"], self.n["production"]
        if nc >= self.min_samples and npr >= self.min_samples:
            theta = self.successes["candidate"] / nc - self.successes["production"] / npr
            # min() keeps the p-value valid at every time, not only at the current one
            self._p_value = min(self._p_value, math.exp(-max(self._log_mixture_ratio(theta), 0.0)))
            if self._p_value <= self.alpha:
                self._stop(
                    Decision.PROMOTE if theta > 0 else Decision.REJECT, "better" if theta > 0 else "worse"
                )
                return self._decision
        if self.max_samples is not None and nc + npr >= self.max_samples:
            self._stop(Decision.REJECT, "max_samples")
        return self._decision

    def _log_mixture_ratio(self, theta: float) -> float:
        # variance from rates shrunk by half a success and half a failure: the plain plug-in is 0 for an
        # all-correct arm (common for good models), which would make Lambda infinite on no evidence
        var = 0.0
        for arm in _ARMS:
            n = self.n[arm]
            r = (self.successes[arm] + 0.5) / (n + 1)
            var += r * (1 - r) / n
        tau2 = self.tau**2
        return 0.5 * math.log(var / (var + tau2)) + tau2 * theta**2 / (2 * var * (var + tau2))

    def to_dict(self) -> dict[str, object]:
        rates = {arm: (None if math.isnan(r := self.rate(arm)) else r) for arm in _ARMS}  # JSON has no NaN
        return {
            "test": "msprt",
            "decision": self._decision.value,
            "reason": self._reason,
            "n": dict(self.n),
            "successes": dict(self.successes),
            "rates": rates,
            "p_value": self._p_value,
            "alpha": self.alpha,
            "tau": self.tau,
            "min_samples": self.min_samples,
            "max_samples": self.max_samples,
            "late_updates": self.late_updates,
        }


# ------------------------------------------------------------------------------------ candidate trial


@dataclass
class CandidateTrial:
    """One candidate under test: its traffic split, its sequential test and its counters.

    `route(key)` counts a request and says whether the candidate answers it (key = request key in
    shadow mode, user id in A/B mode); `record_feedback` passes the labelled outcome to the test.
    """

    candidate: str
    mode: Mode
    fraction: float
    test: PairedSPRT | TwoSampleTest
    salt: str | None = None  # None: the mode's default salt ("shadow" / "ab")
    requests: int = 0  # requests seen by the ensemble while this trial existed
    answers: int = 0  # requests the candidate answered (shadow copies or candidate-arm answers)
    feedback: int = 0  # labelled outcomes passed to the test

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        self.fraction = _check_fraction(self.fraction)
        expected = PairedSPRT if self.mode == "shadow" else TwoSampleTest
        if not isinstance(self.test, expected):  # the feedback shape depends on the mode
            raise TypeError(
                f"test must be a {expected.__name__} in {self.mode} mode, got {type(self.test).__name__}"
            )
        if self.salt is None:
            self.salt = self.mode

    @classmethod
    def shadow(cls, candidate: str, fraction: float, **test_options: object) -> CandidateTrial:
        return cls(candidate, "shadow", fraction, PairedSPRT(**test_options))  # type: ignore[arg-type]

    @classmethod
    def ab(cls, candidate: str, fraction: float, **test_options: object) -> CandidateTrial:
        return cls(candidate, "ab", fraction, TwoSampleTest(**test_options))  # type: ignore[arg-type]

    @property
    def decision(self) -> Decision:
        return self.test.decision

    def route(self, key: str | int) -> bool:
        """Count one request; True when the candidate should answer it."""
        self.requests += 1
        if self.decision is not Decision.CONTINUE:  # a finished trial stops spending traffic
            return False
        if self.mode == "shadow":
            chosen = in_shadow(key, self.fraction, self.salt)  # type: ignore[arg-type]
        else:
            chosen = ab_arm(key, self.fraction, self.salt) == "candidate"  # type: ignore[arg-type]
        self.answers += chosen
        return chosen

    def record_feedback(
        self, candidate_correct: bool | None = None, production_correct: bool | None = None
    ) -> Decision:
        """Labelled outcome of one request: both models' correctness in shadow mode, exactly one in
        A/B mode (that of the arm which answered the user)."""
        given = {"candidate_correct": candidate_correct, "production_correct": production_correct}
        if self.mode == "shadow":
            missing = [name for name, value in given.items() if value is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} required in shadow mode (paired feedback)")
            decision = self.test.update(candidate_correct, production_correct)  # type: ignore[call-arg]
        else:
            present = [name for name, value in given.items() if value is not None]
            if len(present) != 1:
                raise ValueError(
                    "exactly one of candidate_correct, production_correct is required in ab mode"
                )
            arm = "candidate" if candidate_correct is not None else "production"
            decision = self.test.update(arm, given[present[0]])  # type: ignore[arg-type]
        self.feedback += 1
        return decision

    def to_dict(self) -> dict[str, object]:
        return {
            "candidate": self.candidate,
            "mode": self.mode,
            "fraction": self.fraction,
            "decision": self.decision.value,
            "requests": self.requests,
            "answers": self.answers,
            "feedback": self.feedback,
            "test": self.test.to_dict(),
        }


# ------------------------------------------------------------------------------------------- pruning


class PruningTracker:
    """Names members whose routing weight stayed below `threshold` for `window` observations in a row.

    Each member is returned once; a weight at or above the threshold resets its streak; a member
    missing from an observation is forgotten (streak and "already returned" alike). The best current
    member (highest weight, then name) is never returned when everything else is gone, so the
    ensemble always keeps someone to answer.
    """

    def __init__(self, threshold: float, window: int) -> None:
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0.0 <= threshold < math.inf
        ):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        self.threshold = float(threshold)
        self.window = _check_count(window, "window")
        self.streaks: dict[str, int] = {}
        self.pruned: set[str] = set()

    def observe(self, weights: Mapping[str, float]) -> list[str]:
        """Record one recomputation of the routing weights; returns the members to prune now (sorted)."""
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w < math.inf:
                raise ValueError(f"weights[{name!r}] must be a finite number >= 0, got {w!r}")
        self._forget_missing(weights)
        for name, w in weights.items():
            self.streaks[name] = self.streaks.get(name, 0) + 1 if w < self.threshold else 0
        due = sorted(n for n, s in self.streaks.items() if s >= self.window and n not in self.pruned)
        survivors = set(weights) - self.pruned - set(due)
        if due and not survivors:
            best = max(due, key=lambda n: (weights[n], n))
            due.remove(best)  # its streak goes on: pruned later once a better member exists
        self.pruned.update(due)
        return due

    def _forget_missing(self, weights: Mapping[str, float]) -> None:
        for name in [n for n in self.streaks if n not in weights]:
            del self.streaks[name]
        self.pruned &= set(weights)
