"""Inference pattern analyzer: drift detectors on the inputs a served model receives.

A detector learns what normal inputs look like from reference data and gives each new input an
anomaly score (higher = more anomalous). The drift signal of a batch is its mean score; a batch
alarms when the signal exceeds a threshold calibrated on held-out reference batches to a target
false-alarm rate. Two detectors:

- `AutoencoderDetector`: per-sample reconstruction error of an auto-encoder trained on the reference
  (inputs unlike the reference reconstruct badly);
- `IsolationForestDetector`: scikit-learn's isolation forest (anomalies are isolated by few splits).

`TwoSampleDrift` adds a Kolmogorov-Smirnov test between the recent per-sample scores and the
reference scores: it sees a change of the score *distribution* that leaves the mean alone.
`DriftMonitor` runs a detector over a stream. How well they do on streams with a known change point
(detection delay, false alarms) is measured in sim/detector_eval.py.

Pure code: no Ray, no files, and every random draw comes from an explicit seeded generator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import ks_2samp
from sklearn.ensemble import IsolationForest

from fedmeta.sim.algorithms.grouping import AutoEncoder, train_autoencoder
from fedmeta.sim.seeding import np_rng, torch_gen

__all__ = [
    "AutoencoderDetector",
    "Detector",
    "DriftMonitor",
    "IsolationForestDetector",
    "TwoSampleDrift",
    "bootstrap_batches",
    "split_reference",
    "threshold_from_signals",
]


# ---------------------------------------------------------------- validation helpers
def check_rate(value: float, name: str) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name}: must be in (0, 1), got {value}")
    return float(value)


def _as_2d(x: np.ndarray, name: str, n_features: int | None = None) -> np.ndarray:
    """Samples (n, d) or (n, *shape) as float32 (n, d); empty, non-finite or mis-sized input is a
    ValueError naming `name`."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"{name}: expected samples of shape (n, features...), got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{name}: empty (no samples)")
    x = x.reshape(len(x), -1)
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(
            f"{name}: expected {n_features} features per sample (as in the reference), got {x.shape[1]}"
        )
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


# ---------------------------------------------------------------- calibration helpers
def threshold_from_signals(signals: Sequence[float] | np.ndarray, false_alarm_rate: float) -> float:
    """The (1 - false_alarm_rate) quantile of batch signals observed without drift.

    method="higher" picks an observed signal, so at most that share of the calibration signals
    lies strictly above the threshold (alarm is signal > threshold)."""
    far = check_rate(false_alarm_rate, "false_alarm_rate")
    signals = np.asarray(signals, dtype=np.float64).ravel()
    if signals.size == 0:
        raise ValueError("signals: empty (no calibration batches)")
    return float(np.quantile(signals, 1.0 - far, method="higher"))


