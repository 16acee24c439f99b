"""How well the drift detectors (sim/detectors.py) work, on streams with known change points
(`fedmeta drift eval`): detection delay and false alarms per detector, over several seeds, on
the writers data drifted four ways (rotation, new writers, label shift, joiners)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedmeta.sim.config import DataConfig
from fedmeta.sim.data import build_dataset
from fedmeta.sim.data.drift import rotate
from fedmeta.sim.detectors import (
    AutoencoderDetector,
    Detector,
    DriftMonitor,
    IsolationForestDetector,
    TwoSampleDrift,
    check_rate,
)
from fedmeta.sim.seeding import np_rng


# ---------------------------------------------------------------- streams and evaluation
def make_stream(
    pre: np.ndarray, post: np.ndarray, batch: int, change_at: int, n_batches: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """n_batches batches of `batch` samples: from `pre` before batch index change_at, from `post` after.

    Each batch is drawn without replacement from its pool; successive batches are independent."""
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    if n_batches < 1:
        raise ValueError(f"n_batches: must be >= 1, got {n_batches}")
    if not 0 <= change_at <= n_batches:
        raise ValueError(f"change_at: must be in 0..{n_batches} (n_batches), got {change_at}")
    pools = {"pre": np.asarray(pre), "post": np.asarray(post)}
    for name, pool in pools.items():
        if len(pool) < batch:
            raise ValueError(f"{name}: {len(pool)} samples, fewer than one batch of {batch}")
    stream = []
    for i in range(n_batches):
        pool = pools["pre"] if i < change_at else pools["post"]
        stream.append(pool[rng.choice(len(pool), batch, replace=False)])
    return stream


def evaluate_stream(
    monitor_factory: Callable[[], DriftMonitor], stream: Sequence[np.ndarray], change_at: int
) -> dict:
    """Detection delay and false alarms of a fresh monitor on a stream whose change is at batch change_at.

    Each batch's own alarm counts (not the sticky first alarm): detection_delay = first alarming
    batch at or after change_at, minus change_at (None if none); false_alarms = alarming batches
    before change_at; false_alarm_rate = false_alarms / change_at (None if change_at is 0).
    change_at = len(stream) evaluates a stream without drift."""
    if not 0 <= change_at <= len(stream):
        raise ValueError(f"change_at: must be in 0..{len(stream)} (the stream's batches), got {change_at}")
    monitor = monitor_factory()
    alarms = [monitor.update(b)["alarm"] for b in stream]
    false_alarms = sum(alarms[:change_at])
    delay = next((i - change_at for i in range(change_at, len(alarms)) if alarms[i]), None)
    return {
        "detection_delay": delay,
        "false_alarms": int(false_alarms),
        "false_alarm_rate": false_alarms / change_at if change_at else None,
    }


def evaluate_detectors(
    reference: np.ndarray,
    pre: np.ndarray,
    post: np.ndarray,
    *,
    batch: int = 64,
    n_batches: int = 40,
    change_at: int = 20,
    null_batches: int = 1000,
    false_alarm_rate: float = 0.05,
    ks_alpha: float = 0.01,
    ks_window: int = 128,
    ae_epochs: int = 30,
    seed: int = 0,
) -> dict[str, dict]:
    """Both detectors, and the KS test on the auto-encoder's scores, on (a) a stream of n_batches whose
    inputs switch from `pre` to `post` at batch change_at and (b) a drift-free stream of
    null_batches drawn from `pre` alone.

    Per detector: detection_delay and false_alarms_before_change on (a), false_alarm_rate on (b),
    and the threshold (the KS entry gives its alpha instead). JSON-ready: `fedmeta drift eval --json`.
    """
    check_rate(false_alarm_rate, "false_alarm_rate")
    detectors = _calibrated_detectors(reference, false_alarm_rate, batch, ae_epochs, seed)
    factories = _monitor_factories(
        detectors["autoencoder"], detectors["isolation_forest"], ks_window, ks_alpha
    )
    drift = make_stream(pre, post, batch, change_at, n_batches, np_rng(seed, "drift-stream"))
    null = make_stream(pre, pre, batch, null_batches, null_batches, np_rng(seed, "null-stream"))
    out: dict[str, dict] = {}
    for name, factory in factories.items():
        on_drift = evaluate_stream(factory, drift, change_at)
        on_null = evaluate_stream(factory, null, len(null))
        out[name] = {
            "detection_delay": on_drift["detection_delay"],
            "false_alarms_before_change": on_drift["false_alarms"],
            "false_alarm_rate": on_null["false_alarm_rate"],
            "null_alarms": on_null["false_alarms"],
            "null_batches": len(null),
        }
        if name in detectors:
            out[name]["threshold"] = detectors[name].threshold
        else:
            out[name]["alpha"] = ks_alpha
    return out


def _calibrated_detectors(
    reference: np.ndarray, false_alarm_rate: float, batch: int, ae_epochs: int, seed: int
) -> dict[str, Detector]:
    """Both detectors, fitted on `reference` with thresholds calibrated to `false_alarm_rate`."""
    detectors: dict[str, Detector] = {
        "autoencoder": AutoencoderDetector(epochs=ae_epochs, seed=seed),
        "isolation_forest": IsolationForestDetector(seed=seed),
    }
    for name, det in detectors.items():
        det.fit_calibrated(
            reference, false_alarm_rate, batch, np_rng(seed, "drift-calibrate", name), n_batches=5000
        )
    return detectors


def _monitor_factories(
    ae: AutoencoderDetector, forest: IsolationForestDetector, ks_window: int, ks_alpha: float
) -> dict[str, Callable[[], DriftMonitor]]:
    """Makers of a fresh monitor per stream: each detector's own, and the KS test on the
    auto-encoder's scores."""
    return {
        "autoencoder": lambda: DriftMonitor(ae),
        "isolation_forest": lambda: DriftMonitor(forest),
        # threshold inf: the KS test alone decides, so its delay and false alarms are its own
        "ks_autoencoder": lambda: DriftMonitor(
            ae, math.inf, TwoSampleDrift(ae.reference_scores, ks_window, ks_alpha)
        ),
    }


