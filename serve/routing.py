"""Dynamic routing between specialized ensemble members (pure: numpy only, no Ray, no I/O, no global RNG).

Implements the routing controller of the design note "Dynamic Model Specialization via Federated
Hyperparameter Drift":

    total_alignment = sum(alignment); total_compensation = sum(compensation)
    new_weight[m] = historical[m] * (1 + alignment[m] / total_alignment + compensation[m] / total_compensation)
    normalize new weights to sum to 1

* historical   -- each member's accuracy on labelled feedback (``FeedbackTracker``);
* alignment    -- similarity between a sliding window of recent inputs and the member's training
                  input distribution (``InputProfile`` + ``alignment``);
* compensation -- how little the member's quality has degraded since deployment (``drift_compensation``).

``RoutingController`` holds that state; a Ray Serve deployment wraps it and pushes ``to_state()`` to
replicas, which answer with ``combine`` over the ``top_members``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# Default variance floor of a profile. Features that never vary in training (e.g. image borders) would
# otherwise get ~0 variance, and any tiny deviation there would dominate the divergence of every input.
VAR_FLOOR = 1e-3
# exp(-D) underflows to 0.0 for large D; alignment is documented to stay in (0, 1].
_MIN_ALIGNMENT = np.finfo(float).tiny


# ---------------------------------------------------------------------------------------------- weights


def _check_members(historical: Mapping[str, float], other: Mapping[str, float], field: str) -> None:
    """Same member set in every input, so no member is silently dropped or invented."""
    missing = sorted(set(historical) - set(other))
    extra = sorted(set(other) - set(historical))
    if missing or extra:
        raise ValueError(
            f"{field} must cover exactly the members of historical: missing {missing}, extra {extra}"
        )


def _check_values(values: Mapping[str, float], field: str) -> None:
    for member, v in values.items():
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{field}[{member!r}] = {v!r} must be finite and >= 0")


def _share(value: float, total: float) -> float:
    """value/total, or 0 when the total is 0: a term nobody scores on carries no information."""
    return value / total if total > 0 else 0.0


def update_routing_weights(
    historical: Mapping[str, float], alignment: Mapping[str, float], compensation: Mapping[str, float]
) -> dict[str, float]:
    """The design note's update: historical * (1 + alignment share + compensation share), normalized."""
    if not historical:
        raise ValueError("update_routing_weights needs at least one member")
    _check_members(historical, alignment, "alignment")
    _check_members(historical, compensation, "compensation")
    for values, field in (
        (historical, "historical"),
        (alignment, "alignment"),
        (compensation, "compensation"),
    ):
        _check_values(values, field)
    total_a, total_c = math.fsum(alignment.values()), math.fsum(compensation.values())
    raw = {
        m: h * (1.0 + _share(alignment[m], total_a) + _share(compensation[m], total_c))
        for m, h in historical.items()
    }
    return _normalize(raw)


def _normalize(raw: Mapping[str, float]) -> dict[str, float]:
    """Scale to sum 1; all-zero evidence means we know nothing, so fall back to uniform."""
    total = math.fsum(raw.values())
    if total <= 0:
        return {m: 1.0 / len(raw) for m in raw}
    return {m: v / total for m, v in raw.items()}


# -------------------------------------------------------------------------------------------- alignment


def _as_rows(x: np.ndarray, what: str) -> np.ndarray:
    """(n, ...) -> (n, d) float64; members see flattened features, whatever the input's shape."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"{what} must have shape (n, d), got {x.shape}")
    x = x.reshape(len(x), -1)
    if len(x) == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} must have at least one row and one feature, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains non-finite values")
    return x


@dataclass(frozen=True)
class InputProfile:
    """A member's training input distribution as a diagonal Gaussian: per-feature mean and variance."""

    mean: np.ndarray
    var: np.ndarray
    n: int

    @classmethod
    def fit(cls, x: np.ndarray, var_floor: float = VAR_FLOOR) -> InputProfile:
        """Summarize a sample of inputs (n, d) (trailing dims are flattened)."""
        if not var_floor > 0:
            raise ValueError(f"var_floor = {var_floor!r} must be > 0")
        rows = _as_rows(x, "x")
        return cls(rows.mean(axis=0), np.maximum(rows.var(axis=0), var_floor), len(rows))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def to_dict(self) -> dict:
        """JSON-friendly form, to travel inside a model card."""
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "n": int(self.n)}

    @classmethod
    def from_dict(cls, d: Mapping) -> InputProfile:
        mean = np.asarray(d["mean"], dtype=np.float64)
        var = np.asarray(d["var"], dtype=np.float64)
        if mean.ndim != 1 or mean.shape != var.shape or len(mean) == 0:
            raise ValueError(f"profile mean {mean.shape} and var {var.shape} must be equal-length vectors")
        if not (np.isfinite(mean).all() and np.isfinite(var).all() and (var > 0).all()):
            raise ValueError("profile mean must be finite and var finite and > 0")
        if int(d["n"]) < 1:
            raise ValueError(f"profile n = {d['n']!r} must be >= 1")
        return cls(mean, var, int(d["n"]))