def split_reference(
    reference: np.ndarray, holdout: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random (fit part, calibration part) of the reference, `holdout` of it for calibration.

    The threshold must come from samples the detector was not fitted on: an auto-encoder
    reconstructs its own training samples better than new ones, so calibrating on them would set
    the threshold too low and raise false alarms on every fresh batch."""
    holdout = check_rate(holdout, "holdout")
    n = len(reference)
    n_cal = round(holdout * n)
    if not 1 <= n_cal < n:
        raise ValueError(f"reference: {n} samples cannot be split with holdout={holdout}")
    order = rng.permutation(n)
    return reference[order[n_cal:]], reference[order[:n_cal]]


def bootstrap_batches(n: int, batch: int, n_batches: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (n_batches, batch) into n calibration samples, drawn with replacement.

    Drawing with replacement makes a batch mean's spread that of `batch` fresh samples; without
    replacement from a small pool it would be narrower, the threshold lower, and alarms more
    frequent than targeted."""
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    if n_batches < 1:
        raise ValueError(f"n_batches: must be >= 1, got {n_batches}")
    return rng.integers(0, n, size=(n_batches, batch))


# ---------------------------------------------------------------- detectors
class Detector(ABC):
    """Per-sample anomaly scores learnt from reference inputs, and a calibrated batch alarm.

    Subclasses implement `_fit` and `_score` on validated float32 (n, d) arrays.
    """

    threshold: float | None = None
    n_features: int | None = None
    reference_scores: np.ndarray | None = None  # per-sample scores of the calibration hold-out

    @abstractmethod
    def _fit(self, x: np.ndarray) -> None: ...

    @abstractmethod
    def _score(self, x: np.ndarray) -> np.ndarray: ...

    def fit(self, reference: np.ndarray) -> Detector:
        """Learn normal inputs from reference samples (n, d) or (n, *shape)."""
        x = _as_2d(reference, "reference")
        self.n_features = x.shape[1]
        self._fit(x)
        return self

    def score(self, batch: np.ndarray) -> np.ndarray:
        """Per-sample anomaly scores (n,), higher = more anomalous."""
        if self.n_features is None:
            raise RuntimeError(f"{type(self).__name__}: fit it before scoring")
        return np.asarray(self._score(_as_2d(batch, "batch", self.n_features)), dtype=np.float64)

    def signal(self, batch: np.ndarray) -> float:
        """The batch's drift signal: its mean per-sample score."""
        return float(self.score(batch).mean())

    def calibrate(self, reference_batches: Sequence[np.ndarray], false_alarm_rate: float) -> float:
        """Set `threshold` so that about `false_alarm_rate` of drift-free batches alarm.

        `reference_batches` must not contain the samples the detector was fitted on (see
        `split_reference`)."""
        check_rate(false_alarm_rate, "false_alarm_rate")
        if len(reference_batches) == 0:
            raise ValueError("reference_batches: no calibration batches")
        self.threshold = threshold_from_signals([self.signal(b) for b in reference_batches], false_alarm_rate)
        return self.threshold

    def fit_calibrated(
        self,
        reference: np.ndarray,
        false_alarm_rate: float,
        batch: int,
        rng: np.random.Generator,
        holdout: float = 0.5,
        n_batches: int = 1000,
    ) -> Detector:
        """Fit on part of the reference and calibrate the threshold on bootstrap batches of the rest.

        Equals `calibrate` on the batches `fit, cal = split_reference(...)`, `cal[bootstrap_batches(...)]`,
        but scores each hold-out sample once (the scores are per-sample, so a batch's signal is the
        mean of its samples' scores). Keeps the hold-out scores as `reference_scores` for
        `TwoSampleDrift`. The hold-out should be much larger than a batch: its mean score stands in
        for the population's, and an error of one batch-mean standard deviation there moves the
        alarm rate on fresh data from 5% to about 1% or 20%."""
        check_rate(false_alarm_rate, "false_alarm_rate")
        fit_part, cal_part = split_reference(_as_2d(reference, "reference"), holdout, rng)
        self.fit(fit_part)
        self.reference_scores = self.score(cal_part)
        idx = bootstrap_batches(len(cal_part), batch, n_batches, rng)
        self.threshold = threshold_from_signals(self.reference_scores[idx].mean(1), false_alarm_rate)
        return self

    def alarm(self, batch: np.ndarray) -> bool:
        """Whether the batch's signal exceeds the calibrated threshold."""
        if self.threshold is None:
            raise RuntimeError(f"{type(self).__name__}: calibrate it before asking for alarms")
        return self.signal(batch) > self.threshold


class AutoencoderDetector(Detector):
    """Reconstruction error (per-sample MSE) of an auto-encoder trained on the reference.

    The auto-encoder is the grouping one (`fedmeta.sim.algorithms.grouping`): an MLP with a sigmoid output,
    so inputs should lie in [0, 1]."""

    def __init__(
        self, latent: int = 16, epochs: int = 30, lr: float = 1e-3, batch_size: int = 64, seed: int = 0
    ):
        if latent < 1:
            raise ValueError(f"latent: must be >= 1, got {latent}")
        if epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {epochs}")
        if not lr > 0:
            raise ValueError(f"lr: must be > 0, got {lr}")
        self.latent, self.epochs, self.lr, self.batch_size, self.seed = latent, epochs, lr, batch_size, seed
        self.model: AutoEncoder | None = None

    def _fit(self, x: np.ndarray) -> None:
        self.model = train_autoencoder(
            torch.from_numpy(x),
            self.latent,
            self.epochs,
            self.lr,
            self.batch_size,
            torch_gen(self.seed, "drift-ae"),
        )

    @torch.no_grad()
    def _score(self, x: np.ndarray) -> np.ndarray:
        t = torch.tensor(x)  # a copy: x may be a read-only view (e.g. from Ray)
        return (self.model(t) - t).pow(2).mean(1).numpy()


class IsolationForestDetector(Detector):
    """scikit-learn's isolation forest; the score is -score_samples (short isolation paths score high)."""

    def __init__(self, n_estimators: int = 100, seed: int = 0):
        if n_estimators < 1:
            raise ValueError(f"n_estimators: must be >= 1, got {n_estimators}")
        self.n_estimators, self.seed = n_estimators, seed
        self.model: IsolationForest | None = None

    def _fit(self, x: np.ndarray) -> None:
        # a named stream, so the forest's randomness does not alias any other use of the seed
        state = int(np_rng(self.seed, "drift-iforest").integers(2**31 - 1))
        self.model = IsolationForest(n_estimators=self.n_estimators, random_state=state).fit(x)

    def _score(self, x: np.ndarray) -> np.ndarray:
        return -self.model.score_samples(x)


# ---------------------------------------------------------------- two-sample test
class TwoSampleDrift:
    """Kolmogorov-Smirnov test between the last `window` per-sample scores and the reference scores.

    Each `update` runs one test at level `alpha`, without correction for multiplicity. Without
    drift every test alarms with probability about alpha, so a stream of N updates raises about
    alpha * N alarms and the chance of at least one grows towards 1 with N (successive windows
    overlap, so the tests are correlated, but not enough to prevent that). Choose alpha as the
    tolerated false-alarm rate per update, or alpha = p / N (Bonferroni) to bound by p the chance of
    any false alarm over a horizon of N updates. `reference_scores` must be scores of samples the
    detector was not fitted on (`Detector.reference_scores`), or the test flags the generalization
    gap as drift. The test assumes independent samples: scores of one writer's inputs are alike, so
    a window from few sources alarms more often than alpha.
    """

    def __init__(self, reference_scores: np.ndarray, window: int = 128, alpha: float = 0.01):
        ref = np.asarray(reference_scores, dtype=np.float64).ravel()
        if ref.size == 0:
            raise ValueError("reference_scores: empty")
        if window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        self.reference_scores = ref
        self.window = window
        self.alpha = check_rate(alpha, "alpha")
        self._recent: deque[float] = deque(maxlen=window)

    def update(self, scores: np.ndarray) -> tuple[float, bool]:
        """Add a batch's per-sample scores; (p-value of the window against the reference, p < alpha)."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if scores.size == 0:
            raise ValueError("scores: empty")
        self._recent.extend(scores.tolist())
        p = float(ks_2samp(np.fromiter(self._recent, float), self.reference_scores).pvalue)
        return p, p < self.alpha

    def reset(self) -> None:
        self._recent.clear()


# ---------------------------------------------------------------- monitor
class DriftMonitor:
    """Feeds batches to a detector and keeps the drift-signal history.

    A batch alarms when its signal exceeds `threshold` (None: the detector's calibrated one) or,
    with `two_sample`, when the KS test rejects. Pass threshold=math.inf to alarm on the KS test
    alone. `alarm_at` is the index of the first alarming batch and stays set until `reset()`.
    """

    def __init__(
        self, detector: Detector, threshold: float | None = None, two_sample: TwoSampleDrift | None = None
    ):
        threshold = detector.threshold if threshold is None else threshold
        if threshold is None:
            raise ValueError("threshold: give one or calibrate the detector first")
        self.detector, self.threshold, self.two_sample = detector, float(threshold), two_sample
        self.signals: list[float] = []
        self.alarm_at: int | None = None

    @property
    def alarmed(self) -> bool:
        return self.alarm_at is not None

    def update(self, batch: np.ndarray) -> dict:
        """{signal, alarm (this batch's own), p_value (None without a two-sample test)}."""
        scores = self.detector.score(batch)
        signal = float(scores.mean())
        alarm = signal > self.threshold
        p_value = None
        if self.two_sample is not None:
            p_value, ks_alarm = self.two_sample.update(scores)
            alarm = alarm or ks_alarm
        self.signals.append(signal)
        if alarm and self.alarm_at is None:
            self.alarm_at = len(self.signals) - 1
        return {"signal": signal, "alarm": bool(alarm), "p_value": p_value}

    def reset(self) -> None:
        self.signals.clear()
        self.alarm_at = None
        if self.two_sample is not None:
            self.two_sample.reset()