def false_alarm_summary(
    rates: Sequence[float], alarms: int, batches: int, target: float, confidence: float = 0.95
) -> dict:
    """A detector's drift-free alarm rate over several seeds (each its own calibration and
    stream): the mean with a t interval across seeds (what varies with calibration), the pooled
    rate with its exact binomial (Clopper-Pearson) interval, whether the target lies in the
    across-seed interval (the measured rate is within the target's sampling error) and whether the
    whole interval is above it (the detector alarms more often than it was calibrated for)."""
    from scipy import stats

    r = np.asarray(rates, dtype=np.float64)
    mean = float(r.mean())
    if len(r) > 1:
        half = float(stats.t.ppf(0.5 + confidence / 2, len(r) - 1) * r.std(ddof=1) / math.sqrt(len(r)))
    else:
        half = math.nan
    pooled = stats.binomtest(int(alarms), int(batches)).proportion_ci(confidence, method="exact")
    return {
        "rates": [float(v) for v in r],
        "mean": mean,
        "interval": [mean - half, mean + half] if len(r) > 1 else None,
        "pooled": alarms / batches,
        "pooled_interval": [float(pooled.low), float(pooled.high)],
        "target": target,
        "within_target": bool(len(r) > 1 and abs(mean - target) <= half),
        "exceeds_target": bool(len(r) > 1 and mean - half > target),
    }


def evaluate_seeds(
    kind: str, strength: float, seeds: Sequence[int], false_alarm_rate: float = 0.05, ks_alpha: float = 0.01
) -> dict:
    """`evaluate_detectors` on the writers scenario `kind` for each seed (fresh writers, detectors,
    calibration and streams per seed); per detector the per-seed delays and the false-alarm
    summary against its target (`false_alarm_rate`; the KS test's is its alpha)."""
    runs = [
        evaluate_detectors(
            *writers_drift_data(seed, kind, strength),
            seed=seed,
            false_alarm_rate=false_alarm_rate,
            ks_alpha=ks_alpha,
        )
        for seed in seeds
    ]
    out = {}
    for name in runs[0]:
        per = [run[name] for run in runs]
        target = ks_alpha if name.startswith("ks_") else false_alarm_rate
        out[name] = {
            "detection_delay": [p["detection_delay"] for p in per],
            "false_alarms_before_change": [p["false_alarms_before_change"] for p in per],
            "false_alarm_rate": false_alarm_summary(
                [p["false_alarm_rate"] for p in per],
                sum(p["null_alarms"] for p in per),
                sum(p["null_batches"] for p in per),
                target,
            ),
        }
    return out


# ---------------------------------------------------------------- writers scenarios
DRIFT_KINDS = ("rotation", "new_writers", "label_shift", "joiners")


JOINER_SHARE = 0.25  # joiners: the newcomers' share of the inputs after the change


def rotate_images(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate images (n, C, H, W) by `degrees`: the simulator's drift rotation (nearest pixel; see
    sim.data.drift.rotate for why not bilinear)."""
    return rotate(x, degrees)


def _writer_images(
    seed: int,
    writer_ids: range,
    samples_per_writer: int,
    style_strength: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Flattened 8x8 images (n, 64) and labels of the given federation writers, all their samples."""
    cfg = DataConfig(
        kind="writers",
        num_clients=writer_ids.stop,
        samples_per_client=samples_per_writer,
        train_fraction=1.0,
        global_clients=1,
        writers={"flips": False, "style_strength": style_strength},
    )
    clients = build_dataset(cfg, seed).clients(list(writer_ids))
    x = torch.cat([c.x_train for c in clients]).flatten(1).numpy()
    y = torch.cat([c.y_train for c in clients]).numpy()
    return x, y