def symmetric_kl(mean_p: np.ndarray, var_p: np.ndarray, mean_q: np.ndarray, var_q: np.ndarray) -> np.ndarray:
    """Per-feature Jeffreys divergence KL(P||Q) + KL(Q||P) between 1-D Gaussians (closed form).

    KL(P||Q) = 0.5 * (vp/vq + (mp-mq)^2/vq - 1 + ln(vq/vp)); in the sum the log terms cancel, leaving
    0.5 * (vp/vq + vq/vp - 2 + (mp-mq)^2 * (1/vp + 1/vq)).
    """
    d2 = (mean_p - mean_q) ** 2
    return 0.5 * (var_p / var_q + var_q / var_p - 2.0 + d2 * (1.0 / var_p + 1.0 / var_q))


def alignment(window: np.ndarray, profile: InputProfile) -> float:
    """Similarity in (0, 1] of a window of inputs (n, d) to a profile: exp(-mean symmetric KL)."""
    rows = _as_rows(window, "window")
    if rows.shape[1] != profile.dim:
        raise ValueError(f"window has {rows.shape[1]} features but the profile has {profile.dim}")
    # Fit the same diagonal Gaussian (same floor) to the window so both sides are compared alike.
    recent = InputProfile.fit(rows)
    # Mean (not sum) over features so the scale does not depend on the input dimension.
    d = float(np.mean(symmetric_kl(recent.mean, recent.var, profile.mean, profile.var)))
    return max(math.exp(-d), _MIN_ALIGNMENT)


# --------------------------------------------------------------------------------- quality and feedback