def writers_drift_data(
    seed: int,
    kind: str = "rotation",
    strength: float = 1.0,
    *,
    n_reference: int = 8000,
    n_pre: int = 32000,
    n_post: int = 2000,
    samples_per_writer: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference, pre, post) images (n, 64) in [0, 1] for a drift scenario on the writers dataset.

    reference and pre come from disjoint blocks of federation writers (the deployed model's
    population); post from a third block, drifted by `kind`:
      rotation     every image rotated by 45 degrees * strength;
      new_writers  writers whose hidden style factors are 2 * strength times as strong
                   (strength 0.5 is no drift);
      label_shift  only digits 0-2 (pre has all ten): the class mix changes, and with it the inputs;
      joiners      new writers join (data.drift.joiners): a quarter of post from writers with styles
                   2 * strength times as strong, the rest from writers like those before.
    Many writers with few samples each, and large parts: a writer's samples score alike (about half
    the variance of either detector's scores is between writers), so the mean score of a part
    varies with the writers it drew. With 4000-writer parts the drift-free alarm rate at a 5%
    target stayed within 0.5-8% over seeds 1-8; with 1000-writer parts of 4 samples each it ranged
    over 1-29%. `pre` (the drift-free stream's pool) has 16,000 writers by default, so the 1,000
    batches of 64 of `evaluate_detectors`' null stream see mostly fresh writers.
    """
    _check_scenario(kind, strength, samples_per_writer, n_reference, n_pre, n_post)

    def writers(n: int) -> int:
        return math.ceil(n / samples_per_writer)

    # label shift keeps about 3 of 10 samples: 5x the writers leaves 1.5x n_post in expectation
    post_writers = writers(n_post) * (5 if kind == "label_shift" else 1)
    a, b = writers(n_reference), writers(n_pre)
    post_ids = range(a + b, a + b + post_writers)  # three disjoint blocks of writers
    x, y = _writer_images(seed, range(post_ids.stop), samples_per_writer)
    per = samples_per_writer
    reference, pre = x[:n_reference], x[a * per : a * per + n_pre]
    post_x, post_y = x[post_ids.start * per :], y[post_ids.start * per :]
    post = _drifted_post(seed, kind, strength, post_ids, per, post_x, post_y, n_post)
    return reference, pre, np.ascontiguousarray(post, dtype=np.float32)


def _check_scenario(
    kind: str, strength: float, samples_per_writer: int, n_reference: int, n_pre: int, n_post: int
) -> None:
    """`writers_drift_data`'s arguments, checked: each error names its argument."""
    if kind not in DRIFT_KINDS:
        raise ValueError(f"kind: expected one of {DRIFT_KINDS}, got {kind!r}")
    if strength < 0:
        raise ValueError(f"strength: must be >= 0, got {strength}")
    if samples_per_writer < 2:
        raise ValueError(f"samples_per_writer: must be >= 2, got {samples_per_writer}")
    for name, n in (("n_reference", n_reference), ("n_pre", n_pre), ("n_post", n_post)):
        if n < 1:
            raise ValueError(f"{name}: must be >= 1, got {n}")


def _drifted_post(
    seed: int,
    kind: str,
    strength: float,
    post_ids: range,
    per: int,
    post_x: np.ndarray,
    post_y: np.ndarray,
    n_post: int,
) -> np.ndarray:
    """The post-change images of scenario `kind`, from the third block of writers (`post_ids`, `per`
    samples each; their undrifted images and labels `post_x`, `post_y`)."""
    if kind == "rotation":
        images = torch.from_numpy(post_x[:n_post]).view(-1, 1, 8, 8)
        post = rotate_images(images, 45.0 * strength).flatten(1).numpy()
    elif kind == "new_writers":
        post = _writer_images(seed, post_ids, per, style_strength=2.0 * strength)[0][:n_post]
    elif kind == "joiners":
        new = _writer_images(seed, post_ids, per, style_strength=2.0 * strength)[0]
        k = round(JOINER_SHARE * n_post)
        mixed = np.concatenate([new[:k], post_x[k:n_post]])  # newcomers and old writers, disjoint ids
        post = mixed[np_rng(seed, "drift-joiners-mix").permutation(len(mixed))]  # mixed in every batch
    else:
        post = post_x[post_y <= 2][:n_post]
    return post