def _check_unit(value: float, field: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{field} = {value!r} must be in [0, 1]")


def drift_compensation(reference_quality: float, recent_quality: float, floor: float = 0.05) -> float:
    """In [floor, 1]: 1 - relative degradation of recent vs reference quality, 1 if not degraded."""
    _check_unit(reference_quality, "reference_quality")
    _check_unit(recent_quality, "recent_quality")
    _check_unit(floor, "floor")
    if recent_quality >= reference_quality:  # also covers reference 0: nothing to degrade from
        return 1.0
    # The floor keeps a degraded member routable: the other terms may still favour it.
    return max(floor, 1.0 - (reference_quality - recent_quality) / reference_quality)


class FeedbackTracker:
    """A member's accuracy on labelled feedback: an exponentially decayed Beta(1, 1) posterior.

    Each feedback event multiplies all older evidence by 0.5 ** (1 / half_life), so evidence that is
    `half_life` events old counts half; ``half_life=None`` (or inf) keeps all evidence.
    """

    def __init__(self, half_life: float | None = 200.0) -> None:
        if half_life is not None and not half_life > 0:
            raise ValueError(f"half_life = {half_life!r} must be > 0 (or None for no decay)")
        self.half_life = half_life
        self._decay = 1.0 if half_life is None else 0.5 ** (1.0 / half_life)
        self.successes = 0.0  # decayed pseudo-counts on top of the Beta(1, 1) prior
        self.failures = 0.0
        self.count = 0  # raw number of feedback events, never decayed

    def update(self, correct: bool | int, total: int = 1) -> None:
        """Record `total` events of which `correct` were right (a bool for a single event)."""
        correct, total = int(correct), int(total)
        if total < 1 or not 0 <= correct <= total:
            raise ValueError(f"need 0 <= correct ({correct}) <= total ({total}) and total >= 1")
        # A batch counts as `total` simultaneous events: older evidence fades by `total` steps.
        fade = self._decay**total
        self.successes = self.successes * fade + correct
        self.failures = self.failures * fade + (total - correct)
        self.count += total

    @property
    def accuracy(self) -> float:
        """Posterior mean (1 + successes) / (2 + successes + failures)."""
        return (1.0 + self.successes) / (2.0 + self.successes + self.failures)

    def to_state(self) -> dict:
        return {
            "half_life": self.half_life,
            "successes": self.successes,
            "failures": self.failures,
            "count": self.count,
        }

    @classmethod
    def from_state(cls, state: Mapping) -> FeedbackTracker:
        t = cls(state["half_life"])
        t.successes, t.failures, t.count = (
            float(state["successes"]),
            float(state["failures"]),
            int(state["count"]),
        )
        return t


# ----------------------------------------------------------------------------------------- controller


class RoutingController:
    """Routing state of an ensemble: profiles, feedback, a sliding input window and the current weights."""

    def __init__(
        self,
        profiles: Mapping[str, InputProfile],
        reference_quality: Mapping[str, float],
        window: int = 256,
        half_life: float | None = 200.0,
        min_feedback: int = 20,
    ) -> None:
        if not profiles:
            raise ValueError("RoutingController needs at least one member")
        _check_members(profiles, reference_quality, "reference_quality")
        if window < 2:
            raise ValueError(f"window = {window} must be >= 2 (a distribution needs two rows)")
        if min_feedback < 0:
            raise ValueError(f"min_feedback = {min_feedback} must be >= 0")
        self.window, self.half_life, self.min_feedback = int(window), half_life, int(min_feedback)
        self.profiles: dict[str, InputProfile] = {}
        self.reference_quality: dict[str, float] = {}
        self.trackers: dict[str, FeedbackTracker] = {}
        self.dim = next(iter(profiles.values())).dim
        for name, profile in profiles.items():
            self._register(name, profile, reference_quality[name])
        self._recent: deque[np.ndarray] = deque(maxlen=self.window)  # bounded: old rows fall off
        self._weights = _normalize({m: 0.0 for m in self.profiles})  # uniform until evidence arrives
        self.last_parts: dict[str, dict[str, float]] = {}

    def _register(self, name: str, profile: InputProfile, reference: float) -> None:
        # One input stream feeds every member, so all profiles must describe the same feature space.
        if profile.dim != self.dim:
            raise ValueError(f"profile of {name!r} has {profile.dim} features, the ensemble uses {self.dim}")
        _check_unit(reference, f"reference_quality[{name!r}]")
        self.profiles[name] = profile
        self.reference_quality[name] = float(reference)
        self.trackers[name] = FeedbackTracker(self.half_life)

    def _member(self, name: str) -> str:
        if name not in self.profiles:
            raise KeyError(f"unknown member {name!r}; members are {sorted(self.profiles)}")
        return name

    @property
    def members(self) -> list[str]:
        return list(self.profiles)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def observe(self, inputs: np.ndarray) -> None:
        """Append a batch of inputs (n, ...) to the sliding window (flattened rows)."""
        rows = _as_rows(inputs, "inputs")
        if rows.shape[1] != self.dim:
            raise ValueError(f"inputs have {rows.shape[1]} features, the ensemble uses {self.dim}")
        self._recent.extend(rows[-self.window :])  # rows beyond the window would be evicted anyway

    @property
    def window_rows(self) -> int:
        return len(self._recent)

    def feedback(self, member: str, correct: bool | int, total: int = 1) -> None:
        """Record labelled feedback on one member's answers."""
        self.trackers[self._member(member)].update(correct, total)

    def _alignments(self) -> dict[str, float]:
        if len(self._recent) < 2:  # one row has no spread: no distribution to compare yet
            return {m: 1.0 for m in self.profiles}
        window = np.stack(self._recent)
        return {m: alignment(window, p) for m, p in self.profiles.items()}

    def _compensation(self, member: str) -> float:
        tracker = self.trackers[member]
        # Too little feedback makes the accuracy mostly prior: do not penalize on it yet.
        if tracker.count < self.min_feedback:
            return 1.0
        return drift_compensation(self.reference_quality[member], tracker.accuracy)

    def recompute(self) -> dict[str, float]:
        """New weights from feedback accuracy, window alignment and drift compensation; stored and returned."""
        # Historical weights are the observed accuracy, not the previous routing weights: feeding
        # weights back into themselves would compound and lock routing onto one member.
        historical = {m: t.accuracy for m, t in self.trackers.items()}
        aligned = self._alignments()
        compensation = {m: self._compensation(m) for m in self.profiles}
        self._weights = update_routing_weights(historical, aligned, compensation)
        self.last_parts = {
            m: {
                "historical": historical[m],
                "alignment": aligned[m],
                "compensation": compensation[m],
                "weight": self._weights[m],
            }
            for m in self.profiles
        }
        return self.weights

    def add_member(
        self, name: str, profile: InputProfile, reference_quality: float, weight: float | None = None
    ) -> None:
        """Add a member; it gets `weight` (default: a uniform share) until the next recompute."""
        if name in self.profiles:
            raise ValueError(f"member {name!r} already exists")
        share = 1.0 / (len(self.profiles) + 1) if weight is None else float(weight)
        _check_unit(share, f"weight of {name!r}")
        self._register(name, profile, reference_quality)
        # Existing members keep their relative order, scaled to make room for the newcomer.
        self._weights = {m: w * (1.0 - share) for m, w in self._weights.items()}
        self._weights[name] = share
        if math.fsum(self._weights.values()) <= 0:
            self._weights = _normalize({m: 0.0 for m in self._weights})

    def remove_member(self, name: str) -> None:
        """Drop a member and renormalize the others' weights."""
        self._member(name)
        if len(self.profiles) == 1:
            raise ValueError(f"cannot remove {name!r}: it is the last member")
        for table in (self.profiles, self.reference_quality, self.trackers, self._weights, self.last_parts):
            table.pop(name, None)
        self._weights = _normalize(self._weights)

    def top_members(self, k: int) -> list[tuple[str, float]]:
        """The k highest-weighted members, weight descending, ties by name."""
        return _top(self._weights, k)

    def to_state(self, include_window: bool = False) -> dict:
        """Plain (JSON-friendly) dict; the window is optional since replicas only need the weights."""
        state = {
            "window": self.window,
            "half_life": self.half_life,
            "min_feedback": self.min_feedback,
            "members": {
                m: {
                    "profile": self.profiles[m].to_dict(),
                    "reference_quality": self.reference_quality[m],
                    "tracker": self.trackers[m].to_state(),
                }
                for m in self.profiles
            },
            "weights": dict(self._weights),
            "last_parts": {m: dict(p) for m, p in self.last_parts.items()},
        }
        if include_window:
            state["recent"] = [row.tolist() for row in self._recent]
        return state

    @classmethod
    def from_state(cls, state: Mapping) -> RoutingController:
        members = state["members"]
        ctl = cls(
            {m: InputProfile.from_dict(s["profile"]) for m, s in members.items()},
            {m: s["reference_quality"] for m, s in members.items()},
            window=state["window"],
            half_life=state["half_life"],
            min_feedback=state["min_feedback"],
        )
        ctl.trackers = {m: FeedbackTracker.from_state(s["tracker"]) for m, s in members.items()}
        weights = {m: float(w) for m, w in state["weights"].items()}
        _check_members(ctl.profiles, weights, "weights")
        _check_values(weights, "weights")
        ctl._weights = _normalize(weights)
        ctl.last_parts = {m: dict(p) for m, p in state.get("last_parts", {}).items()}
        if state.get("recent"):
            ctl.observe(np.asarray(state["recent"], dtype=np.float64))
        return ctl


# --------------------------------------------------------------------------------------------- combine


def _top(weights: Mapping[str, float], k: int) -> list[tuple[str, float]]:
    if k < 1:
        raise ValueError(f"k = {k} must be >= 1")
    return sorted(weights.items(), key=lambda mw: (-mw[1], mw[0]))[:k]


def _check_probs(member: str, p: np.ndarray, shape: tuple[int, ...] | None) -> None:
    if p.ndim != 2:
        raise ValueError(f"probs[{member!r}] must have shape (batch, classes), got {p.shape}")
    if shape is not None and p.shape != shape:
        raise ValueError(f"probs[{member!r}] has shape {p.shape}, expected {shape} like the other members")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError(f"probs[{member!r}] rows must be non-negative and sum to 1")


def combine(
    probs: Mapping[str, np.ndarray], weights: Mapping[str, float], top_k: int
) -> tuple[np.ndarray, list[tuple[str, float]]]:
    """Weighted average of the top_k members' class probabilities, weights renormalized over them.

    Members are ranked among those present in `probs`, so a caller may query only the members it routes to.
    """
    if not probs:
        raise ValueError("combine needs probabilities from at least one member")
    unknown = sorted(set(probs) - set(weights))
    if unknown:
        raise KeyError(f"no routing weight for members {unknown}")
    ranked = {m: float(weights[m]) for m in probs}
    _check_values(ranked, "weights")
    arrays = {m: np.asarray(p, dtype=np.float64) for m, p in probs.items()}
    shape = None
    for m, p in arrays.items():  # all of them: a mismatch is a caller bug even outside the top_k
        _check_probs(m, p, shape)
        shape = p.shape
    chosen = _normalize(dict(_top(ranked, top_k)))
    out = sum(w * arrays[m] for m, w in chosen.items())
    return np.asarray(out), list(chosen.items())
